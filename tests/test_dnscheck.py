"""`listserv dns check`: each check's pass, warn and fail against a DNS server on loopback."""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from dnsserver import DnsServer

from listserv import config, dnscheck
from listserv.cli import cli
from listserv.config import DnsSettings, Settings
from listserv.distribute import dkim
from listserv.dns import Resolver

DOMAIN = "lists.example.org"
OUT = "192.0.2.25"
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
WEEK = timedelta(days=7)


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer() as s:
        yield s


@pytest.fixture
def resolver(server: DnsServer) -> Resolver:
    return Resolver(DnsSettings(nameservers=(server.address,), timeout=2.0, cache_size=0))


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "dkim"


@pytest.fixture
def key(keys_dir: Path) -> dkim.SigningKey:
    return dkim.generate_key(keys_dir, DOMAIN, "s1", bits=1024)


def settings(server: DnsServer, keys_dir: Path, **dns: Any) -> Settings:
    values: dict[str, Any] = {"nameservers": [server.address], "timeout": 2.0, "cache_size": 0}
    values.setdefault("outbound_ips", [OUT])
    values.update(dns)
    return config.from_dict({"dns": values, "dkim": {"keys_dir": str(keys_dir)}})


def publish_good(server: DnsServer, key: dkim.SigningKey) -> None:
    server.mx[DOMAIN] = [(10, "mx1.example.org")]
    server.a["mx1.example.org"] = ["192.0.2.1"]
    server.txt[DOMAIN] = [f"v=spf1 ip4:{OUT} -all"]
    server.txt[key.dns_name()] = [key.public_txt()]
    server.txt[f"_dmarc.{DOMAIN}"] = ["v=DMARC1; p=reject"]


def by_name(checks: list[dnscheck.Check]) -> dict[str, dnscheck.Check]:
    return {c.name: c for c in checks}


def spf(resolver: Resolver, *ips: str, include: str = "") -> dnscheck.Check:
    nets = [ipaddress.ip_network(ip) for ip in ips]
    return dnscheck.check_spf(resolver, DOMAIN, nets, include)


def test_a_domain_that_publishes_everything_passes_every_check(
    server: DnsServer, keys_dir: Path, key: dkim.SigningKey, resolver: Resolver
) -> None:
    publish_good(server, key)

    checks = dnscheck.check_domain(settings(server, keys_dir), resolver, DOMAIN, now=NOW)

    assert [(c.name, c.status) for c in checks] == [
        ("mx", "pass"),
        ("spf", "pass"),
        ("dkim s1", "pass"),
        ("dmarc", "pass"),
        ("alignment", "pass"),
    ]
    assert not dnscheck.failed(checks)
    assert "DMARC passes through DKIM and SPF" in checks[-1].detail


# --- MX ------------------------------------------------------------------------------


def test_mx_pass_and_expected_hosts(server: DnsServer, resolver: Resolver) -> None:
    server.mx[DOMAIN] = [(20, "backup.example.net"), (10, "mx1.example.org")]

    assert dnscheck.check_mx(resolver, DOMAIN, ()).status == "pass"
    assert dnscheck.check_mx(resolver, DOMAIN, ()).detail == (
        "MX 10 mx1.example.org, 20 backup.example.net"
    )
    wrong = dnscheck.check_mx(resolver, DOMAIN, ["mx.lists.example.org"])
    assert wrong.status == "fail"
    assert wrong.publish == (f"{DOMAIN}. IN MX 10 mx.lists.example.org.",)
    partly = dnscheck.check_mx(resolver, DOMAIN, ["MX1.example.org."])
    assert partly.status == "warn" and "backup.example.net is not in" in partly.detail


