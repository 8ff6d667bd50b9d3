"""Our Authentication-Results header (RFC 8601) on every incoming post.

At intake, before the posting rules run, a post is checked once:
- DKIM: every signature, by `pipeline.auth` (the same code the moderation rules
  use for ``require_authenticated_sender``);
- SPF: the SMTP client's IP address against MAIL FROM's domain (HELO's for the
  null sender), by `pipeline.spf`; not for a loopback client, which is the MTA
  in front of us handing mail over (its own checks are what count);
- DMARC (RFC 7489 §4.2): the From: domain's policy (`distribute.dmarc`, the
  same cache the mitigation uses) and whether an aligned DKIM or SPF pass exists;
- ARC: the chain already on the message, when there is one (dkimpy).

Headers that claim our authserv-id are removed first (RFC 8601 §5: anyone can
write one), and one header with the results is put on top of the stored
message, so moderators see it, and so the ARC seal of the outgoing post
(`distribute.arc`) carries what we found.

Cost: dkimpy verifies in pure Python (RSA with e=65537 is cheap); DNS answers are
cached by TTL, so a known sender costs no look-up. SPF is bounded by the
``[dns] timeout`` in all, DKIM and DMARC look-ups each by it.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from email.message import EmailMessage

import dkim as dkimpy

from listserv import mail
from listserv.config import Settings
from listserv.distribute import dmarc
from listserv.dns import DnsError, Resolver
from listserv.pipeline import auth, spf

log = logging.getLogger(__name__)

_HEADER = b"authentication-results"
#: an authserv-id as MTAs write it: after optional comments, up to ';' or space
_AUTHSERV = re.compile(rb'\s*(?:\([^()]*\)\s*)*"?([^\s;()"]+)')
_TOKEN = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class Inbound:
    """What the intake check found, and the header it writes."""

    #: the header value, without "Authentication-Results:" and without CRLF
    value: str
    auth: auth.AuthResult
    spf: spf.SpfResult | None
    #: pass, fail or none (no policy); "" when there is no From: domain
    dmarc: str
    #: the From:/Sender: domains authenticated (aligned DKIM, trusted or our DMARC pass)
    domains: frozenset[str]


def authserv_id(settings: Settings) -> str:
    """Our authserv-id: [auth] authserv_id, else the server's host name."""
    return settings.auth.authserv_id or settings.server.hostname


def strip_forged(raw: bytes, authserv_id: str) -> bytes:
    """`raw` without the Authentication-Results fields that claim `authserv_id`; the
    rest of the bytes unchanged (the record stays what was sent, less the forgeries)."""
    end = _header_end(raw)
    if end <= 0 or _HEADER not in raw[:end].lower():
        return raw
    ours = authserv_id.lower().encode("ascii", "replace")
    kept: list[bytes] = []
    dropped = 0
    for field in _fields(raw[:end]):
        name, sep, value = field.partition(b":")
        if sep and name.strip().lower() == _HEADER:
            match = _AUTHSERV.match(value)
            if match is not None and match.group(1).lower() == ours:
                dropped += 1
                continue
        kept.append(field)
    if not dropped:
        return raw
    log.info("removed %d Authentication-Results header(s) claiming %s", dropped, authserv_id)
    return b"".join(kept) + raw[end:]


