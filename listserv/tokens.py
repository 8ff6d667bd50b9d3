"""Secrets mailed to people (in NAME-confirm+TOKEN@): issue, look up, consume.

Only the sha256 digest of a token is stored, so a copy of the database decides
nothing. A token is 128 random bits from `secrets`, written in lower-case
base32 (26 characters: letters and digits only): some relays and mail clients
change the case of a local part, and a token that survives that needs no
escaping in an address or a URL either.

Consuming is one conditional UPDATE (``used_at IS NULL`` and not expired), so
when two replies race with the same token exactly one of them wins: on
PostgreSQL the second UPDATE waits for the first to commit and then matches no
row; SQLite serializes writers.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv.models import Token, TokenKind

#: bytes of randomness in a token (128 bits)
TOKEN_BYTES = 16


def new_token() -> str:
    """A fresh token: 26 characters of [a-z2-7], 128 bits."""
    return base64.b32encode(secrets.token_bytes(TOKEN_BYTES)).decode("ascii").rstrip("=").lower()


def digest(raw: str) -> str:
    """What is stored for a token: the sha256 of its canonical (lower-case) form."""
    return hashlib.sha256(raw.strip().lower().encode("utf-8")).hexdigest()


def issue(
    session: Session,
    *,
    kind: TokenKind,
    list_id: int,
    expires_at: datetime,
    post_id: int | None = None,
    address: str = "",
    payload: dict[str, Any] | None = None,
) -> str:
    """Store a new token's digest; returns the raw token (the only copy)."""
    raw = new_token()
    session.add(
        Token(
            digest=digest(raw),
            kind=kind,
            list_id=list_id,
            post_id=post_id,
            address=address[:320],
            payload=payload,
            expires_at=expires_at,
        )
    )
    session.flush()
    return raw


def look_up(session: Session, raw: str, kind: TokenKind | None = None) -> Token | None:
    """The token row for a raw token, used or not, expired or not (the caller says why not).

    A lookup by digest needs no constant-time comparison: the attacker never
    controls the bytes compared against a secret.
    """
    if not raw or len(raw) > 200:
        return None
    stmt = sa.select(Token).where(Token.digest == digest(raw))
    if kind is not None:
        stmt = stmt.where(Token.kind == kind)
    return session.scalar(stmt)


def is_expired(token: Token, now: datetime) -> bool:
    return token.expires_at <= now


def consume(session: Session, token_id: int, *, now: datetime) -> bool:
    """Mark the token used; False when it was used (or expired) already, even by a racing reply."""
    result = session.execute(
        sa.update(Token)
        .where(Token.id == token_id, Token.used_at.is_(None), Token.expires_at > now)
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


def has_token(session: Session, post_id: int, kind: TokenKind) -> bool:
    stmt = sa.select(Token.id).where(Token.post_id == post_id, Token.kind == kind).limit(1)
    return session.scalar(stmt) is not None
