"""Whether the worker that holds a lease still runs, without waiting for the lease.

Each daemon holds a lock named after its worker id for as long as it lives: on
SQLite an exclusive ``flock`` on a file beside the database, on PostgreSQL a
session advisory lock. The kernel drops the file lock and PostgreSQL the advisory
lock the moment the process dies, even while it lingers as a zombie, so a lease
whose owner's lock can be taken belongs to a dead worker and is freed at once.
(A PID check judged a killed daemon alive for 1.7 s after kill -9, long enough
to make its batches wait out their whole lease.)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import socket
from pathlib import Path

import sqlalchemy as sa

from listserv.db import Database

log = logging.getLogger("listserv.liveness")

#: the first key of listserv's PostgreSQL advisory locks ("LS")
_PG_CLASS = 0x4C53
_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


def worker_id(tag: str) -> str:
    """host:pid:tag, readable in `queue status` and logs; unique per daemon by its tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{tag}"


class Liveness:
    """Hold this worker's lock; tell whether another worker holds its own."""

    def __init__(self, db: Database) -> None:
        self.db = db
        path = db.sqlite_path
        self._dir = None if path is None else path.with_name(path.name + ".workers")
        self._fd: int | None = None
        self._conn: sa.Connection | None = None
        self._worker = ""

    def hold(self, worker: str) -> None:
        self._worker = worker
        if self._dir is not None:
            self._dir.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(self._file(worker), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._fd = fd
        elif not self.db.is_sqlite:
            self._conn = self.db.engine.connect()
            self._conn.execute(sa.select(sa.func.pg_advisory_lock(_PG_CLASS, _key(worker))))
            self._conn.commit()

    def check(self) -> None:
        """Take the lock again if its PostgreSQL session was lost (a database restart)."""
        if self._conn is None:
            return
        try:
            self._conn.execute(sa.select(1))
            self._conn.commit()
            return
        except sa.exc.DBAPIError:
            log.warning("lost the liveness lock's database session; taking it again")
        try:
            self._conn.close()
        finally:
            self._conn = None
        self.hold(self._worker)

    def alive(self, worker: str) -> bool:
        if worker == self._worker:
            return True
        if self._dir is not None:
            return self._file_held(self._file(worker))
        if self.db.is_sqlite:
            return True  # an in-memory database has no second process
        key = _key(worker)
        with self.db.engine.connect() as conn:
            got = conn.scalar(sa.select(sa.func.pg_try_advisory_lock(_PG_CLASS, key)))
            if got:
                conn.scalar(sa.select(sa.func.pg_advisory_unlock(_PG_CLASS, key)))
            conn.commit()
        return not got

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self._file(self._worker))
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        if self._conn is not None:
            try:
                self._conn.close()
            except sa.exc.DBAPIError:
                pass
            self._conn = None

    def _file(self, worker: str) -> Path:
        assert self._dir is not None
        return self._dir / (_UNSAFE.sub("_", worker) + ".lock")

    @staticmethod
    def _file_held(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False  # never held (or cleaned up after its owner died)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)  # also drops the lock if we got it
        try:
            os.unlink(path)
        except OSError:
            pass
        return False


def _key(worker: str) -> int:
    return int.from_bytes(hashlib.sha256(worker.encode()).digest()[:4], "big", signed=True)
