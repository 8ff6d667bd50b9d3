"""Our RFC 6376 signer: canonicalization against dkimpy's, signatures against dkimpy's verifier.

dkimpy signed our mail before; it now only checks it. Its canonicalization
functions (`dkim.canonicalization`) are the byte-for-byte reference where it
follows the RFC, and the two places where it does not are tested on their own.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from dkim.canonicalization import CanonicalizationPolicy, Relaxed, Simple

from listserv import mail
from listserv.distribute.dkim import (
    Canonicalization,
    Signer,
    SigningKey,
    canonicalize_body,
    canonicalize_header,
    generate_key,
)
from listserv.errors import InvalidInput

DOMAIN = "lists.example.org"
T = 1_700_000_000
CANONS: list[tuple[Canonicalization, Canonicalization]] = [
    ("relaxed", "relaxed"),
    ("simple", "simple"),
    ("relaxed", "simple"),
    ("simple", "relaxed"),
]
CANON_IDS = [f"{h}/{b}" for h, b in CANONS]


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return generate_key(tmp_path_factory.mktemp("keys"), DOMAIN, "s1", bits=1024)


def dnsfunc_for(key: SigningKey) -> Callable[..., bytes | None]:
    expected = f"{key.selector}._domainkey.{key.domain}.".encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return key.public_txt().encode() if name == expected else None

    return dnsfunc


def verifies(signed: bytes, key: SigningKey) -> bool:
    return bool(dkim.verify(signed, dnsfunc=dnsfunc_for(key)))


def tags(signed: bytes) -> dict[str, str]:
    value = mail.header(mail.parse(signed), "DKIM-Signature")
    assert value is not None
    parts = re.sub(r"\s+", "", value).split(";")
    return dict(part.split("=", 1) for part in parts if part)


def on_the_wire(message: bytes) -> bytes:
    """What our SMTP client (aiosmtplib) transmits: every line ending CRLF, a final CRLF."""
    wire = re.sub(rb"\r\n|\n|\r(?!\n)", b"\r\n", message)
    return wire if wire.endswith(b"\r\n") else wire + b"\r\n"


# Messages that have tripped signers up: each must verify in all four c= modes.
CORPUS: dict[str, bytes] = {
    "folded": (
        b"From: Alice Example\r\n <alice@example.net>\r\n"
        b"To: a@example.net,\r\n\tb@example.net,\r\n    c@example.net\r\n"
        b"Subject: a subject folded\r\n over two lines\r\n"
        b"List-Unsubscribe: <https://lists.example.org/u/tok>,\r\n <mailto:leave@example.org>\r\n"
        b"\r\nbody\r\n"
    ),
    "trailing-whitespace": (
        b"From: a@example.net   \r\nSubject:\tspaced \t out  \r\nTo:b@example.net\r\n\r\n"
        b"line with trailing spaces   \r\n\ttabbed\t\tline\t\r\n   \r\n\r\n \t \r\n"
    ),
    "empty-body": b"From: a@example.net\r\nSubject: nothing\r\n\r\n",
    "no-body-at-all": b"From: a@example.net\r\nSubject: nothing\r\n",
    "only-empty-lines": b"From: a@example.net\r\n\r\n\r\n\r\n\r\n",
    "no-trailing-crlf": b"From: a@example.net\r\nSubject: x\r\n\r\nlast line without CRLF",
    "utf8-headers": (
        "From: Jörg Müller <jörg@exämple.org>\r\nTo: staff@lists.example.org\r\n"
        "Subject: Grüße aus Köln  \r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        "\r\nSchöne Grüße.\r\n"
    ).encode(),
    "repeated-headers": (
        b"Received: one\r\nFrom: a@example.net\r\nTo: b@example.net\r\nReceived: two\r\n"
        b"To: c@example.net\r\nCc: d@example.net\r\nTo: e@example.net\r\nCc: f@example.net\r\n"
        b"\r\nhi\r\n"
    ),
    "mixed-case-names": b"FROM: a@example.net\r\nsubject: x\r\nMessage-Id: <m@x>\r\n\r\nhi\r\n",
    "long-lines": (
        b"From: a@example.net\r\nSubject: " + b"word " * 60 + b"\r\n\r\n" + b"x" * 2000 + b"\r\n"
    ),
}


@pytest.mark.parametrize(("header_canon", "body_canon"), CANONS, ids=CANON_IDS)
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_signatures_verify_with_dkimpy(
    key: SigningKey, header_canon: Canonicalization, body_canon: Canonicalization, name: str
) -> None:
    signer = Signer(key, header_canon=header_canon, body_canon=body_canon)

    signed = signer.sign(CORPUS[name], timestamp=T)

    assert signed.endswith(CORPUS[name])
    assert tags(signed)["c"] == f"{header_canon}/{body_canon}"
    assert tags(signed)["t"] == str(T)
    assert verifies(signed, key)
    assert verifies(on_the_wire(signed), key)


@pytest.mark.parametrize(("header_canon", "body_canon"), CANONS, ids=CANON_IDS)
def test_a_changed_body_or_signed_header_fails(
    key: SigningKey, header_canon: Canonicalization, body_canon: Canonicalization
) -> None:
    signed = Signer(key, header_canon=header_canon, body_canon=body_canon).sign(CORPUS["folded"])
    assert verifies(signed, key)

    assert not verifies(signed.replace(b"body\r\n", b"bodY\r\n"), key)
    assert not verifies(signed.replace(b"over two lines", b"over 2 lines"), key)


def test_refolding_a_header_in_transit_breaks_simple_but_not_relaxed(key: SigningKey) -> None:
    message = b"From: a@example.net\r\nSubject: one two  three\r\n\r\nhi\r\n"
    relaxed = Signer(key).sign(message)
    simple = Signer(key, header_canon="simple", body_canon="simple").sign(message)

    def refold(m: bytes) -> bytes:
        return m.replace(b"Subject: one two  three", b"Subject: one\r\n two three ")

    assert verifies(refold(relaxed), key)
    assert not verifies(refold(simple), key)
    assert verifies(simple, key)


@pytest.mark.parametrize(
    "field",
    [
        b"From: Mallory <mallory@example.com>\r\n",
        b"Subject: reset your password\r\n",
        b"List-Unsubscribe: <https://evil.example.com/u>\r\n",
    ],
    ids=["from", "subject", "list-unsubscribe"],
)
@pytest.mark.parametrize(("header_canon", "body_canon"), CANONS[:2], ids=CANON_IDS[:2])
def test_an_added_copy_of_an_oversigned_header_fails(
    key: SigningKey, header_canon: Canonicalization, body_canon: Canonicalization, field: bytes
) -> None:
    message = (
        b"From: a@example.net\r\nSubject: s\r\nList-Unsubscribe: <mailto:l@example.org>\r\n"
        b"\r\nhi\r\n"
    )
    signed = Signer(key, header_canon=header_canon, body_canon=body_canon).sign(message)
    head, _, body = signed.partition(b"\r\n\r\n")
    assert verifies(signed, key)

    assert not verifies(field + signed, key)
    assert not verifies(head + b"\r\n" + field + b"\r\n" + body, key)


def test_signature_lines_stay_under_78_characters(key: SigningKey) -> None:
    many = b"".join(b"To: r%d@example.net\r\n" % i for i in range(40))
    message = b"From: a@example.net\r\n" + many + b"\r\nhi\r\n"

    signed = Signer(key).sign(message)
    header = signed[: -len(message)]

    lines = header.split(b"\r\n")
    assert lines[-1] == b""
    assert len(lines) > 8  # h= alone needs several lines here
    assert all(len(line) <= 78 for line in lines), [len(line) for line in lines]
    assert all(line.startswith(b" ") for line in lines[1:-1])
    assert tags(signed)["h"].split(":").count("to") == 41
    assert verifies(signed, key)


def test_same_timestamp_same_signature_and_it_is_t(key: SigningKey) -> None:
    signer = Signer(key)
    message = CORPUS["folded"]

    first = signer.sign(message, timestamp=T)

    assert first == signer.sign(message, timestamp=T)  # PKCS#1 v1.5 is deterministic
    assert first != signer.sign(message, timestamp=T + 1)
    assert tags(first)["t"] == str(T)


def test_bare_line_endings_are_signed_as_they_are_sent(key: SigningKey) -> None:
    """aiosmtplib sends a bare LF or CR as CRLF: the signature must fit those bytes."""
    message = b"From: a@example.net\nSubject: lf\n\nline one\nline two\rline three  "

    signed = Signer(key).sign(message)

    assert signed.endswith(message)
    assert verifies(on_the_wire(signed), key)


# Canonicalization, byte for byte against dkimpy's


HEADER_FIELDS = [
    b"Subject: hello   world \t \r\n",
    b"SUBJECT:no-space\r\n",
    b"X-Folded: first\r\n\tsecond\r\n   third  \r\n",
    b"To:   \t leading@example.org\r\n",
    "Subject: =?utf-8?q?x?= Grüße\t aus Köln\r\n".encode(),
    b"Empty:\r\n",
    b"Blank:   \r\n",
    b"List-Unsubscribe: <https://x.example/u>,\r\n <mailto:y@x.example>\r\n",
    b"Key: a\tb  c\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256;\r\n h=from:to; b=\r\n",
]
BODIES = [
    b"",
    b"\r\n",
    b"\r\n\r\n",
    b"a",
    b"a\r\n",
    b"a\r\n\r\n\r\n",
    b"  \r\n\t\r\n",
    b"a  b\t\tc \r\n",
    b" leading\r\n",
    b"a\r\n \r\n\t\r\n",
    b"x\r\n\r\ny\r\n\r\n",
    b"trailing \t\r\n \r\nmiddle\r\n \r\n",
    "Grüße  \r\n\tüber\r\n".encode(),
    b"a\rb\r\n",
    b"a\r\n\r\n b",
    b"\r\n\r\nstarts with empty lines\r\n",
]


@pytest.mark.parametrize("method", ["relaxed", "simple"])
def test_header_canonicalization_equals_dkimpys(method: Canonicalization) -> None:
    theirs = dkim.rfc822_parse(b"".join(HEADER_FIELDS) + b"\r\n")[0]
    algorithm = Relaxed if method == "relaxed" else Simple
    expected = [name + b":" + value for name, value in algorithm.canonicalize_headers(theirs)]

    ours = [canonicalize_header(f, method) for f in HEADER_FIELDS]

    assert ours == expected
    if method == "relaxed":
        assert ours[0] == b"subject:hello world\r\n"
        assert ours[2] == b"x-folded:first second third\r\n"


@pytest.mark.parametrize("method", ["relaxed", "simple"])
@pytest.mark.parametrize("body", BODIES)
def test_body_canonicalization_equals_dkimpys(method: Canonicalization, body: bytes) -> None:
    policy = CanonicalizationPolicy.from_c_value(f"{method}/{method}".encode())

    assert canonicalize_body(body, method) == policy.canonicalize_body(body)


def test_rfc_forms_of_empty_bodies() -> None:
    """RFC 6376 §3.4.3-5: simple turns an empty body into CRLF, relaxed leaves it empty."""
    assert canonicalize_body(b"", "simple") == b"\r\n"
    assert canonicalize_body(b"", "relaxed") == b""
    assert canonicalize_body(b" \r\n\r\n", "relaxed") == b""
    assert canonicalize_body(b" \r\n\r\n", "simple") == b" \r\n"
    assert hashlib.sha256(canonicalize_body(b"", "relaxed")).digest() == hashlib.sha256().digest()


def test_a_last_line_without_crlf_loses_its_trailing_whitespace_unlike_in_dkimpy() -> None:
    """RFC 6376 §3.4.4: WSP at the end of *lines* goes, the last one too. dkimpy keeps
    it when the CRLF is missing; the CRLF the SMTP client adds makes them agree."""
    body = b"text  \t"

    assert canonicalize_body(body, "relaxed") == b"text\r\n"
    assert Relaxed.canonicalize_body(body) == b"text \r\n"  # dkimpy's divergence
    assert canonicalize_body(body, "relaxed") == Relaxed.canonicalize_body(body + b"\r\n")


def test_relaxed_header_strips_only_space_and_tab_unlike_dkimpy() -> None:
    """RFC 6376 §3.4.2 removes WSP (SP, HTAB); dkimpy's bytes.strip() also eats a form feed."""
    field = b"Subject: x\x0c\r\n"

    assert canonicalize_header(field, "relaxed") == b"subject:x\x0c\r\n"
    assert Relaxed.canonicalize_headers([(b"Subject", b" x\x0c\r\n")]) == [(b"subject", b"x\r\n")]


