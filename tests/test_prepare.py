"""Rendering: shared and personalized copies of a post."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import dkim as dkimpy
import pytest
from conftest import message

from listserv import mail
from listserv.distribute import decorate, dkim, prepare
from listserv.models import DeliveryMode

VIEW = prepare.ListView(
    name="staff",
    domain="lists.example.org",
    list_id="staff.lists.example.org",
    description="Staff",
    subject_prefix="[staff]",
    footer="",
    delivery_mode=DeliveryMode.PERSONALIZED,
)

PLAIN = message(
    """
    From: boss@example.org
    To: staff@lists.example.org
    Subject: Hi
    MIME-Version: 1.0
    Content-Type: text/plain; charset=utf-8
    Content-Transfer-Encoding: 8bit

    Grüße an alle.
    """
)
ALTERNATIVE = message(
    """
    From: boss@example.org
    Subject: Hi
    MIME-Version: 1.0
    Content-Type: multipart/alternative; boundary="b"

    --b
    Content-Type: text/plain; charset=us-ascii

    Hello.
    --b
    Content-Type: text/html; charset=us-ascii

    <html><body><p>Hello.</p></body></html>
    --b--
    """
)
BASE64 = message(
    """
    From: boss@example.org
    Subject: Hi
    MIME-Version: 1.0
    Content-Type: text/plain; charset=utf-8
    Content-Transfer-Encoding: base64

    SGVsbG8sIHdvcmxkLgo=
    """
)
RECIPIENTS = [
    "ann@one.example",
    "bob.smith+lists@two.example",
    "c_d-e@five.example",
    "o'brien&co@two.example",  # needs escaping in HTML
    "zoë@three.example",  # not ASCII
    "a-very-long-local-part-that-does-not-fit-on-the-line@four.example",
]


def slow(template: bytes, recipient: str) -> bytes:
    msg = decorate.add_footer(
        copy.deepcopy(mail.parse(template)), prepare.footer_text(VIEW, recipient)
    )
    return mail.to_bytes(msg)


def texts(data: bytes) -> list[str]:
    msg = mail.parse(data)
    return [part.get_content() for part in msg.walk() if part.get_content_maintype() == "text"]


@pytest.mark.parametrize("raw", [PLAIN, ALTERNATIVE, BASE64], ids=["8bit", "alternative", "base64"])
def test_personalized_copies_read_exactly_like_full_renders(raw: bytes) -> None:
    template = prepare.render(raw, VIEW, None)
    copies = prepare.personalize(template, VIEW, RECIPIENTS, None)
    assert len(copies) == len(RECIPIENTS)
    fast = [r for r in RECIPIENTS if prepare.Personalizer(template, VIEW).fits_fast_path(r)]
    assert fast == RECIPIENTS[:3]  # the first three take the fast path, the others not
    for recipient, data in zip(RECIPIENTS, copies, strict=True):
        assert texts(data) == texts(slow(template, recipient))
        assert prepare.PLACEHOLDER not in data.decode("utf-8", "replace")
        assert any(f"You are subscribed as {recipient}." in t for t in texts(data))


def test_shared_render_has_footer_headers_and_no_placeholder() -> None:
    view = dataclasses.replace(VIEW, footer="Be kind.", delivery_mode=DeliveryMode.SHARED)
    data = prepare.render(PLAIN, view, None)
    msg = mail.parse(data)
    assert msg["Subject"] == "[staff] Hi"
    assert msg["List-Id"] == '"Staff" <staff.lists.example.org>'
    body = msg.get_body(("plain",))
    assert body is not None
    text = body.get_content()
    assert "Grüße an alle." in text
    assert "To unsubscribe, send an e-mail to staff-leave@lists.example.org" in text
    assert "Be kind." in text
    assert "You are subscribed as" not in text


# Signed personalized copies


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> dkim.SigningKey:
    return dkim.generate_key(tmp_path_factory.mktemp("keys"), VIEW.domain, "s1", bits=1024)


def verifier(key: dkim.SigningKey) -> Callable[[bytes], bool]:
    expected = f"{key.selector}._domainkey.{key.domain}.".encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return key.public_txt().encode() if name == expected else None

    return lambda data: bool(dkimpy.verify(data, dnsfunc=dnsfunc))


CANONS: list[dkim.Canonicalization] = ["relaxed", "simple"]


@pytest.mark.parametrize("canon", CANONS)
@pytest.mark.parametrize("raw", [PLAIN, ALTERNATIVE, BASE64], ids=["8bit", "alternative", "base64"])
def test_signed_personalized_copies_verify_on_both_paths(
    key: dkim.SigningKey, canon: dkim.Canonicalization, raw: bytes
) -> None:
    signer = dkim.Signer(key, header_canon=canon, body_canon=canon)
    template = prepare.render(raw, VIEW, None)
    personalizer = prepare.Personalizer(template, VIEW)
    verifies = verifier(key)

    signed = personalizer.render_all(RECIPIENTS, signer)

    for recipient, data in zip(RECIPIENTS, signed, strict=True):
        assert verifies(data), recipient
        unsigned = personalizer.render(recipient)
        assert data.endswith(unsigned)
        if personalizer.fits_fast_path(recipient):
            assert recipient.encode() in data
            assert not verifies(data.replace(recipient.encode(), b"eve@evil.example"))
        flipped = data[:-3] + bytes([data[-3] ^ 1]) + data[-2:]  # last byte of the body
        assert not verifies(flipped)
    assert [r for r in RECIPIENTS if personalizer.fits_fast_path(r)] == RECIPIENTS[:3]
    assert personalizer.signing_template(signer) is not None


@pytest.mark.parametrize("canon", CANONS)
def test_fast_path_signing_equals_signing_the_whole_copy(
    key: dkim.SigningKey, canon: dkim.Canonicalization
) -> None:
    signer = dkim.Signer(key, header_canon=canon, body_canon=canon)
    personalizer = prepare.Personalizer(prepare.render(ALTERNATIVE, VIEW, None), VIEW)
    template = personalizer.signing_template(signer)
    assert template is not None
    assert personalizer.signing_template(signer) is template  # once per post and signer

    for recipient in RECIPIENTS:
        data = personalizer.render(recipient)
        assert template.sign(data, timestamp=1_700_000_000) == signer.sign(
            data, timestamp=1_700_000_000
        )
    header_end = personalizer.render(RECIPIENTS[0]).find(b"\r\n\r\n")
    assert template.shared > header_end + len(b"\r\n\r\nHello.")  # body hashed once too


@pytest.mark.parametrize(
    "field",
    [
        b"From: Mallory <mallory@example.com>\r\n",
        b"Subject: [staff] reset your password\r\n",
        b"List-Unsubscribe: <https://evil.example.com/u>\r\n",
    ],
    ids=["from", "subject", "list-unsubscribe"],
)
def test_an_added_oversigned_header_breaks_a_personalized_copy(
    key: dkim.SigningKey, field: bytes
) -> None:
    personalizer = prepare.Personalizer(prepare.render(PLAIN, VIEW, None), VIEW)
    [data] = personalizer.render_all(["ann@one.example"], dkim.Signer(key))
    verifies = verifier(key)
    head, sep, body = data.partition(b"\r\n\r\n")
    assert verifies(data)

    assert not verifies(field + data)
    assert not verifies(head + b"\r\n" + field.rstrip() + sep + body)


def test_a_placeholder_in_the_header_falls_back_to_full_signing(key: dkim.SigningKey) -> None:
    """A poster who writes the placeholder into the Subject makes the headers differ per copy."""
    raw = PLAIN.replace(b"Subject: Hi", b"Subject: " + prepare.PLACEHOLDER.encode())
    personalizer = prepare.Personalizer(prepare.render(raw, VIEW, None), VIEW)
    signer = dkim.Signer(key)

    copies = personalizer.render_all(RECIPIENTS[:2], signer)

    assert personalizer.signing_template(signer) is None
    assert all(verifier(key)(data) for data in copies)


def test_merged_copies_sign_from_one_template_per_distinct_start(key: dkim.SigningKey) -> None:
    """An all-ASCII part turns UTF-8 for a non-ASCII name, so its copies start otherwise."""
    view = dataclasses.replace(VIEW, merge_fields=True)
    raw = ALTERNATIVE.replace(b"Hello.", b"Hello $name.")
    names = {"ann@one.example": "Ann", "zoe@one.example": "Zoë", "bob@two.example": "Bob"}
    personalizer = prepare.Personalizer(prepare.render(raw, view, None), view, names)
    signer = dkim.Signer(key)

    signed = personalizer.render_all(list(names), signer)

    assert all(verifier(key)(data) for data in signed)
    assert [texts(data)[0].split("\r\n")[0] for data in signed] == [
        "Hello Ann.",
        "Hello Zoë.",
        "Hello Bob.",
    ]
    assert personalizer._merge_signing is not None
    templates = personalizer._merge_signing[1]
    assert len(templates) == 2 and None not in templates.values()  # us-ascii, and utf-8
