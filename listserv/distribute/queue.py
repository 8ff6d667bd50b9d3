"""The delivery queue: every verb on posts, batches and per-recipient deliveries.

A post is snapshotted into batches (one domain, at most N recipients each) when
it is queued; workers claim a batch with a lease, send it, and write the result
of every recipient back. A claim is ``FOR UPDATE SKIP LOCKED`` on PostgreSQL and
a ``BEGIN IMMEDIATE`` transaction on SQLite; a lease that has run out (its worker
died) makes the batch claimable again, so delivery is at-least-once.
"""

from __future__ import annotations

import os
import socket
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv.config import DeliverySettings
from listserv.distribute.retry import next_attempt
from listserv.models import (
    Audience,
    BatchState,
    Delivery,
    DeliveryBatch,
    DeliveryMode,
    DeliveryStatus,
    InboundMessage,
    InboundState,
    MailingList,
    Member,
    Post,
    PostState,
    RecipientState,
    Role,
    utcnow,
)

CHUNK = 2000


@dataclass(frozen=True, slots=True)
class RecipientResult:
    delivery_id: int
    outcome: RecipientState  # DELIVERED, DEFERRED or FAILED
    code: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ClaimedBatch:
    id: int
    post_id: int
    domain: str
    attempts: int
    created_at: datetime
    envelope_from: str
    delivery_mode: DeliveryMode
    list_id: int
    recipients: tuple[tuple[int, str], ...]  # (delivery id, address)


@dataclass
class PostStatus:
    post_id: int
    list_address: str
    subject: str
    state: PostState
    created_at: datetime
    counts: dict[str, int] = field(default_factory=dict)
    next_attempt_at: datetime | None = None


def worker_id(index: int | str = 0) -> str:
    """host:pid:index. The host and pid let a restarted daemon free its dead self's leases."""
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


# -- posts ----------------------------------------------------------------------------


def accepted_posts(session: Session, limit: int = 20) -> list[int]:
    stmt = sa.select(Post.id).where(Post.state == PostState.ACCEPTED).order_by(Post.id).limit(limit)
    return list(session.scalars(stmt))


def lock_accepted_post(session: Session, post_id: int) -> Post | None:
    """The post, locked for queueing, if it still waits for it (another worker may have won)."""
    stmt = sa.select(Post).where(Post.id == post_id, Post.state == PostState.ACCEPTED)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    return session.scalar(stmt)


def recipients(session: Session, list_id: int, audience: Audience = Audience.MEMBERS) -> list[str]:
    """Who a post goes to now, in one query: the members with delivery enabled,
    or, for mail to NAME-owner@, every owner."""
    stmt = sa.select(Member.address).where(Member.list_id == list_id)
    if audience is Audience.OWNERS:
        stmt = stmt.where(Member.role == Role.OWNER)
    else:
        stmt = stmt.where(
            Member.role == Role.MEMBER, Member.delivery_status == DeliveryStatus.ENABLED
        )
    stmt = stmt.execution_options(yield_per=CHUNK)
    seen: set[str] = set()
    result: list[str] = []
    for address in session.scalars(stmt):
        key = address.lower()
        if key not in seen:
            seen.add(key)
            result.append(address)
    return result


_INSERT_DELIVERY = sa.text(
    "INSERT INTO deliveries (batch_id, post_id, address, state, detail) VALUES (:b, :p, :a, :s, '')"
)