def test_whitespace_before_the_colon_goes_in_relaxed_and_stays_in_simple() -> None:
    field = b"Subject \t: value\r\n"

    assert canonicalize_header(field, "relaxed") == b"subject:value\r\n"
    assert canonicalize_header(field, "simple") == field


def test_unparseable_headers_are_refused(key: SigningKey) -> None:
    signer = Signer(key)

    with pytest.raises(InvalidInput, match="not a header field"):
        signer.sign(b"From: a@example.net\r\nno colon here\r\n\r\nhi\r\n")
    with pytest.raises(InvalidInput, match="continuation"):
        signer.sign(b"\tFrom: a@example.net\r\n\r\nhi\r\n")
    with pytest.raises(InvalidInput, match="From"):
        signer.sign(b"\r\nFrom: a@example.net\r\n")  # all body, no header


def test_unknown_canonicalization_is_refused(key: SigningKey) -> None:
    with pytest.raises(InvalidInput, match="canonicalization"):
        Signer(key, body_canon="nofws")  # type: ignore[arg-type]


# Hashing once per post


TEMPLATE = (
    b"From: a@example.net\r\nTo: staff@lists.example.org\r\nSubject: s  \r\n"
    b"List-Unsubscribe: <mailto:leave@lists.example.org>\r\n\r\n"
    b"Dear all,  \r\n\r\n  the text\t\tof the post.\r\n\r\n"
    b"-- \r\nYou are subscribed as PLACEHOLDER.\r\nTo unsubscribe, write.  \r\n\r\n"
)
RECIPIENTS = ["ann@one.example", "bob.smith+lists@two.example", "x@y.example"]


