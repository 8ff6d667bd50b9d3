"""Subscriptions on a real database: commands, confirmations, policies, owners, limits.

Time is passed explicitly (`now`), so expiry and the hourly limit are tested
without a clock. Requests are stored as intake stores them (pending inbound
mail), processed by the same `run_once` the daemon calls, and the mail the
server would send is read back from the queued notices.
"""

from __future__ import annotations

import re
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import make_list, message
from dnsserver import DnsServer
from test_moderation import body, inbound_state, notices_to

from listserv import lists, mail, members, tokens
from listserv.cli import cli
from listserv.config import AuthSettings, DnsSettings
from listserv.db import Database
from listserv.distribute import dkim
from listserv.dns import Resolver
from listserv.models import (
    AuditEntry,
    InboundMessage,
    InboundState,
    Member,
    PostingPolicy,
    Role,
    Token,
    TokenKind,
    Unsubscription,
)
from listserv.moderation import task as moderation
from listserv.pipeline.auth import Authenticator
from listserv.subscriptions import commands, confirm, task
from listserv.subscriptions.commands import Command, Verb

LIST = "staff@lists.example.org"
OTHER_LIST = "news@lists.example.org"
OWNER = "owner@example.org"
ANN = "ann@one.example"
BOB = "bob@two.example"
CAROL = "carol@three.example"
T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
CONFIRM = re.compile(r"staff-confirm\+[a-z2-7]{26}@lists\.example\.org")


# -- helpers (the e2e tests use them too) --------------------------------------


def setup_list(db: Database, address: str = LIST, **settings: str) -> str:
    """A members list with one member (Ann) and one owner."""
    return make_list(db, address, policy=PostingPolicy.MEMBERS, members_=[ANN], **settings)


def store(
    db: Database,
    to: str,
    text: str = "",
    *,
    sender: str = CAROL,
    subject: str = "",
    headers: str = "",
    mail_from: str | None = None,
    signer: dkim.Signer | None = None,
) -> int:
    """Mail as intake stores it for a list's -request, -join, -leave or -confirm address."""
    kind = next(k for k in ("request", "join", "leave", "confirm") if f"-{k}" in to)
    raw = (
        message(
            f"""
        From: {sender}
        To: {to}
        Subject: {subject}
        Message-ID: <m-{threading.get_ident()}-{abs(hash((to, text, subject, sender)))}@ex.org>
        """
        ).rstrip(b"\r\n")
        + b"\r\n"
        + (f"{headers}\n" if headers else "").replace("\n", "\r\n").encode()
        + b"\r\n"
        + textwrap.dedent(text).replace("\n", "\r\n").encode()
    )
    if signer is not None:
        raw = signer.sign(raw)
    with db.session() as s:
        inbound = InboundMessage(
            mail_from=sender if mail_from is None else mail_from,
            rcpt_tos=[to],
            kind=kind,
            state=InboundState.PENDING,
            raw=raw,
        )
        s.add(inbound)
        s.flush()
        return inbound.id


def process(db: Database, now: datetime = T0, **kwargs: object) -> int:
    """One round of both loops the daemon runs: requests, then confirm replies."""
    done = task.run_once(db, now=now, **kwargs)  # type: ignore[arg-type]
    moderation.run_once(db, now=now)
    return done


def subjects(db: Database, address: str) -> list[str]:
    return [str(m["Subject"]) for m in notices_to(db, address)]


def last(db: Database, address: str, subject_part: str = "") -> EmailMessage:
    found = [m for m in notices_to(db, address) if subject_part in str(m["Subject"])]
    assert found, subjects(db, address)
    return found[-1]


def confirm_address(db: Database, address: str) -> str:
    """The Reply-To of the latest confirmation request mailed to `address`."""
    reply_to = str(last(db, address, "onfirm")["Reply-To"])
    assert CONFIRM.fullmatch(reply_to), reply_to
    return reply_to


def roles(db: Database, address: str, mlist: str = LIST) -> set[Role]:
    with db.reading() as s:
        return members.roles_of(s, lists.get(s, mlist), [address])


def member_row(db: Database, address: str) -> Member:
    with db.reading() as s:
        rows = members.rows_for(s, lists.get(s, LIST), [address])
    [row] = [r for r in rows if r.role is Role.MEMBER]
    return row


