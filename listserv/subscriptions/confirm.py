"""Confirmations: asking (a token mailed with ``Reply-To: NAME-confirm+TOKEN@``) and
carrying out what a confirmation, or an owner's approval, says.

Tokens are tokens.py's: 128 random bits, only the digest stored, single use,
expiring. Kinds: ``subscribe`` and ``unsubscribe`` (mailed to the address that
joins or leaves: only its reader can confirm, so a forged From: subscribes or
removes nobody) and ``approval`` (mailed to the owners of an ``approve`` list).

Abuse limits, so nobody can use a list to flood a third party:
- at most one pending confirmation per address and list: a new request
  *replaces* the pending one (the old token dies, a new one is mailed), so a
  person who lost the mail just asks again; an address that awaits the
  owners' approval gets no second request;
- at most `PER_HOUR` confirmation mails per address per hour, counted over
  every list of the site from the tokens themselves (no extra table): further
  requests are refused until the hour has passed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import addresses, lists, mail, members, tokens
from listserv.addresses import Kind
from listserv.errors import InvalidAddress, InvalidInput
from listserv.models import (
    InboundMessage,
    MailingList,
    Role,
    SubscriptionPolicy,
    Token,
    TokenKind,
)
from listserv.moderation import verdicts
from listserv.subscriptions import mails, membership

log = logging.getLogger("listserv.subscriptions")

#: token kinds this package owns (the confirm address routes them here)
KINDS = frozenset({TokenKind.SUBSCRIBE, TokenKind.UNSUBSCRIBE, TokenKind.APPROVAL})
#: kinds mailed to the address itself: one pending per address and list, rate-limited
ASKING = (TokenKind.SUBSCRIBE, TokenKind.UNSUBSCRIBE)
#: how long a subscriber has to confirm
CONFIRM_TTL = timedelta(days=3)
#: how long the owners have to approve
APPROVAL_TTL = timedelta(days=14)
#: confirmation mails per address in `WINDOW`, over all lists
PER_HOUR = 5
WINDOW = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a confirmation did: `ok` False means nothing changed; `text` says it."""

    ok: bool
    text: str


def recent(session: Session, address: str, *, now: datetime) -> int:
    """Confirmation mails sent to `address` within the last WINDOW, any list."""
    count = session.scalar(
        sa.select(sa.func.count(Token.id)).where(
            Token.address == address.lower(),
            Token.kind.in_(ASKING),
            Token.created_at > now - WINDOW,
        )
    )
    return int(count or 0)


def limited(session: Session, address: str, *, now: datetime, per_hour: int = PER_HOUR) -> bool:
    """Whether `address` got its share of confirmation mail this hour (then nothing more goes
    to it: no confirmation, and no answer to its commands either)."""
    return recent(session, address, now=now) >= per_hour


def _pending(
    session: Session, mlist: MailingList, address: str, kinds: tuple[TokenKind, ...], now: datetime
) -> list[Token]:
    return list(
        session.scalars(
            sa.select(Token).where(
                Token.list_id == mlist.id,
                Token.address == address.lower(),
                Token.kind.in_(kinds),
                Token.used_at.is_(None),
                Token.expires_at > now,
            )
        )
    )


def awaiting_approval(session: Session, mlist: MailingList, address: str, *, now: datetime) -> bool:
    return bool(_pending(session, mlist, address, (TokenKind.APPROVAL,), now))


def pending(session: Session, mlist: MailingList, address: str, *, now: datetime) -> list[Token]:
    """The live confirmation tokens of `address` on `mlist` (at most one, by `ask`)."""
    return _pending(session, mlist, address, ASKING, now)


def _issue(
    session: Session,
    mlist: MailingList,
    kind: TokenKind,
    address: str,
    *,
    now: datetime,
    ttl: timedelta,
    payload: dict[str, str],
) -> tuple[str, Token]:
    raw = tokens.issue(
        session,
        kind=kind,
        list_id=mlist.id,
        expires_at=now + ttl,
        address=address.lower(),
        payload=payload,
    )
    token = tokens.look_up(session, raw)
    assert token is not None
    token.created_at = now  # the rate limit counts by the caller's clock
    return raw, token


