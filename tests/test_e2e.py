"""End to end: a real SMTP client posts to the running daemon, a recording sink receives."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import dkim as dkimpy
import pytest
import sqlalchemy as sa
from conftest import make_list, message
from sink import Sink

from listserv.db import Database
from listserv.distribute import dkim
from listserv.models import (
    Delivery,
    DeliveryBatch,
    InboundMessage,
    Post,
    PostingPolicy,
    PostState,
    RecipientState,
)

MEMBERS = [
    "ann@one.example",
    "bob@one.example",
    "cat@two.example",
    "dan@two.example",
    "eve@three.example",
]
SENDER = "boss@example.org"


def post_text(sender: str = SENDER, subject: str = "Budget", extra: str = "") -> bytes:
    return extra.replace("\n", "\r\n").encode() + message(
        f"""
        From: Boss <{sender}>
        To: staff@lists.example.org
        Subject: {subject}
        Message-ID: <m1@example.org>
        Date: Mon, 23 Nov 2026 10:00:00 +0000
        MIME-Version: 1.0
        Content-Type: text/plain; charset=utf-8

        The budget is approved.
        """
    )


async def send(port: int, data: bytes, sender: str = SENDER, rcpts: list[str] | None = None) -> Any:
    return await aiosmtplib.send(
        data,
        sender=sender,
        recipients=rcpts or ["staff@lists.example.org"],
        hostname="127.0.0.1",
        port=port,
        timeout=10,
    )


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(predicate):
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


def post_state(db: Database) -> PostState | None:
    with db.reading() as s:
        return s.scalar(sa.select(Post.state).order_by(Post.id.desc()).limit(1))


async def test_post_from_authorized_sender_reaches_every_member_once_signed(
    db: Database, sink: Sink, daemon_factory: Any, tmp_path: Path
) -> None:
    key = dkim.generate_key(tmp_path / "dkim", "lists.example.org", "test", bits=1024)
    make_list(db, members_=MEMBERS, senders=[SENDER])
    daemon = await daemon_factory()

    errors, reply = await send(daemon.port, post_text())
    assert errors == {}
    assert reply.startswith("2.0.0 Queued as ")

    await sink.wait_for_recipients(len(MEMBERS))
    await wait_until(lambda: post_state(db) is PostState.SENT)
    assert Counter(sink.recipients()) == Counter(MEMBERS)
    assert {r.mail_from for r in sink.received} == {"staff-bounces@lists.example.org"}
    # one transaction per domain
    assert sorted(len(r.rcpt_tos) for r in sink.received) == [1, 2, 2]

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        if name == b"test._domainkey.lists.example.org.":
            return key.public_txt().encode()
        return None

    for received in sink.received:
        assert dkimpy.verify(received.data, dnsfunc=dnsfunc)
        msg = received.message()
        assert msg["List-Id"] == "<staff.lists.example.org>"
        assert msg["List-Post"] == "<mailto:staff@lists.example.org>"
        assert "mailto:staff-leave@lists.example.org" in msg["List-Unsubscribe"]
        assert msg["Precedence"] == "list"
        assert msg["Subject"] == "[staff] Budget"
        body = msg.get_body(("plain",))
        assert body is not None
        text = body.get_content()
        assert "The budget is approved." in text
        assert "To unsubscribe, send an e-mail to staff-leave@lists.example.org" in text
        assert "staff-owner@lists.example.org" in text
        sig = dkimpy.DKIM(received.data)
        assert sig.verify(dnsfunc=dnsfunc)
        signed = msg["DKIM-Signature"]
        for name in ("from", "to", "subject", "date", "message-id", "list-id", "list-unsubscribe"):
            assert name in signed.lower()

    with db.reading() as s:
        states = Counter(s.scalars(sa.select(Delivery.state)))
    assert states == {RecipientState.DELIVERED: len(MEMBERS)}


async def test_nonsender_on_announce_list_gets_550_and_nothing_is_stored(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    daemon = await daemon_factory()
    with pytest.raises(aiosmtplib.SMTPDataError) as info:
        await send(daemon.port, post_text(sender="ann@one.example"), sender="ann@one.example")
    assert info.value.code == 550
    assert info.value.message.startswith("5.7.1 ")
    assert "only its authorized senders may post" in info.value.message
    with db.reading() as s:
        assert s.scalar(sa.select(sa.func.count(InboundMessage.id))) == 0
    assert sink.received == []


async def test_member_may_post_to_members_list(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, policy=PostingPolicy.MEMBERS)
    daemon = await daemon_factory()
    await send(daemon.port, post_text(sender="Cat@two.example"), sender="Cat@two.example")
    await sink.wait_for_recipients(len(MEMBERS))
    assert sorted(sink.recipients()) == sorted(MEMBERS)


async def test_unknown_list_and_relay_attempts_get_550(db: Database, daemon_factory: Any) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    daemon = await daemon_factory()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, timeout=10)
    async with client:
        await client.mail(SENDER)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as unknown:
            await client.rcpt("nosuchlist@lists.example.org")
        assert (unknown.value.code, unknown.value.message.split()[0]) == (550, "5.1.1")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as relay:
            await client.rcpt("victim@gmail.example")
        assert (relay.value.code, relay.value.message.split()[0]) == (550, "5.1.1")
        assert "Relaying denied" in relay.value.message
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as bad:
            await client.rcpt("not-an-address")
        assert bad.value.code == 550
        # our other addresses are accepted at RCPT
        for rcpt in (
            "staff-request@lists.example.org",
            "staff-owner@lists.example.org",
            "staff-bounces+abc@lists.example.org",
            "staff-leave@lists.example.org",
        ):
            response = await client.rcpt(rcpt)
            assert response.code == 250


async def test_oversize_message_gets_552(db: Database, sink: Sink, daemon_factory: Any) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    daemon = await daemon_factory(server__max_message_size=2000)
    big = post_text() + b"y" * 3000 + b"\r\n"
    with pytest.raises(aiosmtplib.SMTPResponseException) as info:
        await send(daemon.port, big)
    assert info.value.code == 552
    assert info.value.message.startswith("5.3.4")
    # declared up front with SIZE=
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, timeout=10)
    async with client:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as declared:
            await client.mail(SENDER, options=["SIZE=50000"])
        assert declared.value.code == 552
        assert declared.value.message.startswith("5.3.4")
    assert sink.received == []


async def test_loop_with_our_list_id_is_discarded(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    daemon = await daemon_factory()
    looped = post_text(extra="List-Id: <staff.lists.example.org>\n")
    errors, _ = await send(daemon.port, looped)
    assert errors == {}
    assert post_state(db) is PostState.DISCARDED
    with db.reading() as s:
        assert s.scalar(sa.select(sa.func.count(DeliveryBatch.id))) == 0


async def test_451_on_first_attempt_is_retried_and_delivered(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    sink.script("RCPT", "451 4.3.0 try again later", times=1, match="cat@")
    daemon = await daemon_factory()
    await send(daemon.port, post_text())
    await sink.wait_for_recipients(len(MEMBERS))
    await wait_until(lambda: post_state(db) is PostState.SENT)
    assert Counter(sink.recipients()) == Counter(MEMBERS)
    with db.reading() as s:
        batch_attempts = dict(
            s.execute(sa.select(DeliveryBatch.domain, DeliveryBatch.attempts)).all()
        )
    assert batch_attempts["two.example"] == 2
    assert batch_attempts["one.example"] == 1


async def test_5xx_is_a_permanent_failure_and_others_are_delivered(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    sink.script("RCPT", "550 5.1.1 no such user", times=-1, match="bob@")
    daemon = await daemon_factory()
    await send(daemon.port, post_text())
    await sink.wait_for_recipients(len(MEMBERS) - 1)
    await wait_until(lambda: post_state(db) is PostState.SENT)
    with db.reading() as s:
        rows = dict(s.execute(sa.select(Delivery.address, Delivery.state)).all())
        bob = s.scalar(sa.select(Delivery).where(Delivery.address == "bob@one.example"))
    assert rows.pop("bob@one.example") is RecipientState.FAILED
    assert set(rows.values()) == {RecipientState.DELIVERED}
    assert bob is not None and bob.code == 550 and "no such user" in bob.detail


async def test_dropped_connection_defers_the_batch_and_nothing_is_lost(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    sink.disconnect_after("DATA", times=2)
    daemon = await daemon_factory()
    await send(daemon.port, post_text())
    await wait_until(lambda: post_state(db) is PostState.SENT)
    assert Counter(sink.recipients()) == Counter(MEMBERS)


async def test_connection_refused_defers_until_the_smarthost_is_back(
    db: Database, daemon_factory: Any, sink: Sink
) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    port = sink.port
    await sink.stop()
    daemon = await daemon_factory(delivery__port=port)
    await send(daemon.port, post_text())

    def deferred() -> bool:
        with db.reading() as s:
            return bool(
                s.scalar(
                    sa.select(sa.func.count(Delivery.id)).where(
                        Delivery.state == RecipientState.DEFERRED
                    )
                )
            )

    await wait_until(deferred)
    async with Sink(port=port) as back:
        await back.wait_for_recipients(len(MEMBERS))
        await wait_until(lambda: post_state(db) is PostState.SENT)
        assert Counter(back.recipients()) == Counter(MEMBERS)


async def test_personalized_mode_renders_and_signs_per_recipient(
    db: Database, sink: Sink, daemon_factory: Any, tmp_path: Path
) -> None:
    key = dkim.generate_key(tmp_path / "dkim", "lists.example.org", "test", bits=1024)
    make_list(db, members_=MEMBERS, senders=[SENDER], delivery_mode="personalized")
    daemon = await daemon_factory()
    await send(daemon.port, post_text())
    await sink.wait_for_recipients(len(MEMBERS))
    assert len(sink.received) == len(MEMBERS)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return key.public_txt().encode() if name.startswith(b"test._domainkey.") else None

    for received in sink.received:
        (rcpt,) = received.rcpt_tos
        assert dkimpy.verify(received.data, dnsfunc=dnsfunc)
        body = received.message().get_body(("plain",))
        assert body is not None
        assert f"You are subscribed as {rcpt}." in body.get_content()


async def test_unsigned_when_no_key_and_healthz_answers(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    daemon = await daemon_factory()
    await send(daemon.port, post_text())
    await sink.wait_for_recipients(len(MEMBERS))
    assert all("DKIM-Signature" not in r.message() for r in sink.received)
    url = f"http://127.0.0.1:{daemon.daemon.http_port}/healthz"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_graceful_stop_leaves_no_lease(db: Database, sink: Sink, daemon_factory: Any) -> None:
    make_list(db, members_=MEMBERS, senders=[SENDER])
    sink.delay("DATA", 0.5, times=-1)
    daemon = await daemon_factory()
    await send(daemon.port, post_text())
    await sink.wait_for_messages(1)
    await daemon.stop()
    with db.reading() as s:
        leased = s.scalar(
            sa.select(sa.func.count(DeliveryBatch.id)).where(DeliveryBatch.lease_owner.is_not(None))
        )
    assert leased == 0


async def test_smtputf8_and_8bit_post_is_accepted_and_delivered_intact(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=["zoë@one.example", "bob@two.example"], senders=["jürgen@example.org"])
    daemon = await daemon_factory()
    raw = message(
        """
        From: Jürgen <jürgen@example.org>
        To: staff@lists.example.org
        Subject: Grüße aus Köln
        MIME-Version: 1.0
        Content-Type: text/plain; charset=utf-8
        Content-Transfer-Encoding: 8bit

        Schöne Grüße, café für alle.
        """
    )
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, timeout=10)
    async with client:
        assert client.supports_extension("SMTPUTF8")
        assert client.supports_extension("8BITMIME")
        await client.mail(
            "jürgen@example.org", options=["SMTPUTF8", "BODY=8BITMIME"], encoding="utf-8"
        )
        await client.rcpt("staff@lists.example.org")
        response = await client.data(raw)
    assert response.code == 250
    await sink.wait_for_recipients(2)
    assert sorted(sink.recipients()) == ["bob@two.example", "zoë@one.example"]
    for received in sink.received:
        msg = received.message()
        assert msg["Subject"] == "[staff] Grüße aus Köln"
        body = msg.get_body(("plain",))
        assert body is not None
        assert "Schöne Grüße, café für alle." in body.get_content()


class _AuthSink:
    """A smarthost that insists on AUTH (aiosmtpd's own authenticator hook)."""

    def __init__(self) -> None:
        self.received: list[list[str]] = []
        self.logins: list[tuple[str, bool]] = []
        self.event = asyncio.Event()

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        def text(value: str | bytes) -> str:
            return value.decode() if isinstance(value, bytes) else value

        ok = isinstance(auth_data, LoginPassword) and (
            text(auth_data.login),
            text(auth_data.password),
        ) == ("lists", "s3cret")
        self.logins.append((mechanism, ok))
        return AuthResult(success=ok)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(list(envelope.rcpt_tos))
        self.event.set()
        return "250 OK"


# aiosmtpd warns about AUTH without TLS (fine on loopback) and about its own
# deprecated Session.login_data, which it sets itself.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.filterwarnings("ignore:Session.login_data is deprecated")
async def test_smarthost_auth_with_password_from_the_environment(
    db: Database, daemon_factory: Any
) -> None:
    from aiosmtpd.smtp import SMTP as AiosmtpdSMTP

    make_list(db, members_=MEMBERS[:2], senders=[SENDER])
    handler = _AuthSink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: AiosmtpdSMTP(
            handler,
            authenticator=handler.authenticate,
            auth_required=True,
            auth_require_tls=False,
        ),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        from listserv import config

        password = config.from_dict({}, env={"LISTSERV_DELIVERY_PASSWORD": "s3cret"})
        daemon = await daemon_factory(
            delivery__port=port,
            delivery__username="lists",
            delivery__password=password.delivery.password,
        )
        await send(daemon.port, post_text())
        await asyncio.wait_for(handler.event.wait(), 10)
        await wait_until(lambda: post_state(db) is PostState.SENT)
        assert sorted(r for rcpts in handler.received for r in rcpts) == sorted(MEMBERS[:2])
        assert handler.logins and all(ok for _, ok in handler.logins)
    finally:
        server.close()
        await server.wait_closed()


MALFORMED = [
    b"From: boss@example.org\r\nCc: a@b.c,\r\nSubject: =?utf-8?q?broken\r\n"
    b"Content-Type: multipart/mixed\r\n\r\nno boundary\r\n",
    b"From: boss@example.org\r\nContent-Type: text/plain; charset=x-unknown\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n",
    b"From: <boss@example.org\r\nMessage-ID: <[bad]@x>\r\nX-Long: "
    + b"y" * 900
    + b"\r\n\r\nbody\r\n",
]


# Mail with no header section or no From: address is refused at DATA (tests/test_smtp_in.py).
@pytest.mark.parametrize("raw", MALFORMED, ids=["broken-headers", "bad-charset", "long"])
async def test_malformed_mail_from_a_sender_is_delivered_not_crashed_on(
    db: Database, sink: Sink, daemon_factory: Any, raw: bytes
) -> None:
    make_list(db, members_=MEMBERS[:2], senders=[SENDER])
    daemon = await daemon_factory()
    errors, reply = await send(daemon.port, raw)
    assert errors == {} and reply.startswith("2.0.0 Queued as ")
    await sink.wait_for_recipients(2)
    await wait_until(lambda: post_state(db) is PostState.SENT)
    for received in sink.received:
        msg = received.message()
        assert msg["List-Id"] == "<staff.lists.example.org>"
        assert b"staff-leave@lists.example.org" in received.data


async def test_a_line_over_1000_characters_gets_500_and_nothing_is_stored(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS[:2], senders=[SENDER])
    daemon = await daemon_factory()
    raw = post_text() + b"z" * 5000 + b"\r\n"
    with pytest.raises(aiosmtplib.SMTPDataError) as info:
        await send(daemon.port, raw)
    assert info.value.code == 500
    assert info.value.message.startswith("5.5.2 ")
    with db.reading() as s:
        assert s.scalar(sa.select(sa.func.count(InboundMessage.id))) == 0


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (no network, no openssl CLI)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smarthost.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "smarthost.pem", tmp_path / "smarthost.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _TLSRecorder:
    def __init__(self) -> None:
        self.received: list[tuple[bool, list[str]]] = []
        self.event = asyncio.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((session.ssl is not None, list(envelope.rcpt_tos)))
        self.event.set()
        return "250 OK"


async def test_starttls_to_the_smarthost_is_verified_against_the_configured_ca(
    db: Database, daemon_factory: Any, tmp_path: Path
) -> None:
    import ssl

    from aiosmtpd.smtp import SMTP as AiosmtpdSMTP

    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    make_list(db, members_=MEMBERS[:2], senders=[SENDER])
    handler = _TLSRecorder()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: AiosmtpdSMTP(handler, tls_context=context, require_starttls=True),
        "127.0.0.1",
        0,
    )
    try:
        daemon = await daemon_factory(
            delivery__port=server.sockets[0].getsockname()[1],
            delivery__starttls=True,
            delivery__tls_ca_file=str(cert),
        )
        await send(daemon.port, post_text())
        await asyncio.wait_for(handler.event.wait(), 10)
        await wait_until(lambda: post_state(db) is PostState.SENT)
        assert handler.received == [(True, sorted(MEMBERS[:2]))]
    finally:
        server.close()
        await server.wait_closed()


