"""The daemon's subscriptions loop: read stored request, join and leave mail, every
poll_interval (at most MAX_INTERVAL seconds).

Each round is a storage verb taking `now` (`run_once`), so tests drive the same
code with any clock. Nothing is kept in memory between rounds: a restarted
daemon answers whatever waits in the database, including requests stored before
it started. Replies to confirmation addresses are read by the moderation loop,
which hands subscription tokens to confirm.py (moderation/replies.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from listserv import inbound as inbound_mail
from listserv.config import Settings
from listserv.db import Database
from listserv.models import utcnow
from listserv.pipeline.auth import Authenticator
from listserv.subscriptions import confirm, requests

log = logging.getLogger("listserv.subscriptions")

#: the slowest rhythm, whatever poll_interval says
MAX_INTERVAL = 5.0


async def run(
    db: Database,
    settings: Settings,
    *,
    stop: asyncio.Event,
    on_queued: Callable[[], None],
    authenticator: Authenticator | None = None,
) -> None:
    """Until `stop`: one round every poll_interval; `on_queued` wakes the scheduler
    when a round stored mail to send."""
    interval = min(max(settings.delivery.poll_interval, 0.05), MAX_INTERVAL)
    while not stop.is_set():
        try:
            done = await asyncio.to_thread(run_once, db, now=utcnow(), authenticator=authenticator)
        except Exception:
            log.exception("subscriptions round failed (will retry)")
            done = 0
        if done:
            on_queued()
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass


def run_once(
    db: Database,
    *,
    now: datetime,
    authenticator: Authenticator | None = None,
    per_hour: int = confirm.PER_HOUR,
) -> int:
    """One round: every stored request, in batches; returns how many were processed."""
    done = 0
    while True:
        n = requests.process_pending(db, now=now, authenticator=authenticator, per_hour=per_hour)
        done += n
        if n < inbound_mail.BATCH:
            return done
