"""Politeness: shared token buckets per destination and over all, not a sleep per worker.

Where the limits are enforced, and why there. A batch is throttled when it is
*claimed*, inside the dispatcher's one transaction per round (`batches.claim`):
the buckets are read, the batches that fit are leased and their tokens taken, and
the buckets written back, all in that transaction. A batch that does not fit is
simply not claimed yet; no sender ever sleeps, and nothing is held that another
daemon could send. Because the buckets are rows (`throttle_buckets`) and not
memory, every daemon and `serve --workers N` process on the database shares them.
The alternative, leases of "send permits" checked by each sender, would add a
round trip per batch, which is what the dispatcher exists to avoid.

- **Rates** are token buckets on the database's clock: `rate` tokens a second, at
  most `burst` seconds' worth. A batch costs one message when shared and one per
  recipient when personalized (`recipient_rate` counts recipients either way). A
  full bucket lets a batch through even when it costs more than the bucket holds
  (the bucket goes negative and refills), so the rate holds on average over a
  batch and `[delivery] max_recipients_per_message` bounds the burst.
- **Concurrency** is counted from the leases themselves (batches of the domain
  leased and not expired), so a crashed daemon cannot leak a slot.
- **Keys**: a domain's bucket is its own, or its provider's for the aliases in
  `ALIASES` (googlemail.com shares gmail.com's). A batch mixing domains
  (`[delivery] mix_domains`) is throttled by its first recipient's domain, the
  batch's `domain`: the smarthost splits it by destination itself.
- **Adaptive**: a domain answering 421/451, or dropping the connection, gets its
  rate halved (down to 1/16), and a step of 1/8 back every `restore_after`
  seconds (additive increase). A domain with no rate of its own is slowed from
  `SLOW_BASE_RATE`. A domain refusing most recipients of a batch with 5xx is
  paused for `pause_for` seconds: its batches are not claimed meanwhile, other
  domains of the same post flow on. Each change is logged in one line.
- **Races**: every transaction that reads or writes buckets first locks the row
  keyed ``*messages`` (``FOR UPDATE`` on PostgreSQL; SQLite write transactions
  are serial anyway), and then waits for nothing else, so two daemons never
  spend the same tokens and no deadlock can involve it.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv.config import DomainLimit, ThrottleSettings
from listserv.distribute.results import RecipientResult
from listserv.models import RecipientState, ThrottleBucket

log = logging.getLogger("listserv.throttle")
TABLE = cast(sa.Table, ThrottleBucket.__table__)

#: the global message bucket's key; its row is the lock every throttle transaction takes
MESSAGES = "*messages"
RECIPIENTS = "*recipients"
GLOBAL = (MESSAGES, RECIPIENTS)

#: lowest share of a rate the adaptive slow-down goes to
MIN_FACTOR = 1 / 16
#: share of the rate given back each `restore_after` seconds
RESTORE_STEP = 1 / 8
#: messages/s a domain without a rate of its own is slowed from (halved: 5/s)
SLOW_BASE_RATE = 10.0
#: a second slow-down this soon (seconds) is the same incident: batches claimed at the
#: old rate are still answering
HOLD_OFF = 5.0
#: a batch "mostly refused": more than this share of its recipients got a 5xx ...
REFUSED_SHARE = 0.5
#: ... and at least this many (one unknown user in a batch of one is not the domain)
REFUSED_MIN = 3
#: replies that mean "slow down" (RFC 5321 4.2.2: 421 closing, 451 local error)
SLOW_CODES = frozenset({421, 451})
EPSILON = 1e-9
INFO, WARNING = logging.INFO, logging.WARNING

#: a change worth one log line: (logging level, the line)
Event = tuple[int, str]

#: Built-in limits for the large providers, per SMTP transaction to the smarthost.
#: Conservative figures from their bulk-sender guidance and from deferrals seen in
#: practice (Yahoo's TSS04, Microsoft's S3150, GMX/web.de's "too many connections");
#: `[throttle.domains."..."]` overrides any of them, `providers = false` drops them.
PROVIDERS: Mapping[str, DomainLimit] = {
    "gmail.com": DomainLimit(rate=20.0, concurrency=10),
    "outlook.com": DomainLimit(rate=10.0, concurrency=5),
    "yahoo.com": DomainLimit(rate=10.0, concurrency=5),
    "icloud.com": DomainLimit(rate=5.0, concurrency=4),
    "gmx.net": DomainLimit(rate=5.0, concurrency=3),
    "web.de": DomainLimit(rate=5.0, concurrency=3),
    "t-online.de": DomainLimit(rate=2.0, concurrency=2),
    "orange.fr": DomainLimit(rate=5.0, concurrency=3),
}
#: domains served by the same provider's servers share its bucket and slots
ALIASES: Mapping[str, str] = {
    "googlemail.com": "gmail.com",
    "hotmail.com": "outlook.com",
    "live.com": "outlook.com",
    "msn.com": "outlook.com",
    "hotmail.co.uk": "outlook.com",
    "hotmail.fr": "outlook.com",
    "hotmail.de": "outlook.com",
    "live.de": "outlook.com",
    "outlook.de": "outlook.com",
    "ymail.com": "yahoo.com",
    "rocketmail.com": "yahoo.com",
    "yahoo.co.uk": "yahoo.com",
    "yahoo.fr": "yahoo.com",
    "yahoo.de": "yahoo.com",
    "aol.com": "yahoo.com",
    "me.com": "icloud.com",
    "mac.com": "icloud.com",
    "gmx.de": "gmx.net",
    "gmx.com": "gmx.net",
    "gmx.at": "gmx.net",
    "gmx.ch": "gmx.net",
    "wanadoo.fr": "orange.fr",
}


@dataclass(slots=True)
class Bucket:
    """One row of `throttle_buckets`: what all daemons share about one key."""

    key: str
    tokens: float
    updated_at: datetime
    factor: float = 1.0
    changed_at: datetime | None = None
    paused_until: datetime | None = None
    note: str = ""
    stored: bool = False  # the row exists (else it is inserted)
    dirty: bool = False

    def level(self, rate: float, capacity: float, now: datetime) -> float:
        """Tokens at `now`, refilled at `rate` since `updated_at`, at most `capacity`."""
        elapsed = max(0.0, (now - self.updated_at).total_seconds())
        return min(capacity, self.tokens + rate * elapsed)


@dataclass(frozen=True, slots=True)
class Signal:
    """What a round of results says about a domain."""

    slow: str = ""  # the reply (or drop) that asks us to slow down
    refused: str = ""  # the 5xx that refused most of a batch


@dataclass(frozen=True, slots=True)
class Candidate:
    """A due batch the claim may lease, with what it would cost."""

    id: int
    domain: str
    messages: int
    recipients: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one claim's throttling: what to lease, and when to look again."""

    admitted: list[int]
    #: seconds until a bucket that stopped a candidate can pay for it (None: none did)
    retry_after: float | None


