"""The posting rules, alone and together: contexts built by intake from real parsed
messages and real lists in the database (SQLite, and PostgreSQL when configured)."""

from __future__ import annotations

import os
import re
import sqlite3
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import make_list, message

from listserv import config, lists, mail, members
from listserv.cli import cli
from listserv.config import PolicySettings
from listserv.db import Database
from listserv.distribute import convert
from listserv.errors import ConfigError, InvalidInput, NotFound
from listserv.models import InboundMessage, ModerationAction, PostingPolicy, Role
from listserv.pipeline import rules
from listserv.pipeline.context import PostContext
from listserv.pipeline.decide import decide
from listserv.pipeline.decision import Action, Decision
from listserv.smtp_in import intake

LIST = "staff@lists.example.org"
BOSS = "boss@example.org"
MEMBERS = ["ann@one.example", "bob@one.example", "cat@two.example"]
#: a day in no window the tests set, unless they say so
MIDYEAR = datetime(2026, 5, 12, 12, 0, tzinfo=UTC)


def post(
    from_: str = f"Boss <{BOSS}>",
    *,
    headers: str = "",
    body: str = "The budget is approved.",
    content_type: str = "text/plain; charset=utf-8",
) -> bytes:
    extra = "".join(f"{line}\n" for line in headers.strip().splitlines())
    return message(
        f"From: {from_}\n{extra}To: {LIST}\nSubject: Budget\nMessage-ID: <m1@example.org>\n"
        f"MIME-Version: 1.0\nContent-Type: {content_type}\n\n{body}\n"
    )


def multipart(kind: str, *parts: tuple[str, str, str]) -> bytes:
    """A multipart post of (content type, extra headers, body) parts."""
    chunks = [f"Content-Type: {ct}\n{hdrs}\n{body}\n" for ct, hdrs, body in parts]
    body = "".join(f"--XX\n{chunk}" for chunk in chunks) + "--XX--"
    return post(content_type=f'{kind}; boundary="XX"', body=body)


def context(
    db: Database,
    raw: bytes,
    *,
    address: str = LIST,
    mail_from: str = "",
    now: datetime = MIDYEAR,
    policy: PolicySettings | None = None,
    authenticated: frozenset[str] = frozenset(),
    recipients: int | None = None,
    parse: Callable[[bytes], EmailMessage] = mail.parse,
) -> PostContext:
    with db.reading() as s:
        mlist = lists.get(s, address)
        envelope = intake.Envelope(mail_from=mail_from, rcpt_tos=(address,), content=raw)
        return intake.build_context(
            s,
            mlist,
            parse(raw),
            envelope,
            now=now,
            policy=policy,
            authenticated=authenticated,
            recipients=recipients,
        )


def judge(db: Database, raw: bytes, **kwargs: Any) -> Decision:
    return decide(context(db, raw, **kwargs))


def configure(db: Database, address: str = LIST, **settings: str) -> None:
    with db.session() as s:
        mlist = lists.get(s, address)
        for key, value in settings.items():
            lists.set_setting(s, mlist, key, value)


def add(db: Database, *addrs: str, address: str = LIST, **kwargs: Any) -> None:
    with db.session() as s:
        members.add(s, lists.get(s, address), list(addrs), **kwargs)


# -- who the sender is -------------------------------------------------------------------


def test_every_from_address_must_be_allowed(db: Database) -> None:
    make_list(db, members_=MEMBERS, senders=[BOSS])
    assert judge(db, post()).action is Action.ACCEPT
    forged = judge(db, post(f"Boss <{BOSS}>, Evil <evil@ext.example>"))
    assert forged.action is Action.REJECT
    assert forged.reply is not None and (forged.reply.code, forged.reply.enhanced) == (550, "5.7.1")
    assert forged.reason.startswith("evil@ext.example may not post to staff@lists.example.org")
    assert BOSS not in forged.reason
    # a display name that looks like an address is not an address
    quoted = judge(db, post(f'"{BOSS}" <evil@ext.example>'))
    assert quoted.action is Action.REJECT
    assert quoted.reason.startswith("evil@ext.example may not post")


def test_the_envelope_sender_alone_never_authorizes(db: Database) -> None:
    make_list(db, members_=MEMBERS, senders=[BOSS])
    decision = judge(db, post("Evil <evil@ext.example>"), mail_from=BOSS)
    assert decision.action is Action.REJECT
    assert "evil@ext.example may not post" in decision.reason