def audit(db: Database, action: str) -> list[str]:
    with db.reading() as s:
        rows = s.scalars(sa.select(AuditEntry).where(AuditEntry.action == action)).all()
    return [f"{r.actor}: {r.detail}" for r in rows]


def token_count(db: Database) -> int:
    with db.reading() as s:
        return int(s.scalar(sa.select(sa.func.count(Token.id))) or 0)


# -- commands ------------------------------------------------------------------


def _msg(text: str, subject: str = "") -> EmailMessage:
    return mail.parse(
        message(f"From: a@b.example\nSubject: {subject}\n\n") + textwrap.dedent(text).encode()
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("subscribe", Command(Verb.SUBSCRIBE)),
        ("SUBSCRIBE <bob@two.example>", Command(Verb.SUBSCRIBE, ("bob@two.example",))),
        ("join address=bob@two.example", Command(Verb.SUBSCRIBE, ("bob@two.example",))),
        ("unsubscribe", Command(Verb.UNSUBSCRIBE)),
        ("signoff", Command(Verb.UNSUBSCRIBE)),
        ("confirm abc", Command(Verb.CONFIRM, ("abc",))),
        ("add bob@two.example Bob Smith", Command(Verb.ADD, ("bob@two.example", "Bob Smith"))),
        ("remove bob@two.example", Command(Verb.REMOVE, ("bob@two.example",))),
        ("who", Command(Verb.WHO)),
        ("help", Command(Verb.HELP)),
        ("subscribe me to the list please", None),
        ("confirm", None),
        ("who are you", None),
        ("Hello there", None),
    ],
)
def test_a_line_states_a_command_or_none(line: str, expected: Command | None) -> None:
    assert commands.parse_line(line) == expected


def test_commands_come_from_the_subject_and_the_first_lines_until_a_signature() -> None:
    found, unknown = commands.read(
        _msg(
            """
            > quoted: remove everyone@x.example

            who
            subscribe bob@two.example
            --\x20
            remove ann@one.example
            """,
            subject="Re: help",
        )
    )
    assert [str(c) for c in found] == ["help", "who", "subscribe bob@two.example"]
    assert unknown is None


def test_reading_stops_at_the_first_line_that_is_not_a_command() -> None:
    found, _ = commands.read(_msg("subscribe\nHi, I am new here.\nunsubscribe\n"))
    assert found == [Command(Verb.SUBSCRIBE)]
    found, unknown = commands.read(_msg("Please add me to the list.\nsubscribe\n"))
    assert found == [] and unknown == "Please add me to the list."


def test_the_line_above_a_quote_is_skipped() -> None:
    found, _ = commands.read(_msg("On Monday, Ann wrote:\n> help\nunsubscribe\n"))
    assert found == [Command(Verb.UNSUBSCRIBE)]


# -- subscribing -----------------------------------------------------------------


def test_mail_to_join_asks_the_writer_to_confirm_and_a_reply_makes_a_member(
    db: Database,
) -> None:
    setup_list(db)
    inbound = store(db, "staff-join@lists.example.org", sender=f"Carol <{CAROL}>")
    assert process(db) == 1
    assert inbound_state(db, inbound) is InboundState.DONE
    assert subjects(db, CAROL) == [f"Confirm your subscription to {LIST}"]
    request = last(db, CAROL)
    reply_to = confirm_address(db, CAROL)
    raw_token = reply_to.partition("+")[2].partition("@")[0]
    assert f"confirm {raw_token}" in body(request)
    assert Role.MEMBER not in roles(db, CAROL)
    with db.reading() as s:  # only the digest is stored
        row = s.scalars(sa.select(Token)).one()
        assert row.kind is TokenKind.SUBSCRIBE and row.address == CAROL
        assert row.digest == tokens.digest(raw_token) and raw_token not in row.digest
        assert row.expires_at == T0 + confirm.CONFIRM_TTL

    store(db, reply_to, "yes\n", sender=CAROL, subject="Re: Confirm your subscription")
    process(db, T0 + timedelta(minutes=5))
    assert Role.MEMBER in roles(db, CAROL)
    assert member_row(db, CAROL).source == "subscribe"
    welcome = last(db, CAROL, "Welcome")
    assert str(welcome["Subject"]) == f"Welcome to {LIST}"
    assert "staff-leave@lists.example.org" in body(welcome)
    assert audit(db, "members.add")[-1] == f"{CAROL}: member: {CAROL}"


