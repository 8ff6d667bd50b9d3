"""Large posts (issue 15): parsed, decorated and serialized without a string per line,
with exactly what the email package's own parser and generator make of them."""

from __future__ import annotations

import dataclasses
import itertools
import tracemalloc
from collections.abc import Callable
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from typing import Any

import aiosmtplib
import pytest
import sqlalchemy as sa
import test_prepare
from conftest import make_list
from sink import Sink

from listserv import mail
from listserv.db import Database
from listserv.distribute import decorate, prepare
from listserv.models import DeliveryMode, InboundMessage

HEADS = [
    b"From: a@example.org\r\nSubject: plain\r\n",
    b"From: a@example.org\nTo: b@example.org\n",  # LF only
    b"From a@example.org Mon Nov 23 10:00:00 2026\nFrom: a@example.org\n",  # mbox From_
    b"Subject: folded\r\n\tover two lines\r\n",
    b"",
    b"not a header line\r\nFrom: a@example.org\r\n",
    b"From: a@example.org\r\nnot a header line\r\n",
    b"Content-Type: multipart/mixed; boundary=XX\r\n",
    b"Content-Type: multipart/mixed\r\n",  # no boundary
    b"Content-Type: message/rfc822\r\n",
    b"Content-Type: message/delivery-status\r\n",
    b"Content-Type: text/plain; charset=utf-8\r\nSubject: \xc3\xa9t\xc3\xa9\r\n",
    b"Content-Type: ;;;\r\n",
    b"From: a@example.org\r\r\nX-Bare-CR: y\r\n",
    b"From: a@example.org\rX-Bare-CR: y\r",
    b"Cc: example@gmail.com,\r\n",  # the header parser's IndexError (STYLE.md)
]
SEPARATORS = [b"\r\n", b"\n", b"\r", b"", b"\n\r\n"]
BODIES = [
    b"hello\r\n",
    b"",
    b"line 1\nline 2\r\nline 3\rline 4",
    b"\xff\xfe not UTF-8\r\n",
    b"--XX\r\nContent-Type: text/plain\r\n\r\npart\r\n--XX--\r\n",
    b"From: inner@example.org\r\n\r\ninner body\r\n",
    b"Reporting-MTA: dns; mx.example\r\n\r\nFinal-Recipient: rfc822; a@b\r\nAction: failed\r\n",
    b"\r\n\r\nbegins with blank lines",
    b"X-Looks: like a header\r\n\r\nmore",
]
MESSAGES = [h + s + b for h, s, b in itertools.product(HEADS, SEPARATORS, BODIES)]


def shape(msg: Message) -> Any:
    """Everything a parse produced: fields, defects, and the payload or the parts."""
    fields = (list(msg.raw_items()), [type(d).__name__ for d in msg.defects], msg.get_unixfrom())
    if msg.is_multipart():
        return (*fields, msg.preamble, msg.epilogue, [shape(p) for p in msg.get_payload()])
    return (*fields, msg.get_payload())


def outcome(parse: Callable[[bytes], Message], raw: bytes) -> Any:
    try:
        return shape(parse(raw))
    except Exception as exc:
        return type(exc)


def test_parse_makes_what_the_email_parser_makes_of_every_message() -> None:
    stock = BytesParser(policy=mail.POLICY).parsebytes
    differ = [raw for raw in MESSAGES if outcome(mail.parse, raw) != outcome(stock, raw)]
    assert differ == []


def test_parse_headers_has_the_parser_s_header_section_and_no_body() -> None:
    stock = BytesHeaderParser(policy=mail.POLICY).parsebytes
    for raw in MESSAGES:
        ours, theirs = mail.parse_headers(raw), stock(raw)
        assert list(ours.raw_items()) == list(theirs.raw_items()), raw
        assert [type(d) for d in ours.defects] == [type(d) for d in theirs.defects], raw
        assert ours.get_payload() == "", raw


def test_to_bytes_writes_what_the_email_generator_writes() -> None:
    for raw in MESSAGES:
        try:
            msg = BytesParser(policy=mail.POLICY).parsebytes(raw)
            expected = msg.as_bytes(
                policy=mail.POLICY_UTF8 if mail.needs_utf8(msg) else mail.POLICY
            )
        except Exception:
            continue  # the header parser's errors: not ours to serialize
        assert mail.to_bytes(msg) == expected, raw


