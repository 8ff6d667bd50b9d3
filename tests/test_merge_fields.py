"""Merge fields: $name, $address and $unsubscribe_url filled per recipient."""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import make_list, message
from sink import Sink
from test_e2e import send
from test_prepare import verifier

from listserv import lists, mail, members, unsubscribe_links
from listserv.cli import cli
from listserv.db import Database
from listserv.distribute import dkim, merge, prepare
from listserv.models import DeliveryMode, MailingList, Post

VIEW = prepare.ListView(
    name="staff",
    domain="lists.example.org",
    list_id="staff.lists.example.org",
    description="Staff",
    subject_prefix="[staff]",
    footer="",
    delivery_mode=DeliveryMode.PERSONALIZED,
    merge_fields=True,
)
ANN = "ann@one.example"
NAMES = {ANN: "Zoë Łukasz", "bob@two.example": "José", "cat@two.example": ""}

ALTERNATIVE = message(
    """
    From: boss@example.org
    Subject: News for $name
    MIME-Version: 1.0
    Content-Type: multipart/alternative; boundary="b"

    --b
    Content-Type: text/plain; charset=us-ascii

    Dear $name (${address}),
    the news.
    --b
    Content-Type: text/html; charset=us-ascii

    <html><body><p>Dear $name, <a href="mailto:${address}">you</a>.</p></body></html>
    --b--
    """
)
#: a first part (which gets the footer), then an inline latin-1 part decorate leaves alone
LATIN1 = message(
    """
    From: boss@example.org
    Subject: Hi
    MIME-Version: 1.0
    Content-Type: multipart/mixed; boundary="m"

    --m
    Content-Type: text/plain; charset=utf-8
    Content-Transfer-Encoding: 8bit

    Grüße, $name.
    --m
    Content-Type: text/plain; charset=iso-8859-1
    Content-Transfer-Encoding: quoted-printable
    Content-Disposition: inline

    Ch=E8re $name, voil=E0.
    --m--
    """
)
BASE64_TEXT = "Hello $name,\nbase64 keeps its encoding.\n"
BASE64 = message(
    f"""
    From: boss@example.org
    Subject: Hi
    MIME-Version: 1.0
    Content-Type: multipart/mixed; boundary="m"

    --m
    Content-Type: text/plain; charset=us-ascii

    First.
    --m
    Content-Type: text/plain; charset=utf-8
    Content-Transfer-Encoding: base64
    Content-Disposition: inline

    {base64.b64encode(BASE64_TEXT.encode()).decode()}
    --m--
    """
)
SIGNED = message(
    """
    From: boss@example.org
    Subject: Signed for $name
    MIME-Version: 1.0
    Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary="s"

    --s
    Content-Type: text/plain; charset=us-ascii

    Signed text for $name.
    --s
    Content-Type: application/pgp-signature

    -----BEGIN PGP SIGNATURE-----
    iQEzBAEBCAAdFiEE
    -----END PGP SIGNATURE-----
    --s--
    """
)


def plain(text: str, subject: str = "Hi", charset: str = "us-ascii", cte: str = "7bit") -> bytes:
    msg = EmailMessage(policy=mail.POLICY)
    msg["From"] = "boss@example.org"
    msg["Subject"] = subject
    msg.set_content(text, charset=charset, cte=cte)
    return mail.to_bytes(msg)


def copies(
    raw: bytes,
    recipients: list[str],
    view: prepare.ListView = VIEW,
    names: dict[str, str] | None = None,
    unsubscribe: merge.UnsubscribeLinks | None = None,
) -> list[EmailMessage]:
    template = prepare.render(raw, view, None)
    personalizer = prepare.Personalizer(
        template, view, NAMES if names is None else names, unsubscribe
    )
    return [mail.parse(personalizer.render(r)) for r in recipients]


def texts(msg: EmailMessage) -> list[str]:
    return [
        p.get_content().replace("\r\n", "\n")
        for p in msg.walk()
        if p.get_content_maintype() == "text"
    ]


