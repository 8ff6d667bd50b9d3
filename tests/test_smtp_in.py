"""The inbound SMTP dialogue against the real daemon: limits, refusals, replies, loops, stop.

Clients are real: aiosmtplib where it can say what we need, else a raw socket
(`Dialogue`) that writes exact bytes (undecodable addresses, trickling) and reads
whole replies. Faults are real too: a table renamed or locked from a second
connection, a client that sends too much or too slowly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import aiosmtplib
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import make_list, message
from sink import Sink

from listserv import config, lists, members
from listserv.cli import cli
from listserv.db import Database
from listserv.errors import ConfigError
from listserv.models import (
    Audience,
    DeliveryBatch,
    InboundMessage,
    InboundState,
    Post,
    PostingPolicy,
    PostState,
    Role,
)

SENDER = "boss@example.org"
LIST = "staff@lists.example.org"


def post_text(sender: str = SENDER, to: str = LIST, subject: str = "Budget") -> bytes:
    return message(
        f"""
        From: Boss <{sender}>
        To: {to}
        Subject: {subject}
        Message-ID: <m1@example.org>
        Date: Mon, 23 Nov 2026 10:00:00 +0000

        The budget is approved.
        """
    )


async def send(port: int, data: bytes, sender: str = SENDER, rcpts: list[str] | None = None) -> Any:
    """One transaction; sender "" is the null reverse-path (MAIL FROM:<>)."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
    async with client:
        return await client.sendmail(sender, rcpts or [LIST], data)


def count(db: Database, column: Any) -> int:
    with db.reading() as s:
        return int(s.scalar(sa.select(sa.func.count(column))) or 0)


def queued_ids(reply: str) -> list[int]:
    """The ids in "2.0.0 Queued as 4,5"."""
    assert reply.startswith("2.0.0 Queued as "), reply
    return [int(i) for i in reply.removeprefix("2.0.0 Queued as ").split(",")]


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
async def close_dialogues() -> AsyncIterator[None]:
    """A dialogue a failed test left open would otherwise be found by the garbage
    collector in some later test, and fail that one with a ResourceWarning."""
    yield
    while Dialogue.opened:
        await Dialogue.opened.pop().close()


class Dialogue:
    """A raw SMTP client: exact bytes out, whole replies in (b"" once the server closed)."""

    opened: ClassVar[list[Dialogue]] = []  # `close_dialogues` closes them, pass or fail

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> Dialogue:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        cls.opened.append(d := cls(reader, writer))
        return d

    async def reply(self, timeout: float = 10.0) -> bytes:
        lines: list[bytes] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            lines.append(line)
            if not line or line[3:4] != b"-":
                return b"".join(lines)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def say(self, line: bytes) -> bytes:
        self.writer.write(line + b"\r\n")
        return await self.reply()

    async def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True when the server closed the connection (EOF), after any further reply."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionResetError:
            rest = b""
        await self.close()
        return rest == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def dialogue(port: int, *lines: bytes, source: str = "127.0.0.1") -> Dialogue:
    """Connected, greeted, and past `lines` (each must get a 2xx/3xx reply)."""
    d = await Dialogue.open(port, source)
    try:
        assert (await d.reply()).startswith(b"220 ")
        for line in lines:
            reply = await d.say(line)
            assert reply[:1] in (b"2", b"3"), (line, reply)
    except BaseException:
        await d.close()  # not left for the garbage collector to find in a later test
        raise
    return d


# -- recipients, transactions, kinds of mail -------------------------------------------


async def test_the_101st_recipient_gets_452_and_the_first_100_are_queued(
    db: Database, daemon_factory: Any
) -> None:
    make_list(db, members_=["ann@one.example"], senders=[SENDER])
    daemon = await daemon_factory()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, timeout=10)
    async with client:
        await client.mail(SENDER)
        for _ in range(100):
            assert (await client.rcpt(LIST)).code == 250
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt(LIST)
        assert refused.value.code == 452
        assert refused.value.message.startswith("4.5.3 ")
        response = await client.data(post_text())
    assert response.code == 250
    (post_id,) = queued_ids(response.message)
    with db.reading() as s:
        post = s.get(Post, post_id)
        assert post is not None and post.state is PostState.ACCEPTED


