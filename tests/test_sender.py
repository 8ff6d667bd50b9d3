"""The SMTP sender against real aiosmtpd sinks on loopback: pipelined groups,
replies matched to their recipients, faults scripted on the sink mid-pipeline,
STARTTLS, AUTH, SMTPUTF8, dot-stuffing and connection reuse."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sink import Sink
from test_e2e import _self_signed

from listserv.config import DeliverySettings
from listserv.distribute import sender
from listserv.distribute.results import RecipientResult
from listserv.distribute.smtp_client import dot_stuff
from listserv.models import RecipientState

DELIVERED, DEFERRED, FAILED = (
    RecipientState.DELIVERED,
    RecipientState.DEFERRED,
    RecipientState.FAILED,
)
FROM = "staff-bounces@lists.example.org"
MESSAGE = (
    textwrap.dedent(
        """\
        From: Boss <boss@example.org>
        To: staff@lists.example.org
        Subject: Closure
        Message-ID: <closure@example.org>

        The building is closed on Friday.
        """
    )
    .replace("\n", "\r\n")
    .encode()
)
COMMAND = re.compile(rb"^(EHLO|HELO|MAIL|RCPT|DATA|RSET|QUIT|AUTH|STARTTLS)\b", re.M)


def settings(sink: Sink, **overrides: Any) -> DeliverySettings:
    return DeliverySettings(host=sink.host, port=sink.port, **{"timeout": 10.0, **overrides})


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with Sink() as s:
        yield s


@pytest.fixture
async def conn(sink: Sink) -> AsyncIterator[sender.Connection]:
    connection = sender.Connection(settings(sink), "lists.example.org")
    yield connection
    await connection.close()


def rcpts(*addresses: str) -> list[tuple[int, str]]:
    return list(enumerate(addresses, start=1))


def by_address(
    recipients: list[tuple[int, str]], results: list[RecipientResult]
) -> dict[str, tuple[RecipientState, int | None]]:
    """Results keyed by address; also checks that every recipient got exactly one."""
    address = dict(recipients)
    assert sorted(r.delivery_id for r in results) == sorted(address)
    return {address[r.delivery_id]: (r.outcome, r.code) for r in results}


def commands_per_read(sink: Sink) -> list[int]:
    """How many command lines arrived in each chunk the sink read (message bodies: 0)."""
    return [len(COMMAND.findall(chunk)) for chunk in sink.reads]


def wire(sink: Sink) -> bytes:
    return b"".join(sink.reads)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# -- pipelining ----------------------------------------------------------------------------


async def test_many_recipients_go_in_one_pipelined_group_and_are_all_delivered(
    sink: Sink, conn: sender.Connection
) -> None:
    many = rcpts(*(f"member{i}@d{i % 9}.example" for i in range(300)))
    results = await sender.send(conn, FROM, many, MESSAGE)
    assert set(by_address(many, results).values()) == {(DELIVERED, 250)}
    [received] = sink.received
    assert received.rcpt_tos == [a for _, a in many]
    assert received.data == MESSAGE
    assert received.helo == "lists.example.org"
    # MAIL, the RCPTs and DATA were written before any reply was read: the sink
    # read them together (one command at a time can never put two in one read).
    group = next(chunk for chunk in sink.reads if chunk.startswith(b"MAIL FROM:"))
    assert group.count(b"RCPT TO:") > 1
    assert max(commands_per_read(sink)) > 1


async def test_refusals_mid_pipeline_are_matched_to_their_recipients(
    sink: Sink, conn: sender.Connection
) -> None:
    sink.script("RCPT", "451 4.2.1 mailbox busy", match="bob@")
    sink.script("RCPT", "550 5.1.1 no such user", match="dan@")
    sink.script("RCPT", "552 5.2.2 over quota", match="eve@")
    sink.script("RCPT", "252 2.1.5 cannot verify, will try", match="fay@")
    group = rcpts(
        *(f"{name}@{name[0]}.example" for name in ("ann", "bob", "cy", "dan", "eve", "fay"))
    )
    results = await sender.send(conn, FROM, group, MESSAGE)
    assert by_address(group, results) == {
        "ann@a.example": (DELIVERED, 250),
        "bob@b.example": (DEFERRED, 451),
        "cy@c.example": (DELIVERED, 250),
        "dan@d.example": (FAILED, 550),
        "eve@e.example": (DEFERRED, 552),  # 552 at RCPT is temporary (RFC 5321 4.5.3.1.10)
        "fay@f.example": (DELIVERED, 250),  # 252 to RCPT accepts; 250 is DATA's reply
    }
    [dan] = [r for r in results if r.code == 550]
    assert dan.detail == "5.1.1 no such user"
    # the scripted 252 rejected fay at the sink (a scripted reply never joins rcpt_tos)
    assert sink.recipients() == ["ann@a.example", "cy@c.example"]


async def test_mail_from_refused_in_a_pipeline_answers_every_recipient_with_it(
    sink: Sink, conn: sender.Connection
) -> None:
    sink.script("MAIL", "550 5.7.1 sender refused")
    group = rcpts("ann@a.example", "bob@b.example")
    results = await sender.send(conn, FROM, group, MESSAGE)
    assert set(by_address(group, results).values()) == {(FAILED, 550)}
    assert all(r.detail == "MAIL FROM refused: 550 5.7.1 sender refused" for r in results)
    # the RCPTs and DATA went out in the group all the same, and were answered 503
    assert sink.counters["RCPT"] == 0 and wire(sink).count(b"RCPT TO:") == 2
    results = await sender.send(conn, FROM, group, MESSAGE)  # the connection is in step
    assert set(by_address(group, results).values()) == {(DELIVERED, 250)}
    assert wire(sink).count(b"EHLO") == 1


async def test_all_rcpts_refused_reads_the_data_reply_and_the_connection_carries_on(
    sink: Sink, conn: sender.Connection
) -> None:
    sink.script("RCPT", "550 5.1.1 no such user", times=-1, match="@gone.example")
    refused = rcpts("ann@gone.example", "bob@gone.example")
    results = await sender.send(conn, FROM, refused, MESSAGE)
    assert set(by_address(refused, results).values()) == {(FAILED, 550)}
    assert sink.counters["DATA"] == 0 and MESSAGE not in wire(sink)
    # DATA was pipelined and answered "503 need RCPT"; had that reply been left
    # unread, it would now be taken for the reply to the next MAIL.
    assert b"DATA\r\n" in wire(sink)
    later = rcpts("cy@here.example")
    results = await sender.send(conn, FROM, later, MESSAGE)
    assert by_address(later, results) == {"cy@here.example": (DELIVERED, 250)}
    assert sink.recipients() == ["cy@here.example"]
    assert wire(sink).count(b"EHLO") == 1 and wire(sink).count(b"RSET\r\n") == 1


class _DataAnyway:
    """An aiosmtpd handler that refuses every RCPT yet answers DATA with 354, as
    RFC 2920 section 1 (3) says some servers do."""

    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.rcpt_tos.append(address)  # so aiosmtpd will not answer DATA with 503
        return "550 5.1.1 no such user"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.contents.append(envelope.original_content)
        return "250 OK"


async def test_a_354_after_every_rcpt_was_refused_gets_a_lone_dot_not_the_message() -> None:
    from aiosmtpd.smtp import SMTP

    handler = _DataAnyway()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, hostname="odd.test"), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        conn = sender.Connection(DeliverySettings(host="127.0.0.1", port=port), "x.example")
        group = rcpts("ann@a.example", "bob@b.example")
        for _ in range(2):  # the second proves the connection stayed in step
            results = await sender.send(conn, FROM, group, MESSAGE)
            assert set(by_address(group, results).values()) == {(FAILED, 550)}
        assert handler.contents == [b"", b""]  # RFC 2920 3.1: "send a single dot"
        await conn.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("at", ["DATA-START", "DATA"], ids=["before-354", "after-the-dot"])
@pytest.mark.parametrize(
    ("reply", "outcome"),
    [("451 4.3.0 try later", DEFERRED), ("554 5.6.0 content refused", FAILED)],
    ids=["451", "554"],
)
async def test_data_refused_defers_or_fails_the_accepted_and_keeps_rcpt_refusals(
    sink: Sink, conn: sender.Connection, at: str, reply: str, outcome: RecipientState
) -> None:
    sink.script("RCPT", "550 5.1.1 no such user", match="bob@")
    sink.script(at, reply)
    group = rcpts("ann@a.example", "bob@b.example", "cy@c.example")
    results = await sender.send(conn, FROM, group, MESSAGE)
    code = int(reply[:3])
    assert by_address(group, results) == {
        "ann@a.example": (outcome, code),
        "bob@b.example": (FAILED, 550),
        "cy@c.example": (outcome, code),
    }
    assert sink.received == []
    # refused at the command: the body never crossed the wire
    assert (MESSAGE in wire(sink)) is (at == "DATA")
    results = await sender.send(conn, FROM, rcpts("dan@d.example"), MESSAGE)
    assert [r.outcome for r in results] == [DELIVERED]
    assert wire(sink).count(b"EHLO") == 1 and wire(sink).count(b"RSET\r\n") == 1


async def test_a_drop_mid_pipeline_keeps_final_refusals_and_defers_the_rest(
    sink: Sink, conn: sender.Connection
) -> None:
    sink.script("RCPT", "550 5.1.1 no such user", match="bob@")
    sink.script("RCPT", "451 4.2.1 busy", match="cy@")
    sink.disconnect_after("RCPT", match="dan@")
    group = rcpts(*(f"{name}@{name[0]}.example" for name in ("ann", "bob", "cy", "dan", "eve")))
    results = await sender.send(conn, FROM, group, MESSAGE)
    assert by_address(group, results) == {
        "ann@a.example": (DEFERRED, None),  # accepted, but no message went out
        "bob@b.example": (FAILED, 550),
        "cy@c.example": (DEFERRED, 451),
        "dan@d.example": (DEFERRED, None),
        "eve@e.example": (DEFERRED, None),
    }
    lost = [r for r in results if r.code is None]
    assert all(r.detail.startswith("connection lost: ") for r in lost)
    # the next transaction opens a new connection
    results = await sender.send(conn, FROM, rcpts("fay@f.example"), MESSAGE)
    assert [r.outcome for r in results] == [DELIVERED]
    assert wire(sink).count(b"EHLO") == 2


async def test_a_drop_after_the_rcpts_before_354_defers_the_accepted(
    sink: Sink, conn: sender.Connection
) -> None:
    sink.script("RCPT", "550 5.1.1 no such user", match="bob@")
    sink.disconnect_after("DATA-START")
    group = rcpts("ann@a.example", "bob@b.example", "cy@c.example")
    phase = sender.Phase()
    results = await sender.send(conn, FROM, group, MESSAGE, phase)
    assert by_address(group, results) == {
        "ann@a.example": (DEFERRED, None),
        "bob@b.example": (FAILED, 550),
        "cy@c.example": (DEFERRED, None),
    }
    assert MESSAGE not in wire(sink) and not phase.in_data


async def test_in_data_is_set_once_the_message_is_sent_and_a_drop_then_defers(
    sink: Sink, conn: sender.Connection
) -> None:
    rcpt_held = sink.hold("RCPT", match="bob@")
    sink.hold("DATA")  # never released
    group = rcpts("ann@a.example", "bob@b.example")
    phase = sender.Phase()
    task = asyncio.create_task(sender.send(conn, FROM, group, MESSAGE, phase))
    await wait_until(lambda: sink.counters["RCPT"] == 2)
    assert not phase.in_data  # waiting for RCPT replies: cancelling now loses nothing
    rcpt_held.set()
    await wait_until(lambda: sink.counters["DATA"] == 1)  # the whole message arrived
    assert phase.in_data
    await sink.stop()  # the smarthost goes away before its final reply
    results = await task
    assert by_address(group, results) == {
        "ann@a.example": (DEFERRED, None),
        "bob@b.example": (DEFERRED, None),
    }
    assert not phase.in_data


async def test_no_reply_within_the_timeout_defers_every_open_recipient(sink: Sink) -> None:
    conn = sender.Connection(settings(sink, timeout=0.3), "lists.example.org")
    sink.delay("RCPT", 30, match="bob@")
    group = rcpts("ann@a.example", "bob@b.example")
    results = await sender.send(conn, FROM, group, MESSAGE)
    assert set(by_address(group, results).values()) == {(DEFERRED, None)}
    assert all("no reply within 0.3 s" in r.detail for r in results)
    await conn.close()


async def test_connection_refused_defers_everything() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = sender.Connection(DeliverySettings(host="127.0.0.1", port=port), "lists.example.org")
    results = await sender.send(conn, FROM, rcpts("ann@a.example"), MESSAGE)
    assert [(r.outcome, r.code) for r in results] == [(DEFERRED, None)]
    assert results[0].detail.startswith("connection failed: ")


async def test_a_server_without_pipelining_gets_one_command_at_a_time() -> None:
    async with Sink(pipelining=False) as sink:
        conn = sender.Connection(settings(sink), "lists.example.org")
        sink.script("RCPT", "550 5.1.1 no such user", match="bob@")
        group = rcpts("ann@a.example", "bob@b.example", "cy@c.example")
        results = await sender.send(conn, FROM, group, MESSAGE)
        assert by_address(group, results) == {
            "ann@a.example": (DELIVERED, 250),
            "bob@b.example": (FAILED, 550),
            "cy@c.example": (DELIVERED, 250),
        }
        sink.script("MAIL", "451 4.3.0 try later")
        results = await sender.send(conn, FROM, group, MESSAGE)
        assert set(by_address(group, results).values()) == {(DEFERRED, 451)}
        await conn.close()
    counts = commands_per_read(sink)
    assert max(counts) == 1  # never a second command before the reply to the first
    assert wire(sink).count(b"RCPT TO:") == 3  # none after the refused MAIL
    assert b"PIPELINING" not in wire(sink)  # (the client never names it, of course)


async def test_pipelining_false_in_the_settings_sends_one_command_at_a_time(sink: Sink) -> None:
    conn = sender.Connection(settings(sink, pipelining=False), "lists.example.org")
    group = rcpts("ann@a.example", "bob@b.example")
    results = await sender.send(conn, FROM, group, MESSAGE)
    assert set(by_address(group, results).values()) == {(DELIVERED, 250)}
    await conn.close()
    assert max(commands_per_read(sink)) == 1


# -- the message and its envelope ----------------------------------------------------------


async def test_lines_starting_with_a_dot_are_stuffed_and_arrive_intact(
    sink: Sink, conn: sender.Connection
) -> None:
    dotty = MESSAGE + b".hidden\r\n..two\r\n.\r\nlast\r\n"
    results = await sender.send(conn, FROM, rcpts("ann@a.example"), dotty)
    assert [r.outcome for r in results] == [DELIVERED]
    assert sink.received[0].data == dotty
    assert b"\r\n..hidden\r\n...two\r\n..\r\nlast\r\n.\r\n" in wire(sink)


def test_dot_stuff_ends_the_last_line_and_makes_every_line_end_crlf() -> None:
    assert dot_stuff(b".a\nb\rc") == b"..a\r\nb\r\nc\r\n.\r\n"
    assert dot_stuff(b"x\r\n") == b"x\r\n.\r\n"


async def test_smtputf8_and_8bitmime_options_are_sent_when_needed(
    sink: Sink, conn: sender.Connection
) -> None:
    utf8 = "Subject: Grüße\r\n\r\nSchöne Grüße\r\n".encode()
    results = await sender.send(conn, FROM, rcpts("zoë@köln.example"), utf8)
    assert [r.outcome for r in results] == [DELIVERED]
    eight_bit_body = b"Subject: hi\r\n\r\ncaf\xc3\xa9\r\n"
    results = await sender.send(conn, FROM, rcpts("ann@a.example"), eight_bit_body)
    assert [r.outcome for r in results] == [DELIVERED]
    results = await sender.send(conn, FROM, rcpts("bob@b.example"), MESSAGE)
    assert [r.outcome for r in results] == [DELIVERED]
    first, second, third = sink.received
    assert first.rcpt_tos == ["zoë@köln.example"] and first.data == utf8
    assert sorted(first.mail_options) == ["BODY=8BITMIME", "SMTPUTF8"]
    assert second.mail_options == ["BODY=8BITMIME"] and second.data == eight_bit_body
    assert third.mail_options == []


async def test_a_server_without_smtputf8_fails_such_a_message_and_sends_nothing() -> None:
    async with Sink(enable_SMTPUTF8=False) as sink:
        conn = sender.Connection(settings(sink), "lists.example.org")
        group = rcpts("zoë@köln.example", "ann@a.example")
        results = await sender.send(conn, FROM, group, MESSAGE)
        assert set(by_address(group, results).values()) == {(FAILED, 553)}
        assert all(r.detail == "smarthost lacks SMTPUTF8" for r in results)
        assert sink.counters["MAIL"] == 0
        results = await sender.send(conn, FROM, rcpts("ann@a.example"), MESSAGE)
        assert [r.outcome for r in results] == [DELIVERED]
        await conn.close()


async def test_one_connection_carries_several_transactions_and_quits(sink: Sink) -> None:
    conn = sender.Connection(settings(sink), "lists.example.org")
    for n in range(3):
        results = await sender.send(conn, FROM, rcpts(f"m{n}@a.example"), MESSAGE)
        assert [r.outcome for r in results] == [DELIVERED]
    await conn.close()
    assert sink.recipients() == ["m0@a.example", "m1@a.example", "m2@a.example"]
    assert wire(sink).count(b"EHLO") == 1
    assert wire(sink).endswith(b"QUIT\r\n")


# -- STARTTLS and AUTH ---------------------------------------------------------------------


def _tls_server_context(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, cert


async def test_starttls_is_verified_against_the_configured_ca_and_then_pipelines(
    tmp_path: Path,
) -> None:
    context, cert = _tls_server_context(tmp_path)
    async with Sink(tls_context=context, require_starttls=True) as sink:
        conn = sender.Connection(
            settings(sink, starttls=True, tls_ca_file=str(cert)), "lists.example.org"
        )
        group = rcpts("ann@a.example", "bob@b.example", "cy@c.example")
        for _ in range(2):
            results = await sender.send(conn, FROM, group, MESSAGE)
            assert set(by_address(group, results).values()) == {(DELIVERED, 250)}
        await conn.close()
    assert [(r.tls, r.rcpt_tos) for r in sink.received] == [(True, [a for _, a in group])] * 2
    # (the sink records what it read after decryption) EHLO again once under TLS
    # (RFC 3207 4.2), one handshake for both transactions, and the envelope pipelined
    seen = wire(sink)
    assert seen.count(b"STARTTLS\r\n") == 1 and seen.count(b"EHLO ") == 2
    assert seen.index(b"STARTTLS") < seen.rindex(b"EHLO ") < seen.index(b"MAIL FROM")
    assert max(commands_per_read(sink)) > 1


async def test_an_untrusted_certificate_defers_and_sends_nothing(tmp_path: Path) -> None:
    context, _ = _tls_server_context(tmp_path)
    async with Sink(tls_context=context, require_starttls=True) as sink:
        conn = sender.Connection(settings(sink, starttls=True), "lists.example.org")
        results = await sender.send(conn, FROM, rcpts("ann@a.example"), MESSAGE)
        assert [(r.outcome, r.code) for r in results] == [(DEFERRED, None)]
        assert "CERTIFICATE_VERIFY_FAILED" in results[0].detail
        assert sink.received == []


class _Logins:
    """aiosmtpd's authenticator hook, keeping what it was asked."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        ok = isinstance(auth_data, LoginPassword) and (
            auth_data.login,
            auth_data.password,
        ) == (b"lists", b"s3cr\xc3\xa9t")
        self.seen.append((mechanism, ok))
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd sends the 535


