"""Which of a post's From:/Sender: domains are authenticated, for the moderation rules.

A domain counts as authenticated when
- a DKIM signature on the message verifies and its d= is aligned with the
  domain under DMARC's relaxed alignment (RFC 7489 §3.1.1: the same
  organizational domain), or
- an Authentication-Results header (RFC 8601) written by an MTA we trust
  (``[auth] trusted_authserv_ids``) says ``dmarc=pass`` for ``header.from`` that
  domain. Headers from any other authserv-id are ignored: anyone can write one.
  The trusted MTA must delete incoming headers that carry its own id (RFC 8601 §5).

Checking is CPU (RSA, body hashes) and DNS work: call `check` in a thread. It
never raises on what the sender controls: malformed signatures or headers and
DNS failures are "not authenticated", reported in the result and logged as one
INFO line per message. dkimpy's, authres' and our resolver's errors are mapped
to results here and nowhere else.

Organizational domains come from `publicsuffixlist`: it ships the Public Suffix
List inside the package (its version carries the list's date, released every few
weeks), needs no download at run time and has no dependencies. `publicsuffix2`
was last released in 2019, so its list is years old; `tldextract` fetches the
list over HTTP unless told not to and pulls in requests and filelock.

Authentication-Results are parsed by `authres` (by dkimpy's maintainer, packaged
in Debian): it handles comments, several results, the optional version and case
as RFC 8601 §2.2 describes; it has not needed a release since 2019.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

import authres
import dkim
import dkim.util
import dns.exception
import dns.name
from publicsuffixlist import PublicSuffixList

from listserv import addresses, mail
from listserv.config import AuthSettings, Settings
from listserv.dns import DnsError, Resolver
from listserv.errors import InvalidAddress

if TYPE_CHECKING:
    from listserv.distribute.dmarc import Policies

log = logging.getLogger(__name__)

#: Signatures verified per message at most: each may cost a DNS look-up of up to
#: [dns] timeout, and a sender can add as many as he likes. Aligned ones go first.
MAX_SIGNATURES = 5

#: A result line for moderators is at most this long (it quotes what senders wrote).
_SUMMARY_MAX = 1000


class _DkimpyLog(logging.LoggerAdapter[logging.Logger]):
    """dkimpy logs a bad or missing key at ERROR and returns False: here that is a
    result, so its messages are kept as the reason and logged at DEBUG only."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("listserv.auth.dkimpy"), {})
        self.errors: list[str] = []

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.WARNING:
            self.errors.append(str(msg) % args if args else str(msg))
        super().log(logging.DEBUG, msg, *args, **kwargs)


@dataclass(frozen=True, slots=True)
class DkimResult:
    """One DKIM-Signature: `result` is an RFC 8601 word (pass, fail, temperror, permerror)."""

    domain: str
    selector: str
    result: str
    reason: str = ""
    aligned: bool = False


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """A dmarc= result from a trusted Authentication-Results header."""

    authserv_id: str
    result: str
    header_from: str


@dataclass(frozen=True, slots=True)
class AuthResult:
    """What `check` found: the authenticated domains and the evidence, for moderators."""

    #: From:/Sender: domains (lower-case A-labels) that are authenticated
    domains: frozenset[str]
    #: the From:/Sender: domains that were checked
    candidates: tuple[str, ...] = ()
    dkim: tuple[DkimResult, ...] = ()
    dmarc: tuple[DmarcResult, ...] = ()
    #: authserv-ids of Authentication-Results headers that were ignored
    untrusted: tuple[str, ...] = ()
    #: other things worth telling (unparsable headers, signatures not checked)
    notes: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        return results_summary(self)


def authenticated_domains(
    raw: bytes, msg: EmailMessage, *, settings: AuthSettings, resolver: Resolver
) -> frozenset[str]:
    """The From:/Sender: domains that DKIM (aligned) or a trusted DMARC pass vouches for."""
    return check(raw, msg, settings=settings, resolver=resolver).domains


def results_summary(result: AuthResult) -> str:
    """One line for moderators, e.g. ``dkim=pass d=example.org; dkim=fail d=evil.example
    (body hash mismatch); authenticated: example.org``."""
    parts: list[str] = []
    for sig in result.dkim:
        text = f"dkim={sig.result} d={sig.domain or '?'}"
        notes = [sig.reason] if sig.reason else []
        if sig.result == "pass" and not sig.aligned:
            notes.append("not aligned with From/Sender")
        parts.append(f"{text} ({'; '.join(notes)})" if notes else text)
    if not result.dkim:
        parts.append("dkim=none")
    for d in result.dmarc:
        parts.append(f"dmarc={d.result} header.from={d.header_from or '?'} (by {d.authserv_id})")
    if result.untrusted:
        parts.append(f"ignored Authentication-Results from {', '.join(result.untrusted)}")
    parts.extend(result.notes)
    parts.append(f"authenticated: {', '.join(sorted(result.domains)) or 'none'}")
    line = "".join(c if c.isprintable() else "?" for c in "; ".join(parts))
    return line if len(line) <= _SUMMARY_MAX else line[: _SUMMARY_MAX - 3] + "..."


