"""DMARC mitigation: policies looked up on a real DNS server on loopback, posts sent
through the running daemon to the recording sink, DKIM verified there with dkimpy."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from email.headerregistry import Address
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim as dkimpy
import pytest
import sqlalchemy as sa
from conftest import make_list, message
from dnsserver import DnsServer
from sink import Sink

from listserv import config, lists, mail
from listserv.config import DnsSettings
from listserv.db import Database
from listserv.distribute import dkim, dmarc
from listserv.dns import Resolver
from listserv.errors import ConfigError, InvalidInput
from listserv.models import (
    DmarcMitigateWhen,
    DmarcMitigation,
    OriginalFromIn,
    Post,
    PostingPolicy,
)

MEMBERS = ["ann@one.example", "bob@two.example"]
LIST = "staff@lists.example.org"


def post_text(sender: str = "Jane Doe <jane@reject.example>", subject: str = "Budget") -> bytes:
    return message(
        f"""
        From: {sender}
        To: {LIST}
        Subject: {subject}
        Message-ID: <m1@reject.example>
        Date: Mon, 23 Nov 2026 10:00:00 +0000
        MIME-Version: 1.0
        Content-Type: text/plain; charset=utf-8

        The budget is approved.
        """
    )


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    dmarc.policies_for.cache_clear()  # daemons' caches must not outlive this server's port
    with DnsServer() as server:
        server.txt["_dmarc.reject.example"] = ["v=DMARC1; p=reject; rua=mailto:d@reject.example"]
        server.txt["_dmarc.quarantine.example"] = ["v=DMARC1; p=quarantine"]
        server.txt["_dmarc.none.example"] = ["v=DMARC1; p=none"]
        # an organizational domain whose subdomains get sp=
        server.txt["_dmarc.org.example"] = ["v=DMARC1; p=none; sp=reject"]
        yield server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policies(server: DnsServer, clock: Clock | None = None, size: int = 100) -> dmarc.Policies:
    resolver = Resolver(DnsSettings(nameservers=(server.address,), timeout=1.0, cache_size=0))
    return dmarc.Policies(resolver, size=size, clock=clock or Clock())


# -- policy look-ups -----------------------------------------------------------------


def test_policy_of_the_from_domain_is_read_from_its_record(dns_server: DnsServer) -> None:
    found = policies(dns_server).lookup("reject.example")
    assert found == dmarc.Policy("reject.example", "reject", "r", "r")
    assert policies(dns_server).lookup("none.example") == dmarc.Policy(
        "none.example", "none", "r", "r"
    )


def test_absent_record_falls_back_to_the_organizational_domain_and_its_sp(
    dns_server: DnsServer,
) -> None:
    p = policies(dns_server)
    found = p.lookup("mail.dept.org.example")
    assert found is not None and (found.record_domain, found.policy) == ("org.example", "reject")
    assert dns_server.count("_dmarc.mail.dept.org.example") == 1
    assert dns_server.count("_dmarc.org.example") == 1
    # the organizational domain itself gets p=, not sp=
    assert p.lookup("org.example") == dmarc.Policy("org.example", "none", "r", "r")
    # a subdomain of a domain with no record anywhere: no policy
    assert p.lookup("www.nothing.example") is None


def test_two_records_or_a_record_without_v_dmarc1_are_no_policy(dns_server: DnsServer) -> None:
    dns_server.txt["_dmarc.twice.example"] = ["v=DMARC1; p=reject", "v=DMARC1; p=none"]
    dns_server.txt["_dmarc.junk.example"] = ["p=reject; v=DMARC1", "v=spf1 -all"]
    dns_server.txt["_dmarc.badp.example"] = ["v=DMARC1; p=block"]
    p = policies(dns_server)
    assert p.lookup("twice.example") is None
    assert p.lookup("junk.example") is None
    assert p.lookup("badp.example") is None


def test_answers_are_cached_for_their_ttl(dns_server: DnsServer) -> None:
    clock = Clock()
    p = policies(dns_server, clock)
    assert p.lookup("reject.example") is not None
    assert p.lookup("reject.example") is not None
    assert dns_server.count("_dmarc.reject.example") == 1
    clock.now += dns_server.ttl + 1  # the TTL (300 s) has run out
    dns_server.txt["_dmarc.reject.example"] = ["v=DMARC1; p=none"]
    found = p.lookup("reject.example")
    assert found is not None and found.policy == "none"
    assert dns_server.count("_dmarc.reject.example") == 2


def test_the_cache_is_bounded(dns_server: DnsServer) -> None:
    p = policies(dns_server, size=2)
    for domain in ("reject.example", "none.example", "quarantine.example", "reject.example"):
        p.lookup(domain)
    # reject.example was pushed out by the third name, so it was asked again
    assert dns_server.count("_dmarc.reject.example") == 2


def test_dns_failure_is_no_policy_and_logged(
    dns_server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    dns_server.mode = "servfail"
    clock = Clock()
    p = policies(dns_server, clock)
    with caplog.at_level(logging.WARNING, logger="listserv.dmarc"):
        assert p.lookup("reject.example") is None
    assert "_dmarc.reject.example: DNS failed, taken as no policy" in caplog.text
    asked = dns_server.count("_dmarc.reject.example")
    p.lookup("reject.example")  # within a minute: not asked again
    assert dns_server.count("_dmarc.reject.example") == asked
    dns_server.mode = "answer"
    clock.now += dmarc.ERROR_TTL + 1
    found = p.lookup("reject.example")
    assert found is not None and found.policy == "reject"


# -- the decision --------------------------------------------------------------------


def decide(server: DnsServer, *domains: str, **kwargs: Any) -> dmarc.Decision:
    values: dict[str, Any] = {
        "list_domain": "lists.example.org",
        "mitigation": DmarcMitigation.MUNGE_FROM,
        "when": DmarcMitigateWhen.REJECT_QUARANTINE,
        "own_domains": (),
        "policies": policies(server),
        "signed": True,
    }
    values.update(kwargs)
    return dmarc.decide(list(domains), **values)


def test_reject_and_quarantine_are_mitigated_none_is_not(dns_server: DnsServer) -> None:
    decision = decide(dns_server, "reject.example")
    assert decision.action is DmarcMitigation.MUNGE_FROM
    assert "reject.example publishes p=reject" in decision.reason
    assert decide(dns_server, "quarantine.example").action is DmarcMitigation.MUNGE_FROM
    assert decide(dns_server, "none.example").action is DmarcMitigation.NONE
    assert decide(dns_server, "nothing.example").action is DmarcMitigation.NONE
    wrap = decide(dns_server, "reject.example", mitigation=DmarcMitigation.WRAP_MESSAGE)
    assert wrap.action is DmarcMitigation.WRAP_MESSAGE
    off = decide(dns_server, "reject.example", mitigation=DmarcMitigation.NONE)
    assert off.action is DmarcMitigation.NONE


def test_always_mitigates_without_asking_dns(dns_server: DnsServer) -> None:
    decision = decide(dns_server, "none.example", when=DmarcMitigateWhen.ALWAYS)
    assert decision.action is DmarcMitigation.MUNGE_FROM
    assert dns_server.queries == []


def test_own_domains_aligned_with_the_list_are_never_munged_nor_looked_up(
    dns_server: DnsServer,
) -> None:
    dns_server.txt["_dmarc.example.org"] = ["v=DMARC1; p=reject; adkim=s"]
    own = ("example.org",)
    for when in DmarcMitigateWhen:
        decision = decide(dns_server, "example.org", own_domains=own, when=when)
        assert decision.action is DmarcMitigation.NONE
    assert dns_server.queries == []
    # not our domain: strict alignment makes our lists.example.org signature useless
    assert decide(dns_server, "example.org").action is DmarcMitigation.MUNGE_FROM
    # our domain but the list does not sign: its posts would fail DMARC
    unsigned = decide(dns_server, "example.org", own_domains=own, signed=False)
    assert unsigned.action is DmarcMitigation.MUNGE_FROM


def test_a_domain_our_signature_aligns_with_needs_nothing(dns_server: DnsServer) -> None:
    dns_server.txt["_dmarc.example.org"] = ["v=DMARC1; p=reject"]
    assert decide(dns_server, "example.org").action is DmarcMitigation.NONE
    assert decide(dns_server, "example.org", signed=False).action is DmarcMitigation.MUNGE_FROM


# -- rewriting -----------------------------------------------------------------------


def munged(raw: bytes, where: OriginalFromIn = OriginalFromIn.REPLY_TO) -> Any:
    msg = mail.parse(raw)
    dmarc.munge_from(msg, list_name="staff", list_address=LIST, original_from_in=where)
    return mail.parse(mail.to_bytes(msg))


def test_munged_from_names_the_author_via_the_list_and_keeps_the_author_for_replies() -> None:
    msg = munged(post_text())
    assert msg["From"].addresses == (Address("Jane Doe via staff", addr_spec=LIST),)
    assert msg["Reply-To"].addresses == (Address("Jane Doe", addr_spec="jane@reject.example"),)
    assert msg["Cc"] is None


def test_munged_from_puts_the_author_in_cc_when_the_list_says_so() -> None:
    raw = post_text().replace(b"Subject:", b"Cc: carl@one.example\r\nSubject:")
    msg = munged(raw, OriginalFromIn.CC)
    assert [a.addr_spec for a in msg["Cc"].addresses] == ["carl@one.example", "jane@reject.example"]
    assert msg["Reply-To"] is None


def test_the_author_s_own_reply_to_is_kept() -> None:
    raw = post_text().replace(b"Subject:", b"Reply-To: team@reject.example\r\nSubject:")
    msg = munged(raw)
    assert [a.addr_spec for a in msg["Reply-To"].addresses] == ["team@reject.example"]


def test_a_non_ascii_display_name_is_encoded_not_raw_utf8() -> None:
    raw = post_text(sender="=?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <jm@reject.example>")
    msg = mail.parse(raw)
    dmarc.munge_from(
        msg, list_name="staff", list_address=LIST, original_from_in=OriginalFromIn.REPLY_TO
    )
    data = mail.to_bytes(msg)
    assert data.isascii()  # no SMTPUTF8 needed for it
    assert b"=?utf-8?" in data
    parsed = mail.parse(data)
    assert str(parsed["From"]) == f"Jürgen Müller via staff <{LIST}>"


def test_an_address_without_a_display_name_is_named_by_its_address() -> None:
    msg = munged(post_text(sender="jane@reject.example"))
    assert msg["From"].addresses[0].display_name == "jane at reject.example via staff"


# -- through the daemon --------------------------------------------------------------


async def send(port: int, data: bytes, sender: str = "jane@reject.example") -> Any:
    return await aiosmtplib.send(
        data, sender=sender, recipients=[LIST], hostname="127.0.0.1", port=port, timeout=10
    )


def dkim_dnsfunc(key: dkim.SigningKey) -> Any:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        if name.decode().rstrip(".") == key.dns_name():
            return key.public_txt().encode()
        return None

    return dnsfunc


async def run_post(
    db: Database,
    sink: Sink,
    daemon_factory: Any,
    dns_server: DnsServer,
    tmp_path: Path,
    raw: bytes,
    sender: str = "jane@reject.example",
    **list_settings: str,
) -> tuple[dkim.SigningKey, list[Any]]:
    key = dkim.generate_key(tmp_path / "dkim", "lists.example.org", "s1", bits=1024)
    make_list(db, LIST, policy=PostingPolicy.OPEN, members_=MEMBERS, **list_settings)
    daemon = await daemon_factory(dns__nameservers=[dns_server.address])
    await send(daemon.port, raw, sender=sender)
    await sink.wait_for_recipients(len(MEMBERS))
    return key, sink.received


async def test_post_from_a_p_reject_domain_is_munged_and_verifies_at_the_sink(
    db: Database, sink: Sink, daemon_factory: Any, dns_server: DnsServer, tmp_path: Path
) -> None:
    key, received = await run_post(db, sink, daemon_factory, dns_server, tmp_path, post_text())
    for item in received:
        msg = item.message()
        assert msg["From"].addresses == (Address("Jane Doe via staff", addr_spec=LIST),)
        assert [a.addr_spec for a in msg["Reply-To"].addresses] == ["jane@reject.example"]
        assert msg["Subject"] == "[staff] Budget"
        assert "The budget is approved." in item.data.decode()
        assert dkimpy.verify(item.data, dnsfunc=dkim_dnsfunc(key))
        assert "d=lists.example.org" in " ".join(str(msg["DKIM-Signature"]).split())
    # decided once, when prepared, and kept with the post
    with db.reading() as s:
        post = s.scalars(sa.select(Post)).one()
        assert post.render is not None and post.render["dmarc_action"] == "munge_from"
        assert post.prepared is not None and b"Jane Doe via staff" in post.prepared


async def test_wrapped_post_carries_the_original_and_verifies_at_the_sink(
    db: Database, sink: Sink, daemon_factory: Any, dns_server: DnsServer, tmp_path: Path
) -> None:
    key, received = await run_post(
        db,
        sink,
        daemon_factory,
        dns_server,
        tmp_path,
        post_text(),
        dmarc_mitigation="wrap_message",
    )
    for item in received:
        msg = item.message()
        assert msg["From"].addresses == (Address("Jane Doe via staff", addr_spec=LIST),)
        assert msg.get_content_type() == "multipart/mixed"
        inner_parts = [p for p in msg.iter_parts() if p.get_content_type() == "message/rfc822"]
        assert len(inner_parts) == 1
        inner = inner_parts[0].get_content()
        assert inner["From"].addresses[0].addr_spec == "jane@reject.example"
        assert inner["Message-ID"] == "<m1@reject.example>"
        assert "The budget is approved." in inner.get_content()
        assert msg["Message-ID"] == "<m1@reject.example>"
        assert dkimpy.verify(item.data, dnsfunc=dkim_dnsfunc(key))


async def test_p_none_post_is_left_alone(
    db: Database, sink: Sink, daemon_factory: Any, dns_server: DnsServer, tmp_path: Path
) -> None:
    raw = post_text(sender="Ned <ned@none.example>")
    key, received = await run_post(
        db, sink, daemon_factory, dns_server, tmp_path, raw, sender="ned@none.example"
    )
    for item in received:
        msg = item.message()
        assert msg["From"].addresses == (Address("Ned", addr_spec="ned@none.example"),)
        assert msg["Reply-To"] is None
        assert dkimpy.verify(item.data, dnsfunc=dkim_dnsfunc(key))
    assert dns_server.count("_dmarc.none.example") == 1


async def test_organizational_domain_policy_applies_to_a_subdomain_sender(
    db: Database, sink: Sink, daemon_factory: Any, dns_server: DnsServer, tmp_path: Path
) -> None:
    raw = post_text(sender="Sue <sue@mail.org.example>")
    _, received = await run_post(
        db, sink, daemon_factory, dns_server, tmp_path, raw, sender="sue@mail.org.example"
    )
    for item in received:
        assert item.message()["From"].addresses[0].addr_spec == LIST


async def test_dns_failure_sends_the_post_as_it_is_and_logs(
    db: Database,
    sink: Sink,
    daemon_factory: Any,
    dns_server: DnsServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns_server.mode = "servfail"
    caplog.set_level(logging.WARNING, logger="listserv.dmarc")
    raw = post_text(sender="Jane Doe <jane@reject.example>")
    _, received = await run_post(db, sink, daemon_factory, dns_server, tmp_path, raw)
    for item in received:
        assert item.message()["From"].addresses[0].addr_spec == "jane@reject.example"
    assert "_dmarc.reject.example: DNS failed, taken as no policy" in caplog.text


async def test_own_domain_is_not_munged(
    db: Database, sink: Sink, daemon_factory: Any, dns_server: DnsServer, tmp_path: Path
) -> None:
    dns_server.txt["_dmarc.example.org"] = ["v=DMARC1; p=reject; adkim=s"]
    key = dkim.generate_key(tmp_path / "dkim", "lists.example.org", "s1", bits=1024)
    make_list(db, LIST, policy=PostingPolicy.OPEN, members_=MEMBERS)
    daemon = await daemon_factory(
        dns__nameservers=[dns_server.address], dmarc__own_domains=["example.org"]
    )
    await send(daemon.port, post_text(sender="Boss <boss@example.org>"), sender="boss@example.org")
    await sink.wait_for_recipients(len(MEMBERS))
    for item in sink.received:
        assert item.message()["From"].addresses[0].addr_spec == "boss@example.org"
        assert dkimpy.verify(item.data, dnsfunc=dkim_dnsfunc(key))
    # (adkim=s: without own_domains it would be munged, test_own_domains_aligned_...)


async def test_personalized_copies_are_munged_and_each_verifies(
    db: Database, sink: Sink, daemon_factory: Any, dns_server: DnsServer, tmp_path: Path
) -> None:
    key, received = await run_post(
        db,
        sink,
        daemon_factory,
        dns_server,
        tmp_path,
        post_text(),
        delivery_mode="personalized",
    )
    assert len(received) == len(MEMBERS)
    for item in received:
        msg = item.message()
        assert msg["From"].addresses[0].addr_spec == LIST
        assert f"You are subscribed as {item.rcpt_tos[0]}" in item.data.decode()
        assert dkimpy.verify(item.data, dnsfunc=dkim_dnsfunc(key))


def test_list_settings_are_set_and_checked(db: Database) -> None:
    make_list(db, LIST)
    with db.session() as s:
        mlist = lists.get(s, LIST)
        assert mlist.dmarc_mitigation is DmarcMitigation.MUNGE_FROM
        assert mlist.dmarc_mitigate_only_when is DmarcMitigateWhen.REJECT_QUARANTINE
        assert mlist.dmarc_original_from_in is OriginalFromIn.REPLY_TO
        lists.set_setting(s, mlist, "dmarc_mitigation", "wrap_message")
        lists.set_setting(s, mlist, "dmarc_mitigate_only_when", "always")
        lists.set_setting(s, mlist, "dmarc_original_from_in", "cc")
        with pytest.raises(InvalidInput, match="munge_from, wrap_message, none"):
            lists.set_setting(s, mlist, "dmarc_mitigation", "rewrite")
    with db.reading() as s:
        mlist = lists.get(s, LIST)
        assert mlist.dmarc_mitigation is DmarcMitigation.WRAP_MESSAGE
        assert mlist.dmarc_mitigate_only_when is DmarcMitigateWhen.ALWAYS
        assert mlist.dmarc_original_from_in is OriginalFromIn.CC


def test_dmarc_config_is_checked() -> None:
    s = config.from_dict({"dmarc": {"own_domains": ["example.edu"]}})
    assert s.dmarc.own_domains == ("example.edu",)
    with pytest.raises(ConfigError, match=r"\[dmarc\] own_domains"):
        config.from_dict({"dmarc": {"own_domains": ["jane@example.edu"]}})
