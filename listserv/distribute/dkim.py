"""DKIM keys on disk and signing of outgoing list mail.

Layout: ``<keys_dir>/<domain>/<selector>.pem`` (PKCS#8 PEM, mode 0600, directories
0700) and ``<keys_dir>/<domain>/active``, one line naming the selector in use. The
signer reads ``active`` per post, so switching keys needs no restart.

A new key always gets a new selector and an old selector is never reused: mail
signed with the old key may still be in flight, so its public key has to stay
published in DNS until that mail has been delivered. For the same reason a new
key does not sign anything until it is activated (its record must be published
first); only a domain's first key is active at once.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from listserv.errors import ConfigError, InvalidInput, NotFound

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
_SIGNED = frozenset(SIGNED_HEADERS)

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

_SELECTOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DOMAIN_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# The same header-name rule dkimpy's own parser uses, so we count what it will sign.
_HEADER_NAME = re.compile(rb"([\x21-\x7e]+?):")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True)
class SigningKey:
    """One domain's DKIM key. The PEM is left out of repr() so it never reaches a log."""

    domain: str
    selector: str
    private_pem: bytes = field(repr=False)

    def public_txt(self) -> str:
        """The DNS TXT record value: ``v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>``."""
        try:
            key = _load_rsa(self.private_pem)
        except ValueError as e:
            raise InvalidInput(f"DKIM key {self.selector} for {self.domain}: {e}") from e
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"

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
        return f"{self.dns_name()}. IN TXT {_quoted_strings(self.public_txt())}"


@dataclass(frozen=True)
class KeyInfo:
    """One row of `list_keys`: a key on disk, or a problem with a domain's key files.

    `problem` is None for a usable key; `bits` is None when the key cannot be read.
    """

    domain: str
    selector: str | None
    bits: int | None
    active: bool
    problem: str | None = None


def generate_key(
    keys_dir: Path, domain: str, selector: str, bits: int = 2048, *, activate: bool = False
) -> SigningKey:
    """Create a new RSA key for `domain` under a new `selector`.

    The domain's first key becomes active at once; a later one only with
    `activate` (or `activate_key` later), because mail signed before its DNS
    record is published fails DKIM everywhere. The PEM appears complete or not
    at all (written to a temporary file, then hard-linked into place), and the
    link refuses to replace an existing selector even when two of these run at once.
    """
    domain = _check_domain(domain)
    if not _valid_selector(selector):
        raise InvalidInput(
            f"invalid DKIM selector {selector!r}: use letters, digits, '-', '_' and '.'"
            " (starting with a letter or digit, no empty or >63-character labels)"
        )
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in KEY_SIZES:
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
        if any(p.name.lower() == pem_path.name.lower() for p in domain_dir.iterdir()):
            raise InvalidInput(taken)
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            _write_new(pem_path, pem)
        except FileExistsError:
            raise InvalidInput(taken) from None
        active = domain_dir / ACTIVE_FILE
        line = f"{selector}\n".encode("ascii")
        if activate:
            _write_replace(active, line)
        else:
            # Linked into place, never replaced: of two first keys made at once, one wins.
            with contextlib.suppress(FileExistsError):
                _write_new(active, line)
    except OSError as e:
        raise ConfigError(f"cannot write DKIM key under {domain_dir}: {e.strerror or e}") from e
    return SigningKey(domain=domain, selector=selector, private_pem=pem)


