"""DKIM keys on disk and signing of outgoing list mail.

Layout: ``<keys_dir>/<domain>/<selector>.pem`` (PKCS#8 PEM, mode 0600, directories
0700); ``<keys_dir>/<domain>/active``, one line naming the RSA selector in use, and
``active-ed25519`` naming the Ed25519 one (RFC 8463) when the domain signs twice;
``retired``, one line per selector that stopped signing (``SELECTOR ISO-TIME``),
so `list_keys` can tell a retired key from one waiting to be activated. The
signer reads the active files per post, so switching keys needs no restart.

A new key always gets a new selector and an old selector is never reused: mail
signed with the old key may still be in flight, so its public key has to stay
published in DNS until that mail has been delivered. For the same reason a new
key does not sign anything until it is activated (its record must be published
first); only a domain's first key is active at once.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from listserv.errors import ConfigError, InvalidInput, NotFound

if TYPE_CHECKING:
    from hashlib import _Hash

#: Headers we sign when present. List-Unsubscribe and List-Unsubscribe-Post must
#: be covered for RFC 8058 one-click unsubscribe to be honoured.
SIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-id",
    "list-post",
    "list-help",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-owner",
    "list-subscribe",
    "list-archive",
    "precedence",
)
_SIGNED_BYTES = frozenset(name.encode("ascii") for name in SIGNED_HEADERS)

#: Headers signed once more than they occur (RFC 6376 §5.4.2, §8.15): the extra
#: h= entry stands for an absent field, so a copy added in transit (a second From
#: or List-Unsubscribe that a reader or one-click would trust) breaks the signature.
OVERSIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-id",
    "list-post",
    "list-help",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-owner",
)
_OVERSIGNED = tuple(name.encode("ascii") for name in OVERSIGNED_HEADERS)
#: A TXT character-string holds at most 255 octets (RFC 1035 §3.3.14).
_TXT_STRING_MAX = 255

KEY_SIZES: tuple[int, ...] = (1024, 2048, 3072, 4096)
#: Verifiers must reject RSA keys below 1024 bits (RFC 8301).
_MIN_BITS = 1024
ACTIVE_FILE = "active"
RETIRED_FILE = "retired"
#: k= of the key record; the signature algorithm is a=<algorithm>-sha256.
Algorithm = Literal["rsa", "ed25519"]
ALGORITHMS: tuple[Algorithm, ...] = ("rsa", "ed25519")
#: The file naming each algorithm's active selector: RSA keeps the original name.
ACTIVE_FILES: dict[Algorithm, str] = {"rsa": ACTIVE_FILE, "ed25519": "active-ed25519"}
#: KeyInfo.state: signing now; made but never activated; replaced by a newer key.
KeyState = Literal["active", "pending", "retired"]

_SELECTOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DOMAIN_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

#: c= algorithms (RFC 6376 §3.4).
Canonicalization = Literal["relaxed", "simple"]
_CANONICALIZATIONS: tuple[str, ...] = ("relaxed", "simple")
#: A field name is printable ASCII but ':' (RFC 5322 §3.6.8); obsolete syntax
#: allows WSP before the colon (§4.5), which relaxed canonicalization drops.
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
#: A WSP run that relaxed canonicalization changes: not a single SP. Matching
#: only those keeps ordinary text (one SP between words) free of substitutions,
#: which cost 0.2 ms per 4 KB message when every space was one.
_WSP = re.compile(rb"\t[ \t]*| [ \t]+")
_WSP_AT_EOL = re.compile(rb"[ \t]+(?=\r\n|\Z)")
#: A line ending other than CRLF, which our SMTP client (smtp_client.dot_stuff) sends as CRLF.
_BARE_EOL = re.compile(rb"\r\n|\n|\r(?!\n)")
#: Longest line of the DKIM-Signature field we write, CRLF excluded (RFC 5322
#: §2.1.1 asks for at most 78).
_LINE = 76


@dataclass(frozen=True)
class SigningKey:
    """One domain's DKIM key. The PEM is left out of repr() so it never reaches a log."""

    domain: str
    selector: str
    private_pem: bytes = field(repr=False)

    @property
    def algorithm(self) -> Algorithm:
        """``rsa`` or ``ed25519``, read from the key itself."""
        return "ed25519" if isinstance(self._private(), ed25519.Ed25519PrivateKey) else "rsa"

    def public_bytes(self) -> bytes:
        """What p= carries, decoded: an RSA SubjectPublicKeyInfo (DER), or the raw
        32-byte Ed25519 public key (RFC 8463 §4.2)."""
        key = self._private()
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        return key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def public_txt(self) -> str:
        """The DNS TXT record value: ``v=DKIM1; k=rsa|ed25519; p=<base64 public key>``."""
        p = base64.b64encode(self.public_bytes()).decode("ascii")
        return f"v=DKIM1; k={self.algorithm}; p={p}"

    def _private(self) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
        try:
            return _load_signing_key(self.private_pem)
        except ValueError as e:
            raise InvalidInput(f"DKIM key {self.selector} for {self.domain}: {e}") from e

    def path(self, keys_dir: Path) -> Path:
        """Where the private key lives under keys_dir."""
        return keys_dir / self.domain / f"{self.selector}.pem"

    def dns_name(self) -> str:
        """The DNS name the public key is published at (RFC 6376 §3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"

    def dns_record(self) -> str:
        """The record to publish, as one zone-file line DNS servers accept.

        A TXT character-string holds at most 255 bytes and a 2048-bit key's value
        is about 410, so the value is split into several quoted strings
        (``"v=DKIM1; k=rsa; p=MIIB..." "...rest"``), which verifiers join back
        together without separators (RFC 6376 §3.6.2.2).
        """
        return f"{self.dns_name()}. IN TXT {quoted_strings(self.public_txt())}"


@dataclass(frozen=True)
class KeyInfo:
    """One row of `list_keys`: a key on disk, or a problem with a domain's key files.

    `problem` is None for a usable key; `bits` is None when the key cannot be read
    (an Ed25519 key has 256). `state` is active, pending (made, never activated: its
    record may still need publishing) or retired (replaced; `retired_at` says when,
    and its record stays published while mail it signed may be in flight).
    """

    domain: str
    selector: str | None
    bits: int | None
    active: bool
    problem: str | None = None
    algorithm: Algorithm = "rsa"
    state: KeyState | None = None
    retired_at: datetime | None = None


def generate_key(
    keys_dir: Path,
    domain: str,
    selector: str,
    bits: int = 2048,
    *,
    activate: bool = False,
    algorithm: Algorithm = "rsa",
) -> SigningKey:
    """Create a new key for `domain` under a new `selector` (RSA of `bits`, or Ed25519).

    A domain's first key becomes active at once; a later one (an Ed25519 key
    beside an active RSA key included) only with `activate` (or `activate_key`
    later), because mail signed before its DNS record is published fails DKIM
    everywhere. The PEM appears complete or not at all (written to a temporary
    file, then hard-linked into place), and the link refuses to replace an
    existing selector even when two of these run at once.
    """
    domain = check_domain(domain)
    if not _valid_selector(selector):
        raise InvalidInput(
            f"invalid DKIM selector {selector!r}: use letters, digits, '-', '_' and '.'"
            " (starting with a letter or digit, no empty or >63-character labels)"
        )
    if algorithm not in ALGORITHMS:
        raise InvalidInput(f"unknown DKIM algorithm {algorithm!r}: use rsa or ed25519")
    if algorithm == "rsa" and (
        not isinstance(bits, int) or isinstance(bits, bool) or bits not in KEY_SIZES
    ):
        raise InvalidInput(
            f"invalid DKIM key size {bits!r}: use one of {', '.join(map(str, KEY_SIZES))}"
        )
    domain_dir = keys_dir / domain
    pem_path = domain_dir / f"{selector}.pem"
    taken = (
        f"DKIM selector {selector!r} already exists for {domain}; pick a new selector"
        " (the old key's DNS record may still be needed for mail in flight)"
    )
    try:
        _make_private_dir(keys_dir)
        _make_private_dir(domain_dir)
        # DNS names are case-insensitive: "Sel1" would replace the DNS record of "sel1".
        if _selector_taken(domain_dir, selector):
            raise InvalidInput(taken)
        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = (
            ed25519.Ed25519PrivateKey.generate()
            if algorithm == "ed25519"
            else rsa.generate_private_key(public_exponent=65537, key_size=bits)
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            _write_new(pem_path, pem)
        except FileExistsError:
            raise InvalidInput(taken) from None
        active = domain_dir / ACTIVE_FILES[algorithm]
        line = f"{selector}\n".encode("ascii")
        if activate:
            _activate(domain_dir, algorithm, selector, None)
        elif not any((domain_dir / name).exists() for name in ACTIVE_FILES.values()):
            # Linked into place, never replaced: of two first keys made at once, one wins.
            with contextlib.suppress(FileExistsError):
                _write_new(active, line)
    except OSError as e:
        raise ConfigError(f"cannot write DKIM key under {domain_dir}: {e.strerror or e}") from e
    return SigningKey(domain=domain, selector=selector, private_pem=pem)


def new_selector(keys_dir: Path, domain: str, algorithm: Algorithm, today: date) -> str:
    """A selector never used for `domain`: ``sYYYYMMDD`` (RSA) or ``eYYYYMMDD`` (Ed25519),
    with ``-2``, ``-3``... when that day's is taken."""
    domain_dir = keys_dir / check_domain(domain)
    base = f"{'e' if algorithm == 'ed25519' else 's'}{today:%Y%m%d}"
    candidate, n = base, 1
    while _selector_taken(domain_dir, candidate):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def activate_key(
    keys_dir: Path, domain: str, selector: str, *, now: datetime | None = None
) -> SigningKey:
    """Make an existing, usable key the one `domain`'s mail is signed with (for its
    algorithm: an Ed25519 key replaces the active Ed25519 key, not the RSA one).

    The selector is matched case-insensitively, as DNS does. Unknown selectors are
    NotFound and unusable keys ConfigError, so a typo never stops the signing. The
    key it replaces is recorded as retired at `now`, never deleted.
    """
    key = find_key(keys_dir, domain, selector)
    domain_dir = keys_dir / key.domain
    try:
        _activate(domain_dir, key.algorithm, key.selector, now)
    except OSError as e:
        raise ConfigError(f"cannot write under {domain_dir}: {_reason(e)}") from e
    return key


