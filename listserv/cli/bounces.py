"""`listserv bounces`: read a bounce, and see or reset members' bounce scores.

``parse FILE`` needs no database: an admin asking "why was this member disabled?"
can run it on the stored bounce or on one saved from a mail client.
"""

from __future__ import annotations

from pathlib import Path

import click
import sqlalchemy as sa

from listserv import addresses, lists
from listserv.bounces import parse as bounce_parse
from listserv.bounces import score
from listserv.cli.app import FORMATS, App, echo_json, echo_table, one_line, pass_app
from listserv.errors import InvalidAddress, NotFound
from listserv.models import BounceEvent, DeliveryStatus, Member, Role

ACTOR = "cli"


@click.group()
def bounces() -> None:
    """Bounces: parse a bounce message, list scores, show a member's history, reset."""


@bounces.command("parse")
@click.argument("path", metavar="FILE", type=click.Path(path_type=Path))
def parse_(path: Path) -> None:
    """The addresses a bounce message in FILE reports, as JSON (empty lists: none)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        reason = one_line(exc.strerror or str(exc))
        raise click.ClickException(f"cannot read {path}: {reason}") from None
    echo_json(bounce_parse.parse(raw).as_json())


def _when(value: object) -> str:
    return "-" if value is None else value.isoformat(timespec="seconds")  # type: ignore[attr-defined]


def _status(member: Member) -> str:
    if member.delivery_status is DeliveryStatus.ENABLED:
        return "enabled"
    return f"disabled ({member.disabled_reason or 'unknown'})"


@bounces.command("list")
@click.argument("address", metavar="LIST")
@click.option("--all", "show_all", is_flag=True, help="Every member, not only those with bounces.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_app
def list_(app: App, address: str, show_all: bool, fmt: str) -> None:
    """Members of LIST with a bounce score or disabled for bounces, highest score first."""
    with app.db.reading() as session:
        mlist = lists.get(session, address)
        stmt = sa.select(Member).where(Member.list_id == mlist.id, Member.role == Role.MEMBER)
        if not show_all:
            stmt = stmt.where(
                sa.or_(
                    Member.bounce_score > 0,
                    Member.last_bounce_at.is_not(None),
                    Member.disabled_reason == score.REASON,
                )
            )
        rows = list(
            session.scalars(
                stmt.order_by(Member.bounce_score.desc(), sa.func.lower(Member.address))
            )
        )
    if fmt == "json":
        echo_json(
            [
                {
                    "address": m.address,
                    "score": m.bounce_score,
                    "last_bounce_at": None if m.last_bounce_at is None else _when(m.last_bounce_at),
                    "delivery": m.delivery_status.value,
                    "disabled_reason": m.disabled_reason,
                    "warnings_sent": m.bounce_warnings_sent,
                }
                for m in rows
            ]
        )
        return
    if not rows:
        click.echo(f"no bounces on {mlist.address}")
        return
    echo_table(
        [(m.address, f"{m.bounce_score:g}", _when(m.last_bounce_at), _status(m)) for m in rows],
        header=("MEMBER", "SCORE", "LAST BOUNCE", "STATUS"),
    )


@bounces.command()
@click.argument("address", metavar="LIST")
@click.argument("member", metavar="ADDRESS")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_app
def show(app: App, address: str, member: str, fmt: str) -> None:
    """A member's bounce state and every bounce recorded for it, oldest first."""
    lowered = _address(member)
    with app.db.reading() as session:
        mlist = lists.get(session, address)
        rows = score.member_rows(session, mlist, lowered)
        events = list(
            session.scalars(
                sa.select(BounceEvent)
                .where(BounceEvent.list_id == mlist.id, BounceEvent.address == lowered.lower())
                .order_by(BounceEvent.at, BounceEvent.id)
            )
        )
    if not rows and not events:
        raise NotFound(f"{lowered} is not a member of {mlist.address} and has no bounces")
    state = rows[0] if rows else None
    if fmt == "json":
        echo_json(
            {
                "address": lowered,
                "member": state is not None,
                "score": state.bounce_score if state else None,
                "delivery": state.delivery_status.value if state else None,
                "disabled_reason": state.disabled_reason if state else None,
                "warnings_sent": state.bounce_warnings_sent if state else None,
                "events": [
                    {
                        "at": _when(e.at),
                        "kind": e.kind.value,
                        "source": e.source,
                        "status": e.status,
                        "post_id": e.post_id,
                        "inbound_id": e.inbound_id,
                        "detail": e.detail,
                    }
                    for e in events
                ],
            }
        )
        return
    if state is None:
        click.echo(f"{lowered}: not a member of {mlist.address} (any more)")
    else:
        click.echo(
            f"{state.address}: score {state.bounce_score:g}, last bounce"
            f" {_when(state.last_bounce_at)}, delivery {_status(state)},"
            f" warnings sent {state.bounce_warnings_sent}"
        )
    if not events:
        click.echo("no bounces recorded")
        return
    echo_table(
        [
            (
                _when(e.at),
                e.kind.value,
                e.source,
                e.status or "-",
                e.post_id or "-",
                " ".join(e.detail.split())[:120],
            )
            for e in events
        ],
        header=("AT", "KIND", "SOURCE", "STATUS", "POST", "DETAIL"),
    )


@bounces.command()
@click.argument("address", metavar="LIST")
@click.argument("member", metavar="ADDRESS")
@pass_app
def reset(app: App, address: str, member: str) -> None:
    """Clear a member's bounce score and warnings; delivery back on if bounces stopped it."""
    lowered = _address(member)
    with app.db.session() as session:
        mlist = lists.get(session, address)
        rows = score.reset(session, mlist, lowered, actor=ACTOR, action="bounces.reset")
        click.echo(f"{rows[0].address}: bounce score reset, delivery {_status(rows[0])}")


def _address(text: str) -> str:
    try:
        return addresses.normalize(text)
    except InvalidAddress as exc:
        raise click.ClickException(str(exc)) from None
