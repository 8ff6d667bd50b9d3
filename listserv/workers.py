"""Child processes of `listserv serve`: delivery workers (`--workers N`) and more
SMTP listeners (`--listeners N`).

One Python process sends with one core: SMTP framing, rendering and signing all
hold the interpreter lock. With N workers the front process keeps the SMTP
listener, the scheduler and the HTTP endpoint, and N child processes
(`listserv serve --delivery-only`) each run a delivery engine on the same queue,
exactly as N hosts would on one PostgreSQL database (leases, fencing and liveness
locks make them safe with each other).

The front wakes the workers when a post is queued by writing a byte to each
child's stdin; a worker whose stdin closes (its front is gone) stops. A worker
that exits unexpectedly is started again, after a pause that doubles up to a
minute so a worker failing at start-up does not spin.

Listeners (`listserv serve --listen-only`) are the same kind of child the other
way round: each takes SMTP sessions from the listening sockets the front bound
and passed down (every listener accepts from the one queue), and writes a byte to
its stdout when it accepted a post, so the front's scheduler starts on it at once
instead of at its next poll.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence

log = logging.getLogger("listserv.workers")

RESTART_PAUSE = 1.0
RESTART_PAUSE_MAX = 60.0


class WorkerPool:
    """`count` children running `argv`, started again when one exits; `kind` names
    them in the log; `on_output` is called each time a child writes to its stdout;
    `pass_fds` are descriptors the children inherit (listening sockets)."""

    def __init__(
        self,
        argv: Sequence[str],
        count: int,
        *,
        stop_timeout: float,
        kind: str = "delivery worker",
        on_output: Callable[[], None] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.argv = list(argv)
        self.count = count
        self.stop_timeout = stop_timeout
        self.kind = kind
        self.on_output = on_output
        self.pass_fds = tuple(pass_fds)
        self._procs: dict[int, asyncio.subprocess.Process] = {}

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values() if p.returncode is None]

    def wake(self) -> None:
        """New batches are due: tell every worker (a lost byte only costs a poll)."""
        for proc in self._procs.values():
            stdin = proc.stdin
            if stdin is None or stdin.is_closing():
                continue
            try:
                stdin.write(b"w")
            except (BrokenPipeError, ConnectionResetError):
                pass

    async def run(self, stop: asyncio.Event) -> None:
        """Start the workers and keep them running until `stop`; then stop them."""
        pauses = [RESTART_PAUSE] * self.count
        watchers = {i: asyncio.create_task(self._start(i)) for i in range(self.count)}
        stopping = asyncio.create_task(stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {stopping, *watchers.values()}, return_when=asyncio.FIRST_COMPLETED
                )
                if stopping in done:
                    return
                for index, task in list(watchers.items()):
                    if task not in done:
                        continue
                    code = task.result()
                    log.error(
                        "%s %d exited with status %s; starting it again in %.0f s",
                        self.kind,
                        index,
                        code,
                        pauses[index],
                    )
                    watchers[index] = asyncio.create_task(self._restart(index, pauses[index]))
                    pauses[index] = min(pauses[index] * 2, RESTART_PAUSE_MAX)
        finally:
            stopping.cancel()
            await self._stop_all()
            for task in watchers.values():
                task.cancel()
            await asyncio.gather(*watchers.values(), return_exceptions=True)

    async def _restart(self, index: int, pause: float) -> int:
        await asyncio.sleep(pause)
        return await self._start(index)

    async def _start(self, index: int) -> int:
        """Run worker `index` until it exits; returns its exit status."""
        proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE if self.on_output else None,
            pass_fds=self.pass_fds,
        )
        self._procs[index] = proc
        log.info("%s %d started (pid %d)", self.kind, index, proc.pid)
        if proc.stdout is not None and self.on_output is not None:
            while await proc.stdout.read(512):
                self.on_output()
        return await proc.wait()

    async def _stop_all(self) -> None:
        procs = [p for p in self._procs.values() if p.returncode is None]
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not procs:
            return
        waits = [asyncio.create_task(p.wait()) for p in procs]
        _, pending = await asyncio.wait(waits, timeout=self.stop_timeout)
        for proc in procs:
            if proc.returncode is None:
                log.error("%s pid %d did not stop in time: killed", self.kind, proc.pid)
                proc.kill()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
