"""Rendering: shared and personalized copies of a post."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from conftest import message

from listserv import mail
from listserv.distribute import decorate, prepare
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
