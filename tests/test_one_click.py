"""RFC 8058 one-click unsubscribe: the token, the rendered headers, and the real HTTP
endpoint (aiohttp on 127.0.0.1, port 0) against a real database."""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import dkim as dkimpy
import pytest
import sqlalchemy as sa
from aiohttp import web
from click.testing import CliRunner
from conftest import make_list, message

from listserv import lists, mail, sitesecret, unsubscribe_links
from listserv.cli import cli
from listserv.db import Database
from listserv.distribute import dkim, prepare
from listserv.http import make_app
from listserv.models import AuditEntry, DeliveryMode, Member, Role, Unsubscription
from listserv.unsubscribe_links import BadToken, UnknownToken, make_token, read_token

SECRET = b"k" * 32
ANN = "ann@one.example"
BOB = "bob@two.example"
BASE = "https://lists.example.org"

POST = message(
    """
    From: Boss <boss@example.org>
    To: staff@lists.example.org
    Subject: Budget
    Message-ID: <m1@example.org>
    Date: Mon, 23 Nov 2026 10:00:00 +0000
    MIME-Version: 1.0
    Content-Type: text/plain; charset=us-ascii

    The budget is approved.
    """
)
VIEW = prepare.ListView(
    name="staff",
    domain="lists.example.org",
    list_id="staff.lists.example.org",
    description="Staff",
    subject_prefix="[staff]",
    footer="",
    delivery_mode=DeliveryMode.PERSONALIZED,
    id=7,
    unsubscribe_base=BASE,
    one_click=True,
)
LINKS = unsubscribe_links.UnsubscribeLinks(BASE, SECRET, 7)


# -- the token ----------------------------------------------------------------


@pytest.mark.parametrize("address", [ANN, "Zoë.Łukasz@bücher.example", "a+b/c=d@x.example"])
def test_a_token_round_trips_and_is_url_safe(address: str) -> None:
    token = make_token(SECRET, 7, address)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert read_token(SECRET, token) == (7, address)


def test_a_token_is_compact() -> None:
    # version, list id, the address, a 128-bit MAC: 39 bytes, 52 characters
    assert len(make_token(SECRET, 7, "member@example.org")) == 52


def test_every_changed_character_of_a_token_is_refused() -> None:
    token = make_token(SECRET, 7, ANN)
    for at in range(len(token)):
        swapped = "A" if token[at] != "A" else "B"
        tampered = token[:at] + swapped + token[at + 1 :]
        with pytest.raises((BadToken, UnknownToken)):
            read_token(SECRET, tampered)


def test_a_token_for_another_address_or_list_cannot_be_made_without_the_secret() -> None:
    raw = base64.urlsafe_b64decode(make_token(SECRET, 7, ANN) + "==")
    # the same MAC on another address: a forgery
    forged = raw[:5] + BOB.encode() + raw[-16:]
    with pytest.raises(UnknownToken):
        read_token(SECRET, base64.urlsafe_b64encode(forged).rstrip(b"=").decode())
    with pytest.raises(UnknownToken):
        read_token(b"another site's secret", make_token(SECRET, 7, ANN))
    with pytest.raises(UnknownToken):
        read_token(None, make_token(SECRET, 7, ANN))  # no secret made here yet


@pytest.mark.parametrize("token", ["", "!!!!", "abc", "A" * 20, "é" * 30, "A" * 2000])
def test_what_is_not_a_token_is_a_bad_token(token: str) -> None:
    with pytest.raises(BadToken):
        read_token(SECRET, token)


@pytest.mark.parametrize(
    ("url", "usable"),
    [
        ("", False),
        ("https://lists.example.org", True),
        ("https://lists.example.org/listserv/", True),
        ("http://lists.example.org", False),  # RFC 8058 wants https
        ("http://127.0.0.1:8080", True),  # loopback: tests, a local try-out
        ("http://localhost:8080", True),
        ("https://lists.example.org/?x=1", False),
        ("lists.example.org", False),
        ("ftp://lists.example.org", False),
    ],
)
def test_which_public_base_urls_carry_links(url: str, usable: bool) -> None:
    assert (unsubscribe_links.base_problem(url) is None) is usable
    assert bool(unsubscribe_links.usable_base(url)) is usable


# -- rendering ------------------------------------------------------------------


