"""Fixtures: real databases (SQLite always, PostgreSQL when configured), a real SMTP sink,
and the real daemon on ephemeral ports.

Set LISTSERV_TEST_DATABASE_URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)
to run every `db` test on PostgreSQL too; each test gets its own schema.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from dnsserver import DnsServer
from sink import Sink
from sqlalchemy.engine import make_url

from listserv import config, lists, members
from listserv.config import Settings
from listserv.daemon import Daemon
from listserv.db import Database
from listserv.models import MailingList, PostingPolicy, Role

PG_URL = os.environ.get("LISTSERV_TEST_DATABASE_URL", "")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_url" in metafunc.fixturenames:
        metafunc.parametrize("db_url", BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once with `alembic upgrade head`, copied for each test."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    db = Database(f"sqlite:///{path}")
    db.upgrade()
    db.dispose()
    return path


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> Iterator[str]:
    if request.param == "sqlite":
        path = tmp_path / "listserv.db"
        shutil.copy(sqlite_template, path)
        yield f"sqlite:///{path}"
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    url_text = url.render_as_string(hide_password=False)
    try:
        migrator = Database(url_text)
        migrator.upgrade()
        migrator.dispose()
        yield url_text
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    yield database
    database.dispose()


def make_list(
    db: Database,
    address: str = "staff@lists.example.org",
    *,
    policy: PostingPolicy = PostingPolicy.ANNOUNCE,
    members_: list[str] = (),  # type: ignore[assignment]
    senders: list[str] = (),  # type: ignore[assignment]
    **settings: str,
) -> str:
    with db.session() as session:
        mlist: MailingList = lists.create(
            session, address, owners=["owner@example.org"], policy=policy
        )
        for key, value in settings.items():
            lists.set_setting(session, mlist, key, value)
        if members_:
            members.add(session, mlist, list(members_))
        if senders:
            members.add(session, mlist, list(senders), role=Role.SENDER)
        return mlist.address


#: An empty DNS server on loopback (NXDOMAIN for every name) that daemons started
#: by tests ask unless told otherwise: DMARC and SPF look-ups never leave the host.
_NULL_DNS: DnsServer | None = None


@pytest.fixture(scope="session", autouse=True)
def null_dns() -> Iterator[DnsServer]:
    global _NULL_DNS
    before = os.environ.get("LISTSERV_DNS_NAMESERVERS")
    with DnsServer() as server:
        _NULL_DNS = server
        os.environ["LISTSERV_DNS_NAMESERVERS"] = server.address  # `listserv serve` children
        yield server
    _NULL_DNS = None
    if before is None:
        os.environ.pop("LISTSERV_DNS_NAMESERVERS", None)
    else:
        os.environ["LISTSERV_DNS_NAMESERVERS"] = before


def null_dns_address() -> str:
    """The `[dns] nameservers` entry of the empty loopback DNS server, for config files."""
    assert _NULL_DNS is not None
    return _NULL_DNS.address


def settings_for(db_url: str, sink_port: int, tmp_path: Path, **overrides: Any) -> Settings:
    data: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": 0, "hostname": "lists.example.org"},
        "database": {"url": db_url},
        "delivery": {
            "host": "127.0.0.1",
            "port": sink_port,
            "retry_initial": 0.2,
            "retry_factor": 1.0,
            "poll_interval": 0.05,
            "timeout": 10.0,
            # delivery reports are mail to the poster: only tests about them ask for it
            "reports": False,
        },
        "dkim": {"keys_dir": str(tmp_path / "dkim")},
        "http": {"host": "127.0.0.1", "port": 0},
    }
    if _NULL_DNS is not None:
        data["dns"] = {"nameservers": [_NULL_DNS.address]}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        data.setdefault(section, {})[name] = value
    return config.from_dict(data, source="test")


def message(text: str) -> bytes:
    """Inline test message text to CRLF bytes."""
    return textwrap.dedent(text).lstrip("\n").replace("\n", "\r\n").encode("utf-8")


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with Sink() as s:
        yield s


class RunningDaemon:
    def __init__(self, daemon: Daemon, task: asyncio.Task[None]) -> None:
        self.daemon = daemon
        self.task = task

    @property
    def port(self) -> int:
        return self.daemon.smtp_port

    async def stop(self) -> None:
        self.daemon.stop()
        await asyncio.wait_for(self.task, 30)


async def start_daemon(settings: Settings) -> RunningDaemon:
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run())
    ready = asyncio.create_task(daemon.ready.wait())
    await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        if task.done():
            task.result()  # raise the startup error
        raise TimeoutError("daemon did not start")
    return RunningDaemon(daemon, task)


@pytest.fixture
async def daemon_factory(db_url: str, sink: Sink, tmp_path: Path) -> AsyncIterator[Any]:
    started: list[RunningDaemon] = []

    async def factory(**overrides: Any) -> RunningDaemon:
        running = await start_daemon(settings_for(db_url, sink.port, tmp_path, **overrides))
        started.append(running)
        return running

    yield factory
    for running in started:
        if not running.task.done():
            await running.stop()
