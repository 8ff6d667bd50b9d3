"""A recording SMTP sink: the real peer that listserv's delivery is tested against.

The sink is an aiosmtpd ``SMTP`` protocol served by ``loop.create_server()`` in the caller's
event loop on ``127.0.0.1`` port 0, never the threaded ``Controller``. Faults are scripted on
the sink (a reply, a dropped connection, a delay), so the code under test runs unpatched::

    async with Sink() as sink:
        sink.script("RCPT", "451 4.3.0 try later", match="bob@")
        ...  # deliver to sink.host:sink.port
        await sink.wait_for_recipients(2)

Hooks run when aiosmtpd hands a command over: MAIL and RCPT on the command line, DATA once
the whole message has arrived (so a DATA fault answers, delays or drops the final reply,
after the client has sent the body). DATA-START faults act on the DATA command line itself,
before the 354 (so the client never sends the body).

The sink advertises PIPELINING (RFC 2920) unless made with ``pipelining=False``: aiosmtpd
reads one command line at a time and answers each in order, so it serves pipelined clients
as they are. ``reads`` keeps every chunk of bytes it read from the network, to show whether
commands arrived together or one at a time.

Run as a script, it is a counting-only sink for benchmarks (nothing is stored)::

    python tests/sink.py --port 0 --ready-file /tmp/sink.port

It prints ``{"recipients": N, "messages": M, "first": t0, "last": t1}`` on SIGTERM or SIGINT,
where ``first`` and ``last`` are the ``time.time()`` of the first and last accepted DATA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP as SMTP_POLICY
from typing import Any, Literal, NoReturn

from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = ["Received", "Sink"]

DATA_SIZE_LIMIT = 64 * 1024 * 1024
COMMANDS = frozenset({"MAIL", "RCPT", "DATA", "DATA-START"})


@dataclass
class Received:
    """One accepted transaction, as it crossed the wire."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str] = field(default_factory=list)
    helo: str = ""  # the client's EHLO/HELO name
    tls: bool = False  # whether the session was under STARTTLS when DATA arrived

    def message(self) -> EmailMessage:
        """Parse ``data`` with ``email.policy.SMTP``; ``data`` stays the record."""
        msg = BytesParser(policy=SMTP_POLICY).parsebytes(self.data)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class _Fault:
    """A scripted deviation for the next ``remaining`` matching commands (-1: forever)."""

    command: str
    action: Literal["reply", "disconnect", "delay"]
    remaining: int
    match: str | None = None
    reply: str = ""
    seconds: float = 0.0
    release: asyncio.Event | None = None  # a "delay" that lasts until this is set

    def applies(self, subjects: list[str]) -> bool:
        return self.match is None or any(self.match in s for s in subjects)


class _Session(SMTP):
    """aiosmtpd's protocol, tracked so that ``Sink.stop()`` can close live connections."""

    def __init__(self, sink: Sink) -> None:
        options: dict[str, Any] = {
            "hostname": "sink.test",  # default socket.getfqdn() can do a DNS lookup per connection
            "data_size_limit": DATA_SIZE_LIMIT,
            "enable_SMTPUTF8": True,
            **sink.smtp_options,
        }
        super().__init__(sink, loop=asyncio.get_running_loop(), **options)
        self._sink = sink

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._sink._sessions.add(self)
        task = self._handler_coroutine
        if task is not None:
            self._sink._tasks.add(task)
            task.add_done_callback(self._sink._tasks.discard)

    def connection_lost(self, error: Exception | None) -> None:
        self._sink._sessions.discard(self)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        if self._sink.record:
            self._sink.reads.append(data)
        super().data_received(data)

    async def smtp_DATA(self, arg: str) -> None:
        """Run DATA-START faults when the DATA command line arrives, before aiosmtpd's 354."""
        assert self.envelope is not None
        reply = None
        if any(f.command == "DATA-START" for f in self._sink._faults):  # counters stay as they were
            reply = await self._sink._apply_faults(self, "DATA-START", list(self.envelope.rcpt_tos))
        if reply is not None:
            self._sink._note("DATA", reply)
            await self.push(reply)
            return
        await super().smtp_DATA(arg)