def find_key(keys_dir: Path, domain: str, selector: str) -> SigningKey:
    """`domain`'s key `selector` (matched without case), or NotFound / ConfigError."""
    domain = check_domain(domain)
    if not _valid_selector(selector):
        raise InvalidInput(f"invalid DKIM selector {selector!r}")
    domain_dir = keys_dir / domain
    wanted = f"{selector}.pem".lower()
    try:
        found = [
            p
            for p in domain_dir.iterdir()
            if p.name.lower() == wanted and _valid_selector(p.stem)  # not "\\u212a.pem" for "k"
        ]
    except (FileNotFoundError, NotADirectoryError):
        found = []
    except OSError as e:
        raise ConfigError(f"{domain_dir}: cannot list DKIM keys: {_reason(e)}") from e
    if not found:
        raise NotFound(
            f"no DKIM key {selector!r} for {domain} (`listserv dkim list {domain}` shows them)"
        )
    pem_path = found[0]
    try:
        pem = _canonical_pem(pem_path.read_bytes())
    except OSError as e:
        raise ConfigError(f"{pem_path}: cannot read DKIM key: {_reason(e)}") from e
    except ValueError as e:
        raise ConfigError(f"{pem_path}: not a usable DKIM key: {e}") from e
    return SigningKey(domain=domain, selector=pem_path.stem, private_pem=pem)


