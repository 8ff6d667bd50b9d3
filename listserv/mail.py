"""Parsing and serializing messages with an explicit policy.

The raw bytes are always the record; an `EmailMessage` is a view used to decide
and to decorate. Parsing never raises on odd input, and `header()` never lets the
modern header parser's exceptions escape.
"""

from __future__ import annotations

import email.policy
from email.generator import BytesGenerator
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from email.utils import getaddresses
from io import BytesIO

#: CRLF line endings (what SMTP and DKIM need), keeping the source folding intact.
POLICY = email.policy.SMTP.clone(refold_source="none")
#: The same, allowing raw UTF-8 in headers (for SMTPUTF8 messages).
POLICY_UTF8 = email.policy.SMTPUTF8.clone(refold_source="none")


def parse(raw: bytes) -> EmailMessage:
    """The whole message, as `BytesParser` makes it.

    A single-part body becomes the payload in one piece: the parser would cut it
    into lines and join them again, 127,000 small strings for 9.9 MB (16 MB of
    Python's small-object arenas, which longer-lived objects then keep from being
    returned: issue 15). Multipart bodies need the parser.
    """
    split = _split(raw)
    if split is not None:
        msg, end = split
        try:
            whole = msg.get_content_maintype() in ("multipart", "message")
        except Exception:  # the full parse meets the same header, as it always did
            whole = True
        if not whole:
            body = memoryview(raw)[end:]  # decoded as the parser does, without a copy first
            msg.set_payload(str(body, "ascii", "surrogateescape"))
            return msg
    msg = BytesParser(policy=POLICY).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


def parse_headers(raw: bytes) -> EmailMessage:
    """The header section alone, with an empty body: never reads a large post's body."""
    split = _split(raw)
    if split is not None:
        return split[0]
    msg = BytesHeaderParser(policy=POLICY).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    msg.set_payload("")
    return msg


def _split(raw: bytes) -> tuple[EmailMessage, int] | None:
    """The header section parsed on its own (its payload empty) and where the body
    starts; None when the parser would not end the header section at the first
    empty line (a line that is no header field comes first, or there is no empty
    line), so only parsing everything finds where it ends."""
    if raw.startswith((b"\r\n", b"\n")):
        end = 2 if raw.startswith(b"\r") else 1
    else:
        crlf = raw.find(b"\n\r\n")
        lf = raw.find(b"\n\n", 0, len(raw) if crlf < 0 else crlf + 2)
        ends = [at + n for at, n in ((lf, 2), (crlf, 3)) if at >= 0]
        if not ends:
            return None
        end = min(ends)
    msg = BytesHeaderParser(policy=POLICY).parsebytes(raw[:end])
    assert isinstance(msg, EmailMessage)
    if msg.get_payload():  # the parser's body began before our empty line
        return None
    return msg, end


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
    out = BytesIO()
    _Generator(out, mangle_from_=False, policy=policy).flatten(msg)  # as msg.as_bytes does
    return out.getvalue()


class _Generator(BytesGenerator):
    """`BytesGenerator` writing each body in one piece.

    The stock one splits a body into lines to end each with the policy's line
    separator: 127,000 strings for a 9.9 MB post (issue 15, as in `parse`).
    """

    def _write_lines(self, lines: str) -> None:
        # the same as joining re.split(r"\r\n|\r|\n", lines) with self._NL
        newline: str = self._NL  # type: ignore[attr-defined]
        only_crlf = lines.count("\r\n") == lines.count("\r") == lines.count("\n")
        if not (newline == "\r\n" and only_crlf):  # else already as it must be: no copy
            lines = lines.replace("\r\n", "\n").replace("\r", "\n").replace("\n", newline)
        self.write(lines)
