"""The address scheme of a list (DESIGN section 2), in one place.

For the list ``staff@lists.example.edu`` we answer for ``staff@`` (posts) and
``staff-request@``, ``staff-join@``, ``staff-leave@``, ``staff-owner@``,
``staff-bounces[+TOKEN]@`` and ``staff-confirm+TOKEN@``.

Addresses are validated and normalized here and nowhere else, by the
`email-validator` library: the domain is stored in its lower-case A-label
(punycode) form, so ``user@bücher.example`` and ``user@xn--bcher-kva.example``
are one member and delivery to it needs no SMTPUTF8; the local part is kept as
given (NFC-normalized, RFC 6532 §3.1).
"""

from __future__ import annotations

import enum
import functools
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import DOT_ATOM_TEXT

from listserv.errors import InvalidAddress


class Kind(enum.StrEnum):
    POST = "post"
    REQUEST = "request"
    JOIN = "join"
    LEAVE = "leave"
    OWNER = "owner"
    BOUNCES = "bounces"
    CONFIRM = "confirm"


#: suffixes that may carry "+TOKEN"
_TOKEN_KINDS = {Kind.BOUNCES, Kind.CONFIRM}
SUFFIXES = tuple(k.value for k in Kind if k is not Kind.POST)

_LIST_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")
#: RFC 5321 §4.5.3.1.1 and §4.5.3.1.3 (with erratum 1690), in octets.
MAX_LOCAL = 64
MAX_ADDRESS = 254
#: How much of a refused address an error message quotes.
_SHOWN = 80


@dataclass(frozen=True, slots=True)
class ListAddress:
    """One of a list's addresses, as parsed from a recipient."""

    name: str  # the list's local part, lower-cased
    domain: str
    kind: Kind
    token: str | None = None

    @property
    def list_address(self) -> str:
        return f"{self.name}@{self.domain}"


def normalize(address: str) -> str:
    """Canonical form of an address (A-label domain), or InvalidAddress with the reason.

    Called per RCPT TO, per sender and per imported row, so the common case
    (ASCII dot-atom local part, a domain seen before) skips the full parse;
    `_validated` decides everything else, and every refusal.
    """
    addr = _unwrap(address)
    return _fast(addr) or _validated(addr, address)


def _unwrap(address: str) -> str:
    """Drop surrounding blanks, one pair of angle brackets and a root-label dot."""
    addr = address.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    if addr.endswith(".") and "@" in addr:
        addr = addr[:-1]  # user@example.org. names the same mailbox
    return addr


def _fast(addr: str) -> str | None:
    """The result `_validated` would give for a plain ASCII address, or None to ask it."""
    local, at, domain = addr.rpartition("@")
    if not (at and addr.isascii() and DOT_ATOM_TEXT.match(local)):
        return None
    try:
        ascii_domain, unicode_octets = _domain(domain)
    except EmailNotValidError:
        return None
    longest = max(len(domain), len(ascii_domain), unicode_octets)
    if len(local) > MAX_LOCAL or len(local) + 1 + longest > MAX_ADDRESS:
        return None
    return f"{local}@{ascii_domain}"


@functools.lru_cache(maxsize=8192)
def _domain(domain: str) -> tuple[str, int]:
    """A domain's A-label form and the UTF-8 length of its U-label form (members share
    few domains: a 100,000-row import validates each one once)."""
    result = validate_email(f"a@{domain}", check_deliverability=False, allow_smtputf8=True)
    return result.ascii_domain, len(result.domain.encode())


def _validated(addr: str, given: str) -> str:
    try:
        result = validate_email(addr, check_deliverability=False, allow_smtputf8=True, strict=True)
    except EmailNotValidError as exc:
        raise InvalidAddress(f"invalid address {_shown(given)}: {_reason(exc)}") from None
    # Keep the local part as given: email-validator lower-cases RFC 2142 names.
    local = unicodedata.normalize("NFC", addr.rpartition("@")[0])
    if len(local.encode()) > MAX_LOCAL:
        raise InvalidAddress(
            f"invalid address {_shown(given)}: the part before the @-sign is longer"
            f" than {MAX_LOCAL} octets"
        )
    canonical = f"{local}@{result.ascii_domain}"
    if len(canonical.encode()) > MAX_ADDRESS:
        raise InvalidAddress(f"invalid address {_shown(given)}: longer than {MAX_ADDRESS} octets")
    return canonical


def _shown(address: str) -> str:
    return repr(address if len(address) <= _SHOWN else address[:_SHOWN] + "...")


def _reason(exc: EmailNotValidError) -> str:
    text = " ".join(str(exc).split()).rstrip(".")
    return text[:1].lower() + text[1:]


def list_key(address: str) -> tuple[str, str]:
    """(name, domain) as a list is stored: lower-case name, A-label domain."""
    local, _, domain = normalize(address).rpartition("@")
    return local.lower(), domain


def is_own(address: str, name: str, domain: str) -> bool:
    """Whether a normalized address is one of list name@domain's own (``name``,
    ``name-request``, ``name-bounces+x``, ...): as a member it would mail the list
    to itself. Another list's address is not."""
    local, _, domain_of = address.rpartition("@")
    if domain_of != domain:
        return False
    base = local.lower().partition("+")[0]
    if base == name:
        return True
    return base.startswith(f"{name}-") and base[len(name) + 1 :] in SUFFIXES


def list_name(address: str) -> tuple[str, str]:
    """Validate a new list's address; returns (name, domain)."""
    addr = normalize(address)
    local, _, domain = addr.rpartition("@")
    name = local.lower()
    if not _LIST_NAME.match(name):
        raise InvalidAddress(
            f"not a valid list name: {local!r} (use letters, digits, '.', '-' and '_')"
        )
    for suffix in SUFFIXES:
        if name.endswith(f"-{suffix}"):
            raise InvalidAddress(
                f"a list name may not end in -{suffix}: it is one of our addresses"
            )
    return name, domain


def candidates(recipient: str) -> Iterator[ListAddress]:
    """Every reading of a recipient as a list address, most literal first.

    The caller keeps the first whose list exists, so a list may be named
    ``foo-join`` only in theory: `list_name` refuses such names.
    """
    try:
        addr = normalize(recipient)
    except InvalidAddress:
        return
    original, _, domain = addr.rpartition("@")
    local = original.lower()
    yield ListAddress(local, domain, Kind.POST)
    base, plus, _ = local.partition("+")
    token = original.partition("+")[2]
    for kind in Kind:
        if kind is Kind.POST:
            continue
        suffix = f"-{kind.value}"
        if not base.endswith(suffix) or len(base) == len(suffix):
            continue
        name = base[: -len(suffix)]
        if plus:
            if kind in _TOKEN_KINDS and token:
                yield ListAddress(name, domain, kind, token)
        elif kind is not Kind.CONFIRM:
            yield ListAddress(name, domain, kind)


def build(name: str, domain: str, kind: Kind, token: str | None = None) -> str:
    local = name if kind is Kind.POST else f"{name}-{kind.value}"
    if token:
        local = f"{local}+{token}"
    return f"{local}@{domain}"
