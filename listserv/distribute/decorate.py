"""Decorate a post for distribution: RFC 2369/2919 list headers, subject prefix, footer.

Every header we add is stored with `set_raw()` in its final wire form, because the
modern policy refolds header objects and turns long URIs into RFC 2047 encoded-words
(measured: a 90-character https URI in List-Unsubscribe came out as `=?utf-8?q?=3Chttps…`).
Footers are added only where a part can be decoded exactly; anything else (signed,
encrypted, unknown charset, broken base64, non-text) is wrapped, never rewritten.
"""

from __future__ import annotations

import copy
import html as html_lib
import re
from dataclasses import dataclass
from email.charset import Charset
from email.errors import (
    InvalidBase64CharactersDefect,
    InvalidBase64LengthDefect,
    InvalidBase64PaddingDefect,
)
from email.header import Header
from email.message import EmailMessage, MIMEPart
from email.utils import formatdate, make_msgid
from typing import Literal, cast

from listserv.errors import InvalidInput
from listserv.mail import POLICY, addresses, header

#: Replaced on every post so that our values are the only ones (RFC 2369 §2, RFC 2919 §3).
_REPLACED_HEADERS = (
    "List-Id",
    "List-Post",
    "List-Help",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
    "List-Owner",
    "List-Archive",
    "Precedence",
    "X-Loop",
)
#: RFC 5322 §2.1.1: lines SHOULD be no longer than 78 characters.
_MAX_LINE = 78
_DECODABLE_CTES = frozenset({"7bit", "8bit", "binary", "quoted-printable", "base64"})
_BASE64_DEFECTS = (
    InvalidBase64CharactersDefect,
    InvalidBase64LengthDefect,
    InvalidBase64PaddingDefect,
)
_BODY_CLOSE = re.compile(r"</body\s*>", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_Kind = Literal["plain", "html"]


@dataclass(frozen=True, slots=True)
class ListHeaders:
    """The RFC 2369/2919/8058 header values of one list, taken from its configuration."""

    list_id: str
    description: str
    post: str
    help: str
    unsubscribe_mailto: str
    unsubscribe_url: str | None
    owner: str
    #: False for a mandatory list: no List-Unsubscribe at all (nobody may leave,
    #: so a header offering it would only lead to a refusal)
    opt_out: bool = True

    def __post_init__(self) -> None:
        # A CR/LF here would let a configuration value inject headers into every post.
        for name in ("list_id", "description", "post", "help", "unsubscribe_mailto", "owner"):
            if _CONTROL.search(getattr(self, name)):
                raise InvalidInput(f"list header {name} contains a control character")
        if self.unsubscribe_url is not None and _CONTROL.search(self.unsubscribe_url):
            raise InvalidInput("list header unsubscribe_url contains a control character")


class _Undecodable(Exception):
    """A part cannot be decoded exactly, so it must not be rewritten."""


def add_list_headers(msg: EmailMessage, headers: ListHeaders) -> None:
    """Replace any list headers with ours, add our X-BeenThere (keeping other lists'),
    and add Message-ID and Date only when missing."""
    for name in _REPLACED_HEADERS:
        del msg[name]
    msg.set_raw("List-Id", _list_id_value(headers))
    msg.set_raw("List-Post", f"<mailto:{headers.post}>")
    msg.set_raw("List-Help", f"<mailto:{headers.help}?subject=help>")
    mailto = f"<mailto:{headers.unsubscribe_mailto}?subject=unsubscribe>"
    if headers.opt_out and headers.unsubscribe_url is None:
        msg.set_raw("List-Unsubscribe", mailto)
    elif headers.opt_out:
        # RFC 8058 §3.1: the https URI and List-Unsubscribe-Post enable one-click.
        # The https URI first, each on its own line (a per-recipient token makes the
        # length differ per copy; prepare.Personalizer finds the field by this form).
        msg.set_raw("List-Unsubscribe", f"<{headers.unsubscribe_url}>,\r\n {mailto}")
        msg.set_raw("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")
    msg.set_raw("List-Owner", f"<mailto:{headers.owner}>")
    msg.set_raw("Precedence", "list")
    # The loop marker (pipeline.rules.check_loop). Never replaced: the markers of the
    # other lists a post went through stay, so a loop between two lists is caught.
    if headers.post.lower() not in {a.lower() for a in addresses(msg, "X-BeenThere")}:
        msg.set_raw("X-BeenThere", headers.post)
    if not (header(msg, "Message-ID") or "").strip():
        del msg["Message-ID"]
        domain = headers.post.rpartition("@")[2] or headers.list_id
        msg.set_raw("Message-ID", make_msgid(domain=domain))
    if not (header(msg, "Date") or "").strip():
        del msg["Date"]
        msg.set_raw("Date", formatdate(localtime=False, usegmt=True))


def _list_id_value(headers: ListHeaders) -> str:
    """RFC 2919 §3: `phrase <id>`, the phrase quoted if ASCII, RFC 2047-encoded if not."""
    description = headers.description.strip()
    if not description:
        return f"<{headers.list_id}>"
    if description.isascii() and "=?" not in description:
        quoted = description.replace("\\", "\\\\").replace('"', '\\"')
        phrase = f'"{quoted}"'
    else:
        # Encoded-words may not appear inside a quoted string (RFC 2047 §5), so no quotes;
        # ASCII that looks like one is encoded too, or readers would decode it.
        encoded = Header(description, Charset("utf-8"), header_name="List-Id")
        phrase = encoded.encode(linesep="\r\n")
    last = phrase.rpartition("\n")[2] if "\n" in phrase else f"List-Id: {phrase}"
    fold = "\r\n " if len(last) + len(headers.list_id) + 3 > _MAX_LINE else " "
    return f"{phrase}{fold}<{headers.list_id}>"


def add_subject_prefix(msg: EmailMessage, prefix: str) -> None:
    """Prefix the subject once; a reply that already carries the prefix keeps its subject."""
    if not prefix:
        return
    subject = header(msg, "Subject")
    if subject is None:
        subject = ""
    # header() falls back to the raw value, which may hold undecoded 8-bit bytes.
    subject = subject.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if prefix.casefold() in subject.casefold():
        return
    new = f"{prefix} {subject.strip()}".rstrip()
    # Fold through a header object once, then store the encoded wire form verbatim so a
    # non-ASCII subject never forces the whole message to SMTPUTF8 (see mail.to_bytes).
    folded = POLICY.header_factory("Subject", new).fold(policy=POLICY)
    del msg["Subject"]
    msg.set_raw("Subject", folded.split(":", 1)[1].strip())


def strip_signatures(msg: EmailMessage) -> None:
    """Drop DKIM-Signature headers our changes break; ARC headers record the chain, so stay."""
    del msg["DKIM-Signature"]


def add_footer(msg: EmailMessage, text: str, html: str | None = None) -> EmailMessage:
    """Add the footer to the body text, or wrap the untouched message with a footer part.

    Returns `msg` itself when its body was decorated in place, else a new multipart/mixed.
    """
    html_footer = html if html is not None else f"<pre>{html_lib.escape(text)}</pre>"
    try:
        plan = _plan(msg)
        if plan is None:
            return _wrap(msg, text)
        # Build every replacement before touching the message, so a failure leaves it whole.
        changes = [
            (part, _rebuilt(part, kind, _decode_text(part), text, html_footer))
            for part, kind in plan
        ]
        footer_part = None if changes else _footer_part(text)
    except Exception:
        return _wrap(msg, text)
    for part, rebuilt in changes:
        _swap_content(part, rebuilt)
    if "MIME-Version" not in msg:
        msg.set_raw("MIME-Version", "1.0")
    if footer_part is not None:
        msg.attach(footer_part)
    return msg


def _plan(msg: EmailMessage) -> list[tuple[MIMEPart, _Kind]] | None:
    """The parts to decorate; [] means append a footer part; None means wrap."""
    ctype = msg.get_content_type()
    if ctype == "multipart/mixed" and msg.is_multipart():
        parts = list(msg.iter_parts())
        targets = _body_targets(parts[0]) if parts else None
        return targets or []
    return _body_targets(msg)


def _body_targets(part: MIMEPart) -> list[tuple[MIMEPart, _Kind]] | None:
    """The text parts a reader sees as the body of `part`, or None when there are none."""
    ctype = part.get_content_type()
    if ctype in ("text/plain", "text/html"):
        if part.is_multipart() or part.get_content_disposition() == "attachment":
            return None
        return [(part, "plain" if ctype == "text/plain" else "html")]
    if not part.is_multipart():
        return None
    children = list(part.iter_parts())
    if not children:
        return None
    if ctype == "multipart/alternative":
        # Every alternative gets the footer, or readers would see it only in some clients.
        found: list[tuple[MIMEPart, _Kind]] = []
        for child in children:
            found.extend(_body_targets(child) or [])
        return found or None
    if ctype == "multipart/related":
        return _body_targets(_related_root(part, children))
    if ctype == "multipart/mixed":
        return _body_targets(children[0])
    # signed, encrypted, report, digest, …: rewriting them would break or mislead.
    return None


def _related_root(part: MIMEPart, children: list[MIMEPart]) -> MIMEPart:
    """RFC 2387 §3.2: the `start` parameter names the root, else it is the first part."""
    start = part.get_param("start")
    if isinstance(start, str):
        for child in children:
            if (_part_header(child, "Content-ID") or "").strip() == start.strip():
                return child
    return children[0]


def _part_header(part: MIMEPart, name: str) -> str | None:
    # Parsed subparts are EmailMessage (policy.message_factory); header() needs only Message.
    return header(cast(EmailMessage, part), name)


def _decode_text(part: MIMEPart) -> str:
    """The exact text of a part; raises rather than guessing (unlike get_content's 'replace')."""
    cte = (_part_header(part, "Content-Transfer-Encoding") or "7bit").strip().lower()
    if cte not in _DECODABLE_CTES:
        raise _Undecodable(cte)
    defects_before = len(part.defects)
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        raise _Undecodable("no payload")
    if any(isinstance(d, _BASE64_DEFECTS) for d in part.defects[defects_before:]):
        raise _Undecodable("broken base64")
    charset = part.get_content_charset("us-ascii")
    # Strict: an unknown charset raises LookupError, bad bytes UnicodeDecodeError.
    return data.decode(charset).replace("\r\n", "\n")


def _rebuilt(part: MIMEPart, kind: _Kind, body: str, text: str, html_footer: str) -> EmailMessage:
    """A scratch part holding the decorated content with fresh Content-Type and CTE."""
    if kind == "plain":
        new = body if not body or body.endswith("\n") else body + "\n"
        new += "-- \n" + text + ("" if text.endswith("\n") else "\n")
    else:
        matches = list(_BODY_CLOSE.finditer(body))
        if matches:
            at = matches[-1].start()
            new = body[:at] + html_footer + "\n" + body[at:]
        else:
            new = body + ("" if body.endswith("\n") else "\n") + html_footer + "\n"
    params: dict[str, str] = {}
    for name in ("format", "delsp"):  # RFC 3676 format=flowed survives decoration
        value = part.get_param(name)
        if isinstance(value, str):
            params[name] = value
    return _text_part(new, "plain" if kind == "plain" else "html", params)


#: a line longer than POLICY.max_line_length (78): set_content would not send it as 7bit
_LONG_FIRST_LINE = re.compile(r"[^\r\n]{79}")
#: the same after a line break (50 ms on 9.9 MB; one pattern for both took 0.9 s)
_LONG_LINE = re.compile(r"[\r\n][^\r\n]{79}")


def _text_part(content: str, subtype: str, params: dict[str, str] | None = None) -> EmailMessage:
    """ASCII stays us-ascii; anything else is UTF-8 quoted-printable, safe through 7-bit relays."""
    scratch = EmailMessage(policy=POLICY)
    if not content.isascii():
        scratch.set_content(
            content,
            subtype=subtype,
            charset="utf-8",
            cte="quoted-printable",
            params=params or {},
        )
    elif _LONG_FIRST_LINE.match(content) or _LONG_LINE.search(content):
        scratch.set_content(content, subtype=subtype, charset="us-ascii", params=params or {})
    else:
        # what set_content makes of it (7bit, every line ending in "\n"), without cutting
        # a 10 MB body into lines on the way (issue 15: they fragment Python's memory)
        scratch.set_content(
            "", subtype=subtype, charset="us-ascii", cte="7bit", params=params or {}
        )
        text = content.replace("\r\n", "\n").replace("\r", "\n")
        scratch.set_payload(text if text.endswith("\n") else text + "\n")
    del scratch["MIME-Version"]  # set_content adds it; a body part must not carry it
    return scratch


def _swap_content(part: MIMEPart, rebuilt: EmailMessage) -> None:
    """Replace only Content-Type, CTE and payload; Content-Disposition, -ID etc. stay."""
    del part["Content-Type"]
    del part["Content-Transfer-Encoding"]
    # Content-Type first, as readers of the raw message expect.
    for name, value in sorted(
        rebuilt.raw_items(), key=lambda item: item[0].lower() != "content-type"
    ):
        part.set_raw(name, value)
    part.set_payload(rebuilt.get_payload())


def _footer_part(text: str) -> EmailMessage:
    """The footer as its own inline part, for when no body part can carry it."""
    footer = _text_part(text if text.endswith("\n") else text + "\n", "plain")
    footer.set_raw("Content-Disposition", "inline")
    return footer


def _wrap(msg: EmailMessage, text: str) -> EmailMessage:
    """A new multipart/mixed: the original content byte-for-byte, then a footer part.

    The message headers move to the wrapper; the inner part is a deep copy with only
    Content-* headers, so the caller's message is not modified at all.
    """
    outer = EmailMessage(policy=msg.policy)
    inner = copy.deepcopy(msg)
    for name, value in msg.raw_items():
        if not name.lower().startswith("content-"):
            outer.set_raw(name, value)
    for name in {n.lower() for n in inner.keys() if not n.lower().startswith("content-")}:
        del inner[name]
    if "MIME-Version" not in outer:
        outer.set_raw("MIME-Version", "1.0")
    outer.set_raw("Content-Type", "multipart/mixed")
    outer.set_payload([inner, _footer_part(text)])
    return outer
