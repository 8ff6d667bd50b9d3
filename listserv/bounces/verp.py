"""VERP: each personalized copy leaves from ``NAME-bounces+TOKEN@DOMAIN``, TOKEN naming the
delivery (one recipient of one post), so a bounce to it is attributed exactly.

The token carries the `deliveries` row id, not the address: an address may be 64
octets on its own and ``NAME-bounces+`` must fit beside it in the 64 octets of a
local part (RFC 5321 4.5.3.1.1); the row names both the address and the post. It is
the id written in base 32 digits followed by a 16-character MAC (HMAC-SHA256 under
the site's VERP secret, truncated to 80 bits) over the list's bounce address and the
id, so nobody can make a token that blames someone else, nor move one to another
list. Everything is lower-case letters and digits 2-7: relays that change the case
of a local part break nothing. A 1,000,000th delivery makes a 20-character token.

When even that does not fit (a list name over 30 characters) the copy keeps the
plain bounce address: its bounces are then read like shared mode's.
"""

from __future__ import annotations

import hashlib
import hmac

from listserv.addresses import MAX_LOCAL

_DIGITS = "abcdefghijklmnopqrstuvwxyz234567"
_VALUE = {c: i for i, c in enumerate(_DIGITS)}
MAC_CHARS = 16
#: an id of up to 2**65: more than any table will hold
MAX_ID_CHARS = 13


def _id_text(number: int) -> str:
    digits = []
    while True:
        number, rest = divmod(number, 32)
        digits.append(_DIGITS[rest])
        if not number:
            return "".join(reversed(digits))


def _mac(key: bytes, base: str, id_text: str) -> str:
    data = f"{base.lower()}\0{id_text}".encode()
    digest = hmac.new(key, data, hashlib.sha256).digest()
    number = int.from_bytes(digest[:10], "big")  # 80 bits: 16 base-32 digits exactly
    return _id_text(number).rjust(MAC_CHARS, "a")


def token(key: bytes, base: str, delivery_id: int) -> str:
    """The token of delivery `delivery_id` sent from the bounce address `base`."""
    id_text = _id_text(delivery_id)
    return id_text + _mac(key, base, id_text)


def envelope(key: bytes, base: str, delivery_id: int) -> str:
    """``NAME-bounces+TOKEN@DOMAIN`` for `base` = ``NAME-bounces@DOMAIN``, or `base` itself
    when the token would not fit in a local part."""
    local, _, domain = base.rpartition("@")
    tagged = f"{local}+{token(key, base, delivery_id)}"
    if len(tagged.encode()) > MAX_LOCAL:
        return base
    return f"{tagged}@{domain}"


def delivery_of(key: bytes, base: str, raw: str) -> int | None:
    """The delivery id a token names, or None when it is garbled or forged (never trusted)."""
    text = raw.strip().lower()
    id_text, mac = text[:-MAC_CHARS], text[-MAC_CHARS:]
    if not 1 <= len(id_text) <= MAX_ID_CHARS or any(c not in _VALUE for c in text):
        return None
    if not hmac.compare_digest(mac, _mac(key, base, id_text)):
        return None
    number = 0
    for c in id_text:
        number = number * 32 + _VALUE[c]
    return number
