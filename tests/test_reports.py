"""Delivery reports: after a post's last batch the poster gets the numbers the sink saw;
bounces in the report window make one follow-up; each is sent exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from click.testing import CliRunner, Result
from conftest import make_list, message
from sink import Received, Sink
from test_e2e import send, wait_until
from test_moderation_e2e import mail_for

from listserv import lists, mail, members, reports
from listserv.cli import cli
from listserv.db import Database
from listserv.models import (
    Audience,
    BatchState,
    BounceEvent,
    BounceKind,
    Delivery,
    DeliveryBatch,
    InboundMessage,
    Post,
    PostState,
    RecipientState,
    Role,
)

LIST = "staff@lists.example.org"
SENDER = "boss@example.org"
OWNER = "owner@example.org"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def post_text(subject: str = "Budget", headers: str = "") -> bytes:
    return message(
        f"""
        From: Boss <{SENDER}>
        To: {LIST}
        Subject: {subject}
        Message-ID: <budget@example.org>
        {headers}
        The budget is approved.
        """
    )


def body(msg: EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


def cli_run(tmp_path: Path, db_url: str, *args: str) -> Result:
    path = tmp_path / "listserv.toml"
    path.write_text(f"[database]\nurl = {json.dumps(db_url)}\n")
    return CliRunner().invoke(cli, ["--config", str(path), *args])


def finished_post(
    db: Database,
    *,
    delivered: Sequence[str] = ("ann@one.example",),
    failed: Sequence[tuple[str, int | None, str]] = (),
    mail_from: str = SENDER,
    headers: str = "",
    audience: Audience = Audience.MEMBERS,
    state: PostState = PostState.SENT,
    batch_state: BatchState = BatchState.DONE,
) -> int:
    """A post whose batches are done, as the delivery engine leaves one."""
    raw = post_text(headers=headers)
    with db.session() as s:
        mlist = lists.get(s, LIST)
        inbound = InboundMessage(mail_from=mail_from, rcpt_tos=[LIST], kind="post", raw=raw)
        s.add(inbound)
        s.flush()
        post = Post(
            list_id=mlist.id,
            inbound_id=inbound.id,
            state=state,
            audience=audience,
            sender=SENDER,
            subject="Budget",
            message_id="<budget@example.org>",
            recipient_count=len(delivered) + len(failed),
            finished_at=T0 - timedelta(minutes=1),
        )
        s.add(post)
        s.flush()
        batch = DeliveryBatch(post_id=post.id, domain="one.example", state=batch_state)
        s.add(batch)
        s.flush()
        rows: list[dict[str, Any]] = [
            {"address": a, "state": RecipientState.DELIVERED, "code": 250, "detail": "OK"}
            for a in delivered
        ]
        rows += [
            {"address": a, "state": RecipientState.FAILED, "code": c, "detail": d}
            for a, c, d in failed
        ]
        if rows:
            s.execute(
                sa.insert(Delivery),
                [{"batch_id": batch.id, "post_id": post.id, **row} for row in rows],
            )
        return post.id


def report_notices(db: Database, kind: str = "Delivery report") -> list[Post]:
    with db.reading() as s:
        return list(
            s.scalars(
                sa.select(Post)
                .where(Post.audience == Audience.NOTICE, Post.subject.startswith(kind))
                .order_by(Post.id)
            )
        )


def notice_body(post: Post) -> str:
    assert post.prepared is not None
    return body(mail.parse(post.prepared))


def post_row(db: Database, post_id: int) -> Post:
    with db.reading() as s:
        return s.get_one(Post, post_id)


def add_bounce(
    db: Database,
    post_id: int | None,
    address: str,
    at: datetime,
    kind: BounceKind = BounceKind.PERMANENT,
    source: str = "dsn",
) -> None:
    """A row as the bounce processor (the bounces issue) writes it."""
    with db.session() as s:
        mlist = lists.get(s, LIST)
        s.add(
            BounceEvent(
                list_id=mlist.id,
                address=address,
                post_id=post_id,
                kind=kind,
                source=source,
                status="5.1.1" if kind is BounceKind.PERMANENT else "4.2.2",
                detail="user unknown" if kind is BounceKind.PERMANENT else "mailbox full",
                at=at,
            )
        )


# -- through the daemon -------------------------------------------------------------------


def _post_recipients(sink: Sink) -> list[str]:
    """Recipients of the post itself (not of notices) as the sink accepted them."""
    return [
        rcpt
        for r in sink.received
        if str(r.message()["Message-ID"]) == "<budget@example.org>"
        for rcpt in r.rcpt_tos
    ]


def _refused_at_rcpt(sink: Sink, code: str) -> set[str]:
    return {
        command.partition("<")[2].rstrip(">")
        for command, reply in sink.transcript
        if command.startswith("RCPT") and reply.startswith(code)
    }


async def test_the_poster_gets_a_report_whose_numbers_are_what_the_sink_saw(
    db: Database, db_url: str, sink: Sink, daemon_factory: Any, tmp_path: Path
) -> None:
    members_ = [
        "ann@one.example",
        "bob@one.example",  # 550: failed at once
        "cat@two.example",  # 451 once, then delivered
        "dan@two.example",  # 451 until the retry schedule gives up
        "eve@three.example",
    ]
    make_list(db, members_=members_, senders=[SENDER])
    sink.script("RCPT", "550 5.1.1 no such user", times=-1, match="bob@")
    sink.script("RCPT", "451 4.3.0 try later", times=1, match="cat@")
    sink.script("RCPT", "452 4.2.2 mailbox full", times=-1, match="dan@")
    daemon = await daemon_factory(delivery__reports=True, delivery__retry_give_up_after=1.0)
    errors, reply = await send(daemon.port, post_text())
    assert errors == {}
    post_id = int(reply.rpartition(" ")[2])

    received: Received = await mail_for(sink, SENDER, "Delivery report", timeout=20)
    delivered = _post_recipients(sink)
    failed = _refused_at_rcpt(sink, "550") | (_refused_at_rcpt(sink, "452") - set(delivered))
    assert sorted(delivered) == ["ann@one.example", "cat@two.example", "eve@three.example"]
    assert failed == {"bob@one.example", "dan@two.example"}

    assert received.rcpt_tos == [SENDER]
    msg = received.message()
    assert str(msg["To"]) == SENDER
    assert str(msg["Subject"]) == f"Delivery report: Budget ({LIST})"
    assert str(msg["Auto-Submitted"]) == "auto-generated"
    assert str(msg["In-Reply-To"]) == "<budget@example.org>"
    text = body(msg)

    assert f"Recipients:  {len(members_)}\n" in text
    assert f"Delivered:   {len(delivered)} (60.0%)\n" in text
    assert "Deferred:    0\n" in text
    assert f"Failed:      {len(failed)}\n" in text
    assert "bob@one.example  550  5.1.1 no such user" in text
    assert "dan@two.example  452  gave up after" in text
    assert "cat@two.example" not in text
    assert OWNER not in {r for got in sink.received for r in got.rcpt_tos}  # not configured

    result = cli_run(tmp_path, db_url, "report", str(post_id), "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["post_id"] == post_id and data["state"] == "sent"
    assert (data["recipients"], data["delivered"], data["failed"]) == (5, 3, 2)
    assert data["deferred"] == data["pending"] == 0
    assert data["percent_delivered"] == 60.0
    assert [(f["address"], f["code"]) for f in data["failures"]] == [
        ("bob@one.example", 550),
        ("dan@two.example", 452),
    ]
    assert data["reported_at"] is not None
    await wait_until(lambda: len(report_notices(db)) == 1)


async def test_a_post_with_report_to_owners_reports_to_the_owners_through_the_daemon(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=["ann@one.example"], senders=[SENDER], report_to_owners="yes")
    daemon = await daemon_factory(delivery__reports=True)
    await send(daemon.port, post_text())
    owner_copy = await mail_for(sink, OWNER, "Delivery report")
    poster_copy = await mail_for(sink, SENDER, "Delivery report")
    assert "Delivered:   1 (100.0%)" in body(owner_copy.message())
    assert "No recipient failed." in body(poster_copy.message())


async def test_a_daemon_with_reports_off_sends_none(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=["ann@one.example"], senders=[SENDER])
    daemon = await daemon_factory()  # the test settings say [delivery] reports = false
    await send(daemon.port, post_text())
    await sink.wait_for_recipients(1)
    await wait_until(lambda: post_row(db, 1).state is PostState.SENT)
    assert reports.run_once(db, now=T0) == 1  # still owed: a daemon with reports on sends it
    assert post_row(db, 1).reported_at == T0


# -- storage verbs with an injected clock -----------------------------------------------------


def test_a_report_is_queued_once_however_many_rounds(db: Database) -> None:
    make_list(db, members_=["ann@one.example"])
    post_id = finished_post(db, failed=[("bob@one.example", 550, "5.1.1 no such user")])
    assert reports.run_once(db, now=T0) == 1
    assert reports.run_once(db, now=T0 + timedelta(minutes=1)) == 0
    [notice] = report_notices(db)
    assert notice.notice_to == [SENDER]
    assert notice.state is PostState.ACCEPTED  # the scheduler sends it like any notice
    text = notice_body(notice)
    assert "Recipients:  2\n" in text and "Failed:      1\n" in text
    assert "in the next 24 hours" in text
    row = post_row(db, post_id)
    assert row.reported_at == T0
    assert row.followup_due_at == T0 + timedelta(hours=24)


def test_a_report_waits_for_the_last_batch_of_a_cancelled_post(db: Database) -> None:
    make_list(db)
    post_id = finished_post(db, state=PostState.CANCELLED, batch_state=BatchState.LEASED)
    assert reports.run_once(db, now=T0) == 0  # a sender still has a batch in hand
    with db.session() as s:
        s.execute(sa.update(DeliveryBatch).values(state=BatchState.DONE))
    assert reports.run_once(db, now=T0) == 1
    [notice] = report_notices(db)
    assert "was cancelled" in notice_body(notice)
    assert post_row(db, post_id).reported_at == T0


def test_notices_owner_forwards_and_automatic_senders_get_no_report(db: Database) -> None:
    make_list(db, report_to_owners="false")
    ids = [
        finished_post(db, audience=Audience.NOTICE),
        finished_post(db, audience=Audience.OWNERS),
        finished_post(db, mail_from=""),  # a bounce or other null-sender mail
        finished_post(db, headers="Auto-Submitted: auto-replied"),
        finished_post(db, headers="Precedence: bulk"),
    ]
    assert reports.run_once(db, now=T0) == 0
    assert report_notices(db) == []
    for post_id in ids:  # looked at once, never again
        assert post_row(db, post_id).reported_at == T0
        assert post_row(db, post_id).followup_due_at is None
    # nor is a report, once sent, reported on itself
    finished_post(db)
    assert reports.run_once(db, now=T0) == 1
    with db.session() as s:
        s.execute(
            sa.update(Post).where(Post.audience == Audience.NOTICE).values(state=PostState.SENT)
        )
    assert reports.run_once(db, now=T0 + timedelta(minutes=1)) == 0
    assert len(report_notices(db)) == 1


def test_report_to_owners_copies_every_owner_once(db: Database) -> None:
    make_list(db, report_to_owners="true")
    with db.session() as s:
        mlist = lists.get(s, LIST)
        members.add(s, mlist, ["second@example.org", SENDER.upper()], role=Role.OWNER)
    finished_post(db)
    assert reports.run_once(db, now=T0) == 3
    assert sorted(n.notice_to[0] for n in report_notices(db) if n.notice_to) == [
        SENDER,
        OWNER,
        "second@example.org",
    ]


def test_a_list_with_reports_off_gets_none(db: Database) -> None:
    make_list(db, delivery_reports="off", report_to_owners="on")
    post_id = finished_post(db)
    assert reports.run_once(db, now=T0) == 0
    assert report_notices(db) == []
    assert post_row(db, post_id).reported_at == T0


def test_bounces_in_the_window_make_one_follow_up(
    db: Database, db_url: str, tmp_path: Path
) -> None:
    make_list(db, report_window_hours="24")
    post_id = finished_post(
        db, delivered=["ann@one.example", "bob@two.example", "cy@three.example"]
    )
    other = finished_post(db)
    add_bounce(db, post_id, "zed@one.example", T0 - timedelta(minutes=1))  # before the report
    assert reports.run_once(db, now=T0) == 2
    [first, _] = report_notices(db)
    assert "Bounced:     1 (reported by mail so far)" in notice_body(first)

    add_bounce(db, post_id, "ann@one.example", T0 + timedelta(hours=1))
    add_bounce(db, post_id, "bob@two.example", T0 + timedelta(hours=2), BounceKind.TEMPORARY)
    add_bounce(db, post_id, "cy@three.example", T0 + timedelta(hours=1), source="smtp")  # ours
    add_bounce(db, None, "cy@three.example", T0 + timedelta(hours=1))  # unattributed
    add_bounce(db, post_id, "late@one.example", T0 + timedelta(hours=25))  # after the window

    assert reports.run_once(db, now=T0 + timedelta(hours=23, minutes=59)) == 0
    assert report_notices(db, "Bounces after") == []
    assert reports.run_once(db, now=T0 + timedelta(hours=24)) == 1  # `other` had none
    [followup] = report_notices(db, "Bounces after")
    assert followup.notice_to == [SENDER]
    text = notice_body(followup)
    assert "2 bounce(s) arrived: 1 permanent,\n1 temporary." in text
    assert "ann@one.example  permanent  5.1.1  user unknown" in text
    assert "bob@two.example  temporary  4.2.2  mailbox full" in text
    assert "cy@three.example" not in text and "late@" not in text and "zed@" not in text
    assert post_row(db, post_id).followup_sent_at == T0 + timedelta(hours=24)
    assert post_row(db, post_id).followup_due_at is None
    assert post_row(db, other).followup_sent_at is None  # no bounce: no follow-up
    assert post_row(db, other).followup_due_at is None
    assert reports.run_once(db, now=T0 + timedelta(hours=48)) == 0  # once

    result = cli_run(tmp_path, db_url, "report", str(post_id), "--format", "json")
    assert result.exit_code == 0, result.output
    bounces = json.loads(result.output)["bounces"]
    assert bounces == {
        "before_report": {"permanent": 1, "temporary": 0},
        "after_report": {"permanent": 2, "temporary": 1},  # the late one too
    }


def test_a_window_of_zero_hours_owes_no_follow_up(db: Database) -> None:
    make_list(db, report_window="0")
    post_id = finished_post(db)
    assert reports.run_once(db, now=T0) == 1
    assert "follow-up" not in notice_body(report_notices(db)[0])
    add_bounce(db, post_id, "ann@one.example", T0 + timedelta(minutes=5))
    assert reports.run_once(db, now=T0 + timedelta(days=3)) == 0
    assert post_row(db, post_id).followup_due_at is None


def test_the_mail_lists_the_first_failures_and_the_cli_all_of_them(
    db: Database, db_url: str, tmp_path: Path
) -> None:
    make_list(db)
    many = [(f"u{i:05d}@one.example", 550, "5.1.1 no such user") for i in range(1005)]
    post_id = finished_post(db, failed=many)
    assert reports.run_once(db, now=T0) == 1
    text = notice_body(report_notices(db)[0])
    assert "u00999@one.example" in text and "u01000@one.example" not in text
    assert "... and 5 more: `listserv report" in text
    result = cli_run(tmp_path, db_url, "report", str(post_id))
    assert result.exit_code == 0, result.output
    assert "u01004@one.example  550   5.1.1 no such user" in result.output
    assert "failed:                 1005" in result.output
    data = json.loads(cli_run(tmp_path, db_url, "report", str(post_id), "--format", "json").output)
    assert len(data["failures"]) == 1005 and data["percent_delivered"] == 0.1


def test_report_of_an_unknown_post_is_a_one_line_error(
    db: Database, db_url: str, tmp_path: Path
) -> None:
    result = cli_run(tmp_path, db_url, "report", "999")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: no post 999 (the POST column of `listserv queue status --all`)"
    ]


RACER = textwrap.dedent(
    """
    import sys
    from datetime import datetime
    from listserv import reports
    from listserv.db import Database
    db = Database(sys.argv[1])
    db.check_ready()  # connected and imported: wait for the other racer
    print("ready", flush=True)
    sys.stdin.readline()
    print(reports.run_once(db, now=datetime.fromisoformat(sys.argv[2])))
    db.dispose()
    """
)


def test_two_processes_racing_queue_each_report_once(db: Database, db_url: str) -> None:
    make_list(db, report_to_owners="true")
    count = 4 * reports.DUE_BATCH + 10  # several rounds for each process
    ids = [finished_post(db) for _ in range(count)]
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, db_url, T0.isoformat()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for racer in racers:
        assert racer.stdout is not None and racer.stdout.readline() == "ready\n"
    for racer in racers:  # both are told to go before either is waited for
        assert racer.stdin is not None
        racer.stdin.write("go\n")
        racer.stdin.flush()
    queued = [int(p.communicate(timeout=120)[0].strip() or -1) for p in racers]
    assert all(p.returncode == 0 for p in racers)
    assert sum(queued) == 2 * count  # poster and owner of each post, by one racer or the other
    notices = report_notices(db)
    assert len(notices) == 2 * count
    with db.reading() as s:
        per_post = s.execute(
            sa.select(Post.id).where(Post.id.in_(ids), Post.reported_at == T0)
        ).all()
    assert len(per_post) == count
    assert sorted((n.notice_to or [""])[0] + " " + n.subject for n in notices) == sorted(
        (a + " Delivery report: Budget (" + LIST + ")") for a in [SENDER, OWNER] * count
    )


def test_the_migration_leaves_posts_finished_before_it_unreported(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    database = Database(url)
    cfg = database._alembic_config()
    command.upgrade(cfg, "0007")
    with database.session() as s:
        s.execute(
            sa.text(
                "INSERT INTO mailing_lists (local_part, domain, posting_policy, delivery_mode,"
                " subject_prefix, description, footer, require_authenticated_sender,"
                " max_message_kb, plain_text_only, content_filter, allow_attachments,"
                " allowed_mime_types, approval_threshold, blackout, external_links,"
                " link_allowlist, hold_expiry_days, merge_fields, created_at)"
                " VALUES ('staff', 'lists.example.org', 'members', 'shared', '', '', '', 0, 0,"
                " 0, 'reject', 1, '', 0, '', 'allow', '', 14, 0, '2026-01-01 00:00:00')"
            )
        )
        for state in ("sent", "cancelled", "sending"):
            s.execute(
                sa.text(
                    "INSERT INTO posts (list_id, state, audience, reason, sender, subject,"
                    " message_id, envelope_from, recipient_count, decided_by, created_at,"
                    " finished_at, paused) VALUES (1, :state, 'members', '', 'a@example.org',"
                    " '', '', '', 0, '', '2026-01-01 00:00:00', '2026-01-02 00:00:00', 0)"
                ),
                {"state": state},
            )
    command.upgrade(cfg, "head")
    with database.reading() as s:
        marked = dict(s.execute(sa.select(Post.state, Post.reported_at)).all())
    database.dispose()
    assert marked[PostState.SENT] == datetime(2026, 1, 2, tzinfo=UTC)
    assert marked[PostState.CANCELLED] == datetime(2026, 1, 2, tzinfo=UTC)
    assert marked[PostState.SENDING] is None  # still owed its report when it finishes
