"""DKIM keys on disk and signing, against real files and dkimpy's own verifier."""

from __future__ import annotations

import base64
import re
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from listserv import mail
from listserv.distribute.dkim import (
    SIGNED_HEADERS,
    Signer,
    SigningKey,
    active_key,
    generate_key,
)
from listserv.errors import ConfigError, InvalidInput

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
    assert re.match(pattern, record), record
    assert record.endswith(f'"{key.public_txt()}"')
    # p= is the SubjectPublicKeyInfo of the private key on disk.
    der = base64.b64decode(key.public_txt().split("p=", 1)[1])
    public = serialization.load_der_public_key(der)
    private = serialization.load_pem_private_key(key.private_pem, password=None)
    assert public.public_numbers() == private.public_key().public_numbers()  # type: ignore[union-attr]


def test_second_key_with_new_selector_becomes_active(tmp_path: Path) -> None:
    first = generate_key(tmp_path, DOMAIN, "2024a", bits=1024)
    second = generate_key(tmp_path, DOMAIN, "2024b", bits=1024)

    assert active_key(tmp_path, DOMAIN) == second
    assert (tmp_path / DOMAIN / "2024a.pem").read_bytes() == first.private_pem
    assert first.public_txt() != second.public_txt()


@pytest.mark.parametrize("again", ["2024a", "2024A"])
def test_reusing_a_selector_is_refused(tmp_path: Path, again: str) -> None:
    first = generate_key(tmp_path, DOMAIN, "2024a", bits=1024)
    second = generate_key(tmp_path, DOMAIN, "2024b", bits=1024)

    with pytest.raises(InvalidInput, match="pick a new selector"):
        generate_key(tmp_path, DOMAIN, again, bits=1024)

    assert (tmp_path / DOMAIN / "2024a.pem").read_bytes() == first.private_pem
    assert active_key(tmp_path, DOMAIN) == second
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


def test_signature_covers_the_present_list_headers(tmp_path: Path) -> None:
    key = generate_key(tmp_path, DOMAIN, "s1", bits=1024)

    signed_names = _tag(Signer(key).sign(MESSAGE), "h").split(":")

    for name in ("from", "subject", "list-id", "list-unsubscribe", "list-unsubscribe-post"):
        assert name in signed_names
    assert set(signed_names) <= set(SIGNED_HEADERS)
    assert "received" not in signed_names and "x-mailer" not in signed_names
    assert "cc" not in signed_names and "precedence" not in signed_names  # absent from MESSAGE
    assert len(signed_names) == len(set(signed_names))


def test_repeated_headers_are_all_signed(tmp_path: Path) -> None:
    key = generate_key(tmp_path, DOMAIN, "s1", bits=1024)
    message = b"From: a@example.net\r\nTo: b@example.net\r\nTo: c@example.net\r\n\r\nhi\r\n"

    signed = Signer(key).sign(message)

    assert _tag(signed, "h").split(":") == ["from", "to", "to"]
    assert dkim.verify(signed, dnsfunc=_dnsfunc(key))


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
    assert len(key.public_txt()) > 255  # the record must be split by DNS tools; see dns_record()
    signed = Signer(key).sign(MESSAGE)
    assert dkim.verify(signed, dnsfunc=_dnsfunc(key))
