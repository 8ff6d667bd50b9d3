"""The delivery engine end to end: the real daemon posts to a recording sink that
misbehaves on request; what crossed the wire and what the queue recorded are checked."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
import sqlalchemy as sa
from conftest import make_list
from sink import Sink
from test_e2e import MEMBERS, SENDER, post_state, post_text, send, wait_until

from listserv import lists
from listserv.db import Database
from listserv.distribute import dkim, status
from listserv.distribute.liveness import Liveness
from listserv.models import (
    BatchState,
    Delivery,
    DeliveryBatch,
    MailingList,
    Post,
    PostState,
    RecipientState,
)


def deliveries(db: Database) -> dict[str, tuple[RecipientState, int | None, str]]:
    with db.reading() as s:
        rows = s.execute(
            sa.select(Delivery.address, Delivery.state, Delivery.code, Delivery.detail)
        )
        return {a: (st, code, detail) for a, st, code, detail in rows}


def leases(db: Database) -> int:
    with db.reading() as s:
        return (
            s.scalar(
                sa.select(sa.func.count(DeliveryBatch.id)).where(
                    DeliveryBatch.lease_owner.is_not(None)
                )
            )
            or 0
        )


async def test_two_daemons_on_one_database_share_a_post_and_send_each_recipient_once(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    many = [f"user{i}@d{i % 7}.example" for i in range(300)]
    make_list(db, members_=many, senders=[SENDER])
    sink.delay("DATA", 0.02, times=-1)  # so that neither daemon can take everything at once
    first = await daemon_factory(
        server__hostname="first.example", delivery__max_recipients_per_message=5
    )
    await daemon_factory(server__hostname="second.example", delivery__max_recipients_per_message=5)
    await send(first.port, post_text())
    await sink.wait_for_recipients(len(many), timeout=60)
    await wait_until(lambda: post_state(db) is PostState.SENT, timeout=30)
    assert Counter(sink.recipients()) == Counter(many)  # each exactly once
    by_daemon = Counter(r.helo for r in sink.received for _ in r.rcpt_tos)
    assert set(by_daemon) == {"first.example", "second.example"}, by_daemon
    with db.reading() as s:
        assert set(s.scalars(sa.select(DeliveryBatch.attempts))) == {1}


async def test_rcpt_252_and_251_are_accepted_and_get_the_message(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    sink.script("RCPT", "252 2.1.5 Cannot VRFY user, but will accept", match="bob@", times=-1)
    sink.script("RCPT", "251 2.1.5 User not local; will forward", match="cat@", times=-1)
    daemon = await daemon_factory()
    await send(daemon.port, post_text())
    await wait_until(lambda: post_state(db) is PostState.SENT)
    states = deliveries(db)
    assert states["bob@one.example"][:2] == (RecipientState.DELIVERED, 250)
    assert states["cat@two.example"][:2] == (RecipientState.DELIVERED, 250)
    # the sink's own hook did not add them (it answered for itself), but DATA went to both
    # transactions that held them: the message reached every connection that accepted them
    data_for = {tuple(sorted(r.rcpt_tos)) for r in sink.received}
    assert ("ann@one.example",) in data_for  # bob's transaction got DATA, with ann
    assert ("dan@two.example",) in data_for  # cat's transaction got DATA, with dan


@pytest.mark.parametrize(
    ("command", "reply", "outcome"),
    [
        ("MAIL", "451 4.3.0 try later", RecipientState.DELIVERED),
        ("MAIL", "550 5.7.1 sender refused", RecipientState.FAILED),
        ("DATA", "451 4.3.0 try later", RecipientState.DELIVERED),
        ("DATA", "554 5.6.0 content refused", RecipientState.FAILED),
    ],
    ids=["mail-4xx", "mail-5xx", "data-4xx", "data-5xx"],
)
async def test_smarthost_refusals_at_mail_and_data(
    db: Database,
    sink: Sink,
    daemon_factory: Any,
    command: str,
    reply: str,
    outcome: RecipientState,
) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    sink.script(command, reply, times=1)
    daemon = await daemon_factory()
    await send(daemon.port, post_text())
    await wait_until(lambda: post_state(db) is PostState.SENT)
    states = deliveries(db)
    refused = [a for a, (state, _, _) in states.items() if state is not RecipientState.DELIVERED]
    if outcome is RecipientState.DELIVERED:  # retried and delivered
        assert refused == []
        assert Counter(sink.recipients()) == Counter(MEMBERS)
        with db.reading() as s:
            assert max(s.scalars(sa.select(DeliveryBatch.attempts))) == 2
    else:  # one batch failed for good, with the reply recorded per recipient
        assert refused
        code = int(reply[:3])
        assert all(states[a][:2] == (RecipientState.FAILED, code) for a in refused)
        assert all(reply[4:] in states[a][2] for a in refused)
        assert sorted(sink.recipients() + refused) == sorted(MEMBERS)


async def test_deferred_recipient_fails_when_the_retry_schedule_gives_up(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    sink.script("RCPT", "451 4.2.1 mailbox busy", match="bob@", times=-1)
    daemon = await daemon_factory(delivery__retry_give_up_after=1.0)
    await send(daemon.port, post_text())
    await wait_until(lambda: post_state(db) is PostState.SENT, timeout=20)
    state, code, detail = deliveries(db)["bob@one.example"]
    assert state is RecipientState.FAILED and code == 451
    assert detail.startswith("gave up after ") and "mailbox busy" in detail
    assert sorted(sink.recipients()) == sorted(m for m in MEMBERS if m != "bob@one.example")


def _signatures(data: bytes) -> int:
    return data.count(b"DKIM-Signature:")


@pytest.mark.parametrize("switch", ["shared->personalized", "personalized->shared"])
async def test_a_mode_switch_while_batches_wait_sends_what_was_queued(
    db: Database, sink: Sink, daemon_factory: Any, tmp_path: Path, switch: str
) -> None:
    before, after = switch.split("->")
    key = dkim.generate_key(tmp_path / "dkim", "lists.example.org", "test", bits=1024)
    address = make_list(db, members_=MEMBERS, senders=[SENDER], delivery_mode=before)
    # every batch (shared) or message (personalized) waits for a retry
    sink.script("MAIL", "451 4.3.0 not now", times=3 if before == "shared" else len(MEMBERS))
    daemon = await daemon_factory(delivery__retry_initial=1.0)
    await send(daemon.port, post_text())

    def all_deferred() -> bool:
        return sum(1 for s, _, _ in deliveries(db).values() if s is RecipientState.DEFERRED) == 5

    await wait_until(all_deferred)
    with db.session() as s:
        lists.set_setting(s, lists.get(s, address), "delivery_mode", after)
    await sink.wait_for_recipients(len(MEMBERS))
    await wait_until(lambda: post_state(db) is PostState.SENT)
    assert daemon.daemon  # still running

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return key.public_txt().encode() if name.startswith(b"test._domainkey.") else None

    assert Counter(sink.recipients()) == Counter(MEMBERS)
    for received in sink.received:
        assert _signatures(received.data) == 1
        assert dkimpy.verify(received.data, dnsfunc=dnsfunc)
        text = received.message().get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert text.count("To unsubscribe, send an e-mail to staff-leave@") == 1
        if before == "shared":
            assert "You are subscribed as" not in text
        else:
            (rcpt,) = received.rcpt_tos
            assert f"You are subscribed as {rcpt}." in text
    expected_messages = 3 if before == "shared" else len(MEMBERS)
    assert len(sink.received) == expected_messages


async def test_a_deleted_lists_post_is_never_sent_to_another_list(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    """The review's scenario: post, delete the list, post to another list."""
    secret = make_list(
        db, "secret@lists.example.org", members_=["spy@one.example"], senders=[SENDER]
    )
    other = make_list(db, "other@lists.example.org", members_=["ann@two.example"], senders=[SENDER])
    sink.script("MAIL", "451 4.3.0 not now", times=1)
    daemon = await daemon_factory(delivery__retry_initial=2.0)
    await send(daemon.port, post_text(subject="Confidential"), rcpts=[secret])
    await wait_until(
        lambda: any(s is RecipientState.DEFERRED for s, _, _ in deliveries(db).values())
    )
    with db.session() as s:
        lists.delete(s, lists.get(s, secret), force=True)
    await send(daemon.port, post_text(subject="Hello others"), rcpts=[other])
    await sink.wait_for_recipients(1)
    await wait_until(lambda: post_state(db) is PostState.SENT)
    await asyncio.sleep(2.5)  # past the deleted post's retry time
    assert [r.rcpt_tos for r in sink.received] == [["ann@two.example"]]
    assert "Hello others" in sink.received[0].message()["Subject"]
    with db.reading() as s:
        assert s.scalar(sa.select(sa.func.count(Post.id))) == 1


