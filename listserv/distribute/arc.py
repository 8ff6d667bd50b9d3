"""ARC sealing (RFC 8617) of posts the list changed that arrived signed.

The list's footer, prefix and headers break the author's DKIM signature. A
receiver that honours ARC can still trust what we found when the post arrived:
the seal carries our Authentication-Results (added at intake with our
authserv-id, `pipeline.authresults`) under the list domain's DKIM key, and the
chain of any ARC sets already on the message.

Each ARC set is three fields, written with our own RFC 6376 code on OpenSSL
(`distribute.dkim`), not dkimpy's pure-Python RSA (7 ms a signature):

- ARC-Authentication-Results (AAR): ``i=N;`` and our Authentication-Results
  value as it is on the message;
- ARC-Message-Signature (AMS): a DKIM signature with ``i=N`` for ``v=``. It signs
  the same header fields and body as our DKIM-Signature, so it reuses that
  signature's header and body hashes (`dkim.Hashes`): no second pass over the
  message, only its own RSA operation;
- ARC-Seal (AS): ``cv=`` none for the first set, else from our ``arc=`` result
  (pass, or fail: then it covers its own set only, §5.1.2), signing the earlier
  sets (hashed once per post) and its own.

So a sealed copy costs two RSA operations more than a signed one (about 0.25 ms
each for a 2048-bit key) and a few hundred bytes of hashing. What every copy of
a post shares (the instance, cv, the AAR, the earlier sets) is worked out once
per post (`chain`, `Sealer`).

Whether a post is sealed is decided once, when it is prepared: it arrived with a
DKIM signature or an ARC set (`wanted`) and the list's signer has an RSA key. A
shared post is sealed then, in its stored bytes; a personalized post records
our authserv-id in its rendering snapshot (``ListView.arc_authserv_id``), and
`prepare.Personalizer` seals each copy as it signs it, so a retry seals as the
first attempt did. An Ed25519 key cannot seal (RFC 8617 defines rsa-sha256
only); the post then goes out with its DKIM signature alone. A message without
our Authentication-Results, or a chain we cannot continue, goes out unsealed
(logged once per post).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage

from listserv.distribute import dkim
from listserv.errors import ListservError

log = logging.getLogger("listserv.arc")

#: RFC 8617 §4.2.1: a chain longer than this is invalid
INSTANCE_LIMIT = 50
_AAR = b"arc-authentication-results"
_AMS = b"arc-message-signature"
_AS = b"arc-seal"
#: the order of one set's fields in the seal's signature (RFC 8617 §5.1.1)
_SET_ORDER = (_AAR, _AMS, _AS)
_INSTANCE = re.compile(rb"(?:^|;)\s*i\s*=\s*([0-9]{1,3})\s*(?:;|$)")
#: an authserv-id as MTAs write it: after optional comments, up to ';' or space
_AUTHSERV = re.compile(rb'\s*(?:\([^()]*\)\s*)*"?([^\s;()"]+)')
_ARC_RESULT = re.compile(rb"(?:^|;)\s*arc\s*=\s*([A-Za-z]+)", re.IGNORECASE)
_LINE = 76


def wanted(msg: EmailMessage) -> bool:
    """True for a message that arrived with a DKIM signature or an ARC set: the
    authentication a receiver would lose when the list changes it."""
    return any(name.lower() in ("dkim-signature", "arc-seal") for name, _ in msg.raw_items())


def can_seal(signer: dkim.Signer | None) -> bool:
    """True when `signer` can seal: its first key is RSA."""
    return signer is not None and not signer.is_ed25519


@dataclass(frozen=True, slots=True)
class Chain:
    """What the next ARC set says that is the same for every copy of a post."""

    instance: int
    #: the chain validation status: none, pass or fail
    cv: bytes
    #: our ARC-Authentication-Results field, CRLF included
    aar: bytes
    #: the earlier sets, relaxed-canonicalized in seal order (empty unless cv=pass)
    earlier: bytes


def chain(message: bytes, authserv_id: str) -> Chain | None:
    """The next set's shared part for `message` (only its header section is read), or
    None (logged) when it cannot be sealed: no Authentication-Results of ours, more
    than 50 sets, or earlier sets without our ``arc=`` verdict on them."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 4]
    try:
        fields, _ = dkim._split_message(dkim._crlf(head))
    except ListservError as exc:
        log.info("ARC: not sealed: %s", exc)
        return None
    ours = authserv_id.lower().encode("ascii", "replace")
    results: bytes | None = None
    sets: dict[int, dict[bytes, list[bytes]]] = {}
    for field in fields:
        if field.name == b"authentication-results":
            value = _value(field.raw)
            found = _AUTHSERV.match(value)
            if results is None and found is not None and found.group(1).lower() == ours:
                results = field.raw
        elif field.name in _SET_ORDER:
            number = _INSTANCE.search(_value(field.raw))
            if number is not None:
                sets.setdefault(int(number.group(1)), {}).setdefault(field.name, []).append(
                    field.raw
                )
    if results is None:
        log.info("ARC: not sealed: no Authentication-Results from %s on the message", authserv_id)
        return None
    top = max(sets, default=0)
    instance = top + 1
    if instance > INSTANCE_LIMIT:
        log.info("ARC: not sealed: the message already carries %d ARC sets", top)
        return None
    verdict = _ARC_RESULT.search(_value(results))
    word = verdict.group(1).decode("ascii").lower() if verdict is not None else None
    if top == 0:
        if word not in (None, "none"):
            log.info("ARC: not sealed: arc=%s but no ARC set with an instance", word)
            return None
        cv = b"none"
    elif word is None:
        log.info("ARC: not sealed: %d earlier ARC sets and no arc= result of ours", top)
        return None
    else:
        cv = b"pass" if word == "pass" and _complete(sets, top) else b"fail"
    earlier = b""
    if cv == b"pass":
        earlier = b"".join(
            dkim.canonicalize_header(sets[i][name][0], "relaxed")
            for i in range(1, instance)
            for name in _SET_ORDER
        )
    _, _, value = results.partition(b":")
    aar = b"ARC-Authentication-Results: i=%d; %s" % (instance, value.lstrip(b" \t"))
    return Chain(instance, cv, aar, earlier)