def part_headers(msg: EmailMessage) -> list[tuple[str, str | None, str | None]]:
    return [
        (p.get_content_type(), p.get_param("charset"), mail.header(p, "Content-Transfer-Encoding"))  # type: ignore[arg-type]
        for p in msg.walk()
        if p.get_content_maintype() == "text"
    ]


def test_fields_fill_both_parts_of_a_multipart_alternative_html_escaped() -> None:
    names = {ANN: "Ann <O'Neil & Co>"}
    [msg] = copies(ALTERNATIVE, [ANN], names=names)
    text, html = texts(msg)
    assert text.startswith(f"Dear Ann <O'Neil & Co> ({ANN}),\nthe news.\n-- \n")
    assert f"You are subscribed as {ANN}." in text
    assert html.startswith(
        f'<html><body><p>Dear Ann &lt;O&#x27;Neil &amp; Co&gt;, <a href="mailto:{ANN}">you</a>.</p>'
    )
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert msg["Subject"] == "[staff] News for Ann <O'Neil & Co>"


def test_each_recipient_gets_their_own_values() -> None:
    recipients = [ANN, "bob@two.example", "cat@two.example", "dan@unknown.example"]
    found = [texts(m)[0].split("\n")[0] for m in copies(ALTERNATIVE, recipients)]
    assert found == [
        f"Dear Zoë Łukasz ({ANN}),",
        "Dear José (bob@two.example),",
        "Dear  (cat@two.example),",  # an empty display name is an empty $name
        "Dear  (dan@unknown.example),",  # no name known: the same
    ]


def test_a_latin1_part_keeps_its_charset_when_the_name_fits_and_turns_utf8_when_not() -> None:
    jose, ann = copies(LATIN1, ["bob@two.example", ANN])
    assert texts(jose)[1] == "Chère José, voilà."
    assert texts(ann)[1] == "Chère Zoë Łukasz, voilà."
    assert texts(ann)[0].startswith("Grüße, Zoë Łukasz.\n-- \n")
    assert part_headers(jose)[1] == ("text/plain", "iso-8859-1", "quoted-printable")
    assert part_headers(ann)[1] == ("text/plain", "utf-8", "quoted-printable")
    second = list(ann.iter_parts())[1]
    assert second.get_content_disposition() == "inline"  # other part headers stay


def mixed(headers: str, body: bytes) -> bytes:
    """A post whose second part, inline, is one decorate leaves alone (the footer
    goes into the first), so what comes out is merge's doing alone."""
    head = message(
        f"""
        From: boss@example.org
        Subject: Hi
        MIME-Version: 1.0
        Content-Type: multipart/mixed; boundary="m"

        --m
        Content-Type: text/plain; charset=us-ascii

        First.
        --m
        {headers.replace(chr(10), chr(10) + " " * 8)}
        Content-Disposition: inline

        """
    )
    return head + body + b"\r\n--m--\r\n"


def test_an_8bit_part_stays_8bit() -> None:
    raw = mixed(
        "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit",
        "Grüße, $name.".encode(),
    )
    [msg] = copies(raw, [ANN])
    assert texts(msg)[1] == "Grüße, Zoë Łukasz."
    assert part_headers(msg)[1] == ("text/plain", "utf-8", "8bit")


def test_a_7bit_part_with_a_non_ascii_name_becomes_utf8_quoted_printable() -> None:
    raw = mixed("Content-Type: text/plain; charset=us-ascii", b"Hello $name.")
    ascii_copy, accented = copies(raw, ["bob.smith@two.example", ANN], names={ANN: "Zoë"})
    assert texts(accented)[1] == "Hello Zoë."
    assert part_headers(accented)[1] == ("text/plain", "utf-8", "quoted-printable")
    assert texts(ascii_copy)[1] == "Hello ."
    assert part_headers(ascii_copy)[1] == ("text/plain", "us-ascii", None)  # as it came


def test_a_long_line_in_a_7bit_part_turns_quoted_printable() -> None:
    raw = mixed("Content-Type: text/plain", b"${name}" + b"x" * 991)
    [msg] = copies(raw, [ANN], names={ANN: "Ann Long"})
    assert texts(msg)[1] == "Ann Long" + "x" * 991
    assert part_headers(msg)[1] == ("text/plain", None, "quoted-printable")
    assert max(len(line) for line in mail.to_bytes(msg).split(b"\r\n")) <= 78


