"""DKIM keys on disk and signing, against real files and dkimpy's own verifier."""

from __future__ import annotations

import base64
import re
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dkim
import dns.name
import dns.rdatatype
import dns.zone
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from listserv import mail
from listserv.distribute.dkim import (
    OVERSIGNED_HEADERS,
    SIGNED_HEADERS,
    KeyInfo,
    Signer,
    SigningKey,
    activate_key,
    active_key,
    generate_key,
    list_keys,
)
from listserv.errors import ConfigError, InvalidInput, NotFound

DOMAIN = "lists.example.org"

MESSAGE = (
    b"From: Alice Example <alice@example.net>\r\n"
    b"To: Discuss <discuss@lists.example.org>\r\n"
    b"Subject: [discuss] Minutes of the meeting\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <abc123@example.net>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"Received: from mx.example.net by lists.example.org; Mon, 01 Jan 2024 10:00:01 +0000\r\n"
    b"X-Mailer: Example 1.0\r\n"
    b"List-Id: Discussion <discuss.lists.example.org>\r\n"
    b"List-Unsubscribe: <https://lists.example.org/u/tok123>,\r\n"
    b" <mailto:discuss-leave@lists.example.org>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"\r\n"
    b"Hello everyone,\r\n"
    b"\r\n"
    b"the minutes are attached below.\r\n"
)


DnsFunc = Callable[..., bytes | None]


def _dnsfunc(key: SigningKey, asked: list[bytes] | None = None) -> DnsFunc:
    """A resolver for dkim.verify serving `key`'s TXT record and nothing else."""
    expected = f"{key.selector}._domainkey.{key.domain}.".encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        if asked is not None:
            asked.append(name)
        return key.public_txt().encode() if name == expected else None

    return dnsfunc


def txt_from_zone_line(line: str) -> tuple[str, str]:
    """The owner name and joined TXT value of one zone-file line, as a DNS server loads it.

    A real zone supplies the default TTL the line leaves out; dnspython joins
    nothing, so the character-strings are concatenated as RFC 6376 §3.6.2.2 says.
    """
    zone = dns.zone.from_text(
        f"$TTL 3600\n{line}\n", origin=dns.name.root, relativize=False, check_origin=False
    )
    [(name, node)] = zone.nodes.items()
    [rdataset] = node.rdatasets
    assert rdataset.rdtype == dns.rdatatype.TXT
    [rdata] = rdataset
    strings: tuple[bytes, ...] = rdata.strings  # type: ignore[attr-defined]
    assert all(len(s) <= 255 for s in strings)
    return name.to_text(), b"".join(strings).decode("ascii")


def _tag(signed: bytes, tag: str) -> str:
    """A tag's value from the first DKIM-Signature header, unfolded."""
    value = mail.header(mail.parse(signed), "DKIM-Signature")
    assert value is not None
    tags = dict(
        part.strip().split("=", 1) for part in re.sub(r"\s+", "", value).split(";") if part.strip()
    )
    return tags[tag]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# Keys on disk


