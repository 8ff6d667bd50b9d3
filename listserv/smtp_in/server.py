"""The inbound SMTP listener: aiosmtpd sessions with limits, and a clean stop.

Unbounded, aiosmtpd kept 4,000 idle connections open and a client sending one
byte every 5 seconds for as long as it liked. Here every session is bounded:
connections in all and per client IP (refused with 421 at connect), an idle
timeout, a deadline for DATA and one for the whole session, and a command cap.

`InboundServer.close()` stops listening and tells idle sessions 421; a session
whose message has arrived and is being stored keeps going until its reply is
out, then is closed too. `drain()` waits for that, so no client whose message
was committed is left without its 250.

This leans on aiosmtpd 1.4 internals, each named where used: the timer
(`_reset_timeout`/`_timeout_cb`) and the command table (`_smtp_methods`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, syntax

from listserv import replies
from listserv.config import PolicySettings, ServerSettings
from listserv.db import Database
from listserv.pipeline.auth import Authenticator
from listserv.replies import Reply
from listserv.smtp_in.handler import InboundHandler

log = logging.getLogger("listserv.smtp")

#: aiosmtpd's own reply to a line over its limit (push() gives it its enhanced code)
_LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"

#: seconds between two log lines about refused connections (a flood logs a count)
REFUSAL_LOG_INTERVAL = 10.0

#: `<dot-atom@ASCII-domain>`, the path nearly every MAIL and RCPT carries
_SIMPLE_PATH = re.compile(
    r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>"
)


def simple_path(arg: str) -> tuple[str, str] | None:
    """(address, rest) of a plain `<local@domain> PARAMS` path, as aiosmtpd's
    `_getaddr` would give them; None for anything else (quoted local parts,
    comments, UTF-8, the null path), which aiosmtpd's parser then reads.

    aiosmtpd reads every path with the email package's RFC 5322 header parser:
    about 4 % of the daemon's CPU at 100 clients, for two addresses a message."""
    match = _SIMPLE_PATH.match(arg)
    if match is None:
        return None
    rest = arg[match.end() :].lstrip(" \t")
    if rest.startswith("("):  # a comment: the parser's to skip
        return None
    return match.group(1), rest


