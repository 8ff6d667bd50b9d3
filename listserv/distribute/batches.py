"""Storage verbs for delivery batches: claim, renew, record, hand back, free the dead's.

A claim leases batches to a worker under a fresh token. Every later write about a
batch (results, renewal, hand-back) is conditional on the worker still holding it
under that token, so a worker whose lease ran out and was taken over can neither
overwrite the new owner's work nor keep it alive: its writes match no row and its
results are dropped (the recipients are the new owner's now). Lease times come
from the database's clock (`db.db_now`), never a host's.

A claim is ``FOR UPDATE SKIP LOCKED`` on PostgreSQL and a ``BEGIN IMMEDIATE``
transaction on SQLite; delivery is at-least-once.
"""

from __future__ import annotations

import enum
import secrets
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv.config import DeliverySettings
from listserv.db import db_now
from listserv.distribute.results import RecipientResult
from listserv.distribute.retry import next_attempt
from listserv.models import (
    BatchState,
    Delivery,
    DeliveryBatch,
    Post,
    PostState,
    RecipientState,
)

CHUNK = 2000
OPEN = (RecipientState.PENDING, RecipientState.DEFERRED)


@dataclass(frozen=True, slots=True)
class ClaimedBatch:
    id: int
    token: str  # this claim's; every write about the batch must present it
    post_id: int
    domain: str
    attempts: int
    created_at: datetime
    envelope_from: str
    queued_at: datetime | None  # with post_id, names what was queued (a cache key)
    recipients: tuple[tuple[int, str], ...]  # (delivery id, address)

    @property
    def post_key(self) -> tuple[int, datetime | None]:
        return (self.post_id, self.queued_at)


class End(enum.Enum):
    """How a sender finished with a batch."""

    DONE = "done"  # every recipient answered or the connection failed: retire or retry
    HANDED_BACK = "handed back"  # stopped before the end (shutdown): the rest is untouched


@dataclass(frozen=True, slots=True)
class Report:
    """Results for one batch not yet recorded, and whether the sender is done with it."""

    batch: ClaimedBatch
    results: Sequence[RecipientResult] = ()
    end: End | None = None  # None: progress only, the batch is still being sent
    #: with End.DONE: how many recipients are still open (deferred or never answered)
    left: int = 0


_UPDATE_ONE = (
    sa.update(Delivery)
    .where(Delivery.id == sa.bindparam("rid"))
    .values(
        state=sa.bindparam("s", type_=Delivery.__table__.c.state.type),
        code=sa.bindparam("c"),
        detail=sa.bindparam("d"),
        updated_at=sa.bindparam("u", type_=Delivery.__table__.c.updated_at.type),
    )
)


def open_after(batch: ClaimedBatch, results: Sequence[RecipientResult]) -> int:
    """Recipients of `batch` still open once these are all of its results."""
    answered = {r.delivery_id for r in results}
    deferred = sum(1 for r in results if r.outcome is RecipientState.DEFERRED)
    return len(batch.recipients) - len(answered) + deferred


