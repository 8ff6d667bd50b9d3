"""Delivery reports: when a post's last batch is done, its poster (and the owners, when
the list says so) gets the numbers and the failures by mail; bounces that arrive in
the list's report window after it make one short follow-up.

Every number is an SQL aggregate over `deliveries` and `bounce_events`, so a post to
100,000 members costs a few grouped counts, not 100,000 rows in memory; the mail
carries at most MAIL_FAILURES failures (`listserv report POST_ID` shows them all).

Exactly once, across crashes and daemons sharing a database: a report is queued in
the transaction whose conditional UPDATE (``reported_at IS NULL``) marks the post
reported, and a follow-up in the one that clears ``followup_due_at``. A second
daemon's UPDATE matches no row; a crash before the commit leaves the post owed, and
the next round (this daemon restarted, or another) sends it. Only posts to the
members are reported (never a notice, a report or a forward to the owners), and
never to an envelope sender RFC 3834 forbids answering.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import addresses, mail, notices
from listserv.addresses import Kind
from listserv.config import Settings
from listserv.db import Database
from listserv.errors import NotFound
from listserv.models import (
    Audience,
    BatchState,
    BounceEvent,
    BounceKind,
    Delivery,
    DeliveryBatch,
    InboundMessage,
    MailingList,
    Member,
    Post,
    PostState,
    RecipientState,
    Role,
    utcnow,
)

log = logging.getLogger("listserv.reports")

#: failures listed in a report mail; the rest are counted ("and N more")
MAIL_FAILURES = 1000
#: posts reported (or followed up) per transaction
DUE_BATCH = 50
#: the slowest rhythm of the loop, whatever poll_interval says (seconds)
MAX_INTERVAL = 5.0
#: states in which a post's recipients are all answered for, once its batches are done
FINISHED = (PostState.SENT, PostState.CANCELLED)
#: bounce_events written from our own SMTP replies repeat the failure table: not counted
SMTP_SOURCE = "smtp"
#: how much of a stored message is read to decide whom to answer (its header section)
HEADER_BYTES = 64 * 1024
#: characters of a failure's SMTP text in a mail (the CLI shows it whole)
MAIL_DETAIL = 200


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient that did not get the post: the last SMTP reply, or why not."""

    address: str
    code: int | None
    detail: str


@dataclass(frozen=True, slots=True)
class Bounce:
    """One bounce attributed to the post (the bounces processor's bounce_events row)."""

    address: str
    kind: BounceKind
    status: str
    detail: str
    at: datetime


@dataclass
class Report:
    """What happened to one post's recipients, as its report and `listserv report` say."""

    post_id: int
    list_address: str
    subject: str
    sender: str
    state: PostState
    audience: Audience
    message_id: str
    finished_at: datetime | None
    reported_at: datetime | None
    followup_due_at: datetime | None
    followup_sent_at: datetime | None
    recipients: int = 0
    delivered: int = 0
    deferred: int = 0
    pending: int = 0
    failed: int = 0
    #: the first failures by address (all of them unless a limit was asked for)
    failures: list[Failure] = field(default_factory=list)
    #: bounces by kind that arrived up to the report, and after it
    bounces_before: dict[str, int] = field(default_factory=dict)
    bounces_after: dict[str, int] = field(default_factory=dict)

    @property
    def percent_delivered(self) -> float | None:
        """Delivered recipients in percent, one decimal (None: the post had none)."""
        if not self.recipients:
            return None
        return round(100.0 * self.delivered / self.recipients, 1)

    @property
    def more_failures(self) -> int:
        """Failures beyond those listed."""
        return max(0, self.failed - len(self.failures))

    def to_json(self) -> dict[str, Any]:
        return {
            "post_id": self.post_id,
            "list": self.list_address,
            "subject": self.subject,
            "sender": self.sender,
            "state": self.state.value,
            "finished_at": _iso(self.finished_at),
            "reported_at": _iso(self.reported_at),
            "followup_sent_at": _iso(self.followup_sent_at),
            "recipients": self.recipients,
            "delivered": self.delivered,
            "deferred": self.deferred,
            "pending": self.pending,
            "failed": self.failed,
            "percent_delivered": self.percent_delivered,
            "bounces": {
                "before_report": _kinds(self.bounces_before),
                "after_report": _kinds(self.bounces_after),
            },
            "failures": [
                {"address": f.address, "code": f.code, "detail": f.detail} for f in self.failures
            ],
        }


