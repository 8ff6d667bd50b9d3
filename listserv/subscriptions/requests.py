"""Stored mail to NAME-request@, NAME-join@ and NAME-leave@: read, carried out, answered.

Intake stores such mail (kinds ``request``, ``join``, ``leave``, state
``pending``) before it answers 250; this module works through those rows, old
and new, so mail stored before this code existed is answered too. A row is
claimed by a conditional UPDATE to ``done`` in the same transaction as its
effects (two daemons never carry out one request twice; a crash before the
commit leaves it pending for the next round); one that cannot be processed
becomes ``failed`` with the reason in a log line.

Who writes is the first From: address (else the envelope sender): that is
whom a request without an address is about, and who gets the answer. Joining
and leaving by request always go through a confirmation mailed to the address
concerned (confirm.py), so a forged From: changes nobody's membership. Owners'
commands (``add``, ``remove``, ``who``) take effect at once when the mail comes
from an owner address, and, on a list with require_authenticated_sender, is
authenticated (DKIM aligned or a trusted DMARC pass, as for moderators).

Nothing is answered to automatic mail, list mail or an empty sender (RFC 3834),
nor to an address that got its hourly share of confirmation mail. A message
whose every command already mailed the writer (a confirmation request) gets no
separate summary; otherwise one answer lists what each command did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage

from sqlalchemy.orm import Session

from listserv import addresses, lists, mail, members, notices, tokens
from listserv import inbound as inbound_mail
from listserv.addresses import Kind
from listserv.db import Database
from listserv.errors import InvalidAddress
from listserv.models import (
    InboundMessage,
    MailingList,
    Role,
    SubscriptionPolicy,
    TokenKind,
)
from listserv.pipeline.auth import Authenticator
from listserv.subscriptions import confirm, mails, membership
from listserv.subscriptions.commands import Command, Verb, read

log = logging.getLogger("listserv.subscriptions")

#: the kinds of stored mail this module consumes
KINDS = (Kind.REQUEST, Kind.JOIN, Kind.LEAVE)
#: members listed by `who` at most (the rest are counted)
WHO_LIMIT = 5000


@dataclass(frozen=True, slots=True)
class Result:
    """What one command did, as the answer shows it."""

    command: str
    text: str
    #: the writer got a mail of its own about it (a confirmation request)
    told: bool = False
    #: a refusal template, sent on its own when the mail went to -join or -leave
    notice: str | None = None


@dataclass(frozen=True, slots=True)
class Writer:
    """Who wrote one request to one list, and what they may do there."""

    session: Session
    mlist: MailingList
    requester: str
    #: the owner who wrote (authenticated when the list requires it), else None
    owner: str | None
    #: why owners' commands are refused (when `owner` is None)
    not_owner: str
    now: datetime
    per_hour: int


def process_pending(
    db: Database,
    *,
    now: datetime,
    authenticator: Authenticator | None = None,
    per_hour: int = confirm.PER_HOUR,
) -> int:
    """Process stored request, join and leave mail, oldest first; returns how many."""
    ids = inbound_mail.pending(db, KINDS)
    done = 0
    for inbound_id in ids:
        try:
            authenticated = _authenticated_before(db, inbound_id, authenticator)
            with db.session() as session:
                done += process(
                    session, inbound_id, now=now, authenticated=authenticated, per_hour=per_hour
                )
        except Exception as exc:
            log.exception("inbound %d: request could not be processed", inbound_id)
            with db.session() as session:
                _mark_failed(session, inbound_id, f"unexpected {type(exc).__name__}: {exc}")
    return done


def _authenticated_before(
    db: Database, inbound_id: int, authenticator: Authenticator | None
) -> frozenset[str]:
    """Check the mail's authentication before its write transaction opens (a DNS timeout
    must not hold the database), and only when one of its lists needs it."""
    if authenticator is None:
        return frozenset()
    with db.reading() as session:
        inbound = session.get(InboundMessage, inbound_id)
        if inbound is None:
            return frozenset()
        raw = inbound.raw
        needed = False
        for rcpt in inbound.rcpt_tos:
            mlist = _list_of(session, rcpt)[1]
            needed |= mlist is not None and mlist.require_authenticated_sender
    if not needed:
        return frozenset()
    return authenticator.domains(raw, mail.parse(raw))


def _list_of(session: Session, rcpt: str) -> tuple[Kind | None, MailingList | None]:
    target = next((c for c in addresses.candidates(rcpt) if c.kind in KINDS), None)
    if target is None:
        return None, None
    return target.kind, lists.find(session, target.list_address)


def process(
    session: Session,
    inbound_id: int,
    *,
    now: datetime,
    authenticated: frozenset[str] = frozenset(),
    per_hour: int = confirm.PER_HOUR,
) -> int:
    """Claim and process one stored request; returns 1 when it was ours to process."""
    inbound = inbound_mail.claim(session, inbound_id)
    if inbound is None:
        return 0  # another daemon has it
    msg = mail.parse(inbound.raw)
    for rcpt in dict.fromkeys(inbound.rcpt_tos):
        kind, mlist = _list_of(session, rcpt)
        if kind is None or mlist is None:
            _mark_failed(session, inbound.id, f"{rcpt}: no such list (deleted?)")
            continue
        _process_one(session, inbound, msg, kind, mlist, now, authenticated, per_hour)
    return 1


def _process_one(
    session: Session,
    inbound: InboundMessage,
    msg: EmailMessage,
    kind: Kind,
    mlist: MailingList,
    now: datetime,
    authenticated: frozenset[str],
    per_hour: int,
) -> None:
    if not notices.may_answer(inbound.mail_from, msg):
        # a vacation message or a bounce neither joins, leaves, nor gets an answer
        log.info(
            "inbound %d: automatic mail from %r to %s ignored (RFC 3834)",
            inbound.id,
            inbound.mail_from,
            mlist.address,
        )
        return
    requester = _requester(inbound.mail_from, msg)
    if requester is None:
        log.info("inbound %d: no usable sender address: ignored", inbound.id)
        return
    candidates = [inbound.mail_from, *mail.addresses(msg, "From")]
    owner = confirm.owner_among(session, mlist, candidates)
    not_owner = f"{requester} is not an owner of {mlist.address}"
    if owner is not None and mlist.require_authenticated_sender:
        if owner.rpartition("@")[2].lower() not in authenticated:
            owner, not_owner = (
                None,
                f"{mlist.address} takes owners' commands only from authenticated mail",
            )
    quiet = confirm.limited(session, requester, now=now, per_hour=per_hour)
    writer = Writer(session, mlist, requester, owner, not_owner, now, per_hour)
    if kind is Kind.JOIN:
        results = [subscribe(writer, None)]
    elif kind is Kind.LEAVE:
        results = [unsubscribe(writer, None)]
    else:
        found, unknown = read(msg)
        results = [run(writer, command) for command in found] or [_nothing(writer, unknown)]
    log.info(
        "inbound %d: %s to %s: %s",
        inbound.id,
        requester,
        addresses.build(mlist.local_part, mlist.domain, kind),
        "; ".join(r.command for r in results),
        extra={"event": "request_processed", "inbound_id": inbound.id},
    )
    if quiet:
        log.info("inbound %d: %s had its share of mail this hour: no answer", inbound.id, requester)
        return
    in_reply_to = mail.header(msg, "Message-ID")
    if kind is not Kind.REQUEST and results[0].notice is not None:
        mails.send(
            session,
            mlist,
            results[0].notice,
            to=requester,
            address=requester,
            in_reply_to=in_reply_to,
        )
    elif not all(r.told for r in results):
        mails.send(
            session,
            mlist,
            "request_results",
            to=requester,
            in_reply_to=in_reply_to,
            results="\n\n".join(f"> {r.command}\n{r.text}" for r in results),
        )


def _requester(mail_from: str, msg: EmailMessage) -> str | None:
    for candidate in [*mail.addresses(msg, "From"), mail_from]:
        try:
            return addresses.normalize(candidate)
        except InvalidAddress:
            continue
    return None


def run(writer: Writer, command: Command) -> Result:
    """Carry out one command."""
    args = command.args
    if command.verb is Verb.SUBSCRIBE:
        return subscribe(writer, args[0] if args else None)
    if command.verb is Verb.UNSUBSCRIBE:
        return unsubscribe(writer, args[0] if args else None)
    if command.verb is Verb.CONFIRM:
        return confirm_token(writer, args[0])
    if command.verb is Verb.HELP:
        return Result("help", mails.body(writer.mlist, "request_help"))
    if command.verb is Verb.WHO:
        return who(writer)
    if command.verb is Verb.ADD:
        return add(writer, args[0], args[1] if len(args) > 1 else "")
    return remove(writer, args[0])


def _nothing(writer: Writer, unknown: str | None) -> Result:
    said = f": {unknown!r} is not one" if unknown else ""
    return Result(
        "(no command)",
        f"No command was found{said}.\n\n" + mails.body(writer.mlist, "request_help"),
    )


def _private(address: str) -> str:
    """The answer about someone else's address to a stranger: it does not tell who is a
    member (only owners see that)."""
    return (
        f"If the request can be carried out, {address} gets a message asking to confirm it."
        " (Whether it is a member is not said here.)"
    )


def _target(writer: Writer, label: str, given: str | None) -> tuple[str, bool] | Result:
    """The address a command is about, and whether its answer must not tell about it."""
    try:
        address = members.member_address(writer.mlist, given or writer.requester)
    except InvalidAddress as exc:
        return Result(label, str(exc))
    own = address.lower() == writer.requester.lower()
    return address, not own and writer.owner is None


def subscribe(writer: Writer, given: str | None) -> Result:
    label = "subscribe" + (f" {given}" if given else "")
    mlist, session, now = writer.mlist, writer.session, writer.now
    target = _target(writer, label, given)
    if isinstance(target, Result):
        return target
    address, private = target
    if mlist.subscription_policy is SubscriptionPolicy.CLOSED:
        return Result(label, mails.body(mlist, "refused_closed"), notice="refused_closed")
    if membership.is_member(session, mlist, address):
        return Result(label, _private(address) if private else f"{address} is a member already.")
    if confirm.awaiting_approval(session, mlist, address, now=now):
        text = f"The subscription of {address} awaits the approval of the list's owners already."
        return Result(label, _private(address) if private else text)
    if not confirm.ask(
        session,
        mlist,
        address,
        TokenKind.SUBSCRIBE,
        now=now,
        requested_by=writer.requester,
        per_hour=writer.per_hour,
    ):
        return Result(label, _private(address) if private else _limited(writer, address))
    then = (
        " After that, the list's owners approve new members."
        if mlist.subscription_policy is SubscriptionPolicy.APPROVE
        else ""
    )
    text = f"A message asking to confirm was sent to {address}: answer it to join.{then}"
    return Result(label, _private(address) if private else text, told=_own(writer, address))


def unsubscribe(writer: Writer, given: str | None) -> Result:
    label = "unsubscribe" + (f" {given}" if given else "")
    mlist, session = writer.mlist, writer.session
    target = _target(writer, label, given)
    if isinstance(target, Result):
        return target
    address, private = target
    if mlist.mandatory:
        text = mails.body(mlist, "refused_mandatory", address=address)
        return Result(label, text, notice="refused_mandatory")
    if not membership.is_member(session, mlist, address):
        text = (
            f"{address} is not a member of {mlist.address}. If you receive the list at"
            " another address, send 'unsubscribe THAT-ADDRESS' (the confirmation goes there)."
        )
        return Result(label, _private(address) if private else text)
    if not confirm.ask(
        session,
        mlist,
        address,
        TokenKind.UNSUBSCRIBE,
        now=writer.now,
        requested_by=writer.requester,
        per_hour=writer.per_hour,
    ):
        return Result(label, _private(address) if private else _limited(writer, address))
    text = f"A message asking to confirm was sent to {address}: answer it to leave."
    return Result(label, _private(address) if private else text, told=_own(writer, address))


def _own(writer: Writer, address: str) -> bool:
    return address.lower() == writer.requester.lower()


def _limited(writer: Writer, address: str) -> str:
    return (
        f"No message was sent: {address} got {writer.per_hour} confirmation requests in the"
        " last hour. Please try again later."
    )


def confirm_token(writer: Writer, raw: str) -> Result:
    token = tokens.look_up(writer.session, raw)
    outcome = confirm.carry_out(
        writer.session, writer.mlist, token, now=writer.now, owner=writer.owner
    )
    return Result(f"confirm {raw}", outcome.text)


def who(writer: Writer) -> Result:
    if writer.owner is None:
        return Result(
            "who", f"Refused: only the list's owners may see its members ({writer.not_owner})."
        )
    rows = members.roster(writer.session, writer.mlist, Role.MEMBER)
    lines = [f"{m.address}  {m.display_name}".rstrip() for m in rows[:WHO_LIMIT]]
    more = f"\n... and {len(rows) - WHO_LIMIT} more" if len(rows) > WHO_LIMIT else ""
    return Result("who", f"{len(rows)} members:\n" + "\n".join(lines) + more)


def add(writer: Writer, given: str, name: str) -> Result:
    label = f"add {given}" + (f" {name}" if name else "")
    if writer.owner is None:
        return Result(
            label, f"Refused: only the list's owners may add members ({writer.not_owner})."
        )
    try:
        address = members.member_address(writer.mlist, given)
    except InvalidAddress as exc:
        return Result(label, str(exc))
    if membership.join(
        writer.session,
        writer.mlist,
        address,
        name=name[:255],
        source="owner",
        actor=writer.owner,
        how=f"An owner of the list ({writer.owner}) added you.",
    ):
        return Result(label, f"{address} is now a member (and was sent a welcome).")
    return Result(label, f"{address} is a member already.")


def remove(writer: Writer, given: str) -> Result:
    label = f"remove {given}"
    if writer.owner is None:
        return Result(
            label, f"Refused: only the list's owners may remove members ({writer.not_owner})."
        )
    try:
        address = addresses.normalize(given)
    except InvalidAddress as exc:
        return Result(label, str(exc))
    if membership.leave(writer.session, writer.mlist, address, via="owner", actor=writer.owner):
        return Result(label, f"{address} was removed (and told).")
    return Result(label, f"{address} is not a member.")


def _mark_failed(session: Session, inbound_id: int, reason: str) -> None:
    inbound_mail.mark_failed(
        session, inbound_id, reason, log=log, what="request", event="request_failed"
    )
