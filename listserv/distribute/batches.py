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
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv.bounces import smtp as smtp_bounces
from listserv.config import DeliverySettings
from listserv.db import db_now
from listserv.distribute import throttle as throttling
from listserv.distribute.results import RecipientResult
from listserv.distribute.retry import next_attempt
from listserv.distribute.throttle import Candidate, Event, Throttle
from listserv.errors import InvalidInput, NotFound
from listserv.models import (
    Audience,
    AuditEntry,
    BatchState,
    Delivery,
    DeliveryBatch,
    DeliveryMode,
    MailingList,
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


@dataclass(frozen=True, slots=True)
class Claim:
    """What one claim leased, and what the throttle said about the rest."""

    batches: list[ClaimedBatch]
    #: seconds until a throttled bucket has a token again (None: not waiting on one)
    retry_after: float | None = None
    #: one log line per throttle change this claim saw (a pause or slow-down ended)
    events: Sequence[Event] = ()


def claim_batches(
    session: Session, *, worker: str, lease: timedelta, limit: int
) -> list[ClaimedBatch]:
    """Lease up to `limit` due batches (or ones whose lease ran out) to `worker`,
    with no throttle (`claim` with one is what the dispatcher uses)."""
    return claim(session, worker=worker, lease=lease, limit=limit).batches


def claim(
    session: Session,
    *,
    worker: str,
    lease: timedelta,
    limit: int,
    throttle: Throttle | None = None,
    now: datetime | None = None,
) -> Claim:
    """Lease up to `limit` due batches (or ones whose lease ran out) to `worker`.

    Only batches of posts that are sending and not paused are due. Without a
    throttle: one ``UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING``, then the
    posts and open recipients, three statements whatever `limit` is. With one
    (distribute/throttle.py), in the same transaction: lock and read the buckets,
    count the leases of concurrency-limited domains, select candidates from the
    domains not blocked, lease those the buckets allow and write the buckets back.
    `now` defaults to the database's clock (tests inject their own).
    """
    conn = session.connection()
    now = db_now(session) if now is None else now
    postgresql = session.get_bind().dialect.name == "postgresql"
    due_now = sa.or_(
        sa.and_(DeliveryBatch.state == BatchState.PENDING, DeliveryBatch.next_attempt_at <= now),
        sa.and_(DeliveryBatch.state == BatchState.LEASED, DeliveryBatch.lease_expires_at < now),
    )
    sending = sa.and_(Post.state == PostState.SENDING, Post.paused.is_(False))
    due = sa.and_(due_now, sa.exists().where(Post.id == DeliveryBatch.post_id, sending))
    order = (DeliveryBatch.next_attempt_at, DeliveryBatch.id)
    retry_after: float | None = None
    events: list[Event] = []
    chosen: sa.Select[Any] | list[int]
    if throttle is None:
        chosen = sa.select(DeliveryBatch.id).where(due).order_by(*order).limit(limit)
        if postgresql:
            chosen = chosen.with_for_update(skip_locked=True)
    else:
        buckets = throttling.lock(session)
        in_flight = _in_flight(conn, throttle, now)
        blocked, events = throttle.blocked(buckets, in_flight, now)
        retry_after = throttle.wait(buckets, blocked, now, first=True)
        chosen = []
        if not blocked & set(throttling.GLOBAL):
            candidates = _candidates(
                conn, throttle, sa.and_(due_now, sending), order, blocked, limit
            )
            decision = throttle.admit(candidates, buckets, in_flight, limit, now)
            chosen = decision.admitted
            retry_after = _earliest(retry_after, decision.retry_after)
        throttling.save(session, throttle, buckets)
        if not chosen:
            return Claim([], retry_after, events)
    token = secrets.token_hex(16)
    leased = conn.execute(
        sa.update(DeliveryBatch)
        # a list of ids was read under the lock: check again that each is still due. Not
        # with a subquery: PostgreSQL may run it again per row (nested loop) and, seeing
        # the rows this UPDATE already leased as not due, pick more than `limit`
        .where(DeliveryBatch.id.in_(chosen), *([due] if isinstance(chosen, list) else []))
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
        return Claim([], retry_after, events)
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
    return Claim(sorted(claimed, key=lambda b: b.id), retry_after, events)


#: candidates read per batch wanted: those of a domain that runs out of tokens or
#: slots half-way are passed over, and the next claim excludes that domain in SQL
CANDIDATES_PER_SLOT = 4


def _candidates(
    conn: sa.Connection,
    throttle: Throttle,
    due: sa.ColumnElement[bool],
    order: tuple[Any, ...],
    blocked: set[str],
    limit: int,
) -> list[Candidate]:
    """Due batches of the domains not blocked, in claim order, with what each costs.

    `due` may name `Post`: the posts are joined here."""
    open_count = (
        sa.select(sa.func.count(Delivery.id))
        .where(Delivery.batch_id == DeliveryBatch.id, Delivery.state.in_(OPEN))
        .correlate(DeliveryBatch)
        .scalar_subquery()
    )
    # Fair between posts: each post's first due batch comes before anyone's second, so
    # a 200-member post does not queue behind the 200 batches of a 100,000-member one.
    rank = sa.func.row_number().over(partition_by=DeliveryBatch.post_id, order_by=order)
    ranked = (
        sa.select(DeliveryBatch.id.label("id"), rank.label("rank"))
        .join(Post, Post.id == DeliveryBatch.post_id)
        .where(due)
    )
    if blocked:
        ranked = ranked.where(DeliveryBatch.domain.not_in(throttle.domains_of(blocked)))
    fair = ranked.subquery()
    query = (
        sa.select(
            DeliveryBatch.id,
            DeliveryBatch.domain,
            Post.audience,
            sa.func.coalesce(Post.delivery_mode, MailingList.delivery_mode),
            open_count,
        )
        .join(fair, fair.c.id == DeliveryBatch.id)
        .join(Post, Post.id == DeliveryBatch.post_id)
        .join(MailingList, MailingList.id == Post.list_id)
        .order_by(fair.c.rank, *order)
        .limit(limit * CANDIDATES_PER_SLOT + 8)
    )
    # No FOR UPDATE here (PostgreSQL refuses it with a window function): claimers are
    # serialized by the throttle's lock row (throttling.lock), and the UPDATE that
    # leases checks again that each batch is still due.
    candidates = []
    for batch_id, domain, audience, mode, n_open in conn.execute(query):
        personalized = (
            audience != Audience.OWNERS and DeliveryMode(mode) is DeliveryMode.PERSONALIZED
        )
        candidates.append(Candidate(batch_id, domain, n_open if personalized else 1, n_open))
    return candidates


def _in_flight(conn: sa.Connection, throttle: Throttle, now: datetime) -> dict[str, int]:
    """Batches leased (and not expired) per throttle key with a concurrency limit."""
    if not throttle.limits_concurrency:
        return {}
    query = (
        sa.select(DeliveryBatch.domain, sa.func.count())
        .where(DeliveryBatch.state == BatchState.LEASED, DeliveryBatch.lease_expires_at >= now)
        .group_by(DeliveryBatch.domain)
    )
    domains = throttle.concurrency_domains()
    if domains is not None:
        query = query.where(DeliveryBatch.domain.in_(domains))
    counts: dict[str, int] = defaultdict(int)
    for domain, n in conn.execute(query):
        counts[throttle.key(domain)] += n
    return dict(counts)


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


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
    # locked in id order, as `cancel` locks a post's batches: no deadlock between them
    held_q = (
        sa.select(DeliveryBatch.id)
        .where(_held_by(worker, [r.batch for r in reports]))
        .order_by(DeliveryBatch.id)
    )
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
    bounced = _failures(reports, held)  # 5xx to RCPT or DATA: bounces (bounces/smtp.py)
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
            gave_up = conn.execute(
                sa.update(Delivery)
                .where(Delivery.batch_id == batch.id, Delivery.state.in_(OPEN))
                .values(
                    state=RecipientState.FAILED,
                    detail=sa.func.substr(
                        f"gave up after {batch.attempts} attempts: " + Delivery.detail, 1, 1000
                    ),
                    updated_at=now,
                )
                .returning(Delivery.address, Delivery.code, Delivery.detail)
            )
            bounced.extend(
                smtp_bounces.Failure(batch.post_id, *row, gave_up=True) for row in gave_up
            )
        done.append(batch.id)
        states.append(BatchState.DONE)
    if done:
        _set_batches(conn, done, state=BatchState.DONE)
        done_ids = set(done)
        for post_id in sorted({r.batch.post_id for r in reports if r.batch.id in done_ids}):
            _finish_post_if_done(session, post_id, now)
    if bounced:
        smtp_bounces.record(session, bounced, now=now)
    return states


def _failures(reports: Sequence[Report], held: set[int]) -> list[smtp_bounces.Failure]:
    found: list[smtp_bounces.Failure] = []
    for report in reports:
        failed = {r.delivery_id: r for r in report.results if r.outcome is RecipientState.FAILED}
        if not failed or report.batch.id not in held:
            continue
        for rid, address in report.batch.recipients:
            if rid in failed:
                r = failed[rid]
                found.append(smtp_bounces.Failure(report.batch.post_id, address, r.code, r.detail))
    return found


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
            # an open snapshot has more batches to come: its last chunk finishes the post
            .where(
                Post.id == post_id,
                Post.state == PostState.SENDING,
                Post.snapshotting.is_(False),
            )
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


# -- what pause and cancel need -----------------------------------------------------------


def halted(session: Session, post_ids: Collection[int]) -> set[int]:
    """Of `post_ids`, those whose batches must stop: paused, cancelled, finished or gone."""
    if not post_ids:
        return set()
    going = session.scalars(
        sa.select(Post.id).where(
            Post.id.in_(set(post_ids)), Post.state == PostState.SENDING, Post.paused.is_(False)
        )
    )
    return set(post_ids) - set(going)


def _idle_batches(post_filter: sa.ColumnElement[bool], now: datetime) -> sa.Select[Any]:
    """Unfinished batches that no live lease holds (a sender may hold the others)."""
    return (
        sa.select(DeliveryBatch.id)
        .join(Post, Post.id == DeliveryBatch.post_id)
        .where(
            post_filter,
            sa.or_(
                DeliveryBatch.state == BatchState.PENDING,
                sa.and_(
                    DeliveryBatch.state == BatchState.LEASED, DeliveryBatch.lease_expires_at < now
                ),
            ),
        )
        .order_by(DeliveryBatch.id)
    )


def _fail_open(conn: sa.Connection, batch_ids: Sequence[int], now: datetime) -> int:
    """Fail the open recipients of `batch_ids` with their post's reason ("cancelled by …")."""
    failed = 0
    reason = sa.select(Post.reason).where(Post.id == Delivery.post_id).scalar_subquery()
    for start in range(0, len(batch_ids), CHUNK):
        result = conn.execute(
            sa.update(Delivery)
            .where(
                Delivery.batch_id.in_(batch_ids[start : start + CHUNK]),
                Delivery.state.in_(OPEN),
            )
            .values(state=RecipientState.FAILED, code=None, detail=reason, updated_at=now)
        )
        failed += int(result.rowcount)
    for start in range(0, len(batch_ids), CHUNK):
        _set_batches(conn, batch_ids[start : start + CHUNK], state=BatchState.DONE)
    return failed


def retire_cancelled(session: Session, *, now: datetime | None = None) -> int:
    """Finish the batches of cancelled posts that were in flight at the cancel and have
    come back since (handed back, deferred, or their holder died); returns how many.

    Their senders' results were recorded first: only recipients still open fail.
    """
    now = db_now(session) if now is None else now
    pick = _idle_batches(Post.state == PostState.CANCELLED, now)
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True, of=DeliveryBatch)
    conn = session.connection()
    ids: list[int] = list(conn.execute(pick).scalars())
    if ids:
        _fail_open(conn, ids, now)
    return len(ids)


@dataclass(frozen=True, slots=True)
class Control:
    """What `pause`, `resume` or `cancel` did to a post."""

    post_id: int
    list_address: str
    #: recipients not yet answered (cancel: failed now, except those in flight)
    open_recipients: int
    #: batches in a sender's hands: they finish (or stop between two personalized
    #: messages) and their results are recorded
    in_flight: int
    #: cancel: recipients failed now
    failed: int = 0


def _post_for_control(session: Session, post_id: int, verb: str) -> tuple[Post, str]:
    stmt = sa.select(Post).where(Post.id == post_id)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    post = session.scalar(stmt)
    if post is None:
        raise NotFound(f"no post {post_id} to {verb} (the POST column of `listserv queue status`)")
    if post.state is PostState.HELD:
        raise InvalidInput(
            f"post {post_id} is held for moderation, not sending: decide it with"
            f" `listserv held reject {post_id}` or `listserv held approve {post_id}`"
        )
    if post.state not in (PostState.ACCEPTED, PostState.SENDING):
        raise InvalidInput(f"post {post_id} is {post.state.value}: nothing to {verb}")
    address = session.execute(
        sa.select(MailingList.local_part, MailingList.domain).where(MailingList.id == post.list_id)
    ).one()
    return post, f"{address[0]}@{address[1]}"


def _counts(session: Session, post_id: int, now: datetime) -> tuple[int, int]:
    """(open recipients, batches in flight) of a post."""
    open_recipients = session.scalar(
        sa.select(sa.func.count(Delivery.id)).where(
            Delivery.post_id == post_id, Delivery.state.in_(OPEN)
        )
    )
    in_flight = session.scalar(
        sa.select(sa.func.count(DeliveryBatch.id)).where(
            DeliveryBatch.post_id == post_id,
            DeliveryBatch.state == BatchState.LEASED,
            DeliveryBatch.lease_expires_at >= now,
        )
    )
    return int(open_recipients or 0), int(in_flight or 0)


def _audit(session: Session, actor: str, action: str, address: str, detail: str) -> None:
    session.add(AuditEntry(actor=actor, action=action, list_address=address, detail=detail))


def pause(session: Session, post_id: int, *, actor: str) -> Control:
    """Stop claiming the post's batches; those in flight finish and are recorded."""
    post, address = _post_for_control(session, post_id, "pause")
    if post.paused:
        raise InvalidInput(
            f"post {post_id} is already paused (`listserv queue resume {post_id}` resumes it)"
        )
    post.paused = True
    open_recipients, in_flight = _counts(session, post_id, db_now(session))
    _audit(session, actor, "post.pause", address, f"post {post_id}: {open_recipients} open")
    return Control(post_id, address, open_recipients, in_flight)


def resume(session: Session, post_id: int, *, actor: str) -> Control:
    """Make a paused post's batches claimable again, where they left off."""
    post, address = _post_for_control(session, post_id, "resume")
    if not post.paused:
        raise InvalidInput(f"post {post_id} is not paused")
    post.paused = False
    open_recipients, in_flight = _counts(session, post_id, db_now(session))
    _audit(session, actor, "post.resume", address, f"post {post_id}: {open_recipients} open")
    return Control(post_id, address, open_recipients, in_flight)


def cancel(session: Session, post_id: int, *, actor: str) -> Control:
    """Fail the post's open recipients ("cancelled by <actor>") and finish the post.

    Batches in a sender's hands are left to it: what it sends is recorded as it
    answers, and what it hands back is failed by the dispatcher's `retire_cancelled`.
    On PostgreSQL the batches are locked before the post, in id order, as `record`
    locks them, so a cancel and a dispatcher round cannot deadlock.
    """
    now = db_now(session)
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            sa.select(DeliveryBatch.id)
            .where(DeliveryBatch.post_id == post_id)
            .order_by(DeliveryBatch.id)
            .with_for_update()
        )
    post, address = _post_for_control(session, post_id, "cancel")
    reason = f"cancelled by {actor}"
    post.state = PostState.CANCELLED
    post.reason = reason
    post.finished_at = now
    post.paused = False
    post.snapshotting = False  # no more batches are written
    post.snapshot_owner = post.snapshot_expires_at = None
    session.flush()  # the reason is what the recipients' detail reads
    conn = session.connection()
    ids: list[int] = list(conn.execute(_idle_batches(Post.id == post_id, now)).scalars())
    failed = _fail_open(conn, ids, now) if ids else 0
    open_recipients, in_flight = _counts(session, post_id, now)
    _audit(
        session,
        actor,
        "post.cancel",
        address,
        f"post {post_id}: {failed} open recipients failed, {in_flight} batches in flight",
    )
    return Control(post_id, address, open_recipients, in_flight, failed)
