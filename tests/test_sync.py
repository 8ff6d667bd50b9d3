"""Membership sync from a CSV file or an SQL query, by hand and scheduled in the daemon;
and `members export` with role, status, source and date.

Real databases throughout (the `db` fixture: SQLite, and PostgreSQL when configured),
SQLite source files made here, and the local DNS server of tests/dnsserver.py.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
import logging
import sqlite3
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from conftest import make_list, settings_for, start_daemon
from dnsserver import DnsServer
from sink import Sink

from listserv import config, lists, members, sync
from listserv.cli import cli
from listserv.config import DnsSettings, SyncSettings
from listserv.db import Database
from listserv.dns import Resolver
from listserv.errors import ConfigError
from listserv.models import AuditEntry, DeliveryStatus, Member, Role

LIST = "staff@lists.example.org"


def write_csv(path: Path, *rows: str, header: str = "address,name") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def roster(db: Database) -> dict[tuple[str, Role], str]:
    """(address, role) -> source, for every row of the list."""
    with db.reading() as session:
        mlist = lists.get(session, LIST)
        return {(m.address, m.role): m.source for m in members.roster(session, mlist)}


def member_addresses(db: Database) -> set[str]:
    return {a for (a, role) in roster(db) if role is Role.MEMBER}


def run_sync(db: Database, path: Path, name: str = "hr", **kwargs: Any) -> sync.SyncReport:
    return sync.sync(db, LIST, sync.read_csv(path), name=name, **kwargs)


def test_csv_sync_adds_the_missing_and_removes_only_its_own_departed(
    db: Database, tmp_path: Path
) -> None:
    make_list(db, members_=["manual@example.org"])  # owner@example.org owns it
    first = write_csv(
        tmp_path / "a.csv",
        "ann@example.org,Ann A",
        "bob@example.org,Bob",
        "manual@example.org,",
        "owner@example.org,The Owner",
    )
    report = run_sync(db, first)
    assert sorted(report.added) == ["ann@example.org", "bob@example.org", "owner@example.org"]
    assert report.removed == [] and report.unchanged == 1
    rows = roster(db)
    assert rows[("ann@example.org", Role.MEMBER)] == "sync:hr"
    assert rows[("manual@example.org", Role.MEMBER)] == "manual"
    with db.reading() as session:
        ann = session.scalars(sa.select(Member).where(Member.address == "ann@example.org")).one()
        assert ann.display_name == "Ann A"

    second = write_csv(tmp_path / "b.csv", "bob@example.org,Bob")
    report = run_sync(db, second)
    assert report.added == []
    assert report.removed == ["ann@example.org", "owner@example.org"]
    rows = roster(db)
    assert member_addresses(db) == {"bob@example.org", "manual@example.org"}
    assert ("owner@example.org", Role.OWNER) in rows  # the owner row is never the sync's


def test_members_of_another_source_or_sync_are_never_removed(db: Database, tmp_path: Path) -> None:
    make_list(db)
    with db.session() as session:
        mlist = lists.get(session, LIST)
        members.add(session, mlist, ["sender@example.org"], role=Role.SENDER, source="sync:hr")
        members.add(session, mlist, ["moderator@example.org"], role=Role.MODERATOR)
        members.add(session, mlist, ["imported@example.org"], source="import")
        members.add(session, mlist, ["joined@example.org"], source="subscribe")
    run_sync(db, write_csv(tmp_path / "other.csv", "other@example.org"), name="other")
    report = run_sync(db, write_csv(tmp_path / "empty.csv"))
    assert report.removed == [] and report.added == []
    assert member_addresses(db) == {
        "imported@example.org",
        "joined@example.org",
        "other@example.org",
    }
    assert ("sender@example.org", Role.SENDER) in roster(db)
    assert run_sync(db, write_csv(tmp_path / "e.csv"), name="other").removed == [
        "other@example.org"
    ]


def test_a_dry_run_reports_the_diff_and_changes_nothing(db: Database, tmp_path: Path) -> None:
    make_list(db)
    run_sync(db, write_csv(tmp_path / "a.csv", "ann@example.org", "bob@example.org"))
    before = roster(db)
    path = write_csv(tmp_path / "b.csv", "bob@example.org", "cid@example.org", "nonsense")
    dry = run_sync(db, path, dry_run=True)
    assert (dry.added, dry.removed, dry.unchanged) == (["cid@example.org"], ["ann@example.org"], 1)
    assert dry.invalid[0][0] == 4
    assert roster(db) == before
    real = run_sync(db, path)
    assert (real.added, real.removed, real.invalid) == (dry.added, dry.removed, dry.invalid)
    assert member_addresses(db) == {"bob@example.org", "cid@example.org"}


def test_an_address_that_unsubscribed_is_not_added_back(db: Database, tmp_path: Path) -> None:
    make_list(db)
    path = write_csv(tmp_path / "a.csv", "ann@example.org", "Bob@Example.org")
    run_sync(db, path)
    with db.session() as session:
        members.unsubscribe(session, lists.get(session, LIST), "bob@example.org", via="email")
    report = run_sync(db, path)
    assert report.added == [] and report.removed == []
    assert report.unsubscribed == [(3, "Bob@example.org")]
    assert member_addresses(db) == {"ann@example.org"}


def test_invalid_rows_are_reported_with_their_line_and_skipped(
    db: Database, tmp_path: Path
) -> None:
    make_list(db)
    path = write_csv(
        tmp_path / "a.csv",
        "ann@example.org,Ann",  # line 2
        "not an address,X",
        ",nobody",
        "staff-request@lists.example.org,the list itself",
        "a..b@example.org,",
        "ann@example.org,Ann again",  # listed twice: the first row counts
        "bob@example.org",
    )
    report = run_sync(db, path)
    assert report.added == ["ann@example.org", "bob@example.org"]
    assert [row for row, _ in report.invalid] == [3, 4, 5, 6]
    assert "no address" in report.invalid[1][1]
    assert "addresses of staff@lists.example.org itself" in report.invalid[2][1]


def make_source_db(path: Path, people: list[tuple[str, str, int]]) -> str:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS people (email TEXT, full_name TEXT, active INT)")
        conn.execute("DELETE FROM people")
        conn.executemany("INSERT INTO people VALUES (?, ?, ?)", people)
    conn.close()
    return f"sqlite:///{path}"


QUERY = "SELECT email, full_name FROM people WHERE active = 1 ORDER BY rowid"


def test_sqlite_source_adds_and_removes(db: Database, tmp_path: Path) -> None:
    make_list(db)
    source = tmp_path / "hr.db"
    url = make_source_db(
        source, [("ann@example.org", "Ann", 1), ("bob@example.org", "Bob", 1), ("x@y.org", "", 0)]
    )
    report = sync.sync(db, LIST, sync.read_sql(url, QUERY), name="hr")
    assert report.added == ["ann@example.org", "bob@example.org"]
    make_source_db(source, [("ann@example.org", "Ann", 0), ("bob@example.org", "Bob", 1)])
    report = sync.sync(db, LIST, sync.read_sql(url, QUERY), name="hr")
    assert (report.added, report.removed, report.unchanged) == ([], ["ann@example.org"], 1)
    assert member_addresses(db) == {"bob@example.org"}


def test_sql_source_on_the_test_backend_including_postgresql(db: Database, db_url: str) -> None:
    """The source is a table in the test database itself: SQLite, or PostgreSQL when
    LISTSERV_TEST_DATABASE_URL is set (any SQLAlchemy URL works the same)."""
    make_list(db)
    with db.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE hr_people (mail VARCHAR(100), name VARCHAR(100))"))
        conn.execute(
            sa.text("INSERT INTO hr_people VALUES ('ann@example.org', 'Ann'), (NULL, 'Ghost')")
        )
    rows = sync.read_sql(db_url, "SELECT mail, name FROM hr_people ORDER BY name")
    report = sync.sync(db, LIST, rows, name="hr")
    assert report.added == ["ann@example.org"]
    assert report.invalid == [(2, "no address")]


def test_a_source_failing_midway_changes_nothing(db: Database, tmp_path: Path) -> None:
    make_list(db)
    source = tmp_path / "hr.db"
    url = make_source_db(source, [(f"p{i}@example.org", "", 1) for i in range(5)])
    sync.sync(db, LIST, sync.read_sql(url, QUERY), name="hr")
    before = roster(db)
    # json() of a bad text fails at the fourth row, after three rows came back
    failing = (
        "SELECT CASE WHEN rowid = 4 THEN json('not json') ELSE 'new' || email END"
        " FROM people ORDER BY rowid"
    )
    with pytest.raises(sync.SyncError, match="malformed JSON"):
        sync.sync(db, LIST, sync.read_sql(url, failing), name="hr")
    path = tmp_path / "broken.csv"
    path.write_bytes(b"address\nnew1@example.org\nnew2@example.org\nz\xff@example.org\n")
    with pytest.raises(sync.SyncError, match="not UTF-8"):
        run_sync(db, path)
    entry = SyncSettings(name="hr", list=LIST, from_sql=url, query=failing)
    assert sync.run_once(db, entry) is None
    assert roster(db) == before


def test_a_failure_while_writing_rolls_the_whole_sync_back(db: Database, tmp_path: Path) -> None:
    """A trigger refuses one delete, after the inserts ran: none of them stays."""
    make_list(db)
    run_sync(db, write_csv(tmp_path / "a.csv", "stuck@example.org", "ann@example.org"))
    before = roster(db)
    with db.engine.begin() as conn:
        if db.is_sqlite:
            conn.execute(
                sa.text(
                    "CREATE TRIGGER no_delete BEFORE DELETE ON members"
                    " WHEN OLD.address = 'stuck@example.org'"
                    " BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
                )
            )
        else:
            conn.execute(
                sa.text(
                    "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN"
                    " RAISE EXCEPTION 'refused by a test trigger'; END $$ LANGUAGE plpgsql"
                )
            )
            conn.execute(
                sa.text(
                    "CREATE TRIGGER no_delete BEFORE DELETE ON members FOR EACH ROW"
                    " WHEN (OLD.address = 'stuck@example.org') EXECUTE FUNCTION refuse()"
                )
            )
    many = [f"n{i}@example.org" for i in range(6000)]  # more than one INSERT chunk
    with pytest.raises(sa.exc.DBAPIError, match="refused by a test trigger"):
        run_sync(db, write_csv(tmp_path / "b.csv", "ann@example.org", *many))
    assert roster(db) == before


def test_a_large_sync_costs_a_few_statements_not_one_per_row(db: Database, tmp_path: Path) -> None:
    make_list(db)
    path = write_csv(tmp_path / "big.csv", *(f"user{i}@d{i % 50}.example" for i in range(20000)))
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    sa.event.listen(db.engine, "before_cursor_execute", count)
    try:
        report = run_sync(db, path)
        assert len(report.added) == 20000
        added = len(statements)
        statements.clear()
        keep = write_csv(
            tmp_path / "half.csv", *(f"user{i}@d{i % 50}.example" for i in range(0, 20000, 2))
        )
        report = run_sync(db, keep)
        assert len(report.removed) == 10000 and report.unchanged == 10000
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", count)
    # the driver's insertmanyvalues sends at most 1,000 rows a statement
    assert added <= 40, added
    assert len(statements) <= 20, statements
    assert len(member_addresses(db)) == 10000


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        server.mx["mx.example"] = [(10, "mail.mx.example")]
        server.mx["null.example"] = [(0, ".")]
        server.a["a-only.example"] = ["192.0.2.1"]
        server.aaaa["v6.example"] = ["2001:db8::1"]
        yield server


def resolver_for(server: DnsServer) -> Resolver:
    return Resolver(DnsSettings(nameservers=(server.address,), timeout=2.0))


def test_check_mx_refuses_domains_that_take_no_mail(
    db: Database, tmp_path: Path, dns_server: DnsServer
) -> None:
    make_list(db)
    path = write_csv(
        tmp_path / "a.csv",
        "ann@mx.example",
        "bob@null.example",
        "cid@nx.example",
        "dan@a-only.example",
        "eve@v6.example",
        "fay@MX.example",
    )
    report = run_sync(db, path, domains=sync.MailDomains(resolver_for(dns_server)))
    assert report.added == [
        "ann@mx.example",
        "dan@a-only.example",
        "eve@v6.example",
        "fay@mx.example",
    ]
    assert report.invalid == [
        (3, "bob@null.example: null.example accepts no mail (null MX, RFC 7505)"),
        (4, "cid@nx.example: nx.example has no mail server (no MX, A or AAAA record)"),
    ]
    assert dns_server.count("mx.example") == 1  # asked once for both addresses
    assert run_sync(db, path).added == ["bob@null.example", "cid@nx.example"]  # no check


def test_check_mx_refuses_new_addresses_when_dns_fails_but_keeps_members(
    db: Database, tmp_path: Path, dns_server: DnsServer
) -> None:
    make_list(db)
    run_sync(db, write_csv(tmp_path / "a.csv", "ann@mx.example"))
    dns_server.mode = "servfail"
    path = write_csv(tmp_path / "b.csv", "ann@mx.example", "bob@mx.example")
    report = run_sync(db, path, domains=sync.MailDomains(resolver_for(dns_server)))
    assert report.added == [] and report.removed == []
    assert [row for row, _ in report.invalid] == [2, 3]
    assert "could not check mx.example" in report.invalid[0][1]
    assert member_addresses(db) == {"ann@mx.example"}


def test_sync_config_entries_are_parsed_and_checked() -> None:
    text = textwrap.dedent(
        """
        [[sync]]
        name = "hr-staff"
        list = "staff@lists.example.org"
        from = "/srv/hr/staff.csv"
        interval = 900
        check_mx = true

        [[sync]]
        name = "students"
        list = "students@lists.example.org"
        from_sql = "postgresql+psycopg://reader@db.example.org/sis"
        query = "SELECT email, name FROM students WHERE enrolled"
        """
    )
    env = {"LISTSERV_SYNC_HR_STAFF_FROM_SQL": "x", "LISTSERV_SYNC_STUDENTS_FROM_SQL": "sqlite://"}
    with pytest.raises(ConfigError, match="'hr-staff': give either 'from'"):
        config.from_dict(tomllib.loads(text), env=env)
    s = config.from_dict(tomllib.loads(text), env={"LISTSERV_SYNC_STUDENTS_FROM_SQL": "sqlite://"})
    assert s.sync == (
        SyncSettings(
            name="hr-staff",
            list="staff@lists.example.org",
            path="/srv/hr/staff.csv",
            interval=900.0,
            check_mx=True,
        ),
        SyncSettings(
            name="students",
            list="students@lists.example.org",
            from_sql="sqlite://",
            query="SELECT email, name FROM students WHERE enrolled",
        ),
    )
    assert config.from_dict({}).sync == ()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"list": LIST, "from": "a.csv"}, "'name' is required"),
        ({"name": "Bad Name", "list": LIST, "from": "a.csv"}, "name: lower-case letters"),
        ({"name": "x", "list": LIST}, "give either 'from' (a CSV file) or 'from_sql'"),
        ({"name": "x", "list": LIST, "from_sql": "sqlite://"}, "'from_sql' and 'query' go"),
        ({"name": "x", "list": LIST, "from": "a.csv", "interval": 0}, "interval: must be"),
        ({"name": "x", "list": LIST, "from": "a.csv", "every": 5}, "unknown key 'every'"),
        ({"name": "x", "list": LIST, "from": 5}, "expected str"),
    ],
)
def test_bad_sync_entries_name_the_problem(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_dict({"sync": [entry]}, source="listserv.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("listserv.toml: [[sync]]")
    with pytest.raises(ConfigError, match="used twice"):
        twice = {"name": "x", "list": LIST, "from": "a.csv"}
        config.from_dict({"sync": [twice, twice]})
    with pytest.raises(ConfigError, match=r"\[\[sync\]\] tables"):
        config.from_dict({"sync": {"name": "x"}})


def test_run_once_logs_its_counts_and_a_missing_file_changes_nothing(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_list(db)
    caplog.set_level(logging.INFO, logger="listserv.sync")
    path = write_csv(tmp_path / "a.csv", "ann@example.org", "bad address")
    entry = SyncSettings(name="hr", list=LIST, path=str(path))
    report = sync.run_once(db, entry)
    assert report is not None and report.added == ["ann@example.org"]
    assert (
        f"sync hr to {LIST}: added 1, removed 0, unchanged 0, invalid 1, skipped 0 (unsubscribed)"
        in caplog.messages
    )
    path.unlink()
    assert sync.run_once(db, entry) is None
    assert any(
        r.levelno == logging.ERROR and "nothing changed" in r.message and "cannot read" in r.message
        for r in caplog.records
    )
    assert member_addresses(db) == {"ann@example.org"}
    missing_list = dataclasses.replace(entry, list="nobody@lists.example.org")
    write_csv(path, "ann@example.org")
    assert sync.run_once(db, missing_list) is None


async def test_the_daemon_runs_configured_syncs(
    db: Database, db_url: str, sink: Sink, tmp_path: Path
) -> None:
    make_list(db)
    path = write_csv(tmp_path / "a.csv", "ann@example.org", "bob@example.org")
    settings = dataclasses.replace(
        settings_for(db_url, sink.port, tmp_path),
        sync=(SyncSettings(name="hr", list=LIST, path=str(path), interval=3600),),
    )
    daemon = await start_daemon(settings)
    try:
        for _ in range(200):  # the first run comes at start; wait for its commit
            if await asyncio.to_thread(member_addresses, db):
                break
            await asyncio.sleep(0.05)
    finally:
        await daemon.stop()
    assert member_addresses(db) == {"ann@example.org", "bob@example.org"}
    assert set(roster(db).values()) >= {"sync:hr"}


# -- the command line --------------------------------------------------------------


@pytest.fixture
def cli_config(db: Database, db_url: str, tmp_path: Path) -> Path:
    make_list(db)
    path = tmp_path / "listserv.toml"
    path.write_text(f'[database]\nurl = "{db_url}"\n', encoding="utf-8")
    return path


def invoke(config_path: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config_path), *args])


def test_cli_sync_prints_the_diff_and_dry_run_changes_nothing(
    db: Database, cli_config: Path, tmp_path: Path
) -> None:
    invoke(
        cli_config,
        "members",
        "sync",
        LIST,
        "--from",
        str(write_csv(tmp_path / "a.csv", "ann@example.org")),
    )
    path = write_csv(tmp_path / "b.csv", "bob@example.org,Bob", "oops")
    result = invoke(cli_config, "members", "sync", LIST, "--from", str(path), "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "added 1, removed 1, unchanged 0, invalid 1, skipped 0 (unsubscribed)"
        " (dry run: nothing changed)",
        "would add bob@example.org",
        "would remove ann@example.org",
        "row 3: invalid: invalid address 'oops': an email address must have an @-sign",
    ]
    assert member_addresses(db) == {"ann@example.org"}
    result = invoke(cli_config, "members", "sync", LIST, "--from", str(path), "--source", "other")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == [
        "added 1, removed 0, unchanged 0, invalid 1, skipped 0 (unsubscribed)",
        "added bob@example.org",
    ]
    assert roster(db)[("bob@example.org", Role.MEMBER)] == "sync:other"
    with db.reading() as session:
        entries = session.execute(
            sa.select(AuditEntry.actor, AuditEntry.detail).where(
                AuditEntry.action == "members.sync"
            )
        ).all()
    assert [tuple(e) for e in entries] == [  # the dry run left no trace
        ("cli", "sync:cli: added 1, removed 0, unchanged 0, invalid 0, skipped 0 (unsubscribed)"),
        ("cli", "sync:other: added 1, removed 0, unchanged 0, invalid 1, skipped 0 (unsubscribed)"),
    ]


def test_cli_sync_from_sql(db: Database, cli_config: Path, tmp_path: Path) -> None:
    url = make_source_db(tmp_path / "hr.db", [("ann@example.org", "Ann", 1)])
    result = invoke(cli_config, "members", "sync", LIST, "--from-sql", url, "--query", QUERY)
    assert result.exit_code == 0, result.output
    assert "added ann@example.org" in result.stdout.splitlines()
    assert roster(db)[("ann@example.org", Role.MEMBER)] == "sync:cli"


def test_cli_sync_check_mx_uses_the_configured_resolver(
    db: Database,
    cli_config: Path,
    tmp_path: Path,
    dns_server: DnsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with cli_config.open("a", encoding="utf-8") as f:
        f.write(f'[dns]\nnameservers = ["{dns_server.address}"]\n')
    # the suite's empty loopback DNS server is set in the environment for `serve`
    # children, and the environment overrides the file: this test's server wins only so
    monkeypatch.delenv("LISTSERV_DNS_NAMESERVERS", raising=False)
    path = write_csv(tmp_path / "a.csv", "ann@mx.example", "bob@null.example")
    result = invoke(cli_config, "members", "sync", LIST, "--from", str(path), "--check-mx")
    assert result.exit_code == 0, result.output
    assert "row 3: invalid: bob@null.example: null.example accepts no mail" in result.stdout
    assert member_addresses(db) == {"ann@mx.example"}


def assert_one_line_error(result: Result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr


def test_cli_sync_errors_are_one_line(db: Database, cli_config: Path, tmp_path: Path) -> None:
    sync_ = ("members", "sync", LIST)
    path = write_csv(tmp_path / "ok.csv", "ann@example.org")
    assert_one_line_error(
        invoke(cli_config, *sync_, "--from", str(tmp_path / "none.csv")), "cannot read"
    )
    header = write_csv(tmp_path / "h.csv", "ann@example.org", header="mail,name")
    assert_one_line_error(
        invoke(cli_config, *sync_, "--from", str(header)), "must name an 'address' column"
    )
    assert_one_line_error(
        invoke(cli_config, *sync_, "--from-sql", "nosuch://x", "--query", "SELECT 1"),
        "bad SQL URL",
    )
    assert_one_line_error(
        invoke(
            cli_config,
            *sync_,
            "--from-sql",
            "postgresql+psycopg://u:secret@127.0.0.1:1/x",
            "--query",
            "SELECT 1",
        ),
        "SQL source postgresql+psycopg://u:***@127.0.0.1:1/x",
    )
    url = make_source_db(tmp_path / "hr.db", [])
    assert_one_line_error(
        invoke(cli_config, *sync_, "--from-sql", url, "--query", "SELECT * FROM missing_table"),
        "no such table: missing_table",
    )
    assert_one_line_error(
        invoke(cli_config, *sync_, "--from-sql", url, "--query", "DELETE FROM people"),
        "must SELECT address",
    )
    assert_one_line_error(
        invoke(cli_config, *sync_, "--from", str(header), "--source", "No Good"), "not a sync name"
    )
    assert_one_line_error(
        invoke(cli_config, "members", "sync", "none@lists.example.org", "--from", str(path)),
        "no such list: none@lists.example.org",
    )
    usage = invoke(cli_config, *sync_)
    assert usage.exit_code == 2 and "give either --from" in usage.stderr
    assert member_addresses(db) == set()


def test_export_gives_role_status_source_and_date_and_imports_again(
    db: Database, cli_config: Path, tmp_path: Path
) -> None:
    run_sync(db, write_csv(tmp_path / "a.csv", "ann@example.org,Änn"))
    with db.session() as session:
        row = session.scalars(sa.select(Member).where(Member.address == "ann@example.org")).one()
        row.delivery_status, row.disabled_reason = DeliveryStatus.DISABLED, "bounce"
        created = row.created_at
    exported = invoke(cli_config, "members", "export", LIST)
    assert exported.exit_code == 0, exported.output
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert list(rows[0]) == ["address", "name", "role", "status", "reason", "source", "subscribed"]
    ann = next(r for r in rows if r["address"] == "ann@example.org")
    assert ann == {
        "address": "ann@example.org",
        "name": "Änn",
        "role": "member",
        "status": "disabled",
        "reason": "bounce",
        "source": "sync:hr",
        "subscribed": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    owner = next(r for r in rows if r["role"] == "owner")
    assert (owner["status"], owner["reason"]) == ("enabled", "")

    as_json = json.loads(invoke(cli_config, "members", "export", LIST, "--format", "json").stdout)
    assert next(r for r in as_json if r["address"] == "ann@example.org") == {
        "address": "ann@example.org",
        "name": "Änn",
        "role": "member",
        "status": "disabled",
        "disabled_reason": "bounce",
        "source": "sync:hr",
        "subscribed": ann["subscribed"],
    }

    assert invoke(cli_config, "lists", "create", "copy@lists.example.org").exit_code == 0
    imported = CliRunner().invoke(
        cli,
        ["--config", str(cli_config), "members", "import", "copy@lists.example.org", "-"],
        input=exported.stdout,
    )
    assert imported.stdout.splitlines()[0] == "added 2, skipped 0, invalid 0", imported.output
    again = invoke(cli_config, "members", "export", "copy@lists.example.org").stdout
    copied = [(r["address"], r["name"], r["role"]) for r in csv.DictReader(io.StringIO(again))]
    assert copied == [(r["address"], r["name"], r["role"]) for r in rows]


async def until(condition: Any, timeout: float = 20.0) -> None:
    """Wait for a condition checked in a thread (it reads the database)."""
    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(condition):
            await asyncio.sleep(0.02)


async def test_the_schedule_runs_each_sync_again_after_its_interval(
    db: Database, tmp_path: Path
) -> None:
    """A clock that jumps 10,000 s a reading: every sync (interval 3,600 s) is due at
    each turn of the loop, without waiting for real time."""
    make_list(db)
    path = write_csv(tmp_path / "a.csv", "ann@example.org")
    readings = iter(range(0, 10**9, 10000))
    settings = dataclasses.replace(
        config.from_dict({}), sync=(SyncSettings(name="hr", list=LIST, path=str(path)),)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(sync.run(db, settings, stop=stop, clock=lambda: next(readings)))
    try:
        await until(lambda: member_addresses(db) == {"ann@example.org"})
        write_csv(path, "bob@example.org")
        await until(lambda: member_addresses(db) == {"bob@example.org"})
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    # no entries: returns at once, though nobody sets its stop event
    await asyncio.wait_for(sync.run(db, config.from_dict({}), stop=asyncio.Event()), 10)