def ask(
    session: Session,
    mlist: MailingList,
    address: str,
    kind: TokenKind,
    *,
    now: datetime,
    requested_by: str,
    name: str = "",
    per_hour: int = PER_HOUR,
    ttl: timedelta = CONFIRM_TTL,
) -> bool:
    """Mail `address` a request to confirm joining (SUBSCRIBE) or leaving (UNSUBSCRIBE);
    False when the hourly limit for the address is reached (nothing sent or changed).

    A pending confirmation of the address on this list is replaced: its token dies.
    """
    if kind not in ASKING:
        raise ValueError(f"not a confirmation kind: {kind}")
    if limited(session, address, now=now, per_hour=per_hour):
        log.info(
            "%s: confirmation for %s not sent: %d in the last hour",
            mlist.address,
            address,
            per_hour,
            extra={"event": "confirmation_limited", "list": mlist.address},
        )
        return False
    for old in pending(session, mlist, address, now=now):
        old.expires_at = now  # one pending per address and list: the newest wins
    raw, token = _issue(
        session,
        mlist,
        kind,
        address,
        now=now,
        ttl=ttl,
        payload={"name": name[:255], "requested_by": requested_by[:320]},
    )
    template = "confirm_subscribe" if kind is TokenKind.SUBSCRIBE else "confirm_unsubscribe"
    mails.send(
        session,
        mlist,
        template,
        to=address,
        reply_to=addresses.build(mlist.local_part, mlist.domain, Kind.CONFIRM, raw),
        address=address,
        token=raw,
        confirm=addresses.build(mlist.local_part, mlist.domain, Kind.CONFIRM, raw),
        expires=mails.when(token.expires_at),
        requested_by=requested_by or "an unknown sender",
    )
    log.info(
        "%s: %s confirmation sent to %s (asked by %s)",
        mlist.address,
        kind.value,
        address,
        requested_by,
        extra={"event": "confirmation_sent", "list": mlist.address},
    )
    return True


def ask_owners(
    session: Session,
    mlist: MailingList,
    address: str,
    *,
    now: datetime,
    name: str = "",
    ttl: timedelta = APPROVAL_TTL,
) -> None:
    """An ``approve`` list: one approval token, mailed to every owner (the first to
    answer decides), and the subscriber told that the owners decide now."""
    raw, token = _issue(
        session, mlist, TokenKind.APPROVAL, address, now=now, ttl=ttl, payload={"name": name}
    )
    confirm = addresses.build(mlist.local_part, mlist.domain, Kind.CONFIRM, raw)
    for owner in owners(session, mlist):
        mails.send(
            session,
            mlist,
            "approval_request",
            to=owner,
            reply_to=confirm,
            address=address,
            expires=mails.when(token.expires_at),
        )
    mails.send(session, mlist, "approval_waiting", to=address, address=address)


def owners(session: Session, mlist: MailingList) -> list[str]:
    return [m.address for m in members.roster(session, mlist, Role.OWNER)]


def owner_among(session: Session, mlist: MailingList, candidates: list[str]) -> str | None:
    """The first of `candidates` that owns the list (case-insensitive)."""
    known = {a.lower(): a for a in owners(session, mlist)}
    for candidate in candidates:
        try:
            address = addresses.normalize(candidate)
        except InvalidAddress:
            continue
        if address.lower() in known:
            return known[address.lower()]
    return None


def carry_out(
    session: Session,
    mlist: MailingList,
    token: Token | None,
    *,
    now: datetime,
    owner: str | None,
    reply: EmailMessage | None = None,
) -> Outcome:
    """Confirm what `token` stands for (a reply to its address, or ``confirm TOKEN``).

    `owner` is the owner who wrote, when the mail is from one (and authenticated,
    when the list requires it): only an owner's confirmation decides an approval;
    `reply` is the owner's reply, whose first line says approve or reject (without
    it, as with ``confirm TOKEN``, it approves). The checks run in an order that
    tells a stranger nothing about a token: belongs to this list, then expiry, then use.
    """
    if token is None or token.list_id != mlist.id or token.kind not in KINDS:
        return Outcome(False, "the address does not belong to any pending request of this list")
    if tokens.is_expired(token, now):
        return Outcome(
            False,
            "this confirmation has expired or was replaced by a newer request:"
            " please send the request again",
        )
    if token.used_at is not None:
        return Outcome(False, "this confirmation was used already")
    if token.kind is TokenKind.APPROVAL:
        return _approval(session, mlist, token, now=now, owner=owner, reply=reply)
    if token.kind is TokenKind.SUBSCRIBE and mlist.subscription_policy is SubscriptionPolicy.CLOSED:
        return Outcome(False, mails.body(mlist, "refused_closed"))
    if token.kind is TokenKind.UNSUBSCRIBE and mlist.mandatory:
        return Outcome(False, mails.body(mlist, "refused_mandatory", address=token.address))
    if not tokens.consume(session, token.id, now=now):
        return Outcome(False, "this confirmation was used already")
    address, name = token.address, (token.payload or {}).get("name", "")
    if token.kind is TokenKind.UNSUBSCRIBE:
        if membership.leave(session, mlist, address, via="email", actor=address):
            return Outcome(True, f"{address} has left {mlist.address}")
        return Outcome(True, f"{address} is not a member of {mlist.address} (any more)")
    if membership.is_member(session, mlist, address):
        return Outcome(True, f"{address} is already a member of {mlist.address}")
    if mlist.subscription_policy is SubscriptionPolicy.APPROVE:
        if not awaiting_approval(session, mlist, address, now=now):
            ask_owners(session, mlist, address, now=now, name=name)
        return Outcome(True, f"confirmed: {address} now awaits the approval of the list's owners")
    membership.join(
        session,
        mlist,
        address,
        name=name,
        source="subscribe",
        actor=address,
        how="You asked to join and confirmed it.",
    )
    return Outcome(True, f"{address} is now a member of {mlist.address}")