def _activate(domain_dir: Path, algorithm: Algorithm, selector: str, now: datetime | None) -> None:
    """Point `algorithm`'s active file at `selector`; the selector it named is retired.

    The retirement is written first: a crash between the two leaves the old key
    both active and listed as retired, and active wins, so nothing is lost.
    """
    active = domain_dir / ACTIVE_FILES[algorithm]
    try:
        previous: str | None = active.read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        previous = None
    if previous and previous != selector and _valid_selector(previous):
        when = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
        with open(domain_dir / RETIRED_FILE, "a", encoding="ascii") as f:
            f.write(f"{previous} {when}\n")
            f.flush()
            os.fsync(f.fileno())
    _write_replace(active, f"{selector}\n".encode("ascii"))


def active_selector(keys_dir: Path, domain: str, algorithm: Algorithm = "rsa") -> str | None:
    """The selector `domain`'s active file for `algorithm` names, or None when there is none."""
    domain = check_domain(domain)
    active = keys_dir / domain / ACTIVE_FILES[algorithm]
    try:
        return active.read_text(encoding="ascii").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{active}: cannot read the active DKIM selector: {_reason(e)}") from e


def list_keys(keys_dir: Path, domain: str | None = None) -> list[KeyInfo]:
    """Every key under keys_dir (or one domain's), sorted; broken files become rows, not errors."""
    if domain is not None:
        domains = [check_domain(domain)]
    else:
        try:
            entries = sorted(p.name for p in keys_dir.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        except OSError as e:
            raise ConfigError(f"{keys_dir}: cannot list DKIM keys: {_reason(e)}") from e
        domains = [name for name in entries if _is_domain(name)]
    return [info for name in domains for info in _domain_keys(keys_dir / name, name)]


def active_key(keys_dir: Path, domain: str, algorithm: Algorithm = "rsa") -> SigningKey | None:
    """The key to sign `domain`'s mail with (with `algorithm`), or None when none is configured.

    A configured but broken key is a ConfigError rather than None: silently
    sending unsigned mail would fail DMARC at the receivers instead of here.
    """
    domain = check_domain(domain)
    active = keys_dir / domain / ACTIVE_FILES[algorithm]
    selector = active_selector(keys_dir, domain, algorithm)
    if selector is None:
        return None
    if not _valid_selector(selector):
        raise ConfigError(f"{active}: does not name a valid DKIM selector ({selector[:64]!r})")
    pem_path = active.parent / f"{selector}.pem"
    try:
        pem = pem_path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{active}: names DKIM selector {selector!r} but {pem_path} does not exist"
        ) from None
    except OSError as e:
        raise ConfigError(f"{pem_path}: cannot read DKIM key: {_reason(e)}") from e
    try:
        pem = _canonical_pem(pem)
        if _key_algorithm(_load_signing_key(pem)) != algorithm:
            raise ValueError(f"not an {algorithm} key")
    except ValueError as e:
        raise ConfigError(f"{pem_path}: not a usable DKIM key: {e}") from e
    return SigningKey(domain=domain, selector=selector, private_pem=pem)


