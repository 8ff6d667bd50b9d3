"""What the queue holds, for `listserv queue status`: per post, recipients by state,
and the destination domains the throttle has slowed down or paused."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv.db import db_now
from listserv.distribute.throttle import Bucket, Throttle, snapshot
from listserv.models import (
    BatchState,
    Delivery,
    DeliveryBatch,
    InboundMessage,
    InboundState,
    MailingList,
    Post,
    PostState,
    RecipientState,
)


@dataclass
class PostStatus:
    post_id: int
    list_address: str
    subject: str
    state: PostState
    created_at: datetime
    reason: str = ""  # why it was held, discarded or failed
    counts: dict[str, int] = field(default_factory=dict)
    next_attempt_at: datetime | None = None
    paused: bool = False  # `queue pause`: its batches wait for `queue resume`
    recipients: int = 0  # snapshotted when it was queued
    #: the snapshot is still being written: `recipients` is a running total, not final
    snapshotting: bool = False

    @property
    def shown_state(self) -> str:
        """The state as `queue status` shows it: "paused" for a paused post."""
        if self.paused and self.state in (PostState.ACCEPTED, PostState.SENDING):
            return "paused"
        return self.state.value

    @property
    def answered(self) -> int:
        """Recipients done with, for good: delivered or failed."""
        return self.counts.get("delivered", 0) + self.counts.get("failed", 0)


def status(
    session: Session, *, include_finished: bool = False, limit: int = 50
) -> list[PostStatus]:
    """Per post: recipients waiting, in flight, deferred, delivered and failed.

    Cancelled posts are listed like failed ones (an operator's action to see); sent
    ones only with `include_finished`.
    """
    states = [
        PostState.ACCEPTED,
        PostState.SENDING,
        PostState.HELD,
        PostState.FAILED,
        PostState.CANCELLED,
    ]
    if include_finished:
        states.append(PostState.SENT)
    posts = session.execute(
        sa.select(
            Post.id,
            MailingList.local_part,
            MailingList.domain,
            Post.subject,
            Post.state,
            Post.created_at,
            Post.reason,
            Post.paused,
            Post.recipient_count,
            Post.snapshotting,
        )
        .join(MailingList, MailingList.id == Post.list_id)
        .where(Post.state.in_(states))
        .order_by(Post.id.desc())
        .limit(limit)
    )
    result = {
        pid: PostStatus(
            pid,
            f"{local}@{domain}",
            subject,
            state,
            created,
            reason,
            paused=paused,
            recipients=count,
            snapshotting=open_,
        )
        for pid, local, domain, subject, state, created, reason, paused, count, open_ in posts
    }
    if not result:
        return []
    counts = session.execute(
        sa.select(Delivery.post_id, Delivery.state, DeliveryBatch.state, sa.func.count())
        .join(DeliveryBatch, DeliveryBatch.id == Delivery.batch_id)
        .where(Delivery.post_id.in_(result))
        .group_by(Delivery.post_id, Delivery.state, DeliveryBatch.state)
    )
    for pid, rstate, bstate, n in counts:
        if (
            rstate in (RecipientState.PENDING, RecipientState.DEFERRED)
            and bstate is BatchState.LEASED
        ):
            key = "in_flight"
        elif rstate is RecipientState.PENDING:
            key = "waiting"
        else:
            key = rstate.value
        result[pid].counts[key] = result[pid].counts.get(key, 0) + n
    due = session.execute(
        sa.select(DeliveryBatch.post_id, sa.func.min(DeliveryBatch.next_attempt_at))
        .where(DeliveryBatch.post_id.in_(result), DeliveryBatch.state == BatchState.PENDING)
        .group_by(DeliveryBatch.post_id)
    )
    for pid, when in due:
        result[pid].next_attempt_at = when
    return list(result.values())


def pending_inbound(session: Session) -> dict[str, int]:
    """Stored mail to command/bounce/owner addresses not yet handled, by kind."""
    rows = session.execute(
        sa.select(InboundMessage.kind, sa.func.count())
        .where(InboundMessage.state == InboundState.PENDING)
        .group_by(InboundMessage.kind)
    )
    return {kind: n for kind, n in rows}


def throttled_domains(session: Session, throttle: Throttle) -> list[Bucket]:
    """Domains slowed down (rate factor below 1) or paused now, by key."""
    return snapshot(session, throttle, db_now(session))
