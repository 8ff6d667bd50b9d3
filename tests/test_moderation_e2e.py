"""Moderation end to end: the daemon announces a hold, a moderator answers over SMTP,
the sink receives what the decision sends."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import sqlalchemy as sa
from conftest import message
from sink import Received, Sink
from test_e2e import wait_until
from test_moderation import (
    LIST,
    MEMBERS,
    MODERATOR,
    OWNER,
    SENDER,
    body,
    hold_post,
    inbound_state,
    notices_to,
    post_of,
    setup_list,
)

from listserv.db import Database
from listserv.models import Audience, InboundMessage, InboundState, Post, PostState, utcnow
from listserv.moderation import task
from listserv.smtp_in import intake


async def mail_for(sink: Sink, to: str, subject_part: str, timeout: float = 15.0) -> Received:
    """The first message the sink got for `to` whose Subject contains `subject_part`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        for received in sink.received:
            if to in received.rcpt_tos and subject_part in str(received.message()["Subject"]):
                return received
        if loop.time() > deadline:
            subjects = [(r.rcpt_tos, str(r.message()["Subject"])) for r in sink.received]
            raise TimeoutError(f"no {subject_part!r} for {to}; got {subjects}")
        await asyncio.sleep(0.05)


def got(sink: Sink, to: str, subject_part: str) -> list[EmailMessage]:
    return [
        r.message()
        for r in sink.received
        if to in r.rcpt_tos and subject_part in str(r.message()["Subject"])
    ]


async def answer(port: int, to: str, text: str, sender: str = MODERATOR) -> None:
    data = (
        message(
            f"""
        From: {sender}
        To: {to}
        Subject: Re: your notice
        Message-ID: <answer-{abs(hash(text))}@example.org>

        """
        )
        + text.replace("\n", "\r\n").encode()
    )
    errors, reply = await aiosmtplib.send(
        data, sender=sender, recipients=[to], hostname="127.0.0.1", port=port, timeout=10
    )
    assert errors == {} and "Stored as" in reply


def all_notices_sent(db: Database) -> bool:
    with db.reading() as s:
        waiting = s.scalar(
            sa.select(sa.func.count(Post.id)).where(
                Post.audience == Audience.NOTICE, Post.state != PostState.SENT
            )
        )
    return waiting == 0


def state_is(db: Database, post_id: int, state: PostState) -> Any:
    return lambda: post_of(db, post_id).state is state


async def test_a_hold_is_announced_and_an_approve_reply_sends_the_post_to_every_member(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db)
    post_id = hold_post(db, created_at=utcnow(), subject="Party on Friday")
    daemon = await daemon_factory()

    received = await mail_for(sink, MODERATOR, "held for approval")
    notice = received.message()
    assert str(notice["Subject"]) == (
        f"{LIST}: post from {SENDER} held for approval: Party on Friday"
    )
    reply_to = str(notice["Reply-To"])
    assert re.fullmatch(r"staff-confirm\+[a-z2-7]{26}@lists\.example\.org", reply_to)
    text = body(notice)
    assert "is not a member" in text and "Recipients: 2" in text
    assert "approve\n" in text and "reject REASON" in text and "discard" in text
    [attached] = list(notice.iter_attachments())
    assert attached.get_content_type() == "message/rfc822"
    assert "Let me in, please." in attached.as_string()
    await mail_for(sink, OWNER, "held for approval")
    await mail_for(sink, SENDER, "awaits moderator approval")

    await answer(daemon.port, reply_to, "approve\n\nOn Monday listserv wrote:\n> A post waits\n")
    for member in MEMBERS:
        post = await mail_for(sink, member, "[staff] Party on Friday")
        assert "Let me in, please." in body(post.message())
    await mail_for(sink, MODERATOR, "Done: ")
    await mail_for(sink, SENDER, "was approved")
    await wait_until(state_is(db, post_id, PostState.SENT))
    assert post_of(db, post_id).decided_by == MODERATOR


async def test_a_reject_reply_tells_the_sender_the_reason_and_nobody_gets_the_post(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db)
    post_id = hold_post(db, created_at=utcnow(), subject="Buy now")
    daemon = await daemon_factory()
    reply_to = str((await mail_for(sink, MODERATOR, "held for approval")).message()["Reply-To"])
    await answer(daemon.port, reply_to, "reject Advertising is not allowed here.\n")
    rejected = await mail_for(sink, SENDER, "was rejected")
    assert "Advertising is not allowed here." in body(rejected.message())
    await mail_for(sink, MODERATOR, "Done: ")
    await wait_until(lambda: all_notices_sent(db))
    assert post_of(db, post_id).state is PostState.REJECTED
    assert not set(MEMBERS) & set(sink.recipients())


