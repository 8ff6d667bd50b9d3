"""A small SMTP client on an asyncio protocol that pipelines (RFC 2920).

One transaction is MAIL FROM, every RCPT TO and DATA written in one go when the
server advertises PIPELINING, then their replies read in order, then the message
and its final reply: one round trip for the envelope instead of one per
recipient. Without PIPELINING it sends one command at a time. STARTTLS
(RFC 3207) and AUTH PLAIN/LOGIN (RFC 4954) happen once per connection.

Transactions may also be chained (`transaction(..., then=Envelope)`): the next
transaction's MAIL, RCPTs and DATA go out in the same write as this message and
its final dot (RFC 2920 3.1: message content may start a group, DATA ends it),
so a run of one-recipient copies costs one round trip each, not two. The next
call with that same `Envelope` only reads its replies. An envelope announced but
never followed up (a stop, a lost lease) leaves the connection unusable: it is
closed, never reused, since a 354 can only be taken back by hanging up.

A transaction never raises: it returns a `Transcript` of the replies it got, with
`lost` set when the connection broke, so the caller can tell which recipients
already had a final answer. Setting up a connection raises:

    ClientError          the connection cannot be used; retry later
    ├── ConnectionLost   closed, reset, TLS failure, or no reply within the timeout
    ├── ProtocolError    the peer does not speak SMTP (or injected data, RFC 3207 5)
    └── Refused          the greeting, EHLO/HELO, STARTTLS or AUTH was refused

Only `listserv.distribute.sender` turns these into recipient results.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "ClientError",
    "ConnectionLost",
    "Envelope",
    "Phase",
    "ProtocolError",
    "Refused",
    "Reply",
    "SMTPClient",
    "Stuffed",
    "Transcript",
    "dot_stuff",
]

#: RFC 5321 4.5.3.1.5 allows 512 octets per reply line; be lenient, but bounded
MAX_REPLY_LINE = 8192
_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_SEPARATORS = (b" ", b"-", b"")  # after the code: last line, more to come, bare code


class ClientError(Exception):
    """The SMTP connection cannot be used."""


class ConnectionLost(ClientError):
    """The connection was closed, reset or went silent."""


class ProtocolError(ClientError):
    """The peer did not answer in SMTP."""


class Refused(ClientError):
    """The smarthost refused to set up the session."""

    def __init__(self, step: str, reply: Reply) -> None:
        super().__init__(f"{step} refused: {reply}")
        self.reply = reply


@dataclass
class Phase:
    """Where a transaction is, for a graceful stop: once DATA is under way the
    message may be delivered, so the stop waits for the reply instead of cancelling."""

    in_data: bool = False


class Reply(NamedTuple):
    """One SMTP reply (a tuple: made once per recipient, it must be cheap)."""

    code: int
    text: str  # the lines after the code, joined with "\n" (as aiosmtplib did)

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass
class Transcript:
    """The replies one transaction got, in order; what is missing never came."""

    mail: Reply | None = None
    rcpts: list[Reply] = field(default_factory=list)  # one per recipient answered
    data: Reply | None = None  # to the DATA command: 354, or its refusal
    final: Reply | None = None  # after the final dot
    lost: ClientError | None = None  # why the connection broke, if it did


@dataclass(frozen=True, eq=False)
class Envelope:
    """One transaction's command lines (`SMTPClient.envelope`); announced ahead of
    its transaction it is recognised by identity, so each is made once per use."""

    mail: bytes
    rcpts: tuple[bytes, ...]

    def commands(self) -> bytes:
        return b"\r\n".join([self.mail, *self.rcpts, b"DATA"]) + b"\r\n"


class Stuffed(bytes):
    """DATA content already dot-stuffed and terminated (`dot_stuff`): sent as it is.
    A shared post is stuffed once and every transaction sends that one copy."""

    __slots__ = ()


def dot_stuff(message: bytes) -> Stuffed:
    """The message as DATA content: CRLF lines, leading dots doubled (RFC 5321
    4.5.2), a CRLF at the end, then the terminating dot line."""
    if isinstance(message, Stuffed):
        return message
    lines = message.count(b"\r\n")
    if message.count(b"\n") != lines or message.count(b"\r") != lines:
        message = _LINE_ENDINGS.sub(b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b".") or b"\n." in message:
        message = _LEADING_DOT.sub(b"..", message)
    # counting is a C loop over the bytes; the two substitutions, run on every
    # personalized copy, cost more than anything else per copy but the RSA operation
    return Stuffed(message + b".\r\n")


#: DATA is written this much at a time, waiting for the socket in between, so the
#: transport never buffers a whole large message (a 10 MB copy per connection)
WRITE_SLICE = 256 * 1024


class _Wire(asyncio.Protocol):
    """Bytes in a buffer and a future to wake the one reader: less machinery per
    reply than a StreamReader, and the buffer is ours to check for unsolicited
    data (a 421 before an idle close, or bytes injected before STARTTLS)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.pos = 0  # start of the first unread byte in buffer
        self.closed = False
        self.error: BaseException | None = None
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        _wake(self._readable)

    def eof_received(self) -> bool | None:
        self.closed = True
        _wake(self._readable)
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        _wake(self._readable)
        _wake(self._writable)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        _wake(self._writable)

    @property
    def unread(self) -> int:
        return len(self.buffer) - self.pos

    async def wait_readable(self) -> None:
        self._readable = asyncio.get_running_loop().create_future()
        try:
            await self._readable
        finally:
            self._readable = None

    async def wait_writable(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()
        try:
            await self._writable
        finally:
            self._writable = None

    def lost(self) -> ConnectionLost:
        if self.error is not None:
            return ConnectionLost(f"connection closed: {self.error}")
        return ConnectionLost("connection closed by the smarthost")


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class SMTPClient:
    """One SMTP session with the smarthost, set up by `connect()` and then reused
    for as many transactions as the caller likes."""

    def __init__(self, wire: _Wire, *, host: str, timeout: float) -> None:
        self._wire = wire
        self.host = host
        self.timeout = timeout
        #: EHLO keywords (upper case) and their parameters; empty after HELO
        self.extensions: dict[str, str] = {}
        #: pipeline when the server offers it; the caller may switch it off
        self.use_pipelining = True
        #: an envelope written behind the last message, its replies not read yet
        self._announced: Envelope | None = None

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        local_hostname: str,
        timeout: float,
        tls_context: ssl.SSLContext | None = None,
        username: str = "",
        password: str = "",
    ) -> SMTPClient:
        """Connect, read the greeting, EHLO, STARTTLS when `tls_context` is
        given (then EHLO again), and AUTH when `username` is set."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, wire = await loop.create_connection(_Wire, host, port)
        except TimeoutError:
            raise ConnectionLost(f"no connection to {host}:{port} within {timeout:g} s") from None
        except OSError as exc:
            raise ConnectionLost(str(exc)) from exc
        client = cls(wire, host=host, timeout=timeout)
        try:
            greeting = await client.read_reply()
            if greeting.code != 220:
                raise Refused("connection", greeting)
            await client._hello(local_hostname)
            if tls_context is not None:
                await client._starttls(tls_context)
                await client._hello(local_hostname)  # RFC 3207 4.2: forget what was learnt
            if username:
                await client._auth(username, password)
        except BaseException:
            client.abort()
            raise
        return client

    # -- state -------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open, and nothing arrived that we did not ask for (a 421 before an idle
        close would otherwise be read as the reply to our next MAIL). With an
        envelope announced, its replies are what arrives."""
        if self._wire.closed:
            return False
        return self._announced is not None or self._wire.unread == 0

    @property
    def announced(self) -> Envelope | None:
        """The envelope written ahead of its transaction, if any."""
        return self._announced

    @property
    def pipelining(self) -> bool:
        return self.use_pipelining and "PIPELINING" in self.extensions

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    def abort(self) -> None:
        """Close now, discarding anything unsent: after a cancelled DATA the final
        dot must not go out behind our back."""
        transport = self._wire.transport
        if transport is not None and not transport.is_closing():
            transport.abort()
        self._wire.closed = True

    async def quit(self) -> None:
        """QUIT politely; any trouble just closes the connection. An announced
        envelope may have a 354 pending, which only hanging up takes back."""
        if self._announced is not None:
            self.abort()
            return
        if self.usable:
            try:
                await self.command(b"QUIT")
            except ClientError:
                pass
        transport = self._wire.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        self._wire.closed = True

    # -- one transaction ---------------------------------------------------------------------

    def envelope(
        self,
        sender: str,
        recipients: Sequence[str],
        *,
        options: Sequence[str] = (),
        encoding: str = "ascii",
    ) -> Envelope:
        """The MAIL and RCPT lines of one transaction."""
        mail = b"MAIL FROM:<" + sender.encode(encoding) + b">"
        if options:
            mail += b" " + " ".join(options).encode("ascii")
        rcpts = tuple(b"RCPT TO:<" + address.encode(encoding) + b">" for address in recipients)
        return Envelope(mail, rcpts)

    async def transaction(
        self,
        sender: str | Envelope,
        recipients: Sequence[str] = (),
        message: bytes = b"",
        *,
        options: Sequence[str] = (),
        encoding: str = "ascii",
        phase: Phase | None = None,
        then: Envelope | None = None,
    ) -> Transcript:
        """MAIL, RCPT per recipient, DATA and the message; RSET after a refusal so
        the connection can carry the next one. Never raises for SMTP trouble: a
        broken connection is aborted and reported in `Transcript.lost`.

        `sender` may be an `Envelope` made by `envelope()` (then `recipients` and
        the options are in it). With `then` (pipelining only), that envelope is
        written right behind this message's final dot; the next call must pass it.
        """
        phase = phase or Phase()
        if isinstance(sender, Envelope):
            envelope = sender
        else:
            envelope = self.envelope(sender, recipients, options=options, encoding=encoding)
        transcript = Transcript()
        announced, self._announced = self._announced, None
        try:
            if announced is not None and announced is not envelope:
                raise ProtocolError("the transaction announced ahead was not the one sent")
            if self.pipelining:
                await self._pipelined(transcript, envelope, message, phase, announced, then)
            else:
                await self._one_at_a_time(
                    transcript, envelope.mail, list(envelope.rcpts), message, phase
                )
        except ClientError as exc:
            self.abort()
            self._announced = None
            transcript.lost = exc
            return transcript
        finally:
            phase.in_data = False
        if self._announced is not None:
            return transcript  # the dot ended this one; the next is under way already
        if transcript.final is None or not transcript.final.ok:
            await self._reset()
        return transcript

    async def _pipelined(
        self,
        t: Transcript,
        envelope: Envelope,
        message: bytes,
        phase: Phase,
        announced: Envelope | None,
        then: Envelope | None,
    ) -> None:
        # RFC 2920 3.1: RCPT may go anywhere in a group, DATA only last; every
        # reply is read, even after a refusal, to stay in step with the server.
        if announced is None:
            self._write(envelope.commands())
        t.mail = await self.read_reply()
        for _ in envelope.rcpts:
            t.rcpts.append(await self.read_reply())
        t.data = await self.read_reply()
        if t.data.code != 354:
            return
        if t.mail.ok and any(r.ok for r in t.rcpts):
            await self._send_message(t, message, phase, then)
        else:
            # RFC 2920 3.1: a server may accept DATA although nothing was
            # accepted before it; the client then sends a lone dot.
            self._write(b".\r\n")
            await self.read_reply()

    async def _one_at_a_time(
        self, t: Transcript, mail: bytes, rcpts: list[bytes], message: bytes, phase: Phase
    ) -> None:
        t.mail = await self.command(mail)
        if not t.mail.ok:
            return
        for rcpt in rcpts:
            t.rcpts.append(await self.command(rcpt))
        if not any(r.ok for r in t.rcpts):
            return
        t.data = await self.command(b"DATA")
        if t.data.code == 354:
            await self._send_message(t, message, phase)

    async def _send_message(
        self, t: Transcript, message: bytes, phase: Phase, then: Envelope | None = None
    ) -> None:
        phase.in_data = True
        stuffed = dot_stuff(message)
        if len(stuffed) <= WRITE_SLICE:  # the common case: one write, the next envelope too
            self._write(stuffed if then is None else stuffed + then.commands())
            await self._drain()
        else:
            data = memoryview(stuffed)
            for start in range(0, len(data), WRITE_SLICE):
                self._write(data[start : start + WRITE_SLICE])
                await self._drain()
            if then is not None:
                self._write(then.commands())
        if then is not None:
            self._announced = then
        t.final = await self.read_reply()

    async def _reset(self) -> None:
        """Best effort: a connection that fails RSET is closed and reopened on next use."""
        if not self.usable:
            self.abort()
            return
        try:
            reply = await self.command(b"RSET")
        except ClientError:
            self.abort()
            return
        if not reply.ok:
            self.abort()

    # -- session setup -----------------------------------------------------------------------

    async def _hello(self, local_hostname: str) -> None:
        reply = await self.command(b"EHLO " + local_hostname.encode("ascii"))
        if reply.ok:
            self.extensions = _extensions(reply.text)
            return
        self.extensions = {}
        reply = await self.command(b"HELO " + local_hostname.encode("ascii"))
        if not reply.ok:
            raise Refused("HELO", reply)

    async def _starttls(self, context: ssl.SSLContext) -> None:
        if not self.supports("STARTTLS"):
            raise ClientError("the smarthost does not offer STARTTLS")
        reply = await self.command(b"STARTTLS")
        if reply.code != 220:
            raise Refused("STARTTLS", reply)
        if self._wire.unread:
            # RFC 3207 5: anything the server "said" before the handshake could
            # have been injected by a man in the middle.
            raise ProtocolError("data after the reply to STARTTLS")
        transport = self._wire.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport,
                self._wire,
                context,
                server_hostname=self.host,
                ssl_handshake_timeout=self.timeout,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            raise ConnectionLost(f"TLS handshake failed: {exc}") from exc
        if tls is None:
            raise ConnectionLost("TLS handshake failed: connection closed")
        assert isinstance(tls, asyncio.Transport)
        self._wire.transport = tls

    async def _auth(self, username: str, password: str) -> None:
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user, secret = username.encode("utf-8"), password.encode("utf-8")
        if "PLAIN" in mechanisms:  # RFC 4616, with the initial response (RFC 4954 4)
            reply = await self.command(b"AUTH PLAIN " + _b64(b"\0" + user + b"\0" + secret))
        elif "LOGIN" in mechanisms:
            reply = await self.command(b"AUTH LOGIN")
            for answer in (user, secret):
                if reply.code != 334:
                    break
                reply = await self.command(_b64(answer))
        else:
            raise ClientError(f"the smarthost offers no AUTH PLAIN or LOGIN ({mechanisms})")
        if reply.code != 235:
            raise Refused("AUTH", reply)

    # -- the wire ----------------------------------------------------------------------------

    async def command(self, line: bytes) -> Reply:
        """Send one command line and read its reply."""
        self._write(line + b"\r\n")
        return await self.read_reply()

    def _write(self, data: bytes | memoryview) -> None:
        transport = self._wire.transport
        if self._wire.closed or transport is None or transport.is_closing():
            raise self._wire.lost()
        transport.write(data)

    async def _drain(self) -> None:
        """Wait while the transport holds more than its high-water mark; time out
        only when nothing at all went out for `timeout` seconds."""
        wire = self._wire
        while wire.paused and not wire.closed:
            assert wire.transport is not None
            before = wire.transport.get_write_buffer_size()
            try:
                async with asyncio.timeout(self.timeout):
                    await wire.wait_writable()
            except TimeoutError:
                if wire.transport.get_write_buffer_size() >= before:
                    raise ConnectionLost(f"could not write for {self.timeout:g} s") from None
        if wire.closed:
            raise wire.lost()

    async def read_reply(self) -> Reply:
        """The next complete reply, waiting at most `timeout` seconds for it."""
        reply = self._parse()
        if reply is not None:
            return reply
        try:
            async with asyncio.timeout(self.timeout):
                while (reply := self._parse()) is None:
                    if self._wire.closed:
                        raise self._wire.lost()
                    await self._wire.wait_readable()
        except TimeoutError:
            raise ConnectionLost(f"no reply within {self.timeout:g} s") from None
        return reply

    def _parse(self) -> Reply | None:
        """One reply from the buffer if it is all there (RFC 5321 4.2: "250-" lines
        continue, "250 " ends), else None without consuming anything. Called once
        per recipient, so a one-line reply takes the short way (a third of the cost)."""
        wire = self._wire
        buffer, pos = wire.buffer, wire.pos
        earlier: list[str] = []  # the text of the "250-" lines of a multiline reply
        while True:
            end = buffer.find(b"\n", pos)
            if end < 0:
                if len(buffer) - pos > MAX_REPLY_LINE:
                    raise ProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets")
                return None
            line = bytes(buffer[pos:end]).rstrip(b"\r")
            pos = end + 1
            separator = line[3:4]
            if not line[:3].isdigit() or separator not in _SEPARATORS:
                raise ProtocolError(f"not an SMTP reply: {line[:80]!r}")
            text = line[4:].strip(b" \t").decode("utf-8", "surrogateescape")
            if separator != b"-":
                break
            earlier.append(text)
        if pos == len(buffer):
            buffer.clear()
            wire.pos = 0
        else:
            wire.pos = pos
            if pos > 65536:  # keep the buffer from growing without end
                del buffer[:pos]
                wire.pos = 0
        if earlier:
            earlier.append(text)
            text = "\n".join(earlier)
        return Reply(int(line[:3]), text)


def _extensions(ehlo_text: str) -> dict[str, str]:
    """EHLO keywords and parameters; the first line is the server's name. Old
    servers write "AUTH=PLAIN LOGIN" (RFC 4954 predecessors), read that too."""
    found: dict[str, str] = {}
    for line in ehlo_text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword, _, first = keyword.partition("=")
        params = f"{first} {params}".strip()
        if keyword:
            keyword = keyword.upper()
            found[keyword] = f"{found[keyword]} {params}".strip() if keyword in found else params
    return found


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)
