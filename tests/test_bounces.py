"""Bounce scoring, actions and the processing of stored bounce mail, on real databases
(SQLite, and PostgreSQL when configured), over simulated time: every verb takes `now`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import make_list, message

from listserv import lists, mail, sitesecret
from listserv.bounces import process, score, task, verp
from listserv.db import Database
from listserv.errors import InvalidInput
from listserv.models import (
    Audience,
    BatchState,
    BounceEvent,
    BounceKind,
    Delivery,
    DeliveryBatch,
    DeliveryStatus,
    InboundMessage,
    InboundState,
    Member,
    Post,
    PostingPolicy,
    PostState,
    Role,
    Unsubscription,
)
from listserv.moderation import replies

LIST = "staff@lists.example.org"
BOUNCES = "staff-bounces@lists.example.org"
ANN, BOB = "ann@example.com", "bob@example.com"
OWNER = "owner@example.org"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
CORPUS = Path(__file__).parent / "bounces"
P, T = BounceKind.PERMANENT, BounceKind.TEMPORARY


def setup(db: Database, *extra: str, **settings: str) -> None:
    make_list(db, LIST, policy=PostingPolicy.MEMBERS, members_=[ANN, BOB, *extra], **settings)


def bounce(db: Database, address: str, kind: BounceKind, at: datetime) -> score.Scored | None:
    with db.session() as s:
        return score.register(s, lists.get(s, LIST), address, kind, now=at, source="dsn")


def member(db: Database, address: str) -> Member:
    with db.reading() as s:
        return s.scalars(
            sa.select(Member).where(Member.address == address, Member.role == Role.MEMBER)
        ).one()


def events(db: Database, address: str | None = None) -> list[BounceEvent]:
    with db.reading() as s:
        stmt = sa.select(BounceEvent).order_by(BounceEvent.id)
        if address is not None:
            stmt = stmt.where(BounceEvent.address == address.lower())
        return list(s.scalars(stmt))


def notices(db: Database, to: str) -> list[Post]:
    with db.reading() as s:
        rows = s.scalars(
            sa.select(Post).where(Post.audience == Audience.NOTICE).order_by(Post.id)
        ).all()
    return [p for p in rows if to in (p.notice_to or [])]


def subject(post: Post) -> str:
    """A notice's Subject, unfolded (a long one is folded after the field name)."""
    return " ".join(str(mail.parse(post.prepared or b"")["Subject"]).split())


def store(db: Database, raw: bytes, rcpt: str = BOUNCES, mail_from: str = "") -> int:
    with db.session() as s:
        row = InboundMessage(mail_from=mail_from, rcpt_tos=[rcpt], kind="bounces", raw=raw)
        s.add(row)
        s.flush()
        return row.id


def inbound_state(db: Database, inbound_id: int) -> InboundState:
    with db.reading() as s:
        return s.get_one(InboundMessage, inbound_id).state


# -- scoring --------------------------------------------------------------------------


def test_a_permanent_bounce_counts_once_a_day(db: Database) -> None:
    setup(db)
    assert bounce(db, ANN, P, T0) == score.Scored(ANN, 1.0, 1.0, False)
    assert bounce(db, ANN, P, T0 + timedelta(hours=5)).counted == 0.0  # type: ignore[union-attr]
    assert member(db, ANN).bounce_score == 1.0
    assert bounce(db, ANN, P, T0 + timedelta(days=1)).score == 2.0  # type: ignore[union-attr]
    assert len(events(db, ANN)) == 3  # every bounce is on record, counted or not
    assert member(db, BOB).bounce_score == 0.0


def test_temporary_bounces_add_their_weight_and_weight_0_never_counts(db: Database) -> None:
    setup(db)
    for hour in range(3):
        bounce(db, ANN, T, T0 + timedelta(hours=hour))
    assert member(db, ANN).bounce_score == 1.5
    with db.session() as s:
        lists.set_setting(s, lists.get(s, LIST), "bounce_temporary_weight", "0")
    for day in range(20):
        bounce(db, BOB, T, T0 + timedelta(days=day))
    assert member(db, BOB).bounce_score == 0.0
    assert member(db, BOB).delivery_status is DeliveryStatus.ENABLED