# aiosmtpd warns about AUTH without TLS (fine on loopback) and about its own
# deprecated Session.login_data, which it sets itself.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.filterwarnings("ignore:Session.login_data is deprecated")
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_plain_or_login_when_a_username_is_set(mechanism: str) -> None:
    logins = _Logins()
    other = {"PLAIN": "LOGIN", "LOGIN": "PLAIN"}[mechanism]
    async with Sink(
        authenticator=logins,
        auth_required=True,
        auth_require_tls=False,
        auth_exclude_mechanism=[other],
    ) as sink:
        good = sender.Connection(
            settings(sink, username="lists", password="s3cré t".replace(" ", "")),
            "lists.example.org",
        )
        results = await sender.send(good, FROM, rcpts("ann@a.example"), MESSAGE)
        assert [r.outcome for r in results] == [DELIVERED]
        await good.close()
        bad = sender.Connection(
            settings(sink, username="lists", password="wrong"), "lists.example.org"
        )
        results = await sender.send(bad, FROM, rcpts("bob@b.example"), MESSAGE)
        assert [(r.outcome, r.code) for r in results] == [(DEFERRED, None)]
        assert results[0].detail.startswith("connection failed: AUTH refused: 535")
        bad.drop()
    assert logins.seen == [(mechanism, True), (mechanism, False)]
    assert sink.recipients() == ["ann@a.example"]


