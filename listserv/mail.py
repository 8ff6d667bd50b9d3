"""Parsing and serializing messages with an explicit policy.

The raw bytes are always the record; an `EmailMessage` is a view used to decide
and to decorate. Parsing never raises on odd input, and `header()` never lets the
modern header parser's exceptions escape.
"""

from __future__ import annotations

import email.policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from email.utils import getaddresses

#: CRLF line endings (what SMTP and DKIM need), keeping the source folding intact.
POLICY = email.policy.SMTP.clone(refold_source="none")
#: The same, allowing raw UTF-8 in headers (for SMTPUTF8 messages).
POLICY_UTF8 = email.policy.SMTPUTF8.clone(refold_source="none")


def parse(raw: bytes) -> EmailMessage:
    msg = BytesParser(policy=POLICY).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


def parse_headers(raw: bytes) -> EmailMessage:
    """The header section only (the body is left unparsed): cheap on a large post."""
    msg = BytesHeaderParser(policy=POLICY).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


def header(msg: EmailMessage, name: str) -> str | None:
    """The header's value as text, or None; falls back to the raw value on parser errors."""
    try:
        value = msg.get(name)
    except Exception:
        value = _raw_header(msg, name)
    return None if value is None else text(str(value))


def text(value: str) -> str:
    """Turn raw 8-bit header bytes (kept by the parser as surrogate escapes) into text.

    SMTPUTF8 mail carries UTF-8 in its headers; anything that is not valid UTF-8
    becomes U+FFFD rather than an exception further down (the database, logs).
    """
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _raw_header(msg: EmailMessage, name: str) -> str | None:
    for key, value in msg.raw_items():
        if key.lower() == name.lower():
            return str(value)
    return None


def addresses(msg: EmailMessage, name: str) -> list[str]:
    """The bare addresses in every `name` header (e.g. all From: addresses)."""
    values: list[str] = []
    for key, value in msg.raw_items():
        if key.lower() == name.lower():
            values.append(text(str(value)))
    return [addr for _, addr in getaddresses(values) if "@" in addr]


def needs_utf8(msg: EmailMessage) -> bool:
    """True when some header carries raw non-ASCII text (an SMTPUTF8 message)."""
    return any(not str(v).isascii() for _, v in msg.raw_items())


def to_bytes(msg: EmailMessage) -> bytes:
    """Serialize with CRLF line endings, UTF-8 headers only when the message already has them."""
    policy = POLICY_UTF8 if needs_utf8(msg) else POLICY
    return msg.as_bytes(policy=policy)