def test_a_sender_header_naming_an_authorized_sender_stands_in(db: Database) -> None:
    make_list(db, members_=MEMBERS, senders=[BOSS])
    raw = post("Principal <principal@ext.example>", headers=f"Sender: Secretary <{BOSS}>")
    ctx = context(db, raw)
    assert ctx.poster.via_sender and ctx.poster.addresses == (BOSS,)
    assert ctx.sender == BOSS
    assert decide(ctx).action is Action.ACCEPT
    # a Sender: naming nobody allowed does not help
    other = post("Principal <principal@ext.example>", headers="Sender: x@ext.example")
    assert judge(db, other).action is Action.REJECT


@pytest.mark.parametrize(
    ("policy", "setting", "expected"),
    [
        (PostingPolicy.MEMBERS, None, Action.HOLD),
        (PostingPolicy.ANNOUNCE, None, Action.REJECT),
        (PostingPolicy.ANNOUNCE, "hold", Action.HOLD),
        (PostingPolicy.MEMBERS, "discard", Action.DISCARD),
        (PostingPolicy.MEMBERS, "reject", Action.REJECT),
        (PostingPolicy.OPEN, "reject", Action.ACCEPT),
    ],
)
def test_the_nonmember_action_applies_to_whoever_the_policy_does_not_allow(
    db: Database, policy: PostingPolicy, setting: str | None, expected: Action
) -> None:
    make_list(db, members_=MEMBERS, senders=[BOSS], policy=policy)
    if setting:
        configure(db, nonmember_action=setting)
    decision = judge(db, post("Stranger <stranger@ext.example>"))
    assert decision.action is expected
    if expected is not Action.ACCEPT:
        assert "stranger@ext.example may not post to staff@lists.example.org" in decision.reason
    # members may post to a members list, never to an announce list
    member = judge(db, post("Ann <ann@one.example>"))
    assert (member.action is Action.ACCEPT) == (policy is not PostingPolicy.ANNOUNCE)


@pytest.mark.parametrize(
    ("action", "expected", "fragment"),
    [
        ("accept", Action.ACCEPT, ""),
        ("hold", Action.HOLD, "ann@one.example is moderated on staff@lists.example.org"),
        ("reject", Action.REJECT, "the list refuses posts from this address"),
        ("discard", Action.DISCARD, "the list refuses posts from this address"),
    ],
)
def test_a_members_own_action_overrides_the_lists(
    db: Database, action: str, expected: Action, fragment: str
) -> None:
    make_list(db, senders=[BOSS], policy=PostingPolicy.MEMBERS)
    add(db, "Ann@One.Example", moderation=ModerationAction(action))
    decision = judge(db, post("Ann <ann@one.example>"))
    assert decision.action is expected
    assert fragment in decision.reason
    if expected is Action.REJECT:
        assert decision.reply is not None and decision.reply.code == 550
    # `members set ... --moderation none` gives the decision back to the list
    with db.session() as s:
        members.set_flags(s, lists.get(s, LIST), "ann@one.example", moderation=members.CLEAR)
    assert judge(db, post("Ann <ann@one.example>")).action is Action.ACCEPT


def test_the_strictest_own_action_of_several_from_addresses_wins(db: Database) -> None:
    make_list(db, senders=[BOSS], policy=PostingPolicy.MEMBERS)
    add(db, "ann@one.example", moderation=ModerationAction.HOLD)
    add(db, "bob@one.example", moderation=ModerationAction.DISCARD)
    decision = judge(db, post("ann@one.example, bob@one.example"))
    assert decision.action is Action.DISCARD


def test_flags_are_refused_where_they_mean_nothing(db: Database) -> None:
    make_list(db, members_=MEMBERS, senders=[BOSS])
    with db.session() as s:
        mlist = lists.get(s, LIST)
        with pytest.raises(InvalidInput, match="only a sender can be an emergency sender"):
            members.set_flags(s, mlist, "ann@one.example", emergency=True)
        with pytest.raises(InvalidInput, match="members and senders only"):
            hold = ModerationAction.HOLD
            members.add(s, mlist, ["mod@example.org"], role=Role.MODERATOR, moderation=hold)
        with pytest.raises(NotFound, match=r"nobody@example\.org is not a member or sender"):
            members.set_flags(s, mlist, "nobody@example.org", moderation=ModerationAction.HOLD)
        with pytest.raises(InvalidInput, match="nothing to change"):
            members.set_flags(s, mlist, BOSS)


