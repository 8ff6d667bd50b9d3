"""`listserv queue status|pause|resume|cancel`: what the delivery queue holds, and control
over a post on its way out.

Pause and cancel act through the database, so they reach every daemon sharing it:
the dispatchers stop claiming the post's batches, and within about a second stop
the ones they hold (a batch in the middle of its SMTP transaction finishes, and is
recorded). Nobody is skipped or sent twice on resume; a cancel fails only the
recipients nobody has answered for.
"""

from __future__ import annotations

import getpass
import sys
import time
from collections.abc import Sequence
from datetime import datetime

import click

from listserv.cli.app import FORMATS, App, echo_json, echo_table, pass_app
from listserv.distribute import batches, throttle
from listserv.distribute import status as store
from listserv.distribute.status import PostStatus
from listserv.distribute.throttle import Bucket
from listserv.models import PostState

SUBJECT_WIDTH = 40
COUNTS = ("waiting", "in_flight", "deferred", "delivered", "failed")
HEADER = ("POST", "LIST", "STATE", *(c.upper().replace("_", " ") for c in COUNTS))
HEADER += ("NEXT ATTEMPT", "SUBJECT")
#: characters of a progress bar on a terminal
BAR_WIDTH = 20
#: states in which a post still has recipients to send to
ACTIVE = (PostState.ACCEPTED, PostState.SENDING)


@click.group()
def queue() -> None:
    """Inspect the delivery queue; pause, resume or cancel a post."""


@queue.command()
@click.option("--all", "everything", is_flag=True, help="Include posts already sent.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option(
    "--watch", is_flag=True, help="Refresh until no post is sending any more (or Ctrl-C)."
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between two refreshes with --watch.",
)
@pass_app
def status(app: App, everything: bool, fmt: str, watch: bool, interval: float) -> None:
    """One line per post not yet done: recipients waiting, in flight, deferred, delivered, failed.

    Held, failed and cancelled posts are listed too, each with its reason on a
    line of its own; --all adds the ones already sent. Destination domains the
    throttle slowed down or paused follow. The last line counts stored mail
    (commands, bounces) waiting for its processor. The POST column is the number
    in the daemon's "250 2.0.0 Queued as N" reply and in its log lines.

    On a terminal each post gets a progress bar; piped, or with --format json,
    the output is plain.
    """
    if fmt == "json":
        posts, domains, inbound = _load(app, everything)
        _echo_json(posts, domains, inbound)
        return
    if sys.stdout.isatty():
        _rich_status(app, everything, watch, interval)
        return
    posts, domains, inbound = _load(app, everything)
    _echo_plain(posts, domains, inbound)
    # piped --watch: a progress line per post that was sending, until none is
    while watch and (watched := {p.post_id for p in posts if p.state in ACTIVE}):
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return
        posts, _, _ = _load(app, True)
        for p in posts:
            if p.post_id in watched:
                click.echo(_progress_line(p))


def _load(app: App, everything: bool) -> tuple[list[PostStatus], list[Bucket], dict[str, int]]:
    with app.db.reading() as session:
        posts = store.status(session, include_finished=everything)
        domains = store.throttled_domains(session, throttle.Throttle(app.settings.throttle))
        inbound = store.pending_inbound(session)
    return posts, domains, inbound