@pytest.mark.parametrize(
    "content",
    ["", "\n", "one line", "a\r\nb\rc\n", "ends\n\n", "x" * 78, "x" * 79, "y\n" + "x" * 79],
)
@pytest.mark.parametrize("subtype", ["plain", "html"])
def test_a_footer_part_is_what_set_content_makes(content: str, subtype: str) -> None:
    expected = EmailMessage(policy=mail.POLICY)
    expected.set_content(content, subtype=subtype, charset="us-ascii", params={"format": "flowed"})
    del expected["MIME-Version"]
    part = decorate._text_part(content, subtype, {"format": "flowed"})
    assert list(part.raw_items()) == list(expected.raw_items())
    assert part.as_bytes() == expected.as_bytes()


def large_post(size: int) -> bytes:
    head = (
        b"From: Boss <boss@example.org>\r\nTo: staff@lists.example.org\r\nSubject: Report\r\n"
        b"Message-ID: <large@example.org>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    line = b"The annual report, every figure of it, line after line.".ljust(76) + b"\r\n"
    return head + line * (size // len(line))


def peak(work: Callable[[], object]) -> int:
    """Bytes allocated at most while `work` ran, beyond what was allocated before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = work()
        top = tracemalloc.get_traced_memory()[1]
        del result
    finally:
        tracemalloc.stop()
    return top - before


VIEW = dataclasses.replace(test_prepare.VIEW, delivery_mode=DeliveryMode.SHARED)


def test_a_large_post_is_parsed_without_a_string_per_line() -> None:
    raw = large_post(4_000_000)
    # the body once (decoded); cut into 52,000 line strings it was 7.7 times the post
    assert peak(lambda: mail.parse(raw)) < 1.2 * len(raw)
    assert peak(lambda: mail.parse_headers(raw)) < 100_000


def test_a_large_post_is_rendered_whole_and_without_a_string_per_line() -> None:
    raw = large_post(4_000_000)
    assert peak(lambda: prepare.render(raw, VIEW, None)) < 5 * len(raw)  # was 7.7 times
    rendered = prepare.render(raw, VIEW, None)
    body = raw[raw.index(b"\r\n\r\n") + 4 :]
    head, _, out = rendered.partition(b"\r\n\r\n")
    assert b"Subject: [staff] Report" in head
    assert out.startswith(body)
    assert out[len(body) :].startswith(b"-- \r\nStaff mailing list\r\n")


def test_a_large_personalized_template_renders_each_copy_with_its_address() -> None:
    view = dataclasses.replace(VIEW, delivery_mode=DeliveryMode.PERSONALIZED)
    raw = large_post(2_000_000)
    personalizer = prepare.Personalizer(prepare.render(raw, view, None), view)
    assert personalizer.fits_fast_path("ann@one.example")
    copy = personalizer.render("ann@one.example")
    body = raw[raw.index(b"\r\n\r\n") + 4 :]
    assert body + b"-- \r\nStaff mailing list\r\nYou are subscribed as ann@one.example.\r\n" in copy


async def test_a_10_mb_post_is_stored_and_delivered_byte_for_byte(
    db: Database, sink: Sink, daemon_factory: Any
) -> None:
    members_ = ["ann@one.example", "bob@two.example"]
    make_list(db, members_=members_, senders=["boss@example.org"], subject_prefix="[staff]")
    daemon = await daemon_factory()
    raw = large_post(10_000_000)
    errors, reply = await aiosmtplib.send(
        raw,
        sender="boss@example.org",
        recipients=["staff@lists.example.org"],
        hostname="127.0.0.1",
        port=daemon.port,
        timeout=60,
    )
    assert errors == {} and reply.startswith("2.0.0 Queued as ")
    with db.reading() as session:
        stored = session.scalars(sa.select(InboundMessage.raw)).one()
    assert stored.startswith(b"Authentication-Results: lists.example.org;")  # ours, on top
    assert stored.endswith(raw)

    await sink.wait_for_recipients(len(members_), timeout=60)
    body = raw[raw.index(b"\r\n\r\n") + 4 :]
    footer = b"-- \r\nstaff@lists.example.org mailing list\r\n"
    for received in sink.received:
        head, _, delivered = received.data.partition(b"\r\n\r\n")
        assert b"\r\nSubject: [staff] Report\r\n" in head
        assert delivered[: len(body)] == body
        assert delivered[len(body) :].startswith(footer)
