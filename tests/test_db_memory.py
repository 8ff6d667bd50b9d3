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


BLOBS = sa.Table(
    "blobs",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("raw", sa.LargeBinary),
)


def test_a_connection_that_moved_a_large_value_is_not_kept_with_its_buffers(
    db: Database,
) -> None:
    """libpq keeps its buffers as large as the largest message a connection carried, in
    both directions; SQLite's statement cache keeps what it bound (issue 15)."""
    BLOBS.create(db.engine)
    large = bytes(range(256)) * (memory.MMAP_THRESHOLD // 256 + 1)

    def write(value: bytes) -> None:
        with db.session() as session:
            session.execute(sa.insert(BLOBS).values(raw=value))

    def read(row: int) -> bytes | None:
        with db.reading() as session:
            return session.scalar(sa.select(BLOBS.c.raw).where(BLOBS.c.id == row))

    first = _driver_connection(db)
    write(b"small")
    assert read(1) == b"small"
    assert _driver_connection(db) is first  # small values keep the pooled connection

    write(large)
    second = _driver_connection(db)
    assert second is not first
    assert read(2) == large
    # PostgreSQL's input buffer now holds it; SQLite reads it from its page cache
    assert (_driver_connection(db) is not second) is not db.is_sqlite
    with db.reading() as session:
        assert list(session.scalars(sa.select(BLOBS.c.raw).order_by(BLOBS.c.id))) == [
            b"small",
            large,
        ]