def active_keys(keys_dir: Path, domain: str) -> list[SigningKey]:
    """Every key `domain`'s mail is signed with now: RSA first, then Ed25519 (RFC 8463
    asks signers to add an RSA signature, which every verifier understands)."""
    return [k for alg in ALGORITHMS if (k := active_key(keys_dir, domain, alg)) is not None]


def pending_keys(keys_dir: Path, domain: str, algorithm: Algorithm) -> list[KeyInfo]:
    """`domain`'s usable `algorithm` keys made but never activated, oldest selector first."""
    return [
        info
        for info in list_keys(keys_dir, domain)
        if info.state == "pending" and info.problem is None and info.algorithm == algorithm
    ]


def _retired(domain_dir: Path) -> dict[str, datetime]:
    """Selector -> when it last stopped signing, from the ``retired`` file (bad lines skipped)."""
    try:
        text = (domain_dir / RETIRED_FILE).read_text(encoding="ascii", errors="replace")
    except OSError:
        return {}
    found: dict[str, datetime] = {}
    for line in text.splitlines():
        selector, _, when = line.strip().partition(" ")
        try:
            at = datetime.fromisoformat(when.strip())
        except ValueError:
            continue
        found[selector] = at if at.tzinfo else at.replace(tzinfo=UTC)
    return found


def _domain_keys(domain_dir: Path, domain: str) -> list[KeyInfo]:
    try:
        pems = sorted(
            p for p in domain_dir.iterdir() if p.suffix == ".pem" and not p.name.startswith(".")
        )
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        return [KeyInfo(domain, None, None, False, f"cannot list {domain_dir}: {_reason(e)}")]
    rows: list[KeyInfo] = []
    current: dict[Algorithm, str] = {}
    for alg, name in ACTIVE_FILES.items():
        active_path = domain_dir / name
        try:
            current[alg] = active_path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as e:
            unreadable = f"cannot read {active_path}: {_reason(e)}"
            rows.append(KeyInfo(domain, None, None, False, unreadable))
    retired = _retired(domain_dir)
    for pem_path in pems:
        bits: int | None = None
        problem: str | None = None
        algorithm: Algorithm = "rsa"
        if not _valid_selector(pem_path.stem):
            problem = "not a valid selector name"
        try:
            key = _load_signing_key(pem_path.read_bytes())
            algorithm = _key_algorithm(key)
            bits = 256 if isinstance(key, ed25519.Ed25519PrivateKey) else key.key_size
        except OSError as e:
            problem = f"cannot read: {_reason(e)}"
        except ValueError as e:
            problem = f"not a usable key: {e}"
        active = current.get(algorithm) == pem_path.stem
        state: KeyState = (
            "active" if active else "retired" if pem_path.stem in retired else "pending"
        )
        rows.append(
            KeyInfo(
                domain,
                pem_path.stem,
                bits,
                active,
                problem,
                algorithm,
                state,
                None if active else retired.get(pem_path.stem),
            )
        )
    stems = {p.stem for p in pems}
    for alg, selector in current.items():
        if selector in stems:
            continue
        active_path = domain_dir / ACTIVE_FILES[alg]
        shown = selector[:64] if selector.isprintable() else repr(selector[:64])
        missing = (
            f"{active_path} names {shown!r} but {shown}.pem does not exist"
            if _valid_selector(selector)
            else f"{active_path} does not name a valid selector"
        )
        rows.append(KeyInfo(domain, shown or None, None, True, missing, alg, "active"))
    return rows


