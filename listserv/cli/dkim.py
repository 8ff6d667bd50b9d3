"""`listserv dkim ...`: create, list and activate the domains' DKIM signing keys."""

from __future__ import annotations

import click

from listserv.cli.app import FORMATS, App, echo_json, echo_table, pass_app
from listserv.distribute import dkim as keys
from listserv.errors import ListservError


@click.group()
def dkim() -> None:
    """DKIM signing keys for the domains of the lists."""


@dkim.command()
@click.argument("domain")
@click.option("--selector", required=True, metavar="SEL", help="A new, never used selector.")
@click.option(
    "--bits",
    type=click.Choice([str(b) for b in keys.KEY_SIZES]),
    default="2048",
    show_default=True,
    help="RSA key size.",
)
@click.option(
    "--activate",
    is_flag=True,
    help="Sign with the new key at once, before its DNS record is published"
    " (receivers fail DKIM until it is).",
)
@pass_app
def keygen(app: App, domain: str, selector: str, bits: str, activate: bool) -> None:
    """Create a new RSA key for DOMAIN under a new selector; print its DNS record.

    A domain's first key is active at once. A later key signs nothing until
    `listserv dkim activate DOMAIN SEL`, run once its record is published. A
    selector is never reused: the old key's record must stay in DNS until the
    mail it signed has been delivered.

    \b
    Example:
      listserv dkim keygen lists.example.org --selector 2025a
    """
    keys_dir = app.settings.keys_dir
    key = keys.generate_key(keys_dir, domain, selector, int(bits), activate=activate)
    path = key.path(keys_dir)
    try:
        now_active = keys.active_selector(keys_dir, key.domain) == key.selector
    except ListservError:  # an unreadable `active` file was not replaced: `list` shows it
        now_active = False
    if now_active:
        click.echo(f"wrote {path} (now the active DKIM key for {key.domain})")
        click.echo(
            f"publish at {key.dns_name()} as a TXT record;"
            " receivers fail this key's signatures until it is published:"
        )
    else:
        click.echo(f"wrote {path} (not active yet: {key.domain} keeps its current key)")
        click.echo(
            f"publish at {key.dns_name()} as a TXT record; it becomes active when you run"
            f" `listserv dkim activate {key.domain} {key.selector}`:"
        )
    click.echo(key.dns_record())


@dkim.command()
@click.argument("domain")
@click.argument("selector")
@pass_app
def activate(app: App, domain: str, selector: str) -> None:
    """Sign DOMAIN's mail with its existing key SELECTOR from the next post on.

    Publish the key's DNS record first (`listserv dkim keygen` printed it):
    mail signed with an unpublished key fails DKIM. No restart is needed.

    \b
    Example:
      listserv dkim activate lists.example.org 2025b
    """
    key = keys.activate_key(app.settings.keys_dir, domain, selector)
    click.echo(
        f"{key.selector} is now the active DKIM key for {key.domain}"
        f" (its record must be published at {key.dns_name()})"
    )


@dkim.command("list")
@click.argument("domain", required=False)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_app
def list_(app: App, domain: str | None, fmt: str) -> None:
    """Every DKIM key (or DOMAIN's): selector, size, which one is active, and problems."""
    infos = keys.list_keys(app.settings.keys_dir, domain)
    if fmt == "json":
        echo_json(
            [
                {
                    "domain": i.domain,
                    "selector": i.selector,
                    "bits": i.bits,
                    "active": i.active,
                    "problem": i.problem,
                }
                for i in infos
            ]
        )
        return
    if not infos:
        where = f"for {domain}" if domain else f"under {app.settings.keys_dir}"
        click.echo(f"no DKIM keys {where}")
        return
    rows = [
        (
            i.domain,
            i.selector or "-",
            i.bits or "-",
            "yes" if i.active else "no",
            i.problem or "ok",
        )
        for i in infos
    ]
    echo_table(rows, header=("DOMAIN", "SELECTOR", "BITS", "ACTIVE", "STATUS"))