def enqueue(
    session: Session,
    post: Post,
    *,
    prepared: bytes,
    envelope_from: str,
    addresses: Sequence[str],
    max_per_batch: int,
) -> int:
    """Snapshot the recipients into batches by domain; returns the number of batches."""
    by_domain: dict[str, list[str]] = defaultdict(list)
    for address in addresses:
        by_domain[address.rpartition("@")[2].lower()].append(address)
    now = utcnow()
    post.prepared = prepared
    post.envelope_from = envelope_from
    post.recipient_count = len(addresses)
    if not addresses:
        post.state = PostState.SENT
        post.finished_at = now
        return 0
    post.state = PostState.SENDING
    plan: list[tuple[str, list[str]]] = []
    for domain in sorted(by_domain):
        group = by_domain[domain]
        for start in range(0, len(group), max_per_batch):
            plan.append((domain, group[start : start + max_per_batch]))
    batch_ids: list[int] = []
    for start in range(0, len(plan), CHUNK):
        rows = [
            {"post_id": post.id, "domain": d, "state": BatchState.PENDING, "next_attempt_at": now}
            for d, _ in plan[start : start + CHUNK]
        ]
        ids = session.scalars(
            sa.insert(DeliveryBatch).returning(DeliveryBatch.id, sort_by_parameter_order=True),
            rows,
        )
        batch_ids.extend(ids)
    pending = RecipientState.PENDING.value
    deliveries = [
        {"b": batch_id, "p": post.id, "a": a, "s": pending}
        for batch_id, (_, group) in zip(batch_ids, plan, strict=True)
        for a in group
    ]
    # A plain executemany: per-row ORM and type processing would cost more than the insert.
    conn = session.connection()
    for start in range(0, len(deliveries), CHUNK * 5):
        conn.execute(_INSERT_DELIVERY, deliveries[start : start + CHUNK * 5])
    return len(plan)


def fail_post(session: Session, post_id: int, reason: str) -> None:
    session.execute(
        sa.update(Post)
        .where(Post.id == post_id)
        .values(state=PostState.FAILED, reason=reason[:2000], finished_at=utcnow())
    )


def prepared_message(session: Session, post_id: int) -> bytes:
    data = session.scalar(sa.select(Post.prepared).where(Post.id == post_id))
    if data is None:
        raise LookupError(f"post {post_id} has no prepared message")
    return data


# -- batches --------------------------------------------------------------------------


def claim_batches(
    session: Session, *, worker: str, lease: timedelta, limit: int
) -> list[ClaimedBatch]:
    """Lease up to `limit` due batches (or ones whose lease ran out) to `worker`.

    One ``UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING``: on PostgreSQL the
    inner select is ``FOR UPDATE SKIP LOCKED``, so concurrent dispatchers never
    wait for each other's rows; on SQLite the transaction holds the write lock.
    Three statements whatever `limit` is.
    """
    conn = session.connection()
    now = utcnow()
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
            sa.select(
                Post.id, Post.envelope_from, Post.list_id, Post.audience, MailingList.delivery_mode
            )
            .join(MailingList, MailingList.id == Post.list_id)
            .where(Post.id.in_({row.post_id for row in leased}))
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
            post_id=row.post_id,
            domain=row.domain,
            attempts=row.attempts,
            created_at=row.created_at,
            envelope_from=posts[row.post_id].envelope_from,
            delivery_mode=(
                DeliveryMode.SHARED  # forwards to the owners are never personalized
                if posts[row.post_id].audience is Audience.OWNERS
                else posts[row.post_id].delivery_mode
            ),
            list_id=posts[row.post_id].list_id,
            recipients=tuple(rcpts[row.id]),
        )
        for row in leased
    ]
    return sorted(claimed, key=lambda b: b.id)


def claim_batch(session: Session, *, worker: str, lease: timedelta) -> ClaimedBatch | None:
    """Lease the next due batch, if any."""
    claimed = claim_batches(session, worker=worker, lease=lease, limit=1)
    return claimed[0] if claimed else None


