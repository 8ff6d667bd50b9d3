"""Storage verbs on real databases: SQLite always, PostgreSQL when configured."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import make_list

from listserv import config, lists, members
from listserv.db import Database
from listserv.distribute import posts
from listserv.errors import AlreadyExists, DatabaseError, InvalidAddress, InvalidInput
from listserv.models import (
    Base,
    Role,
)

POLICY = config.DeliverySettings(retry_initial=60, retry_factor=2, retry_give_up_after=3600)


def test_migrations_match_the_models(db: Database) -> None:
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert db.current_revision() == db.head_revision()


def test_upgrade_is_idempotent(db: Database) -> None:
    head = db.head_revision()
    assert db.upgrade() == (head, head)


def test_uninitialized_database_is_a_clear_error(tmp_path: object) -> None:
    fresh = Database(f"sqlite:///{tmp_path}/none.db")
    with pytest.raises(DatabaseError, match="not initialized: run `listserv init`"):
        fresh.check_ready()


def test_list_names_and_duplicates(db: Database) -> None:
    make_list(db, "Staff@Lists.Example.org")
    with db.session() as s:
        assert lists.get(s, "staff@lists.example.org").subject_prefix == "[staff]"
        with pytest.raises(AlreadyExists):
            lists.create(s, "STAFF@lists.example.org")
        for bad in ("staff-request@lists.example.org", "no at sign", "a b@x.org", "x@localhost"):
            with pytest.raises(InvalidAddress):
                lists.create(s, bad)


def test_settings_are_validated(db: Database) -> None:
    address = make_list(db)
    with db.session() as s:
        mlist = lists.get(s, address)
        lists.set_setting(s, mlist, "policy", "open")
        assert mlist.posting_policy.value == "open"
        with pytest.raises(InvalidInput, match="not one of"):
            lists.set_setting(s, mlist, "posting_policy", "everyone")
        with pytest.raises(InvalidInput, match="unknown setting"):
            lists.set_setting(s, mlist, "colour", "blue")


def test_members_roles_and_case_insensitive_lookup(db: Database) -> None:
    address = make_list(db, members_=["Ann@One.Example"], senders=["boss@example.org"])
    with db.session() as s:
        mlist = lists.get(s, address)
        added, skipped = members.add(s, mlist, ["ann@one.example", "new@one.example"])
        assert added == ["new@one.example"] and skipped == ["ann@one.example"]
        assert members.roles_of(s, mlist, ["ANN@one.example"]) == {Role.MEMBER}
        assert members.roles_of(s, mlist, ["boss@EXAMPLE.org"]) == {Role.SENDER}
        assert members.roles_of(s, mlist, ["owner@example.org"]) == {Role.OWNER}
        removed, missing = members.remove(s, mlist, ["ann@one.example", "zed@one.example"])
        assert removed == ["ann@one.example"] and missing == ["zed@one.example"]


def test_csv_import_reports_rows_and_is_all_or_nothing_on_fatal_errors(db: Database) -> None:
    address = make_list(db, members_=["dup@one.example"])
    data = (
        b"address,name,role\n"
        b"a@one.example,Ann,member\n"
        b"dup@one.example,,\n"
        b"bad@@x,Bad,member\n"
        b"c@two.example,Cat,chief\n"
        b"a@one.example,Ann again,member\n"
        b"s@two.example,,sender\n"
    )
    with db.session() as s:
        report = members.import_csv(s, lists.get(s, address), data)
    assert report.added == 2
    assert [line for line, _ in report.skipped] == [3, 6]
    assert [line for line, _ in report.invalid] == [4, 5]
    with db.session() as s, pytest.raises(InvalidInput, match="address"):
        members.import_csv(s, lists.get(s, address), b"email,name\nx@one.example,X\n")
    with db.reading() as s:
        assert len(members.roster(s, lists.get(s, address))) == 1 + 2 + 1  # owner counted


def test_large_import_is_bulk(db: Database) -> None:
    address = make_list(db)
    rows = "".join(f"user{i}@d{i % 50}.example,User {i},member\n" for i in range(20000))
    with db.session() as s:
        report = members.import_csv(
            s, lists.get(s, address), ("address,name,role\n" + rows).encode()
        )
    assert report.added == 20000
    with db.reading() as s:
        assert len(posts.recipients(s, lists.get(s, address).id)) == 20000
