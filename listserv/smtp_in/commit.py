"""Group commit: the mail of many SMTP sessions made durable by one commit.

Every accepted message must be on disk before its 250, and a durable commit costs
a flush (SQLite's fsync of the WAL, PostgreSQL's WAL flush) while holding SQLite's
one write lock. Measured with 100 clients on 2 cores, each message's own write
transaction held that lock about 5 ms (BEGIN IMMEDIATE, three inserts, fsync, and
the wait for the interpreter lock after each statement, which other busy threads
hold for up to 5 ms each time) and the lock was busy 80 % of the time: 130 posts/s,
p99 over a second.

Here the messages ready to be stored at the same moment share a transaction and
its statements: the first caller to find no commit running becomes the leader,
takes every item waiting (up to `MAX_GROUP`), writes them all with `write_many`
(one multi-row INSERT per table, not one per message) in one durable transaction
and commits once; callers that arrived meanwhile wait, and the first of them
leads the next group. No thread of its own, nothing to start or stop. Nobody
returns before the commit covering their item has returned, so a 250 still means
"on disk".

If the group's transaction fails, nothing of it was stored: each item is then
written again in a transaction of its own, so one bad message fails alone and
the others are stored.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from sqlalchemy.orm import Session

from listserv.db import Database

I = TypeVar("I")  # noqa: E741 - an item to write
R = TypeVar("R")  # what writing it returned

#: items in one transaction at most: a bound on how long the write lock is held
MAX_GROUP = 64


class _Waiter(Generic[I, R]):
    __slots__ = ("error", "finished", "item", "value", "wake")

    def __init__(self, item: I) -> None:
        self.item = item
        self.finished = False
        self.value: R | None = None
        self.error: BaseException | None = None
        #: set when the item is done, or when its caller should try to lead
        self.wake = threading.Event()


class GroupCommit(Generic[I, R]):
    """Write items in shared durable transactions; see the module docstring.

    `write_many(session, items)` writes the items in `session` and returns one
    result per item, in order; it must write nothing outside the session."""

    def __init__(
        self,
        db: Database,
        write_many: Callable[[Session, Sequence[I]], Sequence[R]],
        *,
        max_group: int = MAX_GROUP,
    ) -> None:
        self.db = db
        self.write_many = write_many
        self.max_group = max_group
        self._pending: list[_Waiter[I, R]] = []
        self._queue = threading.Lock()
        self._leading = threading.Lock()
        #: transactions committed and items in them (for tests and benchmarks)
        self.commits = 0
        self.items = 0

    def run(self, item: I) -> R:
        """What writing `item` returned, once it is durably committed; the exception
        if its transaction failed (then nothing of it was stored)."""
        me: _Waiter[I, R] = _Waiter(item)
        with self._queue:
            self._pending.append(me)
        while not me.finished:
            if self._leading.acquire(blocking=False):
                try:
                    if not me.finished:
                        with self._queue:
                            group = self._pending[: self.max_group]
                            del self._pending[: self.max_group]
                        self._commit(group)
                finally:
                    self._leading.release()
                    with self._queue:
                        successor = self._pending[0] if self._pending else None
                    if successor is not None:  # arrived while we wrote: it leads next
                        successor.wake.set()
            else:
                # woken by the leader: done, or first in line to lead
                me.wake.wait()
                me.wake.clear()
        if me.error is not None:
            raise me.error
        return me.value  # type: ignore[return-value]

    def _commit(self, group: list[_Waiter[I, R]]) -> None:
        try:
            with self.db.session(first=True) as session:  # durable, ahead of bookkeeping
                values = self.write_many(session, [w.item for w in group])
        except BaseException as exc:
            if len(group) > 1 and isinstance(exc, Exception):
                for waiter in group:  # nothing was stored: each on its own
                    self._commit([waiter])
                return
            for waiter in group:
                waiter.error = exc
                self._finish(waiter)
            if not isinstance(exc, Exception):
                raise
            return
        self.commits += 1
        self.items += len(group)
        for waiter, value in zip(group, values, strict=True):
            waiter.value = value
            self._finish(waiter)

    @staticmethod
    def _finish(waiter: _Waiter[I, R]) -> None:
        waiter.finished = True
        waiter.wake.set()
