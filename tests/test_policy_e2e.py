"""The posting rules end to end: a real SMTP client posts to the running daemon, the
replies are asserted as they come over the wire, and what reaches the sink is parsed."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import sqlalchemy as sa
from conftest import make_list, message
from dnsserver import DnsServer
from sink import Sink

from listserv import lists, members
from listserv.db import Database
from listserv.distribute import dkim
from listserv.models import (
    AuditEntry,
    InboundMessage,
    ModerationAction,
    Post,
    PostingPolicy,
    PostState,
    Role,
)

LIST = "staff@lists.example.org"
BOSS = "boss@example.org"
MEMBERS = ["ann@one.example", "bob@one.example", "cat@two.example"]


def post(
    from_: str = f"Boss <{BOSS}>",
    *,
    subject: str = "Budget",
    headers: str = "",
    body: str = "The budget is approved.",
    content_type: str = "text/plain; charset=utf-8",
    to: str = LIST,
) -> bytes:
    extra = "".join(f"{line}\n" for line in headers.strip().splitlines())
    return message(
        f"From: {from_}\n{extra}To: {to}\nSubject: {subject}\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.org>\n"
        f"MIME-Version: 1.0\nContent-Type: {content_type}\n\n{body}\n"
    )


async def send(port: int, data: bytes, sender: str = BOSS, rcpts: list[str] | None = None) -> str:
    """One transaction; the 250 text, or the refusal raised as aiosmtplib reports it."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
    async with client:
        _, reply = await client.sendmail(sender, rcpts or [LIST], data)
    return reply


async def refused(port: int, data: bytes, **kwargs: Any) -> aiosmtplib.SMTPResponseException:
    with pytest.raises(aiosmtplib.SMTPResponseException) as info:
        await send(port, data, **kwargs)
    return info.value


def posts_by_subject(db: Database) -> dict[str, tuple[PostState, str]]:
    with db.reading() as s:
        return {p.subject: (p.state, p.reason) for p in s.scalars(sa.select(Post))}


def subjects(sink: Sink) -> Counter[str]:
    """Subjects of what reached members (hold notices to owners and senders left out)."""
    return Counter(
        str(r.message()["Subject"]) for r in sink.received if set(r.rcpt_tos) & set(MEMBERS)
    )


