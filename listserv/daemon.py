"""The daemon: SMTP listener, post scheduler, delivery dispatcher and senders, and the
HTTP endpoint, in one event loop.

`Daemon.run()` returns after `stop()` (SIGTERM/SIGINT in `listserv serve`): the
listener closes first, leased but unstarted batches go back to the queue, senders
finish the batch in hand for up to SHUTDOWN_TIMEOUT seconds, and a batch still in
hand after that is handed back untouched. Blocking work (database, rendering,
signing) runs in threads.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta

from aiohttp import web

from listserv import http
from listserv.config import Settings
from listserv.db import Database
from listserv.distribute import dkim, prepare, queue, sender
from listserv.distribute.queue import ClaimedBatch, RecipientResult
from listserv.models import BatchState, DeliveryMode, MailingList, RecipientState
from listserv.smtp_in.server import InboundServer

log = logging.getLogger("listserv.daemon")

SHUTDOWN_TIMEOUT = 30.0


class Daemon:
    def __init__(self, settings: Settings, db: Database | None = None) -> None:
        self.settings = settings
        self.db = db or Database(settings.database.url, echo=settings.database.echo)
        self.ready = asyncio.Event()
        self.smtp_port: int = 0
        self.http_port: int = 0
        #: the lease owner of this daemon's batches: host:pid:tag
        self.worker = queue.worker_id(f"d{secrets.token_hex(3)}")
        self._stop = asyncio.Event()
        self._posts_waiting = asyncio.Event()
        self._dispatch = asyncio.Event()
        self._outbox: asyncio.Queue[ClaimedBatch | None] = asyncio.Queue()
        self._finished: list[tuple[ClaimedBatch, list[RecipientResult]]] = []
        self._in_flight = 0
        self._cache: OrderedDict[int, _Prepared] = OrderedDict()

    def stop(self) -> None:
        self._stop.set()

    def _wake_scheduler(self) -> None:
        self._posts_waiting.set()

    async def run(self) -> None:
        await asyncio.to_thread(self.db.check_ready)
        freed = await asyncio.to_thread(self._release_dead_leases)
        if freed:
            log.info("resumed %d batches left in flight by a previous run", freed)
        s = self.settings
        server = await InboundServer.start(self.db, s.server, on_accepted=self._wake_scheduler)
        runner: web.AppRunner | None = None
        try:
            self.smtp_port = server.port
            if s.http.enabled:
                runner = web.AppRunner(http.make_app(self.db), access_log=None)
                await runner.setup()
                site = web.TCPSite(runner, s.http.host, s.http.port)
                await site.start()
                self.http_port = runner.addresses[0][1]
            log.info(
                "listening for SMTP on %s:%d%s; delivering via %s:%d with %d connections",
                s.server.host,
                self.smtp_port,
                f", HTTP on {s.http.host}:{self.http_port}" if runner else "",
                s.delivery.host,
                s.delivery.port,
                s.delivery.max_connections,
            )
            await self._serve_until_stopped(server)
        finally:
            # idle sessions get 421; a message being stored gets its reply first
            await server.drain(SHUTDOWN_TIMEOUT)
            if runner is not None:
                await runner.cleanup()
            self.db.dispose()
            log.info("stopped")

    async def _serve_until_stopped(self, server: InboundServer) -> None:
        tasks: list[asyncio.Task[None]] = []
        async with asyncio.TaskGroup() as group:
            tasks.append(group.create_task(self._scheduler()))
            tasks.append(group.create_task(self._dispatcher()))
            for i in range(self.settings.delivery.max_connections):
                tasks.append(group.create_task(self._sender(i)))
            self.ready.set()
            await self._stop.wait()
            log.info("shutting down: no new mail accepted, finishing batches in hand")
            server.close()
            self._posts_waiting.set()
            self._dispatch.set()
            _done, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_TIMEOUT)
            for task in pending:
                task.cancel()

    # -- scheduler: accepted posts -> batches ---------------------------------------

    async def _scheduler(self) -> None:
        while not self._stop.is_set():
            with _logged("scheduler"):
                post_ids = await asyncio.to_thread(self._accepted_posts)
                progressed = False
                for post_id in post_ids:
                    if self._stop.is_set():
                        return
                    started = time.perf_counter()
                    batches = await asyncio.to_thread(
                        prepare.queue_post, self.db, self.settings, post_id
                    )
                    progressed |= batches is not None
                    if batches:
                        log.debug("post %d queued in %.3fs", post_id, time.perf_counter() - started)
                        self._dispatch.set()
                if progressed:
                    continue  # more may be waiting; a post another daemon holds is not ours
            await _wait(self._posts_waiting, self.settings.delivery.poll_interval)

    def _accepted_posts(self) -> list[int]:
        with self.db.reading() as session:
            return queue.accepted_posts(session)

    def _release_dead_leases(self) -> int:
        with self.db.session() as session:
            return queue.release_dead_local_leases(session)

    # -- dispatcher and senders: batches -> SMTP ------------------------------------

    async def _dispatcher(self) -> None:
        """The one place that talks to the queue for the senders.

        Each round trip to the database records every batch finished since the
        last one and leases enough new batches to keep each connection busy with
        one in hand and one waiting: a thread hop and a commit per round, not per
        batch. It renews the leases it holds well before they run out, so a slow
        smarthost never lets a batch in hand look abandoned. On stop it hands
        unstarted batches back and records the last results.
        """
        worker = self.worker
        lease = timedelta(seconds=self.settings.delivery.lease_seconds)
        renew_every = self.settings.delivery.lease_seconds / 3
        slots = 2 * self.settings.delivery.max_connections
        held: set[int] = set()  # leased by us, not yet recorded or handed back
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            stopping = self._stop.is_set()
            unstarted: list[ClaimedBatch] = []
            if stopping:
                while not self._outbox.empty():
                    batch = self._outbox.get_nowait()
                    if batch is not None:
                        unstarted.append(batch)
            finished, self._finished = self._finished, []
            want = 0 if stopping else slots - self._outbox.qsize() - self._in_flight
            renew = held and loop.time() - renewed >= renew_every
            claimed: list[ClaimedBatch] = []
            if finished or unstarted or want > 0 or renew:
                closed = {b.id for b, _ in finished} | {b.id for b in unstarted}
                try:
                    claimed = await asyncio.to_thread(
                        self._record_and_claim,
                        finished,
                        unstarted,
                        sorted(held - closed) if renew else [],
                        worker,
                        lease,
                        want,
                    )
                except Exception:
                    log.exception("dispatcher: could not reach the queue (will retry)")
                    self._finished[:0] = finished
                    for batch in unstarted:
                        self._outbox.put_nowait(batch)
                    await asyncio.sleep(self.settings.delivery.poll_interval)
                    continue
                held -= closed
                held.update(b.id for b in claimed)
                if renew:
                    renewed = loop.time()
            for batch in claimed:
                self._outbox.put_nowait(batch)
            if stopping and self._in_flight == 0 and not self._finished:
                for _ in range(self.settings.delivery.max_connections):
                    self._outbox.put_nowait(None)
                return
            if not claimed and not self._finished:
                await _wait(self._dispatch, min(self.settings.delivery.poll_interval, renew_every))

    def _record_and_claim(
        self,
        finished: list[tuple[ClaimedBatch, list[RecipientResult]]],
        unstarted: list[ClaimedBatch],
        renew: list[int],
        worker: str,
        lease: timedelta,
        want: int,
    ) -> list[ClaimedBatch]:
        claimed: list[ClaimedBatch] = []
        with self.db.session(durable=False) as session:
            if renew:
                queue.renew_leases(session, renew, worker=worker, lease=lease)
            states = queue.complete_batches(session, finished, self.settings.delivery)
            for batch in unstarted:
                queue.release(session, batch.id, worker)
            if want > 0:
                claimed = queue.claim_batches(session, worker=worker, lease=lease, limit=want)
        for (batch, results), state in zip(finished, states, strict=True):
            _log_batch(batch, results, state)
        return claimed

    async def _sender(self, index: int) -> None:
        """One SMTP connection: send the batches the dispatcher leased, report the results."""
        conn = sender.Connection(self.settings.delivery, self.settings.server.hostname)
        try:
            while (batch := await self._outbox.get()) is not None:
                self._in_flight += 1
                try:
                    results = await self._deliver(conn, batch)
                except asyncio.CancelledError:
                    self._release(batch.id)
                    raise
                except Exception as exc:
                    log.exception("post %d batch %d: internal error", batch.post_id, batch.id)
                    detail = f"internal error: {exc}"
                    results = [
                        RecipientResult(rid, RecipientState.DEFERRED, None, detail)
                        for rid, _ in batch.recipients
                    ]
                finally:
                    self._in_flight -= 1
                self._finished.append((batch, results))
                self._dispatch.set()
        finally:
            await conn.close()

    def _release(self, batch_id: int) -> None:
        with self.db.session(durable=False) as session:
            queue.release(session, batch_id, self.worker)

    async def _deliver(self, conn: sender.Connection, batch: ClaimedBatch) -> list[RecipientResult]:
        ready = self._cache.get(batch.post_id)
        if ready is None:
            ready = await asyncio.to_thread(self._load_prepared, batch)
            self._cache[batch.post_id] = ready
            while len(self._cache) > 8:
                self._cache.popitem(last=False)
        self._cache.move_to_end(batch.post_id)
        if not batch.recipients:
            return []
        if ready.view is None:  # shared: one signed message for the whole batch
            return await sender.send(conn, batch.envelope_from, batch.recipients, ready.message)
        addrs = [a for _, a in batch.recipients]
        rendered = await asyncio.to_thread(
            prepare.personalize, ready.message, ready.view, addrs, ready.signer
        )
        results: list[RecipientResult] = []
        for recipient, data in zip(batch.recipients, rendered, strict=True):
            results.extend(await sender.send(conn, batch.envelope_from, [recipient], data))
        return results

    def _load_prepared(self, batch: ClaimedBatch) -> _Prepared:
        with self.db.reading() as session:
            data = queue.prepared_message(session, batch.post_id)
            mlist = session.get(MailingList, batch.list_id)
        if batch.delivery_mode is DeliveryMode.SHARED or mlist is None:
            return _Prepared(data)
        view = prepare.ListView.of(mlist)
        return _Prepared(data, view, prepare.signer_for(self.settings.keys_dir, view.domain))


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A post as the senders need it, cached per post: bytes to send, or a template
    with what personalizing it takes (list view, signer)."""

    message: bytes
    view: prepare.ListView | None = None
    signer: dkim.Signer | None = None


def _log_batch(batch: ClaimedBatch, results: list[RecipientResult], state: BatchState) -> None:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome.value] = counts.get(r.outcome.value, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    level = logging.INFO if counts.get("delivered") == len(results) else logging.WARNING
    log.log(
        level,
        "post %d batch %d (%s, attempt %d): %s; batch %s",
        batch.post_id,
        batch.id,
        batch.domain,
        batch.attempts,
        summary,
        state.value,
    )


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass
    event.clear()


class _logged:
    """Log and swallow an unexpected error in a loop iteration: the daemon keeps running."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if exc is not None and isinstance(exc, Exception):
            log.exception("%s: unexpected error (will retry)", self.where)
            return True
        return False
