"""Inbound sender authentication: real DKIM signatures, keys served by a real DNS server
on loopback (tests/dnsserver.py), Authentication-Results from trusted and untrusted MTAs."""

from __future__ import annotations

import logging
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from dnsserver import DnsServer

from listserv import config, mail
from listserv.config import AuthSettings, DnsSettings
from listserv.distribute.dkim import SigningKey, generate_key
from listserv.dns import DnsError, Resolver
from listserv.errors import ConfigError
from listserv.pipeline import auth
from listserv.pipeline.auth import (
    AuthResult,
    authenticated_domains,
    check,
    organizational_domain,
    results_summary,
)

NO_TRUST = AuthSettings()


def message(text: str) -> bytes:
    return textwrap.dedent(text).lstrip("\n").replace("\n", "\r\n").encode("utf-8")


def post(sender: str = "Alice <alice@example.org>", extra: str = "") -> bytes:
    head = extra.replace("\n", "\r\n").encode("utf-8")
    return head + message(
        f"""
        From: {sender}
        To: Discuss <discuss@lists.example.net>
        Subject: Minutes of the meeting
        Date: Mon, 01 Jan 2024 10:00:00 +0000
        Message-ID: <minutes-1@example.org>

        The minutes are attached.
        """
    )


def sign(raw: bytes, key: SigningKey, headers: tuple[bytes, ...] = (b"from", b"to")) -> bytes:
    signature = dkim.sign(
        raw,
        key.selector.encode(),
        key.domain.encode(),
        key.private_pem,
        include_headers=[*headers, b"subject", b"date", b"message-id"],
    )
    return bytes(signature) + raw


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SigningKey]:
    keys_dir = tmp_path_factory.mktemp("keys")
    domains = (
        "example.org",
        "mail.example.org",
        "example.co.uk",
        "evil.example",
        "lists.example.net",
        "xn--bcher-kva.example",
    )
    return {d: generate_key(keys_dir, d, "s1", bits=1024) for d in domains}


@pytest.fixture
def dns_server(keys: dict[str, SigningKey]) -> Iterator[DnsServer]:
    with DnsServer() as server:
        for key in keys.values():
            server.txt[key.dns_name()] = [key.public_txt()]
        yield server


@pytest.fixture
def resolver(dns_server: DnsServer) -> Resolver:
    return Resolver(DnsSettings(nameservers=(dns_server.address,), timeout=2.0))


def verify(raw: bytes, resolver: Resolver, settings: AuthSettings = NO_TRUST) -> AuthResult:
    return check(raw, mail.parse(raw), settings=settings, resolver=resolver)


# --- DKIM ---------------------------------------------------------------------------


def test_signature_by_the_from_domain_authenticates_it(
    keys: dict[str, SigningKey], resolver: Resolver
) -> None:
    raw = sign(post(), keys["example.org"])
    assert authenticated_domains(
        raw, mail.parse(raw), settings=NO_TRUST, resolver=resolver
    ) == frozenset({"example.org"})
    assert results_summary(verify(raw, resolver)) == (
        "dkim=pass d=example.org; authenticated: example.org"
    )


def test_parent_domain_signature_aligns_with_a_subdomain_author(
    keys: dict[str, SigningKey], resolver: Resolver
) -> None:
    raw = sign(post("x@mail.example.org"), keys["example.org"])
    assert verify(raw, resolver).domains == {"mail.example.org"}


def test_subdomain_signature_aligns_with_the_parent_domain_author(
    keys: dict[str, SigningKey], resolver: Resolver
) -> None:
    raw = sign(post("x@example.org"), keys["mail.example.org"])
    assert verify(raw, resolver).domains == {"example.org"}


def test_organizational_domain_follows_the_public_suffix_list() -> None:
    assert organizational_domain("mail.example.org") == "example.org"
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("co.uk") == "co.uk"
    # private section: two users of one hosting service are two organizations
    assert organizational_domain("alice.github.io") != organizational_domain("bob.github.io")