class Signer:
    """Signs messages for one key with our own RFC 6376 code over OpenSSL.

    dkimpy did the RSA arithmetic in pure Python, about 7 ms a signature, the
    whole cost of personalized delivery (135-145 signed messages/s); OpenSSL
    takes about 0.25 ms. The key is parsed once here, not per message. The
    Signer holds only immutable state and `cryptography` keys, which OpenSSL
    lets several threads use at once, so one Signer serves every sender thread.

    RSA-SHA256 by default; an Ed25519 PEM signs as ed25519-sha256 (RFC 8463),
    through the same steps. Given several keys (RSA and Ed25519 for one domain) it
    writes one DKIM-Signature per key, in the order given, over one header and one
    body hash: the second signature costs only its own public-key operation.
    relaxed/relaxed unless told otherwise.
    """

    def __init__(
        self,
        key: SigningKey,
        *more: SigningKey,
        header_canon: Canonicalization = "relaxed",
        body_canon: Canonicalization = "relaxed",
    ) -> None:
        if header_canon not in _CANONICALIZATIONS or body_canon not in _CANONICALIZATIONS:
            raise InvalidInput(f"unknown DKIM canonicalization {header_canon}/{body_canon}")
        self.key = key
        self.keys: tuple[SigningKey, ...] = (key, *more)
        self.header_canon: Canonicalization = header_canon
        self.body_canon: Canonicalization = body_canon
        signing: list[tuple[rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, bytes]] = []
        for one in self.keys:
            domain = check_domain(one.domain)
            if not _valid_selector(one.selector):
                raise InvalidInput(f"invalid DKIM selector {one.selector!r}")
            try:
                private = _load_signing_key(one.private_pem)
            except ValueError as e:
                raise InvalidInput(f"DKIM key {one.selector} for {one.domain}: {e}") from e
            algorithm = f"{_key_algorithm(private)}-sha256"
            # Everything before t= is the same in every signature with this key.
            head = (
                f"v=1; a={algorithm}; c={header_canon}/{body_canon}; d={domain}; s={one.selector};"
            ).encode("ascii")
            signing.append((private, head))
        self._signing = tuple(signing)

    @property
    def is_ed25519(self) -> bool:
        """True when the first (or only) key is Ed25519."""
        return isinstance(self._signing[0][0], ed25519.Ed25519PrivateKey)

    def sign(self, message: bytes, *, timestamp: int | None = None) -> bytes:
        """Return ``DKIM-Signature: ...\\r\\n`` + `message`.

        Pass the final wire bytes (e.g. from ``listserv.mail.to_bytes``) with CRLF
        line endings and do not re-serialize afterwards with another policy.
        h= lists each SIGNED_HEADERS field once per occurrence in the message,
        and each OVERSIGNED_HEADERS field once more (RFC 6376 §8.15). `timestamp`
        (t=, seconds since the epoch) defaults to now.
        """
        return self.signature(message, timestamp=timestamp) + message

    def signature(self, message: bytes, *, timestamp: int | None = None) -> bytes:
        """The DKIM-Signature header field (with its CRLF) for `message`, alone."""
        return self.finish(self.hashes(message), timestamp=timestamp)

    def hashes(self, message: bytes) -> Hashes:
        """What a signature of `message` signs, before any signature field: the ARC
        seal (`distribute.arc`) signs the same header and body hashes once more."""
        fields, body = _split_message(_crlf(message))
        headers, h_value = self._hash_headers(fields)
        body_hash = hashlib.sha256(canonicalize_body(body, self.body_canon)).digest()
        return Hashes(headers, h_value, body_hash)

    def finish(self, hashes: Hashes, *, timestamp: int | None = None) -> bytes:
        """The DKIM-Signature field(s), with their CRLF, for a message's `hashes`."""
        return self._finish(hashes.headers, hashes.h_value, hashes.body, timestamp)

    def sign_digest(self, digest: bytes) -> bytes:
        """The first key's RSASSA-PKCS1-v1_5 signature of a SHA-256 `digest` (ARC-Seal
        and ARC-Message-Signature b=); InvalidInput for an Ed25519 key."""
        private = self._signing[0][0]
        if not isinstance(private, rsa.RSAPrivateKey):
            raise InvalidInput("an Ed25519 key cannot sign rsa-sha256")
        return private.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))

    def template(self, message: bytes, differs_at: int) -> SigningTemplate | None:
        """Hash once what every copy of `message` shares: its copies are `message`
        up to `differs_at` and anything after. None when that leaves nothing to
        share: the copies differ in the header, or `message` has bare CRs or LFs."""
        if _has_bare_eol(message):
            return None
        end = message.find(b"\r\n\r\n")
        if end < 0 or differs_at < end + 4:
            return None  # the header (or its end) differs per copy
        body_start = end + 4
        cut = message.rfind(b"\r\n", body_start - 2, differs_at) + 2  # a line boundary
        fields, _ = _split_message(message[:body_start])
        headers, h_value = self._hash_headers(fields)
        fragment = message[body_start:cut]
        if self.body_canon == "relaxed":
            fragment = _relaxed_lines(fragment)
        return SigningTemplate(
            self, message[:cut], headers, h_value, hashlib.sha256(fragment), body_start
        )

    def _hash_headers(self, fields: list[_Field]) -> tuple[_Hash, bytes]:
        """SHA-256 over the signed fields, picked as verifiers pick them, and h=."""
        names = [f.name for f in fields if f.name in _SIGNED_BYTES]
        if b"from" not in names:
            raise InvalidInput("cannot DKIM-sign a message without a From header")
        # Each oversigned name once more than it occurs: verifiers match h= entries
        # to fields from the bottom up (RFC 6376 §5.4.2) and hash nothing for an
        # entry left without a field, so a field added later fills it and breaks b=.
        h_names = names + list(_OVERSIGNED)
        headers = hashlib.sha256()
        for picked in _select(fields, h_names):
            headers.update(canonicalize_header(picked.raw, self.header_canon))
        return headers, b":".join(h_names)

    def _finish(
        self, headers: _Hash, h_value: bytes, body_hash: bytes, timestamp: int | None
    ) -> bytes:
        """Add each DKIM-Signature field itself, b= empty, to the header hash and sign.

        The fields are independent: none covers another (DKIM-Signature is not in
        SIGNED_HEADERS), so each verifies whatever order a receiver takes them in.
        """
        t = b"t=%d;" % (int(time.time()) if timestamp is None else timestamp)
        bh = base64.b64encode(body_hash)
        fields: list[bytes] = []
        for private, head in self._signing:
            unsigned = _fold_signature(head, t, h_value, bh)
            # RFC 6376 §3.7: the field with an empty b=, canonicalized, without its CRLF.
            state = headers.copy()
            state.update(canonicalize_header(unsigned, self.header_canon)[:-2])
            digest = state.digest()
            if isinstance(private, ed25519.Ed25519PrivateKey):
                raw = private.sign(digest)  # RFC 8463 §3: PureEdDSA over the SHA-256 hash
            else:
                raw = private.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
            fields.append(unsigned[:-2] + _fold_b64(base64.b64encode(raw)) + b"\r\n")
        return b"".join(fields)


