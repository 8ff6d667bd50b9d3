"""SQLite writers queue in the process and across processes; mail waiting for its
250 (`session(first=True)`) goes ahead of the delivery's bookkeeping."""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from listserv import db as db_module
from listserv.db import FIRST_YIELD, Database


def _sqlite(tmp_path: Path, sqlite_template: Path) -> Database:
    path = tmp_path / "writers.db"
    shutil.copy(sqlite_template, path)
    return Database(f"sqlite:///{path}")


def _background(db: Database, order: list[str]) -> None:
    """A background writer's transaction (delivery bookkeeping)."""
    with db.session(durable=False) as session:
        session.execute(sa.text("SELECT 1"))
        order.append("background")


def _wait_until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_first_writer_goes_ahead_of_background_writers_queued_before_it(
    tmp_path: Path, sqlite_template: Path
) -> None:
    db = _sqlite(tmp_path, sqlite_template)
    order: list[str] = []
    release = threading.Event()
    holding = threading.Event()

    def holder() -> None:
        with db.session(durable=False) as session:
            session.execute(sa.text("SELECT 1"))
            holding.set()
            release.wait(10)
        order.append("holder")

    def writer(name: str, first: bool) -> None:
        with db.session(first=first) as session:
            session.execute(sa.text("SELECT 1"))
            order.append(name)

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    holding.wait(10)
    for name in ("background-1", "background-2"):
        threads.append(threading.Thread(target=writer, args=(name, False)))
        threads[-1].start()
    time.sleep(0.05)  # both queued behind the holder
    threads.append(threading.Thread(target=writer, args=("mail", True)))
    threads[-1].start()
    _wait_until(lambda: db._writers._first_waiting == 1)
    release.set()
    for thread in threads:
        thread.join(10)
    db.dispose()
    assert order[0] == "holder"
    assert order[1] == "mail", order
    assert sorted(order[2:]) == ["background-1", "background-2"]


def test_background_writers_wait_for_another_processes_first_writer_but_not_for_ever(
    tmp_path: Path, sqlite_template: Path
) -> None:
    db = _sqlite(tmp_path, sqlite_template)
    path = db.sqlite_path
    assert path is not None
    # another process's first writer: a shared lock of <db>.first while it waits and writes
    fd = os.open(path.with_name(path.name + ".first"), os.O_RDWR | os.O_CREAT, 0o600)
    order: list[str] = []
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)

        thread = threading.Thread(target=_background, args=(db, order))
        thread.start()
        time.sleep(FIRST_YIELD / 5)
        order.append("first done")
        fcntl.flock(fd, fcntl.LOCK_UN)
        thread.join(10)
        assert order == ["first done", "background"]

        # a first writer that never lets go holds the others back FIRST_YIELD at most
        fcntl.flock(fd, fcntl.LOCK_SH)
        started = time.monotonic()
        _background(db, order)
        assert FIRST_YIELD * 0.9 <= time.monotonic() - started
        assert order[-1] == "background"
    finally:
        os.close(fd)
        db.dispose()


def test_a_background_writer_that_gets_the_lock_while_a_first_writer_waits_hands_it_back(
    tmp_path: Path, sqlite_template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_module, "FIRST_YIELD", 10.0)  # no giving up in this test
    db = _sqlite(tmp_path, sqlite_template)
    path = db.sqlite_path
    assert path is not None
    # another process: its own descriptors of the two lock files
    writer = os.open(path.with_name(path.name + ".writer"), os.O_RDWR | os.O_CREAT, 0o600)
    ahead = os.open(path.with_name(path.name + ".first"), os.O_RDWR | os.O_CREAT, 0o600)
    order: list[str] = []
    try:
        fcntl.flock(writer, fcntl.LOCK_EX)  # its transaction in progress

        thread = threading.Thread(target=_background, args=(db, order))
        thread.start()
        time.sleep(0.1)  # the background writer waits for the write lock
        fcntl.flock(ahead, fcntl.LOCK_SH)  # and now mail waits for its 250 too
        fcntl.flock(writer, fcntl.LOCK_UN)
        time.sleep(0.1)  # the background writer was woken first, and took the lock
        fcntl.flock(writer, fcntl.LOCK_EX)  # it gave it back
        order.append("first")
        fcntl.flock(writer, fcntl.LOCK_UN)
        fcntl.flock(ahead, fcntl.LOCK_UN)
        thread.join(10)
        assert order == ["first", "background"]
    finally:
        os.close(writer)
        os.close(ahead)
        db.dispose()
