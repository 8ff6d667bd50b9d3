"""DMARC mitigation: posts whose author's domain would reject or junk them as the list sends them.

A list re-signs every post with its own domain (d= the list domain) and changes
the body (footer) and headers, so the author's signature breaks. When the From:
domain publishes ``p=reject`` or ``p=quarantine`` (RFC 7489), the receiver then
finds no aligned pass and rejects or junks the post. Per list, such a post gets
either its From: rewritten to the list (``munge_from``: ``"Jane Doe via staff"
<staff@lists.example.edu>``, Jane's address in Reply-To or Cc so replies still
reach her) or is wrapped whole as a ``message/rfc822`` attachment of a message
from the list (``wrap_message``). Either way the From: domain is the list's, and
the list's DKIM signature is aligned with it.

The decision is made once per post when it is prepared (`decide`, in the
scheduler's thread: DNS never runs on the event loop), and the rewritten message
is what is stored and retried, so every attempt sends the same thing. The action
taken is also kept in the post's rendering values (``dmarc_action``).

The policy is looked up at ``_dmarc.<From domain>`` and, when there is none, at
the organizational domain (by the public suffix list, as `pipeline.auth` does),
whose ``sp=`` applies to subdomains (RFC 7489 §6.6.3). Answers are kept with
their TTL in a bounded cache; DNS errors count as "no policy" (the post goes out
as it is, which is what a receiver whose look-up failed would do too) and are
logged, and kept a minute so a dead resolver costs one timeout a minute, not one
per post.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import getaddresses

from dns.rdtypes.ANY.TXT import TXT

from listserv import addresses, mail
from listserv.config import DmarcSettings, DnsSettings
from listserv.dns import DnsError, Resolver
from listserv.errors import InvalidAddress
from listserv.models import DmarcMitigateWhen, DmarcMitigation, OriginalFromIn
from listserv.pipeline.auth import organizational_domain

log = logging.getLogger("listserv.dmarc")

#: seconds an absent record is believed (dnspython's answer for NXDOMAIN/NODATA
#: carries no TTL through our resolver; RFC 2308's usual SOA minimum)
NEGATIVE_TTL = 300.0
#: seconds a DNS failure stands for "no policy" before the next try
ERROR_TTL = 60.0
#: longest a record is kept, whatever its TTL says
MAX_TTL = 86400.0


@dataclass(frozen=True, slots=True)
class Policy:
    """The DMARC policy that applies to one author domain."""

    #: the domain whose record applies (the author's or its organizational domain)
    record_domain: str
    #: none, quarantine or reject (sp= when the record is the organizational domain's)
    policy: str
    #: DKIM alignment mode: r (relaxed) or s (strict)
    adkim: str = "r"
    #: SPF alignment mode
    aspf: str = "r"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one post, and why (for the log)."""

    action: DmarcMitigation
    reason: str = ""


def parse_record(text: str) -> dict[str, str] | None:
    """The tags of a DMARC record (``v=DMARC1; p=reject; ...``), or None when it is not one.

    RFC 7489 §6.3: v=DMARC1 must come first; a record without a valid p= is
    treated as none, which `Policies` does by leaving it out.
    """
    if text.split(";", 1)[0].replace(" ", "").lower() != "v=dmarc1":
        return None
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:  # anything else between semicolons is ignored, as receivers do
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