async def test_an_untrusted_smarthost_certificate_defers_and_sends_nothing(
    db: Database, daemon_factory: Any, tmp_path: Path
) -> None:
    import ssl

    from aiosmtpd.smtp import SMTP as AiosmtpdSMTP

    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    make_list(db, members_=MEMBERS[:2], senders=[SENDER])
    handler = _TLSRecorder()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: AiosmtpdSMTP(handler, tls_context=context, require_starttls=True),
        "127.0.0.1",
        0,
    )
    try:
        daemon = await daemon_factory(
            delivery__port=server.sockets[0].getsockname()[1], delivery__starttls=True
        )
        await send(daemon.port, post_text())

        def deferred_for_tls() -> bool:
            with db.reading() as s:
                details = s.scalars(
                    sa.select(Delivery.detail).where(Delivery.state == RecipientState.DEFERRED)
                ).all()
            return len(details) == 2 and all("CERTIFICATE_VERIFY_FAILED" in d for d in details)

        await wait_until(deferred_for_tls)
        assert handler.received == []
    finally:
        server.close()
        await server.wait_closed()


async def test_two_daemons_on_one_database_deliver_each_recipient_once(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    many = [f"user{i}@d{i % 7}.example" for i in range(300)]
    make_list(db, members_=many, senders=[SENDER])
    first = await daemon_factory(delivery__max_recipients_per_message=5)
    second = await daemon_factory(delivery__max_recipients_per_message=5)
    await send(first.port, post_text())
    await sink.wait_for_recipients(len(many), timeout=30)
    await wait_until(lambda: post_state(db) is PostState.SENT, timeout=30)
    assert Counter(sink.recipients()) == Counter(many)
    with db.reading() as s:
        owners = set(
            s.scalars(sa.select(DeliveryBatch.lease_owner).where(DeliveryBatch.attempts > 1))
        )
    assert owners == set()  # no batch needed a second attempt
    await second.stop()
    await first.stop()


async def test_mail_to_the_owner_address_is_forwarded_unchanged_to_the_owners(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    address = make_list(db, members_=MEMBERS, senders=[SENDER])
    from listserv import lists, members
    from listserv.models import Role

    with db.session() as s:
        members.add(s, lists.get(s, address), ["second-owner@example.org"], role=Role.OWNER)
    daemon = await daemon_factory()
    raw = message(
        """
        From: A Stranger <stranger@elsewhere.example>
        To: staff-owner@lists.example.org
        Subject: Please add me

        Hello owners.
        """
    )
    errors, _ = await send(
        daemon.port,
        raw,
        sender="stranger@elsewhere.example",
        rcpts=["staff-owner@lists.example.org"],
    )
    assert errors == {}
    await sink.wait_for_recipients(2)
    assert sorted(sink.recipients()) == ["owner@example.org", "second-owner@example.org"]
    for received in sink.received:
        assert received.mail_from == "staff-bounces@lists.example.org"
        assert received.data.rstrip(b"\r\n") == raw.rstrip(b"\r\n")  # not decorated


async def test_a_slow_smarthost_does_not_make_a_batch_in_hand_look_abandoned(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    three = ["a@d1.example", "b@d2.example", "c@d3.example"]
    make_list(db, members_=three, senders=[SENDER])
    sink.delay("DATA", 2.5, times=-1)  # each transaction outlasts the lease twice over
    daemon = await daemon_factory(delivery__lease_seconds=1.0, delivery__max_connections=3)
    await send(daemon.port, post_text())
    await sink.wait_for_recipients(3, timeout=20)
    await wait_until(lambda: post_state(db) is PostState.SENT, timeout=20)
    assert Counter(sink.recipients()) == Counter(three)
    with db.reading() as s:
        assert set(s.scalars(sa.select(DeliveryBatch.attempts))) == {1}
