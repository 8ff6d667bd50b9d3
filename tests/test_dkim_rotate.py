"""`listserv dkim rotate`: a new selector, activated only once DNS publishes it, the old
one kept; mail signed before the rotation still verifies, and posts queued before it
are sent signed with the keys recorded when they were queued."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from click.testing import CliRunner, Result
from conftest import make_list, message, settings_for
from dnsserver import DnsServer
from sink import Sink

from listserv import lists, mail
from listserv.cli import cli
from listserv.config import DnsSettings
from listserv.db import Database
from listserv.distribute import dkim, prepare
from listserv.dns import Resolver
from listserv.models import InboundMessage, InboundState, Post, PostState

DOMAIN = "lists.example.org"
Run = Callable[..., Result]


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer(ttl=0) as s:
        yield s


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "dkim"


@pytest.fixture
def run(tmp_path: Path, server: DnsServer, keys_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    for name in list(os.environ):
        if name.startswith("LISTSERV_"):
            monkeypatch.delenv(name)
    path = tmp_path / "listserv.toml"
    path.write_text(
        f'[dkim]\nkeys_dir = "{keys_dir}"\n'
        f'[dns]\nnameservers = ["{server.address}"]\ntimeout = 2.0\ncache_size = 0\n',
        encoding="utf-8",
    )

    def run(*args: str) -> Result:
        return CliRunner().invoke(cli, ["--config", str(path), *args])

    return run


def ok(result: Result) -> list[str]:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.stdout.splitlines()


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ")
    return line


def publish(server: DnsServer, key: dkim.SigningKey) -> None:
    server.txt[key.dns_name()] = [key.public_txt()]


def dnsfunc_via(server: DnsServer) -> Callable[..., bytes | None]:
    """dkimpy's key look-up through our resolver and the loopback DNS server."""
    resolver = Resolver(DnsSettings(nameservers=(server.address,), timeout=2.0, cache_size=0))

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        found = resolver.txt(name.decode())
        return found[0] if found else None

    return dnsfunc


def selectors(signed: bytes) -> list[str]:
    """s= of each DKIM-Signature, top first."""
    found = []
    for value in message_headers(signed, "DKIM-Signature"):
        tags = dict(t.strip().split("=", 1) for t in "".join(value.split()).split(";") if "=" in t)
        found.append(tags["s"])
    return found


def message_headers(data: bytes, name: str) -> list[str]:
    return [str(v) for v in mail.parse(data).get_all(name, [])]


MESSAGE = message(
    """
    From: Alice <alice@example.net>
    To: staff@lists.example.org
    Subject: before the rotation
    Message-ID: <r1@example.net>

    Signed with the old key.
    """
)


def states(run: Run) -> dict[str, str]:
    rows = json.loads(run("dkim", "list", DOMAIN, "--format", "json").stdout)
    return {r["selector"]: r["state"] for r in rows}


def test_rotate_creates_a_pending_key_and_activates_it_only_once_published(
    run: Run, server: DnsServer, keys_dir: Path
) -> None:
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s1", "--bits", "1024"))
    old = dkim.find_key(keys_dir, DOMAIN, "s1")
    publish(server, old)
    before = dkim.Signer(old).sign(MESSAGE)

    made = ok(run("dkim", "rotate", DOMAIN, "--selector", "s2", "--bits", "1024"))
    new = dkim.find_key(keys_dir, DOMAIN, "s2")
    assert made[0].endswith("(pending: lists.example.org keeps signing with its current key)")
    assert made[2] == new.dns_record()
    assert made[3] == f"then run `listserv dkim rotate {DOMAIN} --activate`"
    assert states(run) == {"s1": "active", "s2": "pending"}

    refused = one_line_error(run("dkim", "rotate", DOMAIN, "--activate"))
    assert refused == (
        f"Error: not activating s2: no record at s2._domainkey.{DOMAIN}; publish the record"
        f" `listserv dkim rotate {DOMAIN}` printed and try again, or add --force"
    )
    again = ok(run("dkim", "rotate", DOMAIN))  # shows the waiting key, makes no other
    assert again[0] == "s2 is waiting to replace the active rsa key"
    assert again[-1] == new.dns_record()
    server.txt[new.dns_name()] = [old.public_txt()]  # a wrong key is no better
    assert "another key than ours" in one_line_error(run("dkim", "rotate", DOMAIN, "--activate"))
    assert dkim.active_selector(keys_dir, DOMAIN) == "s1"

    publish(server, new)
    assert ok(run("dkim", "rotate", DOMAIN))[1] == (
        f"s2._domainkey.{DOMAIN} publishes our rsa key: run `listserv dkim rotate {DOMAIN}"
        " --activate`"
    )
    done = ok(run("dkim", "rotate", DOMAIN, "--activate"))

    assert done[0].startswith(f"s2 is now the active DKIM key for {DOMAIN}")
    assert done[1].startswith("s1 is retired, not deleted: keep its record published until ")
    assert states(run) == {"s1": "retired", "s2": "active"}
    assert (keys_dir / DOMAIN / "s1.pem").exists()
    table = ok(run("dkim", "list", DOMAIN))
    assert table[1].split()[:5][:4] == [DOMAIN, "s1", "rsa", "1024"]
    assert table[1].split()[4] == "retired"
    # mail signed before the rotation still verifies while s1 stays published,
    dnsfunc = dnsfunc_via(server)
    assert dkimpy.verify(before, dnsfunc=dnsfunc)
    # and new mail is signed with s2
    signer = prepare.signer_for(keys_dir, DOMAIN)
    assert signer is not None
    after = signer.sign(MESSAGE)
    assert selectors(after) == ["s2"]
    assert dkimpy.verify(after, dnsfunc=dnsfunc)
    # once the old record goes, only the old mail fails
    del server.txt[old.dns_name()]
    assert not dkimpy.verify(before, dnsfunc=dnsfunc)
    assert dkimpy.verify(after, dnsfunc=dnsfunc)


