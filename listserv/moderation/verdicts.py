"""What a moderator decided, read from one line of text.

The words are ``approve``, ``approve at WHEN``, ``reject [reason]`` and
``discard``, case-insensitive. In a reply the line is the first one the
moderator wrote (quoted lines and the "On ... wrote:" line above a quote are
skipped), else the Subject without its ``Re:`` prefixes: mail clients put the
cursor above or below the quote, and some people answer in the Subject only.
"""

from __future__ import annotations

import enum
import html
import re
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from email.message import EmailMessage

from listserv import mail
from listserv.errors import InvalidInput

#: the timezone of times without an offset when no other is given; the daemon and
#: the CLI pass the site's ([policy] timezone)
SITE_TZ: tzinfo = UTC

#: how a scheduled time is written (shown in instructions and errors)
TIME_FORMAT = (
    "YYYY-MM-DD HH:MM (the site's [policy] timezone unless an offset such as +02:00 follows)"
)


class Verb(enum.StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    DISCARD = "discard"


@dataclass(frozen=True, slots=True)
class Verdict:
    verb: Verb
    #: approve at this time (None: now)
    at: datetime | None = None
    #: reject: the reason the sender is told ("" when none was given)
    reason: str = ""


_APPROVE = re.compile(r"^approved?(?:\s+at\s+(?P<when>.+?))?$", re.IGNORECASE)
_REJECT = re.compile(r"^reject(?:ed)?(?:(?:\s*:\s*|\s+)(?P<reason>.*))?$", re.IGNORECASE)
_DISCARD = re.compile(r"^discard(?:ed)?$", re.IGNORECASE)
_REPLY_PREFIX = re.compile(r"^(?:\s*(?:re|aw|sv|antw|fwd?)\s*(?:\[\d+\])?\s*:\s*)+", re.IGNORECASE)
_UTC_SUFFIX = re.compile(r"\s*(?:utc|gmt|z)$", re.IGNORECASE)
_TAG = re.compile(r"<[^>]*>")
_BREAK = re.compile(r"<\s*(?:br|/p|/div|/li|/tr)\b[^>]*>", re.IGNORECASE)
_BLOCKQUOTE = re.compile(r"<blockquote\b.*?</blockquote\s*>", re.IGNORECASE | re.DOTALL)


def parse_when(text: str, tz: tzinfo = SITE_TZ) -> datetime:
    """An absolute time; without an offset it is in the site's timezone."""
    value = _UTC_SUFFIX.sub("", text.strip())
    utc = value != text.strip()
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"not a time: {text.strip()[:60]!r} (use {TIME_FORMAT})") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC if utc else tz)
    return when.astimezone(UTC)


def parse(line: str, tz: tzinfo = SITE_TZ) -> Verdict | None:
    """The verdict a line states, None if it states none; InvalidInput for a bad time."""
    text = line.strip().rstrip(".!")
    if not text:
        return None
    if m := _APPROVE.match(text):
        when = m.group("when")
        return Verdict(Verb.APPROVE, at=parse_when(when, tz) if when else None)
    # the reason keeps its final full stop
    if m := _REJECT.match(line.strip()) or _REJECT.match(text):
        return Verdict(Verb.REJECT, reason=" ".join((m.group("reason") or "").split())[:500])
    if _DISCARD.match(text):
        return Verdict(Verb.DISCARD)
    return None


def read(msg: EmailMessage, tz: tzinfo = SITE_TZ) -> Verdict | None:
    """The verdict of a reply: its first own line, else its Subject (InvalidInput: bad time)."""
    line = first_own_line(body_text(msg))
    if line is not None and (verdict := parse(line, tz)) is not None:
        return verdict
    subject = _REPLY_PREFIX.sub("", mail.header(msg, "Subject") or "")
    return parse(subject, tz)


def first_own_line(text: str) -> str | None:
    """The first line that is not blank, not quoted and not the attribution above a quote."""
    lines = [line.strip() for line in text.splitlines()]
    own = [(i, line) for i, line in enumerate(lines) if line and not line.startswith(">")]
    for i, line in own:
        following = next((n for n in lines[i + 1 :] if n), "")
        if line.endswith(":") and following.startswith(">"):
            continue  # "On Mon, 1 Dec 2026, Ann wrote:"
        return line
    return None


def body_text(msg: EmailMessage) -> str:
    """The reply's text: its text/plain part, else its HTML part with the tags removed."""
    try:
        part = msg.get_body(preferencelist=("plain", "html"))
    except Exception:  # a malformed MIME structure: the Subject may still say it
        return ""
    if part is None:
        return ""
    try:
        content = part.get_content()
        text = content if isinstance(content, str) else ""
    except Exception:  # an unknown charset
        payload = part.get_payload(decode=True)
        text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    if part.get_content_type() == "text/html":
        text = _BLOCKQUOTE.sub("", text)  # the quote of an HTML reply
        text = html.unescape(_TAG.sub("", _BREAK.sub("\n", text)))
    return text
