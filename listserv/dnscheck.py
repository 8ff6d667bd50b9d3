"""`listserv dns check DOMAIN`: does DNS publish what a list domain's mail needs?

One `Check` per question, each pass, warn or fail with a one-line detail and,
when something is missing or wrong, the zone-file line to publish:

- **mx**: mail for NAME@DOMAIN reaches a host (the ``[dns] mx_hosts`` when set).
- **spf**: the SPF record of DOMAIN (the envelope domain of NAME-bounces@DOMAIN)
  passes the addresses list mail leaves from (``[dns] outbound_ips``, else the
  smarthost's when it is public) and includes ``[dns] spf_include`` when set;
  evaluated as RFC 7208's check_host() does, includes and redirect followed
  within its limit of 10 look-ups.
- **dkim SELECTOR**: per key we hold for DOMAIN, the record at
  SELECTOR._domainkey.DOMAIN carries our public key. An active key must be
  published; a pending one only before `dkim rotate --activate`; a retired one
  while the mail it signed may still be in flight.
- **dmarc**: a DMARC record applies to DOMAIN (its own or its organizational
  domain's), and its policy.
- **alignment**: the munged From (NAME@DOMAIN), the DKIM d= and the envelope
  domain are all DOMAIN, so DMARC passes for our own mail when DKIM (or SPF) does.

DNS errors make a check fail with the reason: a check that could not be made is
not a pass. Everything goes through `listserv.dns.Resolver`, so the configured
nameservers answer (in tests, tests/dnsserver.py on 127.0.0.1).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal, TypeVar

from cryptography.hazmat.primitives import serialization

from listserv.config import Settings
from listserv.distribute import dkim
from listserv.dns import DnsError, Resolver
from listserv.errors import ListservError
from listserv.pipeline.auth import organizational_domain

Status = Literal["pass", "warn", "fail"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_T = TypeVar("_T")

#: RFC 7208 §4.6.4: at most 10 mechanisms and modifiers that look DNS up, and
#: at most 2 of those look-ups may find nothing ("void").
SPF_LOOKUP_LIMIT = 10
SPF_VOID_LIMIT = 2
#: A retired key's record stays published this long after the in-flight window
#: (`[delivery] retry_give_up_after`): receivers may verify a little late.
KEEP_MARGIN = timedelta(days=2)


@dataclass(frozen=True)
class Check:
    """One row of the report; `publish` is the zone-file line(s) that would fix it."""

    name: str
    status: Status
    detail: str
    publish: tuple[str, ...] = ()


def failed(checks: Iterable[Check]) -> bool:
    return any(c.status == "fail" for c in checks)


def check_domain(
    settings: Settings, resolver: Resolver, domain: str, *, now: datetime
) -> list[Check]:
    """Every check for list domain `domain`, in report order."""
    domain = dkim.check_domain(domain.rstrip("."))
    checks = [check_mx(resolver, domain, settings.dns.mx_hosts)]
    ips, source = outbound_networks(settings, resolver)
    spf = check_spf(resolver, domain, ips, settings.dns.spf_include, source=source)
    checks.append(spf)
    keep = timedelta(seconds=settings.delivery.retry_give_up_after) + KEEP_MARGIN
    dkim_checks = check_dkim(resolver, settings.keys_dir, domain, now=now, keep=keep)
    checks.extend(dkim_checks)
    checks.append(check_dmarc(resolver, domain))
    checks.append(check_alignment(domain, spf, dkim_checks))
    return checks


# --- MX -------------------------------------------------------------------------------


def check_mx(resolver: Resolver, domain: str, expected: Sequence[str]) -> Check:
    """Mail for the lists must reach us: an MX (or, failing that, an address) at `domain`."""
    wanted = [h.strip().rstrip(".").lower() for h in expected if h.strip()]
    fix = tuple(f"{domain}. IN MX {10 * (i + 1)} {h}." for i, h in enumerate(wanted))
    try:
        records = resolver.mx(domain)
        if records is None:
            addresses = resolver.a(domain) or resolver.aaaa(domain)
    except DnsError as exc:
        return Check("mx", "fail", f"DNS error: {exc}")
    if records is None:
        if addresses:
            return Check(
                "mx",
                "warn" if not wanted else "fail",
                f"no MX record: mail for {domain} goes to its address {addresses[0]}"
                " (RFC 5321 §5.1 fallback)",
                fix or (f"{domain}. IN MX 10 <this server's host name>.",),
            )
        return Check("mx", "fail", f"no MX record and no address: mail to {domain} bounces", fix)
    hosts = [host for _, host in records]
    shown = ", ".join(f"{pref} {host}" for pref, host in records)
    if any(host in ("", ".") for host in hosts):
        return Check("mx", "fail", f"null MX (RFC 7505): {domain} accepts no mail", fix)
    if wanted:
        ours = [h for h in hosts if h in wanted]
        if not ours:
            return Check("mx", "fail", f"MX names {shown}; expected {', '.join(wanted)}", fix)
        others = [h for h in hosts if h not in wanted]
        if others:
            return Check(
                "mx",
                "warn",
                f"MX {shown}: {', '.join(others)} is not in [dns] mx_hosts"
                " (it must relay list mail to us)",
            )
    return Check("mx", "pass", f"MX {shown}")


# --- SPF ------------------------------------------------------------------------------


def outbound_networks(settings: Settings, resolver: Resolver) -> tuple[list[IPNetwork], str]:
    """The addresses list mail leaves from, and where that came from (for the report)."""
    if settings.dns.outbound_ips:
        nets = [ipaddress.ip_network(v.strip(), strict=False) for v in settings.dns.outbound_ips]
        return nets, "[dns] outbound_ips"
    host = settings.delivery.host.strip().strip("[]")
    try:
        addresses: list[str] = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = (resolver.a(host) or []) + (resolver.aaaa(host) or [])
        except DnsError:
            addresses = []
    public = [ipaddress.ip_network(a) for a in addresses if ipaddress.ip_address(a).is_global]
    return public, f"the smarthost {host}"


def check_spf(
    resolver: Resolver,
    domain: str,
    ips: Sequence[IPNetwork],
    include: str = "",
    *,
    source: str = "[dns] outbound_ips",
) -> Check:
    """SPF for NAME-bounces@`domain`: pass for each outbound address, `include` reached."""
    include = include.strip().rstrip(".").lower()
    try:
        records = _spf_records(resolver.txt(domain))
    except DnsError as exc:
        return Check("spf", "fail", f"DNS error: {exc}")
    if not records:
        return Check(
            "spf", "fail", f"no SPF record at {domain}", _spf_fix(domain, "", ips, include)
        )
    if len(records) > 1:
        return Check(
            "spf",
            "fail",
            f"{len(records)} SPF records at {domain} (RFC 7208 §4.5: permerror); keep one",
        )
    record = records[0]
    if not ips and not include:
        return Check(
            "spf",
            "warn",
            f"{record!r} found, but where list mail leaves from is not known"
            f" ({source} is not a public address): set [dns] outbound_ips or spf_include",
        )
    problems: list[str] = []
    for net in ips:
        for ip in dict.fromkeys([net.network_address, net.broadcast_address]):
            result, why = SpfCheck(resolver, ip, f"bounces@{domain}").check_host(domain)
            if result != "pass":
                problems.append(f"{ip} gets {result} ({why})")
    if include and include not in spf_includes(resolver, domain):
        problems.append(f"does not include {include}")
    if problems:
        return Check(
            "spf",
            "fail",
            f"{record!r}: " + "; ".join(problems),
            _spf_fix(domain, record, ips, include),
        )
    passed = ", ".join(str(n) for n in ips) or "-"
    extra = f", includes {include}" if include else ""
    return Check("spf", "pass", f"{record!r} passes {passed} (from {source}){extra}")


def _spf_records(txts: list[bytes] | None) -> list[str]:
    """The SPF records among TXT values (RFC 7208 §4.5: "v=spf1" then a space or the end)."""
    found = []
    for value in txts or []:
        text = value.decode("ascii", "replace")
        if text.lower() == "v=spf1" or text.lower().startswith("v=spf1 "):
            found.append(" ".join(text.split()))
    return found


def _spf_fix(domain: str, record: str, ips: Sequence[IPNetwork], include: str) -> tuple[str, ...]:
    """`record` with the missing terms added before its all/redirect (or a new record)."""
    terms = record.split()[1:] if record else []
    have = {t.lower().lstrip("+") for t in terms}
    missing = [
        f"ip{net.version}:{net.with_prefixlen if net.num_addresses > 1 else net.network_address}"
        for net in ips
    ]
    missing = [m for m in missing if m.lower() not in have]
    if include and f"include:{include}" not in have:
        missing.append(f"include:{include}")
    if not missing and not terms:
        missing = [f"ip4:<the address list mail leaves {domain} from>"]
    tail = [
        t for t in terms if t.lower().lstrip("+-~?") == "all" or t.lower().startswith("redirect=")
    ]
    head = [t for t in terms if t not in tail]
    value = " ".join(["v=spf1", *head, *missing, *(tail or ["~all"])])
    return (f"{domain}. IN TXT {dkim.quoted_strings(value)}",)


class _SpfAbort(Exception):
    """check_host() ends with this result (permerror or temperror) and reason."""

    def __init__(self, result: str, why: str) -> None:
        super().__init__(why)
        self.result = result
        self.why = why


_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MODIFIER = re.compile(r"([a-z][a-z0-9_.-]*)=(.*)", re.IGNORECASE)
_DUAL_CIDR = re.compile(r"(?P<target>[^/]*)(?:/(?P<v4>\d+))?(?://(?P<v6>\d+))?")
_MACRO = re.compile(r"%\{([slodiphcrtv])(\d*)(r?)([.\-+,/_=]*)\}|%%|%_|%-", re.IGNORECASE)


class SpfCheck:
    """RFC 7208 check_host() for one address and sender, through our resolver.

    Everything but ptr (deprecated, §5.5; counted, never matches) and the exp=
    explanation is evaluated. One instance counts the look-ups of one evaluation.
    """

    def __init__(self, resolver: Resolver, ip: IPAddress, sender: str) -> None:
        self.resolver = resolver
        self.ip = ip
        self.sender = sender
        self.lookups = 0
        self.voids = 0

    def check_host(self, domain: str) -> tuple[str, str]:
        """(pass|fail|softfail|neutral|none|permerror|temperror, why)."""
        try:
            return self._check(domain)
        except _SpfAbort as stop:
            return stop.result, stop.why

    def _check(self, domain: str) -> tuple[str, str]:
        records = _spf_records(self._dns(lambda: self.resolver.txt(domain), void=False))
        if not records:
            return "none", f"no SPF record at {domain}"
        if len(records) > 1:
            raise _SpfAbort("permerror", f"{len(records)} SPF records at {domain}")
        redirect: str | None = None
        for term in records[0].split()[1:]:
            modifier = _MODIFIER.fullmatch(term)
            if modifier:
                if modifier.group(1).lower() == "redirect":
                    redirect = modifier.group(2)
                continue
            qualifier = term[0] if term[0] in _QUALIFIERS else "+"
            mechanism = term[1:] if term[0] in _QUALIFIERS else term
            if self._matches(mechanism, domain):
                return _QUALIFIERS[qualifier], f"{term} at {domain}"
        if redirect is not None:
            target = self._expand(redirect, domain)
            self._count(f"redirect={target}")
            result, why = self._check(target)
            if result == "none":
                raise _SpfAbort("permerror", f"redirect to {target}, which has no SPF record")
            return result, why
        return "neutral", f"nothing matched at {domain}"

    def _matches(self, mechanism: str, domain: str) -> bool:
        name, _, arg = mechanism.partition(":")
        name = name.lower()
        if name == "all" and not arg:
            return True
        if name in ("ip4", "ip6"):
            try:
                return self.ip in ipaddress.ip_network(arg, strict=False)
            except ValueError:
                raise _SpfAbort("permerror", f"bad {mechanism} at {domain}") from None
        if name == "include":
            target = self._expand(arg, domain)
            self._count(mechanism)
            result, why = self._check(target)
            if result in ("none", "permerror"):
                raise _SpfAbort("permerror", f"include:{target}: {why}")
            if result == "temperror":
                raise _SpfAbort("temperror", why)
            return result == "pass"
        if name == "exists":
            self._count(mechanism)
            target = self._expand(arg, domain)
            return bool(self._dns(lambda: self.resolver.a(target)))
        if name == "ptr" or name.startswith("ptr/"):
            self._count(mechanism)
            return False
        base = re.match(r"(a|mx)(?=$|[:/])", mechanism, re.IGNORECASE)
        if base is None:
            raise _SpfAbort("permerror", f"unknown mechanism {mechanism!r} at {domain}")
        kind = base.group(1).lower()
        rest = mechanism[len(kind) :]
        spec = _DUAL_CIDR.fullmatch(rest[1:] if rest.startswith(":") else rest)
        if spec is None or (rest and not rest.startswith((":", "/"))):
            raise _SpfAbort("permerror", f"bad {mechanism} at {domain}")
        target = self._expand(spec.group("target"), domain) if spec.group("target") else domain
        prefix = spec.group("v4") if self.ip.version == 4 else spec.group("v6")
        if prefix is not None and int(prefix) > self.ip.max_prefixlen:
            raise _SpfAbort("permerror", f"bad prefix length in {mechanism} at {domain}")
        self._count(mechanism)
        if kind == "a":
            hosts = [target]
        else:
            exchanges = self._dns(lambda: self.resolver.mx(target)) or []
            if len(exchanges) > SPF_LOOKUP_LIMIT:
                raise _SpfAbort("permerror", f"{target} has more than 10 MX records")
            hosts = [host for _, host in exchanges]
        return any(self._in(host, prefix) for host in hosts)

    def _in(self, host: str, prefix: str | None) -> bool:
        """`self.ip` is within /prefix of one of `host`'s addresses of its IP version."""
        look = self.resolver.a if self.ip.version == 4 else self.resolver.aaaa
        bits = int(prefix) if prefix is not None else self.ip.max_prefixlen
        for address in self._dns(lambda: look(host)) or []:
            if self.ip in ipaddress.ip_network(f"{address}/{bits}", strict=False):
                return True
        return False

    def _count(self, term: str) -> None:
        self.lookups += 1
        if self.lookups > SPF_LOOKUP_LIMIT:
            raise _SpfAbort("permerror", f"more than 10 DNS look-ups (at {term})")

    def _dns(self, ask: Callable[[], list[_T] | None], *, void: bool = True) -> list[_T] | None:
        try:
            found = ask()
        except DnsError as exc:
            raise _SpfAbort("temperror", f"DNS error: {exc}") from exc
        if not found and void:
            self.voids += 1
            if self.voids > SPF_VOID_LIMIT:
                raise _SpfAbort("permerror", "more than 2 look-ups found nothing")
        return found

    def _expand(self, spec: str, domain: str) -> str:
        """Macros (RFC 7208 §7) in a domain-spec; the result without a final dot."""
        local, _, sender_domain = self.sender.rpartition("@")
        if self.ip.version == 4:
            ip_text, v = str(self.ip), "in-addr"
        else:
            ip_text, v = ".".join(self.ip.exploded.replace(":", "")), "ip6"
        values = {
            "s": self.sender,
            "l": local or "postmaster",
            "o": sender_domain,
            "d": domain,
            "i": ip_text,
            "p": "unknown",
            "v": v,
            "h": sender_domain,
        }

        def one(m: re.Match[str]) -> str:
            text = m.group(0)
            if text in ("%%", "%_", "%-"):
                return {"%%": "%", "%_": " ", "%-": "%20"}[text]
            value = values.get(m.group(1).lower(), "")
            parts = re.split("[" + re.escape(m.group(4) or ".") + "]", value)
            if m.group(3):
                parts.reverse()
            if m.group(2):
                parts = parts[-int(m.group(2)) :] if int(m.group(2)) else parts
            return ".".join(parts)

        return _MACRO.sub(one, spec).rstrip(".").lower()


