"""Decoration is checked on the bytes we would send, re-parsed as a recipient would."""

from __future__ import annotations

import base64
import re
import textwrap
from email.message import EmailMessage, MIMEPart

import pytest

from listserv.distribute.decorate import (
    ListHeaders,
    add_footer,
    add_list_headers,
    add_subject_prefix,
    strip_signatures,
)
from listserv.errors import InvalidInput
from listserv.mail import parse, to_bytes

STAFF = ListHeaders(
    list_id="staff.lists.example.edu",
    description="Staff list",
    post="staff@lists.example.edu",
    help="staff-request@lists.example.edu",
    unsubscribe_mailto="staff-leave@lists.example.edu",
    unsubscribe_url="https://lists.example.edu/u/3f2a9c",
    owner="staff-owner@lists.example.edu",
)
FOOTER = "To leave: mail staff-leave@lists.example.edu"
PDF = bytes(range(256)) * 4


def raw(text: str) -> bytes:
    return textwrap.dedent(text).lstrip("\n").replace("\n", "\r\n").encode("utf-8")


def message(text: str) -> EmailMessage:
    return parse(raw(text))


def sent(msg: EmailMessage) -> EmailMessage:
    """What a recipient parses from the bytes we send."""
    return parse(to_bytes(msg))


def text_of(part: MIMEPart) -> str:
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


PLAIN = """
    From: Ann <ann@example.org>
    To: staff@lists.example.edu
    Subject: Lunch
    Message-ID: <orig.1@example.org>
    Date: Tue, 02 Jan 2024 10:00:00 +0000
    MIME-Version: 1.0
    Content-Type: text/plain; charset=us-ascii

    Lunch at noon.
"""


def test_list_headers_are_present_once_with_exact_values() -> None:
    msg = message(PLAIN)
    add_list_headers(msg, STAFF)
    out = sent(msg)
    expected = {
        "List-Id": '"Staff list" <staff.lists.example.edu>',
        "List-Post": "<mailto:staff@lists.example.edu>",
        "List-Help": "<mailto:staff-request@lists.example.edu?subject=help>",
        "List-Unsubscribe": (
            "<https://lists.example.edu/u/3f2a9c>, "
            "<mailto:staff-leave@lists.example.edu?subject=unsubscribe>"
        ),
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "List-Owner": "<mailto:staff-owner@lists.example.edu>",
        "Precedence": "list",
    }
    for name, value in expected.items():
        assert out.get_all(name) == [value], name


def test_list_header_uris_are_emitted_verbatim_not_encoded() -> None:
    long_url = "https://lists.example.edu/unsubscribe/" + "a1b2c3d4" * 10
    headers = ListHeaders(
        "staff.lists.example.edu", "", "staff@lists.example.edu", "staff-request@x.edu",
        "staff-leave@lists.example.edu", long_url, "staff-owner@lists.example.edu",
    )  # fmt: skip
    msg = message(PLAIN)
    add_list_headers(msg, headers)
    data = to_bytes(msg)
    assert b"List-Post: <mailto:staff@lists.example.edu>\r\n" in data
    assert b"List-Id: <staff.lists.example.edu>\r\n" in data
    assert f"\r\nList-Unsubscribe: <{long_url}>,\r\n <mailto:".encode() in data
    assert b"=?" not in data
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


def test_existing_list_headers_are_replaced_and_x_loop_dropped() -> None:
    msg = message(
        """
        From: ann@example.org
        List-Id: Other <other.example.com>
        List-Post: <mailto:other@example.com>
        List-Archive: <https://example.com/archive>
        List-Subscribe: <mailto:other-join@example.com>
        Precedence: bulk
        X-Loop: other@example.com
        Subject: x

        body
        """
    )
    add_list_headers(msg, STAFF)
    out = sent(msg)
    assert out.get_all("List-Id") == ['"Staff list" <staff.lists.example.edu>']
    assert out.get_all("List-Post") == ["<mailto:staff@lists.example.edu>"]
    assert out.get_all("Precedence") == ["list"]
    assert "List-Archive" not in out
    assert "List-Subscribe" not in out
    assert "X-Loop" not in out


