"""The address scheme of a list (DESIGN section 2), in one place.

For the list ``staff@lists.example.edu`` we answer for ``staff@`` (posts) and
``staff-request@``, ``staff-join@``, ``staff-leave@``, ``staff-owner@``,
``staff-bounces[+TOKEN]@`` and ``staff-confirm+TOKEN@``. Addresses are
normalized here and nowhere else: the domain is lower-cased, the local part kept.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass

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

_LOCAL = re.compile(r"^[^\s@<>()\[\]\\,;:\"]{1,64}$")
_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_LIST_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")


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
    """Canonical form of an address, or InvalidAddress with the reason."""
    addr = address.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise InvalidAddress(f"not an e-mail address: {address!r}")
    if not _LOCAL.match(local) or local.startswith(".") or local.endswith("."):
        raise InvalidAddress(f"not a valid local part: {address!r}")
    domain = domain.lower().rstrip(".")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidAddress(f"not a valid domain: {address!r}") from None
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_DOMAIN_LABEL.match(label) for label in labels):
        raise InvalidAddress(f"not a valid domain: {address!r}")
    return f"{local}@{domain}"


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