# -- reading ----------------------------------------------------------------------------


def build(session: Session, post_id: int, *, failures: int | None = None) -> Report:
    """The report of a post as it stands now; `failures` caps the listed failures.

    NotFound names the post when there is none (the POST column of `queue status`).
    """
    row = session.execute(
        sa.select(
            Post.id,
            MailingList.local_part,
            MailingList.domain,
            Post.subject,
            Post.sender,
            Post.state,
            Post.audience,
            Post.message_id,
            Post.finished_at,
            Post.reported_at,
            Post.followup_due_at,
            Post.followup_sent_at,
        )
        .join(MailingList, MailingList.id == Post.list_id)
        .where(Post.id == post_id)
    ).one_or_none()
    if row is None:
        raise NotFound(f"no post {post_id} (the POST column of `listserv queue status --all`)")
    report = Report(
        post_id=row.id,
        list_address=f"{row.local_part}@{row.domain}",
        subject=row.subject,
        sender=row.sender,
        state=row.state,
        audience=row.audience,
        message_id=row.message_id,
        finished_at=row.finished_at,
        reported_at=row.reported_at,
        followup_due_at=row.followup_due_at,
        followup_sent_at=row.followup_sent_at,
    )
    counts = session.execute(
        sa.select(Delivery.state, sa.func.count(Delivery.id))
        .where(Delivery.post_id == post_id)
        .group_by(Delivery.state)
    )
    for state, n in counts:
        setattr(report, state.value, int(n))
        report.recipients += int(n)
    if report.failed:
        report.failures = list(failure_rows(session, post_id, limit=failures))
    report.bounces_before = bounce_counts(session, post_id, until=report.reported_at)
    if report.reported_at is not None:
        report.bounces_after = bounce_counts(session, post_id, after=report.reported_at)
    return report


