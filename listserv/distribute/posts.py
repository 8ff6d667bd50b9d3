"""Storage verbs for posts on their way out: find the accepted ones, snapshot the
recipients into batches, record what rendering needs, fail what cannot be sent.

What a post was queued with (delivery mode, the list values its decoration uses,
the prepared bytes) is stored on the post, so a list setting changed while its
batches wait changes nothing they send.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv.db import db_now
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
)

CHUNK = 2000
#: batches inserted, with their deliveries, per statement pair (at most 20 x 500 rows)
BATCH_SLICE = 20


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
        )
        .order_by(Post.id)
        .limit(limit)
    )
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


def recipient_stream(session: Session, list_id: int) -> Iterator[str]:
    """The members with delivery enabled, read in domain order and a slice at a time,
    each address once (whatever its case): a million of them never sit in memory.

    Ordered by domain, then address without case, so duplicates come next to each
    other and `enqueue` can cut batches as the rows come.
    """
    address = Member.address
    if session.get_bind().dialect.name == "postgresql":
        domain = sa.func.split_part(address, "@", 2)
    else:
        domain = sa.func.substr(address, sa.func.instr(address, "@") + 1)
    stmt = (
        sa.select(address)
        .where(
            Member.list_id == list_id,
            Member.role == Role.MEMBER,
            Member.delivery_status == DeliveryStatus.ENABLED,
        )
        .order_by(sa.func.lower(domain), sa.func.lower(address))
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


_INSERT_DELIVERY = sa.text(
    "INSERT INTO deliveries (batch_id, post_id, address, state, detail) VALUES (:b, :p, :a, :s, '')"
)


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
    """Snapshot the recipients into batches by domain; returns the number of batches.

    With `mix_domains` (the smarthost is an MTA, which splits by destination
    itself) a batch is filled to `max_per_batch` across domains, sorted by domain:
    over 1,000 domains that is 200 transactions of 500 instead of 1,000 of 100.
    A mixed batch's domain is its first recipient's.
    """
    now = db_now(session)
    post.prepared = prepared
    post.envelope_from = envelope_from
    post.delivery_mode = delivery_mode
    post.render = render
    post.queued_at = now
    post.state = PostState.SENDING
    pending = RecipientState.PENDING.value
    conn = session.connection()
    part: list[tuple[str, list[str]]] = []
    total = batches = 0

    def flush() -> None:
        # batches, then their deliveries, a slice at a time: the rows of a million
        # recipients built at once took 250 MB of the daemon's 396 MB peak
        rows = [
            {"post_id": post.id, "domain": d, "state": BatchState.PENDING, "next_attempt_at": now}
            for d, _ in part
        ]
        ids = session.scalars(
            sa.insert(DeliveryBatch).returning(DeliveryBatch.id, sort_by_parameter_order=True),
            rows,
        ).all()
        # A plain executemany: per-row ORM and type processing would cost more than it.
        conn.execute(
            _INSERT_DELIVERY,
            [
                {"b": batch_id, "p": post.id, "a": a, "s": pending}
                for batch_id, (_, group) in zip(ids, part, strict=True)
                for a in group
            ],
        )
        part.clear()

    group: list[str] = []
    group_domain = ""
    for address in _in_domain_order(addresses):
        domain = address.rpartition("@")[2].lower()
        if group and (len(group) >= max_per_batch or (not mix_domains and domain != group_domain)):
            part.append((group_domain, group))
            batches += 1
            if len(part) >= BATCH_SLICE:
                flush()
            group = []
        if not group:
            group_domain = domain  # a mixed batch's domain is its first recipient's
        group.append(address)
        total += 1
    if group:
        part.append((group_domain, group))
        batches += 1
    if part:
        flush()
    post.recipient_count = total
    if not total:
        post.state = PostState.SENT
        post.finished_at = now
    return batches


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