def test_a_bounce_after_the_stale_period_restarts_the_count(db: Database) -> None:
    setup(db)
    for day in range(4):
        bounce(db, ANN, P, T0 + timedelta(days=day))
    assert member(db, ANN).bounce_score == 4.0
    bounce(db, ANN, P, T0 + timedelta(days=3 + 8))  # 8 days later: stale (7)
    assert member(db, ANN).bounce_score == 1.0
    assert member(db, ANN).delivery_status is DeliveryStatus.ENABLED
    bounce(db, ANN, P, T0 + timedelta(days=3 + 8 + 7))  # 7 days later: not stale yet
    assert member(db, ANN).bounce_score == 2.0


def test_settings_are_checked_and_shown(db: Database) -> None:
    setup(db)
    with db.session() as s:
        mlist = lists.get(s, LIST)
        assert lists.settings_of(mlist)["bounce_score_threshold"] == "5"
        assert lists.settings_of(mlist)["bounce_temporary_weight"] == "0.5"
        lists.set_setting(s, mlist, "bounce_score_threshold", "2.5")
        lists.set_setting(s, mlist, "bounce_you_are_disabled_warnings", "0")
        for key, bad in (
            ("bounce_score_threshold", "0"),
            ("bounce_info_stale_after", "0"),
            ("bounce_temporary_weight", "-1"),
            ("bounce_temporary_weight", "nan"),
            ("bounce_you_are_disabled_warnings_interval", "x"),
        ):
            with pytest.raises(InvalidInput):
                lists.set_setting(s, mlist, key, bad)
    with db.reading() as s:
        mlist = lists.get(s, LIST)
        assert (mlist.bounce_score_threshold, mlist.bounce_you_are_disabled_warnings) == (2.5, 0)


def disabled_timeline(db: Database) -> datetime:
    """ANN reaches the threshold (5) on the fifth day; returns that time."""
    for day in range(5):
        scored = bounce(db, ANN, P, T0 + timedelta(days=day))
    assert scored is not None and scored.disabled
    return T0 + timedelta(days=4)


def test_reaching_the_threshold_disables_and_tells_the_member_and_the_owners(
    db: Database,
) -> None:
    setup(db)
    for day in range(4):
        assert not bounce(db, ANN, P, T0 + timedelta(days=day)).disabled  # type: ignore[union-attr]
    assert member(db, ANN).delivery_status is DeliveryStatus.ENABLED
    disabled_timeline_end = T0 + timedelta(days=4)
    assert bounce(db, ANN, P, disabled_timeline_end).disabled  # type: ignore[union-attr]
    ann = member(db, ANN)
    assert (ann.delivery_status, ann.disabled_reason) == (DeliveryStatus.DISABLED, "bounce")
    assert (ann.bounce_warnings_sent, ann.last_warning_at) == (1, disabled_timeline_end)
    [told] = notices(db, ANN)
    msg = mail.parse(told.prepared or b"")
    assert re.fullmatch(r"staff-confirm\+[a-z2-7]{26}@lists\.example\.org", str(msg["Reply-To"]))
    assert "reply to this message" in msg.get_content()  # type: ignore[attr-defined]
    assert "2026-11-27" in msg.get_content()  # type: ignore[attr-defined]  # removal: 3 x 7 days
    [owners] = notices(db, OWNER)
    assert subject(owners).startswith(f"{ANN}: delivery")
    # a disabled member gets no more posts
    with db.reading() as s:
        from listserv.distribute import posts

        assert ANN not in list(posts.recipient_stream(s, lists.get(s, LIST).id))