class Policies:
    """DMARC policy look-ups through our resolver, cached by name for their TTL.

    Thread-safe: the scheduler and intake threads share one per process.
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        size: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resolver = resolver
        self.size = size
        self.clock = clock
        self._lock = threading.Lock()
        #: "_dmarc.NAME" -> (tags or None, expires at clock())
        self._cache: OrderedDict[str, tuple[dict[str, str] | None, float]] = OrderedDict()

    def lookup(self, domain: str) -> Policy | None:
        """The policy for mail from `domain` (lower-case A-label), None when none applies."""
        domain = domain.rstrip(".").lower()
        tags = self._record(domain)
        record_domain = domain
        subdomain = False
        if tags is None:
            org = organizational_domain(domain)
            if org == domain:
                return None
            tags = self._record(org)
            record_domain, subdomain = org, True
            if tags is None:
                return None
        policy = tags.get("p", "").lower()
        if subdomain and tags.get("sp", "").lower() in ("none", "quarantine", "reject"):
            policy = tags["sp"].lower()
        if policy not in ("none", "quarantine", "reject"):
            return None
        return Policy(
            record_domain=record_domain,
            policy=policy,
            adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
            aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
        )

    def _record(self, domain: str) -> dict[str, str] | None:
        name = f"_dmarc.{domain}"
        now = self.clock()
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached[1] > now:
                self._cache.move_to_end(name)
                return cached[0]
        tags, ttl = self._fetch(name)
        if self.size > 0:
            with self._lock:
                self._cache[name] = (tags, now + ttl)
                self._cache.move_to_end(name)
                while len(self._cache) > self.size:
                    self._cache.popitem(last=False)
        return tags

    def _fetch(self, name: str) -> tuple[dict[str, str] | None, float]:
        try:
            answer = self.resolver.answer(name, "TXT")
        except DnsError as exc:
            log.warning("DMARC: %s: DNS failed, taken as no policy: %s", name, exc)
            return None, ERROR_TTL
        if answer is None:
            return None, NEGATIVE_TTL
        ttl = float(min(answer.rrset.ttl if answer.rrset is not None else NEGATIVE_TTL, MAX_TTL))
        records = [
            b"".join(r.strings).decode("utf-8", "replace") for r in answer if isinstance(r, TXT)
        ]
        found = [tags for tags in map(parse_record, records) if tags is not None]
        if len(found) != 1:  # RFC 7489 §6.6.3: none, or more than one, is no policy
            return None, ttl
        return found[0], ttl


@functools.cache
def policies_for(dns: DnsSettings, dmarc: DmarcSettings) -> Policies:
    """One `Policies` (and its cache) per process and configuration."""
    return Policies(Resolver.from_settings(dns), size=dmarc.cache_size)


def _aligned(ours: str, theirs: str, mode: str) -> bool:
    """RFC 7489 §3.1.1: strict is the same domain, relaxed the same organizational domain."""
    if ours == theirs:
        return True
    return mode != "s" and organizational_domain(ours) == organizational_domain(theirs)


def _own(domain: str, own_domains: Iterable[str]) -> bool:
    for own in own_domains:
        own = own.strip().rstrip(".").lower()
        if own and (domain == own or domain.endswith("." + own)):
            return True
    return False


def from_domains(msg: EmailMessage) -> list[str]:
    """The From: domains as lower-case A-labels (one per distinct domain)."""
    found: dict[str, None] = {}
    for address in mail.addresses(msg, "From"):
        try:
            found[addresses.normalize(address).rpartition("@")[2]] = None
        except InvalidAddress:
            domain = address.rpartition("@")[2].strip().rstrip(">").lower()
            if domain:
                found[domain] = None
    return list(found)


def decide(
    domains: Sequence[str],
    *,
    list_domain: str,
    mitigation: DmarcMitigation,
    when: DmarcMitigateWhen,
    own_domains: Iterable[str],
    policies: Policies,
    signed: bool,
) -> Decision:
    """Whether the post from `domains` must be munged or wrapped to pass DMARC.

    `signed`: the list signs with a key for `list_domain`. A domain whose policy
    our signature satisfies (aligned under its adkim=) needs nothing, and so does
    one of the site's own domains aligned with the list (asked without DNS).
    """
    if mitigation is DmarcMitigation.NONE or not domains:
        return Decision(DmarcMitigation.NONE)
    own = tuple(own_domains)
    for domain in domains:
        if signed and _own(domain, own) and _aligned(list_domain, domain, "r"):
            continue
        if when is DmarcMitigateWhen.ALWAYS:
            return Decision(mitigation, "the list rewrites every post")
        policy = policies.lookup(domain)
        if policy is None or policy.policy == "none":
            continue
        if signed and _aligned(list_domain, domain, policy.adkim):
            continue  # our own signature passes their DMARC
        return Decision(
            mitigation, f"{domain} publishes p={policy.policy} (at {policy.record_domain})"
        )
    return Decision(DmarcMitigation.NONE)


def apply(
    msg: EmailMessage,
    action: DmarcMitigation,
    *,
    list_name: str,
    list_address: str,
    original_from_in: OriginalFromIn,
) -> EmailMessage:
    """The message as the list sends it: `msg` itself (changed in place) or a new one."""
    if action is DmarcMitigation.MUNGE_FROM:
        munge_from(
            msg, list_name=list_name, list_address=list_address, original_from_in=original_from_in
        )
        return msg
    if action is DmarcMitigation.WRAP_MESSAGE:
        return wrap_message(
            msg, list_name=list_name, list_address=list_address, original_from_in=original_from_in
        )
    return msg


def munge_from(
    msg: EmailMessage, *, list_name: str, list_address: str, original_from_in: OriginalFromIn
) -> None:
    """From: becomes ``"<author> via <list>" <list address>``; the original From: goes to
    Reply-To (unless the author set one) or is added to Cc."""
    original = _raw(msg, "From")
    if original is None:
        return
    _set_address(msg, "From", _via(msg, list_name), list_address)
    _keep_author(msg, msg, original, original_from_in)


def wrap_message(
    msg: EmailMessage, *, list_name: str, list_address: str, original_from_in: OriginalFromIn
) -> EmailMessage:
    """A message from the list carrying the post, untouched, as message/rfc822: its
    own signatures still verify for a reader who opens it."""
    original = _raw(msg, "From")
    outer = EmailMessage(policy=mail.POLICY)
    for name in ("Date", "Subject", "To", "Cc", "Message-ID", "In-Reply-To", "References"):
        value = _raw(msg, name)
        if value is not None:
            outer.set_raw(name, value)
    _set_address(outer, "From", _via(msg, list_name), list_address)
    if original is not None:
        _keep_author(outer, msg, original, original_from_in)
    outer.set_content(
        f"The message from {_author(msg) or 'the sender'} is attached as it was sent.\n"
        "Its domain's DMARC policy would have it rejected or junked\n"
        "as the list forwards it.\n"
    )
    outer.add_attachment(msg)
    return outer


def _keep_author(
    target: EmailMessage, source: EmailMessage, original: str, where: OriginalFromIn
) -> None:
    if where is OriginalFromIn.CC:
        cc = _raw(target, "Cc")
        del target["Cc"]
        target.set_raw("Cc", original if cc is None else f"{cc},\r\n {original}")
        return
    reply_to = _raw(source, "Reply-To")
    del target["Reply-To"]
    target.set_raw("Reply-To", original if reply_to is None else reply_to)


def _raw(msg: EmailMessage, name: str) -> str | None:
    for key, value in msg.raw_items():
        if key.lower() == name.lower():
            return str(value)
    return None


def _author(msg: EmailMessage) -> str:
    """The author's display name, else address, from the first From: mailbox."""
    value = mail.header(msg, "From") or ""
    for name, address in getaddresses([value]):
        if name.strip() or address.strip():
            return " ".join((name or address).split())
    return ""


def _via(msg: EmailMessage, list_name: str) -> str:
    author = _author(msg)
    # the display name must not hold controls or look like an address of its own
    author = "".join(c for c in author if c.isprintable()).replace("@", " at ")[:120]
    return f"{author} via {list_name}" if author else list_name


def _set_address(msg: EmailMessage, name: str, display: str, address: str) -> None:
    """Set `name` in its final wire form: a non-ASCII display name becomes an RFC 2047
    encoded-word, so the message does not need SMTPUTF8 for it (as decorate does)."""
    local, _, domain = address.rpartition("@")
    header = mail.POLICY.header_factory(
        name, Address(display_name=display, username=local, domain=domain)
    )
    folded = header.fold(policy=mail.POLICY)
    del msg[name]
    msg.set_raw(name, folded.split(":", 1)[1].strip())