def failure_rows(session: Session, post_id: int, *, limit: int | None = None) -> Iterator[Failure]:
    """The post's failed recipients by address, read a slice at a time."""
    stmt = (
        sa.select(Delivery.address, Delivery.code, Delivery.detail)
        .where(Delivery.post_id == post_id, Delivery.state == RecipientState.FAILED)
        .order_by(sa.func.lower(Delivery.address), Delivery.id)
        .execution_options(yield_per=2000)
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    for address, code, detail in session.execute(stmt):
        yield Failure(address, code, detail)


def _bounce_filter(
    post_id: int, after: datetime | None, until: datetime | None
) -> list[sa.ColumnElement[bool]]:
    where = [BounceEvent.post_id == post_id, BounceEvent.source != SMTP_SOURCE]
    if after is not None:
        where.append(BounceEvent.at > after)
    if until is not None:
        where.append(BounceEvent.at <= until)
    return where


def bounce_counts(
    session: Session,
    post_id: int,
    *,
    after: datetime | None = None,
    until: datetime | None = None,
) -> dict[str, int]:
    """Bounces of the post by kind in (after, until], leaving out those recorded from
    our own SMTP replies (they are the failure table already)."""
    rows = session.execute(
        sa.select(BounceEvent.kind, sa.func.count(BounceEvent.id))
        .where(*_bounce_filter(post_id, after, until))
        .group_by(BounceEvent.kind)
    )
    return {kind.value: int(n) for kind, n in rows}


def bounce_rows(
    session: Session, post_id: int, *, after: datetime, until: datetime, limit: int
) -> list[Bounce]:
    """The first `limit` bounces of the post in (after, until], by address."""
    rows = session.execute(
        sa.select(
            BounceEvent.address,
            BounceEvent.kind,
            BounceEvent.status,
            BounceEvent.detail,
            BounceEvent.at,
        )
        .where(*_bounce_filter(post_id, after, until))
        .order_by(BounceEvent.address, BounceEvent.id)
        .limit(limit)
    )
    return [Bounce(*row) for row in rows]


# -- sending ----------------------------------------------------------------------------


def _done_batches(post_id: Any) -> sa.ColumnElement[bool]:
    """No batch of the post is open: a cancelled post's in-flight batches are finishing."""
    return ~sa.exists().where(
        DeliveryBatch.post_id == post_id, DeliveryBatch.state != BatchState.DONE
    )


def due_reports(
    session: Session, *, limit: int = DUE_BATCH, skip: set[int] | None = None
) -> list[int]:
    """Finished posts not yet reported (or found not owed one), oldest first."""
    stmt = (
        sa.select(Post.id)
        .where(Post.state.in_(FINISHED), Post.reported_at.is_(None), _done_batches(Post.id))
        .order_by(Post.id)
        .limit(limit)
    )
    if skip:
        stmt = stmt.where(Post.id.not_in(skip))
    return list(session.scalars(stmt))


def send_report(session: Session, post_id: int, *, now: datetime) -> int:
    """Mark the post reported and queue its report, in the caller's transaction;
    returns the notices queued (0: not owed, or another daemon has it already).

    The conditional UPDATE is the claim: on PostgreSQL a second daemon's UPDATE
    waits for the first's commit and then matches nothing.
    """
    claimed = session.connection().execute(
        sa.update(Post)
        .where(
            Post.id == post_id,
            Post.reported_at.is_(None),
            Post.state.in_(FINISHED),
            _done_batches(post_id),
        )
        .values(reported_at=now)
    )
    if not claimed.rowcount:
        return 0
    post = session.get_one(Post, post_id)
    session.refresh(post)
    if post.audience is not Audience.MEMBERS:
        return 0  # a notice, a report, a forward to the owners: never reported
    mlist = session.get_one(MailingList, post.list_id)
    if not mlist.delivery_reports:
        return 0
    to, in_reply_to = _recipients(session, mlist, post)
    if not to:
        log.info("post %d: no delivery report (nobody to tell)", post_id)
        return 0
    report = build(session, post_id, failures=MAIL_FAILURES)
    window = timedelta(hours=mlist.report_window_hours)
    values = _values(mlist, report, window, followup=bool(window))
    for address in to:
        _queue(session, mlist, "report", values, to=address, in_reply_to=in_reply_to)
    if window:
        post.followup_due_at = now + window
    log.info(
        "post %d: delivery report queued to %s: %d of %d delivered, %d failed",
        post_id,
        ", ".join(to),
        report.delivered,
        report.recipients,
        report.failed,
        extra={"event": "report_queued", "post_id": post_id},
    )
    return len(to)


def due_followups(
    session: Session, *, now: datetime, limit: int = DUE_BATCH, skip: set[int] | None = None
) -> list[int]:
    """Reported posts whose report window has ended, the earliest first."""
    stmt = (
        sa.select(Post.id)
        .where(Post.followup_due_at <= now)
        .order_by(Post.followup_due_at, Post.id)
        .limit(limit)
    )
    if skip:
        stmt = stmt.where(Post.id.not_in(skip))
    return list(session.scalars(stmt))


def send_followup(session: Session, post_id: int, *, now: datetime) -> int:
    """Close the post's report window and, if bounces arrived in it, queue the
    follow-up, in the caller's transaction; returns the notices queued."""
    row = session.execute(
        sa.select(Post.reported_at, Post.followup_due_at).where(Post.id == post_id)
    ).one_or_none()
    if row is None or row.followup_due_at is None or row.followup_due_at > now:
        return 0
    reported_at: datetime | None = row.reported_at
    until: datetime = row.followup_due_at
    claimed = session.connection().execute(
        sa.update(Post)
        .where(Post.id == post_id, Post.followup_due_at == until)
        .values(followup_due_at=None)
    )
    if not claimed.rowcount or reported_at is None:
        return 0
    kinds = bounce_counts(session, post_id, after=reported_at, until=until)
    total = sum(kinds.values())
    if not total:
        return 0
    post = session.get_one(Post, post_id)
    session.refresh(post)
    mlist = session.get_one(MailingList, post.list_id)
    if not mlist.delivery_reports:
        return 0
    to, in_reply_to = _recipients(session, mlist, post)
    if not to:
        return 0
    bounces = bounce_rows(session, post_id, after=reported_at, until=until, limit=MAIL_FAILURES)
    values = _values(mlist, build(session, post_id, failures=0), until - reported_at)
    values.update(
        bounces=total,
        permanent=kinds.get(BounceKind.PERMANENT.value, 0),
        temporary=kinds.get(BounceKind.TEMPORARY.value, 0),
        bounce_table=_bounce_table(bounces, total),
    )
    for address in to:
        _queue(session, mlist, "report_followup", values, to=address, in_reply_to=in_reply_to)
    post.followup_sent_at = now
    log.info(
        "post %d: follow-up report queued to %s: %d bounce(s) in the window",
        post_id,
        ", ".join(to),
        total,
        extra={"event": "followup_queued", "post_id": post_id},
    )
    return len(to)


def _recipients(session: Session, mlist: MailingList, post: Post) -> tuple[list[str], str | None]:
    """Whom the report goes to (the poster, unless RFC 3834 forbids answering; the
    owners when the list says so), each address once; and the post's Message-ID.

    The poster is the envelope sender (RFC 3834 section 4: where a bounce of the
    post would have gone), as for every other notice about a post.
    """
    to: dict[str, str] = {}
    message_id: str | None = None
    if post.inbound_id is not None:
        row = session.execute(
            sa.select(
                InboundMessage.mail_from,
                sa.func.substr(InboundMessage.raw, 1, HEADER_BYTES),
            ).where(InboundMessage.id == post.inbound_id)
        ).one_or_none()
        if row is not None:
            mail_from, head = row
            headers = _headers(bytes(head or b""))
            message_id = mail.header(headers, "Message-ID") or None
            if notices.may_answer(mail_from, headers):
                to[mail_from.lower()] = mail_from
            else:
                log.info("post %d: no report to %r (automatic mail, RFC 3834)", post.id, mail_from)
    if mlist.report_to_owners:
        for address in session.scalars(
            sa.select(Member.address)
            .where(Member.list_id == mlist.id, Member.role == Role.OWNER)
            .order_by(Member.id)
        ):
            to.setdefault(address.lower(), address)
    return list(to.values()), message_id


def _headers(raw: bytes) -> EmailMessage:
    """The header section only (the body may be 10 MB, and is not needed)."""
    msg = BytesHeaderParser(policy=mail.POLICY).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


def _queue(
    session: Session,
    mlist: MailingList,
    name: str,
    values: dict[str, object],
    *,
    to: str,
    in_reply_to: str | None,
) -> None:
    subject, body = _render(name, **values)
    msg = notices.compose(mlist, to=to, subject=subject, body=body, in_reply_to=in_reply_to)
    notices.queue(session, mlist, msg, [to])


def _render(name: str, **values: object) -> tuple[str, str]:
    """(subject, body) of templates/NAME.txt, whose first line is ``Subject: ...``."""
    text = notices.template(name, **values)
    first, _, body = text.partition("\n")
    if not first.lower().startswith("subject:"):
        return f"Delivery report from {values.get('list', 'the list')}", text
    return " ".join(first.partition(":")[2].split())[:900], body.lstrip("\n")


def _values(
    mlist: MailingList, report: Report, window: timedelta, *, followup: bool = False
) -> dict[str, object]:
    """What the report templates may name."""
    percent = report.percent_delivered
    hours = int(window.total_seconds() // 3600)
    outcome = "was cancelled" if report.state is PostState.CANCELLED else "has been sent"
    return {
        "list": mlist.address,
        "owner": addresses.build(mlist.local_part, mlist.domain, Kind.OWNER),
        "post_id": report.post_id,
        "sender": report.sender,
        "subject": " ".join(report.subject.split()) or "(no subject)",
        "outcome": outcome,
        "finished": "" if report.finished_at is None else f", finished {_when(report.finished_at)}",
        "recipients": report.recipients,
        "delivered": report.delivered,
        "deferred": report.deferred + report.pending,
        "failed": report.failed,
        "percent": "-" if percent is None else f"{percent:.1f}%",
        "bounces_so_far": sum(report.bounces_before.values()),
        "failure_table": _failure_table(report),
        "window": f"{hours} hour{'s' if hours != 1 else ''}",
        "followup_note": (
            f"Bounces that arrive in the next {hours} hour{'s' if hours != 1 else ''} are"
            " counted in a\nfollow-up report, if there are any.\n"
            if followup
            else ""
        ),
    }


def _failure_table(report: Report) -> str:
    if not report.failed:
        return "No recipient failed."
    lines = ["Failed recipients (address, SMTP code, reply):", ""]
    lines += _indent(
        table_lines(
            [
                (f.address, "-" if f.code is None else str(f.code), _detail(f.detail))
                for f in report.failures
            ]
        )
    )
    if report.more_failures:
        lines += [
            "",
            f"... and {report.more_failures} more: `listserv report {report.post_id}`"
            " lists them all.",
        ]
    return "\n".join(lines)


def _bounce_table(bounces: Sequence[Bounce], total: int) -> str:
    lines = _indent(
        table_lines(
            [(b.address, b.kind.value, b.status or "-", _detail(b.detail)) for b in bounces]
        )
    )
    if total > len(bounces):
        lines += ["", f"... and {total - len(bounces)} more."]
    return "\n".join(lines)


def table_lines(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    if not rows:
        return []
    widths = [min(max(len(r[i]) for r in rows), 60) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join(
            [c.ljust(w) for c, w in zip(r, widths, strict=False)] + list(r[len(widths) :])
        ).rstrip()
        for r in rows
    ]


def _indent(lines: list[str]) -> list[str]:
    return ["  " + line for line in lines]


def _detail(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAIL_DETAIL else text[: MAIL_DETAIL - 3] + "..."


def _when(when: datetime | None) -> str:
    return "-" if when is None else when.strftime("%Y-%m-%d %H:%M UTC")


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _kinds(counts: dict[str, int]) -> dict[str, int]:
    return {kind.value: counts.get(kind.value, 0) for kind in BounceKind}


# -- the daemon's loop --------------------------------------------------------------------


async def run(db: Database, settings: Settings, *, stop: asyncio.Event, on_queued: Any) -> None:
    """Until `stop`: one round every poll_interval (at most MAX_INTERVAL seconds).

    Nothing is kept between rounds but the posts whose report failed (to log them
    once): a restarted daemon sends whatever reports the database says are owed.
    `[delivery] reports = false` turns the loop off.
    """
    if not settings.delivery.reports:
        return
    interval = min(max(settings.delivery.poll_interval, 0.05), MAX_INTERVAL)
    skip: set[int] = set()
    while not stop.is_set():
        try:
            queued = await asyncio.to_thread(run_once, db, now=utcnow(), skip=skip)
        except Exception:
            log.exception("report round failed (will retry)")
            queued = 0
        if queued:
            on_queued()
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass


def run_once(db: Database, *, now: datetime, skip: set[int] | None = None) -> int:
    """Send every report and follow-up owed at `now`; returns the notices queued."""
    skip = set() if skip is None else skip
    queued = 0
    for due, send in ((_due_reports, send_report), (due_followups, send_followup)):
        while True:
            with db.reading() as session:
                ids = due(session, now=now, skip=skip)
            if not ids:
                break
            with db.session() as session:
                for post_id in ids:
                    try:
                        with session.begin_nested():
                            queued += send(session, post_id, now=now)
                    except Exception:
                        log.exception("post %d: could not queue its report (will skip it)", post_id)
                        skip.add(post_id)
            if len(ids) < DUE_BATCH:
                break
    return queued


def _due_reports(session: Session, *, now: datetime, skip: set[int]) -> list[int]:
    return due_reports(session, skip=skip)