def test_a_subscribe_command_sends_only_the_confirmation_to_the_writer(db: Database) -> None:
    setup_list(db)
    store(db, "staff-request@lists.example.org", "subscribe\n", subject="")
    process(db)
    assert subjects(db, CAROL) == [f"Confirm your subscription to {LIST}"]


def test_confirm_token_by_command_works_like_a_reply(db: Database) -> None:
    setup_list(db)
    store(db, "staff-request@lists.example.org", subject="subscribe")
    process(db)
    raw_token = confirm_address(db, CAROL).partition("+")[2].partition("@")[0]
    store(db, "staff-request@lists.example.org", f"confirm {raw_token}\n")
    process(db, T0 + timedelta(minutes=1))
    assert Role.MEMBER in roles(db, CAROL)
    assert f"{CAROL} is now a member" in body(last(db, CAROL, "your request"))


def test_subscribing_someone_else_asks_them_and_tells_the_writer_nothing_about_them(
    db: Database,
) -> None:
    setup_list(db)
    store(db, "staff-request@lists.example.org", f"subscribe {BOB}\nsubscribe {ANN}\n")
    process(db)
    assert subjects(db, BOB) == [f"Confirm your subscription to {LIST}"]
    assert f"came from {CAROL}" in body(last(db, BOB))
    assert notices_to(db, ANN) == []  # a member already: nothing sent
    answer = body(last(db, CAROL, "your request"))
    assert answer.count("Whether it is a member is not said here") == 2
    assert "is a member already" not in answer


def test_a_member_asking_to_subscribe_is_told_so_and_no_token_is_made(db: Database) -> None:
    setup_list(db)
    store(db, "staff-join@lists.example.org", sender=ANN)
    process(db)
    assert f"{ANN} is a member already" in body(last(db, ANN, "your request"))
    assert token_count(db) == 0


def test_no_command_is_answered_with_help_quoting_the_line(db: Database) -> None:
    setup_list(db)
    store(db, "staff-request@lists.example.org", "Hello, how do I join?\n", subject="Question")
    process(db)
    text = body(last(db, CAROL, "your request"))
    assert "'Hello, how do I join?' is not one" in text and "subscribe ADDRESS" in text


def test_a_reused_token_changes_nothing_and_is_answered(db: Database) -> None:
    setup_list(db)
    store(db, "staff-join@lists.example.org")
    process(db)
    reply_to = confirm_address(db, CAROL)
    store(db, reply_to, "ok\n")
    process(db, T0 + timedelta(minutes=1))
    with db.session() as s:
        members.unsubscribe(s, lists.get(s, LIST), CAROL, via="cli", actor="cli")
    store(db, reply_to, "ok\n")
    process(db, T0 + timedelta(minutes=2))
    assert Role.MEMBER not in roles(db, CAROL)
    assert "used already" in body(last(db, CAROL, "not carried out"))


def test_an_expired_token_changes_nothing(db: Database) -> None:
    setup_list(db)
    store(db, "staff-join@lists.example.org")
    process(db)
    store(db, confirm_address(db, CAROL), "ok\n")
    process(db, T0 + confirm.CONFIRM_TTL + timedelta(seconds=1))
    assert Role.MEMBER not in roles(db, CAROL)
    assert "expired" in body(last(db, CAROL, "not carried out"))


def test_forged_and_tampered_tokens_change_nothing(db: Database) -> None:
    setup_list(db)
    store(db, "staff-join@lists.example.org")
    process(db)
    real = confirm_address(db, CAROL)
    local, _, domain = real.partition("@")
    tampered = local[:-1] + ("a" if local[-1] != "a" else "b") + "@" + domain
    forged = "staff-confirm+" + "a" * 26 + "@lists.example.org"
    store(db, tampered, "ok\n", sender=CAROL)
    store(db, forged, "ok\n", sender=CAROL)
    store(db, "staff-request@lists.example.org", "confirm " + "b" * 26 + "\n", sender=CAROL)
    process(db, T0 + timedelta(minutes=1))
    assert Role.MEMBER not in roles(db, CAROL)
    assert "does not belong to any pending request" in body(last(db, CAROL, "your request"))
    with db.reading() as s:
        assert s.scalars(sa.select(Token.used_at)).one() is None  # the real one still works
    store(db, real, "ok\n", sender=CAROL)
    process(db, T0 + timedelta(minutes=2))
    assert Role.MEMBER in roles(db, CAROL)


