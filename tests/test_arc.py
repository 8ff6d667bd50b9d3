"""ARC sealing of posts the list changed: signed posts sent through the running daemon,
the sealed copies verified at the sink by dkimpy's arc_verify, with every key served
by a DNS server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim as dkimpy
import pytest
from conftest import make_list, message
from dnsserver import DnsServer
from sink import Sink

from listserv import mail
from listserv.config import DnsSettings
from listserv.db import Database
from listserv.distribute import arc, dkim, dmarc
from listserv.dns import Resolver
from listserv.models import PostingPolicy

LIST = "staff@lists.example.org"
MEMBERS = ["ann@one.example", "bob@two.example"]


def post_text() -> bytes:
    return message(
        f"""
        From: Jane <jane@example.net>
        To: {LIST}
        Subject: Minutes
        Message-ID: <minutes@example.net>
        Date: Mon, 23 Nov 2026 10:00:00 +0000

        The minutes are attached.
        """
    )


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, dkim.SigningKey]:
    return {
        "author": dkim.generate_key(tmp_path / "authors", "example.net", "a1", bits=1024),
        "upstream": dkim.generate_key(tmp_path / "authors", "mx.example.com", "m1", bits=1024),
        "list": dkim.generate_key(tmp_path / "dkim", "lists.example.org", "s1", bits=1024),
    }


@pytest.fixture
def dns_server(keys: dict[str, dkim.SigningKey]) -> Iterator[DnsServer]:
    dmarc.policies_for.cache_clear()  # daemons' caches must not outlive this server's port
    with DnsServer() as server:
        for key in keys.values():
            server.txt[key.dns_name()] = [key.public_txt()]
        yield server


def dnsfunc_for(server: DnsServer) -> Any:
    resolver = Resolver(DnsSettings(nameservers=(server.address,)))

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        records = resolver.txt(name.decode())
        return records[0] if records else None

    return dnsfunc


async def deliver(daemon_factory: Any, sink: Sink, server: DnsServer, raw: bytes) -> list[Any]:
    daemon = await daemon_factory(dns__nameservers=[server.address])
    await aiosmtplib.send(
        raw,
        sender="jane@example.net",
        recipients=[LIST],
        hostname="127.0.0.1",
        port=daemon.port,
        timeout=10,
    )
    await sink.wait_for_recipients(len(MEMBERS))
    return sink.received


async def test_a_signed_post_is_sealed_and_the_seal_verifies(
    db: Database,
    sink: Sink,
    daemon_factory: Any,
    dns_server: DnsServer,
    keys: dict[str, dkim.SigningKey],
) -> None:
    make_list(db, LIST, policy=PostingPolicy.OPEN, members_=MEMBERS)
    raw = dkim.Signer(keys["author"]).sign(post_text())
    dnsfunc = dnsfunc_for(dns_server)
    for item in await deliver(daemon_factory, sink, dns_server, raw):
        cv, results, reason = dkimpy.arc_verify(item.data, dnsfunc=dnsfunc)
        assert cv == dkimpy.CV_Pass, reason
        assert [r["instance"] for r in results] == [1]
        msg = item.message()
        aar = " ".join(str(msg["ARC-Authentication-Results"]).split())
        assert aar.startswith("i=1; lists.example.org;")
        assert "dkim=pass header.d=example.net" in aar
        assert "d=lists.example.org" in str(msg["ARC-Seal"])
        # the list's own signature still verifies; the author's is gone (we changed it)
        assert dkimpy.verify(item.data, dnsfunc=dnsfunc)
        assert "[staff] Minutes" == msg["Subject"]


async def test_an_unsigned_post_is_not_sealed(
    db: Database, sink: Sink, daemon_factory: Any, dns_server: DnsServer
) -> None:
    make_list(db, LIST, policy=PostingPolicy.OPEN, members_=MEMBERS)
    for item in await deliver(daemon_factory, sink, dns_server, post_text()):
        assert item.message()["ARC-Seal"] is None
        assert dkimpy.verify(item.data, dnsfunc=dnsfunc_for(dns_server))


async def test_an_existing_chain_is_continued(
    db: Database,
    sink: Sink,
    daemon_factory: Any,
    dns_server: DnsServer,
    keys: dict[str, dkim.SigningKey],
) -> None:
    make_list(db, LIST, policy=PostingPolicy.OPEN, members_=MEMBERS)
    signed = dkim.Signer(keys["author"]).sign(post_text())
    upstream = keys["upstream"]
    with_results = (
        b"Authentication-Results: mx.example.com; dkim=pass header.d=example.net\r\n" + signed
    )
    arc_set = dkimpy.arc_sign(
        with_results,
        upstream.selector.encode(),
        upstream.domain.encode(),
        upstream.private_pem,
        b"mx.example.com",
    )
    raw = b"".join(arc_set) + with_results
    dnsfunc = dnsfunc_for(dns_server)
    for item in await deliver(daemon_factory, sink, dns_server, raw):
        cv, results, reason = dkimpy.arc_verify(item.data, dnsfunc=dnsfunc)
        assert cv == dkimpy.CV_Pass, reason
        assert sorted(r["instance"] for r in results) == [1, 2]
        aar = [str(v) for k, v in item.message().raw_items() if k == "ARC-Authentication-Results"]
        assert any("i=2; lists.example.org" in " ".join(v.split()) and "arc=pass" in v for v in aar)


def test_seal_leaves_a_message_without_our_results_unchanged(
    keys: dict[str, dkim.SigningKey],
) -> None:
    raw = dkim.Signer(keys["author"]).sign(post_text())
    assert arc.seal(raw, dkim.Signer(keys["list"]), "lists.example.org") == raw
    assert arc.wanted(mail.parse(raw))
    assert not arc.wanted(mail.parse(post_text()))
    assert arc.sealer(None, "lists.example.org") is None
