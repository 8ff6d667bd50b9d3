"""End to end: list addresses in any case and IDN form reach the list over SMTP, and every
description and subject prefix the CLI accepts renders into headers that parse back."""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import SMTP
from typing import Any

import aiosmtplib
import pytest
from conftest import make_list, message
from sink import Sink

from listserv import lists
from listserv.db import Database
from listserv.distribute import prepare
from listserv.errors import InvalidInput
from listserv.models import DeliveryMode, PostingPolicy

SENDER = "boss@example.org"


def post(to: str, sender: str = SENDER, subject: str = "Budget") -> bytes:
    return message(
        f"""
        From: Boss <{sender}>
        To: {to}
        Subject: {subject}
        Message-ID: <{subject.lower()}@example.org>
        Date: Mon, 23 Nov 2026 10:00:00 +0000

        The budget is approved.
        """
    )


async def send(port: int, data: bytes, rcpt: str, sender: str = SENDER) -> Any:
    return await aiosmtplib.send(
        data, sender=sender, recipients=[rcpt], hostname="127.0.0.1", port=port, timeout=10
    )


async def test_rcpt_to_a_list_in_upper_case_reaches_the_list(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=["ann@one.example", "bob@two.example"], senders=[SENDER])
    daemon = await daemon_factory()
    errors, reply = await send(
        daemon.port, post("STAFF@LISTS.EXAMPLE.ORG"), "STAFF@LISTS.EXAMPLE.ORG"
    )
    assert errors == {} and reply.startswith("2.0.0 Queued as ")
    await sink.wait_for_recipients(2)
    assert sorted(sink.recipients()) == ["ann@one.example", "bob@two.example"]
    assert {r.mail_from for r in sink.received} == {"staff-bounces@lists.example.org"}
    assert {r.message()["List-Id"] for r in sink.received} == {"<staff.lists.example.org>"}


async def test_an_idn_list_is_reached_by_its_a_label_and_u_label_forms(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    # The sender is registered in U-label form and posts in A-label form: one address.
    make_list(
        db,
        "Staff@Bücher.Example",
        members_=["user@bücher.example", "ann@one.example"],
        senders=["boss@bücher.example"],
    )
    daemon = await daemon_factory()
    boss = "boss@xn--bcher-kva.example"
    ascii_rcpt = "STAFF@XN--BCHER-KVA.example"
    _, reply = await send(daemon.port, post(ascii_rcpt, boss, "First"), ascii_rcpt, boss)
    assert reply.startswith("2.0.0 Queued as ")

    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, timeout=10)
    async with client:
        assert client.supports_extension("SMTPUTF8")
        await client.mail(boss, options=["SMTPUTF8"], encoding="utf-8")
        await client.rcpt("Staff@Bücher.Example", encoding="utf-8")
        response = await client.data(post("staff@xn--bcher-kva.example", boss, "Second"))
    assert response.code == 250

    await sink.wait_for_recipients(4)
    assert sorted(sink.recipients()) == ["ann@one.example"] * 2 + (
        ["user@xn--bcher-kva.example"] * 2
    )
    assert {r.mail_from for r in sink.received} == {"staff-bounces@xn--bcher-kva.example"}
    # ASCII all the way: the smarthost needs no SMTPUTF8 for an IDN member.
    assert all("SMTPUTF8" not in r.mail_options for r in sink.received)
    subjects = sorted({r.message()["Subject"] for r in sink.received})
    assert subjects == ["[staff] First", "[staff] Second"]
    for received in sink.received:
        msg = received.message()
        assert msg["List-Id"] == "<staff.xn--bcher-kva.example>"
        assert msg["List-Post"] == "<mailto:staff@xn--bcher-kva.example>"