class InboundServer:
    """The listener and its sessions: connection caps, `close()` and `drain()`."""

    def __init__(self, handler: InboundHandler, settings: ServerSettings) -> None:
        self.handler = handler
        self.settings = settings
        self._servers: list[asyncio.Server] = []
        self._sessions: set[ListservSMTP] = set()
        self._per_ip: Counter[str] = Counter()
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        self._closing = False
        self._refused = 0
        self._refusal_logged_at = float("-inf")

    @classmethod
    async def start(
        cls,
        db: Database,
        settings: ServerSettings,
        *,
        on_accepted: Callable[[], None] = lambda: None,
        policy: PolicySettings | None = None,
        authenticator: Authenticator | None = None,
        sockets: Sequence[socket.socket] = (),
    ) -> InboundServer:
        """Listen on settings.host:port (port 0: any free port, see `port`), or take
        sessions on `sockets`, listening already (`bind`, in a parent process)."""
        inbound = cls(
            InboundHandler(
                db,
                on_accepted=on_accepted,
                policy=policy,
                authenticator=authenticator,
            ),
            settings,
        )
        loop = asyncio.get_running_loop()
        if sockets:
            for sock in sockets:
                inbound._servers.append(
                    await loop.create_server(lambda: ListservSMTP(inbound), sock=sock)
                )
        else:
            inbound._servers.append(
                await loop.create_server(
                    lambda: ListservSMTP(inbound), settings.host, settings.port
                )
            )
        return inbound

    @staticmethod
    async def bind(settings: ServerSettings) -> asyncio.Server:
        """Listen on settings.host:port without taking connections: for listener
        processes (`start(sockets=...)`) to take them from these sockets. Every
        process then accepts from one queue, and no other daemon can share the port."""
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            asyncio.Protocol, settings.host, settings.port, start_serving=False
        )

    @property
    def port(self) -> int:
        port: int = self._servers[0].sockets[0].getsockname()[1]
        return port

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def close(self) -> None:
        """Stop listening; idle sessions get "421 4.3.2" now, a storing one after its reply."""
        if self._closing:
            return
        self._closing = True
        for server in self._servers:
            server.close()
        if self._sessions:
            log.info("closing %d SMTP sessions", len(self._sessions))
        for session in list(self._sessions):
            session.shut(replies.SHUTTING_DOWN)

    async def drain(self, timeout: float) -> None:
        """Close, then wait up to `timeout` seconds for the sessions to end; abort the rest."""
        self.close()
        try:
            await asyncio.wait_for(self._no_sessions.wait(), timeout)
        except TimeoutError:
            log.warning("%d SMTP sessions still open after %.0fs: aborted", self.sessions, timeout)
            for session in list(self._sessions):
                session.abort()
        for server in self._servers:
            await server.wait_closed()
        self.handler.close()

    def admit(self, session: ListservSMTP, ip: str) -> Reply | None:
        """Register a new connection, or the 421 that refuses it."""
        refusal: Reply | None = None
        if self._closing:
            refusal = replies.SHUTTING_DOWN
        elif len(self._sessions) >= self.settings.max_connections:
            refusal = replies.TOO_MANY_CONNECTIONS
        elif self._per_ip[ip] >= self.settings.max_connections_per_ip:
            refusal = replies.TOO_MANY_FROM_YOU
        if refusal is not None:
            self._log_refusal(ip, refusal)
            return refusal
        self._sessions.add(session)
        self._per_ip[ip] += 1
        self._no_sessions.clear()
        return None

    def release(self, session: ListservSMTP, ip: str) -> None:
        if session not in self._sessions:
            return
        self._sessions.discard(session)
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]
        if not self._sessions:
            self._no_sessions.set()

    def _log_refusal(self, ip: str, refusal: Reply) -> None:
        self._refused += 1
        now = asyncio.get_running_loop().time()
        if now - self._refusal_logged_at < REFUSAL_LOG_INTERVAL:
            return
        log.warning(
            "refused %d connection(s) (the last from %s): %s; %d sessions open",
            self._refused,
            ip,
            refusal,
            len(self._sessions),
        )
        self._refused = 0
        self._refusal_logged_at = now


