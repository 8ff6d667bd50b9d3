"""Accepted posts become queued batches: prepare each (in a thread) as it arrives."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from listserv.config import Settings
from listserv.db import Database
from listserv.distribute import posts, prepare

log = logging.getLogger("listserv.scheduler")


async def run(
    db: Database,
    settings: Settings,
    *,
    wake: asyncio.Event,
    stop: asyncio.Event,
    on_queued: Callable[[], None],
) -> None:
    """Until `stop`: queue every accepted post; `wake` says new ones were stored.

    `poll_interval` covers posts stored by other processes (`listserv inject`,
    other daemons on the same database).
    """
    while not stop.is_set():
        try:
            progressed = await _queue_accepted(db, settings, stop, on_queued)
        except Exception:
            log.exception("unexpected error (will retry)")
            progressed = False
        if not progressed:  # more may be waiting; a post another daemon holds is not ours
            await _wait(wake, settings.delivery.poll_interval)


async def _queue_accepted(
    db: Database, settings: Settings, stop: asyncio.Event, on_queued: Callable[[], None]
) -> bool:
    post_ids = await asyncio.to_thread(_accepted, db)
    progressed = False
    for post_id in post_ids:
        if stop.is_set():
            break
        started = time.perf_counter()
        batches = await asyncio.to_thread(prepare.queue_post, db, settings, post_id)
        progressed |= batches is not None
        if batches:
            log.debug("post %d queued in %.3fs", post_id, time.perf_counter() - started)
            on_queued()
    return progressed


def _accepted(db: Database) -> list[int]:
    with db.reading() as session:
        return posts.accepted_posts(session)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass
    event.clear()