def spf_includes(resolver: Resolver, domain: str) -> set[str]:
    """Every domain reached from `domain`'s SPF record through include: and redirect=
    (without macros), within the RFC's 10 look-ups."""
    seen: set[str] = set()
    todo = [domain]
    while todo and len(seen) < SPF_LOOKUP_LIMIT:
        current = todo.pop(0)
        try:
            records = _spf_records(resolver.txt(current))
        except DnsError:
            continue
        for term in records[0].split()[1:] if len(records) == 1 else []:
            lowered = term.lower().lstrip("+-~?")
            for lead in ("include:", "redirect="):
                if lowered.startswith(lead) and "%" not in lowered:
                    target = lowered[len(lead) :].rstrip(".")
                    if target not in seen:
                        seen.add(target)
                        todo.append(target)
    return seen


# --- DKIM -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """What DNS says about one of our keys: `matches` True only when p= is our public key."""

    matches: bool
    detail: str


def key_published(resolver: Resolver, key: dkim.SigningKey) -> Published:
    """Whether SELECTOR._domainkey.DOMAIN publishes `key`'s public key; raises DnsError."""
    name = key.dns_name()
    records = resolver.txt(name)
    if not records:
        return Published(False, f"no record at {name}")
    if len(records) > 1:
        return Published(False, f"{len(records)} TXT records at {name}; verifiers use one")
    tags = _tags(records[0].decode("ascii", "replace"))
    if tags.get("v", "DKIM1") != "DKIM1":
        return Published(False, f"{name} is not a DKIM key record (v={tags['v']})")
    if "p" not in tags:
        return Published(False, f"{name} has no p= tag")
    p = re.sub(r"\s+", "", tags["p"])
    if not p:
        return Published(False, f"{name} has an empty p=: the key is revoked (RFC 6376 §3.6.1)")
    algorithm = tags.get("k", "rsa").lower()
    if algorithm != key.algorithm:
        return Published(False, f"{name} publishes a k={algorithm} key; ours is {key.algorithm}")
    try:
        published = base64.b64decode(p, validate=True)
    except (binascii.Error, ValueError):
        return Published(False, f"{name}: p= is not base64")
    if not _same_public_key(published, key):
        return Published(False, f"{name} publishes another key than ours")
    return Published(True, f"{name} publishes our {key.algorithm} key")


