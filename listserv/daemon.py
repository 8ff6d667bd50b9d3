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
import os
import secrets
import socket
import sys
from collections.abc import Callable, Sequence
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

#: makes the pool of SMTP listener processes serving the listening sockets with these
#: descriptors; each child's stdout bytes (a post it accepted) call the second argument
ListenerPool = Callable[[list[int], Callable[[], None]], WorkerPool]


class Daemon:
    """role "all": one process does everything; "front": SMTP, HTTP and scheduler,
    with `workers` (a WorkerPool) delivering; "delivery": a worker of such a pool;
    "listener": SMTP sessions only, on `listen_fds`, the sockets of an "all" or
    "front" daemon whose `listeners(fds, on_accepted)` made a pool of them; that
    daemon then takes no SMTP sessions itself."""

    def __init__(
        self,
        settings: Settings,
        db: Database | None = None,
        *,
        role: Literal["all", "front", "delivery", "listener"] = "all",
        workers: WorkerPool | None = None,
        listeners: ListenerPool | None = None,
        listen_fds: Sequence[int] = (),
    ) -> None:
        if (role == "front") != (workers is not None):
            raise ValueError("a front daemon, and only it, has a worker pool")
        if listeners is not None and role not in ("all", "front"):
            raise ValueError("only a daemon with the scheduler starts more listeners")
        self.settings = settings
        self.role = role
        self.workers = workers
        self.listeners = listeners
        self.listen_fds = list(listen_fds)
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
        if self.role == "listener":
            await self._listen_only()
            return
        engine = DeliveryEngine(self.db, s, worker=self.worker, liveness=liveness, stop=self._stop)
        self.engine = engine
        if self.role == "delivery":
            await self._deliver_only(engine)
            return
        on_queued = engine.wake if self.workers is None else self.workers.wake
        authenticator = await asyncio.to_thread(Authenticator.from_settings, s)
        # SMTP sessions here, or in listener processes on the port this process holds
        server: InboundServer | None = None
        port: asyncio.Server | None = None
        listeners: WorkerPool | None = None
        if self.listeners is None:
            server = await InboundServer.start(
                self.db,
                s.server,
                on_accepted=self._posts_waiting.set,
                policy=s.policy,
                authenticator=authenticator,
            )
            self.smtp_port = server.port
        else:
            port = await InboundServer.bind(s.server)
            self.smtp_port = port.sockets[0].getsockname()[1]
            fds = [sock.fileno() for sock in port.sockets]
            listeners = self.listeners(fds, self._posts_waiting.set)
        runner: web.AppRunner | None = None
        try:
            if s.http.enabled:
                runner = web.AppRunner(http.make_app(self.db), access_log=None)
                await runner.setup()
                site = web.TCPSite(runner, s.http.host, s.http.port)
                await site.start()
                self.http_port = runner.addresses[0][1]
            log.info(
                "listening for SMTP on %s:%d%s%s; delivering via %s:%d with %d connections"
                " as worker %s",
                s.server.host,
                self.smtp_port,
                f" in {listeners.count} processes" if listeners else "",
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
                if listeners is not None:
                    group.create_task(listeners.run(self._stop))
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
                if server is not None:  # idle sessions get 421; a storing one its reply
                    server.close()
                if port is not None:  # the listeners close theirs as they stop
                    port.close()
                self._posts_waiting.set()
        finally:
            if server is not None:
                await server.drain(INBOUND_DRAIN)
            if port is not None:  # its listeners have stopped
                port.close()
                await port.wait_closed()
            if runner is not None:
                await runner.cleanup()

    async def _deliver_only(self, engine: DeliveryEngine) -> None:
        """A worker of `serve --workers N`: its front wakes it through stdin."""
        front = await self._watch_front(engine.wake)
        log.info("delivery worker %s: delivering via %s:%d", self.worker, *self._smarthost())
        self.ready.set()
        try:
            await engine.run()
        finally:
            front.cancel()

    async def _listen_only(self) -> None:
        """A listener of `serve --listeners N`: SMTP sessions on the front's sockets.

        Each accepted post is a byte on stdout: the front's scheduler starts on it
        at once. A byte that cannot be written (the pipe is full, the front gone)
        only costs the scheduler's next poll.
        """
        s = self.settings
        out = sys.stdout.fileno()
        os.set_blocking(out, False)

        def accepted() -> None:
            try:
                os.write(out, b"a")
            except (BlockingIOError, BrokenPipeError):
                pass

        authenticator = await asyncio.to_thread(Authenticator.from_settings, s)
        server = await InboundServer.start(
            self.db,
            s.server,
            on_accepted=accepted,
            policy=s.policy,
            authenticator=authenticator,
            sockets=[socket.socket(fileno=fd) for fd in self.listen_fds],
        )
        front = await self._watch_front(lambda: None)
        try:
            self.smtp_port = server.port
            log.info("SMTP listener: listening on %s:%d", s.server.host, self.smtp_port)
            self.ready.set()
            await self._stop.wait()
        finally:
            front.cancel()
            await server.drain(INBOUND_DRAIN)

    async def _watch_front(self, on_byte: Callable[[], None]) -> asyncio.Task[None]:
        """Read the front's bytes on stdin (`on_byte` each time); stop when it closes.
        Cancel the task returned to stop watching."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
        )

        async def watch() -> None:
            try:
                while await reader.read(512):
                    on_byte()
                log.info("the front process is gone: stopping")
                self.stop()
            finally:
                transport.close()

        return asyncio.create_task(watch())

    def _smarthost(self) -> tuple[str, int]:
        return self.settings.delivery.host, self.settings.delivery.port
