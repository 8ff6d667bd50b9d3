"""Storage verbs for mailing lists.

Every value that ends up in a header of every post (the name, the subject
prefix, the description) is checked here, where it enters: a CR/LF stored in
one would inject headers into every later post, or make each fail after 250.
"""

from __future__ import annotations

import enum
import logging
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import addresses, config
from listserv.distribute import posts as queued
from listserv.errors import AlreadyExists, InvalidAddress, InvalidInput, NotFound
from listserv.models import (
    Audience,
    AuditEntry,
    ContentFilter,
    Delivery,
    DeliveryMode,
    DmarcMitigateWhen,
    DmarcMitigation,
    LinkPolicy,
    MailingList,
    Member,
    NonmemberAction,
    OriginalFromIn,
    Post,
    PostingPolicy,
    PostState,
    RecipientState,
    Role,
    SubscriptionPolicy,
)

log = logging.getLogger("listserv.lists")


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting `lists set` may change: how a value is read and shown."""

    #: the stored value for the text given, or ValueError saying what is wrong
    parse: Callable[[str], Any]
    #: what is allowed, for the one-line error
    allowed: str
    show: Callable[[Any], str] = str


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
#: RFC 2045 5.1 token characters, lower-cased
_MIME_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/(?:[a-z0-9!#$&^_.+-]+|\*)")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _enum(kind: type[enum.StrEnum]) -> Setting:
    def parse(text: str) -> Any:
        try:
            return kind(text.strip().lower())
        except ValueError:
            raise ValueError from None

    return Setting(parse, f"one of {', '.join(m.value for m in kind)}", lambda v: v.value)


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError


def _whole(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError from None
        if not low <= value <= high:
            raise ValueError
        return value

    return parse


def _number(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError from None
        if not low <= value <= high:  # also refuses nan
            raise ValueError
        return value

    return parse


def _decimal(value: float) -> str:
    return f"{value:g}"


def _nonmember(text: str) -> NonmemberAction | None:
    lowered = text.strip().lower()
    if lowered in ("", "default"):
        return None
    try:
        return NonmemberAction(lowered)
    except ValueError:
        raise ValueError from None


def _mime_types(text: str) -> str:
    kinds = [t.strip().lower() for t in text.split(",") if t.strip()]
    for kind in kinds:
        if not _MIME_TYPE.fullmatch(kind):
            raise ValueError(f"{kind[:40]!r} is not a MIME type")
    return ",".join(dict.fromkeys(kinds))


def _windows(text: str) -> str:
    windows: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            windows.append(config.format_window(config.parse_window(part)))
        except ValueError:
            raise ValueError(f"{part[:40]!r} is not a window") from None
    return ",".join(dict.fromkeys(windows))


def _hosts(text: str) -> str:
    hosts: list[str] = []
    for raw in (h.strip().lower().rstrip(".") for h in text.split(",")):
        if not raw:
            continue
        try:
            host = raw.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{raw[:40]!r} is not a host name") from None
        if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
            raise ValueError(f"{raw[:40]!r} is not a host name")
        hosts.append(host)
    return ",".join(dict.fromkeys(hosts))


def _text(key: str) -> Setting:
    return Setting(lambda value: check_text(key, value), "text")


def _yes_no(value: bool) -> str:
    return "true" if value else "false"


#: Settings `lists set` may change, in the order `lists show` prints them.
SETTINGS: dict[str, Setting] = {
    "posting_policy": _enum(PostingPolicy),
    "delivery_mode": _enum(DeliveryMode),
    "subject_prefix": _text("subject_prefix"),
    "description": _text("description"),
    "footer": _text("footer"),
    "nonmember_action": Setting(
        _nonmember,
        "one of hold, reject, discard, default (hold on members lists, reject on announce lists)",
        lambda v: "default" if v is None else v.value,
    ),
    "require_authenticated_sender": Setting(
        _boolean, "true or false (yes/no, on/off, 1/0)", _yes_no
    ),
    "max_message_kb": Setting(
        _whole(0, 10 * 1024 * 1024), "a whole number of KB, 0 for the server's limit"
    ),
    "plain_text_only": Setting(_boolean, "true or false (yes/no, on/off, 1/0)", _yes_no),
    "content_filter": _enum(ContentFilter),
    "allow_attachments": Setting(_boolean, "true or false (yes/no, on/off, 1/0)", _yes_no),
    "allowed_mime_types": Setting(
        _mime_types, "comma-separated MIME types such as text/plain,image/*; empty: any"
    ),
    "approval_threshold": Setting(
        _whole(0, 2**31 - 1), "a whole number of recipients, 0 for no threshold"
    ),
    "blackout": Setting(_windows, f"comma-separated windows {config.WINDOW_FORMAT}; empty: none"),
    "external_links": _enum(LinkPolicy),
    "link_allowlist": Setting(
        _hosts, "comma-separated host names (each allows its subdomains); empty: none"
    ),
    "hold_expiry_days": Setting(_whole(1, 3650), "a whole number of days, 1 to 3650"),
    # $name, $address, $unsubscribe_url in a post's Subject and text filled per
    # recipient (distribute.merge); a post that uses one is sent personalized
    "merge_fields": Setting(_boolean, "true or false (yes/no, on/off, 1/0)", _yes_no),
    # RFC 8058 one-click List-Unsubscribe on every copy, so one signed copy per
    # recipient (unsubscribe_links.py); needs [http] public_base_url
    "one_click_unsubscribe": Setting(_boolean, "true or false (yes/no, on/off, 1/0)", _yes_no),
    # nobody may leave: no List-Unsubscribe, and the footer says why
    "mandatory": Setting(_boolean, "true or false (yes/no, on/off, 1/0)", _yes_no),
    # delivery reports (reports.py): to the poster, a copy to the owners, and the
    # hours after it in which bounces are counted for a follow-up (0: no follow-up)
    "delivery_reports": Setting(_boolean, "true or false (yes/no, on/off, 1/0)", _yes_no),
    "report_to_owners": Setting(_boolean, "true or false (yes/no, on/off, 1/0)", _yes_no),
    "report_window_hours": Setting(_whole(0, 24 * 90), "a whole number of hours, 0 to 2160"),
    # bounce scoring and its actions (bounces/score.py)
    "bounce_score_threshold": Setting(_number(0.5, 1000), "a number from 0.5 to 1000", _decimal),
    "bounce_info_stale_after": Setting(_whole(1, 365), "a whole number of days, 1 to 365"),
    "bounce_you_are_disabled_warnings": Setting(_whole(0, 100), "a whole number, 0 to 100"),
    "bounce_you_are_disabled_warnings_interval": Setting(
        _whole(1, 365), "a whole number of days, 1 to 365"
    ),
    "bounce_temporary_weight": Setting(
        _number(0, 100), "a number from 0 to 100 (0: not counted)", _decimal
    ),
    # who may join by mail: open (confirmation), approve (and an owner), closed (nobody)
    "subscription_policy": _enum(SubscriptionPolicy),
    # posts from domains publishing DMARC p=reject/quarantine (distribute.dmarc)
    "dmarc_mitigation": _enum(DmarcMitigation),
    "dmarc_mitigate_only_when": _enum(DmarcMitigateWhen),
    "dmarc_original_from_in": _enum(OriginalFromIn),
}
LIMITS = {"subject_prefix": 100, "description": 255}
ALIASES = {
    "policy": "posting_policy",
    "mode": "delivery_mode",
    "report_window": "report_window_hours",
}
#: Body text: the footer may span lines.
MULTILINE = frozenset({"footer"})
#: Posts not yet delivered to every recipient: deleting the list cancels them.
IN_FLIGHT = (PostState.ACCEPTED, PostState.SENDING, PostState.HELD)
_OPEN = (RecipientState.PENDING, RecipientState.DEFERRED)


class PostsInFlight(InvalidInput):
    """The list has posts that are not delivered yet."""


@dataclass(frozen=True, slots=True)
class PendingPost:
    """A post a list deletion would cancel, and how many recipients still wait for it."""

    id: int
    state: PostState
    open_recipients: int


#: built once: building the statement and its cache key was half of a lookup that
#: every post and command makes (0.47 ms against 0.25 ms on SQLite, issue 15)
_BY_KEY = sa.select(MailingList).where(
    MailingList.local_part == sa.bindparam("name"), MailingList.domain == sa.bindparam("domain")
)


def find(session: Session, address: str) -> MailingList | None:
    """The list an address names, in any case and in U-label or A-label form."""
    try:
        name, domain = addresses.list_key(address)
    except InvalidAddress:
        return None
    return session.scalar(_BY_KEY, {"name": name, "domain": domain})


def check_text(key: str, value: str) -> str:
    """The value to store, or InvalidInput naming the first control character.

    Header values refuse every control character (Unicode category Cc, and the
    line and paragraph separators that `str.splitlines` breaks on); the footer is
    body text, so it keeps newlines and tabs, and CRLF is stored as LF.
    """
    if key in MULTILINE:
        value = value.replace("\r\n", "\n")
    for index, char in enumerate(value):
        if key in MULTILINE and char in "\n\t":
            continue
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            allowed = " (newlines and tabs are allowed)" if key in MULTILINE else ""
            raise InvalidInput(
                f"{key}: control character U+{ord(char):04X} at position {index + 1}"
                f" is not allowed{allowed}"
            )
    if key == "subject_prefix" and "=?" in value:
        # The Subject is folded from text that may hold the sender's encoded-words, so
        # a literal "=?...?=" in the prefix would be decoded there (RFC 2047 §2).
        raise InvalidInput("subject_prefix: '=?' is not allowed (it starts an encoded-word)")
    limit = LIMITS.get(key)
    if limit is not None and len(value) > limit:
        raise InvalidInput(f"{key}: at most {limit} characters, got {len(value)}")
    return value


def get(session: Session, address: str) -> MailingList:
    mlist = find(session, address.strip())
    if mlist is None:
        raise NotFound(f"no such list: {address}")
    return mlist


def create(
    session: Session,
    address: str,
    *,
    owners: Sequence[str] = (),
    policy: PostingPolicy = PostingPolicy.MEMBERS,
    subject_prefix: str | None = None,
    description: str = "",
    delivery_mode: DeliveryMode = DeliveryMode.SHARED,
    actor: str = "cli",
) -> MailingList:
    name, domain = addresses.list_name(address)
    description = check_text("description", description)
    prefix = check_text("subject_prefix", f"[{name}]" if subject_prefix is None else subject_prefix)
    if find(session, f"{name}@{domain}") is not None:
        raise AlreadyExists(f"list already exists: {name}@{domain}")
    owner_addrs = [addresses.normalize(o) for o in owners]
    for owner in owner_addrs:
        if addresses.is_own(owner, name, domain):
            raise InvalidAddress(f"{owner} is one of the list's own addresses: it cannot own it")
    mlist = MailingList(
        local_part=name,
        domain=domain,
        posting_policy=policy,
        delivery_mode=delivery_mode,
        subject_prefix=prefix,
        description=description,
        footer="",
    )
    session.add(mlist)
    session.flush()
    for owner in dict.fromkeys(owner_addrs):
        session.add(Member(list_id=mlist.id, address=owner, role=Role.OWNER))
    audit(session, actor, "list.create", mlist.address, f"policy={policy.value}")
    return mlist


def all_lists(session: Session) -> list[tuple[MailingList, int]]:
    """Every list with its member count."""
    count = (
        sa.select(sa.func.count(Member.id))
        .where(Member.list_id == MailingList.id, Member.role == Role.MEMBER)
        .scalar_subquery()
    )
    rows = session.execute(
        sa.select(MailingList, count).order_by(MailingList.domain, MailingList.local_part)
    )
    return [(m, n) for m, n in rows]


def set_setting(
    session: Session, mlist: MailingList, key: str, value: str, *, actor: str = "cli"
) -> None:
    """Change one setting; a bad key or value is one InvalidInput line saying what is allowed."""
    key = ALIASES.get(key.strip().lower(), key.strip().lower())
    setting = SETTINGS.get(key)
    if setting is None:
        raise InvalidInput(f"unknown setting {key[:40]!r}; settable: {', '.join(sorted(SETTINGS))}")
    try:
        parsed = setting.parse(value)
    except ValueError as exc:  # bare, or naming the part of the value that is wrong
        if not str(exc):
            raise InvalidInput(f"{key}: {value[:40]!r} is not {setting.allowed}") from None
        raise InvalidInput(f"{key}: {exc}; allowed: {setting.allowed}") from None
    setattr(mlist, key, parsed)
    audit(session, actor, "list.set", mlist.address, f"{key}={setting.show(parsed)}")


def in_flight(session: Session, mlist: MailingList) -> list[PendingPost]:
    """The list's posts still waiting, sending or held, oldest first.

    A queued post counts its recipients not yet delivered (pending or deferred);
    one not queued yet (accepted, held) counts who it would go to now.
    """
    posts = session.execute(
        sa.select(Post.id, Post.state, Post.audience, Post.notice_to)
        .where(Post.list_id == mlist.id, Post.state.in_(IN_FLIGHT))
        .order_by(Post.id)
    ).all()
    if not posts:
        return []
    open_counts: dict[int, int] = {
        post_id: n
        for post_id, n in session.execute(
            sa.select(Delivery.post_id, sa.func.count(Delivery.id))
            .where(Delivery.post_id.in_([p.id for p in posts]), Delivery.state.in_(_OPEN))
            .group_by(Delivery.post_id)
        )
    }
    from listserv import members  # members imports this module (audit)

    would_get: dict[Any, int] = {}
    pending: list[PendingPost] = []
    for post_id, state, audience, notice_to in posts:
        if state is PostState.SENDING:
            count = open_counts.get(post_id, 0)
        elif audience is Audience.NOTICE:
            count = len(notice_to or [])
        else:
            if audience not in would_get:
                would_get[audience] = (
                    len(queued.recipients(session, mlist.id, audience))
                    if audience is Audience.OWNERS
                    else members.recipient_count(session, [mlist.id])
                )
            count = would_get[audience]
        pending.append(PendingPost(post_id, state, count))
    return pending


def describe(pending: Sequence[PendingPost]) -> str:
    """``3 posts (2 waiting, 1 sending) with 120 recipients not yet delivered``."""
    names = {PostState.ACCEPTED: "waiting", PostState.SENDING: "sending", PostState.HELD: "held"}
    by_state = [
        f"{n} {names[state]}"
        for state in IN_FLIGHT
        if (n := sum(1 for p in pending if p.state is state))
    ]
    total = sum(p.open_recipients for p in pending)
    posts = "post" if len(pending) == 1 else "posts"
    return (
        f"{len(pending)} {posts} ({', '.join(by_state)}) with {total} recipient(s)"
        " not yet delivered"
    )


def refusal(address: str, pending: Sequence[PendingPost]) -> PostsInFlight:
    return PostsInFlight(
        f"not deleting {address}: {describe(pending)}; wait for them, or pass"
        " --force to cancel them"
    )


def delete(
    session: Session, mlist: MailingList, *, force: bool = False, actor: str = "cli"
) -> list[PendingPost]:
    """Delete the list with its members and posts; returns the posts it cancelled.

    Posts in flight are refused unless `force`: they would vanish without a trace.
    """
    if session.get_bind().dialect.name == "postgresql":
        # Intake's INSERT of a post takes a key-share lock on the list row: it waits
        # for us (then fails its foreign key), so no post slips past the check.
        session.execute(
            sa.select(MailingList.id).where(MailingList.id == mlist.id).with_for_update()
        )
    pending = in_flight(session, mlist)
    if pending and not force:
        raise refusal(mlist.address, pending)
    address = mlist.address
    session.delete(mlist)
    detail = ""
    if pending:
        cancelled = ", ".join(
            f"post {p.id} ({p.state.value}, {p.open_recipients} open)" for p in pending
        )
        detail = f"cancelled {describe(pending)}: {cancelled}"
        log.warning(
            "deleted list %s: %s",
            address,
            detail,
            extra={"event": "list_deleted", "post_ids": [p.id for p in pending]},
        )
    audit(session, actor, "list.delete", address, detail)
    return pending


def settings_of(mlist: MailingList) -> dict[str, str]:
    """Every setting as `lists show` prints it and `lists set` takes it."""
    shown = {"address": mlist.address, "list_id": mlist.list_id}
    shown |= {key: setting.show(getattr(mlist, key)) for key, setting in SETTINGS.items()}
    shown["created_at"] = mlist.created_at.isoformat(timespec="seconds")
    return shown


def audit(session: Session, actor: str, action: str, list_address: str, detail: str) -> None:
    session.add(AuditEntry(actor=actor, action=action, list_address=list_address, detail=detail))