def test_warnings_at_the_interval_then_unsubscribed_and_owners_told(db: Database) -> None:
    setup(db)
    start = disabled_timeline(db)
    assert task.run_once(db, now=start + timedelta(days=6, hours=23)) == 0  # not yet
    assert task.run_once(db, now=start + timedelta(days=7)) == 1  # warning 2
    assert task.run_once(db, now=start + timedelta(days=7, hours=1)) == 0
    assert task.run_once(db, now=start + timedelta(days=14)) == 1  # warning 3
    assert member(db, ANN).bounce_warnings_sent == 3
    assert len(notices(db, ANN)) == 3
    assert task.run_once(db, now=start + timedelta(days=20)) == 0
    assert task.run_once(db, now=start + timedelta(days=21)) == 1  # unsubscribed
    with db.reading() as s:
        assert s.scalar(sa.select(Member).where(Member.address == ANN)) is None
        gone = s.scalars(sa.select(Unsubscription)).one()
        assert (gone.address, gone.via) == (ANN, "bounce")
    subjects = [subject(p) for p in notices(db, OWNER)]
    assert subjects == [
        f"{ANN}: delivery from {LIST} disabled for bounces",
        f"{ANN} unsubscribed from {LIST} for bounces",
    ]
    assert len(notices(db, ANN)) == 3  # nothing more to the member
    assert member(db, BOB).delivery_status is DeliveryStatus.ENABLED


def test_with_no_warnings_the_member_is_unsubscribed_at_the_threshold(db: Database) -> None:
    setup(db, bounce_you_are_disabled_warnings="0", bounce_score_threshold="1")
    bounce(db, ANN, P, T0)
    with db.reading() as s:
        assert s.scalar(sa.select(Member).where(Member.address == ANN)) is None
    assert notices(db, ANN) == []


def reply_token(db: Database, address: str) -> str:
    told = notices(db, address)[-1]
    reply_to = str(mail.parse(told.prepared or b"")["Reply-To"])
    return reply_to.partition("+")[2].partition("@")[0]


def store_reply(db: Database, token: str, sender: str = ANN) -> int:
    raw = message(
        f"""
        From: {sender}
        To: staff-confirm+{token}@lists.example.org
        Subject: Re: Mail from {LIST} is stopped

        please turn it back on
        """
    )
    with db.session() as s:
        row = InboundMessage(
            mail_from=sender,
            rcpt_tos=[f"staff-confirm+{token}@lists.example.org"],
            kind="confirm",
            raw=raw,
        )
        s.add(row)
        s.flush()
        return row.id


def test_a_reply_to_the_notice_turns_delivery_back_on_once(db: Database) -> None:
    setup(db)
    start = disabled_timeline(db)
    token = reply_token(db, ANN)
    store_reply(db, token.upper())  # a relay upper-cased it
    replies.process_pending(db, now=start + timedelta(days=1))
    ann = member(db, ANN)
    assert (ann.delivery_status, ann.disabled_reason) == (DeliveryStatus.ENABLED, "")
    assert (ann.bounce_score, ann.bounce_warnings_sent) == (0.0, 0)
    subjects = [subject(p) for p in notices(db, ANN)]
    assert subjects[-1] == f"Mail from {LIST} to {ANN} is on again"
    # the same token again: refused, nothing changes
    store_reply(db, token)
    replies.process_pending(db, now=start + timedelta(days=2))
    last = mail.parse(notices(db, ANN)[-1].prepared or b"")
    assert "was not carried out" in subject(notices(db, ANN)[-1])
    assert "used already" in last.get_content()  # type: ignore[attr-defined]
    # and no warning or removal follows
    assert task.run_once(db, now=start + timedelta(days=60)) == 0
    assert member(db, ANN).delivery_status is DeliveryStatus.ENABLED


