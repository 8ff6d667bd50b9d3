"""SPF (RFC 7208) for the SMTP client of an incoming post, with pyspf.

pyspf (``pyspf`` on PyPI, module ``spf``, by the dkimpy/authres maintainers,
packaged in Debian) evaluates the record: mechanisms, macros, the 10-look-up and
2-void-look-up limits. It looks names up through one module-level function,
``spf.DNSLookup``, which by default asks the system's resolver with the
deprecated ``dns.resolver.query``. We install our own function there once, at
import: it answers through the `Resolver` of the check running in this thread
(a thread-local, set by `check`), so SPF uses the configured ``[dns]``
nameservers and their cache, and a DNS failure is pyspf's ``TempError``
(``temperror``). A thread that calls pyspf without `check` gets pyspf's own
function, as before.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import spf

from listserv.dns import DnsError, Resolver

log = logging.getLogger(__name__)

#: pyspf's result words, as RFC 8601 writes them
RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"})

_current = threading.local()
_pyspf_lookup: Callable[..., Any] = spf.DNSLookup


@dataclass(frozen=True, slots=True)
class SpfResult:
    #: one of RESULTS
    result: str
    #: the domain checked (MAIL FROM's, or HELO's for the null sender)
    domain: str
    #: "mailfrom" or "helo" (RFC 8601 smtp.mailfrom / smtp.helo)
    identity: str
    explanation: str = ""


def _lookup(name: str, qtype: str, strict: Any = True, timeout: float = 30) -> list[Any]:
    """pyspf's DNSLookup contract: [((name, qtype), value), ...], [] for no data."""
    resolver: Resolver | None = getattr(_current, "resolver", None)
    if resolver is None:
        return list(_pyspf_lookup(name, qtype, strict, timeout))
    try:
        answer = resolver.answer(name, qtype)
    except DnsError as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    if answer is None:
        return []
    found: list[Any] = []
    for rdata in answer:
        value: Any
        if qtype in ("A", "AAAA"):
            value = rdata.address
        elif qtype == "MX":
            value = (rdata.preference, rdata.exchange)
        elif qtype == "PTR":
            value = rdata.target.to_text(True)
        elif qtype in ("TXT", "SPF"):
            value = rdata.strings
        else:
            continue
        found.append(((name, qtype), value))
    return found


spf.DNSLookup = _lookup


def client_ip(peer: str) -> str | None:
    """The IP address of an intake peer string (``ADDR:PORT``, ``ADDR``), or None."""
    text = peer.strip()
    for candidate in (text.rpartition(":")[0], text):
        try:
            return str(ipaddress.ip_address(candidate.strip("[]")))
        except ValueError:
            continue
    return None


def is_local(ip: str) -> bool:
    """Loopback: an MTA on this host handed the mail over; SPF of that hop means nothing."""
    return ipaddress.ip_address(ip).is_loopback


def check(ip: str, mail_from: str, helo: str, resolver: Resolver, *, timeout: float) -> SpfResult:
    """SPF for `ip` sending as `mail_from` (or as postmaster@`helo` for the null sender),
    bounded to about `timeout` seconds in all; never raises."""
    identity = "mailfrom" if mail_from else "helo"
    domain = (mail_from.rpartition("@")[2] if mail_from else helo).strip().rstrip(".").lower()
    if not domain:
        return SpfResult("none", "", identity, "no domain to check")
    _current.resolver = resolver
    try:
        query = spf.query(i=ip, s=mail_from, h=helo or domain, querytime=timeout)
        result, _code, explanation = query.check()
    except Exception as exc:  # pyspf on input it did not expect: a result, not a crash
        log.info("SPF %s for %s: not checked: %s", domain, ip, exc)
        return SpfResult("temperror", domain, identity, str(exc)[:200])
    finally:
        _current.resolver = None
    word = str(result).lower()
    return SpfResult(word if word in RESULTS else "permerror", domain, identity, str(explanation))
