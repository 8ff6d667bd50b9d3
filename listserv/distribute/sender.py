"""Send one batch over SMTP and say what happened to every recipient.

aiosmtplib's exceptions and reply codes become `RecipientResult`s here and
nowhere else. Per RFC 5321: 2xx delivered, 4xx deferred (552 at RCPT too,
section 4.5.3.1.10), any other 5xx failed. A connection that cannot be made or
that drops defers every recipient still open: nothing is lost, it is retried.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import SMTPResponse

from listserv.config import DeliverySettings
from listserv.distribute.results import RecipientResult
from listserv.models import RecipientState

log = logging.getLogger("listserv.sender")


@dataclass
class Phase:
    """Where a transaction is, for a graceful stop: once DATA is under way the
    message may be delivered, so the stop waits for the reply instead of cancelling."""

    in_data: bool = False


class Connection:
    """One reusable SMTP connection to the smarthost."""

    def __init__(self, settings: DeliverySettings, local_hostname: str) -> None:
        self.settings = settings
        self.local_hostname = local_hostname
        self._smtp: aiosmtplib.SMTP | None = None

    async def open(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        s = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            timeout=s.timeout,
            local_hostname=self.local_hostname,
            start_tls=s.starttls,
            tls_context=self._tls_context() if s.starttls else None,
        )
        await smtp.connect()
        if smtp.is_ehlo_or_helo_needed:
            await smtp.ehlo()  # so the extensions are known before the first MAIL
        if s.username:
            await smtp.login(s.username, s.password)
        self._smtp = smtp
        return smtp

    def _tls_context(self) -> ssl.SSLContext:
        """Verified TLS: against tls_ca_file when given, else the system's CA store."""
        return ssl.create_default_context(cafile=self.settings.tls_ca_file or None)

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None or not smtp.is_connected:
            return
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()

    def drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()


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


async def send(
    conn: Connection,
    envelope_from: str,
    recipients: Sequence[tuple[int, str]],
    message: bytes,
    phase: Phase | None = None,
) -> list[RecipientResult]:
    """One SMTP transaction: MAIL, a RCPT per recipient, DATA. Never raises for SMTP trouble."""
    try:
        smtp = await conn.open()
    except (aiosmtplib.SMTPException, OSError) as exc:
        conn.drop()
        return _all(recipients, RecipientState.DEFERRED, None, f"connection failed: {exc}")
    try:
        return await _transaction(smtp, envelope_from, recipients, message, phase or Phase())
    except aiosmtplib.SMTPServerDisconnected as exc:
        conn.drop()
        return _all(recipients, RecipientState.DEFERRED, None, f"connection lost: {exc}")
    except (aiosmtplib.SMTPException, OSError) as exc:
        conn.drop()
        return _all(recipients, RecipientState.DEFERRED, None, f"SMTP error: {exc}")


async def _transaction(
    smtp: aiosmtplib.SMTP,
    envelope_from: str,
    recipients: Sequence[tuple[int, str]],
    message: bytes,
    phase: Phase,
) -> list[RecipientResult]:
    options = []
    if not message.isascii() and smtp.supports_extension("8BITMIME"):
        options.append("BODY=8BITMIME")
    headers = message[: message.find(b"\r\n\r\n")]
    utf8 = not (
        envelope_from.isascii() and headers.isascii() and all(a.isascii() for _, a in recipients)
    )
    if utf8:
        if not smtp.supports_extension("SMTPUTF8"):
            return _all(recipients, RecipientState.FAILED, 553, "smarthost lacks SMTPUTF8")
        options.append("SMTPUTF8")
    encoding = "utf-8" if utf8 else "ascii"
    try:
        await smtp.mail(envelope_from, options=options, encoding=encoding)
    except aiosmtplib.SMTPResponseException as exc:
        await _reset(smtp)
        detail = f"MAIL FROM refused: {exc.code} {exc.message}"
        return _all(recipients, _outcome(exc.code), exc.code, detail)
    results: list[RecipientResult] = []
    accepted: list[tuple[int, SMTPResponse]] = []
    for rid, address in recipients:
        # Our addresses are normalized already: skip aiosmtplib's per-address
        # parse-and-quote, a sixth of the CPU of a large fan-out.
        response = await smtp.execute_command(b"RCPT", b"TO:<" + address.encode(encoding) + b">")
        if 200 <= response.code < 300:  # 250, 251 and 252 alike (RFC 5321 3.4, 3.5.3)
            accepted.append((rid, response))
        else:
            outcome = _outcome(response.code, at_rcpt=True)
            results.append(RecipientResult(rid, outcome, response.code, response.message))
    if not accepted:
        await _reset(smtp)
        return results
    phase.in_data = True
    try:
        response = await smtp.data(message)
        code, text = response.code, response.message
    except aiosmtplib.SMTPResponseException as exc:
        code, text = exc.code, exc.message
    finally:
        phase.in_data = False
    outcome = _outcome(code)
    if outcome is not RecipientState.DELIVERED:
        await _reset(smtp)
    results.extend(RecipientResult(rid, outcome, code, text) for rid, _ in accepted)
    return results


async def _reset(smtp: aiosmtplib.SMTP) -> None:
    """Best effort: a connection that breaks here is noticed and reopened on next use."""
    try:
        await smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        smtp.close()
