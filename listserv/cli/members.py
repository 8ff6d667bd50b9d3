"""`listserv members ...`: add, remove, list, import, export and sync a list's addresses."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Literal

import click

from listserv import lists as store
from listserv import members as roster
from listserv import sync
from listserv.cli.app import App, echo_table, pass_app
from listserv.dns import Resolver
from listserv.models import ModerationAction, Role

ROLES = click.Choice([r.value for r in Role])
ACTIONS = [a.value for a in ModerationAction]


@click.group()
def members() -> None:
    """Manage a list's addresses and their roles.

    Roles: member (receives posts), owner, moderator, and sender (an authorized
    sender, who may post to an announce list). Members and senders may carry
    their own moderation action; a sender may be an emergency sender.
    """


@members.command()
@click.argument("address", metavar="LIST")
@click.argument("addrs", metavar="ADDR...", nargs=-1, required=True)
@click.option("--role", type=ROLES, default=Role.MEMBER.value, show_default=True)
@click.option("--name", default="", help="Display name for the added addresses.")
@click.option(
    "--moderation",
    type=click.Choice(ACTIONS),
    default=None,
    help="Their own action for their posts, in place of the list's (members and senders).",
)
@click.option(
    "--emergency",
    is_flag=True,
    help="Emergency senders' posts pass the approval threshold and blackouts (senders only).",
)
@pass_app
def add(
    app: App,
    address: str,
    addrs: tuple[str, ...],
    role: str,
    name: str,
    moderation: str | None,
    emergency: bool,
) -> None:
    """Add addresses to a list, in one role.

    Every address is checked before any is added. Addresses already present
    keep their settings: `members set` changes them.

    \b
    Example:
      listserv members add staff@lists.example.org alice@example.org bob@example.org
      listserv members add staff@lists.example.org boss@example.org --role sender
      listserv members add staff@lists.example.org troll@example.net --moderation hold
    """
    with app.db.session() as session:
        mlist = store.get(session, address)
        added, present = roster.add(
            session,
            mlist,
            addrs,
            role=Role(role),
            name=name,
            moderation=ModerationAction(moderation) if moderation else None,
            emergency=emergency,
        )
    for addr in added:
        click.echo(f"added {role}: {addr}")
    for addr in present:
        click.echo(f"already {_a(role)}: {addr}")


@members.command("set")
@click.argument("address", metavar="LIST")
@click.argument("addr", metavar="ADDR")
@click.option(
    "--moderation",
    type=click.Choice([*ACTIONS, roster.CLEAR]),
    default=None,
    help="Own action for the address's posts; none: the list decides again.",
)
@click.option(
    "--emergency/--no-emergency",
    default=None,
    help="An emergency sender's posts pass the approval threshold and blackouts.",
)
@click.option(
    "--role",
    type=click.Choice([r.value for r in roster.MODERATED_ROLES]),
    default=None,
    help="Only this role's entry. Default: the address's member and sender entries.",
)
@pass_app
def set_(
    app: App,
    address: str,
    addr: str,
    moderation: str | None,
    emergency: bool | None,
    role: str | None,
) -> None:
    """Change an address's own moderation action or emergency flag.

    \b
    Example:
      listserv members set staff@lists.example.org troll@example.net --moderation hold
      listserv members set staff@lists.example.org boss@example.org --emergency
      listserv members set staff@lists.example.org troll@example.net --moderation none
    """
    action: ModerationAction | Literal["none"] | None = None
    if moderation == roster.CLEAR:
        action = roster.CLEAR
    elif moderation is not None:
        action = ModerationAction(moderation)
    with app.db.session() as session:
        mlist = store.get(session, address)
        rows = roster.set_flags(
            session,
            mlist,
            addr,
            moderation=action,
            emergency=emergency,
            role=Role(role) if role else None,
        )
        shown = [
            (
                m.address,
                m.role.value,
                f"moderation={m.moderation_action.value if m.moderation_action else 'default'}",
                *(["emergency"] if m.emergency else []),
            )
            for m in rows
        ]
    for row in shown:
        click.echo(" ".join(row))


@members.command()
@click.argument("address", metavar="LIST")
@click.argument("addrs", metavar="ADDR...", nargs=-1, required=True)
@click.option("--role", type=ROLES, default=None, help="Only in this role. Default: every role.")
@pass_app
def remove(app: App, address: str, addrs: tuple[str, ...], role: str | None) -> None:
    """Remove addresses from a list.

    Exit status 0 when at least one address was removed, 1 when none was found.
    """
    with app.db.session() as session:
        mlist = store.get(session, address)
        removed, missing = roster.remove(session, mlist, addrs, role=Role(role) if role else None)
    for addr in removed:
        click.echo(f"removed {addr}")
    for addr in missing:
        click.echo(f"not {_a(role or 'member')}: {addr}", err=True)
    if not removed:
        raise click.exceptions.Exit(1)


@members.command("list")
@click.argument("address", metavar="LIST")
@click.option("--role", type=ROLES, default=None, help="Only this role. Default: every role.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="table: 'ADDRESS ROLE NAME' lines, no header (for cut/awk); csv: as `export`.",
)
@pass_app
def list_(app: App, address: str, role: str | None, fmt: str) -> None:
    """The addresses of a list, one per line, address first.

    \b
    Example:
      listserv members list staff@lists.example.org --role member | awk '{print $1}'
    """
    with app.db.reading() as session:
        mlist = store.get(session, address)
        rows = roster.roster(session, mlist, Role(role) if role else None)
    if fmt != "table":
        click.echo(roster.export(rows, fmt), nl=False)
    elif rows:
        echo_table([(m.address, m.role.value, m.display_name) for m in rows])
    else:
        click.echo("no such addresses" if role else "no members", err=True)


@members.command("import")
@click.argument("address", metavar="LIST")
@click.argument("file", type=click.File("rb"), metavar="FILE.csv")
@pass_app
def import_(app: App, address: str, file: BinaryIO) -> None:
    """Add addresses from a CSV file.

    FILE ('-': stdin) has the header 'address,name,role'; only the address
    column is required, and role defaults to member. Rows already present are
    skipped and invalid rows reported by line number; the rest are imported
    (exit 0). A file that cannot be read as such a CSV imports nothing (exit 1).

    \b
    Example:
      listserv members import staff@lists.example.org people.csv
    """
    with app.db.session() as session:
        mlist = store.get(session, address)
        report = roster.import_csv(session, mlist, file)
    click.echo(
        f"added {report.added}, skipped {len(report.skipped)}, invalid {len(report.invalid)}"
    )
    problems = [(line, "skipped", why) for line, why in report.skipped]
    problems += [(line, "invalid", why) for line, why in report.invalid]
    for line, kind, why in sorted(problems):
        click.echo(f"line {line}: {kind}: {why}")
    if report.invalid:
        click.echo(
            f"{len(report.invalid)} invalid row(s) were not imported: fix them and import again",
            err=True,
        )


@members.command()
@click.argument("address", metavar="LIST")
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True
)
@pass_app
def export(app: App, address: str, fmt: str) -> None:
    """Write a list's addresses as CSV or JSON.

    Every role is included, with its delivery status (enabled or disabled, and
    why), where it came from (manual, import, subscribe, owner, sync:NAME) and
    when it was added (UTC). The CSV
    (address,name,role,status,reason,source,subscribed) can be imported again,
    into this list or another: import reads address, name and role.

    \b
    Example:
      listserv members export staff@lists.example.org > staff.csv
    """
    with app.db.reading() as session:
        rows = roster.roster(session, store.get(session, address))
    click.echo(roster.export(rows, fmt), nl=False)


@members.command("sync")
@click.argument("address", metavar="LIST")
@click.option(
    "--from",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE.csv",
    help="A CSV file whose header names an 'address' (or 'email') column, and 'name'.",
)
@click.option("--from-sql", "url", default=None, metavar="URL", help="A SQLAlchemy URL.")
@click.option(
    "--query", default=None, metavar="SQL", help="With --from-sql: returns address[, name]."
)
@click.option(
    "--source",
    "name",
    default="cli",
    show_default=True,
    metavar="NAME",
    help="The sync's name: it adds members as sync:NAME and removes only those."
    " Use a [[sync]] entry's name to run that sync by hand.",
)
@click.option(
    "--check-mx",
    is_flag=True,
    help="Skip addresses whose domain does not accept mail (no MX, A or AAAA record, or a"
    " null MX) as invalid; such members already there stay.",
)
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@pass_app
def sync_(
    app: App,
    address: str,
    path: Path | None,
    url: str | None,
    query: str | None,
    name: str,
    check_mx: bool,
    dry_run: bool,
) -> None:
    """Make a list's members match a CSV file or an SQL query.

    Adds the source's addresses that are not members, and removes the members
    this sync added earlier (source sync:NAME) that the source no longer lists.
    Owners, moderators, senders and members added any other way (by hand,
    import, subscription, another sync) are never removed; an address that
    unsubscribed is never added back (shown as skipped). Invalid rows are shown
    with their row number and skipped. Everything changes in one transaction,
    or, if the source cannot be read to its end, nothing does.

    \b
    Example:
      listserv members sync staff@lists.example.org --from staff.csv --dry-run
      listserv members sync staff@lists.example.org --source hr \\
        --from-sql postgresql+psycopg://reader@hr.example.org/hr \\
        --query "SELECT email, full_name FROM staff WHERE active"
    """
    if (path is None) == (url is None):
        raise click.UsageError("give either --from FILE.csv or --from-sql URL --query SQL")
    if (url is None) != (query is None):
        raise click.UsageError("--from-sql and --query go together")
    sync.source_name(name)  # a bad name fails before the source is read
    rows = sync.read_csv(path) if path is not None else sync.read_sql(url or "", query or "")
    domains = sync.MailDomains(Resolver.from_settings(app.settings.dns)) if check_mx else None
    report = sync.sync(
        app.db, address, rows, name=name, domains=domains, dry_run=dry_run, actor="cli"
    )
    click.echo(report.summary() + (" (dry run: nothing changed)" if dry_run else ""))
    for added in report.added:
        click.echo(f"{'would add' if dry_run else 'added'} {added}")
    for removed in report.removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {removed}")
    problems = [(row, f"invalid: {why}") for row, why in report.invalid]
    problems += [(row, f"skipped: {a} unsubscribed") for row, a in report.unsubscribed]
    for row, what in sorted(problems):
        click.echo(f"row {row}: {what}")


def _a(role: str) -> str:
    return f"an {role}" if role[0] in "aeiou" else f"a {role}"