def test_a_non_ascii_name_in_the_subject_is_rfc_2047_encoded() -> None:
    [msg] = copies(plain("Body.\n", subject="Hello $name, ${address}"), [ANN])
    assert msg["Subject"] == f"[staff] Hello Zoë Łukasz, {ANN}"
    [raw_subject] = [str(v) for k, v in msg.raw_items() if k.lower() == "subject"]
    assert raw_subject.isascii() and "=?utf-8?" in raw_subject


def test_unknown_fields_and_double_dollars_are_left_as_written() -> None:
    body = "Pay $price now, $$ or $$name, $NAME, $names, ${nope}, ${name, $ name, $address.\n"
    [msg] = copies(plain(body, subject="$$ $price $name"), [ANN])
    assert texts(msg)[0].startswith(
        f"Pay $price now, $$ or $$name, $NAME, $names, ${{nope}}, ${{name, $ name, {ANN}.\n"
    )
    assert msg["Subject"] == "[staff] $$ $price Zoë Łukasz"


def test_unsubscribe_url_is_left_as_written_without_links_and_filled_with_them() -> None:
    raw = plain("Leave: $unsubscribe_url ($name)\n")
    [without] = copies(raw, [ANN])
    assert texts(without)[0].startswith("Leave: $unsubscribe_url (Zoë Łukasz)\n")
    links = merge.UnsubscribeLinks("https://lists.example.org/", b"s3cret", 7)
    ann, bob = copies(raw, [ANN, "bob@two.example"], unsubscribe=links)
    url = re.escape("https://lists.example.org/unsubscribe/")
    found = [re.match(f"Leave: ({url}[A-Za-z0-9_-]+) ", texts(m)[0]) for m in (ann, bob)]
    assert found[0] is not None and found[1] is not None
    assert found[0][1] == links.url(ANN) != found[1][1] == links.url("bob@two.example")
    token = found[0][1].rpartition("/")[2]
    assert unsubscribe_links.read_token(b"s3cret", token) == (7, ANN)  # the one-click token
    other = merge.UnsubscribeLinks("https://lists.example.org", b"other", 7)
    assert other.url(ANN) != links.url(ANN)  # the token depends on the secret


def test_merge_fields_off_leaves_fields_as_written_on_the_fast_path() -> None:
    view = dataclasses.replace(VIEW, merge_fields=False)
    template = prepare.render(ALTERNATIVE, view, None)
    personalizer = prepare.Personalizer(template, view, NAMES)
    assert not personalizer.merges
    assert personalizer.fits_fast_path(ANN)
    msg = mail.parse(personalizer.render(ANN))
    assert texts(msg)[0].startswith("Dear $name (${address}),\n")
    assert msg["Subject"] == "[staff] News for $name"


def test_a_post_without_fields_stays_on_the_fast_path(key: dkim.SigningKey) -> None:
    raw = plain("No fields here, only $5 and $price.\n")
    personalizer = prepare.Personalizer(prepare.render(raw, VIEW, None), VIEW, NAMES)
    assert not personalizer.merges
    assert personalizer.fits_fast_path(ANN)
    template = personalizer.signing_template(dkim.Signer(key))
    assert template is not None
    header_end = personalizer.render(ANN).find(b"\r\n\r\n")
    assert template.shared > header_end + len(b"\r\n\r\nNo fields here")


def test_multipart_signed_is_left_byte_for_byte() -> None:
    [msg] = copies(SIGNED, [ANN])
    assert msg["Subject"] == "[staff] Signed for Zoë Łukasz"
    assert msg.get_content_type() == "multipart/mixed"  # wrapped by decorate, as ever
    inner, footer = msg.iter_parts()
    signed = SIGNED.partition(b"\r\n\r\n")[2]
    assert inner.get_content_type() == "multipart/signed"
    assert signed.rstrip(b"\r\n") in mail.to_bytes(msg)
    assert "Signed text for $name." in texts(msg)[0]
    assert f"You are subscribed as {ANN}." in footer.get_content()


