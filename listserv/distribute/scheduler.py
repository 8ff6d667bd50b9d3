"""Accepted posts become queued batches: prepare each (in a thread) as it arrives,
and write the recipients of members' posts a chunk at a time.

Each round starts the accepted posts (each with its first chunk, so its first
batches go out at once), then writes one more chunk of every snapshot this
scheduler has open: a small post arriving during a million-member snapshot waits
for one chunk (about 50 ms), not for the whole snapshot. While snapshots are open
a round starts new posts for `START_SLICE` seconds at most, so a backlog of
accepted posts (hundreds after a burst) does not hold a big post's snapshot, and
so its delivery, to one chunk every few seconds. Open snapshots nobody
writes any more (their daemon was killed, or let them go at a stop) are taken
over every `ADOPT_EVERY` seconds and resumed from their cursor; at a stop this
scheduler lets go of its own, so another daemon resumes them at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from listserv.config import Settings
from listserv.db import Database
from listserv.distribute import posts, prepare
from listserv.distribute.liveness import Liveness, worker_id

log = logging.getLogger("listserv.scheduler")

#: how often open snapshots of other workers are checked for a dead owner (seconds)
ADOPT_EVERY = 5.0
#: seconds a round spends starting new posts, at least one, while snapshots are open
START_SLICE = 0.1


@dataclass
class _Snapshot:
    """A members' post whose recipients this scheduler is writing."""

    queued: prepare.Queued
    started: float
    resumed: bool = False


async def run(
    db: Database,
    settings: Settings,
    *,
    wake: asyncio.Event,
    stop: asyncio.Event,
    on_queued: Callable[[], None],
    worker: str | None = None,
    liveness: Liveness | None = None,
) -> None:
    """Until `stop`: queue every accepted post; `wake` says new ones were stored.

    `poll_interval` covers posts stored by other processes (`listserv inject`,
    other daemons on the same database). `worker` (the daemon's, holding its
    liveness lock) owns the snapshots written here; `liveness` tells whether the
    owner of another open snapshot still runs (without it, only a claim that ran
    out or was let go is taken over).
    """
    me = worker or worker_id("scheduler")
    open_: dict[int, _Snapshot] = {}
    adopted_at = -ADOPT_EVERY
    loop = asyncio.get_running_loop()
    try:
        while not stop.is_set():
            try:
                progressed = await _queue_accepted(db, settings, stop, on_queued, me, open_)
                progressed |= await _advance(db, settings, stop, on_queued, me, open_)
                if loop.time() - adopted_at >= ADOPT_EVERY:
                    adopted_at = loop.time()
                    progressed |= await _adopt(db, settings, me, liveness, open_)
            except Exception:
                log.exception("unexpected error (will retry)")
                progressed = False
            if not progressed:  # more may be waiting; a post another daemon holds is not ours
                await _wait(wake, settings.delivery.poll_interval)
    finally:
        if open_:
            try:
                await asyncio.to_thread(_release, db, me)
                log.info("stopping: %d snapshots let go, to be resumed where they are", len(open_))
            except Exception:
                log.exception("could not let go of the open snapshots; they are resumed later")


async def _queue_accepted(
    db: Database,
    settings: Settings,
    stop: asyncio.Event,
    on_queued: Callable[[], None],
    me: str,
    open_: dict[int, _Snapshot],
) -> bool:
    post_ids = await asyncio.to_thread(_accepted, db)
    progressed = False
    deadline = time.monotonic() + START_SLICE
    for post_id in post_ids:
        if stop.is_set() or (progressed and open_ and time.monotonic() >= deadline):
            break
        started = time.perf_counter()
        queued = await asyncio.to_thread(prepare.start_post, db, settings, post_id, worker=me)
        if queued is None:
            continue
        progressed = True
        if queued.batches:
            on_queued()
        if not queued.done:
            open_[post_id] = _Snapshot(queued, started)
        log.debug("post %d started in %.3fs", post_id, time.perf_counter() - started)
    return progressed


async def _advance(
    db: Database,
    settings: Settings,
    stop: asyncio.Event,
    on_queued: Callable[[], None],
    me: str,
    open_: dict[int, _Snapshot],
) -> bool:
    """One chunk of every open snapshot."""
    progressed = False
    for post_id, snap in list(open_.items()):
        if stop.is_set():
            break
        chunk = await asyncio.to_thread(
            prepare.continue_post, db, settings, post_id, worker=me, skip=snap.queued.skip
        )
        progressed = True
        if chunk.lost:
            del open_[post_id]
            log.info(
                "post %d: snapshot stopped after %d recipients (cancelled, deleted or taken over)",
                post_id,
                snap.queued.recipients,
            )
            continue
        q = snap.queued
        snap.queued = q = prepare.Queued(
            q.post_id,
            q.list_address,
            q.mode,
            q.batches + chunk.batches,
            q.recipients + chunk.recipients,
            chunk.done,
            q.skip,
        )
        if chunk.batches:
            on_queued()
        if chunk.done:
            del open_[post_id]
            prepare.log_queued(q)
            log.debug(
                "post %d: snapshot %s in %.3fs",
                post_id,
                "resumed and finished" if snap.resumed else "written",
                time.perf_counter() - snap.started,
            )
    return progressed


async def _adopt(
    db: Database,
    settings: Settings,
    me: str,
    liveness: Liveness | None,
    open_: dict[int, _Snapshot],
) -> bool:
    """Take over the open snapshots whose owner is gone; True when one was."""
    lease = timedelta(seconds=settings.delivery.lease_seconds)
    alive = liveness.alive if liveness is not None else (lambda _owner: True)
    adopted = await asyncio.to_thread(_adopt_sync, db, me, lease, alive, set(open_))
    for queued in adopted:
        log.info(
            "post %d to %s: resuming its snapshot (its daemon stopped or died)",
            queued.post_id,
            queued.list_address,
        )
        open_[queued.post_id] = _Snapshot(queued, time.perf_counter(), resumed=True)
    return bool(adopted)


def _adopt_sync(
    db: Database,
    me: str,
    lease: timedelta,
    alive: Callable[[str], bool],
    mine: set[int],
) -> list[prepare.Queued]:
    with db.reading() as session:
        candidates = [p for p in posts.open_snapshots(session, but=me) if p not in mine]
    adopted = []
    for post_id in candidates:
        with db.session(durable=False) as session:
            if not posts.adopt_snapshot(session, post_id, worker=me, lease=lease, alive=alive):
                continue
            adopted.append(prepare.resumed(session, post_id))
    return adopted


def _release(db: Database, me: str) -> None:
    with db.session(durable=False) as session:
        posts.release_snapshots(session, worker=me)


def _accepted(db: Database) -> list[int]:
    with db.reading() as session:
        return posts.accepted_posts(session)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass
    event.clear()
