"""Holds and moderation on a real database: tokens, announcing, replies, expiry, reminders.

Time is passed explicitly (`now`), so expiry and reminders are tested without a clock.
The mail the server would send is read back from the queued notices (their stored bytes).
"""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import make_list, message
from dnsserver import DnsServer

from listserv import lists, mail, members, tokens
from listserv.config import AuthSettings, DnsSettings
from listserv.db import Database
from listserv.distribute import dkim, posts
from listserv.dns import Resolver
from listserv.models import (
    Audience,
    AuditEntry,
    InboundMessage,
    InboundState,
    Post,
    PostingPolicy,
    PostState,
    Role,
    Token,
    TokenKind,
)
from listserv.moderation import holds, replies, task, verdicts
from listserv.moderation.verdicts import Verb, Verdict
from listserv.pipeline.auth import Authenticator

LIST = "staff@lists.example.org"
OWNER = "owner@example.org"
MODERATOR = "mod@example.org"
SENDER = "stranger@elsewhere.example"
MEMBERS = ["ann@one.example", "bob@two.example"]
T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


# -- helpers (the e2e and CLI tests use them too) ----------------------------


def setup_list(db: Database, **settings: str) -> str:
    """A members list with two members, an owner and a moderator."""
    address = make_list(db, LIST, policy=PostingPolicy.MEMBERS, members_=MEMBERS, **settings)
    with db.session() as s:
        members.add(s, lists.get(s, address), [MODERATOR], role=Role.MODERATOR)
    return address


def hold_post(
    db: Database,
    address: str = LIST,
    *,
    sender: str = SENDER,
    subject: str = "Hello",
    reason: str = "stranger@elsewhere.example is not a member",
    created_at: datetime = T0,
    headers: str = "",
    mail_from: str | None = None,
) -> int:
    """A held post as intake stores it: the raw mail (kind post) and a held post row."""
    extra = f"{headers}\n" if headers else ""
    raw = (
        message(
            f"""
        From: Stranger <{sender}>
        To: {address}
        Subject: {subject}
        Message-ID: <held-{subject.replace(" ", "-")}@elsewhere.example>
        Date: Mon, 23 Nov 2026 10:00:00 +0000
        MIME-Version: 1.0
        Content-Type: text/plain; charset=utf-8
        """
        ).rstrip(b"\r\n")
        + b"\r\n"
        + extra.replace("\n", "\r\n").encode()
        + b"\r\nLet me in, please.\r\n"
    )
    with db.session() as s:
        mlist = lists.get(s, address)
        inbound = InboundMessage(
            mail_from=sender if mail_from is None else mail_from,
            rcpt_tos=[mlist.address],
            kind="post",
            state=InboundState.DONE,
            peer="127.0.0.1",
            raw=raw,
            received_at=created_at,
        )
        s.add(inbound)
        s.flush()
        post = Post(
            list_id=mlist.id,
            inbound_id=inbound.id,
            state=PostState.HELD,
            reason=reason,
            sender=sender,
            subject=subject,
            message_id=f"<held-{subject}@elsewhere.example>",
            created_at=created_at,
        )
        s.add(post)
        s.flush()
        return post.id


def notices_to(db: Database, address: str) -> list[EmailMessage]:
    """The notices queued for an address, oldest first, parsed from their stored bytes."""
    with db.reading() as s:
        rows = s.scalars(
            sa.select(Post).where(Post.audience == Audience.NOTICE).order_by(Post.id)
        ).all()
    return [mail.parse(p.prepared or b"") for p in rows if address in (p.notice_to or [])]


def reply_address(db: Database, moderator: str = MODERATOR, index: int = -1) -> str:
    """The Reply-To of the hold notice a moderator got."""
    held = [m for m in notices_to(db, moderator) if "held for approval" in str(m["Subject"])]
    return str(held[index]["Reply-To"])


def store_reply(
    db: Database,
    to: str,
    text: str,
    *,
    sender: str = MODERATOR,
    subject: str = "Re: held post",
    headers: str = "",
    signer: dkim.Signer | None = None,
) -> int:
    """Confirm mail as intake stores it: kind confirm, pending, the original address."""
    extra = f"{headers}\n" if headers else ""
    raw = (
        message(
            f"""
        From: {sender}
        To: {to}
        Subject: {subject}
        Message-ID: <reply-{threading.get_ident()}-{len(text)}@example.org>
        """
        ).rstrip(b"\r\n")
        + b"\r\n"
        + extra.replace("\n", "\r\n").encode()
        + b"\r\n"
        + text.replace("\n", "\r\n").encode()
    )
    if signer is not None:
        raw = signer.sign(raw)
    with db.session() as s:
        inbound = InboundMessage(
            mail_from=sender, rcpt_tos=[to], kind="confirm", state=InboundState.PENDING, raw=raw
        )
        s.add(inbound)
        s.flush()
        return inbound.id