def _value(raw: bytes) -> bytes:
    """A field's value unfolded, WSP runs as one SP (relaxed canonicalization)."""
    return dkim.canonicalize_header(raw, "relaxed").partition(b":")[2][:-2]


def _complete(sets: dict[int, dict[bytes, list[bytes]]], top: int) -> bool:
    """Each instance 1..top has exactly one field of each kind."""
    return all(
        i in sets and all(len(sets[i].get(name, [])) == 1 for name in _SET_ORDER)
        for i in range(1, top + 1)
    )


class Sealer:
    """Seals the copies of one post: `chain` found once, each copy's set made from its
    DKIM hashes. Immutable after construction, so sender threads share one."""

    __slots__ = ("_ams_head", "_as_head", "_chain", "_seal_prefix", "signer")

    def __init__(self, signer: dkim.Signer, found: Chain) -> None:
        if signer.is_ed25519:
            raise ValueError("an Ed25519 key cannot seal: RFC 8617 defines rsa-sha256 only")
        key = signer.key
        self.signer = signer
        self._chain = found
        domain = key.domain.encode("ascii")
        selector = key.selector.encode("ascii")
        canon = f"{signer.header_canon}/{signer.body_canon}".encode("ascii")
        self._ams_head = b"i=%d; a=rsa-sha256; c=%s; d=%s; s=%s;" % (
            found.instance,
            canon,
            domain,
            selector,
        )
        self._as_head = b"i=%d; a=rsa-sha256; cv=%s; d=%s; s=%s;" % (
            found.instance,
            found.cv,
            domain,
            selector,
        )
        # the seal signs the earlier sets and our AAR first: the same for every copy
        self._seal_prefix = hashlib.sha256(
            found.earlier + dkim.canonicalize_header(found.aar, "relaxed")
        )

    @property
    def instance(self) -> int:
        return self._chain.instance

    def fields(self, hashes: dkim.Hashes, *, timestamp: int | None = None) -> bytes:
        """The ARC set (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results,
        each with its CRLF) of the message whose DKIM `hashes` these are."""
        signer = self.signer
        t = b"t=%d;" % (int(time.time()) if timestamp is None else timestamp)
        # AMS: the DKIM signature's header and body hashes, then the AMS itself with b= empty
        unsigned = dkim._fold_signature(
            self._ams_head,
            t,
            hashes.h_value,
            base64.b64encode(hashes.body),
            b"ARC-Message-Signature",
        )
        state = hashes.headers.copy()
        state.update(dkim.canonicalize_header(unsigned, signer.header_canon)[:-2])
        ams = _signed(unsigned, signer.sign_digest(state.digest()))
        # AS: earlier sets, our AAR and AMS, then the AS itself with b= empty (relaxed)
        unsigned = _fold_seal(self._as_head, t)
        seal = self._seal_prefix.copy()
        seal.update(dkim.canonicalize_header(ams, "relaxed"))
        seal.update(dkim.canonicalize_header(unsigned, "relaxed")[:-2])
        arc_seal = _signed(unsigned, signer.sign_digest(seal.digest()))
        return arc_seal + ams + self._chain.aar

    def sign(
        self,
        message: bytes,
        template: dkim.SigningTemplate | None = None,
        *,
        timestamp: int | None = None,
    ) -> bytes:
        """`message` signed (DKIM, through `template` when given) and sealed: one
        header and body hash for both."""
        hashes = (template or self.signer).hashes(message)
        t = int(time.time()) if timestamp is None else timestamp
        signature = self.signer.finish(hashes, timestamp=t)
        return self.fields(hashes, timestamp=t) + signature + message


