"""Moderators' replies: stored ``confirm`` mail (NAME-confirm+TOKEN@), read and carried out.

Intake stores the mail (kind ``confirm``, state ``pending``) before it answers
250; this module works through those rows, old and new. A row is claimed by a
conditional UPDATE to ``done`` in the same transaction as its effects, so two
daemons never carry out one reply twice, and a crash before the commit leaves
it pending for the next round. A row that cannot be processed (its list is
gone, an unexpected error) becomes ``failed`` with the reason in a log line.

A reply is carried out only when every check passes; anything else changes
nothing and gets one short answer saying why (never to automatic mail, RFC 3834).
The checks run in an order that tells a stranger nothing about a token's state:
token known for this list, then the sender's role, then the post, expiry, reuse.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, tzinfo
from email.message import EmailMessage

from sqlalchemy.orm import Session

from listserv import addresses, lists, mail, notices, tokens
from listserv import inbound as inbound_mail
from listserv.addresses import Kind
from listserv.bounces import reenable
from listserv.db import Database
from listserv.errors import InvalidInput
from listserv.models import InboundMessage, MailingList, PostState, TokenKind
from listserv.moderation import holds, verdicts
from listserv.pipeline.auth import Authenticator
from listserv.subscriptions import confirm as subscriptions

log = logging.getLogger("listserv.moderation")


def _reply_authenticated(actor: str, mlist: MailingList, authenticated: frozenset[str]) -> bool:
    """Whether the moderator's reply may decide on this list: always, unless the list
    requires authenticated senders; then the moderator's own domain must be among
    the reply's authenticated From:/Sender: domains (DKIM aligned, trusted DMARC)."""
    if not mlist.require_authenticated_sender:
        return True
    return actor.rpartition("@")[2].lower() in authenticated


def _authenticated_before(
    db: Database, inbound_id: int, authenticator: Authenticator | None
) -> frozenset[str]:
    """Check the reply's authentication before its write transaction opens (a DNS
    timeout must not hold the database), and only when one of its lists needs it."""
    if authenticator is None:
        return frozenset()
    with db.reading() as session:
        inbound = session.get(InboundMessage, inbound_id)
        if inbound is None:
            return frozenset()
        raw, rcpts = inbound.raw, list(inbound.rcpt_tos)
        needed = False
        for rcpt in rcpts:
            target = next((c for c in addresses.candidates(rcpt) if c.kind is Kind.CONFIRM), None)
            mlist = lists.find(session, target.list_address) if target is not None else None
            needed |= mlist is not None and mlist.require_authenticated_sender
    if not needed:
        return frozenset()
    return authenticator.domains(raw, mail.parse(raw))


def process_pending(
    db: Database,
    *,
    now: datetime,
    authenticator: Authenticator | None = None,
    tz: tzinfo = UTC,
) -> int:
    """Process stored confirm mail, oldest first; returns the number of notices queued."""
    ids = inbound_mail.pending(db, [Kind.CONFIRM])
    queued = 0
    for inbound_id in ids:
        try:
            authenticated = _authenticated_before(db, inbound_id, authenticator)
            with db.session() as session:
                queued += process(session, inbound_id, now=now, authenticated=authenticated, tz=tz)
        except Exception as exc:
            log.exception("inbound %d: confirm mail could not be processed", inbound_id)
            with db.session() as session:
                _mark_failed(session, inbound_id, f"unexpected {type(exc).__name__}: {exc}")
    return queued


def process(
    session: Session,
    inbound_id: int,
    *,
    now: datetime,
    authenticated: frozenset[str] = frozenset(),
    tz: tzinfo = UTC,
) -> int:
    """Claim and process one stored confirm mail; returns the number of notices queued."""
    inbound = inbound_mail.claim(session, inbound_id)
    if inbound is None:
        return 0  # another daemon has it
    msg = mail.parse(inbound.raw)
    queued = 0
    for rcpt in dict.fromkeys(inbound.rcpt_tos):
        queued += _process_one(
            session, inbound, msg, rcpt, now=now, authenticated=authenticated, tz=tz
        )
    return queued


