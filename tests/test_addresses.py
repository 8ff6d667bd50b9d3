"""`addresses`: the one validator (email-validator underneath), list keys, own addresses."""

from __future__ import annotations

import pytest

from listserv import addresses
from listserv.addresses import Kind, ListAddress
from listserv.errors import InvalidAddress

LOCAL_64 = "l" * 64
#: 64 + 1 + 189 = 254 octets, the most RFC 5321 allows (labels of at most 63).
DOMAIN_189 = ".".join(["d" * 63, "e" * 63, "f" * 53, "example"])
DOMAIN_190 = ".".join(["d" * 63, "e" * 63, "f" * 54, "example"])


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("user@bücher.example", "user@xn--bcher-kva.example"),
        ("user@xn--bcher-kva.example", "user@xn--bcher-kva.example"),
        ("user@Bücher.EXAMPLE", "user@xn--bcher-kva.example"),
        ("user@XN--BCHER-KVA.example", "user@xn--bcher-kva.example"),
        ("<Ann.Lee@Example.ORG>", "Ann.Lee@example.org"),
        ("  Postmaster@Example.org. ", "Postmaster@example.org"),
        ("o'brien&co+tag@two.example", "o'brien&co+tag@two.example"),
        ("zoë@three.example", "zoë@three.example"),
        ("zoe\u0308@three.example", "zoë@three.example"),  # NFC, RFC 6532 §3.1
        (f"{LOCAL_64}@{DOMAIN_189}", f"{LOCAL_64}@{DOMAIN_189}"),
    ],
)
def test_domain_is_stored_as_a_lower_case_a_label_and_the_local_part_as_given(
    given: str, stored: str
) -> None:
    assert addresses.normalize(given) == stored
    assert addresses.normalize(stored) == stored


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("a..b@example.org", "two periods in a row"),
        (".a@example.org", "cannot start with a period"),
        (f"{LOCAL_64}x@example.org", "too long before the @-sign"),
        ("é" * 33 + "@example.org", "longer than 64 octets"),  # 33 characters, 66 octets
        (f"{LOCAL_64}@{DOMAIN_190}", "too long (1 character too many)"),
        ("Ann <ann@example.org>", "display name"),
        ('"ann"@example.org', "quoting"),
        ("ann@[192.0.2.1]", "bracketed IP address"),
        ("ann@localhost", "should have a period"),
        ("ann@bad_domain.example", "invalid characters"),
        ("ann@xn--zz.example", "IDNA"),
        ("ann@", "something after the @-sign"),
        ("@example.org", "something before the @-sign"),
        ("not an address", "must have an @-sign"),
        ("", "must have an @-sign"),
        ("ann@example.org\r\nBcc: evil@example.org", "invalid characters"),
        ("a\x00b@example.org", "invalid characters"),
    ],
)
def test_bad_addresses_are_refused_with_a_one_line_reason(given: str, reason: str) -> None:
    with pytest.raises(InvalidAddress) as info:
        addresses.normalize(given)
    text = str(info.value)
    assert reason in text
    assert text.startswith("invalid address '")
    assert "\n" not in text and "\r" not in text
    assert len(text) < 300  # a megabyte of garbage is not echoed back whole


CORPUS = [
    "ann@example.org",
    "Ann.Lee+tag@Sub.Example.ORG",
    "user@xn--bcher-kva.example",
    "x@xn--zz.example",
    "postmaster@example.org",
    "a..b@example.org",
    "a.@example.org",
    f"{LOCAL_64}@example.org",
    f"{LOCAL_64}x@example.org",
    f"{LOCAL_64}@{DOMAIN_189}",
    f"{LOCAL_64}@{DOMAIN_190}",
    "x@localhost",
    "x@foo.test",
    "x@example.123",
    "x@-a.example",
    "a!#$%&'*+/=?^_`{|}~-@example.org",
]


@pytest.mark.parametrize("address", CORPUS)
def test_the_ascii_fast_path_answers_exactly_as_email_validator(address: str) -> None:
    """The fast path may only ever give the answer the full validation gives."""
    fast = addresses._fast(address)
    try:
        full: str | None = addresses._validated(address, address)
    except InvalidAddress:
        full = None
    assert fast is None or fast == full
    if full is not None and address.isascii():
        assert fast == full  # it does take the common case


@pytest.mark.parametrize(
    "address",
    [
        "staff@lists.example.org",
        "STAFF@LISTS.EXAMPLE.ORG",
        "staff-request@lists.example.org",
        "Staff-Bounces+abc123@Lists.Example.org",
        "staff-confirm+tok@lists.example.org",
        "staff-owner@lists.example.org",
        "staff-join@lists.example.org",
        "staff-leave@lists.example.org",
        "staff+anything@lists.example.org",
    ],
)
def test_a_lists_own_addresses_are_recognized_in_any_case(address: str) -> None:
    assert addresses.is_own(addresses.normalize(address), "staff", "lists.example.org")


@pytest.mark.parametrize(
    "address",
    [
        "staff@other.example.org",  # the same name at another domain
        "staff-news@lists.example.org",  # another list
        "other@lists.example.org",
        "staffer@lists.example.org",
        "staff-requests@lists.example.org",
    ],
)
def test_other_lists_and_people_are_not_own_addresses(address: str) -> None:
    assert not addresses.is_own(addresses.normalize(address), "staff", "lists.example.org")


def test_own_addresses_of_an_idn_list_in_u_label_form() -> None:
    name, domain = addresses.list_name("staff@bücher.example")
    assert (name, domain) == ("staff", "xn--bcher-kva.example")
    own = addresses.normalize("Staff-Request@BÜCHER.example")
    assert addresses.is_own(own, name, domain)


@pytest.mark.parametrize(
    "recipient",
    ["STAFF@LISTS.EXAMPLE.ORG", "Staff@Lists.Example.Org", "<staff@lists.example.org.>"],
)
def test_candidates_ignore_case(recipient: str) -> None:
    first = next(addresses.candidates(recipient))
    assert first == ListAddress("staff", "lists.example.org", Kind.POST)


def test_candidates_of_a_u_label_recipient_carry_the_a_label_domain() -> None:
    readings = list(addresses.candidates("Staff-Bounces+Tok@Bücher.Example"))
    assert readings == [
        ListAddress("staff-bounces+tok", "xn--bcher-kva.example", Kind.POST),
        ListAddress("staff", "xn--bcher-kva.example", Kind.BOUNCES, "Tok"),
    ]


def test_list_key_lower_cases_the_name_and_a_labels_the_domain() -> None:
    assert addresses.list_key("STAFF@Bücher.Example") == ("staff", "xn--bcher-kva.example")
    with pytest.raises(InvalidAddress):
        addresses.list_key("staff@")