# -- sender authentication ---------------------------------------------------------------


def test_require_authenticated_sender_holds_an_unauthenticated_authorized_sender(
    db: Database,
) -> None:
    make_list(db, members_=MEMBERS, senders=[BOSS], require_authenticated_sender="yes")
    held = judge(db, post())
    assert held.action is Action.HOLD
    assert held.reason.startswith("sender not authenticated")
    assert "example.org" in held.reason
    assert judge(db, post(), authenticated=frozenset({"example.org"})).action is Action.ACCEPT
    # another domain's pass proves nothing about example.org
    assert judge(db, post(), authenticated=frozenset({"ext.example"})).action is Action.HOLD
    # a stranger is still a stranger: refused on an announce list, not held
    assert judge(db, post("x@ext.example")).action is Action.REJECT


def test_a_sender_stand_in_must_be_authenticated_too(db: Database) -> None:
    make_list(db, senders=[BOSS], require_authenticated_sender="true")
    raw = post("principal@ext.example", headers=f"Sender: {BOSS}")
    assert judge(db, raw, authenticated=frozenset({"ext.example"})).action is Action.HOLD
    assert judge(db, raw, authenticated=frozenset({"example.org"})).action is Action.ACCEPT


def test_an_unauthenticated_emergency_sender_is_not_trusted_as_one(db: Database) -> None:
    make_list(db, members_=MEMBERS, approval_threshold="1", require_authenticated_sender="on")
    add(db, BOSS, role=Role.SENDER, emergency=True)
    held = judge(db, post())
    assert held.action is Action.HOLD
    assert [r.split(":")[0] for r in held.reasons] == ["sender not authenticated", "needs approval"]
    trusted = judge(db, post(), authenticated=frozenset({"example.org"}))
    assert trusted.action is Action.ACCEPT


# -- size and content --------------------------------------------------------------------


def test_max_message_kb_rejects_bigger_posts_with_552(db: Database) -> None:
    make_list(db, senders=[BOSS], max_message_kb="1")
    assert judge(db, post(body="small")).action is Action.ACCEPT
    big = judge(db, post(body="x" * 70 + "\n" + ("y" * 70 + "\n") * 20))
    assert big.action is Action.REJECT
    assert big.reply is not None and (big.reply.code, big.reply.enhanced) == (552, "5.3.4")
    assert "at most 1 KB" in big.reason
    configure(db, max_message_kb="0")  # the server's limit
    assert judge(db, post(body="y" * 5000)).action is Action.ACCEPT


HTML = '<p>See <a href="https://docs.example.org/x">the plan</a>.</p>'


def test_plain_text_only_rejects_anything_but_text_plain(db: Database) -> None:
    make_list(db, senders=[BOSS], plain_text_only="true")
    assert judge(db, post()).action is Action.ACCEPT
    html = judge(db, post(content_type="text/html; charset=utf-8", body=HTML))
    assert html.action is Action.REJECT
    assert html.reply is not None and (html.reply.code, html.reply.enhanced) == (550, "5.6.0")
    assert html.reason == "staff@lists.example.org accepts plain text only, not text/html"


def test_content_filter_convert_accepts_html_and_alternatives_only(db: Database) -> None:
    make_list(db, senders=[BOSS], plain_text_only="true", content_filter="convert")
    assert judge(db, post(content_type="text/html", body=HTML)).action is Action.ACCEPT
    alternative = multipart(
        "multipart/alternative", ("text/plain", "", "See the plan."), ("text/html", "", HTML)
    )
    assert judge(db, alternative).action is Action.ACCEPT
    mixed = multipart(
        "multipart/mixed",
        ("text/plain", "", "See the plan."),
        ("application/pdf", 'Content-Disposition: attachment; filename="plan.pdf"\n', "JVBER"),
    )
    refused = judge(db, mixed)
    assert refused.action is Action.REJECT
    assert "not multipart/mixed; HTML-only and multipart/alternative posts are converted" in (
        refused.reason
    )