def test_rotate_names_its_selector_by_date_and_never_reuses_one(run: Run, keys_dir: Path) -> None:
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s1", "--bits", "1024"))

    ok(run("dkim", "rotate", DOMAIN, "--bits", "1024"))
    ok(run("dkim", "rotate", DOMAIN, "--bits", "1024", "--selector", "manual"))
    pending = [k.selector for k in dkim.pending_keys(keys_dir, DOMAIN, "rsa")]

    assert len(pending) == 2 and "manual" in pending
    [dated] = [p for p in pending if p != "manual"]
    assert dated is not None and dated.startswith("s2") and len(dated) == 9
    assert "several rsa keys" in one_line_error(run("dkim", "rotate", DOMAIN, "--activate"))


def test_force_activates_an_unpublished_key_with_a_warning(run: Run, keys_dir: Path) -> None:
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s1", "--bits", "1024"))
    ok(run("dkim", "rotate", DOMAIN, "--selector", "s2", "--bits", "1024"))

    result = run("dkim", "rotate", DOMAIN, "--activate", "--force")

    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(
        f"warning: no record at s2._domainkey.{DOMAIN}; activating anyway (--force)"
    )
    assert dkim.active_selector(keys_dir, DOMAIN) == "s2"


def test_activate_checks_dns_too(run: Run, server: DnsServer, keys_dir: Path) -> None:
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s1", "--bits", "1024"))
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s2", "--bits", "1024"))

    assert "not activating s2" in one_line_error(run("dkim", "activate", DOMAIN, "s2"))
    server.mode = "servfail"
    assert "DNS error" in one_line_error(run("dkim", "activate", DOMAIN, "s2"))
    server.mode = "answer"
    publish(server, dkim.find_key(keys_dir, DOMAIN, "s2"))
    ok(run("dkim", "activate", DOMAIN, "s2"))

    assert dkim.active_selector(keys_dir, DOMAIN) == "s2"


def test_rotate_activate_without_a_waiting_key_says_what_to_do(run: Run) -> None:
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s1", "--bits", "1024"))

    line = one_line_error(run("dkim", "rotate", DOMAIN, "--activate"))

    assert line == (
        f"Error: no rsa key of {DOMAIN} is waiting to be activated:"
        f" run `listserv dkim rotate {DOMAIN}` first"
    )
    assert "--force goes with --activate" in one_line_error(
        run("dkim", "rotate", DOMAIN, "--force")
    )