def activate_key(keys_dir: Path, domain: str, selector: str) -> SigningKey:
    """Make an existing, usable key the one `domain`'s mail is signed with.

    The selector is matched case-insensitively, as DNS does. Unknown selectors are
    NotFound and unusable keys ConfigError, so a typo never stops the signing.
    """
    domain = _check_domain(domain)
    if not _valid_selector(selector):
        raise InvalidInput(f"invalid DKIM selector {selector!r}")
    domain_dir = keys_dir / domain
    wanted = f"{selector}.pem".lower()
    try:
        found = [
            p
            for p in domain_dir.iterdir()
            if p.name.lower() == wanted and _valid_selector(p.stem)  # not "\u212a.pem" for "k"
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
    try:
        _write_replace(domain_dir / ACTIVE_FILE, f"{pem_path.stem}\n".encode("ascii"))
    except OSError as e:
        raise ConfigError(f"cannot write {domain_dir / ACTIVE_FILE}: {_reason(e)}") from e
    return SigningKey(domain=domain, selector=pem_path.stem, private_pem=pem)


def active_selector(keys_dir: Path, domain: str) -> str | None:
    """The selector `domain`'s `active` file names, or None when there is no such file."""
    domain = _check_domain(domain)
    active = keys_dir / domain / ACTIVE_FILE
    try:
        return active.read_text(encoding="ascii").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{active}: cannot read the active DKIM selector: {_reason(e)}") from e


def list_keys(keys_dir: Path, domain: str | None = None) -> list[KeyInfo]:
    """Every key under keys_dir (or one domain's), sorted; broken files become rows, not errors."""
    if domain is not None:
        domains = [_check_domain(domain)]
    else:
        try:
            entries = sorted(p.name for p in keys_dir.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        except OSError as e:
            raise ConfigError(f"{keys_dir}: cannot list DKIM keys: {_reason(e)}") from e
        domains = [name for name in entries if _is_domain(name)]
    return [info for name in domains for info in _domain_keys(keys_dir / name, name)]


def active_key(keys_dir: Path, domain: str) -> SigningKey | None:
    """The key to sign `domain`'s mail with, or None when none is configured.

    A configured but broken key is a ConfigError rather than None: silently
    sending unsigned mail would fail DMARC at the receivers instead of here.
    """
    domain = _check_domain(domain)
    active = keys_dir / domain / ACTIVE_FILE
    selector = active_selector(keys_dir, domain)
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
    except ValueError as e:
        raise ConfigError(f"{pem_path}: not a usable DKIM key: {e}") from e
    return SigningKey(domain=domain, selector=selector, private_pem=pem)


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
    active = domain_dir / ACTIVE_FILE
    try:
        current: str | None = active.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        current = None
    except (OSError, UnicodeDecodeError) as e:
        current = None
        rows.append(KeyInfo(domain, None, None, False, f"cannot read {active}: {_reason(e)}"))
    for pem_path in pems:
        bits: int | None = None
        problem: str | None = None
        if not _valid_selector(pem_path.stem):
            problem = "not a valid selector name"
        try:
            bits = _load_rsa(pem_path.read_bytes()).key_size
        except OSError as e:
            problem = f"cannot read: {_reason(e)}"
        except ValueError as e:
            problem = f"not a usable key: {e}"
        rows.append(KeyInfo(domain, pem_path.stem, bits, pem_path.stem == current, problem))
    if current is not None and current not in {p.stem for p in pems}:
        shown = current[:64] if current.isprintable() else repr(current[:64])
        problem = (
            f"{active} names {shown!r} but {shown}.pem does not exist"
            if _valid_selector(current)
            else f"{active} does not name a valid selector"
        )
        rows.append(KeyInfo(domain, shown or None, None, True, problem))
    return rows


class Signer:
    """Signs messages for one key; safe to call from worker threads.

    Each sign() call builds its own dkimpy state and the Signer holds only
    immutable bytes, hence thread-safe. dkimpy offers no way to keep a parsed key
    between calls, so the PEM is parsed per message (a small part of the cost).
    Its RSA arithmetic is pure Python and holds the GIL: threads give no signing
    parallelism, processes do.
    """

    def __init__(self, key: SigningKey) -> None:
        # Checked here, so a bad hand-made SigningKey fails once rather than per message;
        # a CRLF or PKCS#1 PEM, which dkimpy's parser may reject, is re-encoded instead.
        domain = _check_domain(key.domain)
        if not _valid_selector(key.selector):
            raise InvalidInput(f"invalid DKIM selector {key.selector!r}")
        try:
            pem = _canonical_pem(key.private_pem)
        except ValueError as e:
            raise InvalidInput(f"DKIM key {key.selector} for {key.domain}: {e}") from e
        self.key = key
        self._pem = pem
        self._domain = domain.encode("ascii")
        self._selector = key.selector.encode("ascii")

    def sign(self, message: bytes) -> bytes:
        """Return ``DKIM-Signature: ...\\r\\n`` + `message` (relaxed/relaxed, rsa-sha256).

        Pass the final wire bytes (e.g. from ``listserv.mail.to_bytes``) with CRLF
        line endings and do not re-serialize afterwards with another policy.
        h= lists each SIGNED_HEADERS field once per occurrence in the message,
        and each OVERSIGNED_HEADERS field once more (RFC 6376 §8.15).
        """
        present = _signed_fields(message)
        if b"from" not in present:
            raise InvalidInput("cannot DKIM-sign a message without a From header")
        # One null entry per OVERSIGNED name: dkimpy (select_headers) and other
        # verifiers match h= names to fields from the bottom up and hash nothing
        # for an entry left without a field, so a field added later fills it.
        include = present + list(_OVERSIGNED)
        try:
            signature: bytes = dkim.sign(
                message,
                self._selector,
                self._domain,
                self._pem,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=include,
                linesep=b"\r\n",
            )
        except dkim.DKIMException as e:
            raise InvalidInput(f"cannot DKIM-sign this message: {e}") from e
        return signature + message


def _signed_fields(message: bytes) -> list[bytes]:
    """The lower-cased names of the SIGNED_HEADERS fields in `message`, in order, repeats kept."""
    if message[:1] in (b" ", b"\t"):
        raise InvalidInput("cannot DKIM-sign a message that starts with a continuation line")
    end = _BLANK_LINE.search(message)  # split only the header section, not a large body
    names: list[bytes] = []
    for line in re.split(rb"\r?\n", message if end is None else message[: end.start()]):
        if not line:
            break
        m = _HEADER_NAME.match(line)
        if m is not None and m.group(1).decode("ascii").lower() in _SIGNED:
            names.append(m.group(1).lower())
    return names


def _quoted_strings(value: str) -> str:
    """`value` as zone-file quoted strings of at most 255 octets each (ASCII, no escapes needed)."""
    if not value.isascii() or '"' in value or "\\" in value:
        raise InvalidInput("a DKIM TXT value must be ASCII without quotes or backslashes")
    chunks = [value[i : i + _TXT_STRING_MAX] for i in range(0, len(value), _TXT_STRING_MAX)]
    return " ".join(f'"{chunk}"' for chunk in chunks or [""])


def _check_domain(domain: str) -> str:
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
        return _check_domain(name) == name
    except InvalidInput:
        return False


def _valid_selector(selector: str) -> bool:
    return bool(_SELECTOR.fullmatch(selector)) and all(
        0 < len(label) <= 63 for label in selector.split(".")
    )


def _load_rsa(pem: bytes) -> rsa.RSAPrivateKey:
    """Parse an unencrypted PEM RSA private key; ValueError says what is wrong."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ValueError("the private key is encrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA key")
    if key.key_size < _MIN_BITS:
        raise ValueError(f"{key.key_size}-bit RSA key is too short (verifiers reject < 1024)")
    return key


def _canonical_pem(pem: bytes) -> bytes:
    """Re-encode as PKCS#8 PEM with LF line endings, the form dkimpy's own parser accepts."""
    return _load_rsa(pem).private_bytes(
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