def test_a_token_of_another_list_confirms_nothing_here(db: Database) -> None:
    setup_list(db)
    setup_list(db, OTHER_LIST)
    store(db, "news-join@lists.example.org")
    process(db)
    reply_to = str(last(db, CAROL, "news@")["Reply-To"])
    token = reply_to.partition("+")[2].partition("@")[0]
    store(db, "staff-request@lists.example.org", f"confirm {token}\n")
    process(db, T0 + timedelta(minutes=1))
    assert Role.MEMBER not in roles(db, CAROL) and Role.MEMBER not in roles(db, CAROL, OTHER_LIST)


# -- abuse limits ------------------------------------------------------------------


def test_a_new_request_replaces_the_pending_confirmation(db: Database) -> None:
    setup_list(db)
    store(db, "staff-join@lists.example.org")
    process(db)
    first = confirm_address(db, CAROL)
    store(db, "staff-join@lists.example.org", "again\n")
    process(db, T0 + timedelta(minutes=1))
    second = confirm_address(db, CAROL)
    assert first != second
    with db.reading() as s:
        mlist = lists.get(s, LIST)
        assert len(confirm.pending(s, mlist, CAROL, now=T0 + timedelta(minutes=1))) == 1
    store(db, first, "ok\n")
    process(db, T0 + timedelta(minutes=2))
    assert Role.MEMBER not in roles(db, CAROL)
    assert "replaced by a newer request" in body(last(db, CAROL, "not carried out"))
    store(db, second, "ok\n")
    process(db, T0 + timedelta(minutes=3))
    assert Role.MEMBER in roles(db, CAROL)


def test_confirmation_mail_to_one_address_is_limited_per_hour_over_all_lists(
    db: Database,
) -> None:
    setup_list(db)
    setup_list(db, OTHER_LIST)
    for i in range(confirm.PER_HOUR):
        to = "staff-request" if i % 2 else "news-request"
        store(db, f"{to}@lists.example.org", f"subscribe {BOB}\n", sender=f"x{i}@evil.example")
        process(db, T0 + timedelta(minutes=i))
    assert len(notices_to(db, BOB)) == confirm.PER_HOUR
    store(db, "staff-request@lists.example.org", f"subscribe {BOB}\n", sender="y@evil.example")
    store(db, "staff-join@lists.example.org", sender=BOB)  # not even an answer now
    process(db, T0 + timedelta(minutes=30))
    assert len(notices_to(db, BOB)) == confirm.PER_HOUR
    # an hour after the first, one more may go
    store(db, "staff-join@lists.example.org", sender=BOB)
    process(db, T0 + timedelta(minutes=60, seconds=1))
    assert len(notices_to(db, BOB)) == confirm.PER_HOUR + 1


def test_the_limit_is_counted_with_the_given_clock(db: Database) -> None:
    setup_list(db)
    with db.session() as s:
        mlist = lists.get(s, LIST)
        for minute in range(3):
            assert confirm.ask(
                s,
                mlist,
                BOB,
                TokenKind.SUBSCRIBE,
                now=T0 + timedelta(minutes=minute),
                requested_by=BOB,
                per_hour=3,
            )
        assert not confirm.ask(
            s,
            mlist,
            BOB,
            TokenKind.SUBSCRIBE,
            now=T0 + timedelta(minutes=59),
            requested_by=BOB,
            per_hour=3,
        )
        assert confirm.recent(s, BOB, now=T0 + timedelta(minutes=61)) == 1
        assert confirm.ask(
            s,
            mlist,
            BOB,
            TokenKind.SUBSCRIBE,
            now=T0 + timedelta(minutes=61),
            requested_by=BOB,
            per_hour=3,
        )


# -- unsubscribing -------------------------------------------------------------------


def test_mail_to_leave_asks_to_confirm_and_the_reply_removes_and_records(db: Database) -> None:
    setup_list(db)
    store(db, "staff-leave@lists.example.org", sender=ANN)
    process(db)
    assert subjects(db, ANN) == [f"Confirm that you want to leave {LIST}"]
    assert Role.MEMBER in roles(db, ANN)  # a forged From: alone removes nobody
    store(db, confirm_address(db, ANN), "yes\n", sender=ANN)
    process(db, T0 + timedelta(minutes=1))
    assert Role.MEMBER not in roles(db, ANN)
    assert str(last(db, ANN, "left")["Subject"]) == f"You have left {LIST}"
    with db.reading() as s:
        record = s.scalars(sa.select(Unsubscription)).one()
    assert (record.address, record.via) == (ANN, "email")
    assert audit(db, "members.unsubscribe") == [f"{ANN}: {ANN} via email"]