def copies() -> list[bytes]:
    return [TEMPLATE.replace(b"PLACEHOLDER", r.encode()) for r in RECIPIENTS]


@pytest.mark.parametrize(("header_canon", "body_canon"), CANONS, ids=CANON_IDS)
def test_the_prefix_hash_signs_exactly_as_signing_the_whole_copy(
    key: SigningKey, header_canon: Canonicalization, body_canon: Canonicalization
) -> None:
    signer = Signer(key, header_canon=header_canon, body_canon=body_canon)
    template = signer.template(TEMPLATE, TEMPLATE.find(b"PLACEHOLDER"))
    assert template is not None
    assert template.shared == TEMPLATE.find(b"You are subscribed")  # the line's start

    for recipient, data in zip(RECIPIENTS, copies(), strict=True):
        fast = template.sign(data, timestamp=T)
        assert fast == signer.sign(data, timestamp=T)
        assert verifies(fast, key)
        assert not verifies(fast.replace(recipient.encode(), b"eve@evil.example"), key)


def test_a_copy_that_does_not_share_the_prefix_is_signed_in_full(key: SigningKey) -> None:
    signer = Signer(key)
    template = signer.template(TEMPLATE, TEMPLATE.find(b"PLACEHOLDER"))
    assert template is not None
    other = TEMPLATE.replace(b"Dear all", b"Dear some").replace(b"PLACEHOLDER", b"a@b.example")
    only_blank_rest = TEMPLATE[: template.shared] + b"\r\n \r\n"  # end rule reaches back

    for data in (other, only_blank_rest):
        assert template.sign(data, timestamp=T) == signer.sign(data, timestamp=T)
        assert verifies(template.sign(data), key)


