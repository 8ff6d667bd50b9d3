"""The daemon: wiring only. SMTP listener, post scheduler, delivery engine and HTTP
endpoint share one event loop; blocking work (database, rendering, signing) runs
in threads.

`Daemon.run()` returns after `stop()` (SIGTERM/SIGINT in `listserv serve`): the
listener closes first (sessions storing a message get their reply, idle ones a
421), the delivery engine stops as distribute/engine.py describes, and the
daemon's liveness lock is let go last.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
from typing import Literal

from aiohttp import web

from listserv import http, memory, reports, sync
from listserv.bounces import task as bounce_task
from listserv.config import Settings
from listserv.db import Database
from listserv.distribute import scheduler
from listserv.distribute.engine import DeliveryEngine
from listserv.distribute.liveness import Liveness, worker_id
from listserv.moderation import task as moderation
from listserv.pipeline.auth import Authenticator
from listserv.smtp_in.server import InboundServer
from listserv.subscriptions import task as subscriptions
from listserv.workers import WorkerPool

log = logging.getLogger("listserv.daemon")

#: how long a stop waits for inbound sessions storing a message (seconds)
INBOUND_DRAIN = 30.0


class Daemon:
    """role "all": one process does everything; "front": SMTP, HTTP and scheduler,
    with `workers` (a WorkerPool) delivering; "delivery": a worker of such a pool."""

    def __init__(
        self,
        settings: Settings,
        db: Database | None = None,
        *,
        role: Literal["all", "front", "delivery"] = "all",
        workers: WorkerPool | None = None,
    ) -> None:
        if (role == "front") != (workers is not None):
            raise ValueError("a front daemon, and only it, has a worker pool")
        self.settings = settings
        self.role = role
        self.workers = workers
        self.db = db or Database(settings.database.url, echo=settings.database.echo)
        self.ready = asyncio.Event()
        self.smtp_port: int = 0
        self.http_port: int = 0
        #: the lease owner of this daemon's batches: host:pid:tag
        self.worker = worker_id(f"d{secrets.token_hex(3)}")
        self._stop = asyncio.Event()
        self._posts_waiting = asyncio.Event()
        #: this process's delivery engine, once running (tests look at its cache)
        self.engine: DeliveryEngine | None = None

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        memory.configure()  # large posts' memory goes back to the system when freed
        await asyncio.to_thread(self.db.check_ready)
        liveness = Liveness(self.db)
        await asyncio.to_thread(liveness.hold, self.worker)
        try:
            await self._run(liveness)
        finally:
            liveness.close()
            self.db.dispose()
            log.info("stopped")

    async def _run(self, liveness: Liveness) -> None:
        s = self.settings
        engine = DeliveryEngine(self.db, s, worker=self.worker, liveness=liveness, stop=self._stop)
        self.engine = engine
        if self.role == "delivery":
            await self._deliver_only(engine)
            return
        on_queued = engine.wake if self.workers is None else self.workers.wake
        authenticator = await asyncio.to_thread(Authenticator.from_settings, s)
        server = await InboundServer.start(
            self.db,
            s.server,
            on_accepted=self._posts_waiting.set,
            policy=s.policy,
            authenticator=authenticator,
        )
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
                "listening for SMTP on %s:%d%s; delivering via %s:%d with %d connections"
                " as worker %s",
                s.server.host,
                self.smtp_port,
                f", HTTP on {s.http.host}:{self.http_port}" if runner else "",
                s.delivery.host,
                s.delivery.port,
                s.delivery.max_connections,
                self.worker
                if self.workers is None
                else f"in {self.workers.count} delivery processes",
            )
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    scheduler.run(
                        self.db,
                        s,
                        wake=self._posts_waiting,
                        stop=self._stop,
                        on_queued=on_queued,
                        worker=self.worker,
                        liveness=liveness,
                    )
                )
                if self.workers is None:
                    group.create_task(engine.run())
                else:
                    group.create_task(self.workers.run(self._stop))
                # holds: announce, read moderators' replies, expire, remind
                group.create_task(
                    moderation.run(
                        self.db,
                        s,
                        stop=self._stop,
                        on_queued=self._posts_waiting.set,
                        authenticator=authenticator,
                    )
                )
                group.create_task(sync.run(self.db, s, stop=self._stop))  # [[sync]] entries
                group.create_task(
                    reports.run(self.db, s, stop=self._stop, on_queued=self._posts_waiting.set)
                )
                # bounces: read bounce mail, score, warn, unsubscribe
                group.create_task(
                    bounce_task.run(self.db, s, stop=self._stop, on_queued=self._posts_waiting.set)
                )
                # request, join and leave mail: confirmations, owners' commands
                group.create_task(
                    subscriptions.run(
                        self.db,
                        s,
                        stop=self._stop,
                        on_queued=self._posts_waiting.set,
                        authenticator=authenticator,
                    )
                )
                self.ready.set()
                await self._stop.wait()
                log.info("shutting down: no new mail accepted, finishing what is in hand")
                server.close()  # idle sessions get 421; one storing a message gets its reply
                self._posts_waiting.set()
        finally:
            await server.drain(INBOUND_DRAIN)
            if runner is not None:
                await runner.cleanup()

    async def _deliver_only(self, engine: DeliveryEngine) -> None:
        """A worker of `serve --workers N`: its front wakes it through stdin."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
        )

        async def listen() -> None:
            while await reader.read(512):
                engine.wake()
            log.info("the front process is gone: stopping")
            self.stop()

        log.info("delivery worker %s: delivering via %s:%d", self.worker, *self._smarthost())
        listener = asyncio.create_task(listen())
        self.ready.set()
        try:
            await engine.run()
        finally:
            listener.cancel()
            transport.close()

    def _smarthost(self) -> tuple[str, int]:
        return self.settings.delivery.host, self.settings.delivery.port