async def test_a_list_found_at_rcpt_is_remembered_briefly_and_a_refusal_is_not(
    db: Database, daemon_factory: Any
) -> None:
    """RCPT answers a list it found a moment ago from memory (handler.RESOLVED_FOR):
    a list deleted meanwhile is refused at DATA, nothing stored; a list made after a
    RCPT was refused takes mail at once."""
    make_list(db, members_=["ann@one.example"], senders=[SENDER])
    daemon = await daemon_factory()
    errors, _ = await send(daemon.port, post_text())
    assert errors == {}
    with db.session() as s:
        lists.delete(s, lists.get(s, LIST), force=True)
    stored = count(db, InboundMessage.id)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, timeout=10)
    async with client:
        await client.mail(SENDER)
        assert (await client.rcpt(LIST)).code == 250  # remembered: not asked again
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.data(post_text())
        assert refused.value.code == 550
        assert "no such list" in refused.value.message
        await client.rset()
        await client.mail(SENDER)
        new = "new@lists.example.org"
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as unknown:
            await client.rcpt(new)
        assert unknown.value.code == 550
        make_list(db, new, members_=["bob@two.example"], senders=[SENDER])
        assert (await client.rcpt(new)).code == 250  # the refusal was not kept
        assert (await client.data(post_text(to=new))).code == 250
    assert count(db, InboundMessage.id) == stored + 1  # the post to the deleted list: none


async def test_a_post_to_two_lists_is_all_or_nothing(db: Database, daemon_factory: Any) -> None:
    make_list(db, members_=["ann@one.example"], senders=[SENDER])
    board = make_list(db, "board@lists.example.org", members_=["bob@two.example"])
    daemon = await daemon_factory()

    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(daemon.port, post_text(), rcpts=[LIST, board])
    assert refused.value.code == 550
    assert refused.value.message.startswith("5.7.1 ")
    assert "board@lists.example.org" in refused.value.message
    assert count(db, InboundMessage.id) == 0
    assert count(db, Post.id) == 0

    with db.session() as s:
        members.add(s, lists.get(s, board), [SENDER], role=Role.SENDER)
    errors, reply = await send(daemon.port, post_text(), rcpts=[LIST, board])
    assert errors == {}
    ids = queued_ids(reply)
    with db.reading() as s:
        posts = {p.id: p for p in s.scalars(sa.select(Post))}
    assert sorted(ids) == sorted(posts)
    assert len({p.list_id for p in posts.values()}) == 2
    assert {p.state for p in posts.values()} == {PostState.ACCEPTED}
    assert count(db, InboundMessage.id) == 1


async def test_mail_to_request_and_bounces_is_stored_pending_by_kind(
    db: Database, daemon_factory: Any
) -> None:
    make_list(db, members_=["ann@one.example"], senders=[SENDER])
    daemon = await daemon_factory()
    command = message(
        """
        From: ann@one.example
        To: staff-request@lists.example.org
        Subject: help

        help
        """
    )
    # a bounce may come from the null sender and carry no From: at all
    dsn = message(
        """
        To: staff-bounces+abc123@lists.example.org
        Subject: Undelivered Mail Returned to Sender

        ann@one.example: mailbox full
        """
    )
    cases = [
        ("ann@one.example", "staff-request@lists.example.org", command, "request"),
        ("", "staff-bounces@lists.example.org", dsn, "bounces"),
        ("", "staff-bounces+abc123@lists.example.org", dsn, "bounces"),
    ]
    for sender, rcpt, data, kind in cases:
        errors, reply = await send(daemon.port, data, sender=sender, rcpts=[rcpt])
        assert errors == {}
        assert reply.startswith("2.0.0 Stored as ") and reply.endswith(" for processing"), reply
        inbound_id = int(reply.split()[3])
        with db.reading() as s:
            row = s.get(InboundMessage, inbound_id)
            assert row is not None
            assert (row.kind, row.rcpt_tos) == (kind, [rcpt])
            # the daemon's subscriptions task may have answered the request already
            done = {InboundState.DONE} if kind == "request" else set()
            assert row.state in {InboundState.PENDING, *done}
            assert row.raw == data
    with db.reading() as s:
        audiences = set(s.scalars(sa.select(Post.audience)))
    # no post to the list: at most the answer to "help" (a notice) and, once the bounce
    # task has read it, the unrecognized bounce forwarded to the owners
    assert audiences <= {Audience.NOTICE, Audience.OWNERS}