def test_the_public_suffix_list_is_loaded_once_when_many_threads_need_it_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the first posts' intake threads all asked at once; each parsed the list, and
    # every session of the process stood still for over half a second
    loaded: list[int] = []

    class Counted(auth.PublicSuffixList):  # type: ignore[misc]
        def __init__(self) -> None:
            loaded.append(1)
            super().__init__()

    monkeypatch.setattr(auth, "PublicSuffixList", Counted)
    monkeypatch.setattr(auth, "_PSL", [])
    start = threading.Barrier(8)
    found: list[str] = []

    def ask() -> None:
        start.wait(10)
        found.append(organizational_domain("a.b.example.co.uk"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert found == ["example.co.uk"] * 8
    assert loaded == [1]


def test_signature_does_not_align_across_a_public_suffix(
    keys: dict[str, SigningKey], resolver: Resolver
) -> None:
    raw = sign(post("a@other.co.uk"), keys["example.co.uk"])
    result = verify(raw, resolver)
    assert result.domains == frozenset()
    assert result.dkim[0].result == "pass"
    assert "dkim=pass d=example.co.uk (not aligned with From/Sender)" in result.summary()


def test_valid_signature_by_an_unrelated_domain_does_not_authenticate(
    keys: dict[str, SigningKey], resolver: Resolver
) -> None:
    raw = sign(post(), keys["evil.example"])
    result = verify(raw, resolver)
    assert result.domains == frozenset()
    assert result.summary() == (
        "dkim=pass d=evil.example (not aligned with From/Sender); authenticated: none"
    )


def test_tampered_body_fails(keys: dict[str, SigningKey], resolver: Resolver) -> None:
    raw = sign(post(), keys["example.org"]).replace(b"attached", b"lost")
    result = verify(raw, resolver)
    assert result.domains == frozenset()
    assert result.dkim[0].result == "fail"
    assert "body hash mismatch" in result.dkim[0].reason


def test_tampered_from_fails(keys: dict[str, SigningKey], resolver: Resolver) -> None:
    raw = sign(post("alice@example.org"), keys["example.org"])
    raw = raw.replace(b"From: alice@example.org", b"From: mallory@example.org")
    result = verify(raw, resolver)
    assert result.domains == frozenset()
    assert result.dkim[0].result == "fail"


def test_unsigned_message_is_not_authenticated(resolver: Resolver) -> None:
    result = verify(post(), resolver)
    assert result.domains == frozenset()
    assert result.summary() == "dkim=none; authenticated: none"


def test_key_missing_in_dns_fails(
    keys: dict[str, SigningKey], dns_server: DnsServer, resolver: Resolver
) -> None:
    del dns_server.txt[keys["example.org"].dns_name()]
    result = verify(sign(post(), keys["example.org"]), resolver)
    assert result.domains == frozenset()
    assert (result.dkim[0].result, result.dkim[0].reason) == (
        "permerror",
        "no key at s1._domainkey.example.org",
    )


def test_revoked_key_fails(
    keys: dict[str, SigningKey], dns_server: DnsServer, resolver: Resolver
) -> None:
    dns_server.txt[keys["example.org"].dns_name()] = ["v=DKIM1; k=rsa; p="]
    result = verify(sign(post(), keys["example.org"]), resolver)
    assert result.domains == frozenset()
    assert result.dkim[0].result == "permerror"


def test_signature_that_does_not_cover_from_vouches_for_nothing(
    keys: dict[str, SigningKey], resolver: Resolver
) -> None:
    raw = sign(post(), keys["example.org"])
    raw = raw.replace(b"h=from : to", b"h=to", 1)
    assert b"h=to :" in raw
    result = verify(raw, resolver)
    assert result.domains == frozenset()
    assert (result.dkim[0].result, result.dkim[0].reason) == ("permerror", "From not signed")


def test_malformed_signature_is_a_result_not_an_exception(
    keys: dict[str, SigningKey], resolver: Resolver
) -> None:
    raw = message(
        """
        DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s1; b=!!!; h=from
        DKIM-Signature: this is not a tag list
        """
    ) + sign(post(), keys["example.org"])
    result = verify(raw, resolver)
    assert result.domains == {"example.org"}
    assert sorted(s.result for s in result.dkim) == ["pass", "permerror", "permerror"]


def test_one_good_signature_among_failing_ones_is_enough(
    keys: dict[str, SigningKey], resolver: Resolver
) -> None:
    raw = sign(post(), keys["example.org"])
    forged = sign(raw, keys["evil.example"]).replace(b"attached", b"attached!")
    result = verify(forged, resolver)
    assert result.domains == frozenset()  # the body changed after both signatures
    raw = sign(sign(post(), keys["evil.example"]), keys["example.org"])
    raw = raw.replace(b"d=evil.example", b"d=evil.example; foo=bar", 1)
    result = verify(raw, resolver)
    assert result.domains == {"example.org"}
    assert {(s.domain, s.result) for s in result.dkim} == {
        ("example.org", "pass"),
        ("evil.example", "fail"),
    }
    assert "dkim=fail d=evil.example (signature does not verify)" in result.summary()


def test_sender_domain_is_authenticated_too(
    keys: dict[str, SigningKey], resolver: Resolver
) -> None:
    raw = sign(
        post("bob@elsewhere.example", extra="Sender: relay@lists.example.net\n"),
        keys["lists.example.net"],
        headers=(b"from", b"sender"),
    )
    assert verify(raw, resolver).domains == {"lists.example.net"}


def test_internationalized_author_domain_is_compared_as_a_labels(
    keys: dict[str, SigningKey], resolver: Resolver
) -> None:
    raw = sign(post("Jörg <jörg@bücher.example>"), keys["xn--bcher-kva.example"])
    assert verify(raw, resolver).domains == {"xn--bcher-kva.example"}


def test_large_key_record_is_fetched_over_tcp(
    tmp_path: Path, dns_server: DnsServer, resolver: Resolver
) -> None:
    key = generate_key(tmp_path, "big.example", "s4096", bits=4096)
    dns_server.txt[key.dns_name()] = [key.public_txt()]
    raw = sign(post("a@big.example"), key)
    assert verify(raw, resolver).domains == {"big.example"}
    assert dns_server.count(key.dns_name(), "udp") == 1
    assert dns_server.count(key.dns_name(), "tcp") == 1


def test_keys_are_cached_for_their_ttl(
    keys: dict[str, SigningKey], dns_server: DnsServer, resolver: Resolver
) -> None:
    raw = sign(post(), keys["example.org"])
    assert verify(raw, resolver).domains == {"example.org"}
    assert verify(raw, resolver).domains == {"example.org"}
    assert dns_server.count(keys["example.org"].dns_name()) == 1


def test_uncached_resolver_asks_every_time(
    keys: dict[str, SigningKey], dns_server: DnsServer
) -> None:
    resolver = Resolver(DnsSettings(nameservers=(dns_server.address,), cache_size=0))
    raw = sign(post(), keys["example.org"])
    verify(raw, resolver)
    verify(raw, resolver)
    assert dns_server.count(keys["example.org"].dns_name()) == 2


# --- DNS failures -----------------------------------------------------------------


def test_silent_dns_server_means_not_authenticated_and_one_log_line(
    keys: dict[str, SigningKey], dns_server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    dns_server.mode = "drop"
    resolver = Resolver(DnsSettings(nameservers=(dns_server.address,), timeout=0.5))
    caplog.set_level(logging.DEBUG)
    result = verify(sign(post(), keys["example.org"]), resolver)
    assert result.domains == frozenset()
    assert result.dkim[0].result == "temperror"
    assert dns_server.count(keys["example.org"].dns_name()) >= 1
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1
    assert lines[0].levelno == logging.INFO
    assert "dkim=temperror d=example.org (DNS: s1._domainkey.example.org." in lines[0].message
    assert "<minutes-1@example.org>" in lines[0].message


def test_servfail_means_not_authenticated(
    keys: dict[str, SigningKey], dns_server: DnsServer, resolver: Resolver
) -> None:
    dns_server.mode = "servfail"
    result = verify(sign(post(), keys["example.org"]), resolver)
    assert result.domains == frozenset()
    assert result.dkim[0].result == "temperror"


def test_stopped_dns_server_means_not_authenticated(
    keys: dict[str, SigningKey], dns_server: DnsServer
) -> None:
    resolver = Resolver(DnsSettings(nameservers=(dns_server.address,), timeout=1.0))
    dns_server.stop()
    result = verify(sign(post(), keys["example.org"]), resolver)
    assert result.domains == frozenset()
    assert result.dkim[0].result == "temperror"


def test_silent_first_nameserver_falls_through_to_the_next(
    keys: dict[str, SigningKey], dns_server: DnsServer
) -> None:
    with DnsServer() as silent:
        silent.mode = "drop"
        resolver = Resolver(
            DnsSettings(nameservers=(silent.address, dns_server.address), timeout=2.0)
        )
        assert verify(sign(post(), keys["example.org"]), resolver).domains == {"example.org"}
        assert silent.count(keys["example.org"].dns_name()) >= 1


def test_resolver_txt_answers(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.txt["multi.example"] = ["v=spf1 -all", "x" * 300]
    dns_server.a["host.example"] = ["192.0.2.7"]
    records = resolver.txt("multi.example")
    assert records is not None and sorted(records) == sorted([b"v=spf1 -all", b"x" * 300])
    assert resolver.txt("host.example") is None  # the name exists, no TXT (NODATA)
    assert resolver.txt("absent.example") is None  # NXDOMAIN
    assert resolver.a("host.example") == ["192.0.2.7"]
    assert resolver.txt("a..b") is None  # not a name at all
    dns_server.mode = "servfail"
    with pytest.raises(DnsError, match=r"fresh\.example"):
        resolver.txt("fresh.example")


# --- Authentication-Results --------------------------------------------------------

TRUST_MX = AuthSettings(trusted_authserv_ids=("mx.example.net",))


def test_trusted_dmarc_pass_authenticates(resolver: Resolver) -> None:
    raw = post(extra="Authentication-Results: mx.example.net; dmarc=pass header.from=example.org\n")
    result = verify(raw, resolver, TRUST_MX)
    assert result.domains == {"example.org"}
    assert "dmarc=pass header.from=example.org (by mx.example.net)" in result.summary()


def test_trusted_results_are_read_with_comments_case_and_several_results(
    resolver: Resolver,
) -> None:
    raw = post(
        extra="Authentication-Results: MX.Example.NET (Postfix) 1;\n"
        "  spf=pass (sender ok) smtp.mailfrom=example.org;\n"
        "  DKIM=fail (bad sig) header.d=example.org;\n"
        "  DMARC=Pass (p=REJECT dis=NONE) Header.From=Example.ORG\n"
    )
    assert verify(raw, resolver, TRUST_MX).domains == {"example.org"}


def test_untrusted_authserv_id_is_ignored(resolver: Resolver) -> None:
    raw = post(
        extra="Authentication-Results: mx.evil.example; dmarc=pass header.from=example.org\n"
    )
    result = verify(raw, resolver, TRUST_MX)
    assert result.domains == frozenset()
    assert "ignored Authentication-Results from mx.evil.example" in result.summary()
    # with the default configuration nobody is trusted, not even our own MTA
    raw = post(extra="Authentication-Results: mx.example.net; dmarc=pass header.from=example.org\n")
    assert verify(raw, resolver).domains == frozenset()


def test_trusted_dmarc_fail_does_not_authenticate(resolver: Resolver) -> None:
    raw = post(extra="Authentication-Results: mx.example.net; dmarc=fail header.from=example.org\n")
    assert verify(raw, resolver, TRUST_MX).domains == frozenset()


def test_trusted_dmarc_pass_for_another_domain_does_not_authenticate(resolver: Resolver) -> None:
    raw = post(
        extra="Authentication-Results: mx.example.net; dmarc=pass header.from=evil.example\n"
    )
    assert verify(raw, resolver, TRUST_MX).domains == frozenset()


def test_garbled_authentication_results_is_a_note_not_an_exception(resolver: Resolver) -> None:
    raw = post(
        extra="Authentication-Results: mx.example.net; ;;; ===\n"
        "Authentication-Results: (unclosed comment\n"
    )
    result = verify(raw, resolver, TRUST_MX)
    assert result.domains == frozenset()
    assert result.summary().count("unparsable Authentication-Results") == 2


# --- configuration ----------------------------------------------------------------


def test_nameservers_with_and_without_ports() -> None:
    s = config.from_dict(
        {"dns": {"nameservers": ["192.0.2.1", "192.0.2.2:5353", "::1", "[2001:db8::1]:53"]}}
    )
    assert s.dns.nameservers == ("192.0.2.1", "192.0.2.2:5353", "::1", "[2001:db8::1]:53")
    assert (s.dns.timeout, s.dns.cache_size, s.auth.trusted_authserv_ids) == (5.0, 10000, ())
    env = {"LISTSERV_DNS_NAMESERVERS": "192.0.2.1, 192.0.2.2:53", "LISTSERV_DNS_TIMEOUT": "2"}
    s = config.from_dict({}, env=env)
    assert (s.dns.nameservers, s.dns.timeout) == (("192.0.2.1", "192.0.2.2:53"), 2.0)


def test_resolver_uses_the_configured_port(dns_server: DnsServer) -> None:
    dns_server.txt["probe.example"] = ["hello"]
    settings = config.from_dict({"dns": {"nameservers": [dns_server.address]}})
    assert Resolver.from_settings(settings.dns).txt("probe.example") == [b"hello"]
    assert dns_server.count("probe.example", "udp") == 1


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("dns", {"nameservers": ["dns.example.net"]}, "[dns] nameservers: 'dns.example.net'"),
        ("dns", {"nameservers": ["192.0.2.1:0"]}, "[dns] nameservers: '192.0.2.1:0': port"),
        ("dns", {"nameservers": ["192.0.2.1:dns"]}, "[dns] nameservers: '192.0.2.1:dns'"),
        ("dns", {"nameservers": ["[::1"]}, "[dns] nameservers: '[::1'"),
        ("dns", {"nameservers": "192.0.2.1"}, "[dns] nameservers: expected an array of strings"),
        ("dns", {"nameservers": [53]}, "[dns] nameservers: expected an array of strings"),
        ("dns", {"timeout": 0}, "[dns] timeout: must be greater than 0"),
        ("dns", {"cache_size": -1}, "[dns] cache_size: must not be negative"),
        ("dns", {"resolvers": []}, "unknown key 'resolvers' in [dns]"),
        ("auth", {"trusted_authserv_ids": ["mx.example.net; x"]}, "[auth] trusted_authserv_ids"),
        ("auth", {"trusted_authserv_ids": [""]}, "[auth] trusted_authserv_ids"),
    ],
)
def test_bad_dns_and_auth_settings_are_one_line_errors(
    section: str, value: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_dict({section: value}, source="listserv.toml")
    text = str(info.value)
    assert text.startswith("listserv.toml: ")
    assert message in text
    assert "\n" not in text


def test_example_config_documents_dns_and_auth() -> None:
    example = Path(__file__).parent.parent / "config" / "listserv.example.toml"
    s = config.load(example, env={})
    assert s.dns == DnsSettings()
    assert s.auth == AuthSettings()


def test_summary_stays_one_bounded_line(resolver: Resolver) -> None:
    forged = "".join(
        f"Authentication-Results: mx{i}.evil.example; dmarc=pass header.from=example.org\n"
        for i in range(200)
    )
    summary = verify(post(extra=forged), resolver, TRUST_MX).summary()
    assert summary.startswith("dkim=none; ignored Authentication-Results from mx0.evil.example")
    assert len(summary) == 1000 and summary.endswith("...")
    assert summary.isprintable()