def test_each_copy_carries_its_own_signed_one_click_headers(tmp_path: Path) -> None:
    key = dkim.generate_key(tmp_path / "dkim", "lists.example.org", "test", bits=1024)
    signer = dkim.Signer(key)
    template = prepare.render(POST, VIEW, signer)
    personalizer = prepare.Personalizer(template, VIEW, {}, LINKS)
    copies = personalizer.render_all([ANN, BOB, "dan.with.a.long.local.part@three.example"], signer)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return key.public_txt().encode() if name.startswith(b"test._domainkey.") else None

    seen = set()
    for data, rcpt in zip(
        copies, [ANN, BOB, "dan.with.a.long.local.part@three.example"], strict=True
    ):
        msg = mail.parse(data)
        assert msg["List-Unsubscribe"] == (
            f"<{LINKS.url(rcpt)}>, <mailto:staff-leave@lists.example.org?subject=unsubscribe>"
        )
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert prepare.TOKEN_PLACEHOLDER.encode() not in data
        assert dkimpy.verify(data, dnsfunc=dnsfunc)
        signed = msg["DKIM-Signature"].replace("\r\n", "").replace(" ", "")
        h_names = re.search(r"h=([^;]+)", signed)
        assert h_names is not None
        assert {"list-unsubscribe", "list-unsubscribe-post"} <= set(h_names[1].split(":"))
        seen.add(msg["List-Unsubscribe"])
    assert len(seen) == 3


def test_signing_a_copy_with_its_own_header_shares_the_body_and_matches_a_full_signature(
    tmp_path: Path,
) -> None:
    key = dkim.generate_key(tmp_path / "dkim", "lists.example.org", "test", bits=1024)
    signer = dkim.Signer(key)
    personalizer = prepare.Personalizer(prepare.render(POST, VIEW, None), VIEW, {}, LINKS)
    template = personalizer.signing_template(signer)
    assert template is not None and template.shared > 0
    copy_ = personalizer.render(ANN)
    assert not copy_.startswith(template._prefix)  # the header differs from the template's
    assert template.sign(copy_, timestamp=1) == signer.sign(copy_, timestamp=1)


def test_merged_copies_fill_unsubscribe_url_with_the_header_link(tmp_path: Path) -> None:
    raw = POST.replace(b"The budget is approved.", b"Leave: $unsubscribe_url")
    view = dataclasses.replace(VIEW, merge_fields=True)
    key = dkim.generate_key(tmp_path / "dkim", "lists.example.org", "test", bits=1024)
    signer = dkim.Signer(key)
    personalizer = prepare.Personalizer(prepare.render(raw, view, None), view, {}, LINKS)
    assert personalizer.merges
    (data,) = personalizer.render_all([ANN], signer)
    msg = mail.parse(data)
    body = msg.get_body(("plain",))
    assert body is not None
    assert f"Leave: {LINKS.url(ANN)}\n" in body.get_content().replace("\r\n", "\n")
    assert f"<{LINKS.url(ANN)}>" in msg["List-Unsubscribe"]
    assert dkimpy.verify(data, dnsfunc=lambda name, timeout=5: key.public_txt().encode())


def test_a_one_click_template_without_links_is_refused_not_sent_with_a_placeholder() -> None:
    with pytest.raises(ValueError, match="unsubscribe links"):
        prepare.Personalizer(prepare.render(POST, VIEW, None), VIEW, {}, None)


def test_a_mandatory_list_has_no_list_unsubscribe_and_its_footer_says_why() -> None:
    view = dataclasses.replace(
        VIEW, mandatory=True, one_click=False, delivery_mode=DeliveryMode.SHARED
    )
    msg = mail.parse(prepare.render(POST, view, None))
    assert "List-Unsubscribe" not in msg
    assert "List-Unsubscribe-Post" not in msg
    body = msg.get_body(("plain",))
    assert body is not None
    text = body.get_content()
    assert "mandatory" in text and "cannot be unsubscribed" in text
    assert "To unsubscribe" not in text
    assert msg["List-Help"] == "<mailto:staff-request@lists.example.org?subject=help>"


def test_without_links_the_header_is_mailto_only_and_the_footer_keeps_the_opt_out() -> None:
    view = dataclasses.replace(
        VIEW, one_click=False, unsubscribe_base="", delivery_mode=DeliveryMode.SHARED
    )
    msg = mail.parse(prepare.render(POST, view, None))
    assert msg["List-Unsubscribe"] == "<mailto:staff-leave@lists.example.org?subject=unsubscribe>"
    assert "List-Unsubscribe-Post" not in msg
    body = msg.get_body(("plain",))
    assert body is not None
    assert "To unsubscribe, send an e-mail to staff-leave@lists.example.org" in body.get_content()