def test_attachments_are_refused_when_the_list_allows_none(db: Database) -> None:
    make_list(db, senders=[BOSS], allow_attachments="no")
    inline = multipart("multipart/mixed", ("text/plain", "", "one"), ("text/plain", "", "two"))
    assert judge(db, inline).action is Action.ACCEPT
    attached = "Content-Disposition: attachment\n"
    named = 'Content-Disposition: inline; filename="a.txt"\n'
    for headers in (attached, named):
        with_file = multipart(
            "multipart/mixed", ("text/plain", "", "hi"), ("text/plain", headers, "x")
        )
        decision = judge(db, with_file)
        assert decision.action is Action.REJECT
        assert decision.reason.startswith("staff@lists.example.org accepts no attachments (")


def test_allowed_mime_types_refuse_any_leaf_outside_the_list(db: Database) -> None:
    make_list(db, senders=[BOSS], allowed_mime_types="text/plain, image/*")
    photo = multipart("multipart/mixed", ("text/plain", "", "hi"), ("image/png", "", "iVBOR"))
    assert judge(db, photo).action is Action.ACCEPT
    pdf = multipart("multipart/mixed", ("text/plain", "", "hi"), ("application/pdf", "", "JVBE"))
    decision = judge(db, pdf)
    assert decision.action is Action.REJECT
    assert decision.reason == (
        "staff@lists.example.org does not accept application/pdf parts;"
        " allowed: text/plain, image/*"
    )


# -- what intake parses (issue 15) ------------------------------------------------------

#: posts whose bodies some rule judges: HTML, alternatives, an attachment, links
BODIED = [
    post(content_type="text/html", body=HTML),
    multipart("multipart/alternative", ("text/plain", "", "See."), ("text/html", "", HTML)),
    multipart(
        "multipart/mixed",
        ("text/plain", "", "See https://outside.example/plan"),
        ("application/pdf", 'Content-Disposition: attachment; filename="plan.pdf"\n', "JVBER"),
    ),
    post(body="See https://outside.example/plan"),
]


def test_lists_whose_rules_read_no_body_decide_on_the_header_section_alone(db: Database) -> None:
    make_list(db, senders=[BOSS], allow_attachments="yes", link_allowlist="example.org")
    with db.reading() as s:
        assert not rules.reads_body(lists.get(s, LIST))
    for raw in BODIED:
        assert decide(context(db, raw, parse=mail.parse_headers)) == judge(db, raw)


@pytest.mark.parametrize(
    "settings",
    [
        {"plain_text_only": "true"},
        {"plain_text_only": "true", "content_filter": "convert"},
        {"allow_attachments": "no"},
        {"allowed_mime_types": "text/plain"},
        {"external_links": "hold", "link_allowlist": "example.org"},
    ],
)
def test_lists_whose_rules_read_the_body_get_it(db: Database, settings: dict[str, str]) -> None:
    make_list(db, senders=[BOSS], **settings)
    with db.reading() as s:
        assert rules.reads_body(lists.get(s, LIST))
    for raw in BODIED:  # most of them the header section alone would decide otherwise
        envelope = intake.Envelope(mail_from=BOSS, rcpt_tos=(LIST,), content=raw)
        outcome = intake.receive(db, envelope, now=MIDYEAR)
        expected = judge(db, raw)
        if expected.action is Action.REJECT:
            assert outcome.reply == expected.reply
        else:
            assert outcome.posts == {LIST: intake._STATES[expected.action]}


def test_intake_stores_a_post_judged_on_its_header_section_byte_for_byte(
    db: Database,
) -> None:
    make_list(db, senders=[BOSS])
    raw = BODIED[2]
    outcome = intake.receive(db, intake.Envelope(mail_from=BOSS, rcpt_tos=(LIST,), content=raw))
    assert outcome.reply.code == 250
    with db.reading() as s:
        assert s.get_one(InboundMessage, outcome.inbound_ids[0]).raw == raw


# -- recipients, blackouts, links --------------------------------------------------------


def test_a_post_to_more_recipients_than_the_threshold_is_held(db: Database) -> None:
    make_list(db, members_=MEMBERS, approval_threshold="2")
    add(db, BOSS, role=Role.SENDER)
    held = judge(db, post())
    assert held.action is Action.HOLD
    assert held.reasons == ("needs approval: 3 recipients > threshold 2",)
    configure(db, approval_threshold="3")
    assert judge(db, post()).action is Action.ACCEPT
    configure(db, approval_threshold="0")
    assert judge(db, post()).action is Action.ACCEPT