def test_without_url_unsubscribe_is_mailto_only_and_no_one_click() -> None:
    msg = message(PLAIN)
    add_list_headers(
        msg,
        ListHeaders(
            "staff.lists.example.edu", "", "staff@lists.example.edu", "staff-request@x.edu",
            "staff-leave@lists.example.edu", None, "staff-owner@lists.example.edu",
        ),
    )  # fmt: skip
    out = sent(msg)
    assert out.get_all("List-Unsubscribe") == [
        "<mailto:staff-leave@lists.example.edu?subject=unsubscribe>"
    ]
    assert "List-Unsubscribe-Post" not in out
    assert out.get_all("List-Id") == ["<staff.lists.example.edu>"]


def test_list_id_phrase_with_quotes_is_escaped() -> None:
    headers = ListHeaders(
        "staff.lists.example.edu", 'The "real" staff', "staff@lists.example.edu",
        "staff-request@x.edu", "staff-leave@x.edu", None, "staff-owner@x.edu",
    )  # fmt: skip
    msg = message(PLAIN)
    add_list_headers(msg, headers)
    assert b'List-Id: "The \\"real\\" staff" <staff.lists.example.edu>\r\n' in to_bytes(msg)


def test_list_id_non_ascii_phrase_is_rfc2047_encoded() -> None:
    headers = ListHeaders(
        "cafe.lists.example.edu", "Le café", "cafe@lists.example.edu",
        "cafe-request@x.edu", "cafe-leave@x.edu", None, "cafe-owner@x.edu",
    )  # fmt: skip
    msg = message(PLAIN)
    add_list_headers(msg, headers)
    data = to_bytes(msg)
    assert data.isascii()
    assert sent(msg).get_all("List-Id") == ["Le café <cafe.lists.example.edu>"]


