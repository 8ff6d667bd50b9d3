"""`listserv report POST_ID`: what happened to a post's recipients, the numbers of its
delivery report and every failure (the mail lists at most the first 1,000)."""

from __future__ import annotations

from datetime import datetime

import click

from listserv import reports
from listserv.cli.app import App, echo_json, echo_table, pass_app


@click.command()
@click.argument("post_id", type=int, metavar="POST_ID")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@pass_app
def report(app: App, post_id: int, fmt: str) -> None:
    """Recipients, delivered, deferred, failed and bounced for one post, then every
    failed recipient with its SMTP code and reply.

    POST_ID is the number in "250 2.0.0 Queued as N" and the POST column of
    `listserv queue status --all`. Works for a post still sending too (the
    numbers so far). Bounces are those the bounce processor attributed to the
    post, up to its delivery report and after it.
    """
    with app.db.reading() as session:
        result = reports.build(session, post_id)
    if fmt == "json":
        echo_json(result.to_json())
        return
    percent = result.percent_delivered
    before, after = result.bounces_before, result.bounces_after
    click.echo(
        f"post {result.post_id} to {result.list_address}: {result.subject or '(no subject)'}"
    )
    click.echo(f"from {result.sender}; {result.state.value}")
    lines = [
        ("recipients", result.recipients),
        ("delivered", f"{result.delivered} ({'-' if percent is None else f'{percent:.1f}%'})"),
        ("deferred", result.deferred),
        ("pending", result.pending),
        ("failed", result.failed),
        ("bounced before report", _bounces(before)),
        ("bounced after report", _bounces(after)),
        ("report sent", _when(result.reported_at)),
        ("follow-up", _followup(result)),
    ]
    echo_table([(f"{name}:", value) for name, value in lines])
    if result.failures:
        click.echo("")
        echo_table(
            [
                (f.address, "-" if f.code is None else f.code, " ".join(f.detail.split()))
                for f in result.failures
            ],
            header=("ADDRESS", "CODE", "REPLY"),
        )


def _bounces(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "0"
    return f"{total} ({', '.join(f'{n} {kind}' for kind, n in sorted(counts.items()))})"


def _followup(result: reports.Report) -> str:
    if result.followup_sent_at is not None:
        return f"sent {_when(result.followup_sent_at)}"
    if result.followup_due_at is not None:
        return f"due {_when(result.followup_due_at)} (bounces until then are counted)"
    return "-"


def _when(when: datetime | None) -> str:
    return "-" if when is None else when.isoformat(timespec="seconds")
