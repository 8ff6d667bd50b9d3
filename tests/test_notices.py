"""Notices the server writes: composed, queued like a post, signed and delivered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from conftest import make_list, message
from sink import Sink
from test_e2e import wait_until

from listserv import lists, mail, notices
from listserv.db import Database
from listserv.distribute import dkim
from listserv.models import Audience, Post, PostState


async def test_a_queued_notice_is_signed_and_delivered_to_its_recipients_only(
    db: Database, sink: Sink, daemon_factory: Any, tmp_path: Path
) -> None:
    key = dkim.generate_key(tmp_path / "dkim", "lists.example.org", "test", bits=1024)
    address = make_list(db, members_=["ann@one.example"])
    original = message(
        """
        From: stranger@elsewhere.example
        Subject: Hello

        Let me in.
        """
    )
    with db.session() as s:
        mlist = lists.get(s, address)
        msg = notices.compose(
            mlist,
            to="mod@example.org",
            subject="A post to staff waits for you",
            body="Reply approve.\n",
            reply_to="staff-confirm+abc@lists.example.org",
            attach=original,
        )
        post_id = notices.queue(s, mlist, msg, ["mod@example.org", "owner@example.org"])
    assert post_id is not None
    await daemon_factory()
    await sink.wait_for_recipients(2)

    def sent() -> bool:
        with db.reading() as s:
            post = s.get(Post, post_id)
            return post is not None and post.state is PostState.SENT

    await wait_until(sent)
    assert sorted(sink.recipients()) == ["mod@example.org", "owner@example.org"]
    [received] = sink.received
    assert dkimpy.verify(
        received.data,
        dnsfunc=lambda name, timeout=5: key.public_txt().encode(),
    )
    got = received.message()
    assert got["From"] == "staff-owner@lists.example.org"
    assert got["Auto-Submitted"] == "auto-generated"
    assert got["Reply-To"] == "staff-confirm+abc@lists.example.org"
    assert "List-Id" not in got and "[staff]" not in got["Subject"]  # not decorated
    [attached] = [p for p in got.iter_attachments() if p.get_content_type() == "message/rfc822"]
    assert "Let me in." in attached.as_string()
    with db.reading() as s:
        post = s.get(Post, post_id)
        assert post is not None and post.audience is Audience.NOTICE


def _msg(headers: str) -> Any:
    return mail.parse(message(headers + "\n\nbody\n"))


@pytest.mark.parametrize(
    ("mail_from", "headers", "allowed"),
    [
        ("a@example.org", "From: a@example.org", True),
        ("", "From: a@example.org", False),
        ("<>", "From: a@example.org", False),
        ("a@example.org", "From: a@example.org\nAuto-Submitted: auto-replied", False),
        ("a@example.org", "From: a@example.org\nAuto-Submitted: no", True),
        ("a@example.org", "From: a@example.org\nPrecedence: bulk", False),
        ("a@example.org", "From: a@example.org\nPrecedence: junk", False),
        ("a@example.org", "From: a@example.org\nList-Id: <x.example.org>", False),
    ],
)
def test_may_answer_follows_rfc_3834(mail_from: str, headers: str, allowed: bool) -> None:
    assert notices.may_answer(mail_from, _msg(headers)) is allowed
