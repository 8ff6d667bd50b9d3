"""One-click unsubscribe end to end: a post through the daemon, the copies at the sink,
and the link taken from a delivered copy POSTed to the daemon's own HTTP endpoint.

The daemon sits behind a TLS proxy in production: `public_base_url` is the public
https URL, and the test plays the proxy by sending the link's path to 127.0.0.1.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import dkim as dkimpy
import sqlalchemy as sa
from conftest import make_list
from sink import Sink
from test_e2e import MEMBERS, SENDER, post_state, post_text, send, wait_until

from listserv.db import Database
from listserv.distribute import dkim
from listserv.models import Member, Post, PostState, Role, Unsubscription

BASE = "https://lists.example.org"


def dnsfunc_for(key: dkim.SigningKey) -> Any:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return key.public_txt().encode() if name.startswith(b"test._domainkey.") else None

    return dnsfunc


def https_link(list_unsubscribe: str) -> str:
    found = re.match(
        r"<(https://[^>]+)>, <mailto:staff-leave@lists\.example\.org\?", list_unsubscribe
    )
    assert found is not None, list_unsubscribe
    return found[1]


async def post_form(url: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as client,
        client.post(url, data={"List-Unsubscribe": "One-Click"}) as response,
    ):
        return response.status, await response.text()


def member_addresses(db: Database) -> set[str]:
    with db.reading() as s:
        return set(s.scalars(sa.select(Member.address).where(Member.role == Role.MEMBER)))


async def test_each_member_gets_a_signed_copy_whose_link_unsubscribes_them(
    db: Database, sink: Sink, daemon_factory: Any, tmp_path: Path
) -> None:
    key = dkim.generate_key(tmp_path / "dkim", "lists.example.org", "test", bits=1024)
    make_list(db, members_=MEMBERS, senders=[SENDER])  # one-click on: the default
    daemon = await daemon_factory(http__public_base_url=BASE)
    await send(daemon.port, post_text())
    await sink.wait_for_recipients(len(MEMBERS))
    await wait_until(lambda: post_state(db) is PostState.SENT)

    assert len(sink.received) == len(MEMBERS)  # one message per recipient
    links = {}
    for received in sink.received:
        (rcpt,) = received.rcpt_tos
        assert dkimpy.verify(received.data, dnsfunc=dnsfunc_for(key))
        msg = received.message()
        links[rcpt] = https_link(msg["List-Unsubscribe"])
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        signed = re.sub(r"\s", "", msg["DKIM-Signature"])
        h_tag = re.search(r"h=([^;]+)", signed)
        assert h_tag is not None
        h_names = h_tag[1].split(":")
        assert "list-unsubscribe" in h_names and "list-unsubscribe-post" in h_names
        body = msg.get_body(("plain",))
        assert body is not None
        assert "To unsubscribe, send an e-mail to staff-leave@lists.example.org" in (
            body.get_content()
        )
    assert len(set(links.values())) == len(MEMBERS)
    with db.reading() as s:
        assert s.scalar(sa.select(Post.delivery_mode).order_by(Post.id.desc()).limit(1)) == (
            "personalized"
        )

    leaver = MEMBERS[1]
    path = urlsplit(links[leaver]).path
    endpoint = f"http://127.0.0.1:{daemon.daemon.http_port}{path}"
    async with aiohttp.ClientSession() as client, client.get(endpoint) as response:
        assert response.status == 200  # the page only: nobody unsubscribed yet
    assert leaver in member_addresses(db)
    assert await post_form(endpoint) == (200, unsubscribed_page(leaver))
    assert member_addresses(db) == set(MEMBERS) - {leaver}
    with db.reading() as s:
        recorded = s.execute(sa.select(Unsubscription.address, Unsubscription.via)).all()
    assert [tuple(r) for r in recorded] == [(leaver, "one-click")]
    status, _ = await post_form(endpoint)
    assert status == 200  # idempotent

    # the next post no longer reaches them
    sink.received.clear()
    await send(daemon.port, post_text(subject="Second"))
    await sink.wait_for_recipients(len(MEMBERS) - 1)
    await wait_until(lambda: post_state(db) is PostState.SENT)
    assert Counter(sink.recipients()) == Counter(set(MEMBERS) - {leaver})


def unsubscribed_page(address: str) -> str:
    """The body of the 200 page, as the endpoint writes it for `address`."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width">'
        "<title>Unsubscribed</title></head>\n<body>\n<h1>Unsubscribed</h1>\n"
        f"<p>{address} is no longer subscribed to staff@lists.example.org.</p>\n"
        "</body></html>\n"
    )


