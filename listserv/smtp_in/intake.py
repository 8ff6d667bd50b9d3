"""From an SMTP transaction to stored, decided mail.

`resolve` answers RCPT TO; `receive` answers DATA. Both are synchronous
(they talk to the database) and the SMTP handler runs them in a thread.
`receive` decides every post before it answers, so a sender who may not post
gets a 550 in the SMTP dialogue (no backscatter), and it commits the raw bytes
and the decisions in one transaction *before* the 250 goes out.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from email.message import EmailMessage

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import addresses, lists, mail, members, replies
from listserv.addresses import Kind, ListAddress
from listserv.db import Database
from listserv.errors import InvalidAddress, NotFound
from listserv.models import (
    Audience,
    InboundMessage,
    InboundState,
    MailingList,
    Post,
    PostState,
)
from listserv.pipeline.context import PostContext
from listserv.pipeline.decide import decide
from listserv.pipeline.decision import Action, Decision
from listserv.replies import Reply

log = logging.getLogger("listserv.intake")


@dataclass(frozen=True, slots=True)
class Envelope:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    peer: str = ""
    #: what RCPT already resolved, one per rcpt_tos entry (else resolved here)
    targets: tuple[ListAddress, ...] = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    reply: Reply
    inbound_ids: tuple[int, ...] = ()
    accepted_posts: tuple[int, ...] = ()
    #: every post made (accepted, held, discarded): the ids in "Queued as ..."
    post_ids: tuple[int, ...] = ()
    posts: dict[str, PostState] = field(default_factory=dict)


def resolve(db: Database, recipient: str) -> ListAddress | Reply:
    """The list address a RCPT TO names, or the reply refusing it (never relay)."""
    options = list(addresses.candidates(recipient))
    if not options:
        return replies.NO_SUCH_LIST.with_text(f"No such list: {recipient}")
    with db.reading() as session:
        for option in options:
            if lists.find(session, option.list_address) is not None:
                return option
        domain = options[0].domain
        if not _serves_domain(session, domain):
            return replies.RELAY_DENIED
    return replies.NO_SUCH_LIST.with_text(f"No such list here: {recipient}")


def _serves_domain(session: Session, domain: str) -> bool:
    query = sa.select(MailingList.id).where(MailingList.domain == domain).limit(1)
    return session.scalar(query) is not None


def receive(db: Database, envelope: Envelope) -> Outcome:
    targets: dict[Kind, list[ListAddress]] = defaultdict(list)
    for target in envelope.targets or _resolve_all(db, envelope.rcpt_tos):
        if isinstance(target, Reply):
            return Outcome(target)
        targets[target.kind].append(target)
    try:
        return _receive(db, envelope, targets)
    except NotFound as exc:  # a list deleted between RCPT and DATA
        return Outcome(replies.NO_SUCH_LIST.with_text(str(exc)))


def _resolve_all(db: Database, rcpts: tuple[str, ...]) -> list[ListAddress | Reply]:
    return [resolve(db, rcpt) for rcpt in rcpts]


def _receive(db: Database, envelope: Envelope, targets: dict[Kind, list[ListAddress]]) -> Outcome:
    msg = mail.parse(envelope.content)
    decisions: list[tuple[MailingList, PostContext, Decision]] = []
    if targets.get(Kind.POST):
        with db.reading() as session:
            for target in dict.fromkeys(targets[Kind.POST]):
                mlist = lists.get(session, target.list_address)
                ctx = _context(session, mlist, msg, envelope)
                decision = decide(ctx)
                if decision.action is Action.REJECT:
                    log.info(
                        "rejected post to %s from %s (peer %s): %s",
                        mlist.address,
                        ctx.sender,
                        envelope.peer,
                        decision.reason,
                    )
                    return Outcome(decision.reply or replies.NOT_ALLOWED)
                decisions.append((mlist, ctx, decision))

    inbound_ids: list[int] = []
    pending_ids: list[int] = []
    post_ids: list[int] = []
    all_posts: list[int] = []
    states: dict[str, PostState] = {}
    with db.session() as session:
        for kind, group in targets.items():
            inbound = InboundMessage(
                mail_from=envelope.mail_from,
                rcpt_tos=[a.list_address if kind is Kind.POST else _original(a) for a in group],
                kind=kind.value,
                state=InboundState.DONE if kind in HANDLED else InboundState.PENDING,
                peer=envelope.peer[:100],
                raw=envelope.content,
            )
            session.add(inbound)
            session.flush()
            inbound_ids.append(inbound.id)
            if inbound.state is InboundState.PENDING:
                pending_ids.append(inbound.id)
            if kind is Kind.OWNER:
                forwarded = _forward_to_owners(session, inbound, group, msg)
                post_ids.extend(forwarded)
                all_posts.extend(forwarded)
            if kind is not Kind.POST:
                continue
            for mlist, ctx, decision in decisions:
                state = _STATES[decision.action]
                post = Post(
                    list_id=mlist.id,
                    inbound_id=inbound.id,
                    state=state,
                    reason=decision.reason,
                    sender=ctx.sender[:320],
                    subject=(mail.header(msg, "Subject") or "")[:998],
                    message_id=(mail.header(msg, "Message-ID") or "")[:998],
                )
                session.add(post)
                session.flush()
                all_posts.append(post.id)
                states[mlist.address] = state
                if state is PostState.ACCEPTED:
                    post_ids.append(post.id)
                log.info(
                    "post %d to %s from %s: %s%s",
                    post.id,
                    mlist.address,
                    ctx.sender,
                    state.value,
                    f" ({decision.reason})" if decision.reason else "",
                )
    return Outcome(
        _stored_reply(all_posts, pending_ids),
        inbound_ids=tuple(inbound_ids),
        accepted_posts=tuple(post_ids),
        posts=states,
        post_ids=tuple(all_posts),
    )


def _stored_reply(post_ids: list[int], pending_ids: list[int]) -> Reply:
    """The 250 text: "Queued as 12,13" names the posts (as `listserv queue status`
    shows them); mail that makes no post is "Stored as 7 for processing" (inbound id)."""
    parts: list[str] = []
    if post_ids:
        parts.append(f"Queued as {','.join(map(str, post_ids))}")
    if pending_ids:
        stored = "stored" if parts else "Stored"
        parts.append(f"{stored} as {','.join(map(str, pending_ids))} for processing")
    return (replies.QUEUED if post_ids else replies.STORED).with_text("; ".join(parts))


#: kinds handled here; the others wait (stored) for their issues' processors
HANDLED = frozenset({Kind.POST, Kind.OWNER})


def _forward_to_owners(
    session: Session, inbound: InboundMessage, group: list[ListAddress], msg: EmailMessage
) -> list[int]:
    """Mail to NAME-owner@ goes to the owners as it came: no policy, no decoration."""
    sender = (mail.addresses(msg, "From") or [inbound.mail_from or "<>"])[0]
    ids: list[int] = []
    for target in dict.fromkeys(group):
        mlist = lists.get(session, target.list_address)
        post = Post(
            list_id=mlist.id,
            inbound_id=inbound.id,
            state=PostState.ACCEPTED,
            audience=Audience.OWNERS,
            sender=sender[:320],
            subject=(mail.header(msg, "Subject") or "")[:998],
            message_id=(mail.header(msg, "Message-ID") or "")[:998],
        )
        session.add(post)
        session.flush()
        ids.append(post.id)
        log.info("post %d: mail from %s to the owners of %s", post.id, sender, mlist.address)
    return ids


_STATES = {
    Action.ACCEPT: PostState.ACCEPTED,
    Action.HOLD: PostState.HELD,
    Action.DISCARD: PostState.DISCARDED,
    Action.REJECT: PostState.REJECTED,
}


def _original(target: ListAddress) -> str:
    return addresses.build(target.name, target.domain, target.kind, target.token)


def _context(
    session: Session, mlist: MailingList, msg: EmailMessage, envelope: Envelope
) -> PostContext:
    senders = mail.addresses(msg, "From")
    if envelope.mail_from and envelope.mail_from not in senders:
        senders.append(envelope.mail_from)
    normalized: list[str] = []
    for s in senders:
        try:
            normalized.append(addresses.normalize(s))
        except InvalidAddress:
            continue
    roles = members.roles_of(session, mlist, normalized)
    return PostContext(
        mlist=mlist,
        msg=msg,
        size=len(envelope.content),
        mail_from=envelope.mail_from,
        senders=tuple(normalized),
        roles=frozenset(roles),
    )