def _approval(
    session: Session,
    mlist: MailingList,
    token: Token,
    *,
    now: datetime,
    owner: str | None,
    reply: EmailMessage | None,
) -> Outcome:
    if owner is None:
        return Outcome(False, f"only an owner of {mlist.address} can approve new members")
    verdict: verdicts.Verdict | None = verdicts.Verdict(verdicts.Verb.APPROVE)
    if reply is not None:
        try:
            verdict = verdicts.read(reply)
        except InvalidInput:
            verdict = None  # "approve at": no time applies to a subscription
    if verdict is None:
        return Outcome(
            False,
            "no decision found: the first line of your reply should say approve,"
            " reject REASON or discard",
        )
    if not tokens.consume(session, token.id, now=now):
        return Outcome(False, "this confirmation was used already")
    address, name = token.address, (token.payload or {}).get("name", "")
    if verdict.verb is verdicts.Verb.APPROVE:
        membership.join(
            session,
            mlist,
            address,
            name=name,
            source="subscribe",
            actor=owner,
            how="You asked to join, confirmed it, and an owner approved.",
        )
        return Outcome(True, f"approved: {address} is now a member of {mlist.address}")
    lists.audit(
        session, owner, "members.approval", mlist.address, f"{address}: {verdict.verb.value}ed"
    )
    if verdict.verb is verdicts.Verb.REJECT:
        mails.send(
            session,
            mlist,
            "subscription_rejected",
            to=address,
            address=address,
            reason=f"The reason given: {verdict.reason}" if verdict.reason else "",
        )
        return Outcome(True, f"rejected: {address} was told")
    return Outcome(True, f"discarded: {address} was not told")


def by_reply(
    session: Session,
    mlist: MailingList,
    token: Token,
    rcpt: str,
    inbound: InboundMessage,
    msg: EmailMessage,
    *,
    now: datetime,
    authenticated: frozenset[str],
) -> int:
    """A reply to NAME-confirm+TOKEN@ whose token is one of `KINDS` (moderation/replies.py
    routes it here, after its RFC 3834 check: an autoresponder confirms nothing).

    The subscriber hears from the change itself (welcome, goodbye, "awaits approval");
    an owner's decision is acknowledged; a reply that changed nothing is answered with
    why. Returns the number of notices that may have been queued (the scheduler wakes).
    """
    owner = owner_among(session, mlist, [inbound.mail_from, *mail.addresses(msg, "From")])
    outcome: Outcome | None = None
    if owner is not None and mlist.require_authenticated_sender:
        if owner.rpartition("@")[2].lower() not in authenticated:
            owner = None
            if token.kind is TokenKind.APPROVAL:
                text = f"{mlist.address} takes owners' decisions only from authenticated mail"
                outcome = Outcome(False, text)
    if outcome is None:
        reply = msg if token.kind is TokenKind.APPROVAL else None
        outcome = carry_out(session, mlist, token, now=now, owner=owner, reply=reply)
    log.info(
        "inbound %d: confirmation from %s to %s: %s",
        inbound.id,
        inbound.mail_from,
        mlist.address,
        outcome.text.splitlines()[0],
        extra={"event": "confirmation_read", "inbound_id": inbound.id},
    )
    in_reply_to = mail.header(msg, "Message-ID")
    if limited(session, inbound.mail_from, now=now):
        return 1
    if not outcome.ok:
        mails.send(
            session,
            mlist,
            "confirm_refused",
            to=inbound.mail_from,
            in_reply_to=in_reply_to,
            address=rcpt,
            problem=outcome.text,
        )
    elif token.kind is TokenKind.APPROVAL and owner is not None:
        mails.send(
            session,
            mlist,
            "request_results",
            to=owner,
            in_reply_to=in_reply_to,
            results=f"> {token.address}\n{outcome.text}",
        )
    return 1