def test_an_unsubscribe_command_works_the_same_way(db: Database) -> None:
    setup_list(db)
    store(db, "staff-request@lists.example.org", "unsubscribe\n", sender=ANN)
    process(db)
    store(db, confirm_address(db, ANN), "yes\n", sender=ANN)
    process(db, T0 + timedelta(minutes=1))
    assert Role.MEMBER not in roles(db, ANN)


def test_a_non_member_leaving_is_told_so(db: Database) -> None:
    setup_list(db)
    store(db, "staff-leave@lists.example.org", sender=BOB)
    process(db)
    assert "is not a member" in body(last(db, BOB, "your request"))
    assert token_count(db) == 0


def test_resubscribing_after_leaving_forgets_the_leaving(db: Database) -> None:
    setup_list(db)
    with db.session() as s:
        members.unsubscribe(s, lists.get(s, LIST), ANN, via="one-click")
    store(db, "staff-join@lists.example.org", sender=ANN)
    process(db)
    store(db, confirm_address(db, ANN), "yes\n", sender=ANN)
    process(db, T0 + timedelta(minutes=1))
    assert Role.MEMBER in roles(db, ANN)
    with db.reading() as s:
        assert members.unsubscribed(s, lists.get(s, LIST)) == set()


def test_a_mandatory_list_refuses_leaving_politely(db: Database) -> None:
    setup_list(db, mandatory="true")
    store(db, "staff-leave@lists.example.org", sender=ANN)
    store(db, "staff-request@lists.example.org", "unsubscribe\n", sender=ANN)
    process(db)
    refusal = last(db, ANN, "cannot leave")
    assert str(refusal["Subject"]) == f"You cannot leave {LIST}"
    assert "mandatory" in body(refusal)
    assert "The list is mandatory" in body(last(db, ANN, "your request"))
    assert token_count(db) == 0 and Role.MEMBER in roles(db, ANN)


def test_a_confirmation_made_before_the_list_became_mandatory_is_refused(db: Database) -> None:
    setup_list(db)
    store(db, "staff-leave@lists.example.org", sender=ANN)
    process(db)
    with db.session() as s:
        lists.set_setting(s, lists.get(s, LIST), "mandatory", "yes")
    store(db, confirm_address(db, ANN), "yes\n", sender=ANN)
    process(db, T0 + timedelta(minutes=1))
    assert Role.MEMBER in roles(db, ANN)
    assert "mandatory" in body(last(db, ANN, "not carried out"))


def test_the_welcome_of_a_mandatory_list_says_why_there_is_no_leaving(db: Database) -> None:
    setup_list(db, mandatory="true")
    store(db, "staff-request@lists.example.org", f"add {BOB}\n", sender=OWNER)
    process(db)
    text = body(last(db, BOB, "Welcome"))
    assert "mandatory" in text and "staff-leave@" not in text


# -- policies --------------------------------------------------------------------------


def test_a_closed_list_refuses_subscribing_politely_and_sends_no_confirmation(
    db: Database,
) -> None:
    setup_list(db, subscription_policy="closed")
    store(db, "staff-join@lists.example.org")
    store(db, "staff-request@lists.example.org", f"subscribe {BOB}\n")
    process(db)
    refusal = last(db, CAROL, "does not take subscriptions")
    assert "closed" in body(refusal) and "staff-owner@lists.example.org" in body(refusal)
    assert "The list is closed" in body(last(db, CAROL, "your request"))
    assert notices_to(db, BOB) == [] and token_count(db) == 0