def _same_public_key(published: bytes, key: dkim.SigningKey) -> bool:
    ours = key.public_bytes()
    if published == ours or key.algorithm == "ed25519":
        return published == ours
    try:  # the same key in another DER form still verifies
        loaded = serialization.load_der_public_key(published)
    except (ValueError, TypeError):
        return False
    der = loaded.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der == ours


def _tags(value: str) -> dict[str, str]:
    """A tag=value list (RFC 6376 §3.2); later duplicates are ignored."""
    tags: dict[str, str] = {}
    for part in value.split(";"):
        name, sep, text = part.partition("=")
        if sep and name.strip():
            tags.setdefault(name.strip(), text.strip())
    return tags


def check_dkim(
    resolver: Resolver, keys_dir: Path, domain: str, *, now: datetime, keep: timedelta
) -> list[Check]:
    """One check per key we hold for `domain`; a failure when there is none at all."""
    try:
        infos = dkim.list_keys(keys_dir, domain)
    except ListservError as exc:
        return [Check("dkim", "fail", str(exc))]
    if not infos:
        return [
            Check(
                "dkim",
                "fail",
                f"no DKIM key for {domain}: its mail goes out unsigned"
                f" (`listserv dkim keygen {domain} --selector SEL`)",
            )
        ]
    checks = []
    for info in infos:
        name = f"dkim {info.selector or '?'}"
        if info.problem is not None or info.selector is None:
            status: Status = "fail" if info.active else "warn"
            checks.append(Check(name, status, f"{info.state or 'key'}: {info.problem}"))
            continue
        try:
            key = dkim.find_key(keys_dir, domain, info.selector)
            published = key_published(resolver, key)
        except (DnsError, ListservError) as exc:
            checks.append(Check(name, "fail", f"{info.state}: {exc}"))
            continue
        checks.append(_dkim_status(name, info, key, published, now, keep))
    return checks