def test_message_id_and_date_are_added_only_when_missing() -> None:
    msg = message(
        """
        From: ann@example.org
        Subject: x

        body
        """
    )
    add_list_headers(msg, STAFF)
    out = sent(msg)
    (msgid,) = out.get_all("Message-ID") or []
    assert msgid.startswith("<") and msgid.endswith("@lists.example.edu>")
    assert len(out.get_all("Date") or []) == 1
    assert re.search(rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT\r\n", to_bytes(msg))

    kept = message(PLAIN)
    add_list_headers(kept, STAFF)
    out = sent(kept)
    assert out.get_all("Message-ID") == ["<orig.1@example.org>"]
    assert out.get_all("Date") == ["Tue, 02 Jan 2024 10:00:00 +0000"]


def test_list_headers_reject_header_injection() -> None:
    with pytest.raises(InvalidInput):
        ListHeaders(
            "staff.lists.example.edu", "Staff\r\nBcc: all@example.org", "staff@x.edu",
            "h@x.edu", "u@x.edu", None, "o@x.edu",
        )  # fmt: skip


def test_subject_prefix_is_added_once() -> None:
    msg = message(PLAIN)
    add_subject_prefix(msg, "[staff]")
    add_subject_prefix(msg, "[staff]")
    assert sent(msg).get_all("Subject") == ["[staff] Lunch"]


def test_subject_prefix_is_not_doubled_in_a_reply() -> None:
    msg = message(
        """
        From: bob@example.org
        Subject: Re: [staff] x

        body
        """
    )
    add_subject_prefix(msg, "[staff]")
    assert sent(msg).get_all("Subject") == ["Re: [staff] x"]


def test_subject_prefix_with_encoded_subject_stays_encoded() -> None:
    msg = message(
        """
        From: bob@example.org
        Subject: =?utf-8?q?caf=C3=A9?=

        body
        """
    )
    add_subject_prefix(msg, "[staff]")
    data = to_bytes(msg)
    assert data.isascii()
    assert b"Subject: [staff] =?utf-8?q?caf=C3=A9?=\r\n" in data
    assert sent(msg).get_all("Subject") == ["[staff] café"]


def test_missing_subject_becomes_the_prefix() -> None:
    msg = message(
        """
        From: bob@example.org

        body
        """
    )
    add_subject_prefix(msg, "[staff]")
    assert sent(msg).get_all("Subject") == ["[staff]"]


def test_malformed_subject_does_not_raise() -> None:
    msg = parse(b"From: a@b.c\r\nSubject: =?utf-8?q?caf\xff=?= \xc3\xa9t\xe9\r\n\r\nbody\r\n")
    add_subject_prefix(msg, "[staff]")
    (subject,) = sent(msg).get_all("Subject") or []
    assert subject.startswith("[staff] ")


def test_strip_signatures_drops_dkim_and_keeps_arc() -> None:
    msg = message(
        """
        DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=a; b=abc
        DKIM-Signature: v=1; a=ed25519-sha256; d=example.org; s=b; b=def
        ARC-Seal: i=1; a=rsa-sha256; cv=none; d=relay.example; s=a; b=xyz
        From: ann@example.org
        Subject: x

        body
        """
    )
    strip_signatures(msg)
    out = sent(msg)
    assert "DKIM-Signature" not in out
    assert out.get_all("ARC-Seal") == ["i=1; a=rsa-sha256; cv=none; d=relay.example; s=a; b=xyz"]


def test_plain_footer_is_appended_and_ascii_stays_7bit() -> None:
    msg = message(PLAIN)
    result = add_footer(msg, FOOTER)
    assert result is msg
    out = sent(result)
    assert text_of(out) == f"Lunch at noon.\n-- \n{FOOTER}\n"
    assert out.get_content_charset() == "us-ascii"
    assert out["Content-Transfer-Encoding"] == "7bit"
    assert out.get_all("From") == ["Ann <ann@example.org>"]


def test_8bit_utf8_body_keeps_its_text_and_goes_quoted_printable() -> None:
    msg = message(
        """
        From: ann@example.org
        Subject: x
        MIME-Version: 1.0
        Content-Type: text/plain; charset=utf-8; format=flowed
        Content-Disposition: inline
        Content-Transfer-Encoding: 8bit

        Déjà vu — naïve café.
        """
    )
    out = sent(add_footer(msg, "Quitter : écrivez-nous"))
    assert text_of(out) == "Déjà vu — naïve café.\n-- \nQuitter : écrivez-nous\n"
    assert out["Content-Transfer-Encoding"] == "quoted-printable"
    assert out.get_content_charset() == "utf-8"
    assert out.get_param("format") == "flowed"
    assert out.get_all("Content-Disposition") == ["inline"]
    assert to_bytes(out).isascii()


def test_html_footer_goes_before_the_last_body_close_tag() -> None:
    msg = message(
        """
        From: ann@example.org
        Subject: x
        MIME-Version: 1.0
        Content-Type: text/html; charset=utf-8

        <html><body><p>Hi</p></BODY></html>
        """
    )
    out = sent(add_footer(msg, "Leave: <here>", html='<p class="footer">Leave</p>'))
    assert text_of(out) == '<html><body><p>Hi</p><p class="footer">Leave</p>\n</BODY></html>\n'


def test_html_without_body_tag_gets_escaped_text_footer_at_the_end() -> None:
    msg = message(
        """
        From: ann@example.org
        Subject: x
        Content-Type: text/html

        <p>Hi</p>
        """
    )
    out = sent(add_footer(msg, "Leave: <here> & now"))
    assert text_of(out) == "<p>Hi</p>\n<pre>Leave: &lt;here&gt; &amp; now</pre>\n"


ALTERNATIVE = """
    From: ann@example.org
    Subject: x
    MIME-Version: 1.0
    Content-Type: multipart/alternative; boundary="alt"

    --alt
    Content-Type: text/plain; charset=utf-8
    Content-Transfer-Encoding: quoted-printable

    Caf=C3=A9 at noon.
    --alt
    Content-Type: text/html; charset=utf-8
    Content-Transfer-Encoding: base64

    PGh0bWw+PGJvZHk+Q2Fmw6kgYXQgbm9vbi48L2JvZHk+PC9odG1sPg==
    --alt--
"""


def test_alternative_gets_footer_in_both_text_and_html() -> None:
    result = add_footer(message(ALTERNATIVE), FOOTER, html="<p>footer</p>")
    out = sent(result)
    plain, rich = out.iter_parts()
    assert text_of(plain) == f"Café at noon.\n-- \n{FOOTER}\n"
    assert text_of(rich) == "<html><body>Café at noon.<p>footer</p>\n</body></html>\n"
    assert len(list(out.iter_parts())) == 2


MIXED = f"""
    From: ann@example.org
    Subject: report
    MIME-Version: 1.0
    Content-Type: multipart/mixed; boundary="mix"

    --mix
    Content-Type: text/plain; charset=us-ascii

    See attached.
    --mix
    Content-Type: application/pdf; name="r.pdf"
    Content-Disposition: attachment; filename="r.pdf"
    Content-Transfer-Encoding: base64

    {base64.encodebytes(PDF).decode().replace(chr(10), chr(10) + "    ")}
    --mix--
"""


def test_mixed_decorates_first_part_and_leaves_attachment_byte_identical() -> None:
    msg = message(MIXED)
    before = list(msg.iter_parts())[1]
    before_raw = before.get_payload()
    result = add_footer(msg, FOOTER)
    assert result is msg
    body, attachment = sent(result).iter_parts()
    assert text_of(body) == f"See attached.\n-- \n{FOOTER}\n"
    assert attachment.get_payload(decode=True) == PDF
    assert attachment.get_payload() == before_raw


def test_mixed_with_alternative_first_decorates_both_alternatives() -> None:
    msg = message(
        """
        From: ann@example.org
        Subject: x
        MIME-Version: 1.0
        Content-Type: multipart/mixed; boundary="mix"

        --mix
        Content-Type: multipart/alternative; boundary="alt"

        --alt
        Content-Type: text/plain; charset=us-ascii

        Hello.
        --alt
        Content-Type: text/html; charset=us-ascii

        <html><body>Hello.</body></html>
        --alt--
        --mix
        Content-Type: text/plain; name="notes.txt"
        Content-Disposition: attachment; filename="notes.txt"

        attached notes
        --mix--
        """
    )
    out = sent(add_footer(msg, FOOTER))
    alternative, notes = out.iter_parts()
    plain, rich = alternative.iter_parts()
    assert text_of(plain) == f"Hello.\n-- \n{FOOTER}\n"
    assert text_of(rich) == f"<html><body>Hello.<pre>{FOOTER}</pre>\n</body></html>\n"
    assert text_of(notes) == "attached notes"  # the CRLF before a boundary is the boundary's


def test_mixed_with_only_an_attachment_gets_a_footer_part_appended() -> None:
    msg = message(
        """
        From: ann@example.org
        Subject: x
        MIME-Version: 1.0
        Content-Type: multipart/mixed; boundary="mix"

        --mix
        Content-Type: image/png
        Content-Disposition: attachment; filename="a.png"
        Content-Transfer-Encoding: base64

        iVBORw0KGgo=
        --mix--
        """
    )
    out = sent(add_footer(msg, FOOTER))
    image, footer = out.iter_parts()
    assert image.get_payload(decode=True) == b"\x89PNG\r\n\x1a\n"
    assert footer.get_content_type() == "text/plain"
    assert text_of(footer) == f"{FOOTER}\n"


SIGNED = raw(
    """
    From: ann@example.org
    To: staff@lists.example.edu
    Subject: signed
    MIME-Version: 1.0
    Content-Type: multipart/signed; boundary="sig"; micalg=pgp-sha256;
     protocol="application/pgp-signature"

    This is an OpenPGP/MIME signed message.
    --sig
    Content-Type: text/plain; charset=us-ascii
    Content-Transfer-Encoding: 7bit

    Signed text  with  odd   spacing.\t
    --sig
    Content-Type: application/pgp-signature; name="signature.asc"

    -----BEGIN PGP SIGNATURE-----
    iHUEARYIAB0WIQ
    -----END PGP SIGNATURE-----
    --sig--
    """
)


def test_signed_message_is_wrapped_and_the_signed_part_is_byte_identical() -> None:
    msg = parse(SIGNED)
    result = add_footer(msg, FOOTER)
    assert result is not msg
    data = to_bytes(result)
    signed_entity = SIGNED[SIGNED.index(b"Content-Type: multipart/signed") :]
    signed_part = SIGNED[SIGNED.index(b"--sig\r\n") + 7 : SIGNED.index(b"\r\n--sig\r\n", 300)]
    assert signed_part.startswith(b"Content-Type: text/plain")
    assert signed_part in data
    assert signed_entity.rstrip(b"\r\n") in data
    out = parse(data)
    assert out.get_content_type() == "multipart/mixed"
    assert out.get_all("Subject") == ["signed"]
    assert out.get_all("From") == ["ann@example.org"]
    wrapped, footer = out.iter_parts()
    assert wrapped.get_content_type() == "multipart/signed"
    assert "Subject" not in wrapped
    assert text_of(footer) == f"{FOOTER}\n"
    assert to_bytes(msg) == SIGNED  # the caller's message is not modified


def test_unknown_charset_falls_back_to_wrapper() -> None:
    msg = message(
        """
        From: ann@example.org
        Subject: x
        Content-Type: text/plain; charset=x-no-such-charset
        Content-Transfer-Encoding: 8bit

        caf\xe9
        """
    )
    original = to_bytes(msg)
    result = add_footer(msg, FOOTER)
    assert result is not msg
    assert to_bytes(msg) == original
    wrapped, footer = sent(result).iter_parts()
    assert wrapped.get_content_charset() == "x-no-such-charset"
    assert wrapped.get_payload(decode=True) == "café\r\n".encode()
    assert text_of(footer) == f"{FOOTER}\n"


def test_undecodable_bytes_fall_back_to_wrapper_with_bytes_intact() -> None:
    body = b"caf\xe9 au lait\r\n"  # Latin-1 bytes labelled UTF-8
    msg = parse(
        b"From: a@example.org\r\nSubject: x\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body
    )
    result = add_footer(msg, FOOTER)
    assert result is not msg
    wrapped, _ = parse(to_bytes(result)).iter_parts()
    assert wrapped.get_payload(decode=True) == body


@pytest.mark.parametrize(
    "content_headers",
    [
        'Content-Type: text/plain\r\nContent-Disposition: attachment; filename="a.txt"',
        "Content-Type: image/gif",
        "Content-Type: application/octet-stream",
    ],
)
def test_attachment_only_messages_are_wrapped_not_rewritten(content_headers: str) -> None:
    msg = parse(
        b"From: ann@example.org\r\nSubject: x\r\n"
        + content_headers.encode()
        + b"\r\nContent-Transfer-Encoding: base64\r\n\r\nR0lGODlhAQABAAAAACw=\r\n"
    )
    out = sent(add_footer(msg, FOOTER))
    wrapped, footer = out.iter_parts()
    assert wrapped.get_payload(decode=True) == base64.b64decode("R0lGODlhAQABAAAAACw=")
    assert text_of(footer) == f"{FOOTER}\n"


def test_malformed_address_headers_do_not_raise() -> None:
    msg = message(
        """
        From: "Unterminated <ann@example.org
        To: staff@lists.example.edu
        Cc: a@b.c,
        Message-ID: <[1.2.3.4]@exchange>
        Subject: Re: [staff] odd
        Content-Type: text/plain

        body
        """
    )
    strip_signatures(msg)
    add_list_headers(msg, STAFF)
    add_subject_prefix(msg, "[staff]")
    out = sent(add_footer(msg, FOOTER))
    assert text_of(out) == f"body\n-- \n{FOOTER}\n"
    assert b"Cc: a@b.c,\r\n" in to_bytes(out)
    assert out.get_all("Subject") == ["Re: [staff] odd"]
    assert b"Message-ID: <[1.2.3.4]@exchange>\r\n" in to_bytes(out)
