"""Merge fields: `$name`, `$address` and `$unsubscribe_url` filled in per recipient.

A list with `merge_fields` on may use them, also as `${name}`, in the Subject and
in the text/plain and text/html parts of a post (HTML-escaped there). The rules:

- Only those three names, in lower case, are fields. Any other `$word` (`$price`,
  `$NAME`, `$names`) is left exactly as written, as is `$unsubscribe_url` when no
  unsubscribe link can be made (no usable `[http] public_base_url`, see
  `unsubscribe_links`).
- A `$` right after another `$` never starts a field, and `$$` is left as
  written: `$$` and `$$name` reach readers unchanged (string.Template would turn
  them into `$` and `$name`; a price written `$$` must not change).
- `$name` is the member's display name, or empty when they gave none: a name
  guessed from the local part ("Dear j.smith1987") is worse than none.
- Values never carry control characters (a CR/LF from a display name would break
  lines, or headers in the Subject); those become spaces.

Parts are rewritten only where they can be decoded exactly: a known ASCII-compatible
charset and a transfer encoding we can undo, as `decorate` requires for its footer.
Parts inside multipart/signed or multipart/encrypted, message/* parts, attachments,
other types and parts that fail to decode are never touched. A filled part keeps its
charset when every value fits it, else it becomes UTF-8; it keeps its transfer
encoding when that can carry the result (7bit turns quoted-printable for 8-bit text,
7bit/8bit turn quoted-printable past 998-octet lines, anything turns base64 when a
value would form a MIME boundary line). A filled Subject is folded again, with
RFC 2047 encoded-words for a non-ASCII value.

A `Merger` serializes the post once with markers where the per-recipient parts go
(the Subject line, each filled part's Content-Type/-Transfer-Encoding lines and
body) and keeps the bytes between them: a copy is those bytes with each slot
encoded for the recipient, with no parsing or generating of the message per copy.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import enum
import functools
import html
import re
import secrets
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from email.errors import (
    InvalidBase64CharactersDefect,
    InvalidBase64LengthDefect,
    InvalidBase64PaddingDefect,
)
from email.message import EmailMessage, MIMEPart
from email.policy import EmailPolicy
from typing import cast

from listserv import mail, unsubscribe_links


class Field(enum.StrEnum):
    """What a piece of a filled text stands for."""

    NAME = "name"
    ADDRESS = "address"
    UNSUBSCRIBE_URL = "unsubscribe_url"
    #: the footer's placeholder for the recipient (prepare.PLACEHOLDER), not a `$` field
    RECIPIENT = "recipient"


#: `$name` or `${name}`, not right after another `$`; a name ends where an
#: identifier would (ASCII, as string.Template's idpattern).
_NAMES = "name|address|unsubscribe_url"
_FIELD = rf"(?<!\$)\$(?:({_NAMES})(?![A-Za-z0-9_])|\{{({_NAMES})\}})"
_DECODABLE = frozenset({"7bit", "8bit", "binary", "quoted-printable", "base64"})
_BASE64_DEFECTS = (
    InvalidBase64CharactersDefect,
    InvalidBase64LengthDefect,
    InvalidBase64PaddingDefect,
)
#: RFC 5322 §2.1.1: at most 998 octets a line, CRLF excluded.
_MAX_LINE = 998
#: RFC 5322 §2.1.1: lines SHOULD be at most 78 characters.
_FOLD_AT = 78
_SKIPPED_MULTIPARTS = frozenset({"multipart/signed", "multipart/encrypted"})

#: A text: literal strings and the fields between them.
Pieces = tuple[str | Field, ...]


@dataclass(frozen=True, slots=True)
class Values:
    """One recipient's field values, as plain text."""

    name: str
    address: str
    unsubscribe_url: str | None = None

    def of(self, html_part: bool) -> dict[Field, str]:
        """The text each field becomes: escaped for HTML, control characters removed."""
        found = {
            Field.NAME: _clean(self.name),
            Field.ADDRESS: _clean(self.address),
            Field.RECIPIENT: _clean(self.address),
        }
        if self.unsubscribe_url is not None:
            found[Field.UNSUBSCRIBE_URL] = _clean(self.unsubscribe_url)
        if html_part:
            return {key: html.escape(value, quote=True) for key, value in found.items()}
        return found


#: `{base_url}/unsubscribe/{token}`: the token scheme of one-click unsubscribe
#: (unsubscribe_links.py), so `$unsubscribe_url` and List-Unsubscribe are one link.
UnsubscribeLinks = unsubscribe_links.UnsubscribeLinks


