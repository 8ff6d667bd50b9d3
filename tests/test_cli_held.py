"""`listserv held`: list, show, approve, reject, discard, run for real on a SQLite file."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from test_moderation import LIST, MODERATOR, SENDER, body, hold_post, notices_to, post_of

from listserv import lists, members
from listserv.cli import cli
from listserv.db import Database
from listserv.models import AuditEntry, PostState, Role, utcnow

Run = Callable[..., Result]


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LISTSERV_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def database(tmp_path: Path) -> Database:
    url = f"sqlite:///{tmp_path}/db.sqlite"
    (tmp_path / "listserv.toml").write_text(
        textwrap.dedent(
            f"""
            [database]
            url = "{url}"
            [dkim]
            keys_dir = "{tmp_path}/dkim"
            """
        ),
        encoding="utf-8",
    )
    db = Database(url)
    db.upgrade()
    with db.session() as s:
        mlist = lists.create(s, LIST, owners=["owner@example.org"])
        members.add(s, mlist, ["ann@one.example", "bob@two.example", "cat@three.example"])
        members.add(s, mlist, [MODERATOR], role=Role.MODERATOR)
    return db


@pytest.fixture
def run(tmp_path: Path, database: Database) -> Run:
    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, ["--config", str(tmp_path / "listserv.toml"), *args])

    return invoke


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def fails(result: Result, text: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], result.output
    assert "Traceback" not in result.output


def test_held_list_shows_each_held_post_with_its_age_and_reason(
    run: Run, database: Database
) -> None:
    assert ok(run("held", "list")).strip() == "no held posts"
    created = utcnow() - timedelta(days=3, hours=2)
    first = hold_post(database, subject="Party", created_at=created, reason="not a member")
    second = hold_post(database, subject="Second", created_at=utcnow())
    out = ok(run("held", "list", LIST))
    header, row, _ = out.splitlines()
    assert header.split() == ["ID", "LIST", "SENDER", "AGE", "SUBJECT", "REASON"]
    assert row.split()[:6] == [str(first), LIST, SENDER, "3d", "2h", "Party"]
    assert row.endswith("not a member")
    data = json.loads(ok(run("held", "list", "--format", "json")))
    assert [d["id"] for d in data] == [first, second]
    assert data[0]["list"] == LIST and data[0]["sender"] == SENDER
    assert data[0]["created_at"] == created.isoformat(timespec="seconds")
    assert data[0]["age_seconds"] >= 3 * 86400 and data[0]["size"] > 100


def test_held_show_prints_headers_reason_size_recipients_and_text(
    run: Run, database: Database
) -> None:
    post_id = hold_post(database, subject="Party", reason="not a member", created_at=utcnow())
    out = ok(run("held", "show", str(post_id)))
    assert f"Post:       {post_id} to {LIST}" in out
    assert "Reason:     not a member" in out
    assert "Recipients: 3" in out
    assert "Subject: Party" in out and f"From: Stranger <{SENDER}>" in out
    assert "Let me in, please." in out
    assert int(out.split("Size:")[1].split()[0]) > 100


def test_held_approve_accepts_tells_the_sender_and_audits_as_cli(
    run: Run, database: Database
) -> None:
    post_id = hold_post(database, created_at=utcnow())
    out = ok(run("held", "approve", str(post_id)))
    assert out.strip() == f"post {post_id} to {LIST} approved: it goes out now"
    post = post_of(database, post_id)
    assert post.state is PostState.ACCEPTED and post.decided_by == "cli"
    assert "was approved" in str(notices_to(database, SENDER)[-1]["Subject"])
    with database.reading() as s:
        actor = s.scalar(sa.select(AuditEntry.actor).where(AuditEntry.action == "post.approve"))
    assert actor == "cli"
    assert ok(run("held", "list")).strip() == "no held posts"


def test_held_approve_at_sets_not_before(run: Run, database: Database) -> None:
    post_id = hold_post(database, created_at=utcnow())
    ok(run("held", "approve", str(post_id), "--at", "2099-01-02 03:04"))
    not_before = post_of(database, post_id).not_before
    assert not_before is not None and not_before.isoformat() == "2099-01-02T03:04:00+00:00"


def test_held_reject_tells_the_sender_the_reason(run: Run, database: Database) -> None:
    post_id = hold_post(database, created_at=utcnow())
    ok(run("held", "reject", str(post_id), "--reason", "Wrong list."))
    assert post_of(database, post_id).state is PostState.REJECTED
    assert "Wrong list." in body(notices_to(database, SENDER)[-1])


def test_held_discard_tells_the_sender_only(run: Run, database: Database) -> None:
    post_id = hold_post(database, created_at=utcnow())
    ok(run("held", "discard", str(post_id)))
    assert post_of(database, post_id).state is PostState.DISCARDED
    [told] = notices_to(database, SENDER)
    assert "was not distributed" in str(told["Subject"])
    assert notices_to(database, MODERATOR) == []


def test_bad_ids_and_decided_posts_are_one_line_errors(run: Run, database: Database) -> None:
    post_id = hold_post(database, created_at=utcnow())
    fails(run("held", "show", "999"), "no such post: 999")
    fails(run("held", "approve", "999"), "no such post: 999")
    fails(run("held", "approve", str(post_id), "--at", "soon"), "not a time: 'soon'")
    fails(run("held", "list", "nope@lists.example.org"), "no such list")
    ok(run("held", "discard", str(post_id)))
    fails(run("held", "reject", str(post_id)), f"post {post_id} is not held: it is discarded")
    fails(run("held", "show", str(post_id)), "decided by cli")
    assert post_of(database, post_id).state is PostState.DISCARDED
