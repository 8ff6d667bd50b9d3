"""Storage verbs for held posts: list, show, announce, decide, expire, remind.

Every change of a held post's state is one conditional UPDATE (``state =
'held'``), so a reply, the CLI, expiry and another daemon can race and exactly
one of them decides; the others see `NotHeld`. Every mail written here is a
notice (notices.queue): stored in the same transaction as the decision, then
signed and sent by the scheduler, so a decision and its mail commit together.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import addresses, lists, mail, members, notices, tokens
from listserv.addresses import Kind
from listserv.errors import InvalidAddress, InvalidInput, NotFound
from listserv.models import (
    Audience,
    InboundMessage,
    MailingList,
    Member,
    Post,
    PostState,
    Role,
    Token,
    TokenKind,
)
from listserv.moderation.verdicts import TIME_FORMAT, Verb, Verdict

log = logging.getLogger("listserv.moderation")

#: who decides a hold that nobody decided in time (decided_by, audit actor)
EXPIRY_ACTOR = "listserv"
#: at most one reminder per list in this time; only holds older than it are listed
REMINDER_INTERVAL = timedelta(days=1)
#: a list with hold_expiry_days <= 0 keeps holds until decided; its tokens last this long
NO_EXPIRY = timedelta(days=3650)
#: posts announced per transaction (a backlog is worked through over several)
ANNOUNCE_BATCH = 20
#: lines of the text shown by `held show`
PREVIEW_LINES = 20

_STATES = {Verb.APPROVE: PostState.ACCEPTED, Verb.REJECT: PostState.REJECTED}


class NotHeld(InvalidInput):
    """The post is not held (any more)."""


@dataclass(frozen=True, slots=True)
class Held:
    """A held post as the CLI and reminders show it."""

    id: int
    list_address: str
    sender: str
    subject: str
    reason: str
    created_at: datetime
    size: int


@dataclass(frozen=True, slots=True)
class Decided:
    """What `decide` did."""

    post_id: int
    list_address: str
    verb: Verb
    state: PostState
    sender: str
    subject: str
    not_before: datetime | None
    #: the line shown to the CLI user and mailed to the moderator
    summary: str


# -- reading ---------------------------------------------------------------


def held_posts(session: Session, list_address: str | None = None) -> list[Held]:
    """Posts waiting for a moderator, oldest first (all lists, or one)."""
    stmt = (
        sa.select(
            Post.id,
            MailingList.local_part,
            MailingList.domain,
            Post.sender,
            Post.subject,
            Post.reason,
            Post.created_at,
            sa.func.coalesce(sa.func.length(InboundMessage.raw), 0),
        )
        .join(MailingList, MailingList.id == Post.list_id)
        .outerjoin(InboundMessage, InboundMessage.id == Post.inbound_id)
        .where(Post.state == PostState.HELD, Post.audience == Audience.MEMBERS)
        .order_by(Post.id)
    )
    if list_address is not None:
        stmt = stmt.where(Post.list_id == lists.get(session, list_address).id)
    return [
        Held(pid, f"{local}@{domain}", sender, subject, reason, created, int(size))
        for pid, local, domain, sender, subject, reason, created, size in session.execute(stmt)
    ]


def get_post(session: Session, post_id: int) -> Post:
    """A post of a list (not a notice or an owner forward), held or not; NotFound otherwise."""
    post = session.get(Post, post_id)
    if post is None or post.audience is not Audience.MEMBERS:
        raise NotFound(f"no such post: {post_id}")
    return post


def get_held(session: Session, post_id: int) -> Post:
    post = get_post(session, post_id)
    if post.state is not PostState.HELD:
        raise NotHeld(not_held_text(post))
    return post


def not_held_text(post: Post) -> str:
    text = f"post {post.id} is not held: it is {post.state.value}"
    if post.decided_by and post.decided_at is not None:
        text += f" (decided by {post.decided_by} at {_when(post.decided_at)})"
    return text


def raw_of(session: Session, post: Post) -> bytes:
    inbound = session.get(InboundMessage, post.inbound_id) if post.inbound_id else None
    return b"" if inbound is None else inbound.raw


def moderators(session: Session, mlist: MailingList) -> list[str]:
    """Whom a hold is announced to: every moderator and owner, each address once."""
    rows = session.scalars(
        sa.select(Member.address)
        .where(Member.list_id == mlist.id, Member.role.in_((Role.MODERATOR, Role.OWNER)))
        .order_by(Member.id)
    )
    seen: dict[str, str] = {}
    for address in rows:
        seen.setdefault(address.lower(), address)
    return list(seen.values())


def moderator_among(session: Session, mlist: MailingList, candidates: list[str]) -> str | None:
    """The first of `candidates` that moderates or owns the list (case-insensitive)."""
    known = {a.lower(): a for a in moderators(session, mlist)}
    for candidate in candidates:
        try:
            address = addresses.normalize(candidate)
        except InvalidAddress:
            continue
        if address.lower() in known:
            return known[address.lower()]
    return None


def expires_at(post: Post, mlist: MailingList) -> datetime:
    """When a hold nobody decides is discarded (and its tokens die)."""
    if mlist.hold_expiry_days <= 0:
        return post.created_at + NO_EXPIRY
    return post.created_at + timedelta(days=mlist.hold_expiry_days)


# -- announcing ------------------------------------------------------------


def announce(session: Session, *, now: datetime, skip: set[int] | None = None) -> int:
    """Announce held posts that have no moderation token yet; returns how many.

    The token is the mark of an announced hold, so posts held before this code
    ran (or while no daemon did) are announced too, each exactly once: on
    PostgreSQL the rows are locked (SKIP LOCKED) while their token is written.
    A post whose announcement fails is logged, added to `skip` and left held
    (the CLI still sees it), rather than failing every other post's each round.
    """
    skip = set() if skip is None else skip
    has_token = (
        sa.select(Token.id)
        .where(Token.post_id == Post.id, Token.kind == TokenKind.MODERATION)
        .exists()
    )
    stmt = (
        sa.select(Post)
        .where(Post.state == PostState.HELD, Post.audience == Audience.MEMBERS, ~has_token)
        .order_by(Post.id)
        .limit(ANNOUNCE_BATCH)
    )
    if skip:
        stmt = stmt.where(Post.id.not_in(skip))
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    count = 0
    for post in list(session.scalars(stmt)):
        try:
            with session.begin_nested():
                announce_post(session, post, now=now)
        except Exception:
            log.exception("post %d: could not announce the hold (left held)", post.id)
            skip.add(post.id)
            continue
        count += 1
    return count


def announce_post(session: Session, post: Post, *, now: datetime) -> None:
    """Issue the post's token, notify each moderator and owner, tell the sender it waits."""
    mlist = session.get_one(MailingList, post.list_id)
    raw = raw_of(session, post)
    expiry = expires_at(post, mlist)
    token = tokens.issue(
        session,
        kind=TokenKind.MODERATION,
        list_id=mlist.id,
        post_id=post.id,
        expires_at=expiry,
    )
    reply_address = addresses.build(mlist.local_part, mlist.domain, Kind.CONFIRM, token)
    if len(reply_address.rpartition("@")[0]) > addresses.MAX_LOCAL:
        # RFC 5321 4.5.3.1.1: intake refuses such a local part, so replies cannot arrive
        log.warning(
            "post %d to %s: the list name is too long for a reply address (%s);"
            " decide with `listserv held`",
            post.id,
            mlist.address,
            reply_address,
        )
    values = _values(session, mlist, post, raw)
    values.update(reply_address=reply_address, expires=_when(expiry))
    to = moderators(session, mlist)
    for address in to:
        msg = _compose(
            mlist, "held_moderator", values, to=address, reply_to=reply_address, attach=raw
        )
        notices.queue(session, mlist, msg, [address])
    if not to:
        log.warning(
            "post %d to %s: held, but the list has no moderator or owner", post.id, mlist.address
        )
    told = _tell_sender(session, mlist, post, raw, "held_sender", **values)
    log.info(
        "post %d to %s: hold announced to %d moderator(s)%s",
        post.id,
        mlist.address,
        len(to),
        ", sender told" if told else "",
        extra={"event": "hold_announced", "post_id": post.id},
    )


