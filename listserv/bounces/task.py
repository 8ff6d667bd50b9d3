"""The daemon's bounce loop: read stored bounce mail, then warn or unsubscribe the
members disabled for bounces whose interval is up, every poll_interval.

Each step is a storage verb taking `now`, so tests drive `run_once` with any
clock (months of warnings in a second); the loop only supplies the host's time.
Nothing is kept in memory between rounds: a restarted daemon picks up the mail
stored before it started, even before this code existed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from listserv.bounces import process, score
from listserv.config import Settings
from listserv.db import Database
from listserv.models import utcnow

log = logging.getLogger("listserv.bounces")

#: the slowest rhythm, whatever poll_interval says
MAX_INTERVAL = 5.0


async def run(
    db: Database, settings: Settings, *, stop: asyncio.Event, on_queued: Callable[[], None]
) -> None:
    """Until `stop`: one round every poll_interval (at most MAX_INTERVAL seconds).

    `on_queued` wakes the scheduler when a round stored notices or forwards."""
    interval = min(max(settings.delivery.poll_interval, 0.05), MAX_INTERVAL)
    while not stop.is_set():
        try:
            queued = await asyncio.to_thread(run_once, db, now=utcnow())
        except Exception:
            log.exception("bounce round failed (will retry)")
            queued = 0
        if queued:
            on_queued()
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass


def run_once(db: Database, *, now: datetime) -> int:
    """One round; returns how much it did (0: the scheduler need not wake)."""
    done = process.process_pending(db, now=now)
    while True:
        with db.session() as session:
            acted = score.step(session, now=now)
        done += acted
        if acted < score.STEP_BATCH:
            return done