def check(
    raw: bytes, msg: EmailMessage, *, settings: AuthSettings, resolver: Resolver
) -> AuthResult:
    """Verify DKIM signatures and read trusted Authentication-Results; never raises."""
    try:
        return _check(raw, msg, settings=settings, resolver=resolver)
    except Exception as exc:  # a bug here must not turn a post into a 451 loop
        log.warning("auth: not checked: %s", _reason(exc), exc_info=True)
        return AuthResult(domains=frozenset(), notes=(f"not checked: {_reason(exc)}",))


def _check(
    raw: bytes, msg: EmailMessage, *, settings: AuthSettings, resolver: Resolver
) -> AuthResult:
    candidates = _candidate_domains(msg)
    sigs, notes = _verify_dkim(raw, candidates, resolver)
    dmarc, untrusted, ar_notes = _trusted_dmarc(msg, settings)
    domains = {
        c
        for c in candidates
        for s in sigs
        if s.result == "pass" and s.aligned and _aligned(s.domain, c)
    }
    domains |= {d.header_from for d in dmarc if d.result == "pass" and d.header_from in candidates}
    result = AuthResult(
        domains=frozenset(domains),
        candidates=candidates,
        dkim=tuple(sigs),
        dmarc=tuple(dmarc),
        untrusted=tuple(untrusted),
        notes=tuple(notes + ar_notes),
    )
    failed = any(s.result != "pass" for s in sigs) or untrusted or result.notes
    log.log(
        logging.INFO if failed else logging.DEBUG,
        "auth %s: %s",
        mail.header(msg, "Message-ID") or "(no Message-ID)",
        result.summary(),
        extra={"event": "sender_auth"},
    )
    return result


def organizational_domain(domain: str) -> str:
    """The registrable domain (RFC 7489 §3.2) of a lower-case A-label domain; a public
    suffix itself, or a name the list cannot place, is its own organizational domain."""
    return _psl().privatesuffix(domain) or domain


_PSL: list[PublicSuffixList] = []
_PSL_LOADING = threading.Lock()


def _psl() -> PublicSuffixList:
    """Loaded once (~40 ms alone); ICANN and private sections, so user1.github.io and
    user2.github.io are two organizations, as RFC 7489 §3.2 intends.

    Under a lock: with functools.cache, the first posts' intake threads each parsed
    the list at once, about 15 of them holding the interpreter lock in turn, and
    every SMTP session of the process stalled for over half a second (issue 15).
    `Authenticator.from_settings` loads it before the first session."""
    if not _PSL:
        with _PSL_LOADING:
            if not _PSL:
                _PSL.append(PublicSuffixList())
    return _PSL[0]


def _aligned(signer: str, author: str) -> bool:
    """Relaxed alignment (RFC 7489 §3.1.1): one organizational domain."""
    return signer == author or organizational_domain(signer) == organizational_domain(author)


def _candidate_domains(msg: EmailMessage) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for name in ("From", "Sender"):
        for address in mail.addresses(msg, name):
            try:
                found[addresses.normalize(address).rpartition("@")[2]] = None
            except InvalidAddress:
                continue
    return tuple(found)


def _domain(value: str | bytes) -> str:
    """A d= or header.from= value as a lower-case A-label domain, or "" when it is none."""
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else value
        text = text.strip().rpartition("@")[2].rstrip(".").lower()
        if not text or not all(text.split(".")):
            return ""
        return str(dns.name.from_unicode(text).to_text(omit_final_dot=True)).lower()
    except (UnicodeError, dns.exception.DNSException):
        return ""


def _verify_dkim(
    raw: bytes, candidates: Iterable[str], resolver: Resolver
) -> tuple[list[DkimResult], list[str]]:
    try:
        verifier = dkim.DKIM(raw, logger=_DkimpyLog(), minkey=1024)
    except Exception as exc:  # dkimpy's parser on a message it cannot split
        return [], [f"DKIM not checked: {_reason(exc)}"]
    wanted = tuple(candidates)
    signatures: list[tuple[int, str, str, bool, bytes]] = []
    bad: list[DkimResult] = []
    index = 0
    for name, value in verifier.headers:
        if name.lower() != b"dkim-signature":
            continue
        try:
            tags = dkim.util.parse_tag_value(value)
        except Exception as exc:
            bad.append(DkimResult("", "", "permerror", f"unparsable signature: {_reason(exc)}"))
            index += 1
            continue
        domain = _domain(tags.get(b"d", b""))
        selector = tags.get(b"s", b"").decode("ascii", "replace")
        aligned = bool(domain) and any(_aligned(domain, c) for c in wanted)
        signatures.append((index, domain, selector, aligned, tags.get(b"h", b"")))
        index += 1
    signatures.sort(key=lambda s: not s[3])  # aligned first (stable)
    results = list(bad)
    notes: list[str] = []
    if len(signatures) > MAX_SIGNATURES:
        notes.append(f"{len(signatures) - MAX_SIGNATURES} more DKIM signatures not checked")
    for idx, domain, selector, aligned, signed in signatures[:MAX_SIGNATURES]:
        results.append(_verify_one(verifier, idx, domain, selector, aligned, signed, resolver))
    return results, notes