# -- copies in a row: the next envelope behind each message (RFC 2920 3.1) ------------------


def copies(*addresses: str) -> list[sender.Copy]:
    """One personalized copy per address, each with its own Subject."""
    return [
        sender.Copy(FROM, [(i, a)], MESSAGE.replace(b"Subject: Closure", f"Subject: {a}".encode()))
        for i, a in enumerate(addresses, start=1)
    ]


async def send_in_a_row(
    conn: sender.Connection, row: list[sender.Copy]
) -> list[list[RecipientResult]]:
    """Each copy with the next one announced behind it, as the engine sends them."""
    return [
        await sender.send_copy(conn, copy, then=row[i + 1] if i + 1 < len(row) else None)
        for i, copy in enumerate(row)
    ]


async def test_copies_in_a_row_announce_the_next_envelope_behind_each_message(
    sink: Sink, conn: sender.Connection
) -> None:
    row = copies(*(f"member{i}@d{i}.example" for i in range(5)))
    results = await send_in_a_row(conn, row)
    assert [[(r.outcome, r.code) for r in one] for one in results] == [[(DELIVERED, 250)]] * 5
    assert [(r.rcpt_tos, r.data) for r in sink.received] == [
        ([c.recipients[0][1]], c.message) for c in row
    ]
    # a message, its final dot and the next MAIL, RCPT and DATA went out in one write:
    # without the chaining the client waits for the 250 to the dot before any MAIL
    chained = [chunk for chunk in sink.reads if b"\r\n.\r\nMAIL FROM:" in chunk]
    assert chained and all(chunk.endswith(b"DATA\r\n") for chunk in chained)
    assert wire(sink).count(b"EHLO") == 1 and b"RSET" not in wire(sink)