def test_generate_key_writes_private_files_and_active(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    key = generate_key(keys_dir, DOMAIN, "2024a", bits=1024)

    pem = keys_dir / DOMAIN / "2024a.pem"
    active = keys_dir / DOMAIN / "active"
    assert _mode(keys_dir) == 0o700
    assert _mode(keys_dir / DOMAIN) == 0o700
    assert _mode(pem) == 0o600
    assert pem.read_bytes() == key.private_pem
    assert key.private_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8
    assert active.read_text() == "2024a\n"
    assert sorted(p.name for p in (keys_dir / DOMAIN).iterdir()) == ["2024a.pem", "active"]
    assert active_key(keys_dir, DOMAIN) == key
    assert (key.domain, key.selector) == (DOMAIN, "2024a")


def test_domain_is_lower_cased(tmp_path: Path) -> None:
    key = generate_key(tmp_path, "Lists.Example.ORG", "s1", bits=1024)

    assert key.domain == DOMAIN
    assert (tmp_path / DOMAIN / "s1.pem").is_file()
    assert active_key(tmp_path, "LISTS.example.org") == key


def test_private_key_not_in_repr(tmp_path: Path) -> None:
    key = generate_key(tmp_path, DOMAIN, "s1", bits=1024)

    assert "PRIVATE" not in repr(key)


def test_dns_record_format(tmp_path: Path) -> None:
    key = generate_key(tmp_path, DOMAIN, "sel-1", bits=1024)

    record = key.dns_record()
    pattern = (
        rf'^sel-1\._domainkey\.{re.escape(DOMAIN)}\. IN TXT "v=DKIM1; k=rsa; p=[A-Za-z0-9+/=]+"$'
    )
    assert re.match(pattern, record), record  # 1024 bits: one string is enough
    assert record.endswith(f'"{key.public_txt()}"')
    assert txt_from_zone_line(record) == (f"sel-1._domainkey.{DOMAIN}.", key.public_txt())
    # p= is the SubjectPublicKeyInfo of the private key on disk.
    der = base64.b64decode(key.public_txt().split("p=", 1)[1])
    public = serialization.load_der_public_key(der)
    private = serialization.load_pem_private_key(key.private_pem, password=None)
    assert public.public_numbers() == private.public_key().public_numbers()  # type: ignore[union-attr]


def test_second_key_waits_for_activation(tmp_path: Path) -> None:
    first = generate_key(tmp_path, DOMAIN, "2024a", bits=1024)
    second = generate_key(tmp_path, DOMAIN, "2024b", bits=1024)

    assert active_key(tmp_path, DOMAIN) == first  # its record is not published yet
    assert (tmp_path / DOMAIN / "2024b.pem").read_bytes() == second.private_pem
    assert first.public_txt() != second.public_txt()

    assert activate_key(tmp_path, DOMAIN, "2024b") == second
    assert active_key(tmp_path, DOMAIN) == second
    assert (tmp_path / DOMAIN / "active").read_text() == "2024b\n"
    assert activate_key(tmp_path, DOMAIN, "2024a") == first  # and back: nothing is deleted
    assert active_key(tmp_path, DOMAIN) == first


def test_generate_key_with_activate_takes_over(tmp_path: Path) -> None:
    generate_key(tmp_path, DOMAIN, "2024a", bits=1024)
    second = generate_key(tmp_path, DOMAIN, "2024b", bits=1024, activate=True)

    assert active_key(tmp_path, DOMAIN) == second


def test_first_key_is_active_even_with_activate_false(tmp_path: Path) -> None:
    key = generate_key(tmp_path, DOMAIN, "2024a", bits=1024, activate=False)

    assert active_key(tmp_path, DOMAIN) == key


def test_activate_matches_the_selector_case_insensitively(tmp_path: Path) -> None:
    generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    second = generate_key(tmp_path, DOMAIN, "Rot2", bits=1024)

    assert activate_key(tmp_path, "Lists.Example.org", "rot2") == second
    assert (tmp_path / DOMAIN / "active").read_text() == "Rot2\n"


def test_activate_refuses_an_unknown_selector_and_keeps_the_active_key(tmp_path: Path) -> None:
    first = generate_key(tmp_path, DOMAIN, "s1", bits=1024)

    with pytest.raises(NotFound, match=re.escape("no DKIM key 's2' for lists.example.org")):
        activate_key(tmp_path, DOMAIN, "s2")
    with pytest.raises(NotFound):
        activate_key(tmp_path, "other.example.org", "s1")
    with pytest.raises(InvalidInput, match="selector"):
        activate_key(tmp_path, DOMAIN, "../s1")
    assert active_key(tmp_path, DOMAIN) == first


def test_activate_refuses_an_unusable_key(tmp_path: Path) -> None:
    first = generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    (tmp_path / DOMAIN / "bad.pem").write_bytes(b"not a key\n")

    with pytest.raises(ConfigError, match=re.escape("bad.pem: not a usable DKIM key")):
        activate_key(tmp_path, DOMAIN, "bad")
    assert active_key(tmp_path, DOMAIN) == first


def test_list_keys_shows_every_key_and_the_active_one(tmp_path: Path) -> None:
    generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    generate_key(tmp_path, DOMAIN, "s2", bits=2048)
    generate_key(tmp_path, "other.example.org", "x", bits=1024)
    (tmp_path / "stray-file").write_text("not a domain\n")
    (tmp_path / "not_a_domain").mkdir()

    assert list_keys(tmp_path) == [
        KeyInfo(DOMAIN, "s1", 1024, active=True, state="active"),
        KeyInfo(DOMAIN, "s2", 2048, active=False, state="pending"),
        KeyInfo("other.example.org", "x", 1024, active=True, state="active"),
    ]
    assert list_keys(tmp_path, "OTHER.example.org") == [
        KeyInfo("other.example.org", "x", 1024, active=True, state="active")
    ]
    assert list_keys(tmp_path, "none.example.org") == []
    assert list_keys(tmp_path / "missing") == []


def test_list_keys_reports_broken_files_as_rows(tmp_path: Path) -> None:
    generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    d = tmp_path / DOMAIN
    _break_garbage_pem(d)
    (d / "s2.pem").mkdir()  # unreadable
    (d / "active").write_text("gone\n")

    rows = list_keys(tmp_path, DOMAIN)

    assert [(r.selector, r.bits, r.active) for r in rows] == [
        ("s1", None, False),
        ("s2", None, False),
        ("gone", None, True),
    ]
    assert rows[0].problem == "not a usable key: not a PEM private key"
    assert rows[1].problem is not None and rows[1].problem.startswith("cannot read:")
    assert rows[2].problem == f"{d / 'active'} names 'gone' but gone.pem does not exist"


def test_list_keys_reports_an_unreadable_active_file(tmp_path: Path) -> None:
    generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    (tmp_path / DOMAIN / "active").unlink()
    (tmp_path / DOMAIN / "active").mkdir()

    rows = list_keys(tmp_path, DOMAIN)

    assert [(r.selector, r.bits, r.active) for r in rows] == [
        (None, None, False),
        ("s1", 1024, False),
    ]
    assert rows[0].problem is not None and rows[0].problem.startswith("cannot read ")
    assert rows[1].problem is None


@pytest.mark.parametrize("again", ["2024a", "2024A"])
def test_reusing_a_selector_is_refused(tmp_path: Path, again: str) -> None:
    first = generate_key(tmp_path, DOMAIN, "2024a", bits=1024)
    second = generate_key(tmp_path, DOMAIN, "2024b", bits=1024)

    with pytest.raises(InvalidInput, match="pick a new selector"):
        generate_key(tmp_path, DOMAIN, again, bits=1024, activate=True)

    assert (tmp_path / DOMAIN / "2024a.pem").read_bytes() == first.private_pem
    assert (tmp_path / DOMAIN / "2024b.pem").read_bytes() == second.private_pem
    assert active_key(tmp_path, DOMAIN) == first
    assert not [p for p in (tmp_path / DOMAIN).iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "selector", ["", "-a", "_a", ".a", "a/b", "../x", "a b", "a..b", "a.", "sél", "x" * 64, "a\n"]
)
def test_bad_selector_is_refused(tmp_path: Path, selector: str) -> None:
    with pytest.raises(InvalidInput, match="selector"):
        generate_key(tmp_path, DOMAIN, selector, bits=1024)
    assert not (tmp_path / DOMAIN).exists() or not any((tmp_path / DOMAIN).iterdir())


@pytest.mark.parametrize("bits", [512, 1000, 2047, 8192, 2048.0, True])
def test_bad_bits_are_refused(tmp_path: Path, bits: int) -> None:
    with pytest.raises(InvalidInput, match="key size"):
        generate_key(tmp_path, DOMAIN, "s1", bits=bits)


@pytest.mark.parametrize(
    "domain",
    [
        "",
        "localhost",
        "..",
        "../example.org",
        "a/b.example.org",
        "-a.example.org",
        "a-.example.org",
        "a..example.org",
        "example.org.",
        "exa mple.org",
        "bücher.example",
        "a_b.example.org",
        "x" * 64 + ".example.org",
    ],
)
def test_bad_domain_is_refused(tmp_path: Path, domain: str) -> None:
    with pytest.raises(InvalidInput, match="domain"):
        generate_key(tmp_path, domain, "s1", bits=1024)
    with pytest.raises(InvalidInput, match="domain"):
        active_key(tmp_path, domain)
    assert list(tmp_path.iterdir()) == []


def test_active_key_is_none_when_nothing_is_configured(tmp_path: Path) -> None:
    assert active_key(tmp_path / "missing", DOMAIN) is None
    generate_key(tmp_path, "other.example.org", "s1", bits=1024)
    assert active_key(tmp_path, DOMAIN) is None
    (tmp_path / DOMAIN).mkdir()
    assert active_key(tmp_path, DOMAIN) is None  # a directory but no active file


def _break_missing_pem(d: Path) -> Path:
    (d / "s1.pem").unlink()
    return d / "active"


def _break_unknown_selector(d: Path) -> Path:
    (d / "active").write_text("nosuch\n")
    return d / "active"


def _break_empty_active(d: Path) -> Path:
    (d / "active").write_text("")
    return d / "active"


def _break_traversal(d: Path) -> Path:
    (d / "active").write_text("../../etc/passwd\n")
    return d / "active"


def _break_garbage_pem(d: Path) -> Path:
    (d / "s1.pem").write_bytes(b"not a key\n")
    return d / "s1.pem"


def _break_unreadable_pem(d: Path) -> Path:
    # A directory in place of the file: unreadable even for root, unlike chmod 000.
    (d / "s1.pem").unlink()
    (d / "s1.pem").mkdir()
    return d / "s1.pem"


def _break_ec_key(d: Path) -> Path:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (d / "s1.pem").write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return d / "s1.pem"


def _break_encrypted_pem(d: Path) -> Path:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (d / "s1.pem").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return d / "s1.pem"


@pytest.mark.parametrize(
    "breaker",
    [
        _break_missing_pem,
        _break_unknown_selector,
        _break_empty_active,
        _break_traversal,
        _break_garbage_pem,
        _break_unreadable_pem,
        _break_ec_key,
        _break_encrypted_pem,
    ],
)
def test_active_key_reports_a_broken_key(tmp_path: Path, breaker: Callable[[Path], Path]) -> None:
    generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    culprit = breaker(tmp_path / DOMAIN)

    with pytest.raises(ConfigError) as excinfo:
        active_key(tmp_path, DOMAIN)

    message = str(excinfo.value)
    assert str(culprit) in message
    assert "\n" not in message


def test_active_key_accepts_a_pkcs1_pem_with_crlf(tmp_path: Path) -> None:
    """Keys made elsewhere (openssl genrsa, Windows editors) come back as canonical PKCS#8."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pkcs1 = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    (tmp_path / DOMAIN).mkdir()
    (tmp_path / DOMAIN / "ext.pem").write_bytes(pkcs1.replace(b"\n", b"\r\n"))
    (tmp_path / DOMAIN / "active").write_text("ext\n")

    key = active_key(tmp_path, DOMAIN)

    assert key is not None
    assert key.private_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert b"\r" not in key.private_pem
    assert dkim.verify(Signer(key).sign(MESSAGE), dnsfunc=_dnsfunc(key))


# Signing


def test_signed_message_verifies(tmp_path: Path) -> None:
    key = generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    asked: list[bytes] = []

    signed = Signer(key).sign(MESSAGE)

    assert signed.startswith(b"DKIM-Signature: ")
    assert signed.endswith(b"\r\n" + MESSAGE)
    header = signed[: -len(MESSAGE)]
    assert b"\n" not in header.replace(b"\r\n", b"")  # CRLF only, folded or not
    assert dkim.verify(signed, dnsfunc=_dnsfunc(key, asked))
    assert asked == [b"s1._domainkey.lists.example.org."]
    assert _tag(signed, "a") == "rsa-sha256"
    assert _tag(signed, "c") == "relaxed/relaxed"
    assert (_tag(signed, "d"), _tag(signed, "s")) == (DOMAIN, "s1")


OVERSIGNED_NAMES = (
    *("from", "subject", "date", "to", "cc", "reply-to", "message-id"),
    *("list-id", "list-post", "list-help", "list-unsubscribe", "list-unsubscribe-post"),
    *("list-owner", "mime-version", "content-type", "content-transfer-encoding"),
)


def test_h_lists_each_oversigned_name_once_more_than_it_occurs(tmp_path: Path) -> None:
    key = generate_key(tmp_path, DOMAIN, "s1", bits=1024)

    signed_names = _tag(Signer(key).sign(MESSAGE), "h").split(":")

    assert set(OVERSIGNED_HEADERS) == set(OVERSIGNED_NAMES)
    headers = mail.parse(MESSAGE)
    for name in OVERSIGNED_NAMES:
        occurs = len(headers.get_all(name, []))
        assert signed_names.count(name) == occurs + 1, name
    assert signed_names.count("cc") == 1  # absent from MESSAGE: listed once, as a null header
    assert signed_names.count("list-id") == 2
    assert set(signed_names) <= set(SIGNED_HEADERS)
    assert "received" not in signed_names and "x-mailer" not in signed_names
    assert "precedence" not in signed_names  # signed when present, not oversigned


def test_repeated_headers_are_all_signed(tmp_path: Path) -> None:
    key = generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    message = b"From: a@example.net\r\nTo: b@example.net\r\nTo: c@example.net\r\n\r\nhi\r\n"

    signed = Signer(key).sign(message)

    assert _tag(signed, "h").split(":")[:3] == ["from", "to", "to"]
    assert _tag(signed, "h").split(":").count("to") == 3
    assert dkim.verify(signed, dnsfunc=_dnsfunc(key))
    third = signed.replace(b"To: c@example.net\r\n", b"To: c@example.net\r\nTo: d@x.net\r\n")
    assert not dkim.verify(third, dnsfunc=_dnsfunc(key))


def _prepend(signed: bytes, field: bytes) -> bytes:
    return field + signed


def _append(signed: bytes, field: bytes) -> bytes:
    head, sep, body = signed.partition(b"\r\n\r\n")
    return head + b"\r\n" + field.rstrip(b"\r\n") + sep + body


@pytest.mark.parametrize("where", [_prepend, _append], ids=["prepended", "appended"])
@pytest.mark.parametrize(
    "field",
    [
        b"From: Mallory <mallory@example.com>\r\n",
        b"Subject: [discuss] Urgent: reset your password\r\n",
        b"List-Unsubscribe: <https://evil.example.com/u>\r\n",
        b"Cc: victim@example.com\r\n",  # absent from MESSAGE: its null entry is filled
    ],
    ids=["from", "subject", "list-unsubscribe", "cc"],
)
def test_an_added_copy_of_an_oversigned_header_breaks_the_signature(
    tmp_path: Path, where: Callable[[bytes, bytes], bytes], field: bytes
) -> None:
    key = generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    signed = Signer(key).sign(MESSAGE)
    assert dkim.verify(signed, dnsfunc=_dnsfunc(key))

    tampered = where(signed, field)

    assert tampered != signed and field.rstrip() in tampered
    assert mail.parse(tampered).get_body() is not None
    assert not dkim.verify(tampered, dnsfunc=_dnsfunc(key))


def test_an_added_header_that_is_not_oversigned_keeps_the_signature(tmp_path: Path) -> None:
    """Relays add Received and the like: only the protected names are frozen."""
    key = generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    signed = Signer(key).sign(MESSAGE)

    relayed = b"Received: from lists.example.org by mx.example.com\r\n" + _append(
        signed, b"X-Spam-Score: 0.1\r\n"
    )

    assert dkim.verify(relayed, dnsfunc=_dnsfunc(key))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"the minutes are attached", b"the minutes are NOT attached"),
        (b"Subject: [discuss] Minutes", b"Subject: [discuss] Mintues"),
        (b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", b"List-Unsubscribe-Post: X=Y"),
    ],
)
def test_changes_after_signing_break_the_signature(tmp_path: Path, old: bytes, new: bytes) -> None:
    key = generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    signed = Signer(key).sign(MESSAGE)
    assert signed.count(old) == 1

    assert not dkim.verify(signed.replace(old, new), dnsfunc=_dnsfunc(key))


def test_signing_requires_from(tmp_path: Path) -> None:
    key = generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    signer = Signer(key)

    with pytest.raises(InvalidInput, match="From"):
        signer.sign(b"To: b@example.net\r\nSubject: x\r\n\r\nhi\r\n")
    with pytest.raises(InvalidInput):
        signer.sign(b"From: a@example.net\r\nthis is no header\r\n\r\nhi\r\n")
    with pytest.raises(InvalidInput):
        signer.sign(b" From: a@example.net\r\n\r\nhi\r\n")


def test_signer_refuses_a_bad_key(tmp_path: Path) -> None:
    good = generate_key(tmp_path, DOMAIN, "s1", bits=1024)

    with pytest.raises(InvalidInput):
        Signer(SigningKey(DOMAIN, "s1", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"))
    with pytest.raises(InvalidInput):
        Signer(SigningKey("bücher.example", "s1", good.private_pem))
    with pytest.raises(InvalidInput):
        Signer(SigningKey(DOMAIN, "s 1", good.private_pem))


@pytest.mark.parametrize(
    "message",
    [
        MESSAGE,
        # Long subject with an encoded word, folded body-less header, UTF-8 body.
        b"From: =?utf-8?q?J=C3=B6rg?= <joerg@example.net>\r\n"
        b"To: discuss@lists.example.org\r\n"
        b"Subject: " + b"a rather long subject line that goes on " * 4 + b"=?utf-8?b?w6TDtsO8?=\r\n"
        b"List-Id: <discuss.lists.example.org>\r\n"
        b"List-Unsubscribe: <https://lists.example.org/u/" + b"t" * 120 + b">\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + "Grüße\r\n".encode() * 20,
        # Multipart with preamble and epilogue.
        b"From: a@example.net\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"preamble\r\n--b1\r\nContent-Type: text/plain\r\n\r\none\r\n--b1--\r\nepilogue\r\n",
    ],
    ids=["list-post", "long-utf8", "multipart"],
)
def test_signed_message_survives_the_mail_round_trip(tmp_path: Path, message: bytes) -> None:
    key = generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    wire = mail.to_bytes(mail.parse(message))  # what the pipeline hands to the signer

    signed = Signer(key).sign(wire)
    again = mail.to_bytes(mail.parse(signed))

    assert again == signed
    assert dkim.verify(again, dnsfunc=_dnsfunc(key))


def test_signer_is_usable_from_threads(tmp_path: Path) -> None:
    key = generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    signer = Signer(key)
    messages = [MESSAGE.replace(b"Minutes", f"Minutes {i}".encode()) for i in range(16)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        signed = list(pool.map(signer.sign, messages))

    dnsfunc = _dnsfunc(key)
    assert all(dkim.verify(s, dnsfunc=dnsfunc) for s in signed)
    assert all(s.endswith(m) for s, m in zip(signed, messages, strict=True))


def test_2048_bit_key(tmp_path: Path) -> None:
    key = generate_key(tmp_path, DOMAIN, "big", bits=2048)

    private = serialization.load_pem_private_key(key.private_pem, password=None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
    assert len(key.public_txt()) > 255  # one TXT character-string cannot hold it
    signed = Signer(key).sign(MESSAGE)
    assert dkim.verify(signed, dnsfunc=_dnsfunc(key))


def test_2048_bit_dns_record_is_split_and_loads_back_to_the_verifying_key(tmp_path: Path) -> None:
    key = generate_key(tmp_path, DOMAIN, "big", bits=2048)

    record = key.dns_record()
    name, value = txt_from_zone_line(record)

    assert "\n" not in record
    assert re.fullmatch(r'\S+ IN TXT "[^"]{255}" "[^"]{1,255}"', record), record
    assert name == f"big._domainkey.{DOMAIN}."
    assert value == key.public_txt()

    def dnsfunc(qname: bytes, timeout: int = 5) -> bytes | None:
        return value.encode() if qname.decode() == name else None

    assert dkim.verify(Signer(key).sign(MESSAGE), dnsfunc=dnsfunc)
