"""Subscriptions end to end: mail to the daemon over SMTP, confirmations and welcomes
at the sink, replies to the confirmation address over SMTP."""

from __future__ import annotations

import itertools
from typing import Any

import aiosmtplib
import sqlalchemy as sa
from sink import Received, Sink
from test_e2e import wait_until
from test_moderation import body
from test_moderation_e2e import all_notices_sent, mail_for
from test_subscriptions import (
    ANN,
    BOB,
    CAROL,
    CONFIRM,
    LIST,
    OWNER,
    member_row,
    roles,
    setup_list,
    store,
)

from listserv.db import Database
from listserv.models import InboundMessage, InboundState, Role, Unsubscription

_ids = itertools.count()


async def send(
    port: int, to: str, text: str = "", *, sender: str = CAROL, subject: str = "", headers: str = ""
) -> None:
    extra = "".join(f"{h}\r\n" for h in headers.splitlines() if h)
    data = (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <e2e-{next(_ids)}@example.org>\r\n{extra}\r\n" + text.replace("\n", "\r\n")
    ).encode()
    errors, reply = await aiosmtplib.send(
        data, sender=sender, recipients=[to], hostname="127.0.0.1", port=port, timeout=10
    )
    assert errors == {} and "Stored as" in reply


async def confirmation(sink: Sink, to: str, subject_part: str) -> str:
    received = await mail_for(sink, to, subject_part)
    reply_to = str(received.message()["Reply-To"])
    assert CONFIRM.fullmatch(reply_to), reply_to
    return reply_to


def processed(db: Database) -> bool:
    """Every stored request and reply is read, and every notice is sent."""
    with db.reading() as s:
        waiting = s.scalar(
            sa.select(sa.func.count(InboundMessage.id)).where(
                InboundMessage.state == InboundState.PENDING
            )
        )
    return waiting == 0 and all_notices_sent(db)


def for_(sink: Sink, to: str) -> list[Received]:
    return [r for r in sink.received if to in r.rcpt_tos]


async def test_join_confirm_by_reply_welcome(db: Database, sink: Sink, daemon_factory: Any) -> None:
    setup_list(db)
    daemon = await daemon_factory()
    await send(daemon.port, "staff-join@lists.example.org", "Please let me in.\n")
    reply_to = await confirmation(sink, CAROL, "Confirm your subscription")
    assert Role.MEMBER not in roles(db, CAROL)
    await send(daemon.port, reply_to, "yes\n", subject="Re: Confirm your subscription")
    welcome = await mail_for(sink, CAROL, f"Welcome to {LIST}")
    assert "staff-leave@lists.example.org" in body(welcome.message())
    assert member_row(db, CAROL).source == "subscribe"


async def test_unsubscribe_by_command_with_confirmation(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db)
    daemon = await daemon_factory()
    await send(daemon.port, "staff-request@lists.example.org", "unsubscribe\n", sender=ANN)
    reply_to = await confirmation(sink, ANN, "Confirm that you want to leave")
    assert Role.MEMBER in roles(db, ANN)
    await send(daemon.port, reply_to, "ok\n", sender=ANN)
    await mail_for(sink, ANN, f"You have left {LIST}")
    assert Role.MEMBER not in roles(db, ANN)


async def test_unsubscribe_by_leave_with_confirmation_is_recorded(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db)
    daemon = await daemon_factory()
    await send(daemon.port, "staff-leave@lists.example.org", sender=ANN)
    reply_to = await confirmation(sink, ANN, "Confirm that you want to leave")
    await send(daemon.port, reply_to, "ok\n", sender=ANN)
    await mail_for(sink, ANN, f"You have left {LIST}")
    with db.reading() as s:
        assert s.scalars(sa.select(Unsubscription.via)).one() == "email"


async def test_a_request_stored_before_the_daemon_started_is_answered(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db)
    store(db, "staff-leave@lists.example.org", sender=ANN)  # as intake stored it yesterday
    store(db, "staff-request@lists.example.org", "subscribe\n", sender=BOB)
    await daemon_factory()
    await confirmation(sink, ANN, "Confirm that you want to leave")
    await confirmation(sink, BOB, "Confirm your subscription")


async def test_a_forged_confirmation_address_subscribes_nobody(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db)
    daemon = await daemon_factory()
    await send(daemon.port, "staff-join@lists.example.org")
    real = await confirmation(sink, CAROL, "Confirm your subscription")
    forged = "staff-confirm+" + "q" * 26 + "@lists.example.org"
    await send(daemon.port, forged, "yes\n")
    await mail_for(sink, CAROL, "was not carried out")
    assert Role.MEMBER not in roles(db, CAROL)
    await send(daemon.port, real, "yes\n")
    await mail_for(sink, CAROL, "Welcome")


async def test_an_approve_list_welcomes_after_the_owner_approves(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db, subscription_policy="approve")
    daemon = await daemon_factory()
    await send(daemon.port, "staff-join@lists.example.org")
    await send(daemon.port, await confirmation(sink, CAROL, "Confirm your subscription"), "y\n")
    await mail_for(sink, CAROL, "awaits the owners' approval")
    approval = await confirmation(sink, OWNER, f"{CAROL} asks to join")
    assert Role.MEMBER not in roles(db, CAROL)
    await send(daemon.port, approval, "approve\n", sender=OWNER)
    await mail_for(sink, CAROL, "Welcome")
    assert Role.MEMBER in roles(db, CAROL)


async def test_a_closed_list_and_a_mandatory_list_refuse_politely(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db, subscription_policy="closed", mandatory="true")
    daemon = await daemon_factory()
    await send(daemon.port, "staff-join@lists.example.org")
    await send(daemon.port, "staff-leave@lists.example.org", sender=ANN)
    closed = await mail_for(sink, CAROL, "does not take subscriptions")
    assert "The list is closed" in body(closed.message())
    mandatory = await mail_for(sink, ANN, "You cannot leave")
    assert "The list is mandatory" in body(mandatory.message())
    await wait_until(lambda: processed(db))
    assert Role.MEMBER in roles(db, ANN) and Role.MEMBER not in roles(db, CAROL)


async def test_owners_manage_members_by_mail_and_others_are_refused(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db)
    daemon = await daemon_factory()
    await send(daemon.port, "staff-request@lists.example.org", f"add {BOB}\nwho\n", sender=OWNER)
    await mail_for(sink, BOB, "Welcome")
    answer = body((await mail_for(sink, OWNER, "your request")).message())
    assert "2 members:" in answer and ANN in answer and BOB in answer
    await send(daemon.port, "staff-request@lists.example.org", f"remove {BOB}\n", sender=CAROL)
    refusal = body((await mail_for(sink, CAROL, "your request")).message())
    assert "Refused: only the list's owners" in refusal
    assert Role.MEMBER in roles(db, BOB)
    await send(daemon.port, "staff-request@lists.example.org", f"remove {BOB}\n", sender=OWNER)
    await mail_for(sink, BOB, "You were removed")
    assert Role.MEMBER not in roles(db, BOB)


async def test_the_hourly_limit_and_automatic_mail_get_nothing_at_the_sink(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db)
    daemon = await daemon_factory()
    await send(daemon.port, "staff-join@lists.example.org", headers="Auto-Submitted: auto-replied")
    for i in range(6):
        await send(
            daemon.port,
            "staff-request@lists.example.org",
            f"subscribe {BOB}\n",
            sender=f"x{i}@e.example",
        )
    await wait_until(lambda: processed(db))
    assert len(for_(sink, BOB)) == 5  # confirm.PER_HOUR
    assert for_(sink, CAROL) == []