class SigningTemplate:
    """What every copy of one personalized post shares, hashed once per post.

    The header section is the same in every copy, so the signed fields are
    canonicalized and hashed once; the body is the same up to the footer line
    that names the recipient, so its hash is taken up to the last line boundary
    before that and each copy `copy()`s the hashlib state and feeds only its own
    rest (relaxed canonicalization is line-local except at the end of the body,
    which lies in the rest). A message that does not start with the shared bytes
    is signed in full, so the result never depends on the caller being right.

    A copy whose header section differs (one-click lists: each List-Unsubscribe
    names its recipient) has its own header fields hashed, and still shares the
    body hash up to the same point when its body starts with the same bytes.
    """

    __slots__ = ("_body", "_body_prefix", "_h_value", "_headers", "_prefix", "signer")

    def __init__(
        self,
        signer: Signer,
        prefix: bytes,
        headers: _Hash,
        h_value: bytes,
        body: _Hash,
        body_start: int | None = None,
    ) -> None:
        self.signer = signer
        self._prefix = prefix
        self._headers = headers
        self._h_value = h_value
        self._body = body
        #: the shared start of the body (None: copies must share the header too)
        self._body_prefix = None if body_start is None else prefix[body_start:]

    @property
    def shared(self) -> int:
        """How many leading bytes of each copy were hashed once, for the whole post."""
        return len(self._prefix)

    def sign(self, message: bytes, *, timestamp: int | None = None) -> bytes:
        """The same bytes as ``signer.sign(message, timestamp=...)``, hashing only the rest."""
        return self.signature(message, timestamp=timestamp) + message

    def signature(self, message: bytes, *, timestamp: int | None = None) -> bytes:
        return self.signer.finish(self.hashes(message), timestamp=timestamp)

    def hashes(self, message: bytes) -> Hashes:
        """The same as ``signer.hashes(message)``, hashing only what follows the shared part."""
        signer = self.signer
        headers, h_value = self._headers, self._h_value
        if message.startswith(self._prefix):
            rest = message[len(self._prefix) :]
        else:
            end = message.find(b"\r\n\r\n")
            shared = self._body_prefix
            if (
                shared is None
                or end < 0
                or not message.startswith(shared, end + 4)
                or _has_bare_eol(message[: end + 4])
            ):
                return signer.hashes(message)
            fields, _ = _split_message(message[: end + 4])
            headers, h_value = signer._hash_headers(fields)
            rest = message[end + 4 + len(shared) :]
        rest = _crlf(rest)
        tail = canonicalize_body(rest, signer.body_canon)
        if tail in (b"", b"\r\n"):
            # Nothing but empty lines after the shared part: the end-of-body rule
            # would reach back into the part hashed already.
            return signer.hashes(message)
        body = self._body.copy()
        body.update(tail)
        return Hashes(headers, h_value, body.digest())


class Hashes(NamedTuple):
    """A message's signed header fields hashed (the state before any signature field
    is added: copy it, never update it), the h= they were picked by, and bh= raw."""

    headers: _Hash
    h_value: bytes
    body: bytes


class _Field(NamedTuple):
    name: bytes  # lower-cased, without trailing WSP
    raw: bytes  # the whole field as in the message, folding and CRLF included


