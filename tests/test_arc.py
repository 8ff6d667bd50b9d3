"""ARC sealing of posts the list changed: signed posts sent through the running daemon,
the sealed copies verified at the sink by dkimpy's arc_verify, with every key served
by a DNS server on loopback."""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim as dkimpy
import pytest
import sqlalchemy as sa
from conftest import make_list, message
from cryptography.hazmat.primitives import hashes as hashes_
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dnsserver import DnsServer
from sink import Sink

from listserv import mail
from listserv.config import DnsSettings
from listserv.db import Database
from listserv.distribute import arc, dkim, dmarc, prepare
from listserv.dns import Resolver
from listserv.models import Audience, DeliveryMode, Post, PostingPolicy

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


async def deliver(
    daemon_factory: Any, sink: Sink, server: DnsServer, raw: bytes, **overrides: Any
) -> list[Any]:
    daemon = await daemon_factory(dns__nameservers=[server.address], **overrides)
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


# -- personalized copies: each sealed on its own, by our sealer ---------------------

BASE = "https://lists.example.org"
#: (make_list settings, daemon overrides): a list that delivers personalized, and a
#: shared list that one-click unsubscribe makes personalized (each copy's own link)
PERSONAL_SETUPS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "personalized": ({"delivery_mode": "personalized"}, {}),
    "one_click": ({}, {"http__public_base_url": BASE}),
}


def upstream_chain(keys: dict[str, dkim.SigningKey]) -> bytes:
    """The author's signed post as an upstream forwarder sealed it (i=1, cv=none)."""
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
    return b"".join(arc_set) + with_results


def arc_fields(item: Any) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in item.message().raw_items():
        if name.lower().startswith("arc-"):
            found.setdefault(name.lower(), []).append(" ".join(str(value).split()))
    return found


def recorded_render(db: Database) -> dict[str, Any]:
    with db.reading() as s:
        render = s.scalar(sa.select(Post.render).order_by(Post.id.desc()).limit(1))
    assert isinstance(render, dict)
    return render


@pytest.mark.parametrize("setup", sorted(PERSONAL_SETUPS))
async def test_each_personalized_copy_is_sealed_and_verifies(
    setup: str,
    db: Database,
    sink: Sink,
    daemon_factory: Any,
    dns_server: DnsServer,
    keys: dict[str, dkim.SigningKey],
) -> None:
    list_settings, overrides = PERSONAL_SETUPS[setup]
    make_list(db, LIST, policy=PostingPolicy.OPEN, members_=MEMBERS, **list_settings)
    raw = dkim.Signer(keys["author"]).sign(post_text())
    dnsfunc = dnsfunc_for(dns_server)
    received = await deliver(daemon_factory, sink, dns_server, raw, **overrides)
    assert sorted(r for item in received for r in item.rcpt_tos) == sorted(MEMBERS)
    unsubscribe_links = set()
    for item in received:
        (rcpt,) = item.rcpt_tos
        assert f"You are subscribed as {rcpt}".encode() in item.data  # its own copy
        sets = arc_fields(item)
        assert {name: len(v) for name, v in sets.items()} == {
            "arc-seal": 1,
            "arc-message-signature": 1,
            "arc-authentication-results": 1,
        }
        cv, results, reason = dkimpy.arc_verify(item.data, dnsfunc=dnsfunc)
        assert cv == dkimpy.CV_Pass, reason
        assert [(r["instance"], r["cv"]) for r in results] == [(1, b"none")]
        assert results[0]["ams-valid"] and results[0]["as-valid"]
        assert sets["arc-authentication-results"][0].startswith("i=1; lists.example.org;")
        assert "dkim=pass header.d=example.net" in sets["arc-authentication-results"][0]
        assert "d=lists.example.org" in sets["arc-seal"][0]
        assert dkimpy.verify(item.data, dnsfunc=dnsfunc)  # the list's DKIM signature
        unsubscribe_links.add(item.message()["List-Unsubscribe"])
    if setup == "one_click":  # each copy's header differs, and each seal covers its own
        assert len(unsubscribe_links) == len(MEMBERS)
    assert recorded_render(db)["arc_authserv_id"] == "lists.example.org"


async def test_a_personalized_copy_continues_an_existing_chain(
    db: Database,
    sink: Sink,
    daemon_factory: Any,
    dns_server: DnsServer,
    keys: dict[str, dkim.SigningKey],
) -> None:
    make_list(db, LIST, policy=PostingPolicy.OPEN, members_=MEMBERS, delivery_mode="personalized")
    dnsfunc = dnsfunc_for(dns_server)
    received = await deliver(daemon_factory, sink, dns_server, upstream_chain(keys))
    assert len(received) == len(MEMBERS)
    for item in received:
        cv, results, reason = dkimpy.arc_verify(item.data, dnsfunc=dnsfunc)
        assert cv == dkimpy.CV_Pass, reason
        assert sorted((r["instance"], r["cv"]) for r in results) == [(1, b"none"), (2, b"pass")]
        sets = arc_fields(item)
        assert len(sets["arc-seal"]) == 2
        ours = [v for v in sets["arc-authentication-results"] if v.startswith("i=2;")]
        assert len(ours) == 1 and "lists.example.org" in ours[0] and "arc=pass" in ours[0]
        assert dkimpy.verify(item.data, dnsfunc=dnsfunc)