class Throttle:
    """The configured limits, and the arithmetic on buckets; holds no state of its own."""

    def __init__(self, settings: ThrottleSettings | None = None) -> None:
        self.settings = settings = settings or ThrottleSettings()
        limits: dict[str, DomainLimit] = dict(PROVIDERS) if settings.providers else {}
        self.aliases: dict[str, str] = dict(ALIASES) if settings.providers else {}
        for domain, limit in settings.domains.items():
            limits[domain] = limit
            self.aliases.pop(domain, None)  # configured on its own: its own bucket
        self.limits = limits
        self.default = DomainLimit(
            rate=settings.domain_rate, concurrency=settings.domain_concurrency
        )

    # -- keys and limits ------------------------------------------------------------

    def key(self, domain: str) -> str:
        domain = domain.lower()
        return self.aliases.get(domain, domain)

    def limit(self, key: str) -> DomainLimit:
        if key == MESSAGES:
            return DomainLimit(rate=self.settings.rate)
        if key == RECIPIENTS:
            return DomainLimit(rate=self.settings.recipient_rate)
        return self.limits.get(key, self.default)

    def domains_of(self, keys: Iterable[str]) -> list[str]:
        """Every domain name whose batches the keys throttle (the key and its aliases)."""
        wanted = set(keys)
        names = set(wanted) | {a for a, k in self.aliases.items() if k in wanted}
        return sorted(names)

    @property
    def limits_concurrency(self) -> bool:
        return self.default.concurrency > 0 or any(x.concurrency for x in self.limits.values())

    def concurrency_domains(self) -> list[str] | None:
        """Domains whose leases must be counted; None: all (a default concurrency is set)."""
        if self.default.concurrency > 0:
            return None
        return self.domains_of(k for k, x in self.limits.items() if x.concurrency)

    # -- bucket arithmetic -------------------------------------------------------------

    def restore(self, bucket: Bucket, now: datetime) -> Event | None:
        """Give back the additive steps due since the last change; the log line, if any."""
        if bucket.factor >= 1.0 or bucket.changed_at is None:
            return None
        every = self.settings.restore_after
        steps = math.floor((now - bucket.changed_at).total_seconds() / every)
        if steps <= 0:
            return None
        self._settle(bucket, now)
        bucket.factor = min(1.0, bucket.factor + steps * RESTORE_STEP)
        bucket.changed_at = bucket.changed_at + timedelta(seconds=steps * every)
        bucket.dirty = True
        if bucket.factor >= 1.0:
            bucket.note = ""
            return INFO, f"domain {bucket.key}: back to full rate ({self._describe(bucket)})"
        return INFO, f"domain {bucket.key}: rate raised to {self._describe(bucket)}"

    def rate(self, bucket: Bucket) -> float:
        """Tokens per second in force for the bucket's key (0: no limit)."""
        base = self.limit(bucket.key).rate
        if bucket.factor < 1.0 and bucket.key not in GLOBAL:
            base = base or SLOW_BASE_RATE
        return base * bucket.factor

    def capacity(self, rate: float) -> float:
        return max(1.0, rate * self.settings.burst)

    def _settle(self, bucket: Bucket, now: datetime) -> None:
        rate = self.rate(bucket)
        if rate > 0:
            bucket.tokens = bucket.level(rate, self.capacity(rate), now)
        bucket.updated_at = now
        bucket.dirty = True

    def _describe(self, bucket: Bucket) -> str:
        rate = self.rate(bucket)
        return f"{rate:g} messages/s, {bucket.factor:.0%} of its rate"

    def new_bucket(self, key: str, now: datetime) -> Bucket:
        """A key seen for the first time starts with a full bucket."""
        bucket = Bucket(key, 0.0, now, stored=False, dirty=True)
        rate = self.rate(bucket)
        bucket.tokens = self.capacity(rate) if rate > 0 else 0.0
        return bucket

    # -- adaptive --------------------------------------------------------------------

    def slow_down(self, bucket: Bucket, reason: str, now: datetime) -> Event | None:
        """Halve the key's rate (not twice for one incident); the log line, if any."""
        if bucket.changed_at is not None and bucket.factor < 1.0:
            if (now - bucket.changed_at).total_seconds() < HOLD_OFF:
                return None
        if bucket.factor <= MIN_FACTOR:
            bucket.changed_at = now  # still in trouble: restoring starts over
            bucket.dirty = True
            return None
        self._settle(bucket, now)
        bucket.factor = max(MIN_FACTOR, bucket.factor / 2)
        bucket.changed_at = now
        bucket.note = reason[:300]
        bucket.tokens = min(bucket.tokens, self.capacity(self.rate(bucket)))
        return (
            WARNING,
            f"domain {bucket.key}: {reason[:200]}; rate halved to {self._describe(bucket)}",
        )

    def pause(self, bucket: Bucket, reason: str, now: datetime) -> Event | None:
        until = now + timedelta(seconds=self.settings.pause_for)
        if bucket.paused_until is not None and bucket.paused_until >= now:
            return None  # already paused: the batches refusing now were claimed before
        bucket.paused_until = until
        bucket.note = reason[:300]
        bucket.dirty = True
        return (
            WARNING,
            f"domain {bucket.key}: {reason[:200]}; paused for {self.settings.pause_for:g} s"
            f" (until {until:%H:%M:%S}Z)",
        )

    # -- one claim ------------------------------------------------------------------------

    def blocked(
        self, buckets: dict[str, Bucket], in_flight: Mapping[str, int], now: datetime
    ) -> tuple[set[str], list[Event]]:
        """Keys that can take no batch now (paused, full, out of tokens), and log lines
        for the pauses and slow-downs that ended. `buckets` is updated in place."""
        events: list[Event] = []
        blocked: set[str] = set()
        for key, bucket in buckets.items():
            if bucket.paused_until is not None and bucket.paused_until <= now:
                bucket.paused_until = None
                bucket.dirty = True
                events.append((INFO, f"domain {key}: pause over, sending again"))
            if (line := self.restore(bucket, now)) is not None:
                events.append(line)
            if bucket.paused_until is not None:
                blocked.add(key)
                continue
            rate = self.rate(bucket)
            if rate > 0 and bucket.level(rate, self.capacity(rate), now) < 1.0 - EPSILON:
                blocked.add(key)
        for key, n in in_flight.items():
            limit = self.limit(key).concurrency
            if limit and n >= limit:
                blocked.add(key)
        return blocked, events

    def admit(
        self,
        candidates: Sequence[Candidate],
        buckets: dict[str, Bucket],
        in_flight: Mapping[str, int],
        limit: int,
        now: datetime,
    ) -> Decision:
        """Choose, in order, up to `limit` candidates that every bucket and slot allows,
        taking their tokens from `buckets` (keys seen for the first time are added)."""
        for key in GLOBAL:
            if key not in buckets and self.limit(key).rate > 0:
                buckets[key] = self.new_bucket(key, now)
        busy: dict[str, int] = defaultdict(int, in_flight)
        admitted: list[int] = []
        waits: list[float] = []
        for c in candidates:
            if len(admitted) >= limit:
                break
            if (wait := self.wait(buckets, GLOBAL, now)) is not None:
                waits.append(wait)  # out of global tokens: nothing else fits either
                break
            key = self.key(c.domain)
            limit_ = self.limit(key)
            if key not in buckets and limit_.rate > 0:
                buckets[key] = self.new_bucket(key, now)
            if limit_.concurrency and busy[key] >= limit_.concurrency:
                continue
            bucket = buckets.get(key)
            if bucket is not None and bucket.paused_until is not None:
                continue
            costs = [(MESSAGES, c.messages), (RECIPIENTS, c.recipients), (key, c.messages)]
            short = [
                w for k, cost in costs if (w := self._short(buckets, k, cost, now)) is not None
            ]
            if short:
                waits.append(max(short))
                continue
            for k, cost in costs:
                self._take(buckets, k, cost, now)
            busy[key] += 1
            admitted.append(c.id)
        return Decision(admitted, min(waits) if waits else None)

    def wait(
        self,
        buckets: Mapping[str, Bucket],
        keys: Iterable[str],
        now: datetime,
        *,
        first: bool = False,
    ) -> float | None:
        """Seconds until each of `keys` out of tokens has one again, or with `first`
        until the first of them has (None: none is out of tokens)."""
        waits = [w for k in keys if (w := self._short(buckets, k, 1, now)) is not None]
        if not waits:
            return None
        return min(waits) if first else max(waits)

    def _short(
        self, buckets: Mapping[str, Bucket], key: str, cost: int, now: datetime
    ) -> float | None:
        """None if the bucket can pay `cost` now, else seconds until it can."""
        bucket = buckets.get(key)
        if bucket is None:
            return None
        rate = self.rate(bucket)
        if rate <= 0:
            return None
        capacity = self.capacity(rate)
        need = min(float(cost), capacity)
        have = bucket.level(rate, capacity, now)
        if have >= need - EPSILON:
            return None
        return (need - have) / rate

    def _take(self, buckets: dict[str, Bucket], key: str, cost: int, now: datetime) -> None:
        bucket = buckets.get(key)
        if bucket is None:
            return
        rate = self.rate(bucket)
        if rate <= 0:
            return
        bucket.tokens = bucket.level(rate, self.capacity(rate), now) - cost
        bucket.updated_at = now
        bucket.dirty = True