def post_of(db: Database, post_id: int) -> Post:
    with db.reading() as s:
        post = s.get(Post, post_id)
        assert post is not None
        return post


def inbound_state(db: Database, inbound_id: int) -> InboundState:
    with db.reading() as s:
        row = s.get(InboundMessage, inbound_id)
        assert row is not None
        return row.state


def body(msg: EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def announced(db: Database, now: datetime = T0) -> int:
    return task.run_once(db, now=now)


# -- tokens ------------------------------------------------------------------


def test_a_token_is_128_random_bits_and_only_its_digest_is_stored(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    with db.session() as s:
        raw = tokens.issue(
            s, kind=TokenKind.MODERATION, list_id=1, post_id=post_id, expires_at=T0 + timedelta(1)
        )
    assert re.fullmatch(r"[a-z2-7]{26}", raw)  # 130 bits of base32 carry the 128
    with db.reading() as s:
        row = s.scalars(sa.select(Token)).one()
        assert row.digest == tokens.digest(raw) and raw not in row.digest
        assert tokens.look_up(s, raw) is not None
        assert tokens.look_up(s, raw.upper()) is not None  # a relay changed the case
        assert tokens.look_up(s, raw[:-1] + ("a" if raw[-1] != "a" else "b")) is None
    with db.session() as s:
        assert tokens.consume(s, row.id, now=T0)
    with db.session() as s:
        assert not tokens.consume(s, row.id, now=T0)  # single use


def test_an_expired_token_cannot_be_consumed(db: Database) -> None:
    setup_list(db)
    with db.session() as s:
        raw = tokens.issue(s, kind=TokenKind.MODERATION, list_id=1, expires_at=T0)
        token = tokens.look_up(s, raw)
        assert token is not None
        assert tokens.is_expired(token, T0)
        assert not tokens.consume(s, token.id, now=T0)


def test_two_racing_consumers_of_one_token_exactly_one_wins(db: Database) -> None:
    setup_list(db)
    with db.session() as s:
        raw = tokens.issue(s, kind=TokenKind.MODERATION, list_id=1, expires_at=T0 + timedelta(1))
        token = tokens.look_up(s, raw)
        assert token is not None
        token_id = token.id
    barrier = threading.Barrier(4)
    results: list[bool] = []

    def consume() -> None:
        barrier.wait()
        with db.session() as s:
            results.append(tokens.consume(s, token_id, now=T0))

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [False, False, False, True]


# -- verdicts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("approve", Verdict(Verb.APPROVE)),
        ("  Approve. ", Verdict(Verb.APPROVE)),
        ("APPROVED", Verdict(Verb.APPROVE)),
        (
            "approve at 2026-12-01 09:00",
            Verdict(Verb.APPROVE, at=datetime(2026, 12, 1, 9, 0, tzinfo=UTC)),
        ),
        (
            "approve at 2026-12-01T09:00+02:00",
            Verdict(Verb.APPROVE, at=datetime(2026, 12, 1, 7, 0, tzinfo=UTC)),
        ),
        (
            "approve at 2026-12-01 09:00 UTC",
            Verdict(Verb.APPROVE, at=datetime(2026, 12, 1, 9, 0, tzinfo=UTC)),
        ),
        ("reject", Verdict(Verb.REJECT)),
        ("reject Off  topic here", Verdict(Verb.REJECT, reason="Off topic here")),
        ("Reject: spam", Verdict(Verb.REJECT, reason="spam")),
        ("Reject.", Verdict(Verb.REJECT)),
        ("reject Not here.", Verdict(Verb.REJECT, reason="Not here.")),
        ("discard", Verdict(Verb.DISCARD)),
        ("I approve of this", None),
        ("approvee", None),
        ("", None),
    ],
)
def test_a_line_states_a_verdict_or_none(line: str, expected: Verdict | None) -> None:
    assert verdicts.parse(line) == expected


def test_a_bad_time_is_an_error_that_names_the_format() -> None:
    with pytest.raises(Exception, match="YYYY-MM-DD HH:MM"):
        verdicts.parse("approve at next tuesday")


