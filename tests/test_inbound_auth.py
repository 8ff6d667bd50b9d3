"""Our Authentication-Results on incoming posts: real DKIM signatures, SPF records and
DMARC policies served by a DNS server on loopback, posts stored in a real database
by intake.receive (with the client IP an SMTP session would give) and through the
running daemon."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim as dkimpy
import pytest
import sqlalchemy as sa
from conftest import make_list, message
from dnsserver import DnsServer
from sink import Sink

from listserv import config, mail
from listserv.config import AuthSettings, DnsSettings
from listserv.db import Database
from listserv.distribute import dkim, dmarc
from listserv.dns import Resolver
from listserv.errors import ConfigError
from listserv.models import InboundMessage, Post, PostingPolicy, PostState
from listserv.pipeline import authresults, spf
from listserv.pipeline.auth import Authenticator
from listserv.smtp_in import intake

LIST = "staff@lists.example.org"
OURS = "lists.example.org"
CLIENT = "192.0.2.10"  # example.org's SPF lets this address send
STRANGER = "198.51.100.7"


def post_text(sender: str = "Jane <jane@example.org>", extra: str = "") -> bytes:
    return extra.replace("\n", "\r\n").encode() + message(
        f"""
        From: {sender}
        To: {LIST}
        Subject: Minutes
        Message-ID: <minutes@example.org>
        Date: Mon, 23 Nov 2026 10:00:00 +0000

        The minutes are attached.
        """
    )


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> dkim.SigningKey:
    return dkim.generate_key(tmp_path_factory.mktemp("keys"), "example.org", "s1", bits=1024)


def signed(raw: bytes, key: dkim.SigningKey) -> bytes:
    return dkim.Signer(key).sign(raw)


@pytest.fixture
def dns_server(key: dkim.SigningKey) -> Iterator[DnsServer]:
    dmarc.policies_for.cache_clear()  # daemons' caches must not outlive this server's port
    with DnsServer() as server:
        server.txt[key.dns_name()] = [key.public_txt()]
        server.txt["example.org"] = [f"v=spf1 ip4:{CLIENT} -all"]
        server.txt["_dmarc.example.org"] = ["v=DMARC1; p=reject"]
        server.txt["softfail.example"] = ["v=spf1 ~all"]
        yield server


def authenticator(server: DnsServer, **auth: Any) -> Authenticator:
    resolver = Resolver(DnsSettings(nameservers=(server.address,), timeout=2.0))
    return Authenticator(AuthSettings(**auth), resolver, authserv_id=OURS)


def receive(
    db: Database,
    server: DnsServer,
    raw: bytes,
    *,
    peer: str = f"{CLIENT}:40000",
    mail_from: str = "jane@example.org",
    **auth: Any,
) -> tuple[intake.Outcome, bytes]:
    outcome = intake.receive(
        db,
        intake.Envelope(mail_from=mail_from, rcpt_tos=(LIST,), content=raw, peer=peer),
        authenticator=authenticator(server, **auth),
    )
    assert outcome.reply.code == 250, outcome.reply
    with db.reading() as s:
        stored = s.get(InboundMessage, outcome.inbound_ids[0])
        assert stored is not None
        return outcome, stored.raw


def ours(raw: bytes) -> list[str]:
    """Our Authentication-Results values in a message, unfolded."""
    values = [
        " ".join(str(v).split())
        for k, v in mail.parse(raw).raw_items()
        if k.lower() == "authentication-results"
    ]
    return [v for v in values if v.split(";")[0].strip().lower() == OURS]


# -- forged headers ------------------------------------------------------------------


def test_headers_claiming_our_authserv_id_are_removed_and_nothing_else_changes() -> None:
    forged = (
        "Authentication-Results: LISTS.example.org; dkim=pass header.d=bank.example\n"
        "Authentication-Results: (comment) lists.example.org;\n\tdmarc=pass header.from=x\n"
        "Authentication-Results: mx.example.net; spf=pass smtp.mailfrom=example.net\n"
        "X-Other:  kept  as it was\n"
    )
    raw = post_text(extra=forged)
    stripped = authresults.strip_forged(raw, OURS)
    assert b"bank.example" not in stripped and b"header.from=x" not in stripped
    assert b"Authentication-Results: mx.example.net; spf=pass" in stripped
    assert stripped == raw.replace(
        b"Authentication-Results: LISTS.example.org; dkim=pass header.d=bank.example\r\n", b""
    ).replace(
        b"Authentication-Results: (comment) lists.example.org;\r\n\tdmarc=pass header.from=x\r\n",
        b"",
    )
    # a message that is all header (no blank line) loses the forgery too
    head_only = b"From: jane@example.org\r\nAuthentication-Results: lists.example.org; x\r\n"
    assert authresults.strip_forged(head_only, OURS) == b"From: jane@example.org\r\n"
    # a body line that looks like one is not a header
    body_only = post_text() + b"Authentication-Results: lists.example.org; none\r\n"
    assert authresults.strip_forged(body_only, OURS) == body_only


def test_forged_results_are_replaced_by_ours_before_the_rules(
    db: Database, dns_server: DnsServer
) -> None:
    make_list(db, LIST, policy=PostingPolicy.OPEN)
    forged = "Authentication-Results: lists.example.org; dkim=pass header.d=example.org\n"
    _, stored = receive(db, dns_server, post_text(extra=forged), peer=f"{STRANGER}:1")
    [value] = ours(stored)
    assert "dkim=none" in value and "dkim=pass" not in value
    assert stored.startswith(b"Authentication-Results: lists.example.org;")
    assert stored.endswith(post_text())


# -- DKIM, SPF, DMARC ----------------------------------------------------------------


def test_signed_post_from_an_spf_listed_client_passes_everything(
    db: Database, dns_server: DnsServer, key: dkim.SigningKey
) -> None:
    make_list(db, LIST, policy=PostingPolicy.OPEN)
    _, stored = receive(db, dns_server, signed(post_text(), key))
    [value] = ours(stored)
    assert value == (
        "lists.example.org; dkim=pass header.d=example.org header.s=s1;"
        " spf=pass smtp.mailfrom=example.org;"
        " dmarc=pass (p=reject) header.from=example.org"
    )
    # the stored message still verifies (our header went on top, nothing else changed)
    resolver = Resolver(DnsSettings(nameservers=(dns_server.address,)))
    assert dkimpy.verify(stored, dnsfunc=lambda n, timeout=5: resolver.txt(n.decode())[0])


def test_spf_fails_for_a_client_the_record_does_not_list(
    db: Database, dns_server: DnsServer
) -> None:
    make_list(db, LIST, policy=PostingPolicy.OPEN)
    _, stored = receive(db, dns_server, post_text(), peer=f"{STRANGER}:25")
    [value] = ours(stored)
    assert "spf=fail smtp.mailfrom=example.org" in value
    assert "dmarc=fail (p=reject) header.from=example.org" in value


def test_spf_alone_passes_dmarc_when_aligned(db: Database, dns_server: DnsServer) -> None:
    make_list(db, LIST, policy=PostingPolicy.OPEN)
    _, stored = receive(db, dns_server, post_text())
    [value] = ours(stored)
    assert "dkim=none; spf=pass smtp.mailfrom=example.org; dmarc=pass" in value


def test_spf_for_the_null_sender_checks_the_helo_name(dns_server: DnsServer) -> None:
    resolver = Resolver(DnsSettings(nameservers=(dns_server.address,)))
    result = spf.check(STRANGER, "", "softfail.example", resolver, timeout=2.0)
    assert (result.result, result.identity, result.domain) == (
        "softfail",
        "helo",
        "softfail.example",
    )
    ipv6 = spf.check("2001:db8::1", "jane@example.org", "mx.example.org", resolver, timeout=2.0)
    assert ipv6.result == "fail"


def test_spf_dns_failure_is_temperror(dns_server: DnsServer) -> None:
    dns_server.mode = "servfail"
    resolver = Resolver(DnsSettings(nameservers=(dns_server.address,), timeout=1.0))
    result = spf.check(CLIENT, "jane@example.org", "mx.example.org", resolver, timeout=1.0)
    assert result.result == "temperror"


def test_loopback_clients_are_not_spf_checked(db: Database, dns_server: DnsServer) -> None:
    make_list(db, LIST, policy=PostingPolicy.OPEN)
    _, stored = receive(db, dns_server, post_text(), peer="127.0.0.1:5000")
    [value] = ours(stored)
    assert "spf=" not in value
    assert "dmarc=fail" in value
    assert dns_server.count("example.org") == 0  # the SPF record was never asked for
    assert spf.client_ip("::1:5000") == "::1" and spf.is_local("::1")
    assert spf.client_ip("192.0.2.1:25") == "192.0.2.1"
    assert spf.client_ip("garbage") is None


def test_our_dmarc_pass_authenticates_for_require_authenticated_sender(
    db: Database, dns_server: DnsServer
) -> None:
    """The rules see the result: an SPF-aligned pass (no DKIM) authenticates the sender."""
    make_list(
        db,
        LIST,
        policy=PostingPolicy.ANNOUNCE,
        senders=["jane@example.org"],
        require_authenticated_sender="true",
    )
    outcome, _ = receive(db, dns_server, post_text())
    assert outcome.posts == {LIST: PostState.ACCEPTED}
    outcome, _ = receive(db, dns_server, post_text(), peer=f"{STRANGER}:1")
    assert outcome.posts == {LIST: PostState.HELD}
    with db.reading() as s:
        reasons = s.scalars(sa.select(Post.reason).order_by(Post.id)).all()
    assert reasons[-1].startswith("sender not authenticated")


def test_results_can_be_turned_off(db: Database, dns_server: DnsServer) -> None:
    make_list(db, LIST, policy=PostingPolicy.OPEN)
    _, stored = receive(db, dns_server, post_text(), inbound_results=False)
    assert stored == post_text()
    assert dns_server.queries == []


def test_a_dmarc_dns_failure_is_logged_and_the_post_still_accepted(
    db: Database, dns_server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    make_list(db, LIST, policy=PostingPolicy.OPEN)
    dns_server.mode = "servfail"
    with caplog.at_level(logging.INFO):
        outcome, stored = receive(db, dns_server, post_text(sender="x@elsewhere.example"))
    assert outcome.posts == {LIST: PostState.ACCEPTED}
    [value] = ours(stored)
    assert "spf=temperror" in value
    assert "dmarc=none header.from=elsewhere.example" in value
    assert "DNS failed, taken as no policy" in caplog.text


# -- through the daemon --------------------------------------------------------------


async def test_daemon_replaces_forged_results_and_members_see_ours(
    db: Database, sink: Sink, daemon_factory: Any, dns_server: DnsServer, tmp_path: Path
) -> None:
    make_list(db, LIST, policy=PostingPolicy.OPEN, members_=["ann@one.example"])
    daemon = await daemon_factory(dns__nameservers=[dns_server.address])
    forged = "Authentication-Results: lists.example.org; dmarc=pass header.from=example.org\n"
    await aiosmtplib.send(
        post_text(extra=forged),
        sender="jane@example.org",
        recipients=[LIST],
        hostname="127.0.0.1",
        port=daemon.port,
        timeout=10,
    )
    await sink.wait_for_recipients(1)
    [value] = ours(sink.received[0].data)
    assert value.startswith("lists.example.org; dkim=none;")
    assert "dmarc=fail (p=reject) header.from=example.org" in value  # loopback: no SPF


def test_authserv_id_defaults_to_the_host_name_and_is_checked() -> None:
    settings = config.from_dict({"server": {"hostname": "mx.lists.example.org"}})
    assert Authenticator.from_settings(settings).authserv_id == "mx.lists.example.org"
    named = config.from_dict({"auth": {"authserv_id": "auth.example.org"}})
    assert Authenticator.from_settings(named).authserv_id == "auth.example.org"
    with pytest.raises(ConfigError, match=r"\[auth\] authserv_id"):
        config.from_dict({"auth": {"authserv_id": "two words"}})