async def test_refusals_in_a_row_of_copies_are_each_copys_own_and_the_row_goes_on(
    sink: Sink, conn: sender.Connection
) -> None:
    sink.script("RCPT", "550 5.1.1 no such user", match="bob@")
    sink.script("DATA-START", "451 4.3.0 try later", match="cy@")
    sink.script("DATA", "554 5.6.0 content refused", match="dan@")
    sink.script("MAIL", "421 4.7.0 slow down")  # the first MAIL: ann's copy
    names = ("ann", "bob", "cy", "dan", "eve", "fay")
    row = copies(*(f"{name}@{name[0]}.example" for name in names))
    results = await send_in_a_row(conn, row)
    assert [[(r.outcome, r.code) for r in one] for one in results] == [
        [(DEFERRED, 421)],  # MAIL refused, announced by no one: written on its own
        [(FAILED, 550)],  # RCPT refused mid-row, DATA answered 503: RSET, then on
        [(DEFERRED, 451)],  # DATA refused before the 354
        [(FAILED, 554)],  # refused after the dot; its announced successor still goes
        [(DELIVERED, 250)],
        [(DELIVERED, 250)],
    ]
    assert sink.recipients() == ["eve@e.example", "fay@f.example"]
    assert [r.data for r in sink.received] == [row[4].message, row[5].message]
    assert wire(sink).count(b"EHLO") == 1  # in step all along: never reconnected


