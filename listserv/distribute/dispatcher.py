"""The one task of a daemon that talks to the queue for its senders.

Each round (two thread hops; recording, looking and leasing each in a short
transaction of its own, see `_record`) records every result the senders
produced since the last one, retires or reschedules the batches they finished,
hands back what a stop left unstarted, renews the leases still held, frees the
leases of dead workers, and leases enough new batches to keep each connection
busy with one batch in hand and three waiting. Per-batch round trips cost
milliseconds each while the loop is busy with SMTP; in bulk, 10,000 members over
200 domains went from 3.2 s to 1.3 s. One waiting was not enough once a round
waits for SQLite's write lock: 100,000 members over 1,000 domains (batches of
100) took 4.6 s with two workers, 3.1-3.2 s with three waiting; and a 200-member
post sent during a 100,000-member one went out 0.22-0.23 s after its 250 instead
of 0.52-0.63 s.

Results are recorded as they come, not only when a batch ends, so a kill -9 in
the middle of a personalized batch re-sends only the messages of the last round.
A kill -9 re-sends at most the batches this worker held, LEASED_PER_CONNECTION per
connection: when a round is slow (a busy machine, a wait for the write lock) the
senders may finish all of them before it records a result. A test killing a
snapshot mid-way saw 5 shared batches of 10 come twice over 2 connections.
A batch whose renewal comes back short, or whose lease may have run out because
renewals failed, is no longer ours: its sender stops and its results are dropped
(`batches.record` only writes for the holder of the claim).

Throttling (distribute/throttle.py) lives in the same round: the claim takes only
what the shared buckets allow, and the round's results slow down or pause the
domains that answered 421/451, dropped the connection or refused a batch. When the
buckets are empty the dispatcher waits until the next token, not the poll interval.
Every second it asks whether the posts of the batches it holds were paused or
cancelled (`queue pause`/`cancel`); their batches not yet started are handed back,
and a sender stops a personalized batch between two messages (`holds` turns false).
The same question about the posts whose batches ended tells which posts this
worker is done with (sent, cancelled, paused or gone): `on_done` is called for
each, so their prepared bytes leave the cache at once (issue 15: memory).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from listserv.config import DeliverySettings
from listserv.db import Database, db_now
from listserv.distribute import batches
from listserv.distribute import throttle as throttling
from listserv.distribute.batches import Claim, ClaimedBatch, End, Report
from listserv.distribute.liveness import Liveness
from listserv.distribute.results import RecipientResult
from listserv.distribute.throttle import Event, Throttle
from listserv.models import BatchState, RecipientState

log = logging.getLogger("listserv.dispatcher")

#: how often the leases of other workers are checked for a dead owner (seconds)
LIVENESS_EVERY = 5.0
#: how often the posts of the batches held are checked for a pause or cancel (seconds)
HALT_CHECK_EVERY = 1.0
#: batches leased per connection: one in hand, three waiting (see the module docstring).
#: It also bounds what a kill -9 re-sends: at most this many batches per connection.
LEASED_PER_CONNECTION = 4


@dataclass(eq=False)
class InFlight:
    """A leased batch on its way through a sender."""

    batch: ClaimedBatch
    #: loop time after which the lease may have run out (unless renewed before)
    deadline: float
    results: list[RecipientResult] = field(default_factory=list)
    recorded: int = 0  # how many of `results` went to the dispatcher
    end: End | None = None
    lost: bool = False  # taken over by another worker: stop, results are dropped
    halted: bool = False  # its post was paused or cancelled: stop, results are recorded


class Dispatcher:
    def __init__(
        self,
        db: Database,
        settings: DeliverySettings,
        *,
        worker: str,
        liveness: Liveness,
        stop: asyncio.Event,
        throttle: Throttle | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.throttle = throttle
        self.worker = worker
        self.liveness = liveness
        self.stop = stop
        self.outbox: asyncio.Queue[InFlight | None] = asyncio.Queue()
        self.wake = asyncio.Event()
        self.lease = timedelta(seconds=settings.lease_seconds)
        # stop sending a batch a little before its lease could run out
        self.margin = min(settings.lease_seconds / 10, 10.0)
        self._held: dict[int, InFlight] = {}  # leased by us: in the outbox or in a sender
        self._dirty: list[InFlight] = []  # with results or an end not yet recorded
        self._unrecorded: list[Report] = []  # a round that failed, to write again
        self._ending: dict[int, InFlight] = {}  # batch id -> item, for the end-of-batch log
        self._ended: set[int] = set()  # posts with a batch ended since the last check
        #: called with a post this worker holds no batch of and is done with
        self.on_done: Callable[[int], None] | None = None

    # -- called by senders (on the loop) --------------------------------------------

    def holds(self, item: InFlight) -> bool:
        loop = asyncio.get_running_loop()
        return not item.lost and not item.halted and loop.time() < item.deadline

    def progress(self, item: InFlight) -> None:
        """`item` has new results (or an end): record them in the next round."""
        self._dirty.append(item)
        self.wake.set()

    def finish(self, item: InFlight, end: End) -> None:
        item.end = end
        self.progress(item)

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        renew_every = self.settings.lease_seconds / 3
        slots = LEASED_PER_CONNECTION * self.settings.max_connections
        renewed = checked = halt_checked = loop.time()
        retry_after: float | None = None
        await self._free_dead()
        while True:
            stopping = self.stop.is_set()
            if stopping:
                self._hand_back_unstarted()
            reports = self._unrecorded + self._collect()
            self._unrecorded = []
            want = 0 if stopping else slots - len(self._held)
            renew: list[ClaimedBatch] = []
            if loop.time() - renewed >= renew_every:
                renew = [i.batch for i in self._held.values() if i.end is None and not i.lost]
            if not stopping and loop.time() - checked >= LIVENESS_EVERY:
                checked = loop.time()
                await self._free_dead()
            check: set[int] = set()
            if (self._held or self._ended) and loop.time() - halt_checked >= HALT_CHECK_EVERY:
                check = {i.batch.post_id for i in self._held.values() if not i.halted}
                check |= self._ended
            claimed: list[ClaimedBatch] = []
            started = loop.time()
            if reports or renew:
                try:
                    states, still, events = await asyncio.to_thread(self._record, reports, renew)
                except Exception:
                    log.exception("could not reach the queue (will retry)")
                    self._unrecorded = reports
                    await asyncio.sleep(self.settings.poll_interval)
                    continue
                self._log_events(events)
                self._after(reports, states)  # logged as soon as it is recorded
                if renew:
                    renewed = started
                    self._renewed(renew, still, started)
            if want <= 0:
                retry_after = None  # no token to wait for: nothing to lease
            if want > 0 or check:
                halted, claim = await asyncio.to_thread(self._look_and_lease, want, check)
                self._log_events(claim.events)
                if check and halted is not None:
                    halt_checked = started
                    self._halt(halted)
                    self._done_with(halted & self._ended)
                    self._ended -= check
                claimed, retry_after = claim.batches, claim.retry_after
                deadline = started + self.settings.lease_seconds - self.margin
                for batch in claimed:
                    item = InFlight(batch, deadline)
                    self._held[batch.id] = item
                    self.outbox.put_nowait(item)
            if stopping and not self._held and not self._dirty and not self._unrecorded:
                for _ in range(self.settings.max_connections):
                    self.outbox.put_nowait(None)
                return
            if not claimed and not self._dirty:
                wait = min(self.settings.poll_interval, renew_every)
                if retry_after is not None:  # throttled: look again when a token is due
                    wait = max(0.01, min(wait, retry_after))
                await _wait(self.wake, wait)

    def _hand_back_unstarted(self) -> None:
        while not self.outbox.empty():
            item = self.outbox.get_nowait()
            if item is not None:
                self.finish(item, End.HANDED_BACK)

    def _collect(self) -> list[Report]:
        dirty, self._dirty = self._dirty, []
        reports: list[Report] = []
        for item in dict.fromkeys(dirty):
            new = item.results[item.recorded :]
            item.recorded = len(item.results)
            if item.end is None and not new:
                continue
            left = batches.open_after(item.batch, item.results) if item.end is End.DONE else 0
            reports.append(Report(item.batch, tuple(new), item.end, left))
            if item.end is not None:
                self._held.pop(item.batch.id, None)
                self._ending[item.batch.id] = item
                self._ended.add(item.batch.post_id)
        return reports

    def _halt(self, halted: set[int]) -> None:
        """Stop the batches of posts paused or cancelled: those not yet started go back
        now, a sender stops a personalized one between two messages."""
        if not halted:
            return
        stopped: dict[int, int] = {}
        for item in self._held.values():
            if item.batch.post_id in halted and not item.halted:
                item.halted = True
                stopped[item.batch.post_id] = stopped.get(item.batch.post_id, 0) + 1
        waiting: list[InFlight | None] = []
        while not self.outbox.empty():
            waiting.append(self.outbox.get_nowait())
        for queued in waiting:
            if queued is not None and queued.halted:
                self.finish(queued, End.HANDED_BACK)
            else:
                self.outbox.put_nowait(queued)
        for post_id, n in sorted(stopped.items()):
            log.info(
                "post %d: paused or cancelled; %d batches in hand stop before their next"
                " message, what they sent is recorded",
                post_id,
                n,
                extra={"event": "post_halted", "post_id": post_id},
            )

    def _done_with(self, post_ids: set[int]) -> None:
        """Tell `on_done` about the halted posts none of whose batches are held here."""
        if self.on_done is None or not post_ids:
            return
        held = {i.batch.post_id for i in self._held.values()}
        for post_id in sorted(post_ids - held):
            self.on_done(post_id)

    # -- the round's transactions (in a thread) -----------------------------------------
    #
    # Recording, looking and leasing each take a transaction of their own: on SQLite
    # every write transaction holds the one write lock, and mail waiting for its 250
    # waits for the transaction in progress. Together they held it 12 ms at the
    # median, 25-85 ms at worst, with 100 clients posting during a fan-out (issue 15);
    # apart, each about half. Results are logged between the two thread hops, as soon
    # as they are recorded.

    def _record(
        self, reports: list[Report], renew: list[ClaimedBatch]
    ) -> tuple[list[BatchState | None], set[int], list[Event]]:
        """Renew leases, record results and let the throttle see them; raises, and its
        reports are written again, only if this transaction failed."""
        events: list[Event] = []
        with self.db.session(durable=False) as session:
            still = batches.renew_leases(session, renew, worker=self.worker, lease=self.lease)
            states = batches.record(session, reports, worker=self.worker, policy=self.settings)
            if self.throttle is not None and any(r.results for r in reports):
                events = throttling.observe(
                    session,
                    self.throttle,
                    [(r.batch.domain, len(r.batch.recipients), r.results) for r in reports],
                    db_now(session),
                )
        return states, still, events

    def _look_and_lease(self, want: int, check: set[int]) -> tuple[set[int] | None, Claim]:
        """Which of the posts `check` were paused or cancelled (None: could not look),
        and up to `want` batches leased; a failure is logged and tried next round."""
        halted: set[int] | None = set()
        if check:
            try:
                with self.db.reading() as session:
                    halted = batches.halted(session, check)
            except Exception:
                log.exception("could not check for paused or cancelled posts (will retry)")
                halted = None
        claim = Claim([])
        if want > 0:
            try:
                with self.db.session(durable=False) as session:
                    claim = batches.claim(
                        session,
                        worker=self.worker,
                        lease=self.lease,
                        limit=want,
                        throttle=self.throttle,
                    )
            except Exception:
                log.exception("could not lease batches (will retry)")
        return halted, claim

    @staticmethod
    def _log_events(events: Sequence[Event]) -> None:
        for level, line in events:
            log.log(level, "%s", line, extra={"event": "throttle"})

    def _renewed(self, renew: list[ClaimedBatch], still: set[int], started: float) -> None:
        """Move the deadlines of the batches still ours; stop those that are not."""
        for batch in renew:
            item = self._held.get(batch.id)
            if item is None:
                continue
            if batch.id in still:
                item.deadline = started + self.settings.lease_seconds - self.margin
            elif not item.lost:
                item.lost = True
                log.warning(
                    "post %d batch %d: lease taken over by another worker; stopped sending it",
                    batch.post_id,
                    batch.id,
                )

    def _after(self, reports: list[Report], states: list[BatchState | None]) -> None:
        for report, state in zip(reports, states, strict=True):
            batch = report.batch
            if state is None:
                item = self._held.get(batch.id)
                if item is not None and not item.lost:
                    item.lost = True
                log.warning(
                    "post %d batch %d: no longer held by this worker (taken over after its"
                    " lease ran out); dropped %d results",
                    batch.post_id,
                    batch.id,
                    len(report.results),
                )
                continue
            item = self._ending.pop(batch.id, None) if report.end is not None else None
            _log_results(report, state, item.results if item else report.results)

    async def _free_dead(self) -> None:
        try:
            freed = await asyncio.to_thread(self._free_dead_sync)
        except Exception:
            log.exception("could not check for dead workers' leases (will retry)")
            return
        if freed:
            log.info("freed %d batches leased by workers that no longer run", freed)
            self.wake.set()

    def _free_dead_sync(self) -> int:
        self.liveness.check()
        with self.db.session(durable=False) as session:
            retired = batches.retire_cancelled(session)
            if retired:
                log.info("finished %d batches of cancelled posts that came back", retired)
            return batches.release_dead_leases(session, alive=self.liveness.alive, me=self.worker)


def _log_results(report: Report, state: BatchState, every: Sequence[RecipientResult]) -> None:
    """One line per recipient that failed or was deferred by a reply, one per batch end
    (summing `every` result of the batch)."""
    batch = report.batch
    addresses = dict(batch.recipients)
    for r in report.results:
        if r.outcome is RecipientState.DELIVERED or r.code is None:
            continue
        log.log(
            logging.WARNING if r.outcome is RecipientState.FAILED else logging.INFO,
            "post %d batch %d: %s %s: %s %s",
            batch.post_id,
            batch.id,
            addresses.get(r.delivery_id, "?"),
            r.outcome.value,
            r.code,
            " ".join(r.detail.split()),
        )
    if report.end is None:
        return
    counts: dict[str, int] = {}
    for r in every:
        counts[r.outcome.value] = counts.get(r.outcome.value, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing sent"
    unreplied = {
        r.detail for r in every if r.code is None and r.outcome is not RecipientState.DELIVERED
    }
    level = logging.WARNING if counts.get("failed") or counts.get("deferred") else logging.INFO
    log.log(
        level,
        "post %d batch %d (%s, attempt %d): %s; batch %s%s",
        batch.post_id,
        batch.id,
        batch.domain,
        batch.attempts,
        summary,
        report.end.value if report.end is End.HANDED_BACK else state.value,
        f" ({'; '.join(sorted(unreplied))[:300]})" if unreplied else "",
    )


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass
    event.clear()