def _reply(text: str, subject: str = "Re: x", ctype: str = "text/plain") -> EmailMessage:
    return mail.parse(
        message(f"From: a@example.org\nSubject: {subject}\nContent-Type: {ctype}\n\n")
        + text.replace("\n", "\r\n").encode()
    )


def test_the_first_own_line_wins_over_the_quote() -> None:
    msg = _reply("reject not for this list\n\nOn Mon, Ann wrote:\n> approve\n> the post\n")
    assert verdicts.read(msg) == Verdict(Verb.REJECT, reason="not for this list")


def test_a_reply_below_the_quote_is_read_too() -> None:
    msg = _reply("On Mon, 23 Nov 2026, listserv wrote:\n> reject\n> A post waits\n\ndiscard\n")
    assert verdicts.read(msg) == Verdict(Verb.DISCARD)


def test_the_subject_counts_when_the_body_says_nothing() -> None:
    assert verdicts.read(_reply("\n\n> quoted\n", subject="Re: AW: approve")) == Verdict(
        Verb.APPROVE
    )
    assert verdicts.read(_reply("thanks!\n", subject="Re: post held")) is None


def test_an_html_only_reply_is_read_without_its_blockquote() -> None:
    msg = _reply(
        "<html><body><div>Discard</div><blockquote>approve</blockquote></body></html>",
        ctype="text/html",
    )
    assert verdicts.read(msg) == Verdict(Verb.DISCARD)


# -- announcing --------------------------------------------------------------


def test_a_held_post_is_announced_once_to_each_moderator_and_owner_and_its_sender(
    db: Database,
) -> None:
    setup_list(db)
    post_id = hold_post(db, subject="Party on Friday")
    announced(db)
    announced(db, T0 + timedelta(minutes=5))  # nothing new the second time
    for moderator in (MODERATOR, OWNER):
        [notice] = notices_to(db, moderator)
        subject = str(notice["Subject"])
        assert LIST in subject and SENDER in subject and "Party on Friday" in subject
        assert re.fullmatch(r"staff-confirm\+[a-z2-7]{26}@lists\.example\.org", notice["Reply-To"])
        text = body(notice)
        assert "stranger@elsewhere.example is not a member" in text  # the reason
        assert re.search(r"Size:\s+\d+ bytes", text)
        assert re.search(r"Recipients: 2 ", text)
        assert "approve at YYYY-MM-DD HH:MM" in text and "reject REASON" in text
        assert "discarded on 2026-12-07 10:00 UTC" in text  # 14 days
        [attached] = [p for p in notice.iter_attachments()]
        assert attached.get_content_type() == "message/rfc822"
        assert "Let me in, please." in attached.as_string()
    assert reply_address(db, MODERATOR) == reply_address(db, OWNER)
    [told] = notices_to(db, SENDER)
    assert "awaits moderator approval" in str(told["Subject"])
    assert told["In-Reply-To"] == "<held-Party-on-Friday@elsewhere.example>"
    assert post_of(db, post_id).state is PostState.HELD
    with db.reading() as s:
        assert s.scalar(sa.select(sa.func.count(Token.id))) == 1


@pytest.mark.parametrize(
    ("headers", "mail_from"),
    [
        ("Auto-Submitted: auto-replied", None),
        ("Precedence: bulk", None),
        ("", ""),  # empty envelope sender: a bounce
    ],
)
def test_no_held_notice_goes_to_automatic_senders(
    db: Database, headers: str, mail_from: str | None
) -> None:
    setup_list(db)
    hold_post(db, headers=headers, mail_from=mail_from)
    announced(db)
    assert notices_to(db, SENDER) == []
    assert len(notices_to(db, MODERATOR)) == 1  # the moderators still hear of it


# -- decisions by reply ------------------------------------------------------