def test_an_emergency_sender_passes_the_threshold(db: Database) -> None:
    make_list(db, members_=MEMBERS, approval_threshold="1")
    add(db, BOSS, role=Role.SENDER, emergency=True)
    ctx = context(db, post())
    assert ctx.emergency
    assert decide(ctx).action is Action.ACCEPT
    with db.session() as s:
        members.set_flags(s, lists.get(s, LIST), BOSS, emergency=False)
    assert judge(db, post()).action is Action.HOLD


def test_recipients_are_counted_once_across_lists_and_cases(db: Database) -> None:
    make_list(db, members_=["ann@one.example", "bob@one.example"])
    board = make_list(db, "board@lists.example.org", members_=["ANN@one.example", "dan@x.example"])
    with db.reading() as s:
        one, two = lists.get(s, LIST), lists.get(s, board)
        assert members.recipient_count(s, [one.id]) == 2
        assert members.recipient_count(s, [one.id, two.id]) == 3  # ann once
        # owners and senders are not recipients
        assert members.recipient_count(s, [two.id]) == 2


@pytest.mark.parametrize(
    ("now", "held"),
    [
        (datetime(2026, 12, 24, 0, 0, tzinfo=UTC), True),
        (datetime(2026, 12, 31, 12, 0, tzinfo=UTC), True),
        (datetime(2027, 1, 6, 23, 59, tzinfo=UTC), True),
        (datetime(2027, 1, 7, 0, 0, tzinfo=UTC), False),
        (datetime(2026, 12, 23, 23, 59, tzinfo=UTC), False),
    ],
)
def test_a_list_blackout_may_wrap_the_year_end(db: Database, now: datetime, held: bool) -> None:
    make_list(db, senders=[BOSS], blackout="12-24..01-06")
    decision = judge(db, post(), now=now)
    assert (decision.action is Action.HOLD) == held
    if held:
        assert decision.reason.startswith("blackout: ")
        assert "list window 12-24..01-06" in decision.reason


def test_site_blackout_days_are_counted_in_the_site_timezone(db: Database) -> None:
    make_list(db, senders=[BOSS])
    now = datetime(2026, 6, 30, 13, 0, tzinfo=UTC)  # 1 July, 01:00 in Auckland
    summer = ("07-01..07-31",)
    utc = PolicySettings(blackout=summer, timezone="UTC")
    auckland = PolicySettings(blackout=summer, timezone="Pacific/Auckland")
    assert judge(db, post(), now=now, policy=utc).action is Action.ACCEPT
    held = judge(db, post(), now=now, policy=auckland)
    assert held.action is Action.HOLD
    assert "site-wide window 07-01..07-31" in held.reason


def test_an_emergency_sender_passes_blackouts(db: Database) -> None:
    make_list(db, blackout="05-01..05-31")
    add(db, BOSS, role=Role.SENDER, emergency=True)
    add(db, "other@example.org", role=Role.SENDER)
    assert judge(db, post()).action is Action.ACCEPT
    assert judge(db, post("other@example.org")).action is Action.HOLD


def test_links_outside_the_allowlist_hold_the_post_naming_the_hosts(db: Database) -> None:
    make_list(db, senders=[BOSS], external_links="hold", link_allowlist="example.org")
    text = "Docs: https://docs.example.org/plan and http://example.org/ and mailto:x@evil.example"
    assert judge(db, post(body=text)).action is Action.ACCEPT
    html = (
        '<p><a href="https://evil.example/login">log in</a> <img src="//Tracker.Example.NET/p.gif">'
        ' or visit http://bare.example/x, <a href="https://docs.example.org/">docs</a>'
        ' <a href="#top">top</a> <a href="/relative">here</a></p>'
    )
    held = judge(db, post(content_type="text/html", body=html))
    assert held.action is Action.HOLD
    assert held.reasons == (
        "links to hosts outside the list's allowlist: bare.example, evil.example,"
        " tracker.example.net",
    )
    # a look-alike of an allowed host is not a subdomain of it
    assert judge(db, post(body="https://notexample.org/")).action is Action.HOLD
    configure(db, external_links="allow")
    assert judge(db, post(content_type="text/html", body=html)).action is Action.ACCEPT