def test_the_list_view_decides_one_click_and_the_delivery_mode(db: Database) -> None:
    plain = make_list(db, "plain@lists.example.org")
    off = make_list(db, "off@lists.example.org", one_click_unsubscribe="off")
    must = make_list(db, "must@lists.example.org", mandatory="yes")
    with db.reading() as s:
        views = {a: prepare.ListView.of(lists.get(s, a), BASE) for a in (plain, off, must)}
        no_base = prepare.ListView.of(lists.get(s, plain), "")
    assert views[plain].one_click and views[plain].delivery_mode is DeliveryMode.PERSONALIZED
    assert not views[off].one_click and views[off].delivery_mode is DeliveryMode.SHARED
    assert not views[must].one_click and views[must].mandatory
    assert not no_base.one_click and no_base.delivery_mode is DeliveryMode.SHARED
    # the snapshot a queued post keeps says the same
    again = prepare.ListView.from_snapshot(views[plain].snapshot())
    assert again == views[plain]
    old = views[plain].snapshot()
    for key in ("id", "mandatory", "unsubscribe_base", "one_click"):
        del old[key]
    assert not prepare.ListView.from_snapshot(old).one_click  # queued before: as it was


def test_lists_show_gives_the_effective_delivery_mode_and_why(tmp_path: Path) -> None:
    def config(base: str) -> Path:
        path = tmp_path / f"listserv-{len(base)}.toml"
        path.write_text(
            f'[database]\nurl = "sqlite:///{tmp_path}/db.sqlite"\n'
            f'[http]\npublic_base_url = "{base}"\n',
            encoding="utf-8",
        )
        return path

    def run(path: Path, *args: str) -> str:
        result = CliRunner().invoke(cli, ["--config", str(path), *args])
        assert result.exit_code == 0, result.output
        return result.stdout

    with_url, without = config(BASE), config("")
    run(with_url, "init")
    run(with_url, "lists", "create", "staff@lists.example.org")
    shown = run(with_url, "lists", "show", "staff@lists.example.org")
    assert re.search(r"^one_click_unsubscribe:\s+true$", shown, re.M)
    assert re.search(r"^effective_delivery_mode:\s+personalized \(one-click", shown, re.M)
    shown = run(without, "lists", "show", "staff@lists.example.org")
    assert re.search(
        r"^effective_delivery_mode:\s+shared \(no one-click unsubscribe: \[http\]"
        r" public_base_url is not set\)$",
        shown,
        re.M,
    )
    assert run(
        with_url, "lists", "set", "staff@lists.example.org", "one_click_unsubscribe", "off"
    ) == ("staff@lists.example.org: one_click_unsubscribe = false\n")
    shown = run(with_url, "lists", "show", "staff@lists.example.org")
    assert re.search(
        r"^effective_delivery_mode:\s+shared \(one_click_unsubscribe is off\)$", shown, re.M
    )


# -- the HTTP endpoint ----------------------------------------------------------------


