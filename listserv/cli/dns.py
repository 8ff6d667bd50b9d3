"""`listserv dns check DOMAIN`: what a list domain publishes in DNS, checked."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from listserv import dnscheck
from listserv.cli.app import FORMATS, App, echo_json, echo_table, pass_app
from listserv.dns import Resolver

#: The exit status when a check fails (1 is a one-line error, 2 a usage error).
EXIT_FAILED = 3


@click.group()
def dns() -> None:
    """DNS records the list domains need (MX, SPF, DKIM, DMARC)."""


@dns.command()
@click.argument("domain")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_app
def check(app: App, domain: str, fmt: str) -> None:
    """Check DOMAIN's MX, SPF, DKIM keys, DMARC and alignment; say what to publish.

    Asks the resolvers of `[dns] nameservers` (else the system's). Each check is
    pass, warn or fail; for each one that is not a pass the record to publish
    follows the table. SPF is checked against `[dns] outbound_ips` (else the
    smarthost's public addresses) and `[dns] spf_include`, MX against
    `[dns] mx_hosts`.

    Exit status: 0 when nothing fails (warnings allowed), 3 when a check fails,
    1 for an error such as an invalid domain.

    \b
    Example:
      listserv dns check lists.example.org
    """
    settings = app.settings
    resolver = Resolver(settings.dns)
    checks = dnscheck.check_domain(settings, resolver, domain, now=datetime.now(UTC))
    if fmt == "json":
        echo_json(
            [
                {
                    "check": c.name,
                    "status": c.status,
                    "detail": c.detail,
                    "publish": list(c.publish),
                }
                for c in checks
            ]
        )
    else:
        echo_table(
            [(c.name, c.status, c.detail) for c in checks], header=("CHECK", "STATUS", "DETAIL")
        )
        fixes = [c for c in checks if c.publish and c.status != "pass"]
        for c in fixes:
            click.echo("")
            click.echo(f"{c.name} ({c.status}): publish")
            for line in c.publish:
                click.echo(f"  {line}")
    if dnscheck.failed(checks):
        click.get_current_context().exit(EXIT_FAILED)