def test_hold_reasons_accumulate_and_a_rejection_still_ends_the_run(db: Database) -> None:
    make_list(
        db,
        members_=MEMBERS,
        approval_threshold="1",
        blackout="05-01..05-31",
        external_links="hold",
    )
    add(db, BOSS, role=Role.SENDER)
    held = judge(db, post(body="https://evil.example/"))
    assert held.action is Action.HOLD
    assert [r.split(":")[0] for r in held.reasons] == [
        "needs approval",
        "blackout",
        "links to hosts outside the list's allowlist",
    ]
    assert held.reason == "; ".join(held.reasons)
    configure(db, max_message_kb="1")
    refused = judge(db, post(body="https://evil.example/\n" + "x" * 2000))
    assert refused.action is Action.REJECT
    assert refused.reply is not None and refused.reply.code == 552


# -- conversion --------------------------------------------------------------------------


def test_html_becomes_readable_text_with_links_kept_and_scripts_dropped() -> None:
    html = textwrap.dedent("""
        <html><head><title>x</title><style>p { color: red }</style></head><body>
        <script>alert("no")</script>
        <h1>Budget   2027</h1>
        <p>Read <a href="https://example.org/plan?a=1&amp;b=2">the plan</a> now.<br>Thanks</p>
        <ul><li>one</li><li>two</li></ul>
        <p><a href="https://example.org/">https://example.org/</a> &amp; caf&eacute;</p>
        </body></html>
    """)
    assert convert.html_to_text(html) == (
        "Budget 2027\n\nRead the plan <https://example.org/plan?a=1&b=2> now.\nThanks\n\n"
        "- one\n- two\n\nhttps://example.org/ & café\n"
    )


def test_an_alternative_is_converted_to_its_plain_part() -> None:
    raw = multipart(
        "multipart/alternative", ("text/plain", "", "Plain words."), ("text/html", "", HTML)
    )
    converted = convert.to_plain_text(mail.parse(raw))
    assert converted.get_content_type() == "text/plain"
    assert not converted.is_multipart()
    assert converted.get_content() == "Plain words.\n"
    assert converted["Subject"] == "Budget"


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("nonmember_action", "Discard", "discard"),
        ("nonmember_action", "default", "default"),
        ("require_authenticated_sender", "YES", "true"),
        ("plain_text_only", "off", "false"),
        ("allow_attachments", "0", "false"),
        ("max_message_kb", "512", "512"),
        ("content_filter", "convert", "convert"),
        ("allowed_mime_types", " Text/Plain, image/*,text/plain", "text/plain,image/*"),
        ("approval_threshold", "250", "250"),
        ("blackout", "07-01..07-31, 12-24..01-06", "07-01..07-31,12-24..01-06"),
        ("blackout", "", ""),
        ("external_links", "hold", "hold"),
        ("link_allowlist", "Example.org, bücher.example", "example.org,xn--bcher-kva.example"),
        ("hold_expiry_days", "7", "7"),
    ],
)
def test_settings_are_parsed_normalized_and_audited(
    db: Database, key: str, value: str, shown: str
) -> None:
    make_list(db)
    configure(db, **{key: value})
    with db.reading() as s:
        mlist = lists.get(s, LIST)
        assert lists.settings_of(mlist)[key] == shown


def test_site_policy_is_validated_when_loaded() -> None:
    good = config.from_dict({"policy": {"blackout": ["07-01..07-31"], "timezone": "Europe/Oslo"}})
    assert good.policy.windows() == (((7, 1), (7, 31)),)
    with pytest.raises(ConfigError, match=r"\[policy\] blackout: '07-32\.\.08-01' is not a window"):
        config.from_dict({"policy": {"blackout": ["07-32..08-01"]}})
    with pytest.raises(ConfigError, match=r"\[policy\] timezone: 'Mars/Olympus' is not an IANA"):
        config.from_dict({"policy": {"timezone": "Mars/Olympus"}})
    env = config.from_dict({}, env={"LISTSERV_POLICY_BLACKOUT": "01-01..01-02, 03-01..03-02"})
    assert env.policy.blackout == ("01-01..01-02", "03-01..03-02")


# -- the CLI -----------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name in [n for n in os.environ if n.startswith("LISTSERV_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "listserv.toml"
    path.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/db.sqlite"\n', encoding="utf-8")

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, ["--config", str(path), *args])

    assert invoke("init").exit_code == 0
    assert invoke("lists", "create", LIST, "--policy", "announce").exit_code == 0
    return invoke