def assess(reports: Iterable[tuple[str, int, Sequence[RecipientResult]]]) -> dict[str, Signal]:
    """Per domain, what (domain, batch size, results) say: slow down, or pause.

    A 421/451 reply, or a connection refused or dropped (a deferral without a reply),
    asks for a slow-down; more than half of a batch's recipients (and at least
    `REFUSED_MIN`) refused with 5xx pauses the domain.
    """
    signals: dict[str, Signal] = {}
    for domain, size, results in reports:
        slow = refused = ""
        failed: list[RecipientResult] = []
        for r in results:
            if r.outcome is RecipientState.DEFERRED:
                if r.code in SLOW_CODES:
                    slow = slow or f"answered {r.code} {' '.join(r.detail.split())}"
                elif r.code is None and not r.detail.startswith("internal error"):
                    slow = slow or " ".join(r.detail.split())
            elif r.outcome is RecipientState.FAILED and r.code is not None and r.code >= 500:
                failed.append(r)
        if len(failed) >= REFUSED_MIN and len(failed) > REFUSED_SHARE * size:
            first = failed[0]
            refused = (
                f"refused {len(failed)} of {size} recipients"
                f" ({first.code} {' '.join(first.detail.split())})"
            )
        if slow or refused:
            old = signals.get(domain, Signal())
            signals[domain] = Signal(old.slow or slow, old.refused or refused)
    return signals