def test_an_expired_reenable_token_changes_nothing(db: Database) -> None:
    setup(db)
    start = disabled_timeline(db)
    token = reply_token(db, ANN)
    store_reply(db, token)
    replies.process_pending(db, now=start + timedelta(days=22))
    assert member(db, ANN).delivery_status is DeliveryStatus.DISABLED
    assert "expired" in mail.parse(notices(db, ANN)[-1].prepared or b"").get_content()  # type: ignore[attr-defined]


def test_reset_clears_the_score_and_turns_delivery_back_on(db: Database) -> None:
    setup(db)
    disabled_timeline(db)
    with db.session() as s:
        score.reset(s, lists.get(s, LIST), ANN.upper(), actor="cli", action="bounces.reset")
    ann = member(db, ANN)
    assert (ann.delivery_status, ann.bounce_score, ann.last_bounce_at) == (
        DeliveryStatus.ENABLED,
        0.0,
        None,
    )


def test_a_bounce_of_an_address_that_is_no_member_is_dropped(db: Database) -> None:
    setup(db)
    assert bounce(db, "stranger@example.com", P, T0) is None
    with db.session() as s:  # an owner is no member either
        assert score.register(s, lists.get(s, LIST), OWNER, P, now=T0, source="dsn") is None
    assert events(db) == []


# -- stored bounce mail ---------------------------------------------------------------


