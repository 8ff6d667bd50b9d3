"""`listserv queue status`: what the delivery queue holds."""

from __future__ import annotations

from datetime import datetime

import click

from listserv.cli.app import FORMATS, App, echo_json, echo_table, pass_app
from listserv.distribute import status as store

SUBJECT_WIDTH = 40
COUNTS = ("waiting", "in_flight", "deferred", "delivered", "failed")
HEADER = ("POST", "LIST", "STATE", *(c.upper().replace("_", " ") for c in COUNTS))
HEADER += ("NEXT ATTEMPT", "SUBJECT")


@click.group()
def queue() -> None:
    """Inspect the delivery queue."""


@queue.command()
@click.option("--all", "everything", is_flag=True, help="Include posts already sent.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_app
def status(app: App, everything: bool, fmt: str) -> None:
    """One line per post not yet done: recipients waiting, in flight, deferred, delivered, failed.

    Held and failed posts are listed too, each with its reason on a line of its
    own; --all adds the ones already sent. The last line counts stored mail
    (commands, bounces) waiting for its processor. The POST column is the number
    in the daemon's "250 2.0.0 Queued as N" reply and in its log lines.
    """
    with app.db.reading() as session:
        posts = store.status(session, include_finished=everything)
        inbound = store.pending_inbound(session)
    if fmt == "json":
        echo_json(
            {
                "posts": [
                    {
                        "post_id": p.post_id,
                        "list": p.list_address,
                        "state": p.state.value,
                        **{key: p.counts.get(key, 0) for key in COUNTS},
                        "next_attempt": _iso(p.next_attempt_at),
                        "subject": p.subject,
                        "reason": p.reason,
                        "created_at": _iso(p.created_at),
                    }
                    for p in posts
                ],
                "pending_inbound": inbound,
            }
        )
        return
    if not posts and not inbound:
        click.echo("queue is empty")
        return
    if posts:
        echo_table(
            [
                (
                    p.post_id,
                    p.list_address,
                    p.state.value,
                    *(p.counts.get(key, 0) for key in COUNTS),
                    _short_time(p.next_attempt_at),
                    _truncate(p.subject),
                )
                for p in posts
            ],
            header=HEADER,
        )
    for p in posts:
        if p.reason and p.state.value in ("failed", "held"):
            click.echo(f"post {p.post_id} {p.state.value}: {' '.join(p.reason.split())}")
    if inbound:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(inbound.items()))
        click.echo(f"stored mail waiting for later processing: {kinds}")


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat(timespec="seconds")


def _short_time(when: datetime | None) -> str:
    return "-" if when is None else when.strftime("%Y-%m-%d %H:%M:%SZ")


def _truncate(subject: str) -> str:
    text = " ".join(subject.split())
    return text if len(text) <= SUBJECT_WIDTH else text[: SUBJECT_WIDTH - 3] + "..."