async def test_a_discard_reply_sends_the_post_to_nobody_and_tells_the_sender(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db)
    post_id = hold_post(db, created_at=utcnow(), subject="Spam")
    daemon = await daemon_factory()
    reply_to = str((await mail_for(sink, MODERATOR, "held for approval")).message()["Reply-To"])
    await mail_for(sink, SENDER, "awaits moderator approval")
    await answer(daemon.port, reply_to, "Discard\n")
    await mail_for(sink, MODERATOR, "discarded")
    await wait_until(lambda: all_notices_sent(db))
    assert post_of(db, post_id).state is PostState.DISCARDED
    assert not set(MEMBERS) & set(sink.recipients())
    await mail_for(sink, SENDER, "was not distributed")
    assert [str(m["Subject"]) for m in got(sink, SENDER, "")] == [
        f"Your post to {LIST} awaits moderator approval: Spam",
        f"Your post to {LIST} was not distributed: Spam",
    ]


async def test_approve_at_a_time_ahead_is_not_sent_before_it(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db)
    post_id = hold_post(db, created_at=utcnow(), subject="Later")
    daemon = await daemon_factory()
    reply_to = str((await mail_for(sink, MODERATOR, "held for approval")).message()["Reply-To"])
    at = (utcnow() + timedelta(seconds=3)).replace(microsecond=0)
    await answer(daemon.port, reply_to, f"approve at {at:%Y-%m-%d %H:%M:%S}\n")
    await mail_for(sink, MODERATOR, "Done: ")
    post = post_of(db, post_id)
    assert post.state is PostState.ACCEPTED and post.not_before == at
    for member in MEMBERS:
        await mail_for(sink, member, "[staff] Later")
    post = post_of(db, post_id)
    assert post.queued_at is not None and post.queued_at >= at


async def test_a_forged_token_over_smtp_is_answered_and_changes_nothing(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db)
    post_id = hold_post(db, created_at=utcnow())
    daemon = await daemon_factory()
    await mail_for(sink, MODERATOR, "held for approval")
    forged = "staff-confirm+" + "b" * 26 + "@lists.example.org"
    await answer(daemon.port, forged, "approve\n")
    refusal = await mail_for(sink, MODERATOR, "was not carried out")
    assert "does not belong to any held post" in body(refusal.message())
    assert post_of(db, post_id).state is PostState.HELD


async def test_no_held_notice_reaches_an_auto_submitted_sender(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db)
    hold_post(db, created_at=utcnow(), headers="Auto-Submitted: auto-generated")
    await daemon_factory()
    await mail_for(sink, MODERATOR, "held for approval")
    await wait_until(lambda: all_notices_sent(db))
    assert SENDER not in sink.recipients()


async def test_confirm_mail_stored_before_the_daemon_started_is_processed_when_it_starts(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    setup_list(db)
    post_id = hold_post(db, created_at=utcnow(), subject="While you were away")
    task.run_once(db, now=utcnow())  # announced by a daemon that then stopped
    reply_to = str(notices_to(db, MODERATOR)[0]["Reply-To"])
    outcome = intake.receive(
        db,
        intake.Envelope(
            mail_from=MODERATOR,
            rcpt_tos=(reply_to,),
            content=message(f"From: {MODERATOR}\nTo: {reply_to}\nSubject: approve\n\n\n"),
        ),
    )
    assert outcome.reply.code == 250
    [inbound_id] = outcome.inbound_ids
    assert inbound_state(db, inbound_id) is InboundState.PENDING

    await daemon_factory()
    for member in MEMBERS:
        await mail_for(sink, member, "[staff] While you were away")
    assert inbound_state(db, inbound_id) is InboundState.DONE
    with db.reading() as s:
        kinds = s.scalars(sa.select(InboundMessage.kind).order_by(InboundMessage.id)).all()
    assert kinds == ["post", "confirm"]
    assert post_of(db, post_id).decided_by == MODERATOR


async def test_a_post_held_by_the_rules_is_approved_by_reply_and_reaches_every_member(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    """Nothing made by hand: a stranger's post to a members list is held by the rules
    (nonmember_action hold), announced, approved by a moderator's SMTP reply, sent."""
    setup_list(db)
    daemon = await daemon_factory()
    errors, reply = await aiosmtplib.send(
        message(
            f"""
            From: A Stranger <{SENDER}>
            To: {LIST}
            Subject: May I?
            Message-ID: <may-i@elsewhere.example>

            A question for everyone.
            """
        ),
        sender=SENDER,
        recipients=[LIST],
        hostname="127.0.0.1",
        port=daemon.port,
        timeout=10,
    )
    assert errors == {} and "Queued as" in reply
    post_id = int(reply.rsplit(" ", 1)[1])
    assert post_of(db, post_id).state is PostState.HELD
    notice = (await mail_for(sink, MODERATOR, "held for approval")).message()
    assert "May I?" in str(notice["Subject"]) and SENDER in str(notice["Subject"])
    await mail_for(sink, SENDER, "awaits moderator approval")
    await answer(daemon.port, str(notice["Reply-To"]), "approve\n")
    await sink.wait_for_recipients(len(MEMBERS) + 2, timeout=15)  # + the two notices so far
    await wait_until(lambda: post_of(db, post_id).state is PostState.SENT)
    delivered = [r for r in sink.received if "May I?" in str(r.message()["Subject"])]
    assert sorted(a for r in delivered for a in r.rcpt_tos if a in MEMBERS) == sorted(MEMBERS)
    await mail_for(sink, SENDER, "approved")
    await mail_for(sink, MODERATOR, "approved")
