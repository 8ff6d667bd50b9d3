"""ARC sealing (RFC 8617) of posts the list changed that arrived signed.

The list's footer, prefix and headers break the author's DKIM signature. A
receiver that honours ARC can still trust what we found when the post arrived:
the seal carries our Authentication-Results (added at intake with our
authserv-id, `pipeline.authresults`) under the list domain's DKIM key, and the
chain of any ARC sets already on the message.

Signing is dkimpy's ``arc_sign`` (pure-Python RSA, about 7 ms a signature, two
per seal), so a shared post is sealed once, when it is prepared. Personalized
copies are not sealed: each copy's body differs, so each would need its own
seal, which would cost 14 ms a recipient. An Ed25519 key cannot seal (RFC 8617
defines rsa-sha256 only); the post then goes out with its DKIM signature alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from email.message import EmailMessage

import dkim as dkimpy

from listserv.distribute import dkim

log = logging.getLogger("listserv.arc")

#: dkimpy's own log lines (a key it cannot use, a chain it stops) are ours at DEBUG
_DKIMPY_LOG = logging.getLogger("listserv.arc.dkimpy")


def wanted(msg: EmailMessage) -> bool:
    """True for a message that arrived with a DKIM signature or an ARC set: the
    authentication a receiver would lose when the list changes it."""
    return any(name.lower() in ("dkim-signature", "arc-seal") for name, _ in msg.raw_items())


def seal(message: bytes, signer: dkim.Signer, authserv_id: str) -> bytes:
    """`message` with the next ARC set in front; unchanged (and logged) when it cannot
    be sealed: no Authentication-Results of ours on it, an Ed25519 key, a broken chain."""
    if signer.is_ed25519:
        return message
    key = signer.key
    try:
        headers = dkimpy.arc_sign(
            message,
            key.selector.encode("ascii"),
            key.domain.encode("ascii"),
            key.private_pem,
            authserv_id.encode("ascii"),
            logger=_DKIMPY_LOG,
        )
    except Exception as exc:  # dkimpy on a message or chain it cannot handle
        log.warning("ARC: not sealed: %s", " ".join(str(exc).split())[:200] or type(exc).__name__)
        return message
    if not headers:
        log.info("ARC: not sealed: no Authentication-Results from %s on the message", authserv_id)
        return message
    return b"".join(headers) + message


def sealer(signer: dkim.Signer | None, authserv_id: str) -> Callable[[bytes], bytes] | None:
    """What `prepare.render` seals signed posts with, or None without an RSA key."""
    if signer is None or signer.is_ed25519:
        return None
    return lambda message: seal(message, signer, authserv_id)