def _echo_json(posts: list[PostStatus], domains: list[Bucket], inbound: dict[str, int]) -> None:
    data: dict[str, object] = {
        "posts": [
            {
                "post_id": p.post_id,
                "list": p.list_address,
                "state": p.state.value,
                "paused": p.paused,
                "recipients": p.recipients,
                # false while the snapshot is written: `recipients` is a running total
                "recipients_final": not p.snapshotting,
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
    if domains:  # only when there are some: the key is new
        data["throttled_domains"] = [
            {
                "domain": b.key,
                "rate_factor": b.factor,
                "paused_until": _iso(b.paused_until),
                "reason": b.note,
            }
            for b in domains
        ]
    echo_json(data)


def _echo_plain(posts: list[PostStatus], domains: list[Bucket], inbound: dict[str, int]) -> None:
    if not posts and not inbound and not domains:
        click.echo("queue is empty")
        return
    if posts:
        echo_table(
            [
                (
                    p.post_id,
                    p.list_address,
                    p.shown_state,
                    *(p.counts.get(key, 0) for key in COUNTS),
                    _short_time(p.next_attempt_at),
                    _truncate(p.subject),
                )
                for p in posts
            ],
            header=HEADER,
        )
    for p in posts:
        if p.reason and p.state.value in ("failed", "held", "cancelled"):
            click.echo(f"post {p.post_id} {p.state.value}: {' '.join(p.reason.split())}")
    for line in _domain_lines(domains):
        click.echo(line)
    if inbound:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(inbound.items()))
        click.echo(f"stored mail waiting for later processing: {kinds}")


def _domain_lines(domains: Sequence[Bucket]) -> list[str]:
    lines = []
    for b in domains:
        what = []
        if b.paused_until is not None:
            what.append(f"paused until {_short_time(b.paused_until)}")
        if b.factor < 1.0:
            what.append(f"slowed to {b.factor:.0%} of its rate")
        why = f" ({' '.join(b.note.split())})" if b.note else ""
        lines.append(f"domain {b.key}: {', '.join(what)}{why}")
    return lines


def _progress_line(p: PostStatus) -> str:
    total = p.recipients or sum(p.counts.values())
    share = f" ({p.answered / total:.0%})" if total else ""
    c = p.counts
    return (
        f"post {p.post_id} {p.list_address}: {p.shown_state} {p.answered}/{total}"
        f"{'+ (snapshot being written)' if p.snapshotting else ''}{share};"
        f" {c.get('delivered', 0)} delivered, {c.get('failed', 0)} failed,"
        f" {c.get('deferred', 0)} deferred, {c.get('in_flight', 0)} in flight,"
        f" {c.get('waiting', 0)} waiting"
    )


def _rich_status(app: App, everything: bool, watch: bool, interval: float) -> None:
    """Progress bars on a terminal; with --watch, refreshed in place until done."""
    from rich.console import Console, Group
    from rich.live import Live
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    console = Console()

    def render() -> tuple[Group, bool]:
        posts, domains, inbound = _load(app, everything)
        if not posts and not inbound and not domains:
            return Group(Text("queue is empty")), False
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("POST", no_wrap=True, min_width=4)
        table.add_column("LIST", overflow="ellipsis", max_width=32)
        table.add_column("STATE", no_wrap=True, min_width=9)
        table.add_column("PROGRESS", no_wrap=True, width=BAR_WIDTH)
        table.add_column("DONE", no_wrap=True, justify="right")
        table.add_column("OPEN / TROUBLE", overflow="fold")
        for p in posts:
            total = p.recipients or sum(p.counts.values())
            bar = ProgressBar(total=max(total, 1), completed=p.answered, width=BAR_WIDTH)
            counts = [
                f"{p.counts[key]} {key.replace('_', ' ')}"
                for key in ("waiting", "in_flight", "deferred", "failed")
                if p.counts.get(key)
            ]
            table.add_row(
                str(p.post_id),
                p.list_address,
                p.shown_state,
                bar if total else Text(""),
                f"{p.answered}/{total}{'+' if p.snapshotting else ''}",
                ", ".join(counts) or "-",
            )
        extra = [
            f"post {p.post_id} {p.state.value}: {' '.join(p.reason.split())}"
            for p in posts
            if p.reason and p.state.value in ("failed", "held", "cancelled")
        ]
        extra += _domain_lines(domains)
        if inbound:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(inbound.items()))
            extra.append(f"stored mail waiting for later processing: {kinds}")
        active = any(p.state in ACTIVE for p in posts)
        return Group(table, *(Text(line) for line in extra)), active

    shown, active = render()
    if not watch:
        console.print(shown)
        return
    try:
        with Live(shown, console=console, auto_refresh=False) as live:
            while active:
                time.sleep(interval)
                shown, active = render()
                live.update(shown, refresh=True)
    except KeyboardInterrupt:
        pass


def _actor() -> str:
    """Who acts, for the audit log and "cancelled by ...": the login name of the operator."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name (a container without an entry)
        return "cli"


@queue.command()
@click.argument("post_id", metavar="POST", type=int)
@pass_app
def pause(app: App, post_id: int) -> None:
    """Stop sending a post: its batches are not claimed until `queue resume POST`.

    Batches in flight finish their SMTP transaction (a personalized one stops
    between two messages) and are recorded: nobody is skipped or sent twice.
    """
    with app.db.session() as session:
        done = batches.pause(session, post_id, actor=_actor())
    click.echo(
        f"paused post {post_id} to {done.list_address}: {done.open_recipients} recipient(s)"
        f" not yet answered; {done.in_flight} batch(es) in flight finish first"
    )


@queue.command()
@click.argument("post_id", metavar="POST", type=int)
@pass_app
def resume(app: App, post_id: int) -> None:
    """Send a paused post again, where it left off."""
    with app.db.session() as session:
        done = batches.resume(session, post_id, actor=_actor())
    click.echo(
        f"resumed post {post_id} to {done.list_address}: {done.open_recipients} recipient(s) to go"
    )


@queue.command()
@click.argument("post_id", metavar="POST", type=int)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def cancel(app: App, post_id: int, yes: bool) -> None:
    """Stop a post for good: its open recipients fail with "cancelled by <you>".

    The post is finished (state cancelled) and the cancel is written to the audit
    log. Batches in flight finish and are recorded as they answer. Asks for
    confirmation unless --yes is given; without a terminal to ask on, it refuses.
    """
    if not yes:
        if not sys.stdin.isatty():
            raise click.ClickException(
                f"not cancelling post {post_id}: no terminal to confirm on; pass --yes"
            )
        click.confirm(f"Cancel post {post_id}? Its open recipients will not get it.", abort=True)
    with app.db.session() as session:
        done = batches.cancel(session, post_id, actor=_actor())
    tail = f"; {done.in_flight} batch(es) in flight finish first" if done.in_flight else ""
    click.echo(
        f"cancelled post {post_id} to {done.list_address}: {done.failed} recipient(s) failed{tail}"
    )


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat(timespec="seconds")


def _short_time(when: datetime | None) -> str:
    return "-" if when is None else when.strftime("%Y-%m-%d %H:%M:%SZ")


def _truncate(subject: str) -> str:
    text = " ".join(subject.split())
    return text if len(text) <= SUBJECT_WIDTH else text[: SUBJECT_WIDTH - 3] + "..."