def claim_batches(
    session: Session, *, worker: str, lease: timedelta, limit: int
) -> list[ClaimedBatch]:
    """Lease up to `limit` due batches (or ones whose lease ran out) to `worker`.

    One ``UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING``, then the posts and
    open recipients: three statements whatever `limit` is.
    """
    conn = session.connection()
    now = db_now(session)
    token = secrets.token_hex(16)
    due = sa.or_(
        sa.and_(DeliveryBatch.state == BatchState.PENDING, DeliveryBatch.next_attempt_at <= now),
        sa.and_(DeliveryBatch.state == BatchState.LEASED, DeliveryBatch.lease_expires_at < now),
    )
    pick = (
        sa.select(DeliveryBatch.id)
        .where(due)
        .order_by(DeliveryBatch.next_attempt_at, DeliveryBatch.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    leased = conn.execute(
        sa.update(DeliveryBatch)
        .where(DeliveryBatch.id.in_(pick))
        .values(
            state=BatchState.LEASED,
            lease_owner=worker,
            claim_token=token,
            lease_expires_at=now + lease,
            attempts=DeliveryBatch.attempts + 1,
        )
        .returning(
            DeliveryBatch.id,
            DeliveryBatch.post_id,
            DeliveryBatch.domain,
            DeliveryBatch.attempts,
            DeliveryBatch.created_at,
        )
    ).all()
    if not leased:
        return []
    posts = {
        row.id: row
        for row in conn.execute(
            sa.select(Post.id, Post.envelope_from, Post.queued_at).where(
                Post.id.in_({row.post_id for row in leased})
            )
        )
    }
    rcpts: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for batch_id, rid, address in conn.execute(
        sa.select(Delivery.batch_id, Delivery.id, Delivery.address)
        .where(Delivery.batch_id.in_([row.id for row in leased]), Delivery.state.in_(OPEN))
        .order_by(Delivery.batch_id, Delivery.id)
    ):
        rcpts[batch_id].append((rid, address))
    claimed = [
        ClaimedBatch(
            id=row.id,
            token=token,
            post_id=row.post_id,
            domain=row.domain,
            attempts=row.attempts,
            created_at=row.created_at,
            envelope_from=posts[row.post_id].envelope_from,
            queued_at=posts[row.post_id].queued_at,
            recipients=tuple(rcpts[row.id]),
        )
        for row in leased
    ]
    return sorted(claimed, key=lambda b: b.id)


def _held_by(worker: str, batches: Sequence[ClaimedBatch]) -> sa.ColumnElement[bool]:
    return sa.and_(
        sa.tuple_(DeliveryBatch.id, DeliveryBatch.claim_token).in_(
            [(b.id, b.token) for b in batches]
        ),
        DeliveryBatch.lease_owner == worker,
        DeliveryBatch.state == BatchState.LEASED,
    )


def renew_leases(
    session: Session, batches: Sequence[ClaimedBatch], *, worker: str, lease: timedelta
) -> set[int]:
    """Extend the leases `worker` still holds (a heartbeat); returns their ids.

    A batch missing from the answer was taken over: stop sending it.
    """
    if not batches:
        return set()
    rows = session.connection().execute(
        sa.update(DeliveryBatch)
        .where(_held_by(worker, batches))
        .values(lease_expires_at=db_now(session) + lease)
        .returning(DeliveryBatch.id)
    )
    return set(rows.scalars())


def record(
    session: Session, reports: Sequence[Report], *, worker: str, policy: DeliverySettings
) -> list[BatchState | None]:
    """Write the results of each report whose batch `worker` still holds, and retire,
    reschedule or hand back the batches whose sender is done.

    Returns, per report, the batch's state afterwards (LEASED while it is still being
    sent), or None when the batch was no longer held: its results were dropped.
    Outcomes of every batch are written together, one UPDATE per distinct reply.
    """
    if not reports:
        return []
    conn = session.connection()
    now = db_now(session)
    held_q = sa.select(DeliveryBatch.id).where(_held_by(worker, [r.batch for r in reports]))
    if session.get_bind().dialect.name == "postgresql":
        held_q = held_q.with_for_update()
    held = set(conn.execute(held_q).scalars())
    groups: dict[tuple[RecipientState, int | None, str], list[int]] = defaultdict(list)
    for report in reports:
        if report.batch.id in held:
            for r in report.results:
                groups[(r.outcome, r.code, r.detail[:1000])].append(r.delivery_id)
    singles: list[dict[str, object]] = []
    for (outcome, code, detail), ids in groups.items():
        if len(ids) == 1:  # e.g. each personalized message's own "queued as" reply
            singles.append({"rid": ids[0], "s": outcome, "c": code, "d": detail})
            continue
        for start in range(0, len(ids), CHUNK):
            conn.execute(
                sa.update(Delivery)
                .where(Delivery.id.in_(ids[start : start + CHUNK]))
                .values(state=outcome, code=code, detail=detail, updated_at=now)
            )
    if singles:
        for single in singles:
            single["u"] = now
        conn.execute(_UPDATE_ONE, singles)  # one executemany, not a statement per reply
    states: list[BatchState | None] = []
    done: list[int] = []
    for report in reports:
        batch = report.batch
        if batch.id not in held:
            states.append(None)
            continue
        if report.end is None:
            states.append(BatchState.LEASED)
            continue
        if report.end is End.HANDED_BACK:
            _set_batches(conn, [batch.id], state=BatchState.PENDING, next_attempt_at=now)
            conn.execute(
                sa.update(DeliveryBatch)
                .where(DeliveryBatch.id == batch.id, DeliveryBatch.attempts > 0)
                .values(attempts=DeliveryBatch.attempts - 1)  # not a failed attempt
            )
            states.append(BatchState.PENDING)
            continue
        when = next_attempt(batch.attempts, batch.created_at, now, policy) if report.left else None
        if when is not None:
            _set_batches(conn, [batch.id], state=BatchState.PENDING, next_attempt_at=when)
            states.append(BatchState.PENDING)
            continue
        if report.left:
            conn.execute(
                sa.update(Delivery)
                .where(Delivery.batch_id == batch.id, Delivery.state.in_(OPEN))
                .values(
                    state=RecipientState.FAILED,
                    detail=sa.func.substr(
                        f"gave up after {batch.attempts} attempts: " + Delivery.detail, 1, 1000
                    ),
                    updated_at=now,
                )
            )
        done.append(batch.id)
        states.append(BatchState.DONE)
    if done:
        _set_batches(conn, done, state=BatchState.DONE)
        done_ids = set(done)
        for post_id in sorted({r.batch.post_id for r in reports if r.batch.id in done_ids}):
            _finish_post_if_done(session, post_id, now)
    return states


def _set_batches(conn: sa.Connection, batch_ids: Sequence[int], **values: object) -> None:
    conn.execute(
        sa.update(DeliveryBatch)
        .where(DeliveryBatch.id.in_(batch_ids))
        .values(lease_owner=None, lease_expires_at=None, claim_token=None, **values)
    )


def _finish_post_if_done(session: Session, post_id: int, now: datetime) -> None:
    conn = session.connection()
    # Two workers finishing the last two batches of a post at once must not both see
    # the other's batch still open: serialize on the post row (SQLite is serial anyway).
    if session.get_bind().dialect.name == "postgresql":
        conn.execute(sa.select(Post.id).where(Post.id == post_id).with_for_update())
    open_batches = conn.scalar(
        sa.select(sa.func.count(DeliveryBatch.id)).where(
            DeliveryBatch.post_id == post_id, DeliveryBatch.state != BatchState.DONE
        )
    )
    if not open_batches:
        conn.execute(
            sa.update(Post)
            .where(Post.id == post_id, Post.state == PostState.SENDING)
            .values(state=PostState.SENT, finished_at=now)
        )


def release_dead_leases(session: Session, *, alive: Callable[[str], bool], me: str) -> int:
    """Free the leases of workers that no longer run (after a kill -9), at once.

    `alive(owner)` asks the owner's liveness lock (distribute/liveness.py), which
    a dead process cannot hold, zombie or not. A freed batch's attempt still counts:
    it may have been sent before the crash.
    """
    owners = session.scalars(
        sa.select(DeliveryBatch.lease_owner)
        .where(DeliveryBatch.state == BatchState.LEASED, DeliveryBatch.lease_owner != me)
        .distinct()
    ).all()
    dead = [owner for owner in owners if owner and not alive(owner)]
    if not dead:
        return 0
    result = session.connection().execute(
        sa.update(DeliveryBatch)
        .where(DeliveryBatch.state == BatchState.LEASED, DeliveryBatch.lease_owner.in_(dead))
        .values(state=BatchState.PENDING, lease_owner=None, lease_expires_at=None, claim_token=None)
    )
    return int(result.rowcount)