async def members_got(sink: Sink, n: int, timeout: float = 10.0) -> None:
    """Wait until `n` copies reached members; hold notices may arrive in between."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while sum(1 for r in sink.received for a in r.rcpt_tos if a in MEMBERS) < n:
        assert loop.time() < deadline, f"members got fewer than {n} copies: {subjects(sink)}"
        await asyncio.sleep(0.05)


def configure(db: Database, address: str = LIST, **settings: str) -> None:
    with db.session() as s:
        mlist = lists.get(s, address)
        for key, value in settings.items():
            lists.set_setting(s, mlist, key, value)


def add(db: Database, *addrs: str, address: str = LIST, **kwargs: Any) -> None:
    with db.session() as s:
        members.add(s, lists.get(s, address), list(addrs), **kwargs)


async def test_a_forged_from_on_an_announce_list_is_refused_or_held_by_nonmember_action(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[BOSS])
    daemon = await daemon_factory()
    forged = post("Evil <evil@ext.example>", subject="Forged")
    error = await refused(daemon.port, forged, sender=BOSS)
    assert (error.code, error.message.split()[0]) == (550, "5.7.1")
    assert "evil@ext.example may not post to staff@lists.example.org" in error.message
    with db.reading() as s:
        assert s.scalar(sa.select(sa.func.count(InboundMessage.id))) == 0
        entry = s.scalars(sa.select(AuditEntry).where(AuditEntry.action == "post.reject")).one()
    assert entry.actor == "evil@ext.example" and entry.list_address == LIST
    assert "'Forged'" in entry.detail and "only its authorized senders may post" in entry.detail

    configure(db, nonmember_action="hold")
    assert (await send(daemon.port, forged, sender=BOSS)).startswith("2.0.0 Queued as ")
    await send(daemon.port, post(subject="Real"))
    await members_got(sink, len(MEMBERS))
    state, reason = posts_by_subject(db)["Forged"]
    assert state is PostState.HELD
    assert reason.startswith("evil@ext.example may not post")
    assert set(subjects(sink)) == {"[staff] Real"}


async def test_a_sender_header_stands_in_and_the_envelope_alone_does_not(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[BOSS])
    daemon = await daemon_factory()
    principal = "The Principal <principal@ext.example>"
    error = await refused(daemon.port, post(principal, subject="Envelope only"), sender=BOSS)
    assert error.code == 550
    stand_in = post(principal, subject="Stand-in", headers=f"Sender: Secretary <{BOSS}>")
    reply = await send(daemon.port, stand_in, sender="bounces@ext.example")
    assert reply.startswith("2.0.0 Queued as ")
    await members_got(sink, len(MEMBERS))
    received = sink.received[0].message()
    assert received["From"] == principal
    state, reason = posts_by_subject(db)["Stand-in"]
    assert state in (PostState.ACCEPTED, PostState.SENDING, PostState.SENT) and reason == ""


async def test_per_member_actions_hold_discard_and_refuse(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, policy=PostingPolicy.MEMBERS)
    add(db, "held@one.example", moderation=ModerationAction.HOLD)
    add(db, "gone@one.example", moderation=ModerationAction.DISCARD)
    add(db, "no@one.example", moderation=ModerationAction.REJECT)
    daemon = await daemon_factory()
    await send(daemon.port, post("held@one.example", subject="Held"), sender="held@one.example")
    await send(daemon.port, post("gone@one.example", subject="Gone"), sender="gone@one.example")
    error = await refused(daemon.port, post("no@one.example", subject="No"), sender="x@y.example")
    assert (error.code, error.message.split()[0]) == (550, "5.7.1")
    assert "no@one.example may not post" in error.message
    await send(daemon.port, post("ann@one.example", subject="Fine"), sender="ann@one.example")
    await members_got(sink, len(MEMBERS))  # the hold notice may arrive first
    states = posts_by_subject(db)
    assert states["Held"] == (
        PostState.HELD,
        "held@one.example is moderated on staff@lists.example.org: posts need approval",
    )
    assert states["Gone"][0] is PostState.DISCARDED
    assert "No" not in states
    assert set(subjects(sink)) == {"[staff] Fine"}
    with db.reading() as s:
        audit = {
            (e.actor, e.action)
            for e in s.scalars(sa.select(AuditEntry).where(AuditEntry.action.like("post.%")))
        }
    assert {
        ("held@one.example", "post.hold"),
        ("gone@one.example", "post.discard"),
        ("no@one.example", "post.reject"),
        ("ann@one.example", "post.accept"),
    } <= audit


async def test_max_message_kb_answers_552_at_data(db: Database, daemon_factory: Any) -> None:
    make_list(db, members_=MEMBERS, senders=[BOSS], max_message_kb="2")
    daemon = await daemon_factory()
    big = post(body=("x" * 70 + "\n") * 40)
    error = await refused(daemon.port, big)
    assert (error.code, error.message.split()[0]) == (552, "5.3.4")
    assert "the list accepts at most 2 KB" in error.message
    assert (await send(daemon.port, post())).startswith("2.0.0 Queued as ")


HTML_ONLY = (
    "<html><head><style>p {color: red}</style><script>track()</script></head><body>"
    '<p>See <a href="https://docs.example.org/plan">the plan</a>.</p><p>Caf&eacute; at 3.</p>'
    "</body></html>"
)


async def test_plain_text_only_rejects_html_or_delivers_it_converted(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[BOSS], plain_text_only="true", footer="Be kind.")
    daemon = await daemon_factory()
    html = post(content_type="text/html; charset=utf-8", body=HTML_ONLY, subject="Html")
    error = await refused(daemon.port, html)
    assert (error.code, error.message.split()[0]) == (550, "5.6.0")
    assert "accepts plain text only, not text/html" in error.message

    configure(db, content_filter="convert")
    await send(daemon.port, html)
    await members_got(sink, len(MEMBERS))
    for received in sink.received:
        msg = received.message()
        assert msg.get_content_type() == "text/plain"
        assert not msg.is_multipart()
        text = msg.get_content()
        assert "See the plan <https://docs.example.org/plan>." in text
        assert "Café at 3." in text
        assert "track()" not in text and "color" not in text and "<p>" not in text
        assert "Be kind." in text
        assert "To unsubscribe, send an e-mail to staff-leave@lists.example.org" in text


async def test_attachments_and_mime_types_are_refused_in_the_dialogue(
    db: Database, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[BOSS], allow_attachments="false")
    daemon = await daemon_factory()
    body = (
        "--XX\nContent-Type: text/plain\n\nSee attached.\n"
        "--XX\nContent-Type: application/pdf\n"
        'Content-Disposition: attachment; filename="plan.pdf"\n'
        "Content-Transfer-Encoding: base64\n\nJVBERi0=\n--XX--"
    )
    with_pdf = post(content_type='multipart/mixed; boundary="XX"', body=body)
    error = await refused(daemon.port, with_pdf)
    assert (error.code, error.message.split()[0]) == (550, "5.6.0")
    assert "accepts no attachments (plan.pdf)" in error.message

    configure(db, allow_attachments="true", allowed_mime_types="text/*,image/png")
    error = await refused(daemon.port, with_pdf)
    assert "does not accept application/pdf parts; allowed: text/*, image/png" in error.message
    configure(db, allowed_mime_types="text/*,application/pdf")
    assert (await send(daemon.port, with_pdf)).startswith("2.0.0 Queued as ")


async def test_a_threshold_holds_big_posts_and_an_emergency_sender_passes(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[BOSS], approval_threshold="2")
    add(db, "alarm@example.org", role=Role.SENDER, emergency=True)
    daemon = await daemon_factory()
    await send(daemon.port, post(subject="Big"))
    await send(daemon.port, post("alarm@example.org", subject="Fire"), sender="alarm@example.org")
    await members_got(sink, len(MEMBERS))
    assert posts_by_subject(db)["Big"] == (
        PostState.HELD,
        "needs approval: 3 recipients > threshold 2",
    )
    assert set(subjects(sink)) == {"[staff] Fire"}


async def test_a_post_to_several_lists_is_judged_on_the_union_of_their_recipients(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=["ann@one.example", "bob@one.example"], senders=[BOSS])
    board = make_list(
        db,
        "board@lists.example.org",
        members_=["ANN@one.example", "cat@two.example"],
        senders=[BOSS],
    )
    configure(db, approval_threshold="2")
    daemon = await daemon_factory()
    await send(daemon.port, post(subject="Alone"))  # 2 recipients: not over 2
    await members_got(sink, 2)
    await send(daemon.port, post(subject="Both"), rcpts=[LIST, board])  # ann, bob, cat
    await sink.wait_for_recipients(4 + 2)  # + the hold notices to the owner and the sender
    with db.reading() as s:
        rows = s.execute(sa.select(Post.subject, Post.list_id, Post.state, Post.reason)).all()
        staff_id = lists.get(s, LIST).id
    both = {
        list_id == staff_id: (state, reason)
        for subject, list_id, state, reason in rows
        if subject == "Both"
    }
    assert both[True] == (PostState.HELD, "needs approval: 3 recipients > threshold 2")
    assert both[False][0] is not PostState.HELD
    copies = [rec for rec in sink.received if "[board] Both" in str(rec.message()["Subject"])]
    assert Counter(r for rec in copies for r in rec.rcpt_tos) == {
        "ANN@one.example": 1,
        "cat@two.example": 1,
    }


def window_around_today() -> str:
    today = datetime.now(UTC).date()
    return f"{today - timedelta(days=1):%m-%d}..{today + timedelta(days=1):%m-%d}"


async def test_a_list_blackout_holds_posts_but_not_an_emergency_senders(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[BOSS], blackout=window_around_today())
    add(db, "alarm@example.org", role=Role.SENDER, emergency=True)
    daemon = await daemon_factory()
    await send(daemon.port, post(subject="Holiday"))
    await send(daemon.port, post("alarm@example.org", subject="Fire"), sender="alarm@example.org")
    await members_got(sink, len(MEMBERS))
    state, reason = posts_by_subject(db)["Holiday"]
    assert state is PostState.HELD
    assert reason.startswith("blackout: ") and f"list window {window_around_today()}" in reason
    assert set(subjects(sink)) == {"[staff] Fire"}


async def test_a_site_wide_blackout_from_the_config_holds_posts(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(db, members_=MEMBERS, senders=[BOSS])
    add(db, "alarm@example.org", role=Role.SENDER, emergency=True)
    daemon = await daemon_factory(policy__blackout=[window_around_today()])
    await send(daemon.port, post(subject="Holiday"))
    await send(daemon.port, post("alarm@example.org", subject="Fire"), sender="alarm@example.org")
    await members_got(sink, len(MEMBERS))
    state, reason = posts_by_subject(db)["Holiday"]
    assert state is PostState.HELD
    assert f"site-wide window {window_around_today()}" in reason
    assert set(subjects(sink)) == {"[staff] Fire"}


async def test_external_links_hold_naming_the_hosts_and_allowlisted_hosts_pass(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(
        db,
        members_=MEMBERS,
        senders=[BOSS],
        external_links="hold",
        link_allowlist="example.org",
    )
    daemon = await daemon_factory()
    html = '<p><a href="https://login.evil.example/">log in</a> <img src="http://pixel.example.net/x"></p>'
    await send(daemon.port, post(subject="Phish", content_type="text/html", body=html))
    await send(daemon.port, post(subject="Docs", body="See https://wiki.example.org/plan"))
    await members_got(sink, len(MEMBERS))
    assert posts_by_subject(db)["Phish"] == (
        PostState.HELD,
        "links to hosts outside the list's allowlist: login.evil.example, pixel.example.net",
    )
    assert set(subjects(sink)) == {"[staff] Docs"}
    with db.reading() as s:
        hold = s.scalars(sa.select(AuditEntry).where(AuditEntry.action == "post.hold")).one()
    assert hold.actor == BOSS
    assert "login.evil.example, pixel.example.net" in hold.detail


async def test_require_authenticated_sender_believes_only_aligned_dkim(
    db: Database, daemon_factory: Any, tmp_path: Path
) -> None:
    """Real signatures, keys served by a DNS server on loopback: the authorized sender's
    signed post goes out; unsigned, tampered or signed by another domain it is held."""
    make_list(db, members_=MEMBERS, senders=[BOSS], require_authenticated_sender="yes")
    key = dkim.generate_key(tmp_path / "senders", "example.org", "s1", bits=1024)
    other = dkim.generate_key(tmp_path / "senders", "elsewhere.example", "s1", bits=1024)
    with DnsServer() as server:
        for k in (key, other):
            server.txt[k.dns_name()] = [k.public_txt()]
        daemon = await daemon_factory(dns__nameservers=[server.address], dns__timeout=2.0)

        def signed(subject: str, by: dkim.SigningKey = key) -> bytes:
            return dkim.Signer(by).sign(post(subject=subject))

        await send(daemon.port, signed("Signed"))
        await send(daemon.port, post(subject="Unsigned"))
        await send(daemon.port, signed("Tampered").replace(b"approved", b"rejected"))
        await send(daemon.port, signed("Other domain", other))
        # a stranger is refused as before, signed or not
        error = await refused(daemon.port, post("x@ext.example", subject="Stranger"))
        assert error.code == 550
    states = posts_by_subject(db)
    assert states["Signed"][0] in (PostState.ACCEPTED, PostState.SENDING, PostState.SENT)
    for subject in ("Unsigned", "Tampered", "Other domain"):
        state, reason = states[subject]
        assert state is PostState.HELD, subject
        assert reason.startswith("sender not authenticated"), (subject, reason)