def _verify_one(
    verifier: dkim.DKIM,
    idx: int,
    domain: str,
    selector: str,
    aligned: bool,
    signed: bytes,
    resolver: Resolver,
) -> DkimResult:
    def result(word: str, reason: str = "") -> DkimResult:
        return DkimResult(domain, selector, word, reason, aligned)

    # RFC 6376 §5.4: From must be signed; a signature that leaves it out vouches for
    # nothing about the author, whoever wrote it.
    if b"from" not in (h.strip().lower() for h in signed.split(b":")):
        return result("permerror", "From not signed")
    lookups: MutableMapping[str, bool] = {}

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        qname = name.decode("ascii", "replace")
        records = resolver.txt(qname)
        lookups[qname] = bool(records)
        if not records:
            return None
        # RFC 6376 §3.6.2.2: one key record per selector; prefer one that says it is DKIM.
        return next((r for r in records if r.startswith(b"v=DKIM1")), records[0])

    recorder = verifier.logger = _DkimpyLog()
    try:
        ok = verifier.verify(idx, dnsfunc=dnsfunc)
    except DnsError as exc:
        return result("temperror", f"DNS: {exc}")
    except dkim.DKIMException as exc:
        return result("fail" if "body hash" in str(exc) else "permerror", _reason(exc))
    except Exception as exc:  # dkimpy on input it did not expect: still only a result
        return result("permerror", f"unverifiable: {_reason(exc)}")
    if ok:
        return result("pass")
    missing = [name for name, found in lookups.items() if not found]
    if missing:
        return result("permerror", f"no key at {missing[0].rstrip('.')}")
    if recorder.errors:  # a key dkimpy could not use (revoked, malformed, too short)
        return result("permerror", _reason(Exception(recorder.errors[0])))
    return result("fail", "signature does not verify")


def _trusted_dmarc(
    msg: EmailMessage, settings: AuthSettings
) -> tuple[list[DmarcResult], list[str], list[str]]:
    trusted = {i.lower() for i in settings.trusted_authserv_ids}
    found: list[DmarcResult] = []
    untrusted: list[str] = []
    notes: list[str] = []
    for name, value in msg.raw_items():
        if name.lower() != "authentication-results":
            continue
        text = mail.text(str(value)).replace("\r", "").replace("\n", "")
        try:
            header: Any = authres.AuthenticationResultsHeader.parse_value(text)
            authserv_id = str(header.authserv_id).lower()
            results = [(str(r.method).lower(), str(r.result).lower(), r) for r in header.results]
        except Exception as exc:  # authres.AuthResError and whatever odd input provokes
            notes.append(f"unparsable Authentication-Results ({_reason(exc)})")
            continue
        if authserv_id not in trusted:
            untrusted.append(authserv_id[:80])
            continue
        for method, word, res in results:
            if method != "dmarc":
                continue
            header_from = ""
            for prop in res.properties:
                if str(prop.type).lower() == "header" and str(prop.name).lower() == "from":
                    header_from = _domain(str(prop.value))
            found.append(DmarcResult(authserv_id, word, header_from))
    return found, untrusted, notes


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


class Authenticator:
    """The site's authentication settings and resolver, made once per process.

    Thread-safe (the resolver has its own lock and cache); callers run it in a
    thread, outside any database transaction: a DNS timeout must not hold a lock.
    """

    def __init__(
        self,
        settings: AuthSettings,
        resolver: Resolver,
        *,
        authserv_id: str = "",
        policies: Policies | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        #: ours in the Authentication-Results header of incoming posts (pipeline.authresults)
        self.authserv_id = authserv_id or settings.authserv_id or "localhost"
        #: DMARC policies, shared with the mitigation of outgoing posts
        self.policies = policies

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        # imported here: distribute.dmarc uses this module's organizational_domain
        from listserv.distribute import dmarc

        policies = dmarc.policies_for(settings.dns, settings.dmarc)
        _psl()  # now, not in the first sessions
        return cls(
            settings.auth,
            policies.resolver,
            authserv_id=settings.auth.authserv_id or settings.server.hostname,
            policies=policies,
        )

    def check(self, raw: bytes, msg: EmailMessage) -> AuthResult:
        return check(raw, msg, settings=self.settings, resolver=self.resolver)

    def domains(self, raw: bytes, msg: EmailMessage) -> frozenset[str]:
        return self.check(raw, msg).domains