#: Values `lists set` accepts, each one awkward for a header in its own way.
DESCRIPTIONS = [
    "Zoë's Grüße für alle",
    '"Staff, all" (x)',
    "<all staff> & friends; see: http://example.org/?a=1",
    'back\\slash and "quotes"',
    "=?utf-8?q?looks_encoded?=",
    "d" * 255,
    "ü" * 255,
    " ".join(["日本語のリスト"] * 31),  # 247 characters
    "Staff: the whole team, together in one place, with a rather long description",
]
PREFIXES = [
    "[staff]",
    "[Grüße]",
    '"Staff, all" (x)',
    "<staff>",
    "p" * 100,
    "ü" * 100,
    "[ a b ]",
]


def header_lines(data: bytes) -> list[bytes]:
    return data[: data.index(b"\r\n\r\n")].split(b"\r\n")


def list_id_phrase(value: str, list_id: str) -> str:
    """The description as a reader sees it in a parsed List-Id."""
    assert value.endswith(f"<{list_id}>"), value
    phrase = value[: -len(list_id) - 2].strip()
    if phrase.startswith('"') and phrase.endswith('"'):
        phrase = phrase[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return phrase


COMBINATIONS = [
    pytest.param(d, PREFIXES[i % len(PREFIXES)], id=f"description{i}")
    for i, d in enumerate(DESCRIPTIONS)
] + [
    pytest.param(DESCRIPTIONS[i % len(DESCRIPTIONS)], p, id=f"prefix{i}")
    for i, p in enumerate(PREFIXES)
]


@pytest.mark.parametrize(("description", "prefix"), COMBINATIONS)
@pytest.mark.parametrize("mode", [DeliveryMode.SHARED, DeliveryMode.PERSONALIZED])
def test_every_accepted_description_and_prefix_renders_into_headers_that_parse_back(
    db: Database, description: str, prefix: str, mode: DeliveryMode
) -> None:
    address = make_list(db, description=description, subject_prefix=prefix, delivery_mode=mode)
    with db.reading() as s:
        view = prepare.ListView.of(lists.get(s, address))
    data = prepare.render(post(address), view, None)
    if mode is DeliveryMode.PERSONALIZED:
        (data,) = prepare.personalize(data, view, ["ann@one.example"], None)

    lines = header_lines(data)
    assert all(line.isascii() and len(line) <= 998 for line in lines)  # RFC 5322 §2.1.1
    assert all(line[:1] in (b" ", b"\t") or b":" in line for line in lines)  # no stray line
    msg = BytesParser(policy=SMTP).parsebytes(data)
    assert [name for name, _ in msg.items()].count("List-Id") == 1
    assert "Bcc" not in msg
    for name in ("List-Id", "Subject", "List-Post", "From"):
        assert not msg[name].defects, name
    assert list_id_phrase(str(msg["List-Id"]), view.list_id) == description.strip()
    assert str(msg["Subject"]) == f"{prefix} Budget"
    assert msg["List-Post"] == "<mailto:staff@lists.example.org>"
    body = msg.get_body(("plain",))
    assert body is not None and "The budget is approved." in body.get_content()


def test_a_subject_prefix_that_would_read_as_an_encoded_word_is_refused(db: Database) -> None:
    address = make_list(db)
    with db.session() as s, pytest.raises(InvalidInput, match="encoded-word"):
        lists.set_setting(s, lists.get(s, address), "subject_prefix", "=?utf-8?q?x?=")


async def test_a_list_with_an_awkward_description_and_prefix_delivers_its_posts(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    description = '"Staff, all" (x) <Grüße> ' + "d" * 200
    make_list(
        db,
        members_=["ann@one.example"],
        policy=PostingPolicy.OPEN,
        description=description,
        subject_prefix='"Staff, all" (x)',
    )
    daemon = await daemon_factory()
    await send(daemon.port, post("staff@lists.example.org"), "staff@lists.example.org")
    await sink.wait_for_recipients(1)
    msg = sink.received[0].message()
    assert str(msg["Subject"]) == '"Staff, all" (x) Budget'
    assert list_id_phrase(str(msg["List-Id"]), "staff.lists.example.org") == description