def test_mx_missing_falls_back_to_an_address_or_fails(
    server: DnsServer, resolver: Resolver
) -> None:
    nothing = dnscheck.check_mx(resolver, DOMAIN, ())
    server.a[DOMAIN] = ["192.0.2.9"]
    fallback = dnscheck.check_mx(resolver, DOMAIN, ())
    server.mx[DOMAIN] = [(0, ".")]
    null = dnscheck.check_mx(resolver, DOMAIN, ())

    assert nothing.status == "fail" and "no MX record and no address" in nothing.detail
    assert fallback.status == "warn" and "192.0.2.9" in fallback.detail
    assert null.status == "fail" and "null MX" in null.detail


# --- SPF -----------------------------------------------------------------------------


def test_spf_missing_fails_with_a_record_to_publish(resolver: Resolver) -> None:
    check = spf(resolver, OUT, include="_spf.provider.example")

    assert check.status == "fail" and check.detail == f"no SPF record at {DOMAIN}"
    assert check.publish == (
        f'{DOMAIN}. IN TXT "v=spf1 ip4:{OUT} include:_spf.provider.example ~all"',
    )


def test_spf_that_does_not_cover_us_fails_and_the_fix_keeps_the_record(
    server: DnsServer, resolver: Resolver
) -> None:
    server.txt[DOMAIN] = ["v=spf1 ip4:198.51.100.0/24 ~all", "some other text"]

    check = spf(resolver, OUT, "2001:db8::25")

    assert check.status == "fail"
    assert f"{OUT} gets softfail (~all at {DOMAIN})" in check.detail
    assert "2001:db8::25 gets softfail" in check.detail
    assert check.publish == (
        f'{DOMAIN}. IN TXT "v=spf1 ip4:198.51.100.0/24 ip4:{OUT} ip6:2001:db8::25 ~all"',
    )


def test_spf_follows_include_redirect_a_and_mx(server: DnsServer, resolver: Resolver) -> None:
    server.txt[DOMAIN] = ["v=spf1 include:_spf.provider.example redirect=_spf.example.org"]
    server.txt["_spf.provider.example"] = ["v=spf1 ip4:203.0.113.0/24 -all"]
    server.txt["_spf.example.org"] = [
        "v=spf1 a:out.example.org/28 mx:lists.example.org ip6:2001:db8::/32 -all"
    ]
    server.a["out.example.org"] = ["192.0.2.17"]
    server.mx[DOMAIN] = [(10, "mx1.example.org")]
    server.a["mx1.example.org"] = ["198.51.100.7"]

    assert spf(resolver, "203.0.113.9").status == "pass"  # include
    assert spf(resolver, "192.0.2.30").status == "pass"  # a/28 via redirect
    assert spf(resolver, "198.51.100.7").status == "pass"  # mx:
    assert spf(resolver, "2001:db8:1::5").status == "pass"  # ip6 network
    fail = spf(resolver, "192.0.2.99")
    assert fail.status == "fail" and "-all at _spf.example.org" in fail.detail
    # the whole network must pass, not only one address of it
    assert spf(resolver, "192.0.2.16/28").status == "pass"
    assert spf(resolver, "192.0.2.0/27").status == "fail"


def test_spf_include_setting_is_found_through_nested_includes(
    server: DnsServer, resolver: Resolver
) -> None:
    server.txt[DOMAIN] = ["v=spf1 include:_spf.example.org -all"]
    server.txt["_spf.example.org"] = ["v=spf1 include:_spf.provider.example -all"]
    server.txt["_spf.provider.example"] = ["v=spf1 ip4:203.0.113.0/24 -all"]

    found = spf(resolver, include="_spf.provider.example")
    missing = spf(resolver, include="_spf.other.example")

    assert found.status == "pass" and "includes _spf.provider.example" in found.detail
    assert missing.status == "fail" and "does not include _spf.other.example" in missing.detail
    assert "include:_spf.other.example -all" in missing.publish[0]