def active_fields(unsubscribe: bool) -> frozenset[Field]:
    """The fields that get filled: `$unsubscribe_url` only when links can be made."""
    fields = {Field.NAME, Field.ADDRESS}
    if unsubscribe:
        fields.add(Field.UNSUBSCRIBE_URL)
    return frozenset(fields)


@functools.lru_cache(maxsize=4)
def _pattern(placeholder: str | None) -> re.Pattern[str]:
    if placeholder is None:
        return re.compile(_FIELD)
    return re.compile(f"({re.escape(placeholder)})|{_FIELD}")


def compile_text(text: str, active: frozenset[Field], placeholder: str | None = None) -> Pieces:
    """`text` cut into literals and fields once, so each copy only joins them."""
    pieces: list[str | Field] = []
    literal: list[str] = []
    at = 0
    pattern = _pattern(placeholder)
    for match in pattern.finditer(text):
        groups = [g for g in match.groups() if g is not None]
        if placeholder is not None and match.group(1) is not None:
            field = Field.RECIPIENT
        else:
            field = Field(groups[0])
            if field not in active:
                continue  # left as written, with the literal around it
        literal.append(text[at : match.start()])
        if "".join(literal):
            pieces.append("".join(literal))
        literal = []
        pieces.append(field)
        at = match.end()
    literal.append(text[at:])
    if "".join(literal):
        pieces.append("".join(literal))
    return tuple(pieces)


def fill(pieces: Pieces, values: dict[Field, str]) -> str:
    return "".join(values[p] if type(p) is Field else p for p in pieces)


def uses_fields(pieces: Pieces) -> bool:
    """True when a `$` field (not just the footer's placeholder) is in `pieces`."""
    return any(type(p) is Field and p is not Field.RECIPIENT for p in pieces)


def _clean(value: str) -> str:
    if value.isprintable():
        return value
    return "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in value)


@functools.lru_cache(maxsize=64)
def _ascii_compatible(charset: str) -> str | None:
    """The codec name of a charset whose ASCII is ASCII (not UTF-16, UTF-7), else None."""
    try:
        codec = codecs.lookup(charset).name
        sample = "".join(chr(c) for c in range(128))
        if sample.encode(codec) != sample.encode("ascii"):
            return None
    except (LookupError, UnicodeError):
        return None
    return codec


def _decode(part: MIMEPart) -> tuple[str, str] | None:
    """(text with LF line ends, codec) when the part decodes exactly, else None."""
    cte = (_header(part, "Content-Transfer-Encoding") or "7bit").strip().lower()
    if cte not in _DECODABLE:
        return None
    codec = _ascii_compatible(part.get_content_charset("us-ascii"))
    if codec is None:
        return None
    defects_before = len(part.defects)
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return None
    if any(isinstance(d, _BASE64_DEFECTS) for d in part.defects[defects_before:]):
        return None
    try:
        text = data.decode(codec)
    except UnicodeDecodeError:
        return None
    text = text.replace("\r\n", "\n")
    if "\r" in text:
        return None  # a bare CR: not a line end we could write back as it was
    return text, codec


def _header(part: MIMEPart, name: str) -> str | None:
    return mail.header(cast(EmailMessage, part), name)


def _targets(
    part: MIMEPart, boundaries: tuple[bytes, ...]
) -> Iterator[tuple[MIMEPart, bool, tuple[bytes, ...]]]:
    """(part, is HTML, enclosing boundaries) of every part a field may be filled in."""
    ctype = part.get_content_type()
    maintype = part.get_content_maintype()
    if maintype == "multipart":
        if ctype in _SKIPPED_MULTIPARTS or not part.is_multipart():
            return
        boundary = part.get_boundary()
        inner = boundaries + ((boundary.encode("ascii", "replace"),) if boundary else ())
        for child in part.iter_parts():
            yield from _targets(child, inner)
        return
    if ctype not in ("text/plain", "text/html") or part.is_multipart():
        return
    if part.get_content_disposition() == "attachment":
        return
    yield part, ctype == "text/html", boundaries


