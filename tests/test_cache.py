"""The prepared-post cache lets go of posts: when this worker is done with them, when
they are unused for a while, and beyond its byte bound. Real databases, a real daemon."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
from conftest import make_list, message
from sink import Sink
from test_queue import _queue

from listserv.db import Database
from listserv.distribute import batches, smtp_client
from listserv.distribute.batches import ClaimedBatch
from listserv.distribute.cache import PreparedCache
from listserv.models import Post, PostState

SENDER = "boss@example.org"


def _claim_one(db: Database, post_id: int) -> ClaimedBatch:
    with db.session() as s:
        got = batches.claim_batches(s, worker="w", lease=timedelta(minutes=5), limit=100)
    return next(b for b in got if b.post_id == post_id)


async def test_evict_sweep_and_the_byte_bound(db: Database, tmp_path: Path) -> None:
    address = make_list(db)
    first = _queue(db, address, 4)
    now = [0.0]
    cache = PreparedCache(db, tmp_path, max_bytes=1000, idle=30, clock=lambda: now[0])
    batch = _claim_one(db, first)
    ready = await cache.get(batch)
    assert ready is not None and isinstance(ready.message, smtp_client.Stuffed)
    assert batch.post_key in cache and cache.bytes == len(ready.message)
    assert cache.evict(first) == len(ready.message)
    assert batch.post_key not in cache and cache.bytes == 0

    await cache.get(batch)
    now[0] = 29.0
    assert cache.sweep() == 0  # used 29 s ago: kept
    now[0] = 31.0
    assert cache.sweep() > 0 and batch.post_key not in cache

    # beyond the byte bound the least recently used post goes, never the one just loaded
    with db.session() as s:
        s.get_one(Post, first).prepared = b"x" * 995
    await cache.get(batch)
    second = _queue(db, address, 2)
    other = _claim_one(db, second)
    await cache.get(other)
    assert other.post_key in cache and batch.post_key not in cache
    assert cache.bytes <= 1000


async def test_a_large_post_leaves_the_cache_once_it_is_sent(
    daemon_factory: Any, db: Database, sink: Sink
) -> None:
    make_list(db, members_=[f"m{i}@d{i % 3}.example" for i in range(9)], senders=[SENDER])
    running = await daemon_factory(delivery__max_recipients_per_message=2)
    body = ("A line of a large post, long enough to matter.\n" * 40000).strip()
    await aiosmtplib.send(
        message(f"From: {SENDER}\nTo: staff@lists.example.org\nSubject: big\n\n") + body.encode(),
        sender=SENDER,
        recipients=["staff@lists.example.org"],
        hostname="127.0.0.1",
        port=running.port,
        timeout=30,
    )
    await sink.wait_for_recipients(9, timeout=30)
    engine = running.daemon.engine
    assert engine is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        with db.reading() as s:
            sent = s.get_one(Post, 1).state is PostState.SENT
        if sent and engine.cache.bytes == 0:
            break
        assert loop.time() < deadline, f"still cached: {engine.cache.bytes} bytes"
        await asyncio.sleep(0.05)
    assert len(sink.received[0].data) > 1_500_000  # it was large, and sent whole