# -- storage ---------------------------------------------------------------------------


def lock(session: Session) -> dict[str, Bucket]:
    """Lock the throttle (the ``*messages`` row) for this transaction; every bucket."""
    conn = session.connection()
    table = TABLE
    first = sa.select(table).where(table.c.key == MESSAGES)
    if session.get_bind().dialect.name == "postgresql":
        first = first.with_for_update()
    if conn.execute(first).first() is None:  # a database migrated without it
        insert = _insert_ignoring_conflicts(session)
        conn.execute(
            insert.values(
                key=MESSAGES,
                tokens=0.0,
                updated_at=sa.func.current_timestamp(),
                factor=1.0,
                note="",
            )
        )
        conn.execute(first)
    rows = conn.execute(sa.select(table)).all()
    return {row.key: _bucket_of(row) for row in rows}


def _insert_ignoring_conflicts(session: Session) -> sa.Insert:
    table = TABLE
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table).on_conflict_do_nothing(index_elements=["key"])
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table).on_conflict_do_nothing(index_elements=["key"])


def save(session: Session, throttle: Throttle, buckets: Mapping[str, Bucket]) -> None:
    """Write the buckets that changed; forget domains back to full speed with no limit."""
    conn = session.connection()
    table = TABLE
    inserts: list[dict[str, object]] = []
    updates: list[dict[str, object]] = []
    forget: list[str] = []
    for bucket in buckets.values():
        if not bucket.dirty:
            continue
        idle = (
            bucket.key not in GLOBAL
            and bucket.factor >= 1.0
            and bucket.paused_until is None
            and throttle.limit(bucket.key).rate <= 0
        )
        if idle:
            if bucket.stored:
                forget.append(bucket.key)
            continue
        values: dict[str, object] = {
            "k": bucket.key,
            "tokens": bucket.tokens,
            "updated_at": bucket.updated_at,
            "factor": bucket.factor,
            "changed_at": bucket.changed_at,
            "paused_until": bucket.paused_until,
            "note": bucket.note,
        }
        (updates if bucket.stored else inserts).append(values)
    if inserts:
        conn.execute(
            sa.insert(table).values(
                key=sa.bindparam("k"),
                **{c: sa.bindparam(c, type_=table.c[c].type) for c in _COLUMNS},
            ),
            inserts,
        )
    if updates:
        conn.execute(
            sa.update(table)
            .where(table.c.key == sa.bindparam("k"))
            .values(**{c: sa.bindparam(c, type_=table.c[c].type) for c in _COLUMNS}),
            updates,
        )
    if forget:
        conn.execute(sa.delete(table).where(table.c.key.in_(forget)))
    for bucket in buckets.values():
        bucket.dirty = False