class _PartSlot:
    """One filled part: its text cut into pieces and how its headers are written."""

    __slots__ = (
        "_headers",
        "boundaries",
        "codec",
        "content_type",
        "cte",
        "had_cte",
        "html",
        "label",
        "pieces",
    )

    def __init__(
        self,
        part: MIMEPart,
        pieces: Pieces,
        codec: str,
        is_html: bool,
        boundaries: tuple[bytes, ...],
    ) -> None:
        self.pieces = pieces
        self.codec = codec
        self.html = is_html
        self.boundaries = boundaries
        self.content_type = _raw_value(part, "Content-Type")
        charset = part.get_param("charset") if self.content_type is not None else None
        self.label: str | None = charset if isinstance(charset, str) else None
        written = _header(part, "Content-Transfer-Encoding")
        self.had_cte = written is not None
        self.cte = (written or "7bit").strip().lower()
        self._headers: dict[tuple[str | None, str], bytes] = {}

    def encode(self, text: str) -> tuple[bytes, bytes]:
        """(the part's Content-Type and CTE lines, its body) for the filled `text`."""
        label = self.label
        try:
            data = text.replace("\n", "\r\n").encode(self.codec)
        except UnicodeEncodeError:
            label = "utf-8"
            data = text.replace("\n", "\r\n").encode("utf-8")
        cte = self.cte
        if cte in ("7bit", "8bit", "binary"):
            too_long = any(len(line) > _MAX_LINE for line in data.split(b"\r\n"))
            if too_long or (cte == "7bit" and not data.isascii()):
                cte = "quoted-printable"
        body = _transfer_encode(data, cte)
        if cte != "base64" and any(b"--" + b in body for b in self.boundaries):
            cte = "base64"  # a value that reads as a boundary line would cut the part
            body = _transfer_encode(data, cte)
        return self._header_lines(label, cte), body

    def _header_lines(self, label: str | None, cte: str) -> bytes:
        key = (label, cte)
        cached = self._headers.get(key)
        if cached is not None:
            return cached
        lines = ""
        if label == self.label:
            if self.content_type is not None:
                lines = mail.POLICY.fold("Content-Type", self.content_type)
        else:
            scratch = MIMEPart(policy=mail.POLICY)
            scratch.set_raw("Content-Type", self.content_type or "text/plain")
            scratch.set_param("charset", label or "us-ascii")
            lines = "".join(mail.POLICY.fold(n, v) for n, v in scratch.raw_items())
        if self.had_cte or cte != self.cte:
            lines += f"Content-Transfer-Encoding: {cte}\r\n"
        encoded = lines.encode("ascii", "surrogateescape")
        self._headers[key] = encoded
        return encoded

    def default_header_lines(self) -> bytes:
        """The headers as they are when every value fits: what most copies carry."""
        return self._header_lines(self.label, self.cte)


def _raw_value(part: MIMEPart, name: str) -> str | None:
    for key, value in part.raw_items():
        if key.lower() == name.lower():
            return str(value)
    return None


def _transfer_encode(data: bytes, cte: str) -> bytes:
    if cte == "base64":
        return base64.encodebytes(data).replace(b"\n", b"\r\n")
    if cte == "quoted-printable":
        return binascii.b2a_qp(data, istext=True)
    return data


def _rewrite_headers(part: MIMEPart, replace: dict[str, str | None]) -> None:
    """Give the first header of each name in `replace` its new value, in its place
    (None drops every header of that name); a name not present is added at the end.
    Later headers of a replaced name stay as written, as do all the others."""
    drop = {name.lower() for name, value in replace.items() if value is None}
    first = {name.lower(): (name, value) for name, value in replace.items() if value is not None}
    items = list(part.raw_items())
    for name in {n.lower() for n, _ in items}:
        del part[name]
    for name, value in items:
        key = name.lower()
        if key in drop:
            continue
        if key in first:
            part.set_raw(name, first.pop(key)[1])
        else:
            part.set_raw(name, value)
    for name, new in first.values():
        part.set_raw(name, new)


_Segment = bytes | tuple[str, int]