async def test_stop_waits_for_the_data_reply_and_records_it_nothing_is_sent_twice(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    sink.delay("DATA", 1.5, times=-1)  # the reply comes well after the stop
    daemon = await daemon_factory(delivery__max_connections=1)
    await send(daemon.port, post_text())
    await wait_until(lambda: sink.counters["DATA"] >= 1)  # DATA sent, reply outstanding
    await daemon.stop()
    assert leases(db) == 0
    sent_before = Counter(sink.recipients())
    assert sum(sent_before.values()) >= 1
    recorded = {a for a, (s, _, _) in deliveries(db).items() if s is RecipientState.DELIVERED}
    assert recorded == set(sent_before)  # the batch in hand was recorded as delivered
    with db.reading() as s:
        assert set(s.scalars(sa.select(DeliveryBatch.attempts))) <= {0, 1}
    await daemon_factory()  # a new daemon sends the rest, and nothing twice
    await wait_until(lambda: post_state(db) is PostState.SENT, timeout=20)
    assert Counter(sink.recipients()) == Counter(MEMBERS)


async def test_stop_in_the_middle_of_a_personalized_batch_hands_back_the_rest(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    many = [f"m{i:02d}@one.example" for i in range(20)]  # one batch
    make_list(db, members_=many, senders=[SENDER], delivery_mode="personalized")
    sink.delay("DATA", 0.1, times=-1)
    daemon = await daemon_factory(delivery__max_connections=1)
    await send(daemon.port, post_text())
    await sink.wait_for_messages(3)
    await daemon.stop()
    assert leases(db) == 0
    sent = Counter(sink.recipients())
    assert 3 <= sum(sent.values()) < len(many)
    # the next copy's envelope went out behind the last message sent and may have
    # had its 354: the connection was closed, never ended with a lone dot
    assert all(b"\r\nSubject: " in received.data for received in sink.received)
    recorded = {a for a, (s, _, _) in deliveries(db).items() if s is RecipientState.DELIVERED}
    assert recorded == set(sent)
    with db.reading() as s:
        batch = s.scalars(sa.select(DeliveryBatch)).one()
    assert batch.state is BatchState.PENDING and batch.attempts == 0
    await daemon_factory()
    await wait_until(lambda: post_state(db) is PostState.SENT, timeout=20)
    assert Counter(sink.recipients()) == Counter(many)


async def test_a_post_that_cannot_be_prepared_is_failed_visibly(
    db: Database, sink: Sink, daemon_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    address = make_list(db, members_=MEMBERS, senders=[SENDER])
    with db.session() as s:  # a value stored before settings were checked on the way in
        s.execute(
            sa.update(MailingList)
            .where(MailingList.local_part == "staff")
            .values(description="Staff\r\nBcc: evil@example.org")
        )
    daemon = await daemon_factory()
    caplog.set_level(logging.INFO, logger="listserv")
    _, reply = await send(daemon.port, post_text())
    post_id = int(reply.rsplit(" ", 1)[1].split(",")[0])
    await wait_until(lambda: post_state(db) is PostState.FAILED)
    with db.reading() as s:
        [shown] = [p for p in status.status(s) if p.post_id == post_id]
    assert shown.state is PostState.FAILED and "control character" in shown.reason
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"post {post_id} to {address}: failed" in line for line in lines)
    assert all("\n" not in line for line in lines)
    assert sink.received == []


async def test_failed_recipients_are_logged_with_address_and_reply(
    db: Database, sink: Sink, daemon_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    sink.script("RCPT", "550 5.1.1 no such user here", match="eve@", times=-1)
    caplog.set_level(logging.INFO, logger="listserv")
    daemon = await daemon_factory()
    await send(daemon.port, post_text())
    await wait_until(lambda: post_state(db) is PostState.SENT)
    lines = [r.getMessage() for r in caplog.records]
    assert any("eve@three.example failed: 550 5.1.1 no such user here" in line for line in lines), (
        lines
    )


CLI_CONFIG = """
[database]
url = "{url}"
[dkim]
keys_dir = "{keys}"
"""


async def test_a_cli_write_while_the_daemon_delivers_on_sqlite(
    db: Database, db_url: str, sink: Sink, daemon_factory: Any, tmp_path: Path
) -> None:
    many = [f"user{i}@d{i % 5}.example" for i in range(1000)]
    address = make_list(db, members_=many, senders=[SENDER])
    sink.delay("DATA", 0.1, times=-1)  # 200 batches over 4 connections: about 5 s
    daemon = await daemon_factory(delivery__max_recipients_per_message=5)
    await send(daemon.port, post_text())
    await sink.wait_for_messages(2)
    config = tmp_path / "cli.toml"
    config.write_text(CLI_CONFIG.format(url=db_url, keys=tmp_path / "dkim"))
    cli = [sys.executable, "-m", "listserv.cli", "--config", str(config)]
    added = await asyncio.to_thread(
        subprocess.run,
        [*cli, "members", "add", address, "late@six.example"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    assert "added member: late@six.example" in added.stdout
    assert post_state(db) is PostState.SENDING  # it really ran while the daemon delivered
    await wait_until(lambda: post_state(db) is PostState.SENT, timeout=60)
    assert Counter(sink.recipients()) == Counter(many)  # the snapshot was taken at queueing
    assert daemon.daemon


async def test_a_post_to_two_lists_reaches_a_member_of_both_once(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    one = make_list(db, "one@lists.example.org", members_=["both@x.example", "a@x.example"])
    two = make_list(db, "two@lists.example.org", members_=["BOTH@x.example", "b@x.example"])
    with db.session() as s:
        from listserv import members
        from listserv.models import Role

        for address in (one, two):
            members.add(s, lists.get(s, address), [SENDER], role=Role.SENDER)
    daemon = await daemon_factory()
    await send(daemon.port, post_text(), rcpts=[one, two])
    await sink.wait_for_recipients(3)

    def both_sent() -> bool:
        with db.reading() as s:
            return set(s.scalars(sa.select(Post.state))) == {PostState.SENT}

    await wait_until(both_sent)
    assert sorted(a.lower() for a in sink.recipients()) == [
        "a@x.example",
        "b@x.example",
        "both@x.example",
    ]


async def test_a_batch_taken_over_by_another_worker_is_no_longer_sent(
    db: Database, sink: Sink, daemon_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    many = [f"m{i:02d}@one.example" for i in range(30)]  # one personalized batch
    make_list(db, members_=many, senders=[SENDER], delivery_mode="personalized")
    sink.delay("DATA", 0.1, times=-1)
    caplog.set_level(logging.WARNING, logger="listserv")
    daemon = await daemon_factory(delivery__max_connections=1, delivery__lease_seconds=0.9)
    await send(daemon.port, post_text())
    await sink.wait_for_messages(3)
    thief = Liveness(db)  # a live worker, as far as liveness checks can tell
    thief.hold("otherhost:1:thief")
    with db.session() as s:  # another worker's claim, as after an expired lease
        s.execute(
            sa.update(DeliveryBatch)
            .where(DeliveryBatch.state == BatchState.LEASED)
            .values(
                lease_owner="otherhost:1:thief",
                claim_token="stolen",
                lease_expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
        )
    await wait_until(lambda: any("taken over" in r.getMessage() for r in caplog.records))
    stopped_at = sink.accepted_messages
    await asyncio.sleep(1.0)  # ten more messages' worth of time
    assert sink.accepted_messages <= stopped_at + 1  # at most the one in flight
    assert sink.accepted_messages < len(many)
    with db.reading() as s:
        batch = s.scalars(sa.select(DeliveryBatch)).one()
    assert batch.lease_owner == "otherhost:1:thief"  # nothing of ours overwrote the thief's
    thief.close()


async def test_a_small_post_is_not_kept_waiting_behind_a_big_one(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    """Claims take each post's first due batch before anyone's second."""
    big = make_list(
        db,
        "big@lists.example.org",
        members_=[f"m{i:04d}@d{i % 100}.example" for i in range(1000)],
        senders=[SENDER],
    )
    small = make_list(db, "small@lists.example.org", members_=["ann@one.example"], senders=[SENDER])
    sink.delay("DATA", 0.05, times=-1)  # 100 batches over 4 connections: about 1.3 s
    daemon = await daemon_factory()
    await send(daemon.port, post_text(subject="Big"), rcpts=[big])
    await sink.wait_for_messages(4)
    await send(daemon.port, post_text(subject="Small"), rcpts=[small])

    def small_arrived() -> bool:
        return "ann@one.example" in sink.recipients()

    await wait_until(small_arrived, timeout=30)
    big_done = sum(1 for r in sink.received if "Big" in str(r.message()["Subject"]))
    assert big_done < 100 // 2, f"the small post waited for {big_done} of the big post's batches"
    await wait_until(lambda: post_state(db) is PostState.SENT, timeout=60)