def _dkim_status(
    name: str,
    info: dkim.KeyInfo,
    key: dkim.SigningKey,
    published: Published,
    now: datetime,
    keep: timedelta,
) -> Check:
    fix = (key.dns_record(),)
    label = f"{info.state} {info.algorithm}"
    if info.state == "active":
        if published.matches:
            return Check(name, "pass", f"{label}: {published.detail}")
        return Check(name, "fail", f"{label}, signing now: {published.detail}", fix)
    if info.state == "pending":
        if published.matches:
            return Check(
                name,
                "pass",
                f"{label}: {published.detail}; start signing with"
                f" `listserv dkim rotate {key.domain} --activate`",
            )
        return Check(
            name,
            "warn",
            f"{label}: {published.detail}; publish it before activating",
            fix,
        )
    until = (info.retired_at + keep) if info.retired_at is not None else None
    in_flight = until is None or now < until
    when = f" until {until:%Y-%m-%d %H:%M} UTC" if until is not None else ""
    if published.matches:
        tail = (
            f"keep it published{when} (mail it signed may be in flight)"
            if in_flight
            else "its record may now be removed"
        )
        return Check(name, "pass", f"{label}: {published.detail}; {tail}")
    if in_flight:
        return Check(
            name,
            "warn",
            f"{label}: {published.detail}; mail it signed may still be in flight{when}",
            fix,
        )
    return Check(name, "pass", f"{label}: no longer published, as it may be")


