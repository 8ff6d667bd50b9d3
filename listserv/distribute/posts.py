"""Storage verbs for posts on their way out: find the accepted ones, snapshot the
recipients into batches, record what rendering needs, fail what cannot be sent.

What a post was queued with (delivery mode, the list values its decoration uses,
the prepared bytes) is stored on the post, so a list setting changed while its
batches wait changes nothing they send.

A members' post is snapshotted in chunks, each its own transaction, so its first
batches go out while the rest is written (a million members took one transaction,
and nothing was claimable until it committed). `start_snapshot` marks the post
sending with its snapshot open (`snapshotting`) and claimed by one worker;
`snapshot_chunk` reads the next members in domain order after the cursor
(`snapshot_after`, the last address written), writes their batches and moves the
cursor in the same transaction, so a kill -9 between two chunks neither loses nor
repeats anyone: whoever resumes reads after the cursor. The claim
(`snapshot_owner`, `snapshot_expires_at`) keeps two daemons from writing one
post's snapshot; a claim whose owner died (liveness lock) or ran out is taken
over with `adopt_snapshot`. While the snapshot is open the post is never marked
sent and its `recipient_count` is a running total. A member added or removed
between two chunks is seen if the cursor has not passed their address yet.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv.db import SMALL_VALUES, db_now, insert_ids
from listserv.models import (
    Audience,
    BatchState,
    Delivery,
    DeliveryBatch,
    DeliveryMode,
    DeliveryStatus,
    InboundMessage,
    MailingList,
    Member,
    Post,
    PostState,
    RecipientState,
    Role,
    email_domain,
)

CHUNK = 2000
#: batches inserted, with their deliveries, per statement pair (at most 20 x 500 rows)
BATCH_SLICE = 20
#: members read and written per snapshot transaction: two batches of 500, about
#: 12 ms on SQLite, so the first batches are claimable almost at once and intake
#: never waits long behind a chunk ([delivery] snapshot_chunk)
SNAPSHOT_ROWS = 1000


@dataclass(frozen=True, slots=True)
class QueuedPost:
    """A post as its senders need it: what was stored when it was queued."""

    id: int
    list_id: int
    queued_at: datetime | None
    prepared: bytes
    delivery_mode: DeliveryMode
    render: dict[str, Any] | None


def accepted_posts(session: Session, limit: int = 20, *, now: datetime | None = None) -> list[int]:
    """Accepted posts due for queueing: a post approved "at" a later time waits for it.

    `now` defaults to the database's clock (the one `not_before` is compared with
    by every daemon sharing the queue).
    """
    now = db_now(session) if now is None else now
    stmt = (
        sa.select(Post.id)
        .where(
            Post.state == PostState.ACCEPTED,
            sa.or_(Post.not_before.is_(None), Post.not_before <= now),
            ~_sibling_snapshotting(Post),
        )
        .order_by(Post.id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def _sibling_snapshotting(post: type[Post]) -> sa.ColumnElement[bool]:
    """Another post of the same incoming message (to another list) is being snapshotted:
    this one waits for it, so it can leave out every address that one has."""
    sibling = sa.orm.aliased(Post)
    return sa.exists().where(
        sibling.inbound_id == post.inbound_id,
        sibling.id != post.id,
        sibling.state == PostState.SENDING,
        sibling.snapshotting.is_(True),
    )


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


#: the order of a snapshot: the expressions of index ix_members_snapshot
_SNAPSHOT_ORDER = (sa.func.lower(email_domain(Member.address)), sa.func.lower(Member.address))


def recipient_stream(session: Session, list_id: int) -> Iterator[str]:
    """The members with delivery enabled, read in domain order and a slice at a time,
    each address once (whatever its case): a million of them never sit in memory.

    Ordered by domain, then address without case, so duplicates come next to each
    other and `enqueue` can cut batches as the rows come.
    """
    stmt = (
        sa.select(Member.address)
        .where(
            Member.list_id == list_id,
            Member.role == Role.MEMBER,
            Member.delivery_status == DeliveryStatus.ENABLED,
        )
        .order_by(*_SNAPSHOT_ORDER)
        .execution_options(yield_per=CHUNK)
    )
    last = ""
    for value in session.scalars(stmt):
        key = value.lower()
        if key != last:
            last = key
            yield value


def not_yet_sent_with(session: Session, post: Post, addresses: Iterable[str]) -> Iterable[str]:
    """`addresses` less those another post of the same incoming message (to another
    list) already has: a message sent to several lists reaches each address once.

    On PostgreSQL the incoming message's row is locked, so two daemons queueing
    two of its posts at once see each other's snapshot.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            sa.select(InboundMessage.id)
            .where(InboundMessage.id == post.inbound_id)
            .with_for_update()
        )
    taken = {
        a.lower()
        for a in session.scalars(
            sa.select(Delivery.address)
            .join(Post, Post.id == Delivery.post_id)
            .where(Post.inbound_id == post.inbound_id, Post.id != post.id)
        )
    }
    if not taken:
        return addresses
    return (a for a in addresses if a.lower() not in taken)


