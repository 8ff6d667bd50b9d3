"""`listserv held`: list, show and decide held posts.

The decisions go through `moderation.holds.decide`, the function an e-mailed
reply uses, so the sender is told the same things and the audit log says who
(actor ``cli``). The IDs are post ids, as in `listserv queue status`.
"""

from __future__ import annotations

import click

from listserv import mail
from listserv import members as roster
from listserv.cli.app import FORMATS, App, echo_json, echo_table, pass_app
from listserv.models import MailingList, utcnow
from listserv.moderation import holds, verdicts
from listserv.moderation.verdicts import Verb, Verdict

ACTOR = "cli"
SUBJECT_WIDTH = 40
HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID")


@click.group()
def held() -> None:
    """Posts held for a moderator: list, show, approve, reject, discard."""


@held.command("list")
@click.argument("address", metavar="[LIST]", required=False)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_app
def list_(app: App, address: str | None, fmt: str) -> None:
    """Held posts, oldest first, of every list or of LIST."""
    now = utcnow()
    with app.db.reading() as session:
        rows = holds.held_posts(session, address)
    if fmt == "json":
        echo_json(
            [
                {
                    "id": h.id,
                    "list": h.list_address,
                    "sender": h.sender,
                    "subject": h.subject,
                    "reason": h.reason,
                    "size": h.size,
                    "created_at": h.created_at.isoformat(timespec="seconds"),
                    "age_seconds": int((now - h.created_at).total_seconds()),
                }
                for h in rows
            ]
        )
        return
    if not rows:
        click.echo("no held posts")
        return
    echo_table(
        [
            (
                h.id,
                h.list_address,
                h.sender,
                holds.age(now - h.created_at),
                _truncate(h.subject),
                " ".join(h.reason.split()),
            )
            for h in rows
        ],
        header=("ID", "LIST", "SENDER", "AGE", "SUBJECT", "REASON"),
    )


@held.command()
@click.argument("post_id", metavar="ID", type=int)
@click.option("--lines", default=holds.PREVIEW_LINES, show_default=True, help="Lines of text.")
@pass_app
def show(app: App, post_id: int, lines: int) -> None:
    """A held post: its headers, why it is held, size, recipients and first lines."""
    with app.db.reading() as session:
        post = holds.get_held(session, post_id)
        mlist = session.get_one(MailingList, post.list_id)
        raw = holds.raw_of(session, post)
        recipients = roster.recipient_count(session, [mlist.id])
        expiry = holds.expires_at(post, mlist)
    msg = mail.parse(raw)
    waited = holds.age(utcnow() - post.created_at)
    click.echo(f"Post:       {post.id} to {mlist.address}, held {waited}")
    click.echo(f"Reason:     {' '.join(post.reason.split()) or '(none)'}")
    click.echo(f"Size:       {len(raw)} bytes")
    click.echo(f"Recipients: {recipients}")
    click.echo(f"Expires:    {expiry.strftime('%Y-%m-%d %H:%M UTC')}")
    click.echo("")
    for name in HEADERS:
        value = mail.header(msg, name)
        if value is not None:
            click.echo(f"{name}: {' '.join(value.split())}")
    text = verdicts.body_text(msg).splitlines()
    click.echo("")
    for line in text[:lines]:
        click.echo(line)
    if len(text) > lines:
        click.echo(f"[... {len(text) - lines} more lines]")


@held.command()
@click.argument("post_id", metavar="ID", type=int)
@click.option(
    "--at",
    "when",
    default=None,
    metavar="WHEN",
    help=f"Send it then, not now: {verdicts.TIME_FORMAT}.",
)
@pass_app
def approve(app: App, post_id: int, when: str | None) -> None:
    """Approve a held post: it goes to the members (at WHEN), and its sender is told."""
    at = verdicts.parse_when(when, app.settings.policy.zone()) if when else None
    _decide(app, post_id, Verdict(Verb.APPROVE, at=at))


@held.command()
@click.argument("post_id", metavar="ID", type=int)
@click.option("--reason", default="", metavar="TEXT", help="Told to the sender.")
@pass_app
def reject(app: App, post_id: int, reason: str) -> None:
    """Reject a held post: its sender is told, with the reason."""
    _decide(app, post_id, Verdict(Verb.REJECT, reason=" ".join(reason.split())))


@held.command()
@click.argument("post_id", metavar="ID", type=int)
@pass_app
def discard(app: App, post_id: int) -> None:
    """Discard a held post: nobody on the list gets it; its sender is told it was not sent."""
    _decide(app, post_id, Verdict(Verb.DISCARD))


def _decide(app: App, post_id: int, verdict: Verdict) -> None:
    with app.db.session() as session:
        decided = holds.decide(session, post_id, verdict, actor=ACTOR, now=utcnow())
    click.echo(decided.summary)


def _truncate(subject: str) -> str:
    text = " ".join(subject.split())
    return text if len(text) <= SUBJECT_WIDTH else text[: SUBJECT_WIDTH - 3] + "..."