def complete_batches(
    session: Session,
    finished: Sequence[tuple[ClaimedBatch, Sequence[RecipientResult]]],
    policy: DeliverySettings,
) -> list[BatchState]:
    """Record every recipient's outcome, then retire or reschedule each batch.

    Each batch's results have one entry per recipient of its claim (the sender's
    contract), so what is left open is what was deferred: no count query. The
    outcomes of all batches are written together, one UPDATE per distinct reply.
    """
    conn = session.connection()
    now = utcnow()
    groups: dict[tuple[RecipientState, int | None, str], list[int]] = defaultdict(list)
    for _, results in finished:
        for r in results:
            groups[(r.outcome, r.code, r.detail[:1000])].append(r.delivery_id)
    for (outcome, code, detail), ids in groups.items():
        for start in range(0, len(ids), CHUNK):
            conn.execute(
                sa.update(Delivery)
                .where(Delivery.id.in_(ids[start : start + CHUNK]))
                .values(state=outcome, code=code, detail=detail, updated_at=now)
            )
    states: list[BatchState] = []
    done: list[int] = []
    for batch, results in finished:
        answered = {r.delivery_id for r in results}
        left = (
            len(batch.recipients)
            - len(answered)
            + sum(1 for r in results if r.outcome is RecipientState.DEFERRED)
        )
        when = next_attempt(batch.attempts, batch.created_at, now, policy) if left else None
        if when is not None:
            _set_batches(session, [batch.id], state=BatchState.PENDING, next_attempt_at=when)
            states.append(BatchState.PENDING)
            continue
        if left:
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
        _set_batches(session, done, state=BatchState.DONE)
        done_ids = set(done)
        for post_id in sorted({b.post_id for b, _ in finished if b.id in done_ids}):
            _finish_post_if_done(session, post_id, now)
    return states


def complete_batch(
    session: Session,
    batch: ClaimedBatch,
    results: Sequence[RecipientResult],
    policy: DeliverySettings,
) -> BatchState:
    return complete_batches(session, [(batch, results)], policy)[0]


OPEN = (RecipientState.PENDING, RecipientState.DEFERRED)


def _set_batches(session: Session, batch_ids: Sequence[int], **values: object) -> None:
    session.connection().execute(
        sa.update(DeliveryBatch)
        .where(DeliveryBatch.id.in_(batch_ids))
        .values(lease_owner=None, lease_expires_at=None, **values)
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


def renew_leases(
    session: Session, batch_ids: Sequence[int], *, worker: str, lease: timedelta
) -> int:
    """Extend the leases `worker` still holds (a heartbeat); returns how many it held."""
    result = session.connection().execute(
        sa.update(DeliveryBatch)
        .where(
            DeliveryBatch.id.in_(batch_ids),
            DeliveryBatch.lease_owner == worker,
            DeliveryBatch.state == BatchState.LEASED,
        )
        .values(lease_expires_at=utcnow() + lease)
    )
    return result.rowcount


def release(session: Session, batch_id: int, worker: str) -> None:
    """Give a leased batch back untouched (graceful shutdown)."""
    session.execute(
        sa.update(DeliveryBatch)
        .where(DeliveryBatch.id == batch_id, DeliveryBatch.lease_owner == worker)
        .values(
            state=BatchState.PENDING,
            lease_owner=None,
            lease_expires_at=None,
            attempts=DeliveryBatch.attempts - 1,
        )
    )


def release_dead_local_leases(session: Session) -> int:
    """Free leases held by processes of this host that no longer run (after a kill -9).

    Leases of other hosts are left to expire: we cannot see their processes.
    """
    host = socket.gethostname()
    rows = session.execute(
        sa.select(DeliveryBatch.id, DeliveryBatch.lease_owner).where(
            DeliveryBatch.state == BatchState.LEASED,
            DeliveryBatch.lease_owner.like(f"{host}:%"),
        )
    )
    dead = [bid for bid, owner in rows if owner and not _alive(owner)]
    if dead:
        session.execute(
            sa.update(DeliveryBatch)
            .where(DeliveryBatch.id.in_(dead))
            .values(state=BatchState.PENDING, lease_owner=None, lease_expires_at=None)
        )
    return len(dead)


def _alive(owner: str) -> bool:
    try:
        pid = int(owner.split(":")[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- status ---------------------------------------------------------------------------


def status(
    session: Session, *, include_finished: bool = False, limit: int = 50
) -> list[PostStatus]:
    """Per post: recipients waiting, in flight, deferred, delivered and failed."""
    states = [PostState.ACCEPTED, PostState.SENDING, PostState.HELD, PostState.FAILED]
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
        )
        .join(MailingList, MailingList.id == Post.list_id)
        .where(Post.state.in_(states))
        .order_by(Post.id.desc())
        .limit(limit)
    )
    result = {
        pid: PostStatus(pid, f"{local}@{domain}", subject, state, created)
        for pid, local, domain, subject, state, created in posts
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