def sample(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def test_a_stored_dsn_scores_the_member_it_names_and_finds_the_post(db: Database) -> None:
    setup(db, "gone@example.com")
    with db.session() as s:
        post = Post(
            list_id=lists.get(s, LIST).id,
            state=PostState.SENT,
            sender="alice@example.net",
            message_id="<post-1@example.net>",
        )
        s.add(post)
        s.flush()
        post_id = post.id
    inbound_id = store(db, sample("rfc3464_failed.eml"))
    assert task.run_once(db, now=T0) == 1
    [event] = events(db)
    assert (event.address, event.kind, event.source, event.status) == (
        "gone@example.com",
        P,
        "dsn",
        "5.1.1",
    )
    assert (event.post_id, event.inbound_id) == (post_id, inbound_id)
    assert "User unknown" in event.detail
    assert inbound_state(db, inbound_id) is InboundState.DONE
    assert task.run_once(db, now=T0) == 0  # processed once


def test_stored_bounces_naming_nobody_on_the_list_are_dropped(db: Database) -> None:
    setup(db)
    inbound_id = store(db, sample("qmail.eml"))
    task.run_once(db, now=T0)
    assert events(db) == []
    assert inbound_state(db, inbound_id) is InboundState.DONE


def test_a_delay_dsn_is_a_temporary_bounce(db: Database) -> None:
    setup(db, "slow.user@example.net")
    store(db, sample("rfc3464_delayed.eml"))
    task.run_once(db, now=T0)
    [event] = events(db)
    assert (event.address, event.kind) == ("slow.user@example.net", T)
    assert member(db, "slow.user@example.net").bounce_score == 0.5


def owner_posts(db: Database) -> list[Post]:
    with db.reading() as s:
        return list(s.scalars(sa.select(Post).where(Post.audience == Audience.OWNERS)))


def test_a_person_writing_to_the_bounce_address_reaches_the_owners(db: Database) -> None:
    setup(db)
    inbound_id = store(db, sample("human_reply.eml"), mail_from="frank@example.org")
    assert task.run_once(db, now=T0) == 1
    [post] = owner_posts(db)
    assert (post.inbound_id, post.state, post.sender) == (
        inbound_id,
        PostState.ACCEPTED,
        "frank@example.org",
    )
    assert events(db) == []


@pytest.mark.parametrize(
    "name", ["vacation.eml", "vacation_no_headers.eml", "rfc3464_delivered.eml"]
)
def test_vacation_replies_and_success_dsns_are_dropped(db: Database, name: str) -> None:
    setup(db)
    inbound_id = store(db, sample(name), mail_from="bob@example.com")
    task.run_once(db, now=T0)
    assert owner_posts(db) == [] and events(db) == []
    assert inbound_state(db, inbound_id) is InboundState.DONE


def delivery_for(db: Database, address: str, list_address: str = LIST) -> tuple[int, int]:
    """A sent post of the list with one delivery to `address`: (post id, delivery id)."""
    with db.session() as s:
        mlist = lists.get(s, list_address)
        post = Post(list_id=mlist.id, state=PostState.SENT, sender="alice@example.net")
        s.add(post)
        s.flush()
        batch = DeliveryBatch(post_id=post.id, domain="example.com", state=BatchState.DONE)
        s.add(batch)
        s.flush()
        row = Delivery(batch_id=batch.id, post_id=post.id, address=address)
        s.add(row)
        s.flush()
        return post.id, row.id


def verp_address(db: Database, delivery_id: int, base: str = BOUNCES) -> str:
    with db.session() as s:
        key = sitesecret.get(s, sitesecret.VERP)
    return verp.envelope(key, base, delivery_id)


ROBOT = message(
    """
    From: MAILER-DAEMON@mx.example.com
    Subject: Returned mail

    Something went wrong with a message you sent.
    """
)


def test_a_verp_bounce_is_attributed_by_its_token_whatever_it_says(db: Database) -> None:
    setup(db)
    post_id, delivery_id = delivery_for(db, ANN)
    # a bounce in no format anyone knows, from a mail system, to ANN's VERP address
    inbound_id = store(db, ROBOT, rcpt=verp_address(db, delivery_id).upper())
    task.run_once(db, now=T0)
    [event] = events(db)
    assert (event.address, event.kind, event.source) == (ANN, P, "verp")
    assert (event.post_id, event.inbound_id) == (post_id, inbound_id)


def test_a_verp_delay_dsn_is_temporary_and_a_verp_vacation_is_no_bounce(db: Database) -> None:
    setup(db)
    _, delivery_id = delivery_for(db, ANN)
    store(db, sample("rfc3464_delayed.eml"), rcpt=verp_address(db, delivery_id))
    store(db, sample("vacation.eml"), rcpt=verp_address(db, delivery_id), mail_from=ANN)
    task.run_once(db, now=T0)
    [event] = events(db)
    assert (event.address, event.kind, event.source, event.status) == (ANN, T, "verp", "4.4.1")


def test_forged_verp_tokens_are_read_as_unattributed_bounces(db: Database) -> None:
    setup(db)
    make_list(db, "other@lists.example.org", members_=[ANN])
    _, ann_delivery = delivery_for(db, ANN)
    _, other_delivery = delivery_for(db, ANN, "other@lists.example.org")
    good = verp_address(db, ann_delivery)
    local, _, domain = good.partition("@")
    forged = f"{local[:-1]}{'b' if local[-1] == 'a' else 'a'}@{domain}"
    garbled = f"staff-bounces+not-a-token@{domain}"
    # another list's valid token, put on this list's bounce address
    moved = (
        "staff-bounces+"
        + verp_address(db, other_delivery, "other-bounces@lists.example.org").partition("+")[2]
    )
    for rcpt in (forged, garbled, moved):
        store(db, ROBOT, rcpt=rcpt)  # names nobody: nothing may be blamed on ANN
    dsn_for_bob = sample("rfc3464_failed.eml").replace(b"gone@example.com", BOB.encode())
    store(db, dsn_for_bob, rcpt=forged)
    task.run_once(db, now=T0)
    assert [(e.address, e.source) for e in events(db)] == [(BOB, "dsn")]
    assert len(owner_posts(db)) == 3  # the robot's unrecognized mail went to the owners


def test_a_bounce_to_a_deleted_list_is_marked_failed(db: Database) -> None:
    setup(db)
    inbound_id = store(db, sample("qmail.eml"), rcpt="gone-bounces@lists.example.org")
    process.process_pending(db, now=T0)
    assert inbound_state(db, inbound_id) is InboundState.FAILED
