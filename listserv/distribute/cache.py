"""The prepared form of the posts being sent, loaded once per post, not per batch.

Keyed by the post's id *and* the time it was queued, a pair no other post can
ever have: a cache keyed by the id alone once sent a deleted list's post to
another list's members when SQLite handed the id out again (foundation review).

Bounded by bytes as well as by posts, and a post leaves it as soon as this worker
is done with it (`evict`: sent, cancelled, paused or gone) or after `IDLE`
seconds unused: eight concurrent 9.9 MB posts kept the daemon above 800 MB after
they were sent (issue 15). A shared post is kept once, already dot-stuffed for
DATA (`smtp_client.Stuffed`), not as stored bytes plus a stuffed copy per send.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import memory, sitesecret, unsubscribe_links
from listserv.db import Database
from listserv.distribute import dkim, posts, prepare, smtp_client
from listserv.distribute.batches import ClaimedBatch
from listserv.models import DeliveryMode, MailingList, Member, Role

SIZE = 8
#: bytes of prepared posts kept at most (a post larger than this is kept alone)
MAX_BYTES = 64 << 20
#: seconds a post stays unused before it is let go (a batch deferred for minutes
#: loads it again)
IDLE = 30.0
#: letting go of this many bytes at once is worth giving memory back to the system
TRIM_AFTER = 1 << 20


Key = tuple[int, datetime | None]


@dataclass(frozen=True, slots=True)
class Prepared:
    """Bytes to send as they are (shared), or a template with what personalizing it
    takes: the list as it was when queued, and the signer."""

    message: bytes
    personalizer: prepare.Personalizer | None = None  # the template, parsed once
    signer: dkim.Signer | None = None
    #: personalized: the site's VERP key, each copy from NAME-bounces+TOKEN@ (bounces/verp.py)
    verp_key: bytes | None = None

    @property
    def weight(self) -> int:
        """Bytes held, roughly: a personalized post's template is also kept parsed
        and rendered once (about three times its size)."""
        return len(self.message) * (1 if self.personalizer is None else 4)


class PreparedCache:
    """Used from the event loop only; loading runs in a thread."""

    def __init__(
        self,
        db: Database,
        keys_dir: Path,
        size: int = SIZE,
        *,
        max_bytes: int = MAX_BYTES,
        idle: float = IDLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.keys_dir = keys_dir
        self.size = size
        self.max_bytes = max_bytes
        self.idle = idle
        self._clock = clock
        self._items: OrderedDict[Key, tuple[Prepared | None, float]] = OrderedDict()
        self._loading: dict[Key, asyncio.Future[Prepared | None]] = {}
        self._bytes = 0
        self._verp_key: bytes | None = None

    @property
    def bytes(self) -> int:
        """Bytes of the prepared posts held (`Prepared.weight`)."""
        return self._bytes

    def __contains__(self, key: Key) -> bool:
        return key in self._items

    async def get(self, batch: ClaimedBatch) -> Prepared | None:
        """The post of `batch` ready to send, or None when it no longer exists."""
        key = batch.post_key
        now = self._clock()
        if key in self._items:
            self._items.move_to_end(key)
            ready = self._items[key][0]
            self._items[key] = (ready, now)
            return ready
        loading = self._loading.get(key)
        if loading is not None:  # another sender is loading it: one load per post
            return await asyncio.shield(loading)
        future = asyncio.ensure_future(asyncio.to_thread(self._load, batch.post_id))
        self._loading[key] = future
        try:
            ready = await asyncio.shield(future)
        finally:
            self._loading.pop(key, None)
        self._items[key] = (ready, self._clock())
        self._bytes += _weight(ready)
        self._shrink(keep=key)
        return ready

    def evict(self, post_id: int) -> int:
        """Let go of `post_id` (this worker is done with it); returns the bytes freed.
        A sender still sending it keeps its own reference until it is done."""
        freed = 0
        for key in [k for k in self._items if k[0] == post_id]:
            freed += self._drop(key)
        self._trim(freed)
        return freed

    def sweep(self) -> int:
        """Let go of the posts unused for `idle` seconds; returns the bytes freed."""
        deadline = self._clock() - self.idle
        freed = 0
        for key in [k for k, (_, used) in self._items.items() if used < deadline]:
            freed += self._drop(key)
        self._trim(freed)
        return freed

    def _shrink(self, keep: Key) -> None:
        freed = 0
        while len(self._items) > 1 and (
            len(self._items) > self.size or self._bytes > self.max_bytes
        ):
            oldest = next(iter(self._items))
            if oldest == keep:
                break
            freed += self._drop(oldest)
        self._trim(freed)

    def _drop(self, key: Key) -> int:
        ready, _ = self._items.pop(key)
        weight = _weight(ready)
        self._bytes -= weight
        return weight

    @staticmethod
    def _trim(freed: int) -> None:
        if freed >= TRIM_AFTER:
            memory.trim()

    def _load(self, post_id: int) -> Prepared | None:
        with self.db.reading() as session:
            queued = posts.queued_post(session, post_id)
            if queued is None:
                return None
            if queued.delivery_mode is DeliveryMode.SHARED:
                # kept stuffed: each send writes it as it is, no copy per transaction
                return Prepared(smtp_client.dot_stuff(queued.prepared))
            if queued.render is not None:
                view = prepare.ListView.from_snapshot(queued.render)
            else:  # queued before posts kept their rendering values (schema 0001)
                mlist = session.get(MailingList, queued.list_id)
                if mlist is None:
                    return None
                view = prepare.ListView.of(mlist)
            names = display_names(session, queued.list_id) if view.merge_fields else {}
            secret = unsubscribe_links.stored_secret(session) if view.unsubscribe_base else None
        recorded = (queued.render or {}).get(prepare.SELECTORS_KEY)
        selectors = [str(s) for s in recorded] if isinstance(recorded, list) else None
        if secret is None and view.one_click:  # queue_post made it; made here all the same
            with self.db.session() as session:
                secret = sitesecret.get(session, sitesecret.UNSUBSCRIBE)
        links = (
            unsubscribe_links.UnsubscribeLinks(view.unsubscribe_base, secret, view.id)
            if secret is not None and view.id
            else None
        )
        view = dataclasses.replace(view, delivery_mode=DeliveryMode.PERSONALIZED)
        if self._verp_key is None:  # made on first use: a write, so its own session
            with self.db.session() as session:
                self._verp_key = sitesecret.get(session, sitesecret.VERP)
        return Prepared(
            queued.prepared,
            prepare.Personalizer(queued.prepared, view, names, links),
            prepare.signer_for(self.keys_dir, view.domain, selectors),
            self._verp_key,
        )


def display_names(session: Session, list_id: int) -> Mapping[str, str]:
    """Lower-cased address -> display name of the list's members that gave one, for
    $name: loaded once per post (one query), not per batch or recipient. A name
    changed while the post is being sent reaches only the batches loaded after."""
    rows = session.execute(
        sa.select(Member.address, Member.display_name).where(
            Member.list_id == list_id, Member.role == Role.MEMBER, Member.display_name != ""
        )
    )
    return {address.lower(): name for address, name in rows}


def _weight(ready: Prepared | None) -> int:
    return 0 if ready is None else ready.weight
