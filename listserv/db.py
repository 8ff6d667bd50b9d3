"""Engine, sessions and schema migrations.

One `Database` object per process. On SQLite (the embedded default) it turns on
WAL, foreign keys and a busy timeout, and starts write transactions with
``BEGIN IMMEDIATE`` so that two writers queue up instead of failing half-way
through a transaction; read-only sessions use a plain deferred ``BEGIN``.
On PostgreSQL the queue claims use ``FOR UPDATE SKIP LOCKED`` (distribute/batches.py).
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from listserv import memory
from listserv.errors import DatabaseError

MIGRATIONS = str(Path(__file__).with_name("migrations"))

#: PostgreSQL connections each process keeps open (more, up to 20, are opened for a while)
POOL_SIZE = 20
#: SQLite's page cache per connection, in KiB (its default is about 2,000). Each pooled
#: connection fills its own as the database grows, and the kernel caches the file
#: anyway: the daemon's memory grew 13 % from 100,000 to 1,000,000 members with the
#: default, 3 % with this, at the same speed
SQLITE_CACHE_KIB = 512


class Database:
    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = make_url(url)
        if self.url.drivername == "postgresql":
            self.url = self.url.set(drivername="postgresql+psycopg")
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            # room for the SMTP intake's threads (smtp_in/handler.py) and the daemon's
            # tasks: a connection beyond pool_size is closed when handed back, and
            # each new one is a PostgreSQL backend forked (measured: 60 a second)
            kwargs.update(pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=20)
        self.engine = sa.create_engine(self.url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        _drop_large_bindings(self.engine)
        self._write = sessionmaker(self.engine, expire_on_commit=False)
        self._writers = _WriterQueue()
        self._lock_fds_of: tuple[int, int] | None = None
        self._lock_pid = 0
        fast: sa.Engine
        reader: sa.Engine
        if self.is_sqlite:
            fast = self.engine.execution_options(sqlite_sync="NORMAL")
            reader = self.engine.execution_options(sqlite_begin="DEFERRED")
        else:
            fast = reader = self.engine
        self._fast = sessionmaker(fast, expire_on_commit=False)
        self._read = sessionmaker(reader, expire_on_commit=False)

    @property
    def sqlite_path(self) -> Path | None:
        db = self.url.database
        if not self.is_sqlite or not db or db == ":memory:":
            return None
        return Path(db)

    @contextmanager
    def session(self, *, durable: bool = True, first: bool = False) -> Iterator[Session]:
        """A write transaction: committed on success, rolled back on error.

        durable=False skips the flush to disk at commit (SQLite: synchronous=NORMAL;
        PostgreSQL: synchronous_commit off). Still safe against a crashed or killed
        process; a power cut may forget the last such commits. Use it only where
        forgetting is harmless: queue bookkeeping, which then redelivers rather than
        loses. Mail is always stored with durable=True.

        first=True: somebody is waiting on this commit (an SMTP client for its 250),
        so on SQLite it goes ahead of the background writers queued for the write
        lock (see `_writer_slot`).
        """
        with (
            self._writer_slot(first),
            (self._write if durable else self._fast).begin() as session,
        ):
            if not durable and not self.is_sqlite:
                session.execute(sa.text("SET LOCAL synchronous_commit TO OFF"))
            yield session

    @contextmanager
    def _writer_slot(self, first: bool = False) -> Iterator[None]:
        """On SQLite, let writers queue for the write lock here, not in SQLite.

        SQLite makes a writer that finds the database locked sleep in steps of up
        to 100 ms before it retries. Threads of one process queue in `_WriterQueue`
        instead, and processes (delivery workers, the CLI) on an exclusive flock of
        `<database>.writer`: the kernel hands it over the moment the previous
        writer commits. (Measured: two delivery workers on one file were slower
        than one until they queued this way.) PostgreSQL needs no such thing.

        Writers with `first` go ahead of the others. Measured (issue 15): with one
        client posting to a 200-member list, its commit waited 8-16 ms behind the
        delivery's bookkeeping (claiming, recording results, snapshots: 7-14 ms
        each), three quarters of its time to the 250. Across processes a `first`
        writer holds a shared flock of `<database>.first` while it waits and
        writes, and the others take that lock exclusively (at most
        `FIRST_YIELD` seconds) before they queue: so a worker process's
        bookkeeping waits for the front process's mail too, without starving.
        """
        if not self.is_sqlite:
            yield
            return
        with self._writers.turn(first):
            fds = self._lock_fds()
            if fds is None:
                yield
                return
            writer, ahead = fds
            if first:
                fcntl.flock(ahead, fcntl.LOCK_SH)
            try:
                if first:
                    fcntl.flock(writer, fcntl.LOCK_EX)
                else:
                    _take_behind_first(writer, ahead)
                try:
                    yield
                finally:
                    fcntl.flock(writer, fcntl.LOCK_UN)
            finally:
                if first:
                    fcntl.flock(ahead, fcntl.LOCK_UN)

    def _lock_fds(self) -> tuple[int, int] | None:
        """The descriptors of `<database>.writer` and `<database>.first`, opened once
        per process (None: an in-memory database)."""
        path = self.sqlite_path
        if path is None:
            return None
        if self._lock_fds_of is None or self._lock_pid != os.getpid():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fds_of = (
                os.open(path.with_name(path.name + ".writer"), os.O_RDWR | os.O_CREAT, 0o600),
                os.open(path.with_name(path.name + ".first"), os.O_RDWR | os.O_CREAT, 0o600),
            )
            self._lock_pid = os.getpid()
        return self._lock_fds_of

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only transaction that never blocks writers."""
        with self._read() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
        if self._lock_fds_of is not None and self._lock_pid == os.getpid():
            for fd in self._lock_fds_of:
                os.close(fd)
        self._lock_fds_of = None

    # -- migrations -------------------------------------------------------

    def _alembic_config(self) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", MIGRATIONS)
        url = self.url.render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        return cfg

    def upgrade(self) -> tuple[str | None, str]:
        """Create or upgrade the schema to the newest revision; returns (before, after)."""
        path = self.sqlite_path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        before = self.current_revision()
        cfg = self._alembic_config()
        # SQLite rebuilds tables to alter them: with foreign keys on, dropping the old
        # table would cascade-delete every row that refers to it. Migrate with them
        # off, then check that every reference still holds before committing.
        engine = self.engine
        if self.is_sqlite:
            engine = sa.create_engine(self.url, connect_args={"timeout": 30})
            _configure_sqlite(engine, foreign_keys=False)
        try:
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                if self.is_sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise DatabaseError(f"migration left broken references: {broken[:5]}")
        finally:
            if engine is not self.engine:
                engine.dispose()
        return before, self.head_revision()

    def head_revision(self) -> str:
        head = ScriptDirectory.from_config(self._alembic_config()).get_current_head()
        assert head is not None
        return head

    def current_revision(self) -> str | None:
        path = self.sqlite_path
        if path is not None and not path.exists():
            return None
        try:
            with self.engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()
        except sa.exc.OperationalError as exc:
            raise DatabaseError(f"cannot open the database {self.safe_url}: {exc.orig}") from exc

    def check_ready(self) -> None:
        """Raise a one-line DatabaseError unless the schema is at the newest revision."""
        current = self.current_revision()
        if current is None:
            raise DatabaseError(f"database {self.safe_url} is not initialized: run `listserv init`")
        if current != self.head_revision():
            raise DatabaseError(
                f"database {self.safe_url} is at revision {current}, "
                f"this listserv needs {self.head_revision()}: run `listserv init`"
            )

    @property
    def safe_url(self) -> str:
        return self.url.render_as_string(hide_password=True)


