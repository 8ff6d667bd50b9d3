"""Bounces end to end: a personalized post leaves with a VERP address per copy; the sink
refuses one recipient (a bounce in the SMTP dialogue) and a DSN for another comes back
to its VERP address over SMTP; both are attributed to the right member and post."""

from __future__ import annotations

import re
from typing import Any

import aiosmtplib
import sqlalchemy as sa
from conftest import make_list, message
from sink import Sink
from test_e2e import wait_until

from listserv.db import Database
from listserv.models import BounceEvent, BounceKind, Member, PostingPolicy, Role

LIST = "staff@lists.example.org"
ANN, BOB, CAROL = "ann@example.com", "bob@example.net", "carol@example.org"
VERP = re.compile(r"staff-bounces\+([a-z2-7]{17,29})@lists\.example\.org")


async def send_bounce(port: int, rcpt: str, data: bytes) -> str:
    """Mail from the null sender (MAIL FROM:<>), as every bounce is sent."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as client:
        await client.mail("")
        await client.rcpt(rcpt)
        reply = await client.data(data)
    return reply.message


def bounce_events(db: Database) -> list[BounceEvent]:
    with db.reading() as s:
        return list(s.scalars(sa.select(BounceEvent).order_by(BounceEvent.id)))


def score_of(db: Database, address: str) -> float:
    with db.reading() as s:
        return s.scalars(
            sa.select(Member.bounce_score).where(
                Member.address == address, Member.role == Role.MEMBER
            )
        ).one()


async def test_refusals_and_dsns_to_verp_addresses_are_attributed(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    make_list(
        db,
        LIST,
        policy=PostingPolicy.MEMBERS,
        members_=[ANN, BOB, CAROL],
        delivery_mode="personalized",
    )
    sink.script("RCPT", "550 5.1.1 <ann@example.com>: no such user", match="ann@")
    daemon = await daemon_factory()
    post = message(
        f"""
        From: {CAROL}
        To: {LIST}
        Subject: Meeting
        Message-ID: <meeting-1@example.org>

        Tomorrow at ten.
        """
    )
    await aiosmtplib.send(
        post, sender=CAROL, recipients=[LIST], hostname="127.0.0.1", port=daemon.port
    )
    await sink.wait_for_recipients(2)
    senders = {r.rcpt_tos[0]: r.mail_from for r in sink.received}
    assert set(senders) == {BOB, CAROL}
    tokens = {VERP.fullmatch(s).group(1) for s in senders.values()}  # type: ignore[union-attr]
    assert len(tokens) == 2  # one address per copy

    # the sink's 550 for ann: a permanent bounce from our own delivery
    await wait_until(lambda: len(bounce_events(db)) == 1)
    [refused] = bounce_events(db)
    assert (refused.address, refused.kind, refused.source, refused.status) == (
        ANN,
        BounceKind.PERMANENT,
        "smtp",
        "550",
    )
    assert refused.post_id is not None and "no such user" in refused.detail

    # bob's mailbox forwards elsewhere, and that fails: the DSN names the other address,
    # but it comes back to bob's VERP address, so bob is the one who bounced
    dsn = message(
        f"""
        From: MAILER-DAEMON@mx.example.net
        To: {senders[BOB]}
        Subject: Undelivered Mail Returned to Sender
        MIME-Version: 1.0
        Content-Type: multipart/report; report-type=delivery-status; boundary="xx"

        --xx
        Content-Type: text/plain

        Your message could not be delivered.

        --xx
        Content-Type: message/delivery-status

        Reporting-MTA: dns; mx.example.net

        Final-Recipient: rfc822; robert@elsewhere.example
        Action: failed
        Status: 5.1.1
        Diagnostic-Code: smtp; 550 5.1.1 unknown user

        --xx--
        """
    )
    assert "Stored as" in await send_bounce(daemon.port, senders[BOB], dsn)
    await wait_until(lambda: len(bounce_events(db)) == 2)
    dsn_event = bounce_events(db)[1]
    assert (dsn_event.address, dsn_event.kind, dsn_event.source, dsn_event.status) == (
        BOB,
        BounceKind.PERMANENT,
        "verp",
        "5.1.1",
    )
    assert dsn_event.post_id == refused.post_id and dsn_event.inbound_id is not None
    assert (score_of(db, ANN), score_of(db, BOB), score_of(db, CAROL)) == (1.0, 1.0, 0.0)

    # a forged token: stored, read as unattributed, blames nobody
    forged = senders[CAROL][:20] + ("b" if senders[CAROL][20] == "a" else "a") + senders[CAROL][21:]
    robot = message(
        """
        From: MAILER-DAEMON@mx.example.org
        Subject: failure

        Something failed.
        """
    )
    assert "Stored as" in await send_bounce(daemon.port, forged, robot)
    await sink.wait_for_recipients(3)  # the unrecognized robot mail went to the owner
    assert "owner@example.org" in sink.recipients()
    assert len(bounce_events(db)) == 2 and score_of(db, CAROL) == 0.0
