"""Storage verbs for mailing lists.

Every value that ends up in a header of every post (the name, the subject
prefix, the description) is checked here, where it enters: a CR/LF stored in
one would inject headers into every later post, or make each fail after 250.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import addresses
from listserv.distribute import posts as queued
from listserv.errors import AlreadyExists, InvalidAddress, InvalidInput, NotFound
from listserv.models import (
    Audience,
    AuditEntry,
    Delivery,
    DeliveryMode,
    MailingList,
    Member,
    Post,
    PostingPolicy,
    PostState,
    RecipientState,
    Role,
)

log = logging.getLogger("listserv.lists")

#: Settings `lists set` may change, with their parser.
SETTINGS: dict[str, type[Any]] = {
    "posting_policy": PostingPolicy,
    "delivery_mode": DeliveryMode,
    "subject_prefix": str,
    "description": str,
    "footer": str,
}
LIMITS = {"subject_prefix": 100, "description": 255}
ALIASES = {"policy": "posting_policy", "mode": "delivery_mode"}
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


def find(session: Session, address: str) -> MailingList | None:
    """The list an address names, in any case and in U-label or A-label form."""
    try:
        name, domain = addresses.list_key(address)
    except InvalidAddress:
        return None
    return session.scalar(
        sa.select(MailingList).where(MailingList.local_part == name, MailingList.domain == domain)
    )


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
    key = ALIASES.get(key, key)
    kind = SETTINGS.get(key)
    if kind is None:
        raise InvalidInput(f"unknown setting {key!r}; settable: {', '.join(sorted(SETTINGS))}")
    parsed: Any = value
    if kind is not str:
        try:
            parsed = kind(value)
        except ValueError:
            choices = ", ".join(m.value for m in kind)
            raise InvalidInput(f"{key}: {value[:40]!r} is not one of {choices}") from None
    else:
        parsed = check_text(key, value)
    setattr(mlist, key, parsed)
    audit(session, actor, "list.set", mlist.address, f"{key}={parsed}")


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
    would_get: dict[Any, int] = {}
    pending: list[PendingPost] = []
    for post_id, state, audience, notice_to in posts:
        if state is PostState.SENDING:
            count = open_counts.get(post_id, 0)
        elif audience is Audience.NOTICE:
            count = len(notice_to or [])
        else:
            if audience not in would_get:
                would_get[audience] = len(queued.recipients(session, mlist.id, audience))
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
    return {
        "address": mlist.address,
        "list_id": mlist.list_id,
        "posting_policy": mlist.posting_policy.value,
        "delivery_mode": mlist.delivery_mode.value,
        "subject_prefix": mlist.subject_prefix,
        "description": mlist.description,
        "footer": mlist.footer,
        "created_at": mlist.created_at.isoformat(timespec="seconds"),
    }


def audit(session: Session, actor: str, action: str, list_address: str, detail: str) -> None:
    session.add(AuditEntry(actor=actor, action=action, list_address=list_address, detail=detail))
