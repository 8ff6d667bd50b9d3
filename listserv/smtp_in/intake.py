"""From an SMTP transaction to stored, decided mail.

`resolve` answers RCPT TO; `receive` answers DATA. Both are synchronous
(they talk to the database) and the SMTP handler runs them in a thread.
`receive` decides every post before it answers, so a sender who may not post
gets a 550 in the SMTP dialogue (no backscatter), and it commits the raw bytes
and the decisions (with their audit entries) in one transaction *before* the
250 goes out. A refusal stores nothing but is written to the audit log.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import addresses, lists, mail, members, replies
from listserv.addresses import Kind, ListAddress
from listserv.config import PolicySettings
from listserv.db import Database, insert_ids
from listserv.errors import InvalidAddress, NotFound
from listserv.models import (
    Audience,
    AuditEntry,
    InboundMessage,
    InboundState,
    MailingList,
    Member,
    Post,
    PostState,
    Role,
)
from listserv.pipeline import authresults, rules
from listserv.pipeline.auth import Authenticator
from listserv.pipeline.context import SEVERITY, PostContext, Standing
from listserv.pipeline.decide import decide
from listserv.pipeline.decision import Action, Decision
from listserv.replies import Reply
from listserv.smtp_in.commit import GroupCommit

log = logging.getLogger("listserv.intake")


@dataclass(frozen=True, slots=True)
class Envelope:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    peer: str = ""
    #: the client's HELO/EHLO name (SPF for the null sender)
    helo: str = ""
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
    keys: dict[tuple[str, str], ListAddress] = {}
    for option in options:
        try:
            keys.setdefault(addresses.list_key(option.list_address), option)
        except InvalidAddress:
            continue
    with db.reading() as session:
        # one query for every reading of the address, and only the key columns: this
        # runs for every RCPT, and loading whole lists cost more than the look-up
        found = set(_existing(session, list(keys))) if keys else set()
        for key, option in keys.items():
            if key in found:
                return option
        domain = options[0].domain
        if not _serves_domain(session, domain):
            return replies.RELAY_DENIED
    return replies.NO_SUCH_LIST.with_text(f"No such list here: {recipient}")


def _existing(session: Session, keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Which of these (name, domain) keys are lists (as `lists.find` matches them)."""
    query = sa.select(MailingList.local_part, MailingList.domain).where(
        sa.or_(*(sa.and_(MailingList.local_part == n, MailingList.domain == d) for n, d in keys))
    )
    return [(n, d) for n, d in session.execute(query)]


def _serves_domain(session: Session, domain: str) -> bool:
    query = sa.select(MailingList.id).where(MailingList.domain == domain).limit(1)
    return session.scalar(query) is not None


def receive(
    db: Database,
    envelope: Envelope,
    *,
    policy: PolicySettings | None = None,
    now: datetime | None = None,
    authenticator: Authenticator | None = None,
    committer: GroupCommit[Write, Stored] | None = None,
) -> Outcome:
    """Decide, store and answer one transaction; `policy` is the site's [policy]
    section, `now` when it was received (tests pass one), `authenticator` checks
    who sent it (DKIM, trusted Authentication-Results), `committer` shares the
    durable commit with concurrent sessions (else the mail has its own)."""
    targets: dict[Kind, list[ListAddress]] = defaultdict(list)
    for target in envelope.targets or _resolve_all(db, envelope.rcpt_tos):
        if isinstance(target, Reply):
            return Outcome(target)
        targets[target.kind].append(target)
    try:
        return _receive(
            db,
            envelope,
            targets,
            policy or PolicySettings(),
            now or datetime.now(UTC),
            authenticator,
            committer,
        )
    except NotFound as exc:  # a list deleted between RCPT and DATA
        return Outcome(replies.NO_SUCH_LIST.with_text(str(exc)))


def _resolve_all(db: Database, rcpts: tuple[str, ...]) -> list[ListAddress | Reply]:
    return [resolve(db, rcpt) for rcpt in rcpts]