def _header_end(raw: bytes) -> int:
    """Where the header section ends (the blank line starts there); a message
    without a blank line is all header."""
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    ends = [i + 1 for i in (raw.find(b"\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    return min(ends) if ends else len(raw)


def _fields(head: bytes) -> list[bytes]:
    """The header fields of a header section, each with its continuation lines."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def prepend(raw: bytes, value: str) -> bytes:
    """`raw` with our header on top, where a receiving MTA puts its trace fields."""
    return b"Authentication-Results: " + _fold(value).encode("ascii") + b"\r\n" + raw


def _fold(value: str) -> str:
    """One result per line (RFC 8601 §2.2 allows folding after each ';')."""
    return ";\r\n\t".join(part.strip() for part in value.split(";"))


@functools.cache
def _policies(resolver: Resolver) -> dmarc.Policies:
    """The DMARC policies of an authenticator without its own (tests, the CLI)."""
    return dmarc.Policies(resolver)


def check(
    raw: bytes,
    msg: EmailMessage,
    *,
    authenticator: auth.Authenticator,
    peer: str,
    mail_from: str,
    helo: str = "",
) -> Inbound:
    """Authenticate one incoming post (DNS: in a thread); never raises."""
    settings = authenticator.settings
    resolver = authenticator.resolver
    policies = authenticator.policies or _policies(resolver)
    found = authenticator.check(raw, msg)
    spf_result: spf.SpfResult | None = None
    ip = spf.client_ip(peer)
    if settings.spf and ip is not None and not spf.is_local(ip):
        spf_result = spf.check(ip, mail_from, helo, resolver, timeout=resolver.timeout)
    dmarc_word, dmarc_note, header_from = _dmarc(msg, found, spf_result, policies)
    domains = set(found.domains)
    if dmarc_word == "pass" and header_from in found.candidates:
        domains.add(header_from)
    arc_word = _arc(raw, msg, resolver)
    parts = [authenticator.authserv_id]
    parts.extend(_dkim_part(sig) for sig in found.dkim)
    if not found.dkim:
        parts.append("dkim=none")
    if spf_result is not None:
        identity = "smtp.mailfrom" if spf_result.identity == "mailfrom" else "smtp.helo"
        domain = _token(spf_result.domain)
        parts.append(f"spf={spf_result.result}" + (f" {identity}={domain}" if domain else ""))
    if dmarc_word:
        note = f" ({dmarc_note})" if dmarc_note else ""
        parts.append(f"dmarc={dmarc_word}{note} header.from={header_from}")
    if arc_word:
        parts.append(f"arc={arc_word}")
    value = "; ".join(parts)
    level = logging.INFO if dmarc_word == "fail" else logging.DEBUG
    if log.isEnabledFor(level):  # the Message-ID is parsed only for a line written
        log.log(
            level,
            "inbound %s from %s: %s",
            mail.header(msg, "Message-ID") or "(no Message-ID)",
            peer or "unknown",
            value,
            extra={"event": "inbound_auth"},
        )
    return Inbound(value, found, spf_result, dmarc_word, frozenset(domains))


def _dkim_part(sig: auth.DkimResult) -> str:
    text = f"dkim={sig.result}"
    if sig.reason:
        text += f" ({_comment(sig.reason)})"
    if sig.domain:
        text += f" header.d={sig.domain}"
    if _TOKEN.fullmatch(sig.selector):
        text += f" header.s={sig.selector}"
    return text


def _dmarc(
    msg: EmailMessage,
    found: auth.AuthResult,
    spf_result: spf.SpfResult | None,
    policies: dmarc.Policies,
) -> tuple[str, str, str]:
    """(result, comment, header.from) for the first From: domain (RFC 7489 §6.6.1)."""
    domains = dmarc.from_domains(msg)
    if not domains or not _TOKEN.fullmatch(domains[0]):
        return "", "", ""
    header_from = domains[0]
    policy = policies.lookup(header_from)
    if policy is None:
        return "none", "", header_from
    dkim_ok = any(
        s.result == "pass" and s.domain and _aligned(s.domain, header_from, policy.adkim)
        for s in found.dkim
    )
    spf_ok = (
        spf_result is not None
        and spf_result.result == "pass"
        and spf_result.identity == "mailfrom"
        and _aligned(spf_result.domain, header_from, policy.aspf)
    )
    word = "pass" if dkim_ok or spf_ok else "fail"
    return word, f"p={policy.policy}", header_from


def _aligned(domain: str, header_from: str, mode: str) -> bool:
    if domain == header_from:
        return True
    return mode != "s" and auth.organizational_domain(domain) == auth.organizational_domain(
        header_from
    )


def _arc(raw: bytes, msg: EmailMessage, resolver: Resolver) -> str:
    """The chain's validation (pass, fail, none) when the post carries ARC sets, else ""."""
    if not any(name.lower() == "arc-seal" for name, _ in msg.raw_items()):
        return ""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        records = resolver.txt(name.decode("ascii", "replace"))
        return records[0] if records else None

    try:
        cv, _results, reason = dkimpy.arc_verify(
            raw, dnsfunc=dnsfunc, logger=logging.getLogger("listserv.auth.dkimpy")
        )
    except DnsError:
        return "temperror"
    except Exception as exc:  # dkimpy on a chain it cannot read
        log.info("ARC not checked: %s", exc)
        return "fail"
    word = cv.decode("ascii", "replace").lower() if isinstance(cv, bytes) else str(cv).lower()
    if word != "pass":
        log.info("ARC chain %s: %s", word, reason)
    return word if word in ("pass", "fail", "none") else "fail"


def _token(value: str) -> str:
    return value if _TOKEN.fullmatch(value) else ""


def _comment(text: str) -> str:
    """Free text made safe inside an RFC 5322 comment."""
    cleaned = "".join(
        c if c.isprintable() and c.isascii() and c not in "()\\;" else " " for c in text
    )
    return " ".join(cleaned.split())[:100]
