"""Storage verbs on real databases: SQLite always, PostgreSQL when configured."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import make_list
from test_queue import _accepted_post, _queue

from listserv import config, lists, members
from listserv.bounces import score as bounce_score
from listserv.db import SQLITE_CACHE_KIB, Database
from listserv.distribute import posts
from listserv.errors import AlreadyExists, DatabaseError, InvalidAddress, InvalidInput
from listserv.models import (
    AuditEntry,
    Base,
    Delivery,
    DeliveryBatch,
    Post,
    PostState,
    RecipientState,
    Role,
)

POLICY = config.DeliverySettings(retry_initial=60, retry_factor=2, retry_give_up_after=3600)


# SQLite cannot reflect an expression index (ix_members_snapshot, ix_members_address):
# SQLAlchemy and Alembic say so and skip them; PostgreSQL compares them.
@pytest.mark.filterwarnings("ignore:.*expression-based index")
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


def test_looking_up_one_address_on_a_list_reads_an_index_not_the_list(db: Database) -> None:
    """Who may post, unsubscribe and bounce scoring ask about one address (any case)
    on a list: each of their statements is planned on ix_members_address."""
    address = make_list(db)
    with db.session() as s:
        mlist = lists.get(s, address)
        members.import_csv(
            s,
            mlist,
            b"address\n" + b"".join(b"u%d@d%d.example\n" % (i, i % 50) for i in range(2000)),
        )
    if not db.is_sqlite:
        with db.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE members")
    seen: list[tuple[str, object]] = []

    def capture(_c: object, _cursor: object, statement: str, params: object, *_: object) -> None:
        if "lower(members.address)" in statement:
            seen.append((statement, params))

    sa.event.listen(db.engine, "before_cursor_execute", capture)
    try:
        with db.session() as s:
            mlist = lists.get(s, address)
            assert len(members.rows_for(s, mlist, ["U7@D7.example"])) == 1
            assert members.roles_of(s, mlist, ["u8@d8.example", "x@y.example"]) == {Role.MEMBER}
            assert len(bounce_score.member_rows(s, mlist, "U9@d9.example")) == 1
            assert members.unsubscribe(s, mlist, "u10@D10.example", via="test")
            assert members.remove(s, mlist, ["u11@d11.example"]) == (["u11@d11.example"], [])
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", capture)
    assert len(seen) >= 5
    explain = "EXPLAIN QUERY PLAN " if db.is_sqlite else "EXPLAIN "
    with db.engine.connect() as conn:
        for statement, params in seen:
            plan = " ".join(str(r) for r in conn.exec_driver_sql(explain + statement, params))  # type: ignore[arg-type]
            assert "ix_members_address" in plan, (statement, plan)


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


def test_an_import_in_chunks_skips_a_line_repeating_an_earlier_chunk(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rows are checked and inserted a chunk at a time (the file is never all in memory):
    # a row of an earlier chunk, already inserted, is what a later duplicate meets
    monkeypatch.setattr(members, "IMPORT_CHUNK", 3)
    address = make_list(db, members_=["old@one.example"])
    data = (
        b"address,name,role\n"
        + b"".join(b"u%d@one.example,,member\n" % i for i in range(7))  # lines 2-8
        + b"U1@ONE.example,,member\n"  # line 9: line 3's address, another case
        + b"u1@one.example,,sender\n"  # line 10: the same address, another role
        + b"old@one.example,,\n"  # line 11: on the list before the import
        + b"u8@one.example,,member\n"
    )
    with db.session() as s:
        report = members.import_csv(s, lists.get(s, address), io.BytesIO(data))
    assert report.added == 7 + 1 + 1
    assert [line for line, _ in report.skipped] == [9, 11] and report.invalid == []
    with db.reading() as s:
        rows = members.roster(s, lists.get(s, address))
    pairs = sorted((m.address, m.role.value) for m in rows if m.role is not Role.OWNER)
    assert pairs == sorted(
        [(f"u{i}@one.example", "member") for i in (*range(7), 8)]
        + [("u1@one.example", "sender"), ("old@one.example", "member")]
    )


def test_an_import_failing_after_some_chunks_writes_nothing(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(members, "IMPORT_CHUNK", 2)
    address = make_list(db)
    data = b"address\n" + b"".join(b"u%d@one.example\n" % i for i in range(5)) + b"z\xff@x.org\n"
    with pytest.raises(InvalidInput, match=r"line 7: not UTF-8 text \(byte 2\)"):
        with db.session() as s:
            members.import_csv(s, lists.get(s, address), io.BytesIO(data))
    with db.reading() as s:
        assert [m.role for m in members.roster(s, lists.get(s, address))] == [Role.OWNER]


@pytest.mark.parametrize("block", [3, 7, 1 << 16])
def test_an_import_reads_lf_crlf_and_cr_alone_across_read_blocks(
    db: Database, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    # the file is read a block at a time: a CRLF or a line may be split between two
    # blocks, and Excel for Mac ends lines with a CR alone
    monkeypatch.setattr(members, "READ_BLOCK", block)
    address = make_list(db)
    data = (
        b"\xef\xbb\xbfaddress,name\r\n"
        b"a@one.example,Ann\r"
        b'b@one.example,"Bob, Jr"\n'
        b'c@one.example,"Cat\r\nCo"\r\n'  # a quoted line break: still one row
        b"not an address\r"
        b"d@one.example," + b"D" * 40 + b"\n"
        b"\xc3\xa9@one.example"  # the last line has no ending
    )
    with db.session() as s:
        report = members.import_csv(s, lists.get(s, address), io.BytesIO(data))
    assert report.added == 5 and [line for line, _ in report.invalid] == [6]
    with db.reading() as s:
        names = {m.address: m.display_name for m in members.roster(s, lists.get(s, address))}
    assert names["a@one.example"] == "Ann" and names["b@one.example"] == "Bob, Jr"
    assert names["c@one.example"] == "Cat\r\nCo" and names["d@one.example"] == "D" * 40
    assert "é@one.example" in names


# -- input is refused where it enters ------------------------------------------------------


def test_idn_member_in_either_form_is_one_member_stored_as_a_label(db: Database) -> None:
    address = make_list(db)
    with db.session() as s:
        mlist = lists.get(s, address)
        added, skipped = members.add(s, mlist, ["user@bücher.example"])
        assert added == ["user@xn--bcher-kva.example"] and skipped == []
        added, skipped = members.add(s, mlist, ["user@XN--BCHER-KVA.example"])
        assert added == [] and skipped == ["user@xn--bcher-kva.example"]
        report = members.import_csv(s, mlist, "address\nuser@Bücher.Example\n".encode())
        assert report.added == 0 and report.skipped == [(2, _already("user@xn--bcher-kva"))]
    with db.reading() as s:
        mlist = lists.get(s, address)
        assert [m.address for m in members.roster(s, mlist, Role.MEMBER)] == [
            "user@xn--bcher-kva.example"
        ]
        assert posts.recipients(s, mlist.id) == ["user@xn--bcher-kva.example"]
        assert members.roles_of(s, mlist, ["user@xn--bcher-kva.example"]) == {Role.MEMBER}


def _already(local_and_domain: str) -> str:
    return f"{local_and_domain}.example is already a member"


def test_idn_list_is_stored_as_a_label_and_found_in_any_case_and_form(db: Database) -> None:
    make_list(db, "Staff@Bücher.Example")
    with db.reading() as s:
        for spelling in (
            "staff@xn--bcher-kva.example",
            "STAFF@XN--BCHER-KVA.EXAMPLE",
            "staff@bücher.example",
            "Staff@BÜCHER.example",
        ):
            found = lists.find(s, spelling)
            assert found is not None, spelling
            assert (found.local_part, found.domain) == ("staff", "xn--bcher-kva.example")
        assert lists.find(s, "not an address") is None
    with db.session() as s, pytest.raises(AlreadyExists):
        lists.create(s, "staff@XN--BCHER-KVA.example")


@pytest.mark.parametrize(
    "own",
    [
        "staff@lists.example.org",
        "STAFF@Lists.Example.ORG",
        "staff-request@lists.example.org",
        "Staff-Bounces+x@lists.example.org",
        "staff-owner@lists.example.org",
    ],
)
def test_a_lists_own_addresses_are_refused_as_members(db: Database, own: str) -> None:
    address = make_list(db)
    with db.session() as s:
        mlist = lists.get(s, address)
        with pytest.raises(InvalidAddress, match=r"addresses of staff@lists\.example\.org itself"):
            members.add(s, mlist, ["ok@example.org", own])
        with pytest.raises(InvalidAddress, match=r"addresses of staff@lists\.example\.org itself"):
            members.add(s, mlist, [own], role=Role.SENDER)
        report = members.import_csv(s, mlist, f"address\nfine@example.org\n{own}\n".encode())
        assert report.added == 1
        assert [line for line, _ in report.invalid] == [3]
        assert "itself" in report.invalid[0][1]
    with db.reading() as s:
        roster = {m.address for m in members.roster(s, lists.get(s, address))}
    assert roster == {"owner@example.org", "fine@example.org"}  # the first add wrote nothing


def test_another_list_may_be_a_member_and_an_own_address_may_not_own(db: Database) -> None:
    staff = make_list(db)
    make_list(db, "all@lists.example.org")
    with db.session() as s:
        added, _ = members.add(s, lists.get(s, "all@lists.example.org"), [staff])
        assert added == [staff]
        with pytest.raises(InvalidAddress, match="own addresses"):
            lists.create(s, "news@lists.example.org", owners=["news-owner@lists.example.org"])
    with db.reading() as s:
        assert lists.find(s, "news@lists.example.org") is None


BAD_TEXT = [
    "[x]\r\nBcc: evil@example.org",
    "line\nbreak",
    "carriage\rreturn",
    "tab\there",
    "nul\x00",
    "escape\x1b[31m",
    "delete\x7f",
    "c1\x85next-line",
    "line\u2028separator",
]


@pytest.mark.parametrize("key", ["subject_prefix", "description"])
@pytest.mark.parametrize("value", BAD_TEXT)
def test_header_settings_refuse_control_characters_and_keep_the_old_value(
    db: Database, key: str, value: str
) -> None:
    address = make_list(db)
    with db.session() as s:
        mlist = lists.get(s, address)
        before = getattr(mlist, key)
        with pytest.raises(InvalidInput, match=rf"^{key}: control character U\+[0-9A-F]{{4}} at"):
            lists.set_setting(s, mlist, key, value)
        assert getattr(mlist, key) == before
        with pytest.raises(InvalidInput, match="control character"):
            lists.create(s, "other@lists.example.org", **{key: value})  # type: ignore[arg-type]
    with db.reading() as s:
        assert getattr(lists.get(s, address), key) == before
        assert lists.find(s, "other@lists.example.org") is None


@pytest.mark.parametrize("value", ["nul\x00", "bell\x07", "escape\x1b[0m", "bare\rreturn", "\x85"])
def test_the_footer_refuses_control_characters_other_than_newline_and_tab(
    db: Database, value: str
) -> None:
    address = make_list(db)
    with db.session() as s:
        mlist = lists.get(s, address)
        with pytest.raises(
            InvalidInput, match=r"footer: control character .* \(newlines and tabs are allowed\)"
        ):
            lists.set_setting(s, mlist, "footer", value)
        assert mlist.footer == ""


def test_the_footer_keeps_newlines_and_tabs_and_stores_crlf_as_lf(db: Database) -> None:
    address = make_list(db)
    with db.session() as s:
        lists.set_setting(s, lists.get(s, address), "footer", "Rules:\r\n\t1. Be kind.\nBye")
    with db.reading() as s:
        assert lists.get(s, address).footer == "Rules:\n\t1. Be kind.\nBye"


def test_header_settings_keep_their_length_limits(db: Database) -> None:
    address = make_list(db)
    with db.session() as s:
        mlist = lists.get(s, address)
        lists.set_setting(s, mlist, "description", "d" * 255)
        with pytest.raises(InvalidInput, match="description: at most 255 characters, got 256"):
            lists.set_setting(s, mlist, "description", "d" * 256)
        with pytest.raises(InvalidInput, match="subject_prefix: at most 100"):
            lists.set_setting(s, mlist, "subject_prefix", "p" * 101)
        assert mlist.description == "d" * 255


def _in_flight(db: Database, address: str) -> tuple[int, int, int]:
    """A sending post with 4 of 6 recipients open, one accepted and one held post."""
    sending = _queue(db, address, 6, per_batch=10)
    with db.session() as s:
        ids = list(s.scalars(sa.select(Delivery.id).where(Delivery.post_id == sending)))
        s.execute(
            sa.update(Delivery)
            .where(Delivery.id.in_(ids[:1]))
            .values(state=RecipientState.DELIVERED)
        )
        s.execute(
            sa.update(Delivery).where(Delivery.id.in_(ids[1:2])).values(state=RecipientState.FAILED)
        )
        s.execute(
            sa.update(Delivery)
            .where(Delivery.id.in_(ids[2:3]))
            .values(state=RecipientState.DEFERRED)
        )
    accepted = _accepted_post(db, address)
    held = _accepted_post(db, address)
    with db.session() as s:
        s.execute(sa.update(Post).where(Post.id == held).values(state=PostState.HELD))
    return sending, accepted, held


def test_delete_refuses_posts_in_flight_and_names_them(db: Database) -> None:
    address = make_list(db)
    sending, accepted, held = _in_flight(db, address)
    with db.session() as s:
        assert lists.in_flight(s, lists.get(s, address)) == [
            lists.PendingPost(sending, PostState.SENDING, 4),
            lists.PendingPost(accepted, PostState.ACCEPTED, 6),
            lists.PendingPost(held, PostState.HELD, 6),
        ]
        with pytest.raises(lists.PostsInFlight) as info:
            lists.delete(s, lists.get(s, address))
    assert str(info.value) == (
        f"not deleting {address}: 3 posts (1 waiting, 1 sending, 1 held) with 16 recipient(s)"
        " not yet delivered; wait for them, or pass --force to cancel them"
    )
    with db.reading() as s:
        assert lists.find(s, address) is not None
        assert s.scalar(sa.select(sa.func.count(Post.id))) == 3


def test_delete_with_force_cancels_posts_in_flight_and_records_them(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    address = make_list(db)
    sending, accepted, held = _in_flight(db, address)
    done = _accepted_post(db, address)
    with db.session() as s:
        s.execute(sa.update(Post).where(Post.id == done).values(state=PostState.SENT))
    with caplog.at_level("WARNING", logger="listserv.lists"), db.session() as s:
        cancelled = lists.delete(s, lists.get(s, address), force=True)
    assert [(p.id, p.state, p.open_recipients) for p in cancelled] == [
        (sending, PostState.SENDING, 4),
        (accepted, PostState.ACCEPTED, 6),
        (held, PostState.HELD, 6),
    ]
    with db.reading() as s:
        assert lists.find(s, address) is None
        for model in (Post, DeliveryBatch, Delivery):
            assert s.scalar(sa.select(sa.func.count()).select_from(model)) == 0
        entry = s.scalar(sa.select(AuditEntry).where(AuditEntry.action == "list.delete"))
    assert entry is not None and entry.list_address == address
    assert entry.detail.startswith("cancelled 3 posts (1 waiting, 1 sending, 1 held)")
    assert f"post {sending} (sending, 4 open)" in entry.detail
    assert f"post {held} (held, 6 open)" in entry.detail
    assert [r.getMessage() for r in caplog.records] == [f"deleted list {address}: {entry.detail}"]


def test_delete_without_posts_in_flight_needs_no_force(db: Database) -> None:
    address = make_list(db, members_=["a@example.org"])
    with db.session() as s:
        assert lists.delete(s, lists.get(s, address)) == []
    with db.reading() as s:
        assert lists.find(s, address) is None
        entry = s.scalar(sa.select(AuditEntry).where(AuditEntry.action == "list.delete"))
        assert entry is not None and entry.detail == ""


def test_upgrade_turns_stored_u_label_domains_into_a_labels(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = Database(f"sqlite:///{path}")
    cfg = db._alembic_config()
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
        conn.exec_driver_sql(
            "INSERT INTO mailing_lists (id, local_part, domain, posting_policy, delivery_mode,"
            " subject_prefix, description, footer, created_at) VALUES"
            " (1, 'staff', 'bücher.example', 'members', 'shared', '', '', '', '2026-01-01')"
        )
        for mid, address in enumerate(
            ["ann@bücher.example", "ann@xn--bcher-kva.example", "bob@zoë.example"], 1
        ):
            conn.exec_driver_sql(
                "INSERT INTO members (id, list_id, address, display_name, role,"
                f" delivery_status, created_at) VALUES ({mid}, 1, '{address}', '', 'member',"
                " 'enabled', '2026-01-01')"
            )
    db.dispose()
    db = Database(f"sqlite:///{path}")
    db.upgrade()
    with db.reading() as s:
        mlist = lists.find(s, "staff@bücher.example")
        assert mlist is not None and mlist.domain == "xn--bcher-kva.example"
        assert sorted(m.address for m in members.roster(s, mlist)) == [
            "ann@xn--bcher-kva.example",
            "bob@xn--zo-ija.example",
        ]
    db.dispose()


def test_each_sqlite_connection_keeps_a_small_page_cache(tmp_path: Path) -> None:
    # each pooled connection fills its own page cache as the database grows: with
    # SQLite's default (2 MB each) the daemon grew 13 % from 100,000 to 1,000,000 members
    db = Database(f"sqlite:///{tmp_path / 'cache.db'}")
    try:
        with db.reading() as one, db.reading() as two:
            sizes = [s.scalar(sa.text("PRAGMA cache_size")) for s in (one, two)]
        with db.session() as writer:
            sizes.append(writer.scalar(sa.text("PRAGMA cache_size")))
    finally:
        db.dispose()
    assert sizes == [-SQLITE_CACHE_KIB] * 3 and SQLITE_CACHE_KIB < 2000