#: seconds a background writer waits at most for other processes' `first` writers
FIRST_YIELD = 0.05


def _take_behind_first(writer: int, ahead: int) -> None:
    """Take the write flock for a background writer, behind every `first` writer of
    any process (for FIRST_YIELD seconds at most).

    A background writer waits on the write flock while the current transaction runs;
    a first writer that starts waiting meanwhile waits there too, and the kernel
    hands the lock to either. Measured (issue 15), the intake's slowest commits each
    waited for two or three background transactions in a row (10-25 ms each). So a
    background writer that gets the flock while a first writer is waiting hands it
    straight back and waits for the first writers again.
    """
    deadline = time.monotonic() + FIRST_YIELD
    while True:
        _wait_for_first(ahead, deadline)
        fcntl.flock(writer, fcntl.LOCK_EX)
        if time.monotonic() >= deadline or not _first_waiting(ahead):
            return
        fcntl.flock(writer, fcntl.LOCK_UN)


def _first_waiting(ahead: int) -> bool:
    """Some process has a first writer waiting or writing (holds `ahead` shared)."""
    try:
        fcntl.flock(ahead, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(ahead, fcntl.LOCK_UN)
    return False


def _wait_for_first(ahead: int, deadline: float) -> None:
    """Wait until no process has a first writer waiting or writing, or the deadline.

    flock has no queue order: a stream of shared holders could keep an exclusive
    taker out for good, so this polls a millisecond apart instead of blocking.
    """
    while _first_waiting(ahead) and time.monotonic() < deadline:
        time.sleep(0.001)


class _WriterQueue:
    """One process's writers, one at a time; those marked `first` go ahead of the rest."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._busy = False
        self._first_waiting = 0

    @contextmanager
    def turn(self, first: bool) -> Iterator[None]:
        with self._changed:
            if first:
                self._first_waiting += 1
                try:
                    self._changed.wait_for(lambda: not self._busy)
                finally:
                    self._first_waiting -= 1
            else:
                self._changed.wait_for(lambda: not self._busy and not self._first_waiting)
            self._busy = True
        try:
            yield
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()


def db_now(session: Session) -> datetime:
    """The database's clock: lease times of every host are measured on it.

    PostgreSQL's ``now()`` (the transaction's start) is shared by every daemon on
    the database; an SQLite file has one host, whose clock is the database's.
    """
    if session.get_bind().dialect.name == "sqlite":
        return datetime.now(UTC)
    value = session.scalar(sa.select(sa.func.now()))
    assert isinstance(value, datetime)
    return value.astimezone(UTC)


def insert_ids(session: Session, model: type[Any], rows: list[dict[str, Any]]) -> list[int]:
    """Insert `rows` into the table of `model` (a mapped class) in one Core statement:
    their new ids, in the rows' order.

    To keep RETURNING in the rows' order SQLAlchemy sends SQLite one INSERT per row
    (it knows no sentinel there): 12 statements for the intake's group of 6 posts,
    20 for a 200-member post's batches, each letting go of the interpreter lock and
    waiting to get it back while SQLite's write lock is held (issue 15). On SQLite
    one multi-row INSERT goes instead, and its ids are sorted: SQLite inserts the
    rows in the order written and gives each a larger id than any before it (our
    tables are AUTOINCREMENT; tests/test_group_commit.py holds SQLite to that)."""
    if not rows:
        return []
    table = cast(sa.Table, model.__table__)
    if session.get_bind().dialect.name == "sqlite":
        return sorted(session.connection().scalars(sa.insert(table).returning(table.c.id), rows))
    ordered = sa.insert(table).returning(table.c.id, sort_by_parameter_order=True)
    return list(session.connection().scalars(ordered, rows))


def _configure_sqlite(engine: sa.Engine, *, foreign_keys: bool = True) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        options = conn.get_execution_options()
        begin = options.get("sqlite_begin", "IMMEDIATE")
        if begin != "DEFERRED":  # durability matters to writers only
            sync = options.get("sqlite_sync", "FULL")
            if conn.info.get("synchronous") != sync:  # a statement saved per transaction
                conn.exec_driver_sql(f"PRAGMA synchronous={sync}")
                conn.info["synchronous"] = sync
        conn.exec_driver_sql(f"BEGIN {begin}")


#: Connection.info key: the connection bound a value of a megabyte or more
_LARGE_BINDING = "listserv_large_binding"

#: Execution options of a statement whose values are all known to be small (ids,
#: addresses, states): the look for a large value after it is skipped. That look
#: cost a snapshot of 100,000 recipients 0.2-0.3 s of CPU in its executemany rows.
_SMALL = "listserv_small_values"
SMALL_VALUES = {_SMALL: True}


def _drop_large_bindings(engine: sa.Engine) -> None:
    """A connection that moved a large value is closed when it goes back to the pool.

    SQLite: Python's sqlite3 keeps each prepared statement in a per-connection cache
    and never clears its bindings, and SQLite keeps its own copy of a bound blob:
    every pooled connection that stored a 10 MB message held another 10 MB until the
    same statement ran again (issue 15: about 80 MB after eight large posts).
    Reopening an SQLite connection takes well under a millisecond.

    PostgreSQL: libpq never shrinks its input and output buffers: measured, a
    connection held 9.5 MB more after sending a 9.9 MB message and 19 MB more after
    reading one (bytea arrives as hex text). Over the pool, eight such posts kept
    about 230 MB for good (issue 15). So a psycopg connection that received a bytea
    value of a megabyte or more goes too. Reconnecting takes a few milliseconds.

    Only large mail does either.
    """
    reads = engine.dialect.driver == "psycopg"  # large values read are noted too

    if reads:

        @event.listens_for(engine.pool, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            if _is_psycopg(dbapi_conn):
                dbapi_conn.adapters.register_loader(BYTEA_OID, _bytea_loader())

    @event.listens_for(engine, "after_cursor_execute")
    def _after(
        conn: sa.Connection,
        _cursor: Any,
        _statement: str,
        parameters: Any,
        context: Any,
        _executemany: bool,
    ) -> None:
        if context is not None and context.execution_options.get(_SMALL):
            return
        if _large(parameters):
            conn.info[_LARGE_BINDING] = True

    @event.listens_for(engine.pool, "checkin")
    def _checkin(dbapi_conn: Any, record: Any) -> None:
        if record is None:
            return
        sent = record.info.pop(_LARGE_BINDING, False)
        received = reads and dbapi_conn in _RECEIVED_LARGE
        if received:
            _RECEIVED_LARGE.discard(dbapi_conn)
        if sent or received:
            record.invalidate()


def _is_psycopg(dbapi_conn: Any) -> bool:
    psycopg = sys.modules.get("psycopg")  # imported by the dialect of a PostgreSQL engine
    return psycopg is not None and isinstance(dbapi_conn, psycopg.Connection)


#: psycopg connections that received a value of a megabyte or more since they were
#: last checked in (weak: a connection closed meanwhile simply goes)
_RECEIVED_LARGE: weakref.WeakSet[Any] = weakref.WeakSet()


@cache
def _bytea_loader() -> type[Any]:
    """psycopg's own bytea loader, noting the connections that receive a large value."""
    import psycopg
    from psycopg import abc
    from psycopg.adapt import Loader
    from psycopg.pq import Format

    found = psycopg.adapters.get_loader(BYTEA_OID, Format.TEXT)
    assert found is not None
    stock: type[abc.Loader] = found

    class Noting(Loader):
        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            self._stock = stock(oid, context)

        def load(self, data: Any) -> Any:
            if len(data) >= memory.MMAP_THRESHOLD and self.connection is not None:
                _RECEIVED_LARGE.add(self.connection)
            return self._stock.load(data)

    return Noting


