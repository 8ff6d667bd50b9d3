"""Send one batch over SMTP and say what happened to every recipient.

The SMTP client's errors and replies become `RecipientResult`s here and nowhere
else. Per RFC 5321: 2xx delivered, 4xx deferred (552 at RCPT too, section
4.5.3.1.10), any other 5xx failed. A connection that cannot be made defers every
recipient; one that drops mid-transaction keeps the final refusals already read
(a 5xx to RCPT stays failed) and defers the rest: nothing is lost, it is retried.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence

from listserv.config import DeliverySettings
from listserv.distribute.results import RecipientResult
from listserv.distribute.smtp_client import (
    ClientError,
    ConnectionLost,
    Envelope,
    Phase,
    SMTPClient,
    Transcript,
)
from listserv.models import RecipientState

__all__ = ["Connection", "Copy", "Phase", "send", "send_copy", "to_results"]

log = logging.getLogger("listserv.sender")


class Connection:
    """One reusable SMTP connection to the smarthost."""

    def __init__(self, settings: DeliverySettings, local_hostname: str) -> None:
        self.settings = settings
        self.local_hostname = local_hostname
        self._client: SMTPClient | None = None

    async def open(self) -> SMTPClient:
        """The open session, or a new one if there is none or it went away."""
        if self._client is not None and self._client.usable:
            return self._client
        self.drop()
        s = self.settings
        client = await SMTPClient.connect(
            s.host,
            s.port,
            local_hostname=self.local_hostname,
            timeout=s.timeout,
            tls_context=self._tls_context() if s.starttls else None,
            username=s.username,
            password=s.password,
        )
        client.use_pipelining = s.pipelining
        self._client = client
        return client

    def _tls_context(self) -> ssl.SSLContext:
        """Verified TLS: against tls_ca_file when given, else the system's CA store."""
        return ssl.create_default_context(cafile=self.settings.tls_ca_file or None)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.quit()

    def settle(self) -> None:
        """Close the connection if it announced an envelope that will not follow
        (`send_copy(..., then=)`): a 354 may be waiting for a message."""
        if self._client is not None and self._client.announced is not None:
            self.drop()

    def drop(self) -> None:
        """Close at once, sending nothing more (not even a buffered final dot)."""
        client, self._client = self._client, None
        if client is not None:
            client.abort()


def _outcome(code: int, *, at_rcpt: bool = False) -> RecipientState:
    if 200 <= code < 300:
        return RecipientState.DELIVERED
    if 400 <= code < 500 or (at_rcpt and code == 552):
        return RecipientState.DEFERRED
    return RecipientState.FAILED


def _all(
    recipients: Sequence[tuple[int, str]], outcome: RecipientState, code: int | None, detail: str
) -> list[RecipientResult]:
    return [RecipientResult(rid, outcome, code, detail) for rid, _ in recipients]


def _trouble(exc: ClientError) -> str:
    return f"connection lost: {exc}" if isinstance(exc, ConnectionLost) else f"SMTP error: {exc}"


def to_results(recipients: Sequence[tuple[int, str]], t: Transcript) -> list[RecipientResult]:
    """Each recipient's outcome from the replies one transaction got."""
    if t.mail is not None and not t.mail.ok:
        detail = f"MAIL FROM refused: {t.mail}"
        return _all(recipients, _outcome(t.mail.code), t.mail.code, detail)
    open_detail = _trouble(t.lost) if t.lost is not None else "no reply"
    results: list[RecipientResult] = []
    accepted: list[int] = []
    for index, (rid, _) in enumerate(recipients):
        if index >= len(t.rcpts):  # never answered: the connection broke first
            results.append(RecipientResult(rid, RecipientState.DEFERRED, None, open_detail))
        elif t.rcpts[index].ok:  # 250, 251 and 252 alike (RFC 5321 3.4, 3.5.3)
            accepted.append(rid)
        else:
            reply = t.rcpts[index]
            outcome = _outcome(reply.code, at_rcpt=True)
            results.append(RecipientResult(rid, outcome, reply.code, reply.text))
    end = t.final
    if end is None and t.data is not None and t.data.code != 354:
        end = t.data  # DATA itself refused (451, 554, ...)
    for rid in accepted:
        if end is None:
            results.append(RecipientResult(rid, RecipientState.DEFERRED, None, open_detail))
        else:
            results.append(RecipientResult(rid, _outcome(end.code), end.code, end.text))
    return results


class Copy:
    """One message for its recipients, ready to go; its `Envelope` is made once per
    connection, so that announcing it ahead (`send(..., then=)`) and sending it
    later name the same one."""

    __slots__ = ("_made", "envelope_from", "message", "recipients")

    def __init__(
        self, envelope_from: str, recipients: Sequence[tuple[int, str]], message: bytes
    ) -> None:
        self.envelope_from = envelope_from
        self.recipients = recipients
        self.message = message
        self._made: tuple[SMTPClient, Envelope | list[RecipientResult]] | None = None

    def envelope(self, client: SMTPClient) -> Envelope | list[RecipientResult]:
        """Its MAIL and RCPT lines on `client`, or the results if it cannot go there."""
        made = self._made
        if made is not None and made[0] is client:
            return made[1]
        found = _envelope(client, self.envelope_from, self.recipients, self.message)
        self._made = (client, found)
        return found


def _envelope(
    client: SMTPClient,
    envelope_from: str,
    recipients: Sequence[tuple[int, str]],
    message: bytes,
) -> Envelope | list[RecipientResult]:
    options = []
    if not message.isascii() and client.supports("8BITMIME"):
        options.append("BODY=8BITMIME")
    headers = message[: message.find(b"\r\n\r\n")]
    utf8 = not (
        envelope_from.isascii() and headers.isascii() and all(a.isascii() for _, a in recipients)
    )
    if utf8:
        if not client.supports("SMTPUTF8"):
            return _all(recipients, RecipientState.FAILED, 553, "smarthost lacks SMTPUTF8")
        options.append("SMTPUTF8")
    return client.envelope(
        envelope_from,
        [address for _, address in recipients],
        options=options,
        encoding="utf-8" if utf8 else "ascii",
    )


async def send(
    conn: Connection,
    envelope_from: str,
    recipients: Sequence[tuple[int, str]],
    message: bytes,
    phase: Phase | None = None,
) -> list[RecipientResult]:
    """One SMTP transaction: MAIL, a RCPT per recipient, DATA. Never raises for SMTP trouble."""
    return await send_copy(conn, Copy(envelope_from, recipients, message), phase)


async def send_copy(
    conn: Connection, copy: Copy, phase: Phase | None = None, then: Copy | None = None
) -> list[RecipientResult]:
    """`copy` in one SMTP transaction; with `then`, the next copy's envelope goes out
    behind this message when the smarthost pipelines, and the next call must send
    `then` (a connection with an envelope announced and not followed is closed)."""
    try:
        client = await conn.open()
    except ClientError as exc:
        conn.drop()
        return _all(copy.recipients, RecipientState.DEFERRED, None, f"connection failed: {exc}")
    envelope = copy.envelope(client)
    if not isinstance(envelope, Envelope):
        return envelope
    ahead = None
    if then is not None and client.pipelining:
        found = then.envelope(client)
        ahead = found if isinstance(found, Envelope) else None
    transcript = await client.transaction(envelope, message=copy.message, phase=phase, then=ahead)
    if transcript.lost is not None:
        conn.drop()
    return to_results(copy.recipients, transcript)