_INSERT_DELIVERY = (
    "INSERT INTO deliveries (batch_id, post_id, address, state, detail) VALUES (?, ?, ?, ?, '')"
)


def _mark_queued(
    session: Session,
    post: Post,
    *,
    prepared: bytes,
    envelope_from: str,
    delivery_mode: DeliveryMode,
    render: dict[str, Any] | None,
) -> datetime:
    now = db_now(session)
    post.prepared = prepared
    post.envelope_from = envelope_from
    post.delivery_mode = delivery_mode
    post.render = render
    post.queued_at = now
    post.state = PostState.SENDING
    post.recipient_count = 0
    return now


def enqueue(
    session: Session,
    post: Post,
    *,
    prepared: bytes,
    envelope_from: str,
    delivery_mode: DeliveryMode,
    render: dict[str, Any] | None,
    addresses: Iterable[str],
    max_per_batch: int,
    mix_domains: bool = False,
) -> int:
    """Snapshot the recipients into batches by domain, all in this transaction;
    returns the number of batches (a members' post goes in chunks instead:
    `start_snapshot` and `snapshot_chunk`).

    With `mix_domains` (the smarthost is an MTA, which splits by destination
    itself) a batch is filled to `max_per_batch` across domains, sorted by domain:
    over 1,000 domains that is 200 transactions of 500 instead of 1,000 of 100.
    A mixed batch's domain is its first recipient's.
    """
    now = _mark_queued(
        session,
        post,
        prepared=prepared,
        envelope_from=envelope_from,
        delivery_mode=delivery_mode,
        render=render,
    )
    writer = _BatchWriter(session, post.id, now)
    for group in _cut(_in_domain_order(addresses), max_per_batch, mix_domains):
        writer.add(group)
    writer.flush()
    post.recipient_count = writer.recipients
    if not writer.recipients:
        post.state = PostState.SENT
        post.finished_at = now
    return writer.batches


class _BatchWriter:
    """Writes batches, then their deliveries, a slice at a time: the rows of a million
    recipients built at once took 250 MB of the daemon's 396 MB peak."""

    def __init__(self, session: Session, post_id: int, now: datetime) -> None:
        self.session = session
        self.post_id = post_id
        self.now = now
        self.batches = self.recipients = 0
        self._part: list[tuple[str, list[str]]] = []

    def add(self, group: tuple[str, list[str]]) -> None:
        self._part.append(group)
        self.batches += 1
        self.recipients += len(group[1])
        if len(self._part) >= BATCH_SLICE:
            self.flush()

    def flush(self) -> None:
        if not self._part:
            return
        rows = [
            {"post_id": self.post_id, "domain": d, "state": BatchState.PENDING}
            | {"next_attempt_at": self.now}
            for d, _ in self._part
        ]
        ids = insert_ids(self.session, DeliveryBatch, rows)
        pending = RecipientState.PENDING.value
        # The driver's own executemany of plain tuples: SQLAlchemy's per-row parameter
        # processing (even of a text() statement) was a fifth of a snapshot chunk's CPU.
        connection = self.session.connection()
        insert = _INSERT_DELIVERY
        if connection.dialect.paramstyle != "qmark":
            insert = insert.replace("?", "%s")
        connection.exec_driver_sql(
            insert,
            [
                (batch_id, self.post_id, a, pending)
                for batch_id, (_, group) in zip(ids, self._part, strict=True)
                for a in group
            ],
            execution_options=SMALL_VALUES,  # members' addresses
        )
        self._part.clear()


def _cut(
    addresses: Iterable[str], max_per_batch: int, mix_domains: bool
) -> Iterator[tuple[str, list[str]]]:
    """(domain, recipients) batches of addresses that come in domain order."""
    group: list[str] = []
    group_domain = ""
    for address in addresses:
        domain = address.rpartition("@")[2].lower()
        if group and (len(group) >= max_per_batch or (not mix_domains and domain != group_domain)):
            yield group_domain, group
            group = []
        if not group:
            group_domain = domain  # a mixed batch's domain is its first recipient's
        group.append(address)
    if group:
        yield group_domain, group


# -- the chunked snapshot of a members' post ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    """What one `snapshot_chunk` wrote."""

    batches: int
    recipients: int
    #: the snapshot is complete (False: call again)
    done: bool
    #: nothing was written: the post is gone, cancelled, or another worker holds it
    lost: bool = False


