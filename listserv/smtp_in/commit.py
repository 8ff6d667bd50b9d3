"""How accepted mail reaches the disk before the 250: the seam where intake's store
step meets a transaction.

`DirectCommit` gives each message its own durable transaction. A group commit
(one writer thread storing the messages of many sessions in savepoints of one
transaction) was built and measured here: with 1 to 100 concurrent clients it
was no faster (94-99 against 99-111 posts/s at 100 clients, 2 cores), because
intake is CPU-bound rather than bound by the flush, and it added a thread hop to
every message; so it was taken out. This seam is where it would go back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from sqlalchemy.orm import Session

from listserv.db import Database

T = TypeVar("T")


class Committer(Protocol):
    def run(self, job: Callable[[Session], T], *, label: str = "") -> T: ...


class DirectCommit:
    """Each message in its own durable transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def run(self, job: Callable[[Session], T], *, label: str = "") -> T:
        with self.db.session() as session:
            return job(session)