def _authenticated(
    envelope: Envelope, msg: EmailMessage, authenticator: Authenticator | None
) -> frozenset[str]:
    """The From:/Sender: domains whose mail is authenticated (DKIM aligned, or a
    trusted DMARC pass): lists with require_authenticated_sender believe only those.

    DNS and signature work, inside a read transaction only (which blocks no writer). Without an
    authenticator (a caller that has none) nothing is authenticated.
    """
    if authenticator is None:
        return frozenset()
    return authenticator.domains(envelope.content, msg)


def _receive(
    db: Database,
    envelope: Envelope,
    targets: dict[Kind, list[ListAddress]],
    policy: PolicySettings,
    now: datetime,
    authenticator: Authenticator | None,
    committer: GroupCommit[Write, Stored] | None,
) -> Outcome:
    # our Authentication-Results on posts (pipeline.authresults): forged ones go first
    checking = bool(
        targets.get(Kind.POST) and authenticator and authenticator.settings.inbound_results
    )
    stored = envelope
    if checking and authenticator is not None:
        stored = dataclasses.replace(
            envelope,
            content=authresults.strip_forged(envelope.content, authenticator.authserv_id),
        )
    msg = mail.parse_headers(stored.content)  # the body only for rules that read it
    checking = checking and bool(msg.keys())  # no header section: refused as it is
    decisions: list[tuple[MailingList, PostContext, Decision]] = []
    refusal: tuple[MailingList, PostContext, Decision] | None = None
    if targets.get(Kind.POST):
        with db.reading() as session:
            found = (lists.get(session, t.list_address) for t in dict.fromkeys(targets[Kind.POST]))
            mlists = list({m.id: m for m in found}.values())
            if any(rules.reads_body(m) for m in mlists):
                msg = mail.parse(stored.content)
            # DKIM and DNS work only for a list that believes authenticated senders only,
            # or to write our header: cached by TTL (a read transaction blocks nobody)
            authenticated: frozenset[str] = frozenset()
            if checking and authenticator is not None:
                inbound = authresults.check(
                    stored.content,
                    msg,
                    authenticator=authenticator,
                    peer=envelope.peer,
                    mail_from=envelope.mail_from,
                    helo=envelope.helo,
                )
                authenticated = inbound.domains
                stored = dataclasses.replace(
                    stored, content=authresults.prepend(stored.content, inbound.value)
                )
                msg.set_raw("Authentication-Results", inbound.value)  # for the rules
            elif any(m.require_authenticated_sender for m in mlists):
                authenticated = _authenticated(envelope, msg, authenticator)
            # a post to several lists is judged on the union of their recipients; the
            # count scans every member, so only when some list has a threshold
            recipients = 0
            if any(m.approval_threshold > 0 for m in mlists):
                recipients = members.recipient_count(session, [m.id for m in mlists])
            for mlist in mlists:
                ctx = build_context(
                    session,
                    mlist,
                    msg,
                    envelope,
                    recipients=recipients,
                    now=now,
                    policy=policy,
                    authenticated=authenticated,
                )
                decision = decide(ctx)
                if decision.action is Action.REJECT:
                    refusal = (mlist, ctx, decision)
                    break
                decisions.append((mlist, ctx, decision))
    if refusal is not None:
        mlist, ctx, decision = refusal
        log.info(
            "rejected post to %s from %s (peer %s): %s",
            mlist.address,
            ctx.sender,
            envelope.peer,
            decision.reason,
        )
        _audit_refusal(db, mlist, ctx, decision, envelope)
        return Outcome(decision.reply or replies.NOT_ALLOWED)

    write = Write(stored, targets, decisions, msg, _About.of(msg))
    if committer is None:
        with db.session(first=True) as session:  # durable: committed before the 250
            [(outcome, logged)] = store_many(session, [write])
    else:  # the same, sharing the commit (and its inserts) with other sessions' mail
        outcome, logged = committer.run(write)
    for line in logged:  # once committed: a group retried alone logs its ids once
        log.info("post %d to %s from %s: %s%s", *line)
    return outcome