class Sink:
    """An SMTP server on loopback that records what it accepts and misbehaves on request.

    It is also the aiosmtpd handler: ``handle_MAIL``, ``handle_RCPT`` and ``handle_DATA`` are
    its hooks. With ``record=False`` only counts and timestamps are kept (for benchmarks).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        record: bool = True,
        pipelining: bool = True,
        **smtp_options: Any,
    ) -> None:
        """``smtp_options`` go to aiosmtpd's ``SMTP`` (``tls_context``, ``authenticator``,
        ``enable_SMTPUTF8=False``, ...), to make a sink that needs STARTTLS or AUTH."""
        self.host = host
        self.port = port
        self.record = record
        self.pipelining = pipelining
        self.smtp_options = smtp_options
        self.reads: list[bytes] = []  # every chunk read from any client, in order
        self.received: list[Received] = []
        self.counters: Counter[str] = Counter()
        self.transcript: list[tuple[str, str]] = []  # (command, reply) of each hook call
        self.accepted_recipients = 0
        self.accepted_messages = 0
        self.first_accepted: float | None = None
        self.last_accepted: float | None = None
        self._faults: list[_Fault] = []
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on ``host``:``port``; afterwards ``port`` is the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Session(self), self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, drop live connections and wait for their session tasks to end."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        # Each transport's connection_lost() cancels its session task; awaiting them here
        # means no task is left pending when the caller closes the loop. A session whose
        # STARTTLS handshake failed never hears of connection_lost() (asyncio's SSL layer
        # keeps it from the protocol), so its task is cancelled here instead.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> Sink:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- scripting ---------------------------------------------------------------------------

    def script(self, command: str, reply: str, *, times: int = 1, match: str | None = None) -> None:
        """Answer the next ``times`` matching ``command``s with ``reply`` instead of accepting.

        ``match`` is a substring of the MAIL or RCPT address (for DATA and DATA-START: of any
        accepted recipient).
        """
        self._add(_Fault(_command(command), "reply", _times(times), match, reply=reply))

    def disconnect_after(self, command: str, *, times: int = 1, match: str | None = None) -> None:
        """Drop the TCP connection, without a reply, when ``command`` arrives."""
        self._add(_Fault(_command(command), "disconnect", _times(times), match))

    def delay(
        self, command: str, seconds: float, *, times: int = 1, match: str | None = None
    ) -> None:
        """Wait ``seconds`` before handling ``command`` (and any scripted fault for it)."""
        self._add(_Fault(_command(command), "delay", _times(times), match, seconds=seconds))

    def hold(self, command: str, *, times: int = 1, match: str | None = None) -> asyncio.Event:
        """Hold ``command`` unanswered until the returned event is set (a delay with no clock)."""
        release = asyncio.Event()
        self._add(_Fault(_command(command), "delay", _times(times), match, release=release))
        return release

    def _add(self, fault: _Fault) -> None:
        self._faults.append(fault)

    # -- inspection --------------------------------------------------------------------------

    def recipients(self) -> list[str]:
        """Every recipient of every recorded message, in the order they were accepted."""
        return [rcpt for received in self.received for rcpt in received.rcpt_tos]

    async def wait_for_recipients(self, n: int, timeout: float = 10.0) -> None:
        """Return once ``n`` recipients have been accepted with their message's DATA."""
        await self._wait_for(lambda: self.accepted_recipients, n, "recipients", timeout)

    async def wait_for_messages(self, n: int, timeout: float = 10.0) -> None:
        """Return once ``n`` messages have been accepted."""
        await self._wait_for(lambda: self.accepted_messages, n, "messages", timeout)

    async def _wait_for(self, count: Callable[[], int], n: int, what: str, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: count() >= n)
        except TimeoutError:
            raise TimeoutError(
                f"sink: {count()} of {n} {what} arrived within {timeout}s"
                f" (counters {dict(self.counters)})"
            ) from None

    # -- aiosmtpd hooks ----------------------------------------------------------------------

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """aiosmtpd's own keywords, plus PIPELINING unless the sink was made without it."""
        session.host_name = hostname  # this hook's contract: aiosmtpd leaves it to us
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Accept the sender unless scripted; a hook that answers must set the envelope."""
        reply = await self._apply_faults(server, "MAIL", [address])
        if reply is None:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            reply = "250 OK"
        self._note(f"MAIL FROM:<{address}>", reply)
        return reply

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Accept the recipient unless scripted; only accepted ones join ``rcpt_tos``."""
        reply = await self._apply_faults(server, "RCPT", [address])
        if reply is None:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            reply = "250 OK"
        self._note(f"RCPT TO:<{address}>", reply)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the transaction unless scripted; count it and wake waiters."""
        reply = await self._apply_faults(server, "DATA", envelope.rcpt_tos)
        if reply is not None:
            self._note("DATA", reply)
            return reply
        now = time.time()
        if self.first_accepted is None:
            self.first_accepted = now
        self.last_accepted = now
        self.accepted_messages += 1
        self.accepted_recipients += len(envelope.rcpt_tos)
        if self.record:
            assert envelope.mail_from is not None
            assert envelope.original_content is not None
            self.received.append(
                Received(
                    mail_from=envelope.mail_from,
                    rcpt_tos=list(envelope.rcpt_tos),
                    data=envelope.original_content,
                    mail_options=list(envelope.mail_options),
                    helo=str(session.host_name or ""),
                    tls=session.ssl is not None,
                )
            )
        reply = f"250 2.0.0 OK queued as {self.accepted_messages}"
        self._note("DATA", reply)
        async with self._changed:
            self._changed.notify_all()
        return reply

    def _note(self, command: str, reply: str) -> None:
        if self.record:
            self.transcript.append((command, reply))

    async def _apply_faults(self, server: SMTP, command: str, subjects: list[str]) -> str | None:
        """Count ``command``, run its due faults; return a scripted reply or None to accept."""
        self.counters[command] += 1
        delays: list[_Fault] = []
        final: _Fault | None = None
        for fault in self._faults:
            if fault.command != command or not fault.applies(subjects):
                continue
            if fault.action == "delay":
                delays.append(fault)
            elif final is None:
                final = fault
        for used in [*delays, final]:
            if used is not None and used.remaining > 0:
                used.remaining -= 1
        self._faults = [f for f in self._faults if f.remaining != 0]
        for delay in delays:
            if delay.release is not None:
                await delay.release.wait()
            else:
                await asyncio.sleep(delay.seconds)
        if final is None:
            return None
        if final.action == "disconnect":
            await _drop(server)
        return final.reply


async def _drop(server: SMTP) -> NoReturn:
    """Close the connection and park until connection_lost() cancels this session's task.

    Returning would make aiosmtpd push a reply onto the closing transport; being cancelled
    ends the session through its own CancelledError path, with nothing logged as an error.
    """
    assert server.transport is not None
    server.transport.close()
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable: the session task is cancelled")


def _command(command: str) -> str:
    command = command.upper()
    if command not in COMMANDS:
        raise ValueError(f"can only script {sorted(COMMANDS)}, not {command!r}")
    return command


def _times(times: int) -> int:
    if times == 0 or times < -1:
        raise ValueError(f"times must be a positive count or -1 (forever), not {times}")
    return times


# -- counting-only sink for benchmarks -------------------------------------------------------


async def run_forever(host: str, port: int, ready_file: str | None) -> dict[str, object]:
    """Serve a counting-only sink until SIGTERM or SIGINT; return its tally."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with Sink(host, port, record=False) as sink:
        if ready_file is not None:
            # Write then rename, so a reader never sees a partial port number.
            tmp = f"{ready_file}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{sink.port}\n")
            os.replace(tmp, ready_file)
        await stop.wait()
    return {
        "recipients": sink.accepted_recipients,
        "messages": sink.accepted_messages,
        "first": sink.first_accepted,
        "last": sink.last_accepted,
    }


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: ``python tests/sink.py --port N [--ready-file PATH]``."""
    parser = argparse.ArgumentParser(description="Counting-only SMTP sink for benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--ready-file", help="write the bound port here once listening")
    args = parser.parse_args(argv)
    tally = asyncio.run(run_forever(args.host, args.port, args.ready_file))
    print(json.dumps(tally), flush=True)


if __name__ == "__main__":
    main()
