"""One-click unsubscribe links (RFC 8058): the token, the URL, and when a list uses them.

A token names a list and a member and proves we made it, so the HTTP endpoint
needs no database row to trust it::

    token = base64url( version | list id | address | MAC )     (no padding)

- version: one byte, 1.
- list id: 4 bytes, big-endian: `mailing_lists.id`, never reused, so a link to a
  deleted list finds nothing, even if a list of the same name is made again.
- address: the member's address as delivered, UTF-8.
- MAC: the first 16 bytes (128 bits) of HMAC-SHA256 over ``listserv-unsubscribe\\0``
  and the bytes before it, keyed with the site secret UNSUBSCRIBE (sitesecret.py,
  kept in the database so every host of one installation agrees).

The address is readable by whoever sees the link (base64, not encryption): the link
goes only to that address's own mailbox, and carrying it is what makes the token
need no row. Nothing else is in it: no name, no member id, no time. A token never
expires: RFC 8058 links must keep working in old mail, and the worst a leaked link
does is unsubscribe its own address, which is recorded and undone by subscribing.

The same token serves the `List-Unsubscribe` header of one-click lists and the
`$unsubscribe_url` merge field.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import sitesecret
from listserv.errors import InvalidInput, NotFound
from listserv.models import DeliveryMode, MailingList, SiteSecret

VERSION = 1
#: 128 bits: guessing a valid token for an address takes 2^127 tries on average
MAC_BYTES = 16
_HEAD = struct.Struct(">BI")
_DOMAIN = b"listserv-unsubscribe\0"
#: the path under public_base_url
PATH = "/unsubscribe/"
#: RFC 5321 §4.5.3.1.3: a path is at most 256 octets; addresses we store, 320
_MAX_ADDRESS = 320
_LOOPBACK_NAMES = frozenset({"localhost"})


class BadToken(InvalidInput):
    """This is not an unsubscribe link."""


class UnknownToken(NotFound):
    """This unsubscribe link is not valid."""


def make_token(secret: bytes, list_id: int, address: str) -> str:
    """The token for `address` on the list with id `list_id`."""
    if not 0 < list_id < 2**32:
        raise ValueError(f"list id out of range: {list_id}")
    payload = _HEAD.pack(VERSION, list_id) + address.encode("utf-8")
    mac = hmac.new(secret, _DOMAIN + payload, "sha256").digest()[:MAC_BYTES]
    return base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode("ascii")


def read_token(secret: bytes | None, token: str) -> tuple[int, str]:
    """(list id, address) of a token we made: BadToken when it is not one at all,
    UnknownToken when its MAC does not check (forged, tampered, another site's) or
    there is no secret yet (`secret` None: no token was ever made here)."""
    if not token.isascii() or len(token) > 2 * _MAX_ADDRESS:
        raise BadToken
    try:
        data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise BadToken from None
    if len(data) <= _HEAD.size + MAC_BYTES:
        raise BadToken
    version, list_id = _HEAD.unpack_from(data)
    if version != VERSION:
        raise BadToken
    payload, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
    if secret is None:
        raise UnknownToken
    expected = hmac.new(secret, _DOMAIN + payload, "sha256").digest()[:MAC_BYTES]
    if not hmac.compare_digest(mac, expected):
        raise UnknownToken
    try:
        address = payload[_HEAD.size :].decode("utf-8")
    except UnicodeDecodeError:  # only a token we made gets here: never
        raise UnknownToken from None
    return list_id, address


@dataclass(frozen=True, slots=True)
class UnsubscribeLinks:
    """`{base_url}/unsubscribe/{token}` for the members of one list."""

    base_url: str
    secret: bytes
    list_id: int

    def token(self, address: str) -> str:
        return make_token(self.secret, self.list_id, address)

    def url(self, address: str) -> str:
        return f"{self.base_url.rstrip('/')}{PATH}{self.token(address)}"


def stored_secret(session: Session) -> bytes | None:
    """The UNSUBSCRIBE site secret if it was made, without making it (read-only
    sessions; sitesecret.get makes it, at queue time)."""
    return session.scalar(
        sa.select(SiteSecret.value).where(SiteSecret.name == sitesecret.UNSUBSCRIBE)
    )


def base_problem(public_base_url: str) -> str | None:
    """Why `[http] public_base_url` cannot carry one-click links, or None when it can.

    RFC 8058 §3.1 asks for an https URI; a plain http URI is taken only on loopback
    (tests, a local try-out), where nothing crosses a network.
    """
    url = public_base_url.strip()
    if not url:
        return "[http] public_base_url is not set"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return f"[http] public_base_url {url!r} is not a URL"
    if not url.isascii() or not host or parts.query or parts.fragment:
        return f"[http] public_base_url {url!r} is not an absolute URL without query"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http" and _is_loopback(host):
        return None
    return f"[http] public_base_url {url!r} is not https (RFC 8058 requires https)"


def usable_base(public_base_url: str) -> str:
    """The base URL links are made from, or "" when it cannot carry them."""
    if base_problem(public_base_url) is not None:
        return ""
    return public_base_url.strip().rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def one_click(mlist: MailingList, base: str) -> bool:
    """True when the list's posts carry the one-click header (one copy per recipient)."""
    return bool(base) and mlist.one_click_unsubscribe and not mlist.mandatory


def effective_mode(mlist: MailingList, public_base_url: str) -> tuple[DeliveryMode, str]:
    """How the list's posts to members go out, and why (for `lists show`)."""
    if mlist.mandatory:
        return mlist.delivery_mode, "mandatory list: no opt-out, no one-click unsubscribe"
    if not mlist.one_click_unsubscribe:
        return mlist.delivery_mode, "one_click_unsubscribe is off"
    problem = base_problem(public_base_url)
    if problem is not None:
        return mlist.delivery_mode, f"no one-click unsubscribe: {problem}"
    return DeliveryMode.PERSONALIZED, "one-click unsubscribe: one signed copy per recipient"