@pytest.mark.parametrize("setup", sorted(PERSONAL_SETUPS))
async def test_an_unsigned_personalized_post_is_not_sealed(
    setup: str, db: Database, sink: Sink, daemon_factory: Any, dns_server: DnsServer
) -> None:
    list_settings, overrides = PERSONAL_SETUPS[setup]
    make_list(db, LIST, policy=PostingPolicy.OPEN, members_=MEMBERS, **list_settings)
    received = await deliver(daemon_factory, sink, dns_server, post_text(), **overrides)
    assert len(received) == len(MEMBERS)
    for item in received:
        assert arc_fields(item) == {}
        assert dkimpy.verify(item.data, dnsfunc=dnsfunc_for(dns_server))
    assert recorded_render(db)["arc_authserv_id"] == ""


# -- the sealer itself ---------------------------------------------------------------

T = 1795000000


def with_our_results(raw: bytes, extra: str = "") -> bytes:
    return (
        b"Authentication-Results: lists.example.org;\r\n\tdkim=pass header.d=example.net"
        + extra.encode()
        + b"\r\n"
        + raw
    )


def template_view(**changes: Any) -> prepare.ListView:
    view = prepare.ListView(
        name="staff",
        domain="lists.example.org",
        list_id="<staff.lists.example.org>",
        description="Staff",
        subject_prefix="[staff]",
        footer="",
        delivery_mode=DeliveryMode.PERSONALIZED,
    )
    return dataclasses.replace(view, **changes)


def test_the_message_signature_hashes_as_dkimpy_does(keys: dict[str, dkim.SigningKey]) -> None:
    """dkimpy's arc_sign, told to sign our h= list, signs the same body hash and the
    same canonicalized header fields as our ARC-Message-Signature: its b= verifies
    against the header hash we compute for the message."""
    signer = dkim.Signer(keys["list"])
    message = with_our_results(
        message_bytes(
            "From: Jane <jane@example.net>\r\nTo:  staff@lists.example.org \r\n"
            "Subject: Minutes\r\n\tcontinued\r\nList-Id: Staff <staff.lists.example.org>\r\n"
            "Message-ID: <minutes@example.net>\r\n\r\nThe  minutes \r\n\r\n\r\n"
        )
    )
    hashes = signer.hashes(message)
    found = arc.chain(message, "lists.example.org")
    assert found is not None and (found.instance, found.cv) == (1, b"none")
    ours = arc.Sealer(signer, found).fields(hashes, timestamp=T)
    ams = next(f for f in ours.split(b"\r\nARC-") if f.startswith(b"Message-Signature:"))
    ours_bh = re.search(rb"bh=([^;]+);", ams)
    theirs = dkimpy.arc_sign(
        message,
        b"s1",
        b"lists.example.org",
        keys["list"].private_pem,
        b"lists.example.org",
        include_headers=hashes.h_value.split(b":"),
        timestamp=T,
    )
    their_ams = next(f for f in theirs if f.startswith(b"ARC-Message-Signature:"))
    their_bh = re.search(rb"bh=([^;]+);", their_ams)
    assert ours_bh is not None and their_bh is not None
    assert ours_bh[1] == their_bh[1] == base64.b64encode(hashes.body)
    # their AMS with b= emptied, canonicalized by us after our hash of the signed fields
    unfolded = their_ams.rstrip(b"\r\n")
    b_value = re.search(rb"[;\s]b=([A-Za-z0-9+/=\s]+)$", unfolded)
    assert b_value is not None
    emptied = unfolded[: b_value.start(1)]
    state = hashes.headers.copy()
    state.update(dkim.canonicalize_header(emptied + b"\r\n", "relaxed")[:-2])
    public = serialization.load_pem_private_key(keys["list"].private_pem, None).public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(  # raises InvalidSignature when the canonicalizations differ
        base64.b64decode(re.sub(rb"\s", b"", b_value[1])),
        state.digest(),
        padding.PKCS1v15(),
        Prehashed(hashes_.SHA256()),
    )


def message_bytes(text: str) -> bytes:
    return text.encode("ascii")


