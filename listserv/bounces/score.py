"""Bounce scores and what they lead to: disable, warn, unsubscribe, re-enable.

Every bounce attributed to a member is a `bounce_events` row and moves the member's
score: a permanent bounce adds 1, at most once per (UTC) day, so one dead address
that every post of a busy day bounces from counts once; a temporary one adds the
list's `bounce_temporary_weight` (0: delays never count). A bounce that arrives more
than `bounce_info_stale_after` days after the member's previous one starts the
count again from zero, so a few bounces a year never add up.

When the score reaches `bounce_score_threshold` delivery is disabled (reason
"bounce"), the member is mailed a notice they can reply to to turn it back on
(TokenKind.REENABLE, NAME-confirm+TOKEN@: bounces/reenable.py), and the owners are
told. That notice is the first of `bounce_you_are_disabled_warnings`, one every
`bounce_you_are_disabled_warnings_interval` days (`step`, from the bounce task);
an interval after the last one without a re-enable, the member is unsubscribed
(members.unsubscribe via "bounce", so no sync adds them back) and the owners told.

Every function takes `now`: tests run months of bounces in a second.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import addresses, lists, members, notices, tokens
from listserv.addresses import Kind
from listserv.errors import InvalidAddress, NotFound
from listserv.models import (
    BounceEvent,
    BounceKind,
    DeliveryStatus,
    MailingList,
    Member,
    Role,
    TokenKind,
)
from listserv.moderation import holds

log = logging.getLogger("listserv.bounces")

#: what members.disabled_reason says for a member disabled here
REASON = "bounce"
#: the actor of what this module does, in the audit log and in `unsubscriptions`
ACTOR = "listserv"
#: members disabled for bounces looked at per `step` transaction
STEP_BATCH = 200


@dataclass(frozen=True, slots=True)
class Scored:
    """What one bounce did to a member."""

    address: str
    score: float
    counted: float  # what it added (0: a second permanent bounce the same day)
    disabled: bool  # this bounce disabled delivery


def member_rows(
    session: Session, mlist: MailingList, address: str, *, lock: bool = False
) -> list[Member]:
    """The member row(s) of `address` (any case) on `mlist`; role member only."""
    stmt = sa.select(Member).where(
        Member.list_id == mlist.id,
        Member.role == Role.MEMBER,
        sa.func.lower(Member.address) == address.lower(),
    )
    if lock and session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()  # a DSN and a delivery round scoring one member at once
    return list(session.scalars(stmt))


def register(
    session: Session,
    mlist: MailingList,
    address: str,
    kind: BounceKind,
    *,
    now: datetime,
    source: str,
    post_id: int | None = None,
    inbound_id: int | None = None,
    status: str = "",
    detail: str = "",
) -> Scored | None:
    """Record one bounce of `address` on `mlist` and score it; None (logged, nothing
    stored) when the address is no member of the list."""
    rows = member_rows(session, mlist, address, lock=True)
    if not rows:
        log.info(
            "bounce of %s on %s dropped: not a member (%s, %s)",
            address,
            mlist.address,
            kind.value,
            source,
            extra={"event": "bounce_unknown", "post_id": post_id, "inbound_id": inbound_id},
        )
        return None
    lowered = address.lower()
    counted = _weight(session, mlist, lowered, kind, now)
    session.add(
        BounceEvent(
            list_id=mlist.id,
            address=lowered[:320],
            post_id=post_id,
            inbound_id=inbound_id,
            kind=kind,
            source=source,
            status=status[:16],
            detail=detail[:1000],
            at=now,
        )
    )
    disabled = False
    member = rows[0]
    for row in rows:
        stale = row.last_bounce_at is None or now - row.last_bounce_at > timedelta(
            days=mlist.bounce_info_stale_after
        )
        row.bounce_score = (0.0 if stale else row.bounce_score) + counted
        row.last_bounce_at = now
        if (
            row.delivery_status is DeliveryStatus.ENABLED
            and row.bounce_score >= mlist.bounce_score_threshold
        ):
            disable(session, mlist, row, now=now, detail=detail or status)
            disabled = True
    log.info(
        "bounce of %s on %s: %s (%s%s), score %.1f%s",
        address,
        mlist.address,
        kind.value,
        source,
        f", post {post_id}" if post_id else "",
        member.bounce_score,
        ", delivery disabled" if disabled else "",
        extra={"event": "bounce", "post_id": post_id, "inbound_id": inbound_id},
    )
    session.flush()
    return Scored(member.address, member.bounce_score, counted, disabled)


def _weight(
    session: Session, mlist: MailingList, lowered: str, kind: BounceKind, now: datetime
) -> float:
    """What this bounce adds: a permanent one counts once per UTC day."""
    if kind is BounceKind.TEMPORARY:
        return float(mlist.bounce_temporary_weight)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    earlier = session.scalar(
        sa.select(BounceEvent.id)
        .where(
            BounceEvent.list_id == mlist.id,
            BounceEvent.address == lowered,
            BounceEvent.kind == BounceKind.PERMANENT,
            BounceEvent.at >= day,
            BounceEvent.at <= now,
        )
        .limit(1)
    )
    return 0.0 if earlier is not None else 1.0


def disable(
    session: Session, mlist: MailingList, member: Member, *, now: datetime, detail: str = ""
) -> None:
    """Stop delivery to `member`, tell them (the first warning) and the owners."""
    member.delivery_status = DeliveryStatus.DISABLED
    member.disabled_reason = REASON
    member.bounce_warnings_sent = 0
    lists.audit(
        session,
        ACTOR,
        "bounces.disable",
        mlist.address,
        f"{member.address}: score {member.bounce_score:g}",
    )
    if mlist.bounce_you_are_disabled_warnings <= 0:
        remove(session, mlist, member)
        return
    warn(session, mlist, member, now=now, template="bounce_disabled", detail=detail)
    _tell_owners(
        session,
        mlist,
        "bounce_disabled_owner",
        address=member.address,
        score=f"{member.bounce_score:g}",
        threshold=f"{mlist.bounce_score_threshold:g}",
        detail=_one_line(detail) or "(none given)",
        removal=_date(_removal(mlist, member, now)),
    )


def warn(
    session: Session,
    mlist: MailingList,
    member: Member,
    *,
    now: datetime,
    template: str = "bounce_warning",
    detail: str = "",
) -> None:
    """Mail `member` a "you are disabled" notice whose reply turns delivery back on."""
    member.bounce_warnings_sent += 1
    member.last_warning_at = now
    removal = _removal(mlist, member, now)
    raw = tokens.issue(
        session,
        kind=TokenKind.REENABLE,
        list_id=mlist.id,
        expires_at=removal,
        address=member.address,
    )
    confirm = addresses.build(mlist.local_part, mlist.domain, Kind.CONFIRM, raw)
    subject, body = holds.render(
        template,
        list=mlist.address,
        address=member.address,
        owner=addresses.build(mlist.local_part, mlist.domain, Kind.OWNER),
        confirm=confirm,
        detail=_one_line(detail) or "(none given)",
        removal=_date(removal),
        left=max(mlist.bounce_you_are_disabled_warnings - member.bounce_warnings_sent, 0),
    )
    msg = notices.compose(mlist, to=member.address, subject=subject, body=body, reply_to=confirm)
    notices.queue(session, mlist, msg, [member.address])


def _removal(mlist: MailingList, member: Member, now: datetime) -> datetime:
    """When `member` is unsubscribed if nothing changes: an interval after the last warning."""
    left = max(mlist.bounce_you_are_disabled_warnings - member.bounce_warnings_sent, 0)
    return now + timedelta(days=mlist.bounce_you_are_disabled_warnings_interval * (left + 1))


def remove(session: Session, mlist: MailingList, member: Member) -> None:
    """Unsubscribe a member disabled for bounces (recorded: no sync adds them back)."""
    address = member.address
    members.unsubscribe(session, mlist, address, via=REASON, actor=ACTOR)
    log.info(
        "%s unsubscribed from %s for bounces",
        address,
        mlist.address,
        extra={"event": "bounce_unsubscribed"},
    )
    _tell_owners(
        session,
        mlist,
        "bounce_removed_owner",
        address=address,
        warnings=mlist.bounce_you_are_disabled_warnings,
    )


def step(session: Session, *, now: datetime) -> int:
    """Warn or unsubscribe the members disabled for bounces whose interval is up;
    returns how many were acted on (notices queued)."""
    rows = session.execute(
        sa.select(Member, MailingList)
        .join(MailingList, MailingList.id == Member.list_id)
        .where(
            Member.disabled_reason == REASON,
            Member.delivery_status == DeliveryStatus.DISABLED,
            Member.role == Role.MEMBER,
        )
        .order_by(Member.id)
    ).all()
    acted = 0
    for member, mlist in rows:
        interval = timedelta(days=mlist.bounce_you_are_disabled_warnings_interval)
        if member.last_warning_at is not None and member.last_warning_at + interval > now:
            continue
        if member.bounce_warnings_sent < mlist.bounce_you_are_disabled_warnings:
            warn(session, mlist, member, now=now)
        else:
            remove(session, mlist, member)
        acted += 1
        if acted >= STEP_BATCH:
            break
    return acted


def reset(
    session: Session, mlist: MailingList, address: str, *, actor: str, action: str
) -> list[Member]:
    """Score and warnings back to zero, and delivery back on when bounces turned it off."""
    try:
        lowered = addresses.normalize(address)
    except InvalidAddress:
        lowered = address
    rows = member_rows(session, mlist, lowered, lock=True)
    if not rows:
        raise NotFound(f"{address} is not a member of {mlist.address}")
    for row in rows:
        row.bounce_score = 0.0
        row.last_bounce_at = None
        row.bounce_warnings_sent = 0
        row.last_warning_at = None
        if row.disabled_reason == REASON:
            row.delivery_status = DeliveryStatus.ENABLED
            row.disabled_reason = ""
    lists.audit(session, actor, action, mlist.address, rows[0].address)
    return rows


def owners(session: Session, mlist: MailingList) -> list[str]:
    rows = session.scalars(
        sa.select(Member.address)
        .where(Member.list_id == mlist.id, Member.role == Role.OWNER)
        .order_by(Member.id)
    )
    return list(dict.fromkeys(rows))


def _tell_owners(session: Session, mlist: MailingList, template: str, **values: object) -> None:
    to = owners(session, mlist)
    if not to:
        return
    owner = addresses.build(mlist.local_part, mlist.domain, Kind.OWNER)
    subject, body = holds.render(template, list=mlist.address, owner=owner, **values)
    msg = notices.compose(mlist, to=owner, subject=subject, body=body)
    notices.queue(session, mlist, msg, to)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def _date(when: datetime) -> str:
    return when.strftime("%Y-%m-%d")