def test_spf_errors_are_failures(server: DnsServer, resolver: Resolver) -> None:
    server.txt[DOMAIN] = ["v=spf1 -all", "v=spf1 +all"]
    two = spf(resolver, OUT)
    chain = [f"include:n{i}.example" for i in range(11)]
    server.txt[DOMAIN] = ["v=spf1 " + " ".join(chain) + " -all"]
    for i in range(11):
        server.txt[f"n{i}.example"] = ["v=spf1 -all"]
    too_many = spf(resolver, OUT)
    server.txt[DOMAIN] = ["v=spf1 include:nowhere.example -all"]
    dangling = spf(resolver, OUT)

    assert two.status == "fail" and "2 SPF records" in two.detail
    assert too_many.status == "fail" and "permerror (more than 10 DNS look-ups" in too_many.detail
    assert dangling.status == "fail" and "permerror (include:nowhere.example" in dangling.detail
    server.txt[DOMAIN] = ["v=spf1 a/33 ip4:192.0.2.0/24 -all"]
    assert "permerror (bad prefix length in a/33" in spf(resolver, OUT).detail
    server.txt[DOMAIN] = ["v=spf1 ip4:not-an-address -all"]
    assert "permerror (bad ip4:not-an-address" in spf(resolver, OUT).detail


def test_spf_macros_are_expanded(server: DnsServer, resolver: Resolver) -> None:
    server.txt[DOMAIN] = ["v=spf1 exists:%{ir}.%{v}._spf.%{d} -all"]
    server.a[f"25.2.0.192.in-addr._spf.{DOMAIN}"] = ["127.0.0.2"]

    assert spf(resolver, OUT).status == "pass"
    assert spf(resolver, "192.0.2.26").status == "fail"


def test_spf_without_outbound_addresses_warns(
    server: DnsServer, keys_dir: Path, resolver: Resolver
) -> None:
    server.txt[DOMAIN] = ["v=spf1 mx -all"]
    s = settings(server, keys_dir, outbound_ips=[])  # the smarthost is 127.0.0.1

    ips, source = dnscheck.outbound_networks(s, resolver)
    check = dnscheck.check_spf(resolver, DOMAIN, ips, source=source)

    assert ips == []
    assert check.status == "warn" and "set [dns] outbound_ips" in check.detail


# --- DKIM ----------------------------------------------------------------------------


def dkim_checks(resolver: Resolver, keys_dir: Path, now: datetime = NOW) -> dict[str, Any]:
    return by_name(dnscheck.check_dkim(resolver, keys_dir, DOMAIN, now=now, keep=WEEK))


def test_dkim_active_key_published_or_not(
    server: DnsServer, keys_dir: Path, key: dkim.SigningKey, resolver: Resolver
) -> None:
    missing = dkim_checks(resolver, keys_dir)["dkim s1"]
    server.txt[key.dns_name()] = [key.public_txt()]
    published = dkim_checks(resolver, keys_dir)["dkim s1"]
    other = dkim.generate_key(keys_dir.parent / "other", DOMAIN, "s1", bits=1024)
    server.txt[key.dns_name()] = [other.public_txt()]
    wrong = dkim_checks(resolver, keys_dir)["dkim s1"]
    server.txt[key.dns_name()] = ["v=DKIM1; k=rsa; p="]
    revoked = dkim_checks(resolver, keys_dir)["dkim s1"]

    assert missing.status == "fail"
    assert missing.detail == f"active rsa, signing now: no record at s1._domainkey.{DOMAIN}"
    assert missing.publish == (key.dns_record(),)
    assert published.status == "pass"
    assert wrong.status == "fail" and "another key than ours" in wrong.detail
    assert revoked.status == "fail" and "revoked" in revoked.detail


def test_dkim_without_any_key_fails(keys_dir: Path, resolver: Resolver) -> None:
    [check] = dnscheck.check_dkim(resolver, keys_dir, DOMAIN, now=NOW, keep=WEEK)

    assert check.status == "fail" and "goes out unsigned" in check.detail