def one_error_line(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (
            "colour",
            "red",
            "unknown setting 'colour'; settable: allow_attachments, allowed_mime_types,",
        ),
        (
            "plain_text_only",
            "maybe",
            "plain_text_only: 'maybe' is not true or false (yes/no, on/off, 1/0)",
        ),
        (
            "max_message_kb",
            "-1",
            "max_message_kb: '-1' is not a whole number of KB, 0 for the server's limit",
        ),
        (
            "approval_threshold",
            "ten",
            "approval_threshold: 'ten' is not a whole number of recipients",
        ),
        ("content_filter", "strip", "content_filter: 'strip' is not one of reject, convert"),
        (
            "nonmember_action",
            "accept",
            "nonmember_action: 'accept' is not one of hold, reject, discard, default",
        ),
        ("external_links", "block", "external_links: 'block' is not one of allow, hold"),
        (
            "blackout",
            "07-01..07-31,13-01..13-02",
            "blackout: '13-01..13-02' is not a window; allowed: comma-separated windows MM-DD",
        ),
        ("blackout", "July", "blackout: 'July' is not a window"),
        (
            "allowed_mime_types",
            "text/plain,pdf",
            "allowed_mime_types: 'pdf' is not a MIME type; allowed: comma-separated MIME types",
        ),
        (
            "link_allowlist",
            "example.org,bad host",
            "link_allowlist: 'bad host' is not a host name; allowed: comma-separated host names",
        ),
        ("hold_expiry_days", "0", "hold_expiry_days: '0' is not a whole number of days, 1 to 3650"),
    ],
)
def test_lists_set_bad_key_or_value_is_one_line_saying_what_is_allowed(
    run: Any, key: str, value: str, expected: str
) -> None:
    before = run("lists", "show", LIST).stdout
    line = one_error_line(run("lists", "set", "--", LIST, key, value))
    assert line.startswith(f"Error: {expected}")
    assert run("lists", "show", LIST).stdout == before


def test_lists_set_and_show_every_policy_setting(run: Any, tmp_path: Path) -> None:
    result = run("lists", "set", LIST, "blackout", "12-24..01-06")
    assert result.stdout == f"{LIST}: blackout = 12-24..01-06\n"
    assert run("lists", "set", LIST, "nonmember_action", "hold").exit_code == 0
    shown = run("lists", "show", LIST).stdout
    for key, value in [
        ("blackout", "12-24..01-06"),
        ("nonmember_action", "hold"),
        ("require_authenticated_sender", "false"),
        ("max_message_kb", "0"),
        ("content_filter", "reject"),
        ("allow_attachments", "true"),
        ("approval_threshold", "0"),
        ("external_links", "allow"),
        ("hold_expiry_days", "14"),
    ]:
        assert re.search(rf"^{key}: +{re.escape(value)}$", shown, re.M), key
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    audit = conn.execute(
        "SELECT action, detail FROM audit_log WHERE action = 'list.set'"
    ).fetchall()
    conn.close()
    assert audit == [("list.set", "blackout=12-24..01-06"), ("list.set", "nonmember_action=hold")]


def test_members_add_and_set_moderation_and_emergency(run: Any) -> None:
    added = run("members", "add", LIST, "boss@example.org", "--role", "sender", "--emergency")
    assert added.stdout == "added sender: boss@example.org\n"
    assert run("members", "add", LIST, "ann@example.org", "--moderation", "hold").exit_code == 0
    changed = run("members", "set", LIST, "ann@example.org", "--moderation", "discard")
    assert changed.stdout == "ann@example.org member moderation=discard\n"
    cleared = run("members", "set", LIST, "ann@example.org", "--moderation", "none")
    assert cleared.stdout == "ann@example.org member moderation=default\n"
    off = run("members", "set", LIST, "boss@example.org", "--no-emergency")
    assert off.stdout == "boss@example.org sender moderation=default\n"
    assert one_error_line(run("members", "set", LIST, "ann@example.org", "--emergency")).startswith(
        "Error: ann@example.org is not an authorized sender of staff@lists.example.org"
    )
    assert "nothing to change" in one_error_line(run("members", "set", LIST, "ann@example.org"))
    refused = run("members", "add", LIST, "x@example.org", "--emergency")
    assert "only an authorized sender (role sender)" in one_error_line(refused)
    bad = run("members", "set", LIST, "ann@example.org", "--moderation", "maybe")
    assert bad.exit_code == 2 and "'maybe' is not one of" in bad.stderr
