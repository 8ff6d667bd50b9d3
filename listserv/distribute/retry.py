"""When to try a deferred batch again: exponential backoff, then give up."""

from __future__ import annotations

from datetime import datetime, timedelta

from listserv.config import DeliverySettings


def next_attempt(
    attempts: int, first_queued: datetime, now: datetime, policy: DeliverySettings
) -> datetime | None:
    """The time of the next try after `attempts` tries, or None once the message is too old."""
    if (now - first_queued).total_seconds() >= policy.retry_give_up_after:
        return None
    delay = policy.retry_initial * policy.retry_factor ** max(attempts - 1, 0)
    delay = min(delay, policy.retry_max_interval)
    return now + timedelta(seconds=delay)