def test_an_approve_list_needs_confirmation_then_an_owner(db: Database) -> None:
    setup_list(db, subscription_policy="approve")
    store(db, "staff-join@lists.example.org")
    process(db)
    store(db, confirm_address(db, CAROL), "yes\n")
    process(db, T0 + timedelta(minutes=1))
    assert Role.MEMBER not in roles(db, CAROL)
    assert "awaits" in str(last(db, CAROL, "approval")["Subject"])
    ask = last(db, OWNER, "asks to join")
    approval = str(ask["Reply-To"])
    assert CONFIRM.fullmatch(approval)
    # asking again now sends nothing new: the owners decide
    store(db, "staff-join@lists.example.org", "again\n")
    process(db, T0 + timedelta(minutes=2))
    assert "awaits the approval" in body(last(db, CAROL, "your request"))
    # a stranger cannot approve
    store(db, approval, "approve\n", sender=BOB)
    process(db, T0 + timedelta(minutes=3))
    assert Role.MEMBER not in roles(db, CAROL)
    assert "only an owner" in body(last(db, BOB, "not carried out"))
    store(db, approval, "approve\n\n> quoted\n", sender=OWNER)
    process(db, T0 + timedelta(minutes=4))
    assert Role.MEMBER in roles(db, CAROL)
    assert "owner approved" in body(last(db, CAROL, "Welcome"))
    assert "approved" in body(last(db, OWNER, "your request"))


def test_an_owner_rejecting_tells_the_subscriber_the_reason(db: Database) -> None:
    setup_list(db, subscription_policy="approve")
    store(db, "staff-join@lists.example.org")
    process(db)
    store(db, confirm_address(db, CAROL), "yes\n")
    process(db, T0 + timedelta(minutes=1))
    approval = str(last(db, OWNER, "asks to join")["Reply-To"])
    store(db, approval, "Looks odd\n", sender=OWNER)
    process(db, T0 + timedelta(minutes=2))
    assert "no decision found" in body(last(db, OWNER, "not carried out"))
    store(db, approval, "reject Staff only, sorry.\n", sender=OWNER)
    process(db, T0 + timedelta(minutes=3))
    assert Role.MEMBER not in roles(db, CAROL)
    assert "Staff only, sorry." in body(last(db, CAROL, "not approved"))
    assert audit(db, "members.approval") == [f"{OWNER}: {CAROL}: rejected"]


def test_subscription_policy_and_mandatory_are_settable_and_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "listserv.toml"
    config.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path}/db.sqlite"\n[dkim]\nkeys_dir = "{tmp_path}/k"\n'
    )

    def run(*args: str) -> str:
        result = CliRunner().invoke(cli, ["--config", str(config), *args])
        assert result.exit_code == 0, result.output
        return result.stdout

    run("init")
    run("lists", "create", LIST, "--owner", OWNER)
    shown = run("lists", "show", LIST)
    assert re.search(r"subscription_policy:\s+open", shown)
    assert re.search(r"mandatory:\s+false", shown)
    run("lists", "set", LIST, "subscription_policy", "approve")
    run("lists", "set", LIST, "mandatory", "yes")
    shown = run("lists", "show", LIST)
    assert re.search(r"subscription_policy:\s+approve", shown)
    assert re.search(r"mandatory:\s+true", shown)
    bad = CliRunner().invoke(
        cli, ["--config", str(config), "lists", "set", LIST, "subscription_policy", "maybe"]
    )
    assert bad.exit_code == 1 and "open, approve, closed" in bad.stderr


# -- owners -------------------------------------------------------------------------------


def test_an_owner_adds_removes_and_lists_members_by_mail_without_confirmation(
    db: Database,
) -> None:
    setup_list(db)
    store(
        db,
        "staff-request@lists.example.org",
        f"add {BOB} Bob Smith\nremove {ANN}\nwho\n",
        sender=f"The Owner <{OWNER}>",
    )
    process(db)
    assert Role.MEMBER in roles(db, BOB) and Role.MEMBER not in roles(db, ANN)
    row = member_row(db, BOB)
    assert (row.source, row.display_name) == ("owner", "Bob Smith")
    answer = body(last(db, OWNER, "your request"))
    assert f"{BOB} is now a member" in answer and f"{ANN} was removed" in answer
    assert f"1 members:\n{BOB}  Bob Smith" in answer
    assert "Welcome" in str(last(db, BOB, "Welcome")["Subject"])
    assert "removed" in str(last(db, ANN, "removed")["Subject"])
    assert audit(db, "members.add")[-1] == f"{OWNER}: member: {BOB}"
    assert audit(db, "members.unsubscribe") == [f"{OWNER}: {ANN} via owner"]
    with db.reading() as s:
        assert s.scalars(sa.select(Unsubscription.via)).one() == "owner"
    assert token_count(db) == 0


def test_a_non_owner_is_refused_owners_commands(db: Database) -> None:
    setup_list(db)
    store(db, "staff-request@lists.example.org", f"who\nadd {BOB}\nremove {ANN}\n", sender=ANN)
    process(db)
    answer = body(last(db, ANN, "your request"))
    assert answer.count("Refused: only the list's owners") == 3
    assert ANN + "  " not in answer  # no roster
    assert Role.MEMBER not in roles(db, BOB) and Role.MEMBER in roles(db, ANN)


