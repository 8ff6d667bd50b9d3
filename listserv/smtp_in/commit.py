"""How accepted mail reaches the disk before the 250: one durable commit per message,
or one for the messages of many SMTP sessions at once (group commit).

A durable commit costs a flush to disk (SQLite's fsync, PostgreSQL's WAL flush):
one client got about 50 posts/s, 17 ms each, and concurrent clients queued behind
each other's flushes. `GroupCommit` has one writer thread take every message
waiting, store each in a savepoint of one transaction and commit once: N sessions
then share one flush, and a message that fails its savepoint fails alone.
Nobody is answered before the commit that holds their message returned.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol, TypeVar

from sqlalchemy.orm import Session

from listserv.db import Database

log = logging.getLogger("listserv.intake")

T = TypeVar("T")

#: messages stored in one transaction at most (a bound on the time the lock is held)
MAX_GROUP = 64


class Committer(Protocol):
    def run(self, job: Callable[[Session], T], *, label: str = "") -> T: ...


class DirectCommit:
    """Each message in its own durable transaction (the CLI, tests)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def run(self, job: Callable[[Session], T], *, label: str = "") -> T:
        with self.db.session() as session:
            return job(session)


class GroupCommit:
    """One writer thread; callers (intake threads) block until their commit is done."""

    def __init__(self, db: Database, *, max_group: int = MAX_GROUP) -> None:
        self.db = db
        self.max_group = max_group
        self._jobs: list[tuple[Callable[[Session], object], Future[object]]] = []
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._write, name="group-commit", daemon=True)
        self._thread.start()

    def run(self, job: Callable[[Session], T], *, label: str = "") -> T:
        future: Future[object] = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the group committer is closed")
            self._jobs.append((job, future))
            self._ready.notify()
        return future.result()  # type: ignore[return-value]

    def close(self) -> None:
        """Stop after writing what was submitted."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()

    def _write(self) -> None:
        while True:
            with self._ready:
                while not self._jobs and not self._closed:
                    self._ready.wait()
                if not self._jobs and self._closed:
                    return
                group, self._jobs = self._jobs[: self.max_group], self._jobs[self.max_group :]
            self._commit(group)

    def _commit(self, group: list[tuple[Callable[[Session], object], Future[object]]]) -> None:
        done: list[tuple[Future[object], object]] = []
        failed: list[tuple[Future[object], BaseException]] = []
        try:
            with self.db.session() as session:
                for job, future in group:
                    try:
                        with session.begin_nested():
                            done.append((future, job(session)))
                    except Exception as exc:  # this message alone: its savepoint rolled back
                        failed.append((future, exc))
        except BaseException as exc:  # the commit itself failed: nobody was stored
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for future, result in done:
            future.set_result(result)
        for future, error in failed:
            future.set_exception(error)
