"""The prepared form of the posts being sent, loaded once per post, not per batch.

Keyed by the post's id *and* the time it was queued, a pair no other post can
ever have: a cache keyed by the id alone once sent a deleted list's post to
another list's members when SQLite handed the id out again (foundation review).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import sitesecret, unsubscribe_links
from listserv.db import Database
from listserv.distribute import dkim, posts, prepare
from listserv.distribute.batches import ClaimedBatch
from listserv.models import DeliveryMode, MailingList, Member, Role

SIZE = 8


@dataclass(frozen=True, slots=True)
class Prepared:
    """Bytes to send as they are (shared), or a template with what personalizing it
    takes: the list as it was when queued, and the signer."""

    message: bytes
    personalizer: prepare.Personalizer | None = None  # the template, parsed once
    signer: dkim.Signer | None = None
    #: personalized: the site's VERP key, each copy from NAME-bounces+TOKEN@ (bounces/verp.py)
    verp_key: bytes | None = None


class PreparedCache:
    """Used from the event loop only; loading runs in a thread."""

    def __init__(self, db: Database, keys_dir: Path, size: int = SIZE) -> None:
        self.db = db
        self.keys_dir = keys_dir
        self.size = size
        self._items: OrderedDict[tuple[int, datetime | None], Prepared | None] = OrderedDict()
        self._loading: dict[tuple[int, datetime | None], asyncio.Future[Prepared | None]] = {}
        self._verp_key: bytes | None = None

    async def get(self, batch: ClaimedBatch) -> Prepared | None:
        """The post of `batch` ready to send, or None when it no longer exists."""
        key = batch.post_key
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        loading = self._loading.get(key)
        if loading is not None:  # another sender is loading it: one load per post
            return await asyncio.shield(loading)
        future = asyncio.ensure_future(asyncio.to_thread(self._load, batch.post_id))
        self._loading[key] = future
        try:
            ready = await asyncio.shield(future)
        finally:
            self._loading.pop(key, None)
        self._items[key] = ready
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return ready

    def _load(self, post_id: int) -> Prepared | None:
        with self.db.reading() as session:
            queued = posts.queued_post(session, post_id)
            if queued is None:
                return None
            if queued.delivery_mode is DeliveryMode.SHARED:
                return Prepared(queued.prepared)
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