def _signed(unsigned: bytes, raw: bytes) -> bytes:
    """The field with its b= value: `unsigned` ends ``b=`` CRLF on a line of its own."""
    return unsigned[:-2] + dkim._fold_b64(base64.b64encode(raw)) + b"\r\n"


def _fold_seal(head: bytes, t: bytes) -> bytes:
    """``ARC-Seal: ...; b=`` CRLF, no line past 76 characters, b= on its own line (so
    removing its value leaves what was hashed, whatever FWS a verifier takes)."""
    lines: list[bytes] = []
    line = b"ARC-Seal:"
    for atom in [*head.split(b" "), t]:
        if len(line) + 1 + len(atom) > _LINE:
            lines.append(line)
            line = b" " + atom
        else:
            line += b" " + atom
    lines.append(line)
    return b"\r\n".join(lines) + b"\r\n b=\r\n"


def seal(message: bytes, signer: dkim.Signer, authserv_id: str) -> bytes:
    """`message` (already DKIM-signed) with the next ARC set in front; unchanged (and
    logged) when it cannot be sealed: no Authentication-Results of ours on it, an
    Ed25519 key, a chain we cannot continue."""
    if signer.is_ed25519:
        return message
    found = chain(message, authserv_id)
    if found is None:
        return message
    try:
        return Sealer(signer, found).fields(signer.hashes(message)) + message
    except (ListservError, ValueError) as exc:
        log.warning("ARC: not sealed: %s", " ".join(str(exc).split())[:200])
        return message


def sealer(signer: dkim.Signer | None, authserv_id: str) -> Callable[[bytes], bytes] | None:
    """What `prepare.render` seals signed shared posts with, or None without an RSA key."""
    if signer is None or signer.is_ed25519:
        return None
    return lambda message: seal(message, signer, authserv_id)