# -- deciding --------------------------------------------------------------


def decide(
    session: Session, post_id: int, verdict: Verdict, *, actor: str, now: datetime
) -> Decided:
    """Carry out a moderator's verdict on a held post (the e-mail reply and the CLI).

    approve: accepted (queued by the scheduler, not before `verdict.at` when that is
    in the future); reject: the sender is told the reason; discard: the sender is
    told it was not distributed (the issue asks that the sender learn every outcome;
    the usual automatic-answer rules still spare robots and forged empty senders).
    Raises NotFound or NotHeld (decided already, maybe by a racing reply).
    """
    post = get_held(session, post_id)
    mlist = session.get_one(MailingList, post.list_id)
    not_before = verdict.at if verdict.at is not None and verdict.at > now else None
    state = _STATES.get(verdict.verb, PostState.DISCARDED)
    _finish(session, post, state, actor=actor, now=now, not_before=not_before)
    raw = raw_of(session, post)
    values = _values(session, mlist, post, raw)
    if verdict.verb is Verb.APPROVE:
        when = f"at {_when(not_before)}" if not_before else "now"
        summary = f"post {post.id} to {mlist.address} approved: it goes out {when}"
        if verdict.at is not None and not_before is None:
            summary += f" ({_when(verdict.at)} is past)"
        _tell_sender(session, mlist, post, raw, "approved_sender", when=when, **values)
    elif verdict.verb is Verb.REJECT:
        why = verdict.reason or "no reason was given"
        summary = f"post {post.id} to {mlist.address} rejected: {why}"
        _tell_sender(session, mlist, post, raw, "rejected_sender", why=why, **values)
    else:
        summary = f"post {post.id} to {mlist.address} discarded"
        _tell_sender(session, mlist, post, raw, "discarded_sender", **values)
    lists.audit(
        session,
        actor,
        f"post.{verdict.verb.value}",
        mlist.address,
        f"{summary}; from {post.sender}, subject {post.subject[:200]!r}, held for: {post.reason}",
    )
    log.info(
        "post %d to %s: %s by %s",
        post.id,
        mlist.address,
        verdict.verb.value,
        actor,
        extra={"event": f"post_{verdict.verb.value}", "post_id": post.id},
    )
    return Decided(
        post_id=post.id,
        list_address=mlist.address,
        verb=verdict.verb,
        state=state,
        sender=post.sender,
        subject=post.subject,
        not_before=not_before,
        summary=summary,
    )