@dataclass(frozen=True, slots=True)
class Write:
    """One transaction's mail and decisions, ready to store (nothing left to parse)."""

    envelope: Envelope
    targets: dict[Kind, list[ListAddress]]
    decisions: list[tuple[MailingList, PostContext, Decision]]
    msg: EmailMessage
    about: _About


#: (post id, list, sender, state, reason): logged once committed
Logged = tuple[int, str, str, str, str]
Stored = tuple[Outcome, list[Logged]]


def committer(db: Database) -> GroupCommit[Write, Stored]:
    """A group committer for `receive`: concurrent sessions share one durable commit."""
    return GroupCommit(db, store_many)


def store_many(session: Session, writes: Sequence[Write]) -> list[Stored]:
    """The raw mail and posts of `writes`, written in `session`: committed (durably)
    before the callers answer 250. One outcome (and the log lines to write once
    committed) per write, in order.

    One multi-row INSERT ... RETURNING per table for all the writes, not the ORM's
    unit of work per message: this runs while SQLite's write lock is held, and
    every statement lets go of the interpreter lock, which other busy threads then
    keep for up to 5 ms before it comes back."""
    inbound_rows: list[dict[str, object]] = []
    for write in writes:
        for kind, group in write.targets.items():
            inbound_rows.append(
                {
                    "mail_from": write.envelope.mail_from,
                    "rcpt_tos": [
                        a.list_address if kind is Kind.POST else _original(a) for a in group
                    ],
                    "kind": kind.value,
                    "state": InboundState.DONE if kind in HANDLED else InboundState.PENDING,
                    "peer": write.envelope.peer[:100],
                    "raw": write.envelope.content,
                }
            )
    inbound_ids = insert_ids(session, InboundMessage, inbound_rows)
    post_rows: list[dict[str, object]] = []
    at = 0
    for write in writes:
        for kind in write.targets:
            inbound_id = inbound_ids[at]
            at += 1
            if kind is not Kind.POST:
                continue
            for mlist, ctx, decision in write.decisions:
                post_rows.append(
                    {
                        "list_id": mlist.id,
                        "inbound_id": inbound_id,
                        "state": _STATES[decision.action],
                        "reason": decision.reason,
                        "sender": ctx.sender[:320],
                        "subject": write.about.subject[:998],
                        "message_id": write.about.message_id[:998],
                    }
                )
    new_posts = iter(insert_ids(session, Post, post_rows))
    inbound_at = iter(inbound_ids)
    audits: list[dict[str, str]] = []
    results: list[Stored] = []
    for write in writes:
        ids: list[int] = []
        pending_ids: list[int] = []
        accepted: list[int] = []
        all_posts: list[int] = []
        states: dict[str, PostState] = {}
        logged: list[Logged] = []
        for kind, group in write.targets.items():
            inbound_id = next(inbound_at)
            ids.append(inbound_id)
            if kind not in HANDLED:
                pending_ids.append(inbound_id)
            if kind is Kind.OWNER:
                inbound = session.get_one(InboundMessage, inbound_id)
                forwarded = _forward_to_owners(session, inbound, group, write.msg)
                accepted.extend(forwarded)
                all_posts.extend(forwarded)
            if kind is not Kind.POST:
                continue
            for mlist, ctx, decision in write.decisions:
                post_id = next(new_posts)
                state = _STATES[decision.action]
                audits.append(
                    {
                        "actor": ctx.sender[:320],
                        "action": f"post.{decision.action.value}",
                        "list_address": mlist.address,
                        "detail": f"post {post_id}: {write.about.entry}"
                        + (f"; {decision.reason}" if decision.reason else ""),
                    }
                )
                all_posts.append(post_id)
                states[mlist.address] = state
                if state is PostState.ACCEPTED:
                    accepted.append(post_id)
                reason = f" ({decision.reason})" if decision.reason else ""
                logged.append((post_id, mlist.address, ctx.sender, state.value, reason))
        outcome = Outcome(
            _stored_reply(all_posts, pending_ids),
            inbound_ids=tuple(ids),
            accepted_posts=tuple(accepted),
            posts=states,
            post_ids=tuple(all_posts),
        )
        results.append((outcome, logged))
    if audits:
        session.connection().execute(sa.insert(_AUDIT_ENTRIES), audits)
    return results