@pytest.fixture
async def endpoint(db: Database) -> AsyncIterator[str]:
    """The real app on 127.0.0.1, port 0; yields its base URL."""
    runner = web.AppRunner(make_app(db), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def link_for(db: Database, address: str, list_address: str = "staff@lists.example.org") -> str:
    with db.session() as s:
        mlist = lists.get(s, list_address)
        secret = sitesecret.get(s, sitesecret.UNSUBSCRIBE)
        return unsubscribe_links.UnsubscribeLinks("", secret, mlist.id).url(address)


def member_rows(db: Database) -> list[str]:
    with db.reading() as s:
        return sorted(s.scalars(sa.select(Member.address).where(Member.role == Role.MEMBER)).all())


def unsubscriptions(db: Database) -> list[tuple[str, str]]:
    with db.reading() as s:
        return [(u.address, u.via) for u in s.scalars(sa.select(Unsubscription))]


async def request(method: str, url: str, **kwargs: Any) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as client, client.request(method, url, **kwargs) as r:
        return r.status, await r.text(), r.headers


async def test_get_shows_a_button_and_never_unsubscribes(db: Database, endpoint: str) -> None:
    make_list(db, members_=[ANN, BOB])
    path = link_for(db, ANN)
    for _ in range(3):  # a link scanner fetching it again and again
        status, text, headers = await request("GET", endpoint + path)
        assert status == 200
        assert '<form method="post">' in text
        assert 'name="List-Unsubscribe" value="One-Click"' in text
        assert ANN in text
    assert headers["Cache-Control"] == "no-store"
    assert member_rows(db) == [ANN, BOB]
    assert unsubscriptions(db) == []


async def test_post_unsubscribes_at_once_records_it_and_is_idempotent(
    db: Database, endpoint: str
) -> None:
    make_list(db, members_=[ANN, BOB])
    path = link_for(db, ANN)
    status, text, _ = await request("POST", endpoint + path, data={"List-Unsubscribe": "One-Click"})
    assert status == 200
    assert f"{ANN} is no longer subscribed" in text
    assert member_rows(db) == [BOB]
    assert unsubscriptions(db) == [(ANN, "one-click")]
    with db.reading() as s:
        audit = s.scalars(
            sa.select(AuditEntry.detail).where(AuditEntry.action == "members.unsubscribe")
        )
        assert list(audit) == [f"{ANN} via one-click"]
    status, _, _ = await request("POST", endpoint + path, data={"List-Unsubscribe": "One-Click"})
    assert status == 200  # again: the same answer, nothing more changed
    assert member_rows(db) == [BOB]
    assert unsubscriptions(db) == [(ANN, "one-click")]
    status, text, _ = await request("GET", endpoint + path)
    assert status == 200 and "is not subscribed" in text


async def test_post_as_multipart_form_data_works_too(db: Database, endpoint: str) -> None:
    make_list(db, members_=[ANN, BOB])
    form = aiohttp.FormData()
    form.add_field("List-Unsubscribe", "One-Click")
    form._is_multipart = True  # RFC 8058 §3.2 prefers multipart/form-data
    status, _, _ = await request("POST", endpoint + link_for(db, BOB), data=form)
    assert status == 200
    assert member_rows(db) == [ANN]


@pytest.mark.parametrize(
    "body",
    [None, {"List-Unsubscribe": "yes"}, {"other": "One-Click"}],
)
async def test_post_without_the_one_click_body_is_400_and_changes_nothing(
    db: Database, endpoint: str, body: Any
) -> None:
    make_list(db, members_=[ANN])
    status, text, _ = await request("POST", endpoint + link_for(db, ANN), data=body)
    assert status == 400
    assert "List-Unsubscribe=One-Click" in text
    assert member_rows(db) == [ANN]
    assert unsubscriptions(db) == []


async def test_forged_tampered_and_stale_tokens_change_nothing(db: Database, endpoint: str) -> None:
    make_list(db, members_=[ANN, BOB])
    gone = make_list(db, "gone@lists.example.org", members_=[ANN])
    good = link_for(db, ANN)
    stale = link_for(db, ANN, gone)
    with db.session() as s:
        lists.delete(s, lists.get(s, gone), force=True)
    token = good.rpartition("/")[2]
    tampered = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
    forged = make_token(b"guessed secret" * 3, 1, BOB)
    cases = {
        f"/unsubscribe/{tampered}": 404,
        f"/unsubscribe/{forged}": 404,
        stale: 404,
        "/unsubscribe/not-a-token": 400,
        "/unsubscribe/" + "A" * 900: 400,
    }
    for path, expected in cases.items():
        for method in ("GET", "POST"):
            status, text, headers = await request(
                method, endpoint + path, data={"List-Unsubscribe": "One-Click"}
            )
            assert status == expected, (path, method)
            assert headers["Content-Type"].startswith("text/plain")
            assert "link" in text
    assert member_rows(db) == [ANN, BOB]
    assert unsubscriptions(db) == []


async def test_a_mandatory_list_refuses_politely_and_the_member_stays(
    db: Database, endpoint: str
) -> None:
    make_list(db, members_=[ANN], mandatory="true")
    path = link_for(db, ANN)
    status, text, _ = await request("POST", endpoint + path, data={"List-Unsubscribe": "One-Click"})
    assert status == 403
    assert "mandatory" in text and "You stay subscribed" in text
    assert "staff-owner@lists.example.org" in text
    status, text, _ = await request("GET", endpoint + path)
    assert status == 200 and "mandatory" in text and "<form" not in text
    assert member_rows(db) == [ANN]
    assert unsubscriptions(db) == []


async def test_an_owner_keeps_the_owner_role_when_leaving_as_a_member(
    db: Database, endpoint: str
) -> None:
    make_list(db, members_=["owner@example.org"])
    status, _, _ = await request(
        "POST", endpoint + link_for(db, "owner@example.org"), data={"List-Unsubscribe": "One-Click"}
    )
    assert status == 200
    with db.reading() as s:
        roles = {r for (r,) in s.execute(sa.select(Member.role))}
    assert roles == {Role.OWNER}