def test_dkim_pending_and_retired_keys(
    server: DnsServer, keys_dir: Path, key: dkim.SigningKey, resolver: Resolver
) -> None:
    server.txt[key.dns_name()] = [key.public_txt()]
    new = dkim.generate_key(keys_dir, DOMAIN, "s2", bits=1024)

    pending = dkim_checks(resolver, keys_dir)["dkim s2"]
    server.txt[new.dns_name()] = [new.public_txt()]
    ready = dkim_checks(resolver, keys_dir)["dkim s2"]
    dkim.activate_key(keys_dir, DOMAIN, "s2", now=NOW)
    retired = dkim_checks(resolver, keys_dir)["dkim s1"]
    del server.txt[key.dns_name()]
    removed_early = dkim_checks(resolver, keys_dir)["dkim s1"]
    removed_late = dkim_checks(resolver, keys_dir, NOW + WEEK + timedelta(hours=1))["dkim s1"]

    assert pending.status == "warn" and "publish it before activating" in pending.detail
    assert pending.publish == (new.dns_record(),)
    assert ready.status == "pass" and "--activate" in ready.detail
    assert retired.status == "pass"
    assert "keep it published until 2026-12-01 12:00 UTC" in retired.detail
    assert removed_early.status == "warn" and "may still be in flight" in removed_early.detail
    assert removed_late.status == "pass"


def test_dkim_ed25519_key_is_checked_as_raw_key(
    server: DnsServer, keys_dir: Path, key: dkim.SigningKey, resolver: Resolver
) -> None:
    ed = dkim.generate_key(keys_dir, DOMAIN, "e1", algorithm="ed25519", activate=True)
    server.txt[ed.dns_name()] = [key.public_txt()]  # the RSA key under the Ed25519 selector
    wrong = dkim_checks(resolver, keys_dir)["dkim e1"]
    server.txt[ed.dns_name()] = [ed.public_txt()]
    right = dkim_checks(resolver, keys_dir)["dkim e1"]

    assert ed.public_txt().startswith("v=DKIM1; k=ed25519; p=")
    assert len(ed.public_bytes()) == 32
    assert wrong.status == "fail" and "k=rsa key; ours is ed25519" in wrong.detail
    assert right.status == "pass" and right.detail.startswith("active ed25519")


# --- DMARC ---------------------------------------------------------------------------


def test_dmarc_own_inherited_missing_and_invalid(server: DnsServer, resolver: Resolver) -> None:
    missing = dnscheck.check_dmarc(resolver, DOMAIN)
    server.txt["_dmarc.example.org"] = ["v=DMARC1; p=none; sp=quarantine"]
    inherited = dnscheck.check_dmarc(resolver, DOMAIN)
    server.txt[f"_dmarc.{DOMAIN}"] = ["v=DMARC1; p=none; rua=mailto:d@example.org"]
    own = dnscheck.check_dmarc(resolver, DOMAIN)
    server.txt[f"_dmarc.{DOMAIN}"] = ["v=DMARC1; p=block"]
    invalid = dnscheck.check_dmarc(resolver, DOMAIN)

    assert missing.status == "fail"
    assert missing.publish == (f'_dmarc.{DOMAIN}. IN TXT "v=DMARC1; p=none"',)
    assert inherited.status == "pass"
    assert inherited.detail == "p=quarantine at _dmarc.example.org (inherited from example.org)"
    assert own.status == "pass" and own.detail.endswith("monitoring only")
    assert invalid.status == "fail" and "not a valid DMARC record" in invalid.detail


# --- alignment and the whole report --------------------------------------------------