def _split_message(message: bytes) -> tuple[list[_Field], bytes]:
    """The header fields and the body of a CRLF message (RFC 5322 §2.1, §2.2).

    A line that is neither a field nor a continuation is refused, as is a
    continuation with no field before it: what we cannot parse, we do not sign.
    """
    end = message.find(b"\r\n\r\n")
    if message.startswith(b"\r\n"):
        head, body = b"", message[2:]
    elif end < 0:
        head, body = message if message.endswith(b"\r\n") else message + b"\r\n", b""
    else:
        head, body = message[: end + 2], message[end + 4 :]
    fields: list[_Field] = []
    start = 0
    for line in head.split(b"\r\n")[:-1]:
        stop = start + len(line) + 2
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise InvalidInput(
                    "cannot DKIM-sign a message that starts with a continuation line"
                )
            last = fields[-1]
            fields[-1] = _Field(last.name, last.raw + head[start:stop])
        else:
            m = _FIELD_NAME.match(line)
            if m is None:
                raise InvalidInput(f"cannot DKIM-sign: not a header field: {line[:40]!r}")
            fields.append(_Field(m.group(1).lower(), head[start:stop]))
        start = stop
    return fields, body


def _select(fields: list[_Field], h_names: list[bytes]) -> list[_Field]:
    """The field each h= name stands for: the last one not yet taken (RFC 6376 §5.4.2)."""
    unused: dict[bytes, list[_Field]] = {}
    for one in fields:
        unused.setdefault(one.name, []).append(one)
    picked: list[_Field] = []
    for name in h_names:
        left = unused.get(name)
        if left:
            picked.append(left.pop())
    return picked


def canonicalize_header(field: bytes, method: Canonicalization) -> bytes:
    """One header field, ``Name: value`` with its folding and final CRLF (RFC 6376 §3.4.1-2).

    relaxed: lower-case name, no WSP around the colon, unfolded, WSP runs as one
    SP, none at the end of the value. Unlike dkimpy, only SP and HTAB count as
    WSP (a form feed or bare CR at the end of a value stays), as the RFC says and
    Mail::DKIM does.
    """
    if method == "simple":
        return field
    name, colon, value = field.partition(b":")
    if not colon:
        raise InvalidInput(f"not a header field: {field[:40]!r}")
    if value.endswith(b"\r\n"):
        value = value[:-2]
    value = value.replace(b"\r\n", b"")
    if b"\t" in value or b"  " in value:
        value = _WSP.sub(b" ", value)
    value = value.strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


def canonicalize_body(body: bytes, method: Canonicalization) -> bytes:
    """The body as hashed for bh= (RFC 6376 §3.4.3-4, with errata 3192's reading).

    simple: trailing empty lines become one CRLF; an empty body is CRLF.
    relaxed: WSP at the end of each line removed, WSP runs as one SP, trailing
    empty lines removed, a CRLF added to a non-empty body without one; an empty
    body stays empty. The last line counts as a line even without its CRLF: its
    trailing WSP goes too (dkimpy keeps it; SMTP clients add the CRLF, after which
    every verifier strips it).
    """
    if method == "relaxed":
        body = _relaxed_lines(body)
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    if end == 0:
        return b"" if method == "relaxed" else b"\r\n"
    return body[:end] + b"\r\n"


def _relaxed_lines(data: bytes) -> bytes:
    """The line-local part of relaxed body canonicalization (RFC 6376 §3.4.4 a).

    Each regex runs only when a (memchr-fast) search finds work for it: most
    bodies have neither trailing WSP nor tabs or double spaces.
    """
    if b" \r\n" in data or b"\t\r\n" in data or data.endswith((b" ", b"\t")):
        data = _WSP_AT_EOL.sub(b"", data)
    if b"\t" in data or b"  " in data:
        data = _WSP.sub(b" ", data)
    return data


def _crlf(message: bytes) -> bytes:
    """CRLF line endings: our SMTP client sends a bare LF or CR as CRLF, so that is
    what every verifier sees and what we must sign."""
    return _BARE_EOL.sub(b"\r\n", message) if _has_bare_eol(message) else message


def _has_bare_eol(data: bytes) -> bool:
    crlf = data.count(b"\r\n")
    return data.count(b"\n") != crlf or data.count(b"\r") != crlf


def _fold_signature(
    head: bytes, t: bytes, h_value: bytes, bh: bytes, name: bytes = b"DKIM-Signature"
) -> bytes:
    """``DKIM-Signature: ...; b=`` CRLF, folded so no line passes 76 characters.

    The tags that are the same for every message of a post come first (folded
    once, cached); t= and bh= share the next line, b= comes last on a line of its
    own, so removing its value (RFC 6376 §3.5) leaves exactly what was hashed
    whatever FWS a verifier takes with it.
    """
    return b"%s\r\n %s bh=%s;\r\n b=\r\n" % (_fold_fixed(head, h_value, name), t, bh)