async def test_unsubscribe_url_is_filled_with_the_same_link_as_the_header(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS[:2], senders=[SENDER], merge_fields="on")
    daemon = await daemon_factory(http__public_base_url=BASE)
    data = post_text().replace(b"The budget is approved.", b"Leave here: $unsubscribe_url")
    await send(daemon.port, data)
    await sink.wait_for_recipients(2)
    for received in sink.received:
        msg = received.message()
        body = msg.get_body(("plain",))
        assert body is not None
        text = body.get_content()
        assert "$unsubscribe_url" not in text
        assert f"Leave here: {https_link(msg['List-Unsubscribe'])}" in text


async def test_a_mandatory_list_has_no_one_click_its_footer_explains_and_posts_are_refused(
    db: Database, sink: Sink, daemon_factory: Any, tmp_path: Path
) -> None:
    key = dkim.generate_key(tmp_path / "dkim", "lists.example.org", "test", bits=1024)
    make_list(db, members_=MEMBERS, senders=[SENDER], mandatory="true", merge_fields="on")
    daemon = await daemon_factory(http__public_base_url=BASE)
    data = post_text().replace(b"The budget is approved.", b"Crisis notice. $unsubscribe_url")
    await send(daemon.port, data)
    await sink.wait_for_recipients(len(MEMBERS))
    await wait_until(lambda: post_state(db) is PostState.SENT)
    url = ""
    for received in sink.received:
        assert dkimpy.verify(received.data, dnsfunc=dnsfunc_for(key))
        msg = received.message()
        assert "List-Unsubscribe" not in msg
        assert "List-Unsubscribe-Post" not in msg
        body = msg.get_body(("plain",))
        assert body is not None
        text = body.get_content()
        assert "it cannot be unsubscribed" in text
        assert "To unsubscribe" not in text
        found = re.search(r"Crisis notice\. (https://\S+)", text)
        assert found is not None  # the author's own link still leads to the explanation
        url = found[1]
    endpoint = f"http://127.0.0.1:{daemon.daemon.http_port}{urlsplit(url).path}"
    status, text = await post_form(endpoint)
    assert status == 403
    assert "mandatory" in text
    assert member_addresses(db) == set(MEMBERS)
    with db.reading() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Unsubscription)) == 0


async def test_one_click_off_keeps_shared_delivery_with_the_mailto_only(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER], one_click_unsubscribe="off")
    daemon = await daemon_factory(http__public_base_url=BASE)
    await send(daemon.port, post_text())
    await sink.wait_for_recipients(len(MEMBERS))
    assert sorted(len(r.rcpt_tos) for r in sink.received) == [1, 2, 2]  # by domain, shared
    for received in sink.received:
        msg = received.message()
        assert msg["List-Unsubscribe"] == (
            "<mailto:staff-leave@lists.example.org?subject=unsubscribe>"
        )
        assert "List-Unsubscribe-Post" not in msg


async def test_without_public_base_url_the_list_stays_shared(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    daemon = await daemon_factory()  # no [http] public_base_url
    await send(daemon.port, post_text())
    await sink.wait_for_recipients(len(MEMBERS))
    assert sorted(len(r.rcpt_tos) for r in sink.received) == [1, 2, 2]
    assert all("List-Unsubscribe-Post" not in r.message() for r in sink.received)
    with db.reading() as s:
        assert s.scalar(sa.select(Post.delivery_mode)) == "shared"