def _finish(
    session: Session,
    post: Post,
    state: PostState,
    *,
    actor: str,
    now: datetime,
    not_before: datetime | None = None,
) -> None:
    """The one conditional UPDATE that takes a post out of `held`."""
    values: dict[str, object] = {"state": state, "decided_by": actor[:320], "decided_at": now}
    if state is PostState.ACCEPTED:
        values["not_before"] = not_before
    else:
        values["finished_at"] = now
    result = session.execute(
        sa.update(Post)
        .where(Post.id == post.id, Post.state == PostState.HELD)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.refresh(post)
        raise NotHeld(not_held_text(post))
    session.refresh(post)


# -- expiry and reminders --------------------------------------------------


def expire(session: Session, *, now: datetime) -> int:
    """Discard holds older than their list's hold_expiry_days and tell their senders."""
    rows = session.execute(
        sa.select(Post.id, Post.created_at, MailingList.hold_expiry_days)
        .join(MailingList, MailingList.id == Post.list_id)
        .where(Post.state == PostState.HELD, Post.audience == Audience.MEMBERS)
        .order_by(Post.id)
    ).all()
    # Python, not SQL, adds the days: interval arithmetic differs by dialect and holds are few.
    due = [pid for pid, created, days in rows if days > 0 and created + timedelta(days=days) <= now]
    count = 0
    for post_id in due:
        post = session.get_one(Post, post_id)
        mlist = session.get_one(MailingList, post.list_id)
        try:
            with session.begin_nested():
                _finish(session, post, PostState.DISCARDED, actor=EXPIRY_ACTOR, now=now)
        except NotHeld:
            continue  # decided meanwhile
        raw = raw_of(session, post)
        days = mlist.hold_expiry_days
        values = _values(session, mlist, post, raw)
        _tell_sender(session, mlist, post, raw, "expired_sender", days=days, **values)
        detail = f"post {post.id} discarded: not moderated within {days} days; from {post.sender}"
        lists.audit(session, EXPIRY_ACTOR, "post.expire", mlist.address, detail)
        log.info(
            "post %d to %s: hold expired after %d days, discarded",
            post.id,
            mlist.address,
            days,
            extra={"event": "hold_expired", "post_id": post.id},
        )
        count += 1
    return count


def remind(session: Session, *, now: datetime) -> int:
    """At most one reminder a day per list, listing its holds older than a day.

    Each listed post gets a fresh token, so a moderator who deleted the first
    notice can still decide by mail. Returns the number of lists reminded.
    """
    cutoff = now - REMINDER_INTERVAL
    rows = session.execute(
        sa.select(Post.id, Post.list_id)
        .join(MailingList, MailingList.id == Post.list_id)
        .where(
            Post.state == PostState.HELD,
            Post.audience == Audience.MEMBERS,
            Post.created_at <= cutoff,
            sa.or_(MailingList.last_reminder_at.is_(None), MailingList.last_reminder_at <= cutoff),
        )
        .order_by(Post.list_id, Post.id)
    ).all()
    by_list: dict[int, list[int]] = defaultdict(list)
    for post_id, list_id in rows:
        by_list[list_id].append(post_id)
    reminded = 0
    for list_id, post_ids in by_list.items():
        # Conditional, so two daemons never both remind the same list the same day.
        claimed = session.execute(
            sa.update(MailingList)
            .where(
                MailingList.id == list_id,
                sa.or_(
                    MailingList.last_reminder_at.is_(None), MailingList.last_reminder_at <= cutoff
                ),
            )
            .values(last_reminder_at=now)
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            continue
        mlist = session.get_one(MailingList, list_id)
        to = moderators(session, mlist)
        if not to:
            continue
        lines: list[str] = []
        for post_id in post_ids:
            post = session.get_one(Post, post_id)
            token = tokens.issue(
                session,
                kind=TokenKind.MODERATION,
                list_id=mlist.id,
                post_id=post.id,
                expires_at=expires_at(post, mlist),
            )
            confirm = addresses.build(mlist.local_part, mlist.domain, Kind.CONFIRM, token)
            lines += [
                f"Post {post.id}: from {post.sender}, held {age(now - post.created_at)}",
                f"  Subject: {_one_line(post.subject) or '(none)'}",
                f"  Reason:  {_one_line(post.reason) or '(none)'}",
                f"  Expires: {_when(expires_at(post, mlist))}",
                f"  Decide:  mail {confirm}",
                "",
            ]
        for address in to:
            values = {"list": mlist.address, "count": len(post_ids), "posts": "\n".join(lines)}
            msg = _compose(mlist, "reminder", values, to=address)
            notices.queue(session, mlist, msg, [address])
        log.info(
            "%s: reminded %d moderator(s) of %d held post(s)",
            mlist.address,
            len(to),
            len(post_ids),
            extra={"event": "hold_reminder", "post_ids": post_ids},
        )
        reminded += 1
    return reminded


# -- composing -------------------------------------------------------------


def render(name: str, **values: object) -> tuple[str, str]:
    """(subject, body) of listserv/templates/NAME.txt, whose first line is ``Subject: ...``."""
    text = notices.template(name, **values)
    first, _, body = text.partition("\n")
    if not first.lower().startswith("subject:"):
        return f"Message from {values.get('list', 'the list')}", text
    # Values may hold the sender's folded or odd text: one line, or the header is refused.
    return _one_line(first.partition(":")[2])[:900], body.lstrip("\n")


def _compose(
    mlist: MailingList,
    name: str,
    values: Mapping[str, object],
    *,
    to: str,
    reply_to: str | None = None,
    in_reply_to: str | None = None,
    attach: bytes | None = None,
) -> EmailMessage:
    subject, body = render(name, **values)
    return notices.compose(
        mlist,
        to=to,
        subject=subject,
        body=body,
        reply_to=reply_to,
        in_reply_to=in_reply_to,
        attach=attach or None,
    )


def reply(
    session: Session,
    mlist: MailingList,
    name: str,
    *,
    to: str,
    in_reply_to: str | None = None,
    **values: object,
) -> None:
    """Queue one notice to one address (the replies module's answers)."""
    values.setdefault("list", mlist.address)
    msg = _compose(mlist, name, values, to=to, in_reply_to=in_reply_to)
    notices.queue(session, mlist, msg, [to])


def _tell_sender(
    session: Session, mlist: MailingList, post: Post, raw: bytes, name: str, **values: object
) -> bool:
    """Tell the post's sender, unless RFC 3834 forbids answering it; returns whether told.

    The notice goes to the envelope sender (RFC 3834 section 4: the Return-Path),
    which is where a post that cannot be delivered would have bounced to.
    """
    inbound = session.get(InboundMessage, post.inbound_id) if post.inbound_id else None
    if inbound is None:
        return False
    headers = mail.parse_headers(raw)  # deciding whom to answer needs no 10 MB body parse
    if not notices.may_answer(inbound.mail_from, headers):
        log.info("post %d: not telling %r (automatic mail, RFC 3834)", post.id, inbound.mail_from)
        return False
    message_id = mail.header(headers, "Message-ID")
    msg = _compose(mlist, name, values, to=inbound.mail_from, in_reply_to=message_id or None)
    notices.queue(session, mlist, msg, [inbound.mail_from])
    return True


def _values(session: Session, mlist: MailingList, post: Post, raw: bytes) -> dict[str, object]:
    """What every template may name about a held post."""
    return {
        "list": mlist.address,
        "owner": addresses.build(mlist.local_part, mlist.domain, Kind.OWNER),
        "post_id": post.id,
        "sender": post.sender,
        "subject": _one_line(post.subject) or "(no subject)",
        "reason": _one_line(post.reason) or "(none given)",
        "size": _size(len(raw)),
        "recipients": members.recipient_count(session, [mlist.id]),
        "time_format": TIME_FORMAT,
    }


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1024 else f"{n} bytes ({(n + 512) // 1024} KB)"


def _when(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


def age(delta: timedelta) -> str:
    """``3d 4h``, ``5h 2m``, ``40s``: how long a post has waited."""
    seconds = max(0, int(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m" if minutes else f"{secs}s"
