"""The delivery engine: one dispatcher and `max_connections` senders, each sender
one SMTP connection to the smarthost.

Stopping (SIGTERM): the dispatcher hands back the batches nobody started; a
sender finishes the SMTP transaction in hand (a personalized batch stops between
two messages and hands the rest back); after `[delivery] timeout` seconds the
senders still short of DATA are cancelled and their batches handed back
untouched, while a sender whose DATA is under way is waited for until its reply
comes or its own SMTP timeout fires: once DATA went out, the message may have been
delivered, so its outcome is recorded, never guessed. The dispatcher records
everything before the engine returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence

from listserv.bounces import verp
from listserv.config import Settings
from listserv.db import Database
from listserv.distribute import sender
from listserv.distribute.batches import End
from listserv.distribute.cache import Prepared, PreparedCache
from listserv.distribute.dispatcher import Dispatcher, InFlight
from listserv.distribute.liveness import Liveness
from listserv.distribute.results import RecipientResult
from listserv.distribute.smtp_client import dot_stuff
from listserv.distribute.throttle import Throttle
from listserv.models import RecipientState

log = logging.getLogger("listserv.engine")

#: personalized messages rendered and signed per thread hop
RENDER_CHUNK = 16
#: the first chunk of a batch is smaller: its connection waits for it, idle
FIRST_CHUNK = 4
#: personalized results handed to the dispatcher every this many messages: a kill
#: re-sends at most these and the one in flight per connection. Every message cost
#: 2.6 s in 10,000 (a database round each); every 4th, 0.3 s.
PROGRESS_EVERY = 4


class DeliveryEngine:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        worker: str,
        liveness: Liveness,
        stop: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.dispatcher = Dispatcher(
            db,
            settings.delivery,
            worker=worker,
            liveness=liveness,
            stop=stop,
            throttle=Throttle(settings.throttle),
        )
        self.cache = PreparedCache(db, settings.keys_dir)
        self.dispatcher.on_done = self._done_with
        self._phases: dict[int, sender.Phase] = {}

    def _done_with(self, post_id: int) -> None:
        """This worker is done with the post (sent, cancelled, paused or gone): its
        prepared bytes leave the cache now, not when eight more posts came."""
        freed = self.cache.evict(post_id)
        freed += self.cache.sweep()
        if freed:
            log.debug("post %d: let go of %d prepared bytes", post_id, freed)

    def wake(self) -> None:
        """New batches may be due (a post was queued)."""
        self.dispatcher.wake.set()

    async def run(self) -> None:
        """Deliver until `stop` is set, then stop as the module docstring says."""
        n = self.settings.delivery.max_connections
        dispatcher = asyncio.create_task(self.dispatcher.run(), name="dispatcher")
        senders = [asyncio.create_task(self._sender(i), name=f"sender-{i}") for i in range(n)]
        stopping = asyncio.create_task(self.stop.wait())
        everything = {dispatcher, *senders}
        try:
            done, _ = await asyncio.wait(
                {stopping, *everything}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done & everything:
                task.result()  # a task that ended before the stop: raise its error
            self.dispatcher.wake.set()
            await self._drain(senders)
            try:
                await asyncio.wait_for(dispatcher, self.settings.delivery.timeout + 30)
            except TimeoutError:
                log.error(
                    "stopping: could not record the last results (is the database reachable?);"
                    " their batches are sent again once their leases run out"
                )
        finally:
            stopping.cancel()
            for task in everything:
                task.cancel()
            await asyncio.gather(*everything, return_exceptions=True)

    async def _drain(self, senders: list[asyncio.Task[None]]) -> None:
        timeout = self.settings.delivery.timeout
        _, pending = await asyncio.wait(senders, timeout=timeout + 5)
        if not pending:
            return
        for index, task in enumerate(senders):
            if task in pending and not self._phases[index].in_data:
                task.cancel()
        log.warning(
            "stopping: %d connections still busy after %.0f s; waiting only for those"
            " whose DATA is under way",
            len(pending),
            timeout + 5,
        )
        _, pending = await asyncio.wait(pending, timeout=timeout + 5)
        for task in pending:  # an SMTP timeout that did not fire: give up on it
            task.cancel()

    async def _sender(self, index: int) -> None:
        conn = sender.Connection(self.settings.delivery, self.settings.server.hostname)
        phase = self._phases[index] = sender.Phase()
        dispatcher = self.dispatcher
        try:
            while (item := await dispatcher.outbox.get()) is not None:
                self.cache.sweep()  # posts unused for a while (their batches wait)
                if self.stop.is_set():
                    dispatcher.finish(item, End.HANDED_BACK)
                    continue
                try:
                    end = await self._deliver(conn, item, phase)
                except asyncio.CancelledError:
                    conn.drop()
                    dispatcher.finish(item, End.HANDED_BACK)
                    raise
                except Exception as exc:
                    log.exception(
                        "post %d batch %d: internal error", item.batch.post_id, item.batch.id
                    )
                    answered = {r.delivery_id for r in item.results}
                    item.results.extend(
                        RecipientResult(
                            rid, RecipientState.DEFERRED, None, f"internal error: {exc}"
                        )
                        for rid, _ in item.batch.recipients
                        if rid not in answered
                    )
                    end = End.DONE
                dispatcher.finish(item, end)
        finally:
            if self.stop.is_set() and phase.in_data:
                conn.drop()
            else:
                await conn.close()

    async def _deliver(self, conn: sender.Connection, item: InFlight, phase: sender.Phase) -> End:
        batch = item.batch
        ready = await self.cache.get(batch)
        if ready is None:
            log.warning(
                "post %d batch %d: the post no longer exists (its list was deleted); nothing sent",
                batch.post_id,
                batch.id,
            )
            item.lost = True
            return End.DONE
        if not batch.recipients:
            return End.DONE
        if not self.dispatcher.holds(item):
            return End.HANDED_BACK
        if ready.personalizer is None:  # shared: one signed message for the whole batch
            item.results.extend(
                await sender.send(conn, batch.envelope_from, batch.recipients, ready.message, phase)
            )
            return End.DONE
        return await self._personalized(conn, item, ready, phase)

    async def _personalized(
        self, conn: sender.Connection, item: InFlight, ready: Prepared, phase: sender.Phase
    ) -> End:
        """One message per recipient, results recorded as they come.

        The copies are rendered and signed in threads a chunk ahead of the one
        being sent (the RSA operation lets go of the interpreter lock), and each
        copy's envelope goes out behind the message before it (`send_copy`'s
        `then`): SMTP, rendering and signing overlap instead of taking turns.
        """
        batch = item.batch
        recipients = batch.recipients
        starts = iter([0, *range(FIRST_CHUNK, len(recipients), RENDER_CHUNK)])
        pending: asyncio.Future[list[sender.Copy]] | None = None

        def render_next() -> asyncio.Future[list[sender.Copy]] | None:
            start = next(starts, None)
            if start is None or start >= len(recipients):
                return None
            chunk = recipients[start : start + (RENDER_CHUNK if start else FIRST_CHUNK)]
            return asyncio.ensure_future(
                asyncio.to_thread(_render, ready, batch.envelope_from, chunk)
            )

        queue: deque[sender.Copy] = deque()
        pending = render_next()
        try:
            while True:
                if not queue or (len(queue) == 1 and pending is not None and pending.done()):
                    if pending is None:
                        break
                    queue.extend(await pending)
                    pending = render_next()
                copy = queue.popleft()
                if self.stop.is_set() or not self.dispatcher.holds(item):
                    return End.HANDED_BACK
                then = queue[0] if queue else None
                item.results.extend(await sender.send_copy(conn, copy, phase, then))
                if len(item.results) - item.recorded >= PROGRESS_EVERY:
                    self.dispatcher.progress(item)
        finally:
            conn.settle()  # an envelope announced for a copy that will not follow
            if pending is not None:
                pending.add_done_callback(_ignore)
        return End.DONE


def _render(
    ready: Prepared, envelope_from: str, chunk: Sequence[tuple[int, str]]
) -> list[sender.Copy]:
    """The copies of `chunk`, signed, dot-stuffed and with their VERP envelopes: all
    the per-copy work that is not SMTP, done in a thread."""
    assert ready.personalizer is not None
    rendered = ready.personalizer.render_all([a for _, a in chunk], ready.signer)
    copies = []
    for recipient, data in zip(chunk, rendered, strict=True):
        sender_address = envelope_from
        if ready.verp_key is not None:  # bounces name the delivery (bounces/verp.py)
            sender_address = verp.envelope(ready.verp_key, envelope_from, recipient[0])
        copies.append(sender.Copy(sender_address, [recipient], dot_stuff(data)))
    return copies


def _ignore(future: asyncio.Future[list[sender.Copy]]) -> None:
    """A chunk rendered ahead for a batch that stopped: its result, or error, is not needed."""
    if not future.cancelled():
        future.exception()
