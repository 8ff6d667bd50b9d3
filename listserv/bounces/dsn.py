"""Our own reader of RFC 3464 delivery status notifications, the one standard bounce format.

A DSN is ``multipart/report; report-type=delivery-status`` whose second part,
``message/delivery-status`` (or RFC 6533's ``message/global-delivery-status``),
holds one block of fields about the message and one per recipient. Per recipient:
the address is Original-Recipient when given (the address we sent to, before any
forwarding), else Final-Recipient; Action ``failed`` is a permanent bounce,
``delayed`` a temporary one, ``delivered``/``relayed``/``expanded`` no bounce at all.
Without an Action, the Status class decides (5 permanent, 4 temporary, 2 none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message

from listserv import addresses
from listserv.errors import InvalidAddress
from listserv.models import BounceKind

_REPORT_TYPES = frozenset({"delivery-status", "global-delivery-status"})
_STATUS_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_STATUS = re.compile(r"\b([245])\.\d{1,3}\.\d{1,3}\b")
_ACTIONS = {"failed": BounceKind.PERMANENT, "delayed": BounceKind.TEMPORARY}
_NOT_BOUNCES = frozenset({"delivered", "relayed", "expanded"})
_CLASSES = {"5": BounceKind.PERMANENT, "4": BounceKind.TEMPORARY}


@dataclass(frozen=True, slots=True)
class Finding:
    """One recipient a bounce reports, normalized, and how it failed."""

    address: str
    kind: BounceKind
    status: str = ""  # "5.1.1", or "" when the report gave none
    detail: str = ""  # the Diagnostic-Code, or what else says why


def report_part(msg: Message) -> Message | None:
    """The ``multipart/report`` of delivery status in `msg` (itself or nested), if any."""
    for part in msg.walk():
        if part.get_content_type() != "multipart/report":
            continue
        report_type = str(part.get_param("report-type", "") or "").lower()
        if report_type in _REPORT_TYPES:
            return part
    return None


def read(msg: Message) -> list[Finding] | None:
    """The recipients a DSN reports as bounced; None when `msg` is no DSN at all.

    An empty list is a DSN that reports no bounce (a success or relay notice).
    """
    report = report_part(msg)
    if report is None:
        return None
    status = next((p for p in report.walk() if p.get_content_type() in _STATUS_TYPES), None)
    if status is None:
        return None
    found: dict[str, Finding] = {}
    for fields in _blocks(status)[1:]:  # the first block is about the message
        finding = _finding(fields)
        if finding is None:
            continue
        known = found.get(finding.address)
        if known is None or known.kind is BounceKind.TEMPORARY:
            found[finding.address] = finding  # a permanent failure outweighs a delay
    return list(found.values())


def _finding(fields: dict[str, str]) -> Finding | None:
    address = _address(fields.get("original-recipient", "")) or _address(
        fields.get("final-recipient", "")
    )
    if address is None:
        return None
    action = fields.get("action", "").strip().lower().split(" ")[0]
    match = _STATUS.search(fields.get("status", ""))
    status = match.group(0) if match else ""
    if action in _NOT_BOUNCES:
        return None
    kind = _ACTIONS.get(action) or (_CLASSES.get(status[:1]) if status else None)
    if kind is None:
        return None
    detail = " ".join(fields.get("diagnostic-code", "").split()) or f"action {action or 'none'}"
    return Finding(address, kind, status, detail[:1000])


def _address(value: str) -> str | None:
    """The address of ``rfc822; user@example.org`` (or ``utf-8; ...``), normalized."""
    _, semicolon, rest = value.partition(";")
    text = (rest if semicolon else value).strip()
    if "@" not in text:
        return None
    try:
        return addresses.normalize(text)
    except InvalidAddress:
        return None


def _blocks(part: Message) -> list[dict[str, str]]:
    """The field blocks of a delivery-status part, field names lower-cased."""
    payload = part.get_payload()
    if isinstance(payload, list):  # the email package split message/delivery-status itself
        blocks: list[dict[str, str]] = []
        for block in payload:
            if not isinstance(block, Message):
                continue
            fields: dict[str, str] = {}
            for name, value in block.items():
                try:
                    fields.setdefault(name.lower(), " ".join(str(value).split()))
                except Exception:  # a field the header parser chokes on: skip it
                    continue
            blocks.append(fields)
        return blocks
    text = part.get_payload(decode=True)
    if isinstance(text, bytes):
        return _parse_blocks(text.decode("utf-8", "replace"))
    return _parse_blocks(str(payload))


def _parse_blocks(text: str) -> list[dict[str, str]]:
    """Blocks of ``Name: value`` fields separated by blank lines, continuations unfolded."""
    blocks: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                blocks.append(fields)
            fields, name = {}, ""
        elif line[:1] in (" ", "\t") and name:
            fields[name] = f"{fields[name]} {line.strip()}"
        elif ":" in line:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            fields.setdefault(name, value.strip())
    if fields:
        blocks.append(fields)
    return blocks