@functools.lru_cache(maxsize=64)
def _fold_fixed(head: bytes, h_value: bytes, name: bytes = b"DKIM-Signature") -> bytes:
    """v= a= c= d= s= h=, folded: 50 µs a message before it was cached (one post's
    copies share one h=). `name`: the field (ARC-Message-Signature has the same tags)."""
    lines: list[bytes] = []
    line = name + b":"

    def put(atom: bytes, sep: bytes) -> None:
        nonlocal line
        if len(line) + len(sep) + len(atom) > _LINE:
            lines.append(line)
            line = b" " + atom
        else:
            line += sep + atom

    for tag in head.split(b" "):
        put(tag, b" ")
    names = h_value.split(b":")
    for i, entry in enumerate(names):
        # h= may fold around its colons (RFC 6376 §3.5: [FWS] ":" [FWS]).
        atom = (b"h=" if i == 0 else b"") + entry + (b";" if i == len(names) - 1 else b":")
        put(atom, b" " if i == 0 else b"")
    lines.append(line)
    return b"\r\n".join(lines)


def _fold_b64(value: bytes) -> bytes:
    """The b= value, continued on lines of 75 characters after the ``" b="`` line start."""
    first = _LINE - 3
    chunks = [value[:first]]
    chunks += [value[i : i + _LINE - 1] for i in range(first, len(value), _LINE - 1)]
    return b"\r\n ".join(chunks)


def quoted_strings(value: str) -> str:
    """`value` as zone-file quoted strings of at most 255 octets each (ASCII, no escapes needed)."""
    if not value.isascii() or '"' in value or "\\" in value:
        raise InvalidInput("a DKIM TXT value must be ASCII without quotes or backslashes")
    chunks = [value[i : i + _TXT_STRING_MAX] for i in range(0, len(value), _TXT_STRING_MAX)]
    return " ".join(f'"{chunk}"' for chunk in chunks or [""])


def check_domain(domain: str) -> str:
    """The lower-cased domain, or InvalidInput; it becomes a path component, so be strict."""
    lowered = domain.lower()
    labels = lowered.split(".")
    if (
        len(lowered) > 253
        or len(labels) < 2
        or not all(_DOMAIN_LABEL.fullmatch(label) for label in labels)
    ):
        raise InvalidInput(
            f"invalid DKIM domain {domain!r}: expected a domain name such as lists.example.org"
            " (internationalized names in their xn-- form)"
        )
    return lowered


def _is_domain(name: str) -> bool:
    try:
        return check_domain(name) == name
    except InvalidInput:
        return False


def _valid_selector(selector: str) -> bool:
    return bool(_SELECTOR.fullmatch(selector)) and all(
        0 < len(label) <= 63 for label in selector.split(".")
    )


def _load_signing_key(pem: bytes) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    """An RSA key as `_load_rsa` accepts it, or an Ed25519 key (RFC 8463)."""
    key = _load_private(pem)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    return _check_rsa(key)


@functools.lru_cache(maxsize=32)
def _load_private(pem: bytes) -> object:
    """The key in `pem`, parsed once per process: OpenSSL checks an RSA key as it
    loads it (about 50 ms for 2048 bits), and preparing a post read each key three
    or four times (signer, canonical form, selectors), 0.26 s before its first copy.
    Keyed by the bytes, so a rotated or replaced key is a new entry; key objects
    are immutable and safe to sign with from several threads."""
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ValueError("the private key is encrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a PEM private key") from None


def _load_rsa(pem: bytes) -> rsa.RSAPrivateKey:
    """Parse an unencrypted PEM RSA private key; ValueError says what is wrong."""
    return _check_rsa(_load_private(pem))


def _check_rsa(key: object) -> rsa.RSAPrivateKey:
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA key")
    if key.key_size < _MIN_BITS:
        raise ValueError(f"{key.key_size}-bit RSA key is too short (verifiers reject < 1024)")
    return key


def _key_algorithm(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> Algorithm:
    return "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"


def _selector_taken(domain_dir: Path, selector: str) -> bool:
    """A key file exists for `selector` in any case (DNS names ignore case)."""
    wanted = f"{selector}.pem".lower()
    try:
        return any(p.name.lower() == wanted for p in domain_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return False


def _canonical_pem(pem: bytes) -> bytes:
    """Re-encode as PKCS#8 PEM with LF line endings, one stored form whatever the source."""
    return _load_signing_key(pem).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _reason(e: BaseException) -> str:
    return (e.strerror if isinstance(e, OSError) else None) or str(e).splitlines()[0]


def _make_private_dir(path: Path) -> None:
    """Create `path` with mode 0700 (whatever the umask); leave an existing one alone."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return
    path.chmod(0o700)


def _write_temp(directory: Path, data: bytes) -> str:
    """Write `data` durably to a new 0600 temporary file in `directory`; return its path."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` atomically; FileExistsError if it exists (never replaces it)."""
    tmp = _write_temp(path.parent, data)
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    _fsync_dir(path.parent)


def _write_replace(path: Path, data: bytes) -> None:
    """Replace `path` atomically, so readers see the old or the new content, never half."""
    tmp = _write_temp(path.parent, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
