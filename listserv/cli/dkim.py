"""`listserv dkim keygen`: create a domain's DKIM signing key."""

from __future__ import annotations

import click

from listserv.cli.app import App, pass_app
from listserv.distribute import dkim as keys


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
@pass_app
def keygen(app: App, domain: str, selector: str, bits: str) -> None:
    """Create a new RSA key for DOMAIN under a new selector and make it the active one.

    Prints the DNS TXT record to publish. A selector is never reused: the old
    key's record must stay in DNS until the mail it signed has been delivered.

    \b
    Example:
      listserv dkim keygen lists.example.org --selector 2025a
    """
    keys_dir = app.settings.keys_dir
    key = keys.generate_key(keys_dir, domain, selector, int(bits))
    path = key.path(keys_dir)
    click.echo(f"wrote {path} (now the active DKIM key for {key.domain})")
    click.echo("publish this DNS record:")
    click.echo(key.dns_record())
