"""Group commit: the mail of many SMTP sessions shares one durable transaction, and a
message that fails fails alone."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv.db import Database
from listserv.models import AuditEntry
from listserv.smtp_in.commit import GroupCommit


def test_waiting_messages_share_one_transaction_and_a_failure_stays_alone(
    db: Database,
) -> None:
    committer = GroupCommit(db)
    first_inside = threading.Event()
    release = threading.Event()
    sessions: dict[str, int] = {}
    serials = itertools.count()

    def blocking(session: Session) -> str:
        first_inside.set()
        release.wait(10)
        return store(session, "first")

    def store(session: Session, name: str) -> str:
        session.add(AuditEntry(actor=name, action="test"))
        session.flush()
        sessions[name] = session.info.setdefault("serial", next(serials))
        if name == "bad":
            raise ValueError("this one fails")
        return name

    try:
        with ThreadPoolExecutor(12) as pool:
            first = pool.submit(committer.run, blocking)
            assert first_inside.wait(10)
            names = [f"m{i}" for i in range(9)] + ["bad"]
            rest = {n: pool.submit(committer.run, lambda s, n=n: store(s, n)) for n in names}
            # every one of them is queued while the first group holds the writer
            while len(committer._jobs) < len(names):
                threading.Event().wait(0.01)
            release.set()
            assert first.result(10) == "first"
            for name, future in rest.items():
                if name == "bad":
                    with pytest.raises(ValueError, match="this one fails"):
                        future.result(10)
                else:
                    assert future.result(10) == name
    finally:
        committer.close()
    assert len({sessions[n] for n in names}) == 1  # one transaction for the nine and the bad
    assert sessions["first"] != sessions["m0"]
    with db.reading() as s:
        stored = set(s.scalars(sa.select(AuditEntry.actor)))
    assert stored == {"first", *(f"m{i}" for i in range(9))}  # the bad one rolled back alone