def test_owners_commands_need_authentication_when_the_list_requires_it(
    db: Database, tmp_path: Path
) -> None:
    setup_list(db, require_authenticated_sender="true")
    key = dkim.generate_key(tmp_path / "keys", "example.org", "s1", bits=1024)
    with DnsServer() as server:
        server.txt[key.dns_name()] = [key.public_txt()]
        authenticator = Authenticator(
            AuthSettings(), Resolver(DnsSettings(nameservers=(server.address,), timeout=2.0))
        )
        store(db, "staff-request@lists.example.org", f"add {BOB}\n", sender=OWNER)
        process(db, authenticator=authenticator)
        assert Role.MEMBER not in roles(db, BOB)
        assert "only from authenticated mail" in body(last(db, OWNER, "your request"))
        store(
            db,
            "staff-request@lists.example.org",
            f"add {BOB}\n",
            sender=OWNER,
            signer=dkim.Signer(key),
        )
        process(db, T0 + timedelta(minutes=1), authenticator=authenticator)
    assert Role.MEMBER in roles(db, BOB)


# -- who gets no answer -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "mail_from"),
    [
        ("Auto-Submitted: auto-replied", CAROL),
        ("Precedence: list", CAROL),
        ("List-Id: <other.example.net>", CAROL),
        ("", ""),
    ],
)
def test_automatic_mail_and_empty_senders_get_no_answer_and_change_nothing(
    db: Database, headers: str, mail_from: str
) -> None:
    setup_list(db)
    inbound = store(
        db,
        "staff-request@lists.example.org",
        "subscribe\nhelp\n",
        headers=headers,
        mail_from=mail_from,
    )
    store(db, "staff-leave@lists.example.org", sender=ANN, headers=headers, mail_from=mail_from)
    process(db)
    assert inbound_state(db, inbound) is InboundState.DONE
    assert notices_to(db, CAROL) == [] and notices_to(db, ANN) == []
    assert token_count(db) == 0


def test_an_automatic_reply_to_a_confirmation_confirms_nothing(db: Database) -> None:
    setup_list(db)
    store(db, "staff-join@lists.example.org")
    process(db)
    store(db, confirm_address(db, CAROL), "I am away.\n", headers="Auto-Submitted: auto-replied")
    process(db, T0 + timedelta(minutes=1))
    assert Role.MEMBER not in roles(db, CAROL)


def test_a_request_for_a_deleted_list_is_marked_failed(db: Database) -> None:
    setup_list(db)
    inbound = store(db, "staff-join@lists.example.org")
    with db.session() as s:
        lists.delete(s, lists.get(s, LIST), force=True)
    process(db)
    assert inbound_state(db, inbound) is InboundState.FAILED


def test_every_mail_of_the_flows_fills_every_template_field(db: Database) -> None:
    """A $field left in a sent text is a template naming a value the code does not give."""
    setup_list(db, subscription_policy="approve", description="Staff news")
    store(db, "staff-join@lists.example.org")
    store(db, "staff-request@lists.example.org", "help\nwho\n", sender=BOB)
    store(db, "staff-request@lists.example.org", f"add {BOB}\nremove {BOB}\n", sender=OWNER)
    process(db)
    store(db, confirm_address(db, CAROL), "yes\n")
    process(db, T0 + timedelta(minutes=1))
    store(db, str(last(db, OWNER, "asks to join")["Reply-To"]), "approve\n", sender=OWNER)
    store(db, "staff-leave@lists.example.org", sender=ANN)
    process(db, T0 + timedelta(minutes=2))
    store(db, confirm_address(db, ANN), "yes\n", sender=ANN)
    store(db, "staff-confirm+" + "c" * 26 + "@lists.example.org", "yes\n", sender=ANN)
    process(db, T0 + timedelta(minutes=3))
    sent = [m for who in (CAROL, BOB, OWNER, ANN) for m in notices_to(db, who)]
    assert len(sent) >= 12
    for msg in sent:
        text = str(msg["Subject"]) + body(msg)
        assert not re.search(r"\$[a-z_{]", text), text
    assert "member of staff@lists.example.org (Staff news)." in body(last(db, CAROL, "Welc"))
