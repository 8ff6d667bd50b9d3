"""`listserv lists ...`: create, inspect, change and delete mailing lists."""

from __future__ import annotations

import sys

import click

from listserv import lists as store
from listserv import members as roster
from listserv import unsubscribe_links
from listserv.cli.app import FORMATS, App, echo_json, echo_table, pass_app
from listserv.models import DeliveryMode, PostingPolicy, Role


@click.group()
def lists() -> None:
    """Create, list, show, change and delete mailing lists."""


@lists.command()
@click.argument("address", metavar="NAME@DOMAIN")
@click.option("--owner", "owners", multiple=True, metavar="ADDR", help="An owner (repeatable).")
@click.option(
    "--policy",
    type=click.Choice([p.value for p in PostingPolicy]),
    default=PostingPolicy.MEMBERS.value,
    show_default=True,
    help="Who may post: authorized senders only, members, or anyone.",
)
@click.option("--subject-prefix", default=None, help="Subject prefix.  [default: [NAME]]")
@click.option("--description", default="", help="One-line description of the list.")
@click.option(
    "--mode",
    type=click.Choice([m.value for m in DeliveryMode]),
    default=DeliveryMode.SHARED.value,
    show_default=True,
    help="shared: one message per batch; personalized: one per recipient.",
)
@pass_app
def create(
    app: App,
    address: str,
    owners: tuple[str, ...],
    policy: str,
    subject_prefix: str | None,
    description: str,
    mode: str,
) -> None:
    """Create a list.

    \b
    Example:
      listserv lists create staff@lists.example.org --owner boss@example.org --policy announce
    """
    with app.db.session() as session:
        mlist = store.create(
            session,
            address,
            owners=owners,
            policy=PostingPolicy(policy),
            subject_prefix=subject_prefix,
            description=description,
            delivery_mode=DeliveryMode(mode),
        )
        created = mlist.address
    click.echo(f"created list {created} (policy {policy}, mode {mode})")


@lists.command("list")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_app
def list_(app: App, fmt: str) -> None:
    """Every list with its posting policy, delivery mode and member count."""
    with app.db.reading() as session:
        rows = [
            (m.address, m.posting_policy.value, m.delivery_mode.value, n)
            for m, n in store.all_lists(session)
        ]
    if fmt == "json":
        keys = ("address", "policy", "mode", "members")
        echo_json([dict(zip(keys, row, strict=True)) for row in rows])
    elif rows:
        echo_table(rows, header=("ADDRESS", "POLICY", "MODE", "MEMBERS"))
    else:
        click.echo("no lists", err=True)


@lists.command()
@click.argument("address", metavar="NAME@DOMAIN")
@pass_app
def show(app: App, address: str) -> None:
    """Every setting of a list, and how many addresses hold each role.

    effective_delivery_mode is how posts to the members go out, and why: a list
    with one-click unsubscribe in effect is sent one signed copy per recipient.
    """
    with app.db.reading() as session:
        mlist = store.get(session, address)
        settings = store.settings_of(mlist)
        counts = roster.count_by_role(session, mlist)
        mode, why = unsubscribe_links.effective_mode(mlist, app.settings.http.public_base_url)
    rows: list[tuple[str, object]] = [(f"{k}:", v) for k, v in settings.items()]
    rows.append(("effective_delivery_mode:", f"{mode.value} ({why})"))
    rows += [(f"{role.value}s:", counts.get(role, 0)) for role in Role]
    echo_table(rows)


@lists.command("set")
@click.argument("address", metavar="NAME@DOMAIN")
@click.argument("key")
@click.argument("value")
@pass_app
def set_(app: App, address: str, key: str, value: str) -> None:
    """Change one setting of a list (written to the audit log).

    \b
    Settable:
      posting_policy (policy)   announce, members or open
      delivery_mode (mode)      shared or personalized
      subject_prefix, description, footer
      nonmember_action          hold, reject, discard, or default
                                (hold on members lists, reject on announce lists)
      require_authenticated_sender   true/false: posters' mail must pass DKIM/DMARC
      max_message_kb            0: the server's limit
      plain_text_only           true/false
      content_filter            reject or convert (HTML goes out as plain text)
      allow_attachments         true/false
      allowed_mime_types        e.g. text/plain,image/*  (empty: any)
      approval_threshold        hold posts to more recipients than this (0: off)
      blackout                  e.g. 07-01..07-31,12-24..01-06  (empty: none)
      external_links            allow or hold (links outside link_allowlist)
      link_allowlist            e.g. example.org,example.net (subdomains too)
      hold_expiry_days          1 to 3650
      merge_fields              true/false: $name, $address, $unsubscribe_url
                                filled per recipient (the post goes out personalized)
      one_click_unsubscribe     true/false: RFC 8058 one-click List-Unsubscribe
                                (needs [http] public_base_url; one copy per recipient)
      mandatory                 true/false: nobody may leave (no List-Unsubscribe,
                                requests refused politely)
      subscription_policy       open (join by mail, confirmed), approve (confirmed,
                                then an owner approves) or closed (owners add members)
    Booleans take true/false, yes/no, on/off, 1/0.

    \b
    Example:
      listserv lists set staff@lists.example.org policy announce
      listserv lists set staff@lists.example.org blackout 12-24..01-06
    """
    with app.db.session() as session:
        mlist = store.get(session, address)
        store.set_setting(session, mlist, key, value)
        name = store.ALIASES.get(key, key)
        shown = store.settings_of(mlist)[name]
        changed = mlist.address
    click.echo(f"{changed}: {name} = {shown}")


@lists.command()
@click.argument("address", metavar="NAME@DOMAIN")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--force",
    is_flag=True,
    help="Delete even with posts waiting, sending or held; they are cancelled and listed.",
)
@pass_app
def delete(app: App, address: str, yes: bool, force: bool) -> None:
    """Delete a list with its members and queued posts. This cannot be undone.

    Refuses while posts are waiting, sending or held, unless --force is given;
    the posts it then cancels are printed and written to the audit log. Asks
    for confirmation unless --yes is given; without a terminal to ask on, it
    refuses.
    """
    with app.db.reading() as session:
        mlist = store.get(session, address)
        target = mlist.address
        count = sum(roster.count_by_role(session, mlist).values())
        pending = store.in_flight(session, mlist)
    if pending and not force:
        raise store.refusal(target, pending)
    if not yes:
        if not sys.stdin.isatty():
            raise click.ClickException(
                f"not deleting {target}: no terminal to confirm on; pass --yes"
            )
        also = f" and cancel {store.describe(pending)}" if pending else ""
        click.confirm(f"Delete {target} and its {count} member entries{also}?", abort=True)
    with app.db.session() as session:  # asked outside a transaction: no lock held meanwhile
        cancelled = store.delete(session, store.get(session, target), force=force)
    for post in cancelled:
        click.echo(
            f"cancelled post {post.id} ({post.state.value},"
            f" {post.open_recipients} recipient(s) not yet delivered)"
        )
    click.echo(f"deleted list {target}")
