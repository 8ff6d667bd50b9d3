"""`listserv bounces list|show|reset`, run through click on both databases."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import make_list

from listserv import lists
from listserv.bounces import score
from listserv.cli import cli
from listserv.db import Database
from listserv.models import BounceKind, PostingPolicy

LIST = "staff@lists.example.org"
ANN, BOB = "ann@example.com", "bob@example.com"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
def run(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for name in ("LISTSERV_CONFIG", "LISTSERV_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "listserv.toml"
    path.write_text(f'[database]\nurl = "{db_url}"\n[dkim]\nkeys_dir = "{tmp_path}/dkim"\n')

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, ["--config", str(path), *args])

    return invoke


def bounced(db: Database) -> None:
    make_list(db, LIST, policy=PostingPolicy.MEMBERS, members_=[ANN, BOB])
    with db.session() as s:
        mlist = lists.get(s, LIST)
        for day in range(5):
            score.register(
                s,
                mlist,
                ANN,
                BounceKind.PERMANENT,
                now=T0 + timedelta(days=day),
                source="smtp",
                status="550",
                detail="550 5.1.1 no such user",
            )
        score.register(s, mlist, BOB, BounceKind.TEMPORARY, now=T0, source="dsn", status="4.4.1")


def test_bounces_list_shows_scores_and_status(db: Database, run) -> None:  # type: ignore[no-untyped-def]
    bounced(db)
    result = run("bounces", "list", LIST)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["MEMBER", "SCORE", "LAST", "BOUNCE", "STATUS"]
    assert lines[1].split() == [ANN, "5", "2026-11-06T09:00:00+00:00", "disabled", "(bounce)"]
    assert lines[2].split() == [BOB, "0.5", "2026-11-02T09:00:00+00:00", "enabled"]
    data = json.loads(run("bounces", "list", LIST, "--format", "json").output)
    assert [(d["address"], d["score"], d["delivery"]) for d in data] == [
        (ANN, 5.0, "disabled"),
        (BOB, 0.5, "enabled"),
    ]


def test_bounces_show_lists_the_history(db: Database, run) -> None:  # type: ignore[no-untyped-def]
    bounced(db)
    result = run("bounces", "show", LIST, ANN.upper())
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"{ANN}: score 5, last bounce 2026-11-06T09:00:00+00:00")
    assert "disabled (bounce)" in lines[0] and "warnings sent 1" in lines[0]
    assert lines[1].split()[:5] == ["AT", "KIND", "SOURCE", "STATUS", "POST"]
    assert len(lines) == 2 + 5 and all("permanent  smtp" in line for line in lines[2:])
    data = json.loads(run("bounces", "show", LIST, BOB, "--format", "json").output)
    assert [(e["kind"], e["source"], e["status"]) for e in data["events"]] == [
        ("temporary", "dsn", "4.4.1")
    ]


def test_bounces_reset_turns_delivery_back_on(db: Database, run) -> None:  # type: ignore[no-untyped-def]
    bounced(db)
    result = run("bounces", "reset", LIST, ANN)
    assert result.exit_code == 0, result.output
    assert result.output == f"{ANN}: bounce score reset, delivery enabled\n"
    assert run("bounces", "list", LIST).output.splitlines()[1].split()[:2] == [BOB, "0.5"]


def test_bounces_commands_refuse_unknown_lists_and_members_in_one_line(
    db: Database,
    run,  # type: ignore[no-untyped-def]
) -> None:
    bounced(db)
    for args in (
        ("list", "nope@lists.example.org"),
        ("show", LIST, "stranger@example.com"),
        ("reset", LIST, "stranger@example.com"),
        ("reset", LIST, "not an address"),
    ):
        result = run("bounces", *args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1