def _process_one(
    session: Session,
    inbound: InboundMessage,
    msg: EmailMessage,
    rcpt: str,
    *,
    now: datetime,
    authenticated: frozenset[str],
    tz: tzinfo,
) -> int:
    target = next((c for c in addresses.candidates(rcpt) if c.kind is Kind.CONFIRM), None)
    mlist = lists.find(session, target.list_address) if target is not None else None
    if target is None or mlist is None:
        _mark_failed(session, inbound.id, f"{rcpt}: no such list (deleted?)")
        return 0
    sender = inbound.mail_from
    if not notices.may_answer(sender, msg):
        # An autoresponder answering the notice: robots neither moderate nor get answers.
        log.info(
            "inbound %d: automatic mail from %r to %s ignored (RFC 3834)", inbound.id, sender, rcpt
        )
        return 0
    reenabled = _reenable(session, mlist, target.token or "", msg, sender, rcpt, now)
    if reenabled is not None:
        return reenabled

    def refuse(problem: str) -> int:
        log.info(
            "inbound %d: reply from %s to %s not carried out: %s",
            inbound.id,
            sender,
            mlist.address,
            problem,
            extra={"event": "moderation_refused", "inbound_id": inbound.id},
        )
        holds.reply(
            session,
            mlist,
            "moderation_refused",
            to=sender,
            in_reply_to=mail.header(msg, "Message-ID"),
            address=rcpt,
            problem=problem,
            owner=addresses.build(mlist.local_part, mlist.domain, Kind.OWNER),
        )
        return 1

    any_kind = tokens.look_up(session, target.token or "")
    if any_kind is not None and any_kind.kind in subscriptions.KINDS:
        # a subscriber's confirmation or an owner's approval: subscriptions/ decides
        return subscriptions.by_reply(
            session, mlist, any_kind, rcpt, inbound, msg, now=now, authenticated=authenticated
        )
    token = any_kind if any_kind is not None and any_kind.kind is TokenKind.MODERATION else None
    if token is None or token.list_id != mlist.id or token.post_id is None:
        return refuse("the address does not belong to any held post of this list")
    candidates = [sender, *mail.addresses(msg, "From")]
    actor = holds.moderator_among(session, mlist, candidates)
    if actor is None:
        return refuse(f"{sender} is not a moderator or owner of {mlist.address}")
    if not _reply_authenticated(actor, mlist, authenticated):
        return refuse(f"{mlist.address} accepts decisions only from authenticated mail")
    post = holds.get_post(session, token.post_id)
    if post.state is not PostState.HELD:
        return refuse(holds.not_held_text(post))
    if tokens.is_expired(token, now):
        return refuse("this notice's address has expired")
    if token.used_at is not None:
        return refuse("this notice's address was used already")
    try:
        verdict = verdicts.read(msg, tz)  # "approve at" times are the site's ([policy] timezone)
    except InvalidInput as exc:
        return refuse(str(exc))
    if verdict is None:
        line = verdicts.first_own_line(verdicts.body_text(msg)) or ""
        return refuse(
            "no decision found: the first line of your reply should say approve,"
            f" approve at {verdicts.TIME_FORMAT}, reject REASON or discard"
            + (f" (it says {line[:60]!r})" if line else "")
        )
    if not tokens.consume(session, token.id, now=now):
        return refuse("this notice's address was used already")
    try:
        with session.begin_nested():
            decided = holds.decide(session, post.id, verdict, actor=actor, now=now)
    except holds.NotHeld as exc:
        return refuse(str(exc))
    holds.reply(
        session,
        mlist,
        "moderation_done",
        to=sender,
        in_reply_to=mail.header(msg, "Message-ID"),
        summary=decided.summary,
        sender=decided.sender,
        subject=decided.subject,
    )
    return 2 if decided.state is PostState.ACCEPTED else 1


def _reenable(
    session: Session,
    mlist: MailingList,
    token: str,
    msg: EmailMessage,
    sender: str,
    rcpt: str,
    now: datetime,
) -> int | None:
    """A reply to a "you are disabled for bounces" notice (None: not one)."""
    in_reply_to = mail.header(msg, "Message-ID")
    return reenable.handle(
        session, mlist, token, sender=sender, rcpt=rcpt, in_reply_to=in_reply_to, now=now
    )


def _mark_failed(session: Session, inbound_id: int, reason: str) -> None:
    inbound_mail.mark_failed(
        session, inbound_id, reason, log=log, what="confirm mail", event="confirm_failed"
    )