async def test_an_announced_copy_that_does_not_follow_closes_the_connection(
    sink: Sink, conn: sender.Connection
) -> None:
    ann, bob, cy = copies("ann@a.example", "bob@b.example", "cy@c.example")
    first = await sender.send_copy(conn, ann, then=bob)
    assert [r.outcome for r in first] == [DELIVERED]
    await wait_until(lambda: sink.counters["DATA"] == 1 and wire(sink).endswith(b"DATA\r\n"))
    conn.settle()  # bob's envelope went out and may have its 354: only hanging up ends it
    await wait_until(lambda: not sink._sessions)
    later = await sender.send_copy(conn, cy)
    assert [r.outcome for r in later] == [DELIVERED]
    assert sink.recipients() == ["ann@a.example", "cy@c.example"]  # bob got nothing, not empty
    assert wire(sink).count(b"EHLO") == 2


async def test_a_copy_sent_other_than_the_one_announced_is_not_sent_on_that_connection(
    sink: Sink, conn: sender.Connection
) -> None:
    ann, bob, cy = copies("ann@a.example", "bob@b.example", "cy@c.example")
    await sender.send_copy(conn, ann, then=bob)
    results = await sender.send_copy(conn, cy)  # out of step: the caller's mistake
    assert [r.outcome for r in results] == [DEFERRED]  # retried later, never mixed up
    assert sink.recipients() == ["ann@a.example"]
    again = await sender.send_copy(conn, cy)
    assert [r.outcome for r in again] == [DELIVERED]


async def test_without_pipelining_copies_in_a_row_go_one_command_at_a_time() -> None:
    async with Sink(pipelining=False) as plain:
        conn = sender.Connection(settings(plain), "lists.example.org")
        row = copies("ann@a.example", "bob@b.example", "cy@c.example")
        results = await send_in_a_row(conn, row)
        await conn.close()
    assert [[r.outcome for r in one] for one in results] == [[DELIVERED]] * 3
    assert [r.data for r in plain.received] == [c.message for c in row]
    assert max(commands_per_read(plain)) == 1
