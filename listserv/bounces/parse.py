"""What a message sent to a bounce address says: which recipients bounced, and how.

In order: our own RFC 3464 reader (dsn.py); when the message is no DSN, the
heuristics of flufl.bounce (GNU Mailman's detectors for Exim, qmail, old Postfix,
Exchange, GroupWise/Lotus, Yahoo, AOL, Microsoft and many more), rather than a
regular expression per format here. A message neither recognizes is no bounce;
`auto_reply` and `from_robot` then tell a vacation notice (dropped) or an
unrecognized robot from a person writing to the bounce address (forwarded to the
owners).
"""

from __future__ import annotations

import email
import email.header
import logging
import re
from dataclasses import dataclass
from email import policy
from email.message import Message
from email.parser import HeaderParser
from email.utils import getaddresses

import flufl.bounce

from listserv import addresses
from listserv.bounces import dsn
from listserv.bounces.dsn import Finding
from listserv.errors import InvalidAddress
from listserv.models import BounceKind

log = logging.getLogger("listserv.bounces")
# flufl.bounce logs a line per detector run (INFO) and a traceback when one trips
# (`_heuristic` says so in one line of its own): neither belongs in our logs or CLI.
logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)

#: Subjects of out-of-office and other automatic replies (RFC 3834 asks for
#: Auto-Submitted, which many responders still leave out)
_AUTO_SUBJECT = re.compile(
    r"^\s*(auto:|auto[- ]?reply|automatic reply|autoreply|out of (the )?office|vacation"
    r"|away from|i am away|abwesen|absence|r[ée]ponse automatique|automatische antwort)",
    re.IGNORECASE,
)
_AUTO_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Vacation")
_ROBOTS = frozenset({"mailer-daemon", "mailerdaemon", "mail-daemon", "postmaster"})
_MESSAGE_ID = re.compile(r"^Message-ID:\s*(<[^>\s]+>)", re.IGNORECASE | re.MULTILINE)
#: the quoted original in a plain-text bounce is looked for in this much text
_SCAN_CHARS = 200_000


@dataclass(frozen=True, slots=True)
class Report:
    findings: tuple[Finding, ...] = ()
    #: "dsn" (RFC 3464), "heuristic" (flufl.bounce), "" (no bounce found)
    source: str = ""
    #: a DSN, even one that reports no bounce (delivered, relayed)
    is_dsn: bool = False
    #: a vacation notice or another automatic reply: not a bounce, not for the owners
    auto_reply: bool = False
    #: sent by a mail system (empty envelope sender, MAILER-DAEMON, postmaster)
    from_robot: bool = False
    #: the Message-ID of the message that bounced, when the bounce quotes it
    original_message_id: str = ""
    subject: str = ""

    @property
    def permanent(self) -> list[str]:
        return sorted({f.address for f in self.findings if f.kind is BounceKind.PERMANENT})

    @property
    def temporary(self) -> list[str]:
        permanent = set(self.permanent)
        return sorted(
            {f.address for f in self.findings if f.kind is BounceKind.TEMPORARY} - permanent
        )

    def as_json(self) -> dict[str, list[str]]:
        """What `listserv bounces parse` prints."""
        return {"permanent": self.permanent, "temporary": self.temporary}


def parse(raw: bytes, mail_from: str | None = None) -> Report:
    """Read a message to a bounce address (`mail_from`: its envelope sender, if known)."""
    msg = email.message_from_bytes(raw, policy=policy.compat32)  # flufl.bounce's policy
    subject = _header(msg, "Subject")
    found = dsn.read(msg)
    is_dsn = found is not None
    findings = tuple(found) if found is not None else _heuristic(msg, subject)
    return Report(
        findings=findings,
        source=("dsn" if is_dsn else "heuristic") if findings else "",
        is_dsn=is_dsn,
        auto_reply=_auto_reply(msg, subject),
        from_robot=_from_robot(msg, mail_from),
        original_message_id=_original_message_id(msg),
        subject=subject,
    )


def _heuristic(msg: Message, subject: str) -> tuple[Finding, ...]:
    try:
        temporary, permanent = flufl.bounce.all_failures(msg)
    except Exception as exc:  # a detector tripping over odd input: no finding, never a crash
        log.warning("flufl.bounce could not read a message: %s: %s", type(exc).__name__, exc)
        log.debug("flufl.bounce traceback", exc_info=True)
        return ()
    detail = f"heuristic: {subject}"[:1000] if subject else "heuristic"
    found: dict[str, Finding] = {}
    for kind, raw_addresses in (
        (BounceKind.PERMANENT, permanent),
        (BounceKind.TEMPORARY, temporary),
    ):
        for raw_address in sorted(raw_addresses):
            try:
                address = addresses.normalize(raw_address.decode("ascii", "replace"))
            except InvalidAddress:
                continue
            found.setdefault(address, Finding(address, kind, "", detail))
    return tuple(found.values())


def _header(msg: Message, name: str) -> str:
    """A header as one line of text; never raises (compat32 gives str or Header)."""
    try:
        value = msg.get(name)
        if value is None:
            return ""
        decoded = email.header.make_header(email.header.decode_header(str(value)))
        return " ".join(str(decoded).split())
    except Exception:
        return " ".join(str(msg.get(name, "")).split())


def _auto_reply(msg: Message, subject: str) -> bool:
    auto = _header(msg, "Auto-Submitted").split(";")[0].strip().lower()
    if auto == "auto-replied":
        return True
    if any(msg.get(name) is not None for name in _AUTO_HEADERS):
        return True
    if _header(msg, "Precedence").lower() == "auto_reply":
        return True
    return bool(_AUTO_SUBJECT.match(subject))


def _from_robot(msg: Message, mail_from: str | None) -> bool:
    if mail_from is not None and mail_from.strip() in ("", "<>"):
        return True
    for _, address in getaddresses([_header(msg, "From")]):
        if address.rpartition("@")[0].lower() in _ROBOTS:
            return True
    return False


def _original_message_id(msg: Message) -> str:
    """The Message-ID of the returned message: from an attached message/rfc822 or
    text/rfc822-headers part, else a ``Message-ID:`` line quoted in the text."""
    texts: list[str] = []
    for part in msg.walk():
        kind = part.get_content_type()
        if kind == "message/rfc822" and part.is_multipart():
            inner = part.get_payload(0)
            if isinstance(inner, Message):
                found = _header(inner, "Message-ID")
                if found:
                    return found
        elif kind == "text/rfc822-headers":
            text = _text(part)
            found = _header(HeaderParser(policy=policy.compat32).parsestr(text), "Message-ID")
            if found:
                return found
        elif kind == "text/plain":
            texts.append(_text(part))
    for text in texts:
        match = _MESSAGE_ID.search(text[:_SCAN_CHARS])
        if match:
            return match.group(1)
    return ""


def _text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return str(part.get_payload())
    try:
        return payload.decode(part.get_content_charset() or "utf-8", "replace")
    except LookupError:  # a charset Python does not know
        return payload.decode("utf-8", "replace")