def test_an_approve_reply_accepts_the_post_and_tells_everyone(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    inbound = store_reply(db, reply_address(db), "Approve\n\n> A post to staff waits\n")
    announced(db, T0 + timedelta(hours=1))
    post = post_of(db, post_id)
    assert post.state is PostState.ACCEPTED and post.not_before is None
    assert post.decided_by == MODERATOR and post.decided_at == T0 + timedelta(hours=1)
    assert inbound_state(db, inbound) is InboundState.DONE
    with db.reading() as s:
        assert post_id in posts.accepted_posts(s, now=T0 + timedelta(hours=1))
        entry = s.scalars(sa.select(AuditEntry).where(AuditEntry.action == "post.approve")).one()
    assert entry.actor == MODERATOR and f"post {post_id}" in entry.detail
    done = notices_to(db, MODERATOR)[-1]
    assert str(done["Subject"]).startswith("Done: ") and "approved" in str(done["Subject"])
    approved = notices_to(db, SENDER)[-1]
    assert "was approved" in str(approved["Subject"]) and "goes out" in body(approved)


def test_a_reject_reply_rejects_and_tells_the_sender_the_reason(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    store_reply(db, reply_address(db, OWNER), "reject Please ask the office first.\n", sender=OWNER)
    announced(db, T0 + timedelta(hours=1))
    post = post_of(db, post_id)
    assert post.state is PostState.REJECTED and post.decided_by == OWNER
    assert post.finished_at == T0 + timedelta(hours=1)
    rejected = notices_to(db, SENDER)[-1]
    assert "was rejected" in str(rejected["Subject"])
    assert "Please ask the office first" in body(rejected)
    with db.reading() as s:
        assert post_id not in posts.accepted_posts(s, now=T0 + timedelta(days=1))


def test_a_discard_reply_discards_and_tells_the_sender(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    store_reply(db, reply_address(db), "discard\n")
    announced(db, T0 + timedelta(hours=1))
    assert post_of(db, post_id).state is PostState.DISCARDED
    told = notices_to(db, SENDER)
    assert len(told) == 2  # "awaits approval", then the outcome
    assert "was not distributed" in str(told[-1]["Subject"])
    assert "discarded" in str(notices_to(db, MODERATOR)[-1]["Subject"])


def test_approve_at_a_later_time_is_not_queued_before_it(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    store_reply(db, reply_address(db), "approve at 2026-11-25 09:30\n")
    announced(db, T0 + timedelta(hours=1))
    post = post_of(db, post_id)
    assert post.state is PostState.ACCEPTED
    assert post.not_before == datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
    with db.reading() as s:
        assert post_id not in posts.accepted_posts(s, now=datetime(2026, 11, 25, 9, 29, tzinfo=UTC))
        assert post_id in posts.accepted_posts(s, now=datetime(2026, 11, 25, 9, 30, tzinfo=UTC))
    assert "at 2026-11-25 09:30 UTC" in body(notices_to(db, SENDER)[-1])


def test_approve_at_a_past_time_means_now(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    store_reply(db, reply_address(db), "approve at 2020-01-01 00:00\n")
    announced(db, T0 + timedelta(hours=1))
    post = post_of(db, post_id)
    assert post.state is PostState.ACCEPTED and post.not_before is None


def test_the_reply_on_top_of_a_quoted_approve_decides(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    store_reply(db, reply_address(db), "reject wrong list\n\nOn Mon, staff wrote:\n> approve\n")
    announced(db, T0 + timedelta(hours=1))
    assert post_of(db, post_id).state is PostState.REJECTED
    assert "wrong list" in body(notices_to(db, SENDER)[-1])


def _refusal(db: Database, to: str = MODERATOR) -> str:
    last = notices_to(db, to)[-1]
    assert "was not carried out" in str(last["Subject"])
    return body(last)


def test_a_forged_token_changes_nothing_and_is_answered(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    forged = "staff-confirm+" + "a" * 26 + "@lists.example.org"
    inbound = store_reply(db, forged, "approve\n")
    announced(db, T0 + timedelta(hours=1))
    assert post_of(db, post_id).state is PostState.HELD
    assert inbound_state(db, inbound) is InboundState.DONE
    assert "does not belong to any held post" in _refusal(db)


def test_a_reused_token_changes_nothing(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    address = reply_address(db)
    store_reply(db, address, "approve\n")
    announced(db, T0 + timedelta(hours=1))
    store_reply(db, address, "reject changed my mind\n", sender=OWNER)
    announced(db, T0 + timedelta(hours=2))
    post = post_of(db, post_id)
    assert post.state is PostState.ACCEPTED and post.decided_by == MODERATOR
    assert f"post {post_id} is not held: it is accepted" in _refusal(db, OWNER)


def test_an_expired_token_changes_nothing(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    store_reply(db, reply_address(db), "approve\n")
    # the reply is read after the hold's 14 days, before expiry ran
    replies.process_pending(db, now=T0 + timedelta(days=15))
    assert post_of(db, post_id).state is PostState.HELD
    assert "expired" in _refusal(db)
    with db.reading() as s:
        assert s.scalars(sa.select(Token.used_at)).one() is None


def test_a_reply_from_a_non_moderator_changes_nothing_and_the_token_still_works(
    db: Database,
) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    address = reply_address(db)
    store_reply(db, address, "approve\n", sender=MEMBERS[0])
    announced(db, T0 + timedelta(hours=1))
    assert post_of(db, post_id).state is PostState.HELD
    assert "ann@one.example is not a moderator or owner" in _refusal(db, MEMBERS[0])
    store_reply(db, address, "approve\n")
    announced(db, T0 + timedelta(hours=2))
    assert post_of(db, post_id).state is PostState.ACCEPTED


def test_an_unreadable_reply_changes_nothing_and_explains(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    store_reply(db, reply_address(db), "Looks fine to me, I guess?\n")
    announced(db, T0 + timedelta(hours=1))
    assert post_of(db, post_id).state is PostState.HELD
    text = _refusal(db)
    assert "no decision found" in text and "Looks fine to me" in text


def test_an_automatic_reply_decides_nothing_and_gets_no_answer(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    before = len(notices_to(db, MODERATOR))
    inbound = store_reply(
        db, reply_address(db), "approve\n", headers="Auto-Submitted: auto-replied"
    )
    announced(db, T0 + timedelta(hours=1))
    assert post_of(db, post_id).state is PostState.HELD
    assert len(notices_to(db, MODERATOR)) == before
    assert inbound_state(db, inbound) is InboundState.DONE


def test_a_list_requiring_authentication_refuses_unauthenticated_replies(db: Database) -> None:
    setup_list(db)
    with db.session() as s:
        lists.get(s, LIST).require_authenticated_sender = True
    post_id = hold_post(db)
    announced(db)
    store_reply(db, reply_address(db), "approve\n")
    announced(db, T0 + timedelta(hours=1))
    assert post_of(db, post_id).state is PostState.HELD
    assert "authenticated" in _refusal(db)


def test_a_list_requiring_authentication_takes_a_dkim_signed_reply(
    db: Database, tmp_path: Path
) -> None:
    setup_list(db)
    with db.session() as s:
        lists.get(s, LIST).require_authenticated_sender = True
    key = dkim.generate_key(tmp_path / "keys", "example.org", "s1", bits=1024)
    post_id = hold_post(db)
    announced(db)
    with DnsServer() as server:
        server.txt[key.dns_name()] = [key.public_txt()]
        authenticator = Authenticator(
            AuthSettings(), Resolver(DnsSettings(nameservers=(server.address,), timeout=2.0))
        )
        forged = store_reply(db, reply_address(db), "discard\n")  # unsigned: refused
        task.run_once(db, now=T0 + timedelta(minutes=1), authenticator=authenticator)
        assert post_of(db, post_id).state is PostState.HELD
        assert inbound_state(db, forged) is InboundState.DONE
        store_reply(db, reply_address(db), "approve\n", signer=dkim.Signer(key))
        task.run_once(db, now=T0 + timedelta(minutes=2), authenticator=authenticator)
    assert post_of(db, post_id).state is PostState.ACCEPTED


def test_confirm_mail_for_a_deleted_list_is_marked_failed(db: Database) -> None:
    setup_list(db)
    hold_post(db)
    announced(db)
    inbound = store_reply(db, reply_address(db), "approve\n")
    with db.session() as s:
        lists.delete(s, lists.get(s, LIST), force=True)
    announced(db, T0 + timedelta(hours=1))
    assert inbound_state(db, inbound) is InboundState.FAILED


def test_a_reply_after_a_cli_decision_says_who_decided(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    with db.session() as s:
        holds.decide(s, post_id, Verdict(Verb.DISCARD), actor="cli", now=T0)
    store_reply(db, reply_address(db), "approve\n")
    announced(db, T0 + timedelta(hours=1))
    assert post_of(db, post_id).state is PostState.DISCARDED
    assert "decided by cli" in _refusal(db)


def test_deciding_twice_fails_with_not_held(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    with db.session() as s:
        holds.decide(s, post_id, Verdict(Verb.APPROVE), actor="cli", now=T0)
    with db.session() as s, pytest.raises(holds.NotHeld, match="is not held"):
        holds.decide(s, post_id, Verdict(Verb.REJECT), actor="cli", now=T0)
    assert post_of(db, post_id).state is PostState.ACCEPTED


def test_two_racing_replies_decide_once_and_the_loser_is_told(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    address = reply_address(db)
    ids = [store_reply(db, address, "approve\n"), store_reply(db, address, "discard\n")]
    barrier = threading.Barrier(2)

    def process(inbound_id: int) -> None:
        barrier.wait()
        with db.session() as s:
            replies.process(s, inbound_id, now=T0 + timedelta(hours=1))

    threads = [threading.Thread(target=process, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    state = post_of(db, post_id).state
    assert state in (PostState.ACCEPTED, PostState.DISCARDED)
    subjects = [str(m["Subject"]) for m in notices_to(db, MODERATOR)[1:]]
    assert sorted(s.split(":")[0] for s in subjects) == [
        "Done",
        f"Your reply to {LIST} was not carried out",
    ]
    assert all(inbound_state(db, i) is InboundState.DONE for i in ids)


def test_held_posts_lists_waiting_posts_with_their_size(db: Database) -> None:
    setup_list(db)
    first = hold_post(db, subject="One")
    second = hold_post(db, subject="Two")
    with db.session() as s:
        holds.decide(s, second, Verdict(Verb.APPROVE), actor="cli", now=T0)
    with db.reading() as s:
        [held] = holds.held_posts(s, LIST)
        assert holds.held_posts(s) == [held]
        raw = holds.raw_of(s, holds.get_post(s, first))
    assert (held.id, held.subject, held.list_address) == (first, "One", LIST)
    assert held.size == len(raw) and b"Subject: One" in raw


# -- expiry and reminders ----------------------------------------------------


def test_a_hold_expires_after_the_lists_days_and_the_sender_is_told(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db)
    announced(db)
    with db.session() as s:
        assert holds.expire(s, now=T0 + timedelta(days=14) - timedelta(seconds=1)) == 0
    assert post_of(db, post_id).state is PostState.HELD
    with db.session() as s:
        assert holds.expire(s, now=T0 + timedelta(days=14)) == 1
    post = post_of(db, post_id)
    assert post.state is PostState.DISCARDED and post.decided_by == holds.EXPIRY_ACTOR
    expired = notices_to(db, SENDER)[-1]
    assert "not approved in time" in str(expired["Subject"]) and "14 days" in body(expired)
    with db.reading() as s:
        assert s.scalars(
            sa.select(AuditEntry.action).where(AuditEntry.action == "post.expire")
        ).one()


def test_a_hold_stored_long_ago_is_expired_not_announced(db: Database) -> None:
    setup_list(db)
    post_id = hold_post(db, created_at=T0 - timedelta(days=30))
    announced(db)
    assert post_of(db, post_id).state is PostState.DISCARDED
    assert notices_to(db, MODERATOR) == []


def test_moderators_get_at_most_one_reminder_a_day_per_list(db: Database) -> None:
    setup_list(db)
    first = hold_post(db, subject="First")
    hold_post(db, subject="Second", created_at=T0 + timedelta(hours=20))
    announced(db)
    announced(db, T0 + timedelta(hours=20))

    def reminders(to: str = MODERATOR) -> list[EmailMessage]:
        return [m for m in notices_to(db, to) if "wait for your decision" in str(m["Subject"])]

    with db.session() as s:
        assert holds.remind(s, now=T0 + timedelta(hours=23)) == 0  # nothing a day old
    with db.session() as s:
        assert holds.remind(s, now=T0 + timedelta(days=1)) == 1
    with db.session() as s:
        assert holds.remind(s, now=T0 + timedelta(days=1, hours=23)) == 0  # once a day
    [reminder] = reminders()
    assert len(reminders(OWNER)) == 1
    text = body(reminder)
    assert f"Post {first}: from {SENDER}, held 1d 0h" in text and "Second" not in text
    with db.session() as s:
        assert holds.remind(s, now=T0 + timedelta(days=2)) == 1
    latest = body(reminders()[-1])
    assert "First" in latest and "Second" in latest
    with db.reading() as s:
        assert lists.get(s, LIST).last_reminder_at == T0 + timedelta(days=2)
    # the reminder's own address decides the post
    decide = re.search(rf"Post {first}:.*?Decide:\s+mail (\S+)", text, re.DOTALL)
    assert decide is not None
    store_reply(db, decide.group(1), "approve\n")
    replies.process_pending(db, now=T0 + timedelta(days=2, hours=1))
    assert post_of(db, first).state is PostState.ACCEPTED