async def test_a_database_fault_at_data_gets_451_and_nothing_is_stored(
    db: Database, daemon_factory: Any
) -> None:
    make_list(db, members_=["ann@one.example"], senders=[SENDER])
    daemon = await daemon_factory()
    with db.engine.begin() as conn:  # a second connection, not the daemon's
        conn.execute(sa.text("ALTER TABLE inbound_messages RENAME TO inbound_messages_away"))
    try:
        with pytest.raises(aiosmtplib.SMTPDataError) as failed:
            await send(daemon.port, post_text())
        assert failed.value.code == 451
        assert failed.value.message.startswith("4.3.0 ")
    finally:
        with db.engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE inbound_messages_away RENAME TO inbound_messages"))
    assert count(db, InboundMessage.id) == 0
    assert count(db, Post.id) == 0

    errors, reply = await send(daemon.port, post_text())
    assert errors == {}
    assert len(queued_ids(reply)) == 1
    assert count(db, InboundMessage.id) == 1


# -- what cannot be accepted: 5xx, never 4xx --------------------------------------------


async def test_undecodable_addresses_get_553_not_451(
    db: Database, daemon_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    make_list(db, members_=["ann@one.example"], senders=[SENDER])
    daemon = await daemon_factory()
    d = await dialogue(daemon.port, b"EHLO client.example")
    try:
        assert (await d.say(b"MAIL FROM:<\xff\xfe@example.org>")).startswith(b"553 5.1.7 ")
        assert (await d.say(b"MAIL FROM:<boss@example.org>")).startswith(b"250 2.1.0 ")
        assert (await d.say(b"RCPT TO:<st\xffaff@lists.example.org>")).startswith(b"553 5.1.3 ")
        assert (await d.say(b"RCPT TO:<staff@lists.\xff.org>")).startswith(b"553 5.1.3 ")
        assert (await d.say(b"RCPT TO:<staff@lists.example.org>")).startswith(b"250 2.1.5 ")
        assert (await d.say(b"RSET")).startswith(b"250")
        # valid UTF-8 is not refused for its bytes (an unknown list is a plain 550)
        reply = await d.say("MAIL FROM:<jürgen@example.org> SMTPUTF8".encode())
        assert reply.startswith(b"250 ")
        assert (await d.say("RCPT TO:<zoë@lists.example.org>".encode())).startswith(b"550 5.1.1")
    finally:
        await d.close()
    assert count(db, InboundMessage.id) == 0
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


#: the first two are test_e2e.MALFORMED's "junk" and "broken-headers", byte for byte
NO_FROM = {
    "no-header-section": (
        b"no headers at all, just text\r\n\xff\xfe binary \x00 junk\r\n",
        "it has no header section",
    ),
    "empty-from": (
        b"From: \r\nCc: a@b.c,\r\nSubject: =?utf-8?q?broken\r\n"
        b"Content-Type: multipart/mixed\r\n\r\nno boundary\r\n",
        "its From: header holds no address",
    ),
    "no-from": (b"To: staff@lists.example.org\r\nSubject: hi\r\n\r\nbody\r\n", "no From: header"),
}


@pytest.mark.parametrize("case", sorted(NO_FROM))
async def test_a_post_that_cannot_go_out_as_it_is_gets_550_5_6_0(
    db: Database, sink: Sink, daemon_factory: Any, case: str
) -> None:
    raw, why = NO_FROM[case]
    make_list(db, members_=["ann@one.example"], senders=[SENDER])
    daemon = await daemon_factory()
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(daemon.port, raw)
    assert refused.value.code == 550
    assert refused.value.message.startswith("5.6.0 ")
    assert why in refused.value.message
    assert count(db, InboundMessage.id) == 0
    # the same bytes to the owners are not a post: stored and forwarded as they came
    errors, reply = await send(daemon.port, raw, rcpts=["staff-owner@lists.example.org"])
    assert errors == {} and len(queued_ids(reply)) == 1
    await sink.wait_for_recipients(1)
    assert sink.recipients() == ["owner@example.org"]


def test_inject_refuses_a_post_without_from_in_one_line(
    db: Database, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("LISTSERV_")]:
        monkeypatch.delenv(name)
    make_list(db, members_=["ann@one.example"], senders=[SENDER])
    config = tmp_path / "listserv.toml"
    config.write_text(f'[database]\nurl = "{db_url}"\n', encoding="utf-8")
    for raw, why in NO_FROM.values():
        for extra in ([], ["--sender", SENDER]):
            result = CliRunner().invoke(
                cli, ["--config", str(config), "inject", LIST, "-", *extra], input=raw
            )
            assert result.exit_code == 1, result.output
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert result.stderr.startswith("Error: 550 5.6.0 ")
            assert why in result.stderr
    assert count(db, InboundMessage.id) == 0


def test_serve_help_suggests_loopback_and_a_high_port() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    assert "0.0.0.0" not in result.output
    assert "--port 25\n" not in result.output
    assert "--host 127.0.0.1 --port 8025" in result.output


# -- limits --------------------------------------------------------------------------------


async def test_connections_over_the_caps_get_421_at_connect_and_are_closed(
    db: Database, daemon_factory: Any
) -> None:
    daemon = await daemon_factory(server__max_connections=2, server__max_connections_per_ip=1)
    first = await dialogue(daemon.port, b"EHLO one.example")
    second_from_same_ip = await Dialogue.open(daemon.port)
    assert (await second_from_same_ip.reply()).startswith(b"421 4.7.0 ")
    assert await second_from_same_ip.closed_by_server()
    other_ip = await dialogue(daemon.port, b"EHLO two.example", source="127.0.0.2")
    over_total = await Dialogue.open(daemon.port, source="127.0.0.3")
    assert (await over_total.reply()).startswith(b"421 4.3.2 ")
    assert await over_total.closed_by_server()
    # the admitted sessions still work
    assert (await first.say(b"NOOP")).startswith(b"250")
    assert (await other_ip.say(b"NOOP")).startswith(b"250")

    assert (await first.say(b"QUIT")).startswith(b"221")
    await first.close()
    for _ in range(200):  # a freed slot is taken again once the server saw the close
        again = await Dialogue.open(daemon.port)
        greeting = await again.reply()
        await again.close()
        if greeting.startswith(b"220 "):
            break
        assert greeting.startswith(b"421 4.7.0 ")
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the slot of a closed session was never freed")
    await other_ip.close()


async def test_an_idle_session_gets_421_and_is_closed(db: Database, daemon_factory: Any) -> None:
    # a second: a loaded machine (CI) may take a few tenths to answer the EHLO
    daemon = await daemon_factory(server__idle_timeout=1.0)
    d = await dialogue(daemon.port, b"EHLO client.example")
    assert (await d.reply()).startswith(b"421 4.4.2 ")
    assert await d.closed_by_server()


async def test_a_client_trickling_data_is_cut_off_and_nothing_is_stored(
    db: Database, daemon_factory: Any
) -> None:
    make_list(db, members_=["ann@one.example"], senders=[SENDER])
    daemon = await daemon_factory(server__data_timeout=0.5, server__idle_timeout=60)
    d = await dialogue(
        daemon.port,
        b"EHLO client.example",
        b"MAIL FROM:<boss@example.org>",
        f"RCPT TO:<{LIST}>".encode(),
    )
    assert (await d.say(b"DATA")).startswith(b"354 ")
    reply = asyncio.create_task(d.reply(timeout=60))
    for byte in post_text() * 10:  # one byte at a time, far slower than the deadline allows
        if reply.done():
            break
        try:
            d.write(bytes([byte]))
        except (ConnectionError, OSError):
            break
        await asyncio.wait({reply}, timeout=0.05)
    assert (await reply).startswith(b"421 4.4.2 ")
    assert await d.closed_by_server()
    assert count(db, InboundMessage.id) == 0


async def test_a_session_kept_busy_by_a_trickle_of_commands_ends_at_its_deadline(
    db: Database, daemon_factory: Any
) -> None:
    # 3 s: the deadline runs from the connection, and a loaded CI machine has taken
    # most of a second to greet and answer EHLO.
    daemon = await daemon_factory(server__session_timeout=3.0, server__idle_timeout=60)
    d = await dialogue(daemon.port, b"EHLO client.example")
    answered = 0
    for _ in range(2000):
        pending = asyncio.create_task(d.reply())
        for byte in b"NOOP\r\n":  # a byte at a time, never after the server spoke
            if pending.done():
                break
            d.write(bytes([byte]))
            await asyncio.wait({pending}, timeout=0.01)
        reply = await pending
        if not reply.startswith(b"250"):
            break
        answered += 1
    assert answered > 0, reply  # it was busy, not idle
    assert reply.startswith(b"421 4.4.2 Session time limit")
    assert await d.closed_by_server()


async def test_the_command_cap_gets_421_and_closes(db: Database, daemon_factory: Any) -> None:
    daemon = await daemon_factory(server__max_commands=5)
    d = await dialogue(daemon.port, b"EHLO client.example")  # 1
    help_reply = await d.say(b"HELP")  # 2: aiosmtpd's HELP still sees every command
    assert b"DATA" in help_reply and b"MAIL" in help_reply
    for _ in range(3):  # 3..5
        assert (await d.say(b"NOOP")).startswith(b"250")
    assert (await d.say(b"NOOP")).startswith(b"421 4.7.0 ")
    assert await d.closed_by_server()


# -- loops between lists ------------------------------------------------------------------


async def test_two_lists_subscribed_to_each_other_stop_the_ping_pong(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    a, b = "a@lists.example.org", "b@lists.example.org"
    make_list(db, a, policy=PostingPolicy.OPEN, members_=[b])
    make_list(db, b, policy=PostingPolicy.OPEN, members_=[a])
    daemon = await daemon_factory()

    await send(daemon.port, post_text(to=a), rcpts=[a])
    await sink.wait_for_recipients(1)
    to_b = sink.received[0]
    assert to_b.rcpt_tos == [b]
    assert to_b.message().get_all("X-BeenThere") == [a]

    # what the sink got for b@ goes back in to B, as an MTA would deliver it
    errors, _ = await send(daemon.port, to_b.data, sender=to_b.mail_from, rcpts=[b])
    assert errors == {}
    await sink.wait_for_recipients(2)
    to_a = sink.received[1]
    assert to_a.rcpt_tos == [a]
    msg = to_a.message()
    assert msg.get_all("X-BeenThere") == [a, b]  # B kept A's marker
    assert msg["List-Id"] == "<b.lists.example.org>"  # ...though it replaced A's List-Id

    errors, reply = await send(daemon.port, to_a.data, sender=to_a.mail_from, rcpts=[a])
    assert errors == {}
    (post_id,) = queued_ids(reply)
    with db.reading() as s:
        post = s.get(Post, post_id)
        assert post is not None
        assert post.state is PostState.DISCARDED
        assert post.reason.startswith("loop: ") and a in post.reason
        batches = s.scalar(
            sa.select(sa.func.count(DeliveryBatch.id)).where(DeliveryBatch.post_id == post_id)
        )
    assert batches == 0  # nothing goes out again: the ping-pong stopped
    assert count(db, Post.id) == 3


# -- stopping ---------------------------------------------------------------------------


@contextmanager
def write_lock(db: Database) -> Iterator[None]:
    """Hold inbound_messages against writers from a second connection (a real, slow disk)."""
    path = db.sqlite_path
    if path is not None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("COMMIT")
            conn.close()
        return
    with db.engine.connect() as pg, pg.begin():
        pg.execute(sa.text("LOCK TABLE inbound_messages IN EXCLUSIVE MODE"))
        yield


async def test_a_stop_while_a_message_is_being_stored_still_gets_its_250(
    db: Database, daemon_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    make_list(db, members_=["ann@one.example"], senders=[SENDER])
    daemon = await daemon_factory()
    caplog.set_level(logging.DEBUG, logger="listserv.smtp")
    idle = await dialogue(daemon.port, b"EHLO idle.example")
    client = await dialogue(
        daemon.port,
        b"EHLO busy.example",
        b"MAIL FROM:<boss@example.org>",
        f"RCPT TO:<{LIST}>".encode(),
    )
    with write_lock(db):
        assert (await client.say(b"DATA")).startswith(b"354 ")
        client.write(post_text() + b".\r\n")
        await wait_until(lambda: any("storing" in r.getMessage() for r in caplog.records))
        stopping = asyncio.create_task(daemon.stop())
        assert (await idle.reply()).startswith(b"421 4.3.2 Service shutting down")
        assert await idle.closed_by_server()
        with pytest.raises(ConnectionRefusedError):  # the listener is closed
            await Dialogue.open(daemon.port)
        assert not stopping.done()  # the daemon waits for the message in hand
    reply = await client.reply()
    assert reply.startswith(b"250 2.0.0 Queued as "), reply
    assert (await client.reply()).startswith(b"421 4.3.2 ")
    assert await client.closed_by_server()
    await stopping
    (post_id,) = queued_ids(reply.decode().removeprefix("250 ").strip())
    with db.reading() as s:
        post = s.get(Post, post_id)
        assert post is not None and post.state is PostState.ACCEPTED
        inbound = s.get(InboundMessage, post.inbound_id)
        # as sent, under our Authentication-Results header (pipeline.authresults)
        assert inbound is not None and inbound.raw.endswith(post_text())
        assert inbound.raw.startswith(b"Authentication-Results: lists.example.org;")


def test_server_settings_must_be_positive() -> None:
    for key in ("idle_timeout", "data_timeout", "session_timeout", "max_connections"):
        with pytest.raises(ConfigError, match=rf"\[server\] {key}: must be greater than 0"):
            config.from_dict({"server": {key: 0}})
    defaults = config.from_dict({}).server
    assert (defaults.max_connections, defaults.max_connections_per_ip) == (100, 50)
    assert defaults.idle_timeout >= 300  # RFC 5321 4.5.3.2.7


@pytest.mark.parametrize("debug", [False, True], ids=["default", "debug"])
def test_serve_logs_aiosmtpd_per_command_lines_only_with_debug(tmp_path: Path, debug: bool) -> None:
    cfg = tmp_path / "listserv.toml"
    cfg.write_text(
        f'[server]\nport = 0\n[http]\nenabled = false\n[database]\nurl = "sqlite:///{tmp_path}/db"\n'
        f'[dkim]\nkeys_dir = "{tmp_path}/dkim"\n',
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTSERV_")}
    base = [sys.executable, "-m", "listserv.cli", "--config", str(cfg)]
    subprocess.run([*base, "init"], check=True, capture_output=True, timeout=60, env=env)
    log_path = tmp_path / "stderr.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [*base, *(["--debug"] if debug else []), "serve"],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=env,
        )
        try:
            port = 0
            for _ in range(600):
                found = re.search(r"listening for SMTP on [\d.]+:(\d+)", log_path.read_text())
                if found:
                    port = int(found.group(1))
                    break
                assert proc.poll() is None, log_path.read_text()
                time.sleep(0.05)
            assert port, log_path.read_text()
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                for _ in range(20):
                    assert client.noop()[0] == 250
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert ("mail.log" in text) is debug, text
    assert "Traceback" not in text


@pytest.mark.parametrize(
    ("arg", "common"),
    [
        ("<a@b.example>", True),
        ("<president@example.org> SIZE=2000", True),
        ("<a.b+c@x-y.example>  BODY=8BITMIME SMTPUTF8", True),
        ("<First.Last@EXAMPLE.ORG>SIZE=1", True),
        ("<a@b.example> (a comment) SIZE=1", False),
        ('<"quoted local"@example.org>', False),
        ("<>", False),
        ("<a..b@example.org>", False),
        ("<a@-b.example>", False),
        ("<ü@example.org>", False),
        ("  <a@b.example>", False),
        ("a@b.example", False),
        ("<a@b.example", False),
    ],
)
def test_the_fast_path_reader_agrees_with_aiosmtpd(arg: str, common: bool) -> None:
    from aiosmtpd.smtp import SMTP as AioSMTP

    from listserv.smtp_in.server import simple_path

    # aiosmtpd's reader needs nothing of a session but this (a session makes a loop)
    session = SimpleNamespace(local_part_limit=0)
    reference = AioSMTP._getaddr(session, arg)  # type: ignore[arg-type]
    fast = simple_path(arg)
    assert (fast is not None) is common  # the common paths take the fast way
    if fast is not None:
        assert fast == reference


async def test_data_ends_at_crlf_dot_crlf_only_and_dots_are_unstuffed(
    db: Database, daemon_factory: Any
) -> None:
    """Our DATA reader (server.py `_data`): a bare LF ends no line, so "LF . CRLF"
    inside the text neither ends the message nor smuggles a second one; a leading
    dot is unstuffed (RFC 5321 4.5.2); a line split over many reads is one line;
    and a refused message reads to its end and leaves the session usable."""
    make_list(db, members_=["ann@one.example"], senders=[SENDER])
    daemon = await daemon_factory(server__max_message_size=4000)
    d = await dialogue(
        daemon.port,
        b"EHLO client.example",
        f"MAIL FROM:<{SENDER}>".encode(),
        f"RCPT TO:<{LIST}>".encode(),
    )
    assert (await d.say(b"DATA")).startswith(b"354 ")
    body = post_text().replace(b"The budget is approved.\r\n", b"")
    d.write(body + b"..leading dot\r\nbare\n.\r\nMAIL FROM:<x@example.org>\r\n")
    for piece in (b"one line ", b"in three ", b"reads\r\n"):
        d.write(piece)
        await d.writer.drain()
        await asyncio.sleep(0.05)
    d.write(b".\r\n")
    reply = await d.reply()
    (post_id,) = queued_ids(reply.decode().split(" ", 1)[1].strip())
    with db.reading() as s:
        post = s.get(Post, post_id)
        assert post is not None
        inbound = s.get(InboundMessage, post.inbound_id)
        assert inbound is not None
        assert inbound.raw.endswith(
            b".leading dot\r\nbare\n.\r\nMAIL FROM:<x@example.org>\r\none line in three reads\r\n"
        )
    # too much data: read to the final dot, refused, and the session goes on
    assert (await d.say(f"MAIL FROM:<{SENDER}>".encode())).startswith(b"250 ")
    assert (await d.say(f"RCPT TO:<{LIST}>".encode())).startswith(b"250 ")
    assert (await d.say(b"DATA")).startswith(b"354 ")
    d.write(body + b"x" * 80 + b"\r\n" + (b"y" * 78 + b"\r\n") * 100 + b".\r\n")
    assert (await d.reply()).startswith(b"552 ")
    assert (await d.say(b"NOOP")).startswith(b"250 ")
    await d.close()
    assert count(db, Post.id) == 1
