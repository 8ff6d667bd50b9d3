"""DNS look-ups through the resolver the configuration names.

`Resolver.from_settings(settings.dns)` builds one resolver for the process: the
``[dns] nameservers`` (``HOST`` or ``HOST:PORT``, IPv6 as ``[ADDR]:PORT``) or,
when that list is empty, the system's resolver configuration. Answers are cached
by dnspython's `LRUCache`, which keeps positive and negative answers for their
TTL (RFC 2308), so DKIM keys and DMARC records are not asked for per message.

Errors are mapped here and nowhere else: "no such name" and "no such record" are
answers (None); everything else a look-up can run into (timeouts, SERVFAIL, no
usable resolver configuration) is a `DnsError`, a temporary failure.
"""

from __future__ import annotations

import logging

import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TXT import TXT

from listserv.config import DnsSettings, parse_nameserver

log = logging.getLogger(__name__)


class DnsError(Exception):
    """A DNS look-up failed for a reason that may go away (timeout, SERVFAIL, no resolver)."""


class Resolver:
    """Thread-safe TXT, A, AAAA and MX look-ups with a TTL cache; see the module docstring."""

    def __init__(self, settings: DnsSettings) -> None:
        self.timeout = settings.timeout
        self._resolver: dns.resolver.Resolver | None
        self._problem = ""
        try:
            resolver = dns.resolver.Resolver(configure=not settings.nameservers)
        except dns.exception.DNSException as exc:  # no /etc/resolv.conf: every look-up fails
            self._resolver = None
            self._problem = f"no usable system resolver configuration: {exc}"
            log.warning("DNS: %s", self._problem)
            return
        if settings.nameservers:
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in settings.nameservers
            ]
        # lifetime bounds a whole look-up; each server gets its share, so a dead
        # first server leaves time to ask the next one.
        resolver.lifetime = settings.timeout
        resolver.timeout = settings.timeout / max(1, len(resolver.nameservers))
        if settings.cache_size > 0:
            resolver.cache = dns.resolver.LRUCache(settings.cache_size)
        self._resolver = resolver

    @classmethod
    def from_settings(cls, settings: DnsSettings) -> Resolver:
        return cls(settings)

    def txt(self, name: str) -> list[bytes] | None:
        """Each TXT record at `name` with its character-strings joined (RFC 6376 §3.6.2.2);
        None when the name or the record does not exist; DnsError when DNS failed."""
        answer = self._resolve(name, dns.rdatatype.TXT)
        if answer is None:
            return None
        return [b"".join(rdata.strings) for rdata in answer if isinstance(rdata, TXT)]

    def a(self, name: str) -> list[str] | None:
        """The IPv4 addresses of `name`; None when there are none; DnsError when DNS failed."""
        answer = self._resolve(name, dns.rdatatype.A)
        return None if answer is None else [rdata.to_text() for rdata in answer]

    def aaaa(self, name: str) -> list[str] | None:
        """The IPv6 addresses of `name`; None when there are none; DnsError when DNS failed."""
        answer = self._resolve(name, dns.rdatatype.AAAA)
        return None if answer is None else [rdata.to_text() for rdata in answer]

    def mx(self, name: str) -> list[tuple[int, str]] | None:
        """(preference, exchange without the final dot, lower case) of each MX record at
        `name`, lowest preference first, the root as "." (a null MX, RFC 7505); None when
        there are none; DnsError when DNS failed."""
        answer = self._resolve(name, dns.rdatatype.MX)
        if answer is None:
            return None
        found = [
            (int(rdata.preference), _host(rdata.exchange).lower())
            for rdata in answer
            if isinstance(rdata, MX)
        ]
        return sorted(found)

    def answer(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer (with its TTL) for any record type, e.g. "MX" or "PTR"; None when
        the name or the record does not exist; DnsError when DNS failed."""
        return self._resolve(name, dns.rdatatype.from_text(rdtype))

    def _resolve(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.resolver.Answer | None:
        if self._resolver is None:
            raise DnsError(self._problem)
        try:
            qname = dns.name.from_text(name)  # absolute: never the search list
        except (dns.exception.DNSException, UnicodeError):
            return None  # not a valid name, so nothing can be published there
        try:
            return self._resolver.resolve(qname, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.Timeout as exc:
            raise DnsError(f"{name}: timed out ({exc})") from exc
        except dns.resolver.NoNameservers as exc:  # SERVFAIL/REFUSED/unreachable from all
            raise DnsError(f"{name}: no server answered ({_first_line(exc)})") from exc
        except dns.exception.DNSException as exc:
            raise DnsError(f"{name}: {_first_line(exc)}") from exc


def _host(name: dns.name.Name) -> str:
    return "." if name == dns.name.root else name.to_text(omit_final_dot=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return text[0] if text else type(exc).__name__
