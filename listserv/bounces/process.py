"""Mail to NAME-bounces@ and NAME-bounces+TOKEN@, stored by intake as pending ``bounces``
rows (old and new alike), read and acted on.

A row is claimed by a conditional UPDATE to ``done`` in the transaction that
records its effects, as moderation/replies.py claims confirm mail: two daemons
never count one bounce twice, and a crash before the commit leaves it pending.

Who bounced: a valid VERP token names the delivery, hence the member and the post,
whatever the bounce itself says (forwarding, rewritten addresses, any format); how
(permanent or a delay) comes from the bounce when it says. A forged or garbled
token is logged and the message read as if sent to the plain bounce address:
never trusted. There, the addresses the bounce reports (parse.py) are members'
bounces; one that names nobody on the list is logged and dropped. A message that
is no bounce at all goes to the owners as mail to NAME-owner@ would (a person
replying to the bounce address, a bounce format nobody recognizes), except
vacation notices and DSNs that report success, which are dropped.
"""

from __future__ import annotations

import logging
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import addresses, lists, sitesecret
from listserv import inbound as inbound_mail
from listserv.addresses import Kind, ListAddress
from listserv.bounces import parse, score, verp
from listserv.bounces.parse import Report
from listserv.db import Database
from listserv.models import (
    Audience,
    BounceKind,
    Delivery,
    InboundMessage,
    MailingList,
    Post,
    PostState,
)

log = logging.getLogger("listserv.bounces")


def process_pending(db: Database, *, now: datetime) -> int:
    """Process stored bounce mail, oldest first; returns how many bounces and forwards
    it made (0: nothing for the scheduler)."""
    ids = inbound_mail.pending(db, [Kind.BOUNCES])
    done = 0
    for inbound_id in ids:
        try:
            with db.session() as session:
                done += process(session, inbound_id, now=now)
        except Exception as exc:
            log.exception("inbound %d: bounce could not be processed", inbound_id)
            with db.session() as session:
                _mark_failed(session, inbound_id, f"unexpected {type(exc).__name__}: {exc}")
    return done


def process(session: Session, inbound_id: int, *, now: datetime) -> int:
    """Claim and process one stored bounce mail."""
    inbound = inbound_mail.claim(session, inbound_id)
    if inbound is None:
        return 0  # another daemon has it
    report = parse.parse(inbound.raw, inbound.mail_from)
    done = 0
    for rcpt in dict.fromkeys(inbound.rcpt_tos):
        target = next((c for c in addresses.candidates(rcpt) if c.kind is Kind.BOUNCES), None)
        mlist = lists.find(session, target.list_address) if target is not None else None
        if target is None or mlist is None:
            _mark_failed(session, inbound.id, f"{rcpt}: no such list (deleted?)")
            continue
        done += _process_one(session, inbound, report, mlist, target, now=now)
    return done


def _process_one(
    session: Session,
    inbound: InboundMessage,
    report: Report,
    mlist: MailingList,
    target: ListAddress,
    *,
    now: datetime,
) -> int:
    attributed = _attribute(session, mlist, target) if target.token else None
    if target.token and attributed is None:
        log.warning(
            "inbound %d: forged or garbled VERP token in %s: read as unattributed",
            inbound.id,
            addresses.build(target.name, target.domain, target.kind, target.token),
            extra={"event": "verp_invalid", "inbound_id": inbound.id},
        )
    if attributed is not None:
        return _attributed(session, inbound, report, mlist, *attributed, now=now)
    if report.findings:
        post_id = _post_by_message_id(session, mlist, report.original_message_id)
        counted = 0
        for finding in report.findings:
            scored = score.register(
                session,
                mlist,
                finding.address,
                finding.kind,
                now=now,
                source=report.source,
                post_id=post_id,
                inbound_id=inbound.id,
                status=finding.status,
                detail=finding.detail,
            )
            counted += scored is not None
        return counted
    return _not_a_bounce(session, inbound, report, mlist)


def _attributed(
    session: Session,
    inbound: InboundMessage,
    report: Report,
    mlist: MailingList,
    address: str,
    post_id: int,
    *,
    now: datetime,
) -> int:
    """A bounce to a valid VERP address: the token says who, the bounce says how."""
    if report.findings:
        own = [f for f in report.findings if f.address.lower() == address.lower()]
        findings = own or list(report.findings)
        finding = next(
            (f for f in findings if f.kind is BounceKind.PERMANENT), findings[0]
        )  # any permanent failure outweighs a delay
        kind, status, detail = finding.kind, finding.status, finding.detail
    elif report.from_robot and not report.is_dsn and not report.auto_reply:
        # a mail system's answer in a format nobody recognizes: VERP says it bounced
        kind, status, detail = BounceKind.PERMANENT, "", f"unrecognized bounce: {report.subject}"
    else:
        return _not_a_bounce(session, inbound, report, mlist)
    scored = score.register(
        session,
        mlist,
        address,
        kind,
        now=now,
        source="verp",
        post_id=post_id,
        inbound_id=inbound.id,
        status=status,
        detail=detail,
    )
    return int(scored is not None)


def _attribute(session: Session, mlist: MailingList, target: ListAddress) -> tuple[str, int] | None:
    """(address, post id) a VERP token names, when its MAC holds and the delivery is one
    of this list's; else None."""
    key = sitesecret.get(session, sitesecret.VERP)
    base = addresses.build(target.name, target.domain, Kind.BOUNCES)
    delivery_id = verp.delivery_of(key, base, target.token or "")
    if delivery_id is None:
        return None
    row = session.execute(
        sa.select(Delivery.address, Delivery.post_id)
        .join(Post, Post.id == Delivery.post_id)
        .where(Delivery.id == delivery_id, Post.list_id == mlist.id)
    ).first()
    return None if row is None else (row.address, row.post_id)


def _post_by_message_id(session: Session, mlist: MailingList, message_id: str) -> int | None:
    """The list's post a bounce quotes the Message-ID of (the newest such), if any."""
    if not message_id:
        return None
    return session.scalar(
        sa.select(Post.id)
        .where(
            Post.list_id == mlist.id,
            Post.audience == Audience.MEMBERS,
            Post.message_id == message_id[:998],
        )
        .order_by(Post.id.desc())
        .limit(1)
    )


def _not_a_bounce(
    session: Session, inbound: InboundMessage, report: Report, mlist: MailingList
) -> int:
    """Vacation notices and success DSNs are dropped; the rest goes to the owners."""
    if report.auto_reply or report.is_dsn:
        log.info(
            "inbound %d to %s: %s, not a bounce: dropped",
            inbound.id,
            mlist.address,
            "an automatic reply" if report.auto_reply else "a DSN reporting no failure",
            extra={"event": "bounce_ignored", "inbound_id": inbound.id},
        )
        return 0
    sender = inbound.mail_from or "<>"
    post = Post(
        list_id=mlist.id,
        inbound_id=inbound.id,
        state=PostState.ACCEPTED,
        audience=Audience.OWNERS,
        sender=sender[:320],
        subject=report.subject[:998],
        message_id="",
    )
    session.add(post)
    session.flush()
    log.info(
        "post %d: mail from %s to the bounce address of %s is no bounce: to the owners",
        post.id,
        sender,
        mlist.address,
        extra={"event": "bounce_forwarded", "post_id": post.id, "inbound_id": inbound.id},
    )
    return 1


def _mark_failed(session: Session, inbound_id: int, reason: str) -> None:
    inbound_mail.mark_failed(
        session, inbound_id, reason, log=log, what="bounce mail", event="bounce_failed"
    )