#: PostgreSQL's type oid of bytea
BYTEA_OID = 17


def _large(parameters: Any) -> bool:
    """Some value among the parameters (one row, or the rows of an executemany) is
    a megabyte or more.

    Runs after every statement: plain loops, not a recursion through generators,
    which took 2.6 ms for an executemany of 1,000 rows (a snapshot chunk's)."""
    binary = getattr(sys.modules.get("psycopg"), "Binary", None)
    if _big(parameters, binary):
        return True
    for row in _values(parameters):
        if isinstance(row, _TEXT):
            if len(row) >= memory.MMAP_THRESHOLD:
                return True
        elif isinstance(row, dict | list | tuple):
            for value in _values(row):
                if isinstance(value, _TEXT):
                    if len(value) >= memory.MMAP_THRESHOLD:
                        return True
                elif binary is not None and _big(value, binary):
                    return True
        elif binary is not None and _big(row, binary):
            return True
    return False


_TEXT = (bytes, bytearray, memoryview, str)


def _values(parameters: Any) -> Iterable[Any]:
    if isinstance(parameters, dict):
        return parameters.values()
    if isinstance(parameters, list | tuple):
        return parameters
    return ()


def _big(value: Any, binary: Any) -> bool:
    if binary is not None and isinstance(value, binary):
        value = value.obj  # how SQLAlchemy binds a LargeBinary value for psycopg
    return isinstance(value, _TEXT) and len(value) >= memory.MMAP_THRESHOLD