def test_no_template_when_the_copies_differ_in_the_header(key: SigningKey) -> None:
    signer = Signer(key)

    assert signer.template(TEMPLATE, TEMPLATE.find(b"staff@")) is None
    assert signer.template(TEMPLATE.replace(b"\r\n", b"\n"), 200) is None


# Ed25519 (RFC 8463)


def ed25519_verifies(signed: bytes, public: ed25519.Ed25519PublicKey) -> bool:
    """dkimpy hashes, OpenSSL verifies: a check independent of PyNaCl."""
    checker = dkim.DKIM(signed)
    prep = checker.verify_headerprep()
    assert prep
    sig, include_headers, sigheaders = prep
    policy = CanonicalizationPolicy.from_c_value(sig[b"c"])
    body_hash = hashlib.sha256(policy.canonicalize_body(checker.body)).digest()
    if base64.b64encode(body_hash) != re.sub(rb"\s+", b"", sig[b"bh"]):
        return False
    hasher = hashlib.sha256()
    headers = policy.canonicalize_headers(checker.headers)
    dkim.hash_headers(hasher, policy, headers, include_headers, sigheaders[0], sig)
    try:
        public.verify(base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"])), hasher.digest())
    except Exception:
        return False
    return True


@pytest.mark.parametrize(("header_canon", "body_canon"), CANONS[:2], ids=CANON_IDS[:2])
def test_ed25519_signatures_verify(
    header_canon: Canonicalization, body_canon: Canonicalization
) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    signer = Signer(
        SigningKey(DOMAIN, "ed1", pem), header_canon=header_canon, body_canon=body_canon
    )
    public = private.public_key()

    for name in ("folded", "utf8-headers", "empty-body", "repeated-headers"):
        signed = signer.sign(CORPUS[name], timestamp=T)
        assert tags(signed)["a"] == "ed25519-sha256"
        assert ed25519_verifies(signed, public), name
        assert not ed25519_verifies(signed.replace(b"From: ", b"From: x"), public), name
    template = signer.template(TEMPLATE, TEMPLATE.find(b"PLACEHOLDER"))
    assert template is not None
    for data in copies():
        assert template.sign(data, timestamp=T) == signer.sign(data, timestamp=T)
        assert ed25519_verifies(template.sign(data), public)


def test_ed25519_key_files_and_their_dns_record(tmp_path: Path) -> None:
    key = generate_key(tmp_path, DOMAIN, "e1", algorithm="ed25519")
    record = key.public_txt()

    assert key.algorithm == "ed25519"
    assert record.startswith("v=DKIM1; k=ed25519; p=")
    raw = base64.b64decode(record.split("p=", 1)[1])
    assert len(raw) == 32  # RFC 8463 §4.2: the bare key, not a SubjectPublicKeyInfo
    assert raw == key.public_bytes()
    assert (tmp_path / DOMAIN / "active-ed25519").read_text() == "e1\n"  # the first key


def dual_keys(tmp_path: Path) -> tuple[SigningKey, SigningKey]:
    rsa_key = generate_key(tmp_path, DOMAIN, "r1", bits=1024)
    ed_key = generate_key(tmp_path, DOMAIN, "e1", algorithm="ed25519", activate=True)
    return rsa_key, ed_key


def dnsfunc_both(*keys: SigningKey) -> Callable[..., bytes | None]:
    records = {f"{k.selector}._domainkey.{k.domain}.".encode(): k.public_txt() for k in keys}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        found = records.get(name)
        return found.encode() if found else None

    return dnsfunc


def both_verify(signed: bytes, *keys: SigningKey) -> list[str]:
    """The a= of each signature that dkimpy (with PyNaCl for Ed25519) verifies, top first."""
    checker = dkim.DKIM(signed)
    dnsfunc = dnsfunc_both(*keys)
    count = len(mail.parse(signed).get_all("DKIM-Signature", []))
    passed = []
    for idx in range(count):
        try:
            ok = checker.verify(idx=idx, dnsfunc=dnsfunc)
        except dkim.DKIMException:
            ok = False
        if ok:
            passed.append(checker.signature_fields[b"a"].decode())
    return passed


@pytest.mark.parametrize(("header_canon", "body_canon"), CANONS, ids=CANON_IDS)
def test_rsa_and_ed25519_signatures_both_verify_with_dkimpy_shared(
    tmp_path: Path, header_canon: Canonicalization, body_canon: Canonicalization
) -> None:
    rsa_key, ed_key = dual_keys(tmp_path)
    signer = Signer(rsa_key, ed_key, header_canon=header_canon, body_canon=body_canon)

    for name in ("folded", "utf8-headers", "empty-body", "repeated-headers", "long-lines"):
        signed = on_the_wire(signer.sign(CORPUS[name], timestamp=T))
        assert both_verify(signed, rsa_key, ed_key) == ["rsa-sha256", "ed25519-sha256"], name
        tampered = signed.replace(b"From: ", b"From: x", 1)
        assert both_verify(tampered, rsa_key, ed_key) == [], name


@pytest.mark.parametrize(("header_canon", "body_canon"), CANONS, ids=CANON_IDS)
def test_rsa_and_ed25519_signatures_both_verify_with_dkimpy_personalized(
    tmp_path: Path, header_canon: Canonicalization, body_canon: Canonicalization
) -> None:
    rsa_key, ed_key = dual_keys(tmp_path)
    signer = Signer(rsa_key, ed_key, header_canon=header_canon, body_canon=body_canon)
    template = signer.template(TEMPLATE, TEMPLATE.find(b"PLACEHOLDER"))
    assert template is not None

    for recipient, data in zip(RECIPIENTS, copies(), strict=True):
        fast = template.sign(data, timestamp=T)
        assert fast == signer.sign(data, timestamp=T)
        assert both_verify(fast, rsa_key, ed_key) == ["rsa-sha256", "ed25519-sha256"]
        forged = fast.replace(recipient.encode(), b"eve@evil.example")
        assert both_verify(forged, rsa_key, ed_key) == []


def test_one_signature_still_verifies_when_the_other_key_is_unpublished(tmp_path: Path) -> None:
    """Receivers that know no Ed25519 (or whose look-up fails) still have the RSA one."""
    rsa_key, ed_key = dual_keys(tmp_path)
    signed = Signer(rsa_key, ed_key).sign(CORPUS["folded"], timestamp=T)

    assert both_verify(signed, rsa_key) == ["rsa-sha256"]
    assert both_verify(signed, ed_key) == ["ed25519-sha256"]