def test_alignment_needs_dkim_or_spf(
    server: DnsServer, keys_dir: Path, key: dkim.SigningKey, resolver: Resolver
) -> None:
    publish_good(server, key)
    s = settings(server, keys_dir)
    both = by_name(dnscheck.check_domain(s, resolver, DOMAIN, now=NOW))["alignment"]
    del server.txt[key.dns_name()]
    spf_only = by_name(dnscheck.check_domain(s, resolver, DOMAIN, now=NOW))["alignment"]
    server.txt[DOMAIN] = ["v=spf1 -all"]
    neither = by_name(dnscheck.check_domain(s, resolver, DOMAIN, now=NOW))["alignment"]
    server.txt[key.dns_name()] = [key.public_txt()]
    dkim_only = by_name(dnscheck.check_domain(s, resolver, DOMAIN, now=NOW))["alignment"]

    assert both.status == "pass"
    assert f"envelope NAME-bounces@{DOMAIN}" in both.detail
    assert spf_only.status == "warn" and "SPF only" in spf_only.detail
    assert neither.status == "fail"
    assert dkim_only.status == "pass" and dkim_only.detail.endswith("through DKIM")


def test_dns_failure_fails_the_checks_with_the_reason(
    server: DnsServer, keys_dir: Path, key: dkim.SigningKey, resolver: Resolver
) -> None:
    server.mode = "servfail"

    checks = by_name(dnscheck.check_domain(settings(server, keys_dir), resolver, DOMAIN, now=NOW))

    for name in ("mx", "spf", "dkim s1", "dmarc", "alignment"):
        assert checks[name].status == "fail", name
    assert "DNS error" in checks["mx"].detail and "DNS error" in checks["dmarc"].detail


# --- the command ---------------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path, server: DnsServer, keys_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name in list(os.environ):
        if name.startswith("LISTSERV_"):
            monkeypatch.delenv(name)
    path = tmp_path / "listserv.toml"
    path.write_text(
        f'[dkim]\nkeys_dir = "{keys_dir}"\n'
        f'[dns]\nnameservers = ["{server.address}"]\ntimeout = 2.0\n'
        f'outbound_ips = ["{OUT}"]\n',
        encoding="utf-8",
    )

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli, ["--config", str(path), *args])

    return run


def test_command_prints_a_table_and_exits_0_when_nothing_fails(
    run: Any, server: DnsServer, key: dkim.SigningKey
) -> None:
    publish_good(server, key)

    result = run("dns", "check", DOMAIN.upper())

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    assert [line.split()[:2] for line in lines[1:3]] == [["mx", "pass"], ["spf", "pass"]]
    assert lines[3].split()[:3] == ["dkim", "s1", "pass"]
    assert "): publish" not in result.stdout


def test_command_exits_3_and_says_what_to_publish(
    run: Any, server: DnsServer, key: dkim.SigningKey
) -> None:
    publish_good(server, key)
    del server.txt[f"_dmarc.{DOMAIN}"]
    del server.txt[key.dns_name()]

    result = run("dns", "check", DOMAIN)
    data = run("dns", "check", DOMAIN, "--format", "json")

    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    text = result.stdout
    assert "dkim s1 (fail): publish\n  " + key.dns_record() in text
    assert f'dmarc (fail): publish\n  _dmarc.{DOMAIN}. IN TXT "v=DMARC1; p=none"' in text
    assert data.exit_code == 3
    rows = json.loads(data.stdout)
    assert {r["check"]: r["status"] for r in rows}["dmarc"] == "fail"
    assert rows[2]["publish"] == [key.dns_record()]


def test_command_refuses_a_bad_domain_in_one_line(run: Any) -> None:
    result = run("dns", "check", "../etc")

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: invalid DKIM domain")
    assert "Traceback" not in result.output


def test_outbound_ips_must_be_addresses_or_networks() -> None:
    ok = config.from_dict({"dns": {"outbound_ips": ["192.0.2.25", "2001:db8::/64"]}})

    assert ok.dns.outbound_ips == ("192.0.2.25", "2001:db8::/64")
    with pytest.raises(config.ConfigError, match=r"\[dns\] outbound_ips: 'mx\.example\.org'"):
        config.from_dict({"dns": {"outbound_ips": ["mx.example.org"]}})