class Merger:
    """A decorated post serialized once, with slots for what each recipient changes."""

    def __init__(
        self,
        segments: list[_Segment],
        subject: Pieces | None,
        slots: list[_PartSlot],
        policy: EmailPolicy[EmailMessage],
    ) -> None:
        self._segments = segments
        self._subject = subject
        self._slots = slots
        self._policy = policy
        #: how many segments lead up to the first Subject or body slot
        self._shared = next(
            (i for i, seg in enumerate(segments) if type(seg) is tuple and seg[0] != "H"),
            len(segments),
        )

    @classmethod
    def build(cls, msg: EmailMessage, active: frozenset[Field], placeholder: str) -> Merger | None:
        """A merger for `msg` (which it changes), or None when no field is used in it."""
        utf8 = mail.needs_utf8(msg)
        token = f"LISTSERV-MERGE-{secrets.token_hex(8)}"
        used = False
        subject: Pieces | None = None
        text = mail.header(msg, "Subject")
        if text is not None:
            pieces = compile_text(text, active)
            if uses_fields(pieces):
                subject = pieces
                used = True
        slots: list[_PartSlot] = []
        found: list[tuple[MIMEPart, _PartSlot]] = []
        for part, is_html, boundaries in _targets(msg, ()):
            decoded = _decode(part)
            if decoded is None:
                continue
            pieces = compile_text(decoded[0], active, placeholder)
            if not any(type(p) is Field for p in pieces):
                continue
            used = used or uses_fields(pieces)
            found.append((part, _PartSlot(part, pieces, decoded[1], is_html, boundaries)))
        if not used:
            return None
        if subject is not None:
            _rewrite_headers(msg, {"Subject": f"{token}-S"})
        for index, (part, slot) in enumerate(found):
            slots.append(slot)
            _rewrite_headers(
                part,
                {
                    "Content-Type": f"text/plain; x-listserv-merge={token}-H{index}",
                    "Content-Transfer-Encoding": None,
                },
            )
            part.set_payload(f"{token}-B{index}")
        policy = mail.POLICY_UTF8 if utf8 else mail.POLICY
        data = msg.as_bytes(policy=policy)
        marker = re.compile(
            rb"Subject: %(t)s-S\r\n|Content-Type: text/plain; x-listserv-merge=%(t)s-H(\d+)\r\n"
            rb"|%(t)s-B(\d+)" % {b"t": token.encode()}
        )
        segments: list[_Segment] = []
        at = 0
        for match in marker.finditer(data):
            segments.append(data[at : match.start()])
            if match.group(1) is not None:
                segments.append(("H", int(match.group(1))))
            elif match.group(2) is not None:
                segments.append(("B", int(match.group(2))))
            else:
                segments.append(("S", 0))
            at = match.end()
        segments.append(data[at:])
        expected = len(slots) * 2 + (subject is not None)
        if len(segments) != 2 * expected + 1:
            return None  # a marker did not come out as written: never guess
        return cls(segments, subject, slots, policy)

    def render(self, values: Values) -> bytes:
        """The copy for one recipient."""
        return self.render_keyed(values)[0]

    def render_keyed(self, values: Values) -> tuple[bytes, bytes]:
        """The copy for one recipient, and its leading bytes up to the first slot that
        differs in every copy (the Subject or a body): copies with the same leading
        bytes (the same charset and encoding in the parts' headers before that) share
        one DKIM signing template."""
        plain = values.of(html_part=False)
        html_values: dict[Field, str] | None = None
        encoded: list[tuple[bytes, bytes]] = []
        for slot in self._slots:
            if slot.html:
                if html_values is None:
                    html_values = values.of(html_part=True)
                encoded.append(slot.encode(fill(slot.pieces, html_values)))
            else:
                encoded.append(slot.encode(fill(slot.pieces, plain)))
        out: list[bytes] = []
        for segment in self._segments:
            if type(segment) is bytes:
                out.append(segment)
                continue
            kind, index = cast(tuple[str, int], segment)
            if kind == "H":
                out.append(encoded[index][0])
            elif kind == "B":
                out.append(encoded[index][1])
            else:
                out.append(self._subject_line(plain))
        return b"".join(out), b"".join(out[: self._shared])

    def _subject_line(self, values: dict[Field, str]) -> bytes:
        assert self._subject is not None
        text = fill(self._subject, values)
        if text.isascii() and "=?" not in text and len(text) + 9 <= _FOLD_AT:
            return f"Subject: {text}\r\n".encode("ascii")
        folded: str = self._policy.header_factory("Subject", text).fold(policy=self._policy)
        return folded.encode("utf-8" if self._policy.utf8 else "ascii")

    def shared_prefix(self) -> bytes:
        """The leading bytes (as `render_keyed` gives them) of a copy whose values fit
        each part's charset and encoding as written."""
        out: list[bytes] = []
        for segment in self._segments[: self._shared]:
            if type(segment) is bytes:
                out.append(segment)
            else:
                out.append(self._slots[cast(tuple[str, int], segment)[1]].default_header_lines())
        return b"".join(out)