_COLUMNS = ("tokens", "updated_at", "factor", "changed_at", "paused_until", "note")


def observe(
    session: Session,
    throttle: Throttle,
    reports: Iterable[tuple[str, int, Sequence[RecipientResult]]],
    now: datetime,
) -> list[Event]:
    """Slow down or pause the domains the results ask for; the log lines of the changes.

    Writes only when something asks for a change, so a quiet round costs nothing.
    """
    by_key: dict[str, Signal] = {}
    for domain, signal in assess(reports).items():
        key = throttle.key(domain)
        old = by_key.get(key, Signal())
        by_key[key] = Signal(old.slow or signal.slow, old.refused or signal.refused)
    if not by_key:
        return []
    buckets = lock(session)
    events: list[Event] = []
    for key, signal in sorted(by_key.items()):
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = throttle.new_bucket(key, now)
        if signal.refused and (line := throttle.pause(bucket, signal.refused, now)):
            events.append(line)
        elif signal.slow and (line := throttle.slow_down(bucket, signal.slow, now)):
            events.append(line)
    save(session, throttle, buckets)
    return events


def snapshot(session: Session, throttle: Throttle, now: datetime) -> list[Bucket]:
    """Domains slowed down or paused now, for `queue status` (read only, no lock)."""
    rows = session.scalars(sa.select(ThrottleBucket).order_by(ThrottleBucket.key)).all()
    shown: list[Bucket] = []
    for row in rows:
        bucket = _bucket_of(row)
        throttle.restore(bucket, now)
        if bucket.paused_until is not None and bucket.paused_until <= now:
            bucket = replace(bucket, paused_until=None)
        if bucket.factor < 1.0 or bucket.paused_until is not None:
            shown.append(bucket)
    return shown


def _bucket_of(row: Any) -> Bucket:
    """A stored bucket (a table row or a ThrottleBucket) as the throttle works on it."""
    return Bucket(
        row.key,
        row.tokens,
        row.updated_at,
        row.factor,
        row.changed_at,
        row.paused_until,
        row.note,
        stored=True,
    )