def start_snapshot(
    session: Session,
    post_id: int,
    *,
    worker: str,
    lease: timedelta,
    prepared: bytes,
    envelope_from: str,
    delivery_mode: DeliveryMode,
    render: dict[str, Any] | None,
) -> Post | None:
    """Mark an accepted members' post sending with its snapshot open and claimed by
    `worker`; None when another worker took it first, or when another post of the same
    incoming message is being snapshotted (this one waits for it).

    On PostgreSQL the incoming message's row is locked first, so two daemons cannot
    start two of its posts at once and miss each other's recipients.
    """
    post = lock_accepted_post(session, post_id)
    if post is None:
        return None
    if post.inbound_id is not None:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(
                sa.select(InboundMessage.id)
                .where(InboundMessage.id == post.inbound_id)
                .with_for_update()
            )
        busy = session.scalar(sa.select(_sibling_snapshotting(Post)).where(Post.id == post.id))
        if busy:
            return None
    now = _mark_queued(
        session,
        post,
        prepared=prepared,
        envelope_from=envelope_from,
        delivery_mode=delivery_mode,
        render=render,
    )
    post.snapshotting = True
    post.snapshot_after = None
    post.snapshot_owner = worker
    post.snapshot_expires_at = now + lease
    return post


def sibling_addresses(session: Session, post_id: int) -> set[str]:
    """Lower-cased addresses other posts of the same incoming message (to other lists)
    already have: a message sent to several lists reaches each address once. Those
    posts' snapshots are complete (`start_snapshot` waits for them), so this is read
    once per run of a snapshot, not per chunk."""
    inbound_id = session.scalar(sa.select(Post.inbound_id).where(Post.id == post_id))
    if inbound_id is None:
        return set()
    return {
        a.lower()
        for a in session.scalars(
            sa.select(Delivery.address)
            .join(Post, Post.id == Delivery.post_id)
            .where(Post.inbound_id == inbound_id, Post.id != post_id)
        )
    }


def snapshot_chunk(
    session: Session,
    post_id: int,
    *,
    worker: str,
    lease: timedelta,
    max_per_batch: int,
    mix_domains: bool = False,
    rows: int = SNAPSHOT_ROWS,
    skip: Collection[str] = frozenset(),
) -> Chunk:
    """Write the batches of the next `rows` members after the cursor and move it, in
    this transaction; the last chunk closes the snapshot.

    Only the holder of the claim writes (and renews the claim). A chunk ends on a
    batch boundary: the last group read, unless full, is left for the next chunk
    (unless it is the only one), so chunks cost no extra batches. (A full one was
    left too: with batches of 500 across domains, chunks of 1,000 wrote 500.)
    `skip` holds lower-cased addresses to leave out (`sibling_addresses`).
    """
    stmt = sa.select(Post).where(Post.id == post_id)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()  # against `record` finishing the post meanwhile
    post = session.scalar(stmt)
    if (
        post is None
        or post.state is not PostState.SENDING
        or not post.snapshotting
        or post.snapshot_owner != worker
    ):
        return Chunk(0, 0, done=False, lost=True)
    now = db_now(session)
    after = post.snapshot_after
    read = _members_after(session, post.list_id, after, rows)
    more = len(read) == rows
    # (domain, recipients, the key read just before its first recipient)
    groups: list[tuple[str, list[str], str | None]] = []
    group: list[str] = []
    group_domain = ""
    group_prev: str | None = after
    last: str | None = after
    for address, key, domain in read:
        # keys are the database's lower(): its order, and the cursor compared with it
        if key == last:  # the same address in another case
            continue
        if address.lower() in skip:
            last = key
            continue
        if group and (len(group) >= max_per_batch or (not mix_domains and domain != group_domain)):
            groups.append((group_domain, group, group_prev))
            group = []
        if not group:
            group_domain, group_prev = domain, last
        group.append(address)
        last = key
    cursor = last
    if group:
        if more and len(group) < max_per_batch and (groups or group_prev != after):
            cursor = group_prev  # may grow: read again by the next chunk, whole
        else:  # complete (full, or the last members), or the chunk's only group
            groups.append((group_domain, group, group_prev))
    writer = _BatchWriter(session, post.id, now)
    for domain, recipients, _ in groups:
        writer.add((domain, recipients))
    writer.flush()
    post.recipient_count += writer.recipients
    post.snapshot_expires_at = now + lease
    if more:
        post.snapshot_after = cursor
        return Chunk(writer.batches, writer.recipients, done=False)
    post.snapshotting = False
    post.snapshot_after = post.snapshot_owner = post.snapshot_expires_at = None
    session.flush()
    if not post.recipient_count:
        post.state = PostState.SENT
        post.finished_at = now
    elif not session.scalar(
        sa.select(sa.func.count(DeliveryBatch.id)).where(
            DeliveryBatch.post_id == post.id, DeliveryBatch.state != BatchState.DONE
        )
    ):  # every batch went out while the snapshot ran: the last `record` left it to us
        post.state = PostState.SENT
        post.finished_at = now
    return Chunk(writer.batches, writer.recipients, done=True)