def test_a_part_in_an_unknown_charset_is_left_as_written() -> None:
    raw = message(
        """
        From: boss@example.org
        Subject: Hi $name
        MIME-Version: 1.0
        Content-Type: text/plain; charset=x-unknown-charset

        Hello $name.
        """
    )
    [msg] = copies(raw, [ANN])
    assert msg["Subject"] == "[staff] Hi Zoë Łukasz"
    assert b"\r\n\r\nHello $name.\r\n" in mail.to_bytes(next(iter(msg.iter_parts())))


def test_a_value_that_reads_as_a_boundary_turns_the_part_base64() -> None:
    [msg] = copies(ALTERNATIVE.replace(b"Dear $name", b"$name"), [ANN], names={ANN: "--b--"})
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert texts(msg)[0].startswith(f"--b-- ({ANN}),\nthe news.\n")
    assert part_headers(msg)[0][2] == "base64"


def test_control_characters_in_a_name_become_spaces() -> None:
    names = {ANN: "Eve\r\nBcc: victim@example.org"}
    [msg] = copies(plain("Hi $name.\n", subject="Hi $name"), [ANN], names=names)
    assert msg["Subject"] == "[staff] Hi Eve  Bcc: victim@example.org"
    assert msg["Bcc"] is None
    assert texts(msg)[0].startswith("Hi Eve  Bcc: victim@example.org.\n")


# Signing


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> dkim.SigningKey:
    return dkim.generate_key(tmp_path_factory.mktemp("keys"), VIEW.domain, "s1", bits=1024)


SIGNED_CASES = [ALTERNATIVE, LATIN1, BASE64, plain("Hello $name.\n"), SIGNED]


@pytest.mark.parametrize("canon", ["relaxed", "simple"])
@pytest.mark.parametrize(
    "raw", SIGNED_CASES, ids=["alternative", "latin1", "base64", "7bit", "signed"]
)
def test_every_merged_copy_verifies(key: dkim.SigningKey, canon: Any, raw: bytes) -> None:
    signer = dkim.Signer(key, header_canon=canon, body_canon=canon)
    personalizer = prepare.Personalizer(prepare.render(raw, VIEW, None), VIEW, NAMES)
    recipients = [ANN, "bob@two.example", "cat@two.example", "zoë@three.example"]
    verifies: Callable[[bytes], bool] = verifier(key)
    assert personalizer.merges

    signed = personalizer.render_all(recipients, signer)

    for recipient, data in zip(recipients, signed, strict=True):
        assert verifies(data), recipient
        assert data.endswith(personalizer.render(recipient))
        flipped = data[:-3] + bytes([data[-3] ^ 1]) + data[-2:]
        assert not verifies(flipped)


@pytest.mark.parametrize("canon", ["relaxed", "simple"])
def test_merged_copies_hash_the_shared_part_once_and_sign_as_in_full(
    key: dkim.SigningKey, canon: Any
) -> None:
    signer = dkim.Signer(key, header_canon=canon, body_canon=canon)
    raw = ALTERNATIVE.replace(b"Subject: News for $name", b"Subject: News")
    personalizer = prepare.Personalizer(prepare.render(raw, VIEW, None), VIEW, NAMES)
    template = personalizer.signing_template(signer)
    assert template is not None
    first = personalizer.render(ANN)
    assert template.shared > first.find(b"\r\n\r\n")  # the headers are hashed once
    for recipient in [ANN, "bob@two.example", "cat@two.example"]:
        data = personalizer.render(recipient)
        assert template.sign(data, timestamp=1_700_000_000) == signer.sign(
            data, timestamp=1_700_000_000
        )


# The setting, its column, and a post through the daemon