# --- DMARC ----------------------------------------------------------------------------


def check_dmarc(resolver: Resolver, domain: str) -> Check:
    """The DMARC record that applies to `domain` (RFC 7489 §6.6.3: its own, else the
    organizational domain's, whose sp= then governs)."""
    fix = (f'_dmarc.{domain}. IN TXT "v=DMARC1; p=none"',)
    org = organizational_domain(domain)
    try:
        for where in dict.fromkeys([domain, org]):
            records = [
                r.decode("ascii", "replace")
                for r in resolver.txt(f"_dmarc.{where}") or []
                if r[:8].lower() == b"v=dmarc1"
            ]
            if records:
                break
    except DnsError as exc:
        return Check("dmarc", "fail", f"DNS error: {exc}")
    if not records:
        return Check(
            "dmarc",
            "fail",
            f"no DMARC record at _dmarc.{domain}"
            + (f" or _dmarc.{org}" if org != domain else "")
            + " (the large mailbox providers require one of bulk senders)",
            fix,
        )
    if len(records) > 1:
        return Check("dmarc", "fail", f"{len(records)} DMARC records at _dmarc.{where}; keep one")
    tags = _tags(records[0])
    first = records[0].split(";", 1)[0].replace(" ", "")
    policy = tags.get("sp", tags.get("p", "")) if where != domain else tags.get("p", "")
    policy = policy.lower()
    if first != "v=DMARC1" or policy not in ("none", "quarantine", "reject"):
        return Check("dmarc", "fail", f"_dmarc.{where}: not a valid DMARC record: {records[0]!r}")
    inherited = f" (inherited from {where})" if where != domain else ""
    note = "; monitoring only" if policy == "none" else ""
    return Check("dmarc", "pass", f"p={policy} at _dmarc.{where}{inherited}{note}")