#: The intake's inserts are Core statements (audit entries here, the rest through
#: db.insert_ids): through the ORM (its bulk INSERT, the session's bookkeeping) they
#: cost twice the CPU, while SQLite's write lock is held (issue 15).
_AUDIT_ENTRIES = cast(sa.Table, AuditEntry.__table__)


@dataclass(frozen=True, slots=True)
class _About:
    """Subject and Message-ID, read (parsed) once per message, outside the write lock."""

    subject: str
    message_id: str
    #: the post as an audit entry names it
    entry: str

    @classmethod
    def of(cls, msg: EmailMessage) -> _About:
        subject = mail.header(msg, "Subject") or ""
        message_id = mail.header(msg, "Message-ID") or ""
        return cls(subject, message_id, _about(msg, subject, message_id))


def _about(msg: EmailMessage, subject: str | None = None, message_id: str | None = None) -> str:
    """The post as an audit entry names it (`subject`, `message_id`: already read)."""
    if subject is None:
        subject = mail.header(msg, "Subject") or ""
    if message_id is None:
        message_id = mail.header(msg, "Message-ID") or ""
    subject = " ".join(subject.split())[:200]
    message_id = message_id.strip()[:200]
    return f"subject {subject!r}" + (f", {message_id}" if message_id else "")


def _audit_refusal(
    db: Database, mlist: MailingList, ctx: PostContext, decision: Decision, envelope: Envelope
) -> None:
    """A refused post is not stored, but its refusal is on record.

    Its own transaction: when it cannot be written, the sender still gets the 550.
    """
    try:
        with db.session() as session:
            lists.audit(
                session,
                ctx.sender[:320],
                "post.reject",
                mlist.address,
                f"{_about(ctx.msg)} (peer {envelope.peer or 'unknown'}); {decision.reason}",
            )
    except Exception:
        log.warning("could not write the audit entry for a refused post", exc_info=True)


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


def _normalized(address: str) -> str:
    """The normalized address; one we cannot normalize is kept as it is, so it
    matches no member and an odd From: address can never vanish from the check."""
    try:
        return addresses.normalize(address)
    except InvalidAddress:
        return address.strip()


def build_context(
    session: Session,
    mlist: MailingList,
    msg: EmailMessage,
    envelope: Envelope,
    *,
    recipients: int | None = None,
    now: datetime | None = None,
    policy: PolicySettings | None = None,
    authenticated: frozenset[str] = frozenset(),
) -> PostContext:
    """What the rules see of one post to one list (`recipients`: of this list alone
    unless given, as for a post to several lists)."""
    froms = tuple(dict.fromkeys(_normalized(a) for a in mail.addresses(msg, "From")))
    sender_header = mail.addresses(msg, "Sender")
    # RFC 5322 3.6.2: one mailbox; several leave nobody to stand in
    sender = _normalized(sender_header[0]) if len(sender_header) == 1 else None
    rows = members.rows_for(session, mlist, [*froms, *([sender] if sender else [])])
    by_address: dict[str, list[Member]] = defaultdict(list)
    for row in rows:
        by_address[row.address.lower()].append(row)
    standing = {address: _standing(group) for address, group in by_address.items()}
    if recipients is None:
        recipients = (
            members.recipient_count(session, [mlist.id]) if mlist.approval_threshold > 0 else 0
        )
    return PostContext(
        mlist=mlist,
        msg=msg,
        size=len(envelope.content),
        mail_from=envelope.mail_from,
        from_addresses=froms,
        sender_address=sender,
        standing=standing,
        recipients=recipients,
        now=now or datetime.now(UTC),
        policy=policy or PolicySettings(),
        authenticated=authenticated,
    )


def _standing(rows: list[Member]) -> Standing:
    actions = [r.moderation_action for r in rows if r.moderation_action is not None]
    return Standing(
        roles=frozenset(r.role for r in rows),
        action=max(actions, key=SEVERITY.index) if actions else None,
        emergency=any(r.emergency and r.role is Role.SENDER for r in rows),
    )