def _members_after(
    session: Session, list_id: int, after: str | None, rows: int
) -> list[tuple[str, str, str]]:
    """Up to `rows` members with delivery enabled, in snapshot order, after the key
    `after`, through index ix_members_snapshot: (address, key, domain), the key and
    domain lower-cased by the database."""
    domain, address = _SNAPSHOT_ORDER
    stmt = sa.select(Member.address, address, domain).where(
        Member.list_id == list_id,
        Member.role == Role.MEMBER,
        Member.delivery_status == DeliveryStatus.ENABLED,
    )
    if after is not None:
        after_domain = sa.func.lower(email_domain(sa.literal(after, sa.String)))
        # `domain >= d` first: a range both databases can seek in the index with
        stmt = stmt.where(domain >= after_domain, sa.or_(domain > after_domain, address > after))
    return [
        (a, key, d) for a, key, d in session.execute(stmt.order_by(domain, address).limit(rows))
    ]


def adopt_snapshot(
    session: Session,
    post_id: int,
    *,
    worker: str,
    lease: timedelta,
    alive: Callable[[str], bool],
    now: datetime | None = None,
) -> bool:
    """Take over an open snapshot nobody writes any more: its owner is dead (its
    liveness lock is free), its claim ran out, or it was let go at a stop. True when
    it is now `worker`'s; the cursor says where to resume."""
    now = db_now(session) if now is None else now
    owner = session.scalar(
        sa.select(Post.snapshot_owner).where(
            Post.id == post_id, Post.state == PostState.SENDING, Post.snapshotting.is_(True)
        )
    )
    expires = session.scalar(sa.select(Post.snapshot_expires_at).where(Post.id == post_id))
    if owner == worker:
        return True
    if owner is not None and alive(owner) and expires is not None and expires >= now:
        return False
    taken = session.connection().execute(
        sa.update(Post)
        .where(
            Post.id == post_id,
            Post.state == PostState.SENDING,
            Post.snapshotting.is_(True),
            Post.snapshot_owner.is_(None)
            if owner is None
            else Post.snapshot_owner == owner,  # nobody took it meanwhile
        )
        .values(snapshot_owner=worker, snapshot_expires_at=now + lease)
    )
    return bool(taken.rowcount)


def open_snapshots(session: Session, *, but: str) -> list[int]:
    """Posts whose snapshot is open and not held by worker `but`, oldest first."""
    return list(
        session.scalars(
            sa.select(Post.id)
            .where(
                Post.state == PostState.SENDING,
                Post.snapshotting.is_(True),
                sa.or_(Post.snapshot_owner.is_(None), Post.snapshot_owner != but),
            )
            .order_by(Post.id)
        )
    )


def release_snapshots(session: Session, *, worker: str) -> int:
    """Let go of `worker`'s open snapshots (a stop), so another daemon resumes them at once."""
    result = session.connection().execute(
        sa.update(Post)
        .where(Post.snapshotting.is_(True), Post.snapshot_owner == worker)
        .values(snapshot_owner=None, snapshot_expires_at=None)
    )
    return int(result.rowcount)


def _in_domain_order(addresses: Iterable[str]) -> Iterable[str]:
    """`addresses` by domain: a stream from `recipient_stream` is so already; a list
    (notices, owners, tests) is sorted here, keeping its order within a domain."""
    if isinstance(addresses, list | tuple):
        return sorted(addresses, key=lambda a: a.rpartition("@")[2].lower())
    return addresses


def fail_post(session: Session, post_id: int, reason: str) -> None:
    session.execute(
        sa.update(Post)
        .where(Post.id == post_id, Post.state == PostState.ACCEPTED)
        .values(state=PostState.FAILED, reason=reason[:2000], finished_at=db_now(session))
    )


def queued_post(session: Session, post_id: int) -> QueuedPost | None:
    """The stored form of a queued post, or None when it is gone (its list was deleted)."""
    row = session.execute(
        sa.select(
            Post.id,
            Post.list_id,
            Post.queued_at,
            Post.prepared,
            Post.audience,
            sa.func.coalesce(Post.delivery_mode, MailingList.delivery_mode),
            Post.render,
        )
        .join(MailingList, MailingList.id == Post.list_id)
        .where(Post.id == post_id)
    ).one_or_none()
    if row is None or row.prepared is None:
        return None
    mode = DeliveryMode(row[5])
    if row.audience is Audience.OWNERS:
        mode = DeliveryMode.SHARED  # forwards to the owners are never personalized
    return QueuedPost(row.id, row.list_id, row.queued_at, row.prepared, mode, row.render)
