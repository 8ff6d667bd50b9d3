"""An SQLite connection that stored a large value is not kept with its copy of it (issue 15)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from listserv import memory
from listserv.db import Database


def _driver_connection(db: Database) -> object:
    with db.engine.connect() as conn:
        return conn.connection.driver_connection


def _store(db: Database, value: bytes) -> None:
    with db.session() as session:
        session.execute(sa.text("INSERT INTO blobs (raw) VALUES (:raw)"), {"raw": value})


def test_a_large_write_reopens_the_connection_and_keeps_the_row(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/memory.db")
    try:
        with db.session() as session:
            session.execute(sa.text("CREATE TABLE blobs (id INTEGER PRIMARY KEY, raw BLOB)"))
        first = _driver_connection(db)
        _store(db, b"small")
        assert _driver_connection(db) is first  # small writes keep the pooled connection

        large = b"x" * memory.MMAP_THRESHOLD
        _store(db, large)
        assert _driver_connection(db) is not first  # its statement cache held a copy
        with db.reading() as session:
            rows = list(session.execute(sa.text("SELECT raw FROM blobs ORDER BY id")).scalars())
        assert rows == [b"small", large]
    finally:
        db.dispose()