def test_adding_ed25519_by_rotation_gives_two_signatures(
    run: Run, server: DnsServer, keys_dir: Path
) -> None:
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s1", "--bits", "1024"))
    publish(server, dkim.find_key(keys_dir, DOMAIN, "s1"))
    made = ok(run("dkim", "rotate", DOMAIN, "--algorithm", "ed25519", "--selector", "e1"))
    ed = dkim.find_key(keys_dir, DOMAIN, "e1")
    assert made[-1] == f"then run `listserv dkim rotate {DOMAIN} --algorithm ed25519 --activate`"
    assert ed.algorithm == "ed25519"
    signer = prepare.signer_for(keys_dir, DOMAIN)
    assert signer is not None and [k.selector for k in signer.keys] == ["s1"]

    publish(server, ed)
    ok(run("dkim", "rotate", DOMAIN, "--algorithm", "ed25519", "--activate"))
    signer = prepare.signer_for(keys_dir, DOMAIN)

    assert signer is not None and [k.selector for k in signer.keys] == ["s1", "e1"]
    assert states(run) == {"e1": "active", "s1": "active"}
    signed = signer.sign(MESSAGE)
    assert selectors(signed) == ["s1", "e1"]
    checker = dkimpy.DKIM(signed)
    dnsfunc = dnsfunc_via(server)
    assert checker.verify(idx=0, dnsfunc=dnsfunc) and checker.verify(idx=1, dnsfunc=dnsfunc)


# --- posts queued before a rotation (storage: both databases) ------------------------

MEMBERS = ["ann@one.example", "bob@two.example", "cy@three.example"]


def accepted_post(db: Database, subject: str) -> int:
    """An accepted post as intake stores it."""
    raw = message(
        f"""
        From: Sender <sender@example.net>
        To: staff@{DOMAIN}
        Subject: {subject}
        Message-ID: <{subject.replace(" ", "-")}@example.net>
        MIME-Version: 1.0
        Content-Type: text/plain; charset=utf-8

        The text of {subject}.
        """
    )
    with db.session() as s:
        mlist = lists.get(s, f"staff@{DOMAIN}")
        inbound = InboundMessage(
            mail_from="sender@example.net",
            rcpt_tos=[mlist.address],
            kind="post",
            state=InboundState.DONE,
            peer="127.0.0.1",
            raw=raw,
        )
        s.add(inbound)
        s.flush()
        post = Post(
            list_id=mlist.id,
            inbound_id=inbound.id,
            state=PostState.ACCEPTED,
            sender="sender@example.net",
            subject=subject,
        )
        s.add(post)
        s.flush()
        return post.id


@pytest.mark.parametrize("mode", ["personalized", "shared"])
async def test_a_post_queued_before_the_rotation_is_sent_signed_with_the_old_key(
    db: Database,
    db_url: str,
    sink: Sink,
    daemon_factory: Any,
    tmp_path: Path,
    server: DnsServer,
    mode: str,
) -> None:
    keys_dir = tmp_path / "dkim"  # where daemon_factory's settings keep keys
    old = dkim.generate_key(keys_dir, DOMAIN, "s1", bits=1024)
    ed = dkim.generate_key(keys_dir, DOMAIN, "e1", algorithm="ed25519", activate=True)
    make_list(db, members_=MEMBERS, delivery_mode=mode)
    settings = settings_for(db_url, sink.port, tmp_path)  # as daemon_factory's
    post_id = accepted_post(db, "queued before")
    assert prepare.queue_post(db, settings, post_id, worker="test")

    new = dkim.generate_key(keys_dir, DOMAIN, "s2", bits=1024)
    dkim.activate_key(keys_dir, DOMAIN, "s2")
    for key in (old, ed, new):
        publish(server, key)
    await daemon_factory()
    await sink.wait_for_recipients(len(MEMBERS))

    dnsfunc = dnsfunc_via(server)
    for received in sink.received:
        assert selectors(received.data) == ["s1", "e1"]  # both as queued, not s2
        checker = dkimpy.DKIM(received.data)
        assert checker.verify(idx=0, dnsfunc=dnsfunc)
        assert checker.verify(idx=1, dnsfunc=dnsfunc)


def test_a_recorded_key_that_was_deleted_is_never_used(tmp_path: Path) -> None:
    keys_dir = tmp_path / "dkim"
    dkim.generate_key(keys_dir, DOMAIN, "s1", bits=1024)
    dkim.generate_key(keys_dir, DOMAIN, "s2", bits=1024, activate=True)
    (keys_dir / DOMAIN / "s1.pem").unlink()

    signer = prepare.signer_for(keys_dir, DOMAIN, ["s1"])
    recorded = prepare.signer_for(keys_dir, DOMAIN, ["s2"])

    assert signer is not None and [k.selector for k in signer.keys] == ["s2"]
    assert recorded is not None and [k.selector for k in recorded.keys] == ["s2"]