class ListservSMTP(SMTP):
    """aiosmtpd's SMTP session with listserv's limits and enhanced codes on its own refusals."""

    def __init__(self, server: InboundServer) -> None:
        s = server.settings
        super().__init__(
            server.handler,
            hostname=s.hostname,
            ident="listserv",
            data_size_limit=s.max_message_size,
            enable_SMTPUTF8=True,
            # aiosmtpd's timer: restarted by each command; smtp_DATA sets the DATA deadline
            timeout=s.idle_timeout,
        )
        self.server = server
        self.ip = ""
        self._admitted = False
        self._commands = 0
        self._in_data = False
        self._close_after_reply: Reply | None = None
        self._deadline: asyncio.TimerHandle | None = None
        # aiosmtpd dispatches each command through this table: count them on the way.
        self._smtp_methods = {
            name: self._counted(method) for name, method in self._smtp_methods.items()
        }

    # -- connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # a new connection (not a STARTTLS upgrade)
            peer = transport.get_extra_info("peername")
            self.ip = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "")
            refusal = self.server.admit(self, self.ip)
            if refusal is not None:
                # Before aiosmtpd sets anything up: no greeting, just the 421 (RFC 5321 3.1).
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(f"{refusal}\r\n".encode("ascii"))
                transport.close()
                return
            self._admitted = True
            self._deadline = self.loop.call_later(
                self.server.settings.session_timeout, self.shut, replies.SESSION_TIMEOUT
            )
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return
        if self._deadline is not None:
            self._deadline.cancel()
        self.server.release(self, self.ip)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if not self._admitted:
            return False
        result: bool | None = super().eof_received()
        return result

    # -- closing ------------------------------------------------------------------

    def shut(self, reply: Reply) -> None:
        """Say `reply` (a 421) and close; a message being stored gets its own reply first."""
        if self._storing():
            self._close_after_reply = self._close_after_reply or reply
            return
        self._say_and_close(reply)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    def _storing(self) -> bool:
        """True while the DATA hook runs: aiosmtpd sets original_content just before it."""
        return (
            self._in_data
            and self.envelope is not None
            and self.envelope.original_content is not None
        )

    def _say_and_close(self, reply: Reply) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        log.info("%s: %s", self.ip, reply)
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(f"{reply}\r\n".encode("ascii"))
        transport.close()

    def _timeout_cb(self) -> None:
        # aiosmtpd calls this when its timer runs out; it would close without a word.
        self.shut(replies.DATA_TIMEOUT if self._in_data else replies.IDLE_TIMEOUT)

    # -- commands -----------------------------------------------------------------

    def _counted(
        self, method: Callable[[Any], Awaitable[None]]
    ) -> Callable[[Any], Awaitable[None]]:
        @functools.wraps(method)  # keeps aiosmtpd's @syntax attributes for HELP
        async def counted(arg: Any) -> None:
            self._commands += 1
            if self._commands > self.server.settings.max_commands:
                self.shut(replies.TOO_MANY_COMMANDS)
                return
            await method(arg)

        return counted

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd 1.4 internal: MAIL and RCPT parse their path here
        simple = None if self.local_part_limit else simple_path(arg)
        if simple is None:
            found: tuple[str | None, str | None] = super()._getaddr(arg)
            return found
        return simple

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        self._in_data = True
        self._reset_timeout(self.server.settings.data_timeout)
        try:
            await self._data(arg)
        finally:
            self._in_data = False
        if self._close_after_reply is not None:
            self._say_and_close(self._close_after_reply)
        else:
            self._reset_timeout()  # idle again from the reply on, not from DATA

    async def _data(self, arg: str) -> None:
        """aiosmtpd 1.4's smtp_DATA, keeping the message in one bytearray as it comes.

        aiosmtpd keeps a bytearray per line until the end: 127,000 for 9.9 MB, 18 MB
        of small blocks that, interleaved with everything else the daemon allocates
        meanwhile, left Python's arenas fragmented (issue 15: 8 such posts at once
        kept about 60 MB). Its replies, limits and hook are kept as they are.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = bytearray()
        line = bytearray()  # one line, however many reads it takes
        at_start = True  # the next piece begins a line
        size = 0
        refusal: str | None = None
        while self.transport is not None:
            try:
                # lines end in CRLF only: a bare LF ends nothing, not even the data
                piece = await self._reader.readuntil(b"\r\n")
            except asyncio.CancelledError:
                log.info("Connection lost during DATA")
                self._writer.close()
                raise
            except asyncio.LimitOverrunError as exc:  # longer than the stream's limit
                refusal = refusal or _LINE_TOO_LONG
                piece = await self._reader.read(exc.consumed)
            if at_start and piece == b".\r\n":
                break
            at_start = piece.endswith(b"\r\n")
            size += len(piece)
            if refusal is None and self.data_size_limit and size > self.data_size_limit:
                refusal = "552 Error: Too much mail data"
            if refusal is None:
                line += piece
                if at_start and len(line) > self.line_length_limit:
                    refusal = _LINE_TOO_LONG
            if refusal is not None:  # read to the end, keep nothing (a flood grows nothing)
                data.clear()
                line.clear()
                continue
            if at_start:
                data += memoryview(line)[1:] if line.startswith(b".") else line  # RFC 5321 4.5.2
                line.clear()
        if refusal is not None:
            await self.push(refusal)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        content = bytes(data)
        del data
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def push(self, status: Any) -> None:
        # aiosmtpd answers these itself, before any hook runs.
        if isinstance(status, str) and status.startswith("552 Error"):
            status = str(replies.TOO_BIG)
        elif isinstance(status, str) and status.startswith("500 Line too long"):
            status = str(replies.LINE_TOO_LONG)
        await super().push(status)
