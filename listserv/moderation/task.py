"""The daemon's moderation loop: expire, announce, read replies, remind, every poll_interval.

Each step is a storage verb taking `now`, so tests drive the same code with any
clock; the loop only supplies the host's time and the rhythm. Nothing is kept in
memory between rounds (but the posts whose announcement failed, to log them once):
a restarted daemon picks up whatever the database says is waiting, including
mail and holds stored before it started.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo

from listserv.config import Settings
from listserv.db import Database
from listserv.models import utcnow
from listserv.moderation import holds, replies
from listserv.pipeline.auth import Authenticator

log = logging.getLogger("listserv.moderation")

#: the slowest rhythm, whatever poll_interval says: a moderator waits at most this
MAX_INTERVAL = 5.0


async def run(
    db: Database,
    settings: Settings,
    *,
    stop: asyncio.Event,
    on_queued: Callable[[], None],
    authenticator: Authenticator | None = None,
) -> None:
    """Until `stop`: one round every poll_interval (at most MAX_INTERVAL seconds).

    `on_queued` wakes the scheduler when a round stored notices or approved posts.
    """
    interval = min(max(settings.delivery.poll_interval, 0.05), MAX_INTERVAL)
    skip: set[int] = set()
    while not stop.is_set():
        try:
            queued = await asyncio.to_thread(
                run_once,
                db,
                now=utcnow(),
                skip=skip,
                authenticator=authenticator,
                tz=settings.policy.zone(),
            )
        except Exception:
            log.exception("moderation round failed (will retry)")
            queued = 0
        if queued:
            on_queued()
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass


def run_once(
    db: Database,
    *,
    now: datetime,
    skip: set[int] | None = None,
    authenticator: Authenticator | None = None,
    tz: tzinfo = UTC,
) -> int:
    """One round; returns how much was queued or decided (0: the scheduler need not wake).

    Expiry comes before announcing, so a hold older than its expiry (the daemon
    was down) is discarded and its sender told, not announced for nothing.
    """
    skip = set() if skip is None else skip
    done = 0
    with db.session() as session:
        done += holds.expire(session, now=now)
    while True:
        with db.session() as session:
            announced = holds.announce(session, now=now, skip=skip)
        done += announced
        if announced < holds.ANNOUNCE_BATCH:
            break
    done += replies.process_pending(db, now=now, authenticator=authenticator, tz=tz)
    with db.session() as session:
        done += holds.remind(session, now=now)
    return done