def test_a_template_signs_and_seals_as_a_full_signature_does(
    keys: dict[str, dkim.SigningKey],
) -> None:
    """The shared-prefix path (`SigningTemplate`) gives byte-identical copies to signing
    each copy from scratch (RSA PKCS#1 v1.5 is deterministic)."""
    signer = dkim.Signer(keys["list"])
    raw = with_our_results(dkim.Signer(keys["author"]).sign(post_text()))
    template = prepare.render(raw, template_view(), None)
    personalizer = prepare.Personalizer(
        template, template_view(arc_authserv_id="lists.example.org")
    )
    sealer = personalizer.arc_sealer(signer)
    assert sealer is not None
    signing = personalizer.signing_template(signer)
    assert signing is not None and signing.shared > 0
    for rcpt in MEMBERS:
        copy = personalizer.render(rcpt)
        assert sealer.sign(copy, signing, timestamp=T) == sealer.sign(copy, timestamp=T)
    sealed = personalizer.render_all(MEMBERS, signer)
    assert all(m.startswith(b"ARC-Seal: i=1; a=rsa-sha256; cv=none;") for m in sealed)


def test_copies_are_sealed_only_when_the_post_was_to_be(
    keys: dict[str, dkim.SigningKey], tmp_path: Path
) -> None:
    """The decision recorded at preparation (`arc_authserv_id`), not the message, says
    whether copies are sealed: a post queued before sealing existed stays unsealed."""
    signer = dkim.Signer(keys["list"])
    raw = with_our_results(dkim.Signer(keys["author"]).sign(post_text()))
    template = prepare.render(raw, template_view(), None)
    unsealed = prepare.Personalizer(template, template_view()).render_all(MEMBERS, signer)
    assert all(m.startswith(b"DKIM-Signature:") and b"ARC-" not in m for m in unsealed)
    ed25519 = dkim.generate_key(tmp_path / "ed", "lists.example.org", "e1", algorithm="ed25519")
    personal = prepare.Personalizer(template, template_view(arc_authserv_id="lists.example.org"))
    assert personal.arc_sealer(dkim.Signer(ed25519)) is None  # rsa-sha256 only
    assert personal.arc_sealer(signer) is not None


def test_the_chain_decides_cv_and_what_the_seal_covers(
    keys: dict[str, dkim.SigningKey],
) -> None:
    chained = upstream_chain(keys)
    passed = arc.chain(with_our_results(chained, ";\r\n\tarc=pass"), "lists.example.org")
    assert passed is not None and (passed.instance, passed.cv) == (2, b"pass")
    assert passed.earlier.startswith(b"arc-authentication-results:i=1; mx.example.com;")
    assert passed.earlier.count(b"\r\n") == 3  # AAR, AMS, AS of instance 1
    failed = arc.chain(with_our_results(chained, ";\r\n\tarc=fail"), "lists.example.org")
    assert failed is not None and (failed.cv, failed.earlier) == (b"fail", b"")  # §5.1.2
    # earlier sets but no verdict of ours: the chain cannot be continued
    assert arc.chain(with_our_results(chained), "lists.example.org") is None
    # someone else's results are not ours to seal
    assert arc.chain(chained, "lists.example.org") is None
    sealed = arc.seal(
        dkim.Signer(keys["list"]).sign(with_our_results(chained, ";\r\n\tarc=fail")),
        dkim.Signer(keys["list"]),
        "lists.example.org",
    )
    assert sealed.startswith(b"ARC-Seal: i=2; a=rsa-sha256; cv=fail;")


def test_merged_copies_are_sealed(keys: dict[str, dkim.SigningKey], dns_server: DnsServer) -> None:
    """A post with merge fields: each copy (its own Subject and body) signed and sealed."""
    post = post_text().replace(b"Subject: Minutes", b"Subject: Minutes for $name")
    raw = with_our_results(dkim.Signer(keys["author"]).sign(post))
    view = template_view(
        delivery_mode=DeliveryMode.SHARED, merge_fields=True, arc_authserv_id="lists.example.org"
    )
    template = prepare.merged_template(raw, view, Audience.MEMBERS)
    assert template is not None
    personal = dataclasses.replace(view, delivery_mode=DeliveryMode.PERSONALIZED)
    names = {"ann@one.example": "Ann", "bob@two.example": "Bö"}
    copies = prepare.Personalizer(template, personal, names).render_all(
        MEMBERS, dkim.Signer(keys["list"])
    )
    dnsfunc = dnsfunc_for(dns_server)
    assert len({mail.parse(c)["Subject"] for c in copies}) == len(MEMBERS)
    for copy in copies:
        cv, results, reason = dkimpy.arc_verify(copy, dnsfunc=dnsfunc)
        assert cv == dkimpy.CV_Pass, reason
        assert [r["instance"] for r in results] == [1]
        assert dkimpy.verify(copy, dnsfunc=dnsfunc)