# --- alignment ------------------------------------------------------------------------


def check_alignment(domain: str, spf: Check, dkim_checks: Sequence[Check]) -> Check:
    """Our identifiers are all `domain`: DMARC passes for our mail when DKIM or SPF does.

    The list's From (munged posts, notices) is NAME@DOMAIN, the signature's d= is
    the list domain (keys are per list domain) and the envelope is NAME-bounces@DOMAIN,
    so both are aligned under strict and relaxed modes alike. DKIM is what matters:
    SPF breaks at the first forwarder.
    """
    same = f"From NAME@{domain}, DKIM d={domain}, envelope NAME-bounces@{domain}: aligned"
    active = [c for c in dkim_checks if c.detail.startswith("active")]
    dkim_ok = bool(active) and all(c.status == "pass" for c in active)
    spf_ok = spf.status == "pass"
    if dkim_ok:
        how = "DKIM and SPF" if spf_ok else "DKIM"
        return Check("alignment", "pass", f"{same}; DMARC passes through {how}")
    if spf_ok:
        return Check(
            "alignment",
            "warn",
            f"{same}; DMARC passes through SPF only, which forwarding breaks: fix DKIM",
        )
    return Check("alignment", "fail", f"{same}; but neither DKIM nor SPF passes, so DMARC fails")