def test_merge_fields_is_set_and_shown_by_the_cli(tmp_path: Path) -> None:
    config = tmp_path / "listserv.toml"
    config.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path}/db.sqlite"\n[dkim]\nkeys_dir = "{tmp_path}/k"\n',
        encoding="utf-8",
    )

    def run(*args: str) -> str:
        result = CliRunner().invoke(cli, ["--config", str(config), *args])
        assert result.exit_code == 0, result.output
        return result.stdout

    run("init")
    run("lists", "create", "staff@lists.example.org")
    assert re.search(
        r"^merge_fields:\s+false$", run("lists", "show", "staff@lists.example.org"), re.M
    )
    assert run("lists", "set", "staff@lists.example.org", "merge_fields", "yes") == (
        "staff@lists.example.org: merge_fields = true\n"
    )
    assert re.search(
        r"^merge_fields:\s+true$", run("lists", "show", "staff@lists.example.org"), re.M
    )
    bad = CliRunner().invoke(
        cli,
        [
            "--config",
            str(config),
            "lists",
            "set",
            "staff@lists.example.org",
            "merge_fields",
            "maybe",
        ],
    )
    assert bad.exit_code == 1
    assert "merge_fields: 'maybe' is not true or false" in bad.stderr


def test_the_snapshot_keeps_merge_fields_and_old_snapshots_read_as_off(db: Database) -> None:
    address = make_list(db, merge_fields="true")
    with db.reading() as s:
        view = prepare.ListView.of(lists.get(s, address))
    assert view.merge_fields
    assert prepare.ListView.from_snapshot(view.snapshot()) == view
    old = {k: v for k, v in view.snapshot().items() if k != "merge_fields"}
    assert not prepare.ListView.from_snapshot(old).merge_fields


def test_upgrade_from_0004_adds_merge_fields_off(tmp_path: Path) -> None:
    from alembic import command

    path = tmp_path / "old.db"
    db = Database(f"sqlite:///{path}")
    cfg = db._alembic_config()
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
        conn.exec_driver_sql(
            "INSERT INTO mailing_lists (local_part, domain, posting_policy, delivery_mode,"
            " subject_prefix, description, footer, created_at) VALUES"
            " ('staff', 'lists.example.org', 'members', 'shared', '', '', '', '2026-01-01')"
        )
    db.dispose()
    db = Database(f"sqlite:///{path}")
    db.upgrade()
    with db.reading() as s:
        assert s.scalars(sa.select(MailingList.merge_fields)).all() == [False]
        autoincrement = s.execute(
            sa.text("SELECT sql FROM sqlite_master WHERE name = 'mailing_lists'")
        ).scalar_one()
    assert "AUTOINCREMENT" in autoincrement
    db.dispose()


MEMBERS = {"ann@one.example": "Ann Ö", "bob@one.example": "", "cat@two.example": "Cat"}


async def test_a_shared_list_sends_a_post_with_fields_personalized_with_names(
    db: Database, sink: Sink, daemon_factory: Any, tmp_path: Path
) -> None:
    key = dkim.generate_key(tmp_path / "dkim", "lists.example.org", "test", bits=1024)
    address = make_list(db, senders=["boss@example.org"], merge_fields="true")
    with db.session() as s:
        mlist = lists.get(s, address)
        for member, name in MEMBERS.items():
            members.add(s, mlist, [member], name=name)
    daemon = await daemon_factory()
    post = message(
        """
        From: Boss <boss@example.org>
        To: staff@lists.example.org
        Subject: For $name
        Message-ID: <m1@example.org>
        MIME-Version: 1.0
        Content-Type: text/plain; charset=utf-8

        Dear $name, this is for $address only.
        """
    )
    await send(daemon.port, post)
    await sink.wait_for_recipients(len(MEMBERS))
    assert sorted(len(r.rcpt_tos) for r in sink.received) == [1, 1, 1]  # one copy each
    verifies = verifier(key)
    for received in sink.received:
        (rcpt,) = received.rcpt_tos
        assert verifies(received.data)
        msg = received.message()
        assert msg["Subject"] == f"[staff] For {MEMBERS[rcpt]}"
        body = msg.get_body(("plain",))
        assert body is not None
        assert body.get_content().startswith(f"Dear {MEMBERS[rcpt]}, this is for {rcpt} only.")
    with db.reading() as s:
        queued = s.scalars(sa.select(Post.delivery_mode)).all()
    assert queued == [DeliveryMode.PERSONALIZED]
