"""Secrets one installation shares: the key of one-click unsubscribe links and VERP
bounce addresses (HMACs that need no database row to check).

They live in the database, made on first use, so every process and every host on
one database signs and checks with the same key and nothing needs copying. When
two processes make the same secret at once, the unique name lets one insert win
and both read the winner's value.
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from listserv.models import SiteSecret

#: 256 bits, the HMAC-SHA256 key size
SECRET_BYTES = 32

#: the names in use; a new purpose gets its own key rather than sharing one
UNSUBSCRIBE = "unsubscribe"
VERP = "verp"


def get(session: Session, name: str) -> bytes:
    """The secret called `name`, made (and committed with the session) if absent."""
    found = session.scalar(sa.select(SiteSecret.value).where(SiteSecret.name == name))
    if found is not None:
        return found
    try:
        with session.begin_nested():
            session.add(SiteSecret(name=name, value=secrets.token_bytes(SECRET_BYTES)))
    except IntegrityError:
        pass  # another process made it first: read theirs
    value = session.scalar(sa.select(SiteSecret.value).where(SiteSecret.name == name))
    assert value is not None
    return value
