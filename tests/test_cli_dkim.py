"""`listserv dkim keygen|activate|list`, run in-process on real key files."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import pytest
from click.testing import CliRunner, Result
from dnsserver import DnsServer
from test_dkim import MESSAGE, txt_from_zone_line

from listserv.cli import cli
from listserv.distribute import dkim as keys
from listserv.distribute import prepare

DOMAIN = "example.org"
Run = Callable[..., Result]


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No LISTSERV_* variables or config/listserv.toml from the developer's environment."""
    for name in list(os.environ):
        if name.startswith("LISTSERV_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "dkim"


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(ttl=0) as server:
        yield server


@pytest.fixture
def run(tmp_path: Path, keys_dir: Path, dns_server: DnsServer) -> Run:
    """`listserv --config <tmp> ARGS...`; the dkim commands need no database. `activate`
    asks the loopback DNS server whether the key is published."""
    config = tmp_path / "listserv.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [dkim]
            keys_dir = "{keys_dir}"
            [dns]
            nameservers = ["{dns_server.address}"]
            timeout = 2.0
            """
        ),
        encoding="utf-8",
    )

    def run(*args: str) -> Result:
        return CliRunner().invoke(cli, ["--config", str(config), *args])

    return run


def ok(result: Result) -> list[str]:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.stdout.splitlines()


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ")
    return line


def listed(run: Run, *args: str) -> list[dict[str, object]]:
    rows = json.loads("\n".join(ok(run("dkim", "list", *args, "--format", "json"))))
    assert isinstance(rows, list)
    return rows


def test_keygen_prints_a_zone_line_that_loads_back_to_the_verifying_key(
    run: Run, keys_dir: Path
) -> None:
    lines = ok(run("dkim", "keygen", DOMAIN, "--selector", "sel1", "--bits", "2048"))

    assert len(lines) == 3
    assert (
        lines[0] == f"wrote {keys_dir / DOMAIN / 'sel1.pem'} (now the active DKIM key for {DOMAIN})"
    )
    assert lines[1].startswith(f"publish at sel1._domainkey.{DOMAIN} as a TXT record;")
    assert lines[2].count('" "') == 1  # 2048 bits: two character-strings
    name, value = txt_from_zone_line(lines[2])
    assert name == f"sel1._domainkey.{DOMAIN}."
    assert value.startswith("v=DKIM1; k=rsa; p=MIIB")

    key = keys.active_key(keys_dir, DOMAIN)
    assert key is not None and key.selector == "sel1"
    signed = keys.Signer(key).sign(MESSAGE)

    def dnsfunc(qname: bytes, timeout: int = 5) -> bytes | None:
        return value.encode() if qname.decode() == name else None

    assert dkim.verify(signed, dnsfunc=dnsfunc)


def test_a_later_key_waits_for_activate_and_the_signer_picks_it_up(
    run: Run, keys_dir: Path, dns_server: DnsServer
) -> None:
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s1", "--bits", "1024"))
    lines = ok(run("dkim", "keygen", DOMAIN, "--selector", "s2", "--bits", "1024"))

    assert "not active" in lines[0]
    assert lines[1] == (
        f"publish at s2._domainkey.{DOMAIN} as a TXT record; it becomes active when you run"
        f" `listserv dkim activate {DOMAIN} s2`:"
    )
    assert [(r["selector"], r["active"]) for r in listed(run)] == [("s1", True), ("s2", False)]
    signer = prepare.signer_for(keys_dir, DOMAIN)
    assert signer is not None and signer.key.selector == "s1"
    s2 = keys.find_key(keys_dir, DOMAIN, "s2")
    dns_server.txt[s2.dns_name()] = [s2.public_txt()]

    line, retired = ok(run("dkim", "activate", DOMAIN, "s2"))

    assert line.startswith(f"s2 is now the active DKIM key for {DOMAIN}")
    assert retired.startswith("s1 is retired, not deleted: keep its record published until")
    assert [(r["selector"], r["active"], r["state"]) for r in listed(run)] == [
        ("s1", False, "retired"),
        ("s2", True, "active"),
    ]
    signer = prepare.signer_for(keys_dir, DOMAIN)  # what the daemon does per post
    assert signer is not None and signer.key.selector == "s2"


def test_keygen_activate_takes_over_at_once(run: Run) -> None:
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s1", "--bits", "1024"))
    lines = ok(run("dkim", "keygen", DOMAIN, "--selector", "s2", "--bits", "1024", "--activate"))

    assert "now the active DKIM key" in lines[0]
    assert [(r["selector"], r["active"]) for r in listed(run)] == [("s1", False), ("s2", True)]


def test_activate_refuses_an_unknown_selector_in_one_line(run: Run) -> None:
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s1", "--bits", "1024"))

    line = one_line_error(run("dkim", "activate", DOMAIN, "nosuch"))

    assert line == (
        f"Error: no DKIM key 'nosuch' for {DOMAIN} (`listserv dkim list {DOMAIN}` shows them)"
    )
    assert "no DKIM key" in one_line_error(run("dkim", "activate", "other.example.org", "s1"))
    assert "selector" in one_line_error(run("dkim", "activate", DOMAIN, "../s1"))
    assert [(r["selector"], r["active"]) for r in listed(run)] == [("s1", True)]


def test_activate_refuses_a_broken_key_in_one_line(run: Run, keys_dir: Path) -> None:
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s1", "--bits", "1024"))
    (keys_dir / DOMAIN / "bad.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n")

    line = one_line_error(run("dkim", "activate", DOMAIN, "bad"))

    assert "bad.pem: not a usable DKIM key" in line
    assert (keys_dir / DOMAIN / "active").read_text() == "s1\n"


def test_list_shows_domain_selector_bits_and_the_active_key(run: Run) -> None:
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s1", "--bits", "1024"))
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s2", "--bits", "2048"))
    ok(run("dkim", "keygen", "lists.example.net", "--selector", "a", "--bits", "1024"))

    table = ok(run("dkim", "list"))
    one = ok(run("dkim", "list", "Example.ORG"))

    assert [line.split() for line in table] == [
        ["DOMAIN", "SELECTOR", "ALGORITHM", "BITS", "STATE", "STATUS"],
        [DOMAIN, "s1", "rsa", "1024", "active", "ok"],
        [DOMAIN, "s2", "rsa", "2048", "pending", "ok"],
        ["lists.example.net", "a", "rsa", "1024", "active", "ok"],
    ]
    assert [line.split() for line in one] == [table[0].split(), *(r.split() for r in table[1:3])]
    common = {"domain": DOMAIN, "algorithm": "rsa", "retired_at": None, "problem": None}
    assert listed(run, DOMAIN) == [
        {**common, "selector": "s1", "bits": 1024, "active": True, "state": "active"},
        {**common, "selector": "s2", "bits": 2048, "active": False, "state": "pending"},
    ]


def test_list_without_keys(run: Run) -> None:
    assert ok(run("dkim", "list", DOMAIN)) == [f"no DKIM keys for {DOMAIN}"]
    assert listed(run) == []
    assert "invalid DKIM domain" in one_line_error(run("dkim", "list", "../etc"))


def test_list_shows_broken_files_as_such(run: Run, keys_dir: Path) -> None:
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s1", "--bits", "1024"))
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s2", "--bits", "1024"))
    (keys_dir / DOMAIN / "s2.pem").write_bytes(b"\x00garbage")
    (keys_dir / DOMAIN / "active").write_text("gone\n")

    table = ok(run("dkim", "list"))
    rows = listed(run)

    assert table[1].split()[:6] == [DOMAIN, "s1", "rsa", "1024", "pending", "ok"]
    assert table[2].split()[:4] == [DOMAIN, "s2", "rsa", "-"]
    assert table[2].endswith("not a usable key: not a PEM private key")
    assert table[3].split()[:5] == [DOMAIN, "gone", "rsa", "-", "active"]
    assert table[3].endswith("but gone.pem does not exist")
    assert [(r["selector"], r["bits"], r["active"]) for r in rows] == [
        ("s1", 1024, False),
        ("s2", None, False),
        ("gone", None, True),
    ]
    assert rows[0]["problem"] is None and rows[1]["problem"] and rows[2]["problem"]


def test_keygen_ed25519_beside_rsa_waits_and_says_so(run: Run, keys_dir: Path) -> None:
    ok(run("dkim", "keygen", DOMAIN, "--selector", "s1", "--bits", "1024"))
    lines = ok(run("dkim", "keygen", DOMAIN, "--selector", "e1", "--algorithm", "ed25519"))

    assert "not active yet" in lines[0]
    name, value = txt_from_zone_line(lines[2])
    assert name == f"e1._domainkey.{DOMAIN}." and value.startswith("v=DKIM1; k=ed25519; p=")
    assert [(r["selector"], r["algorithm"], r["bits"], r["state"]) for r in listed(run)] == [
        ("e1", "ed25519", 256, "pending"),
        ("s1", "rsa", 1024, "active"),
    ]


def test_keygen_ed25519_alone_warns_that_rsa_is_still_needed(run: Run) -> None:
    lines = ok(run("dkim", "keygen", DOMAIN, "--selector", "e1", "--algorithm", "ed25519"))

    assert "now the active DKIM key" in lines[0]
    assert lines[-1].startswith("note: many receivers verify only RSA signatures")


@pytest.mark.parametrize("command", ["keygen", "activate", "list", "rotate"])
def test_help_needs_no_config(tmp_path: Path, command: str) -> None:
    missing = str(tmp_path / "missing.toml")
    result = CliRunner().invoke(cli, ["--config", missing, "dkim", command, "--help"])

    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout
