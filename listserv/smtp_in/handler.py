"""aiosmtpd hooks: translate SMTP commands to intake calls and outcomes to replies.

Nothing else happens here. The database work runs in a thread so a slow disk
never stalls the other SMTP sessions on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiosmtpd.smtp import SMTP, Envelope, Session

from listserv import memory, replies
from listserv.addresses import ListAddress
from listserv.config import PolicySettings
from listserv.db import Database
from listserv.pipeline.auth import Authenticator
from listserv.replies import Reply
from listserv.smtp_in import intake

log = logging.getLogger("listserv.smtp")

T = TypeVar("T")
#: threads deciding and storing mail for the SMTP sessions at once. Most of them
#: wait (for the group commit's flush, for DNS), and the pool bounds how many
#: messages one commit can take: at 100 clients on 2 cores, 8 threads gave about
#: 90 posts/s, 24 about 150, 48 about 190, 64 about 225, 96 about 210 (SQLite).
INTAKE_THREADS = 64
#: on PostgreSQL, where a thread deciding holds a pooled connection: within the pool
#: (db.POOL_SIZE), or connections are opened and closed for every few posts. With
#: 3 listeners at 100 clients: 64 threads gave 207 posts/s, 16 gave 240.
INTAKE_THREADS_POSTGRESQL = 16
#: seconds after a large message was stored before malloc's free pages are trimmed
TRIM_AFTER = 1.0
#: seconds a RCPT TO that named a list is answered from memory. Asking the database
#: took an intake thread, queued behind the sessions deciding: at 200 posts/s from
#: 100 clients, 7 ms from RCPT to DATA at the median, 0.4 ms from memory (issue 15).
#: Lists come and go rarely; one deleted meanwhile is refused at DATA
#: (intake.receive answers 550). Refusals are not kept: a new list takes mail at once.
RESOLVED_FOR = 2.0
#: recipients kept at most (all of them are forgotten when there are more)
RESOLVED_MAX = 10_000

#: RFC 5321 4.5.3.1.8: a server must take at least 100; the 101st gets 452 4.5.3
MAX_RECIPIENTS = 100


class InboundHandler:
    def __init__(
        self,
        db: Database,
        on_accepted: Callable[[], None] = lambda: None,
        policy: PolicySettings | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.db = db
        self.on_accepted = on_accepted
        self.policy = policy or PolicySettings()
        self.authenticator = authenticator
        # Sessions decide and store in threads of their own: a session waiting on DNS
        # (sender authentication) must not take the loop's default pool (6 threads on
        # 2 cores) from the dispatcher's and the scheduler's database round trips.
        threads = INTAKE_THREADS if db.is_sqlite else INTAKE_THREADS_POSTGRESQL
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="intake")
        # sessions storing at the same moment share one durable commit (commit.py)
        self.committer = intake.committer(db)
        self._resolved: dict[str, tuple[ListAddress, float]] = {}

    async def _in_thread(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """After the last session: let the threads go."""
        self._executor.shutdown(wait=False)

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # aiosmtpd keeps undecodable bytes as surrogates (SMTPUTF8 on); stored, they
        # failed at DATA with a traceback and a 451, and the MTA retried for days.
        if not _decodable(address):
            log.info("refused MAIL FROM:<%a> from %s: not UTF-8", address, _peer(session))
            return str(replies.BAD_SENDER)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(replies.MAIL_OK)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not _decodable(address):
            log.info("refused RCPT TO:<%a> from %s: not UTF-8", address, _peer(session))
            return str(replies.BAD_RECIPIENT)
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return str(replies.TOO_MANY_RECIPIENTS)
        try:
            result = await self._resolve(address)
        except Exception:
            log.exception("RCPT %s: internal error", address)
            return str(replies.TEMP_FAILURE)
        if isinstance(result, Reply):
            log.info("refused RCPT TO:<%s> from %s: %s", address, _peer(session), result)
            return str(result)
        envelope.rcpt_tos.append(address)
        _targets(envelope).append(result)
        return str(replies.RCPT_OK)

    async def _resolve(self, address: str) -> ListAddress | Reply:
        """intake.resolve, a list found kept for RESOLVED_FOR seconds."""
        now = time.monotonic()
        known = self._resolved.get(address)
        if known is not None and known[1] > now:
            return known[0]
        result = await self._in_thread(intake.resolve, self.db, address)
        if isinstance(result, ListAddress):
            if len(self._resolved) >= RESOLVED_MAX:
                self._resolved.clear()
            self._resolved[address] = (result, now + RESOLVED_FOR)
        return result

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        if isinstance(content, str):  # pragma: no cover - we never set decode_data
            content = content.encode("utf-8", "surrogateescape")
        request = intake.Envelope(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=content,
            peer=_peer(session),
            helo=str(session.host_name or ""),
            targets=tuple(_targets(envelope)),
        )
        log.debug(
            "DATA from %s: %d bytes for %s, storing", request.peer, len(content), request.rcpt_tos
        )
        try:
            outcome = await self._in_thread(
                intake.receive,
                self.db,
                request,
                policy=self.policy,
                authenticator=self.authenticator,
                committer=self.committer,
            )
        except Exception:
            # Nothing was committed: the client keeps the message and tries again.
            log.exception("DATA from %s: internal error, answered 451", request.peer)
            return str(replies.TEMP_FAILURE)
        if outcome.accepted_posts:
            self.on_accepted()
        if len(content) >= memory.MMAP_THRESHOLD:
            # a large message was parsed and stored: its memory goes back to the system
            # once aiosmtpd lets go of the envelope, not after the next large post
            asyncio.get_running_loop().call_later(TRIM_AFTER, memory.trim)
        return str(outcome.reply)

    async def handle_exception(self, error: Exception) -> str:
        """An unexpected error in a command: logged; the client may try again (nothing stored)."""
        log.error("SMTP session error", exc_info=error)
        return str(replies.TEMP_FAILURE)


def _decodable(address: str) -> bool:
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _targets(envelope: Envelope) -> list[ListAddress]:
    """The list addresses resolved at RCPT, kept on the envelope for DATA
    (aiosmtpd makes a new Envelope for each transaction)."""
    targets: list[ListAddress] | None = getattr(envelope, "listserv_targets", None)
    if targets is None:
        targets = []
        envelope.listserv_targets = targets  # type: ignore[attr-defined]
    return targets


def _peer(session: Session) -> str:
    peer: Any = session.peer
    if isinstance(peer, tuple) and peer:
        return f"{peer[0]}:{peer[1]}" if len(peer) > 1 else str(peer[0])
    return str(peer or "")
