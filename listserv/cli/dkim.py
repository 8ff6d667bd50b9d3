"""`listserv dkim ...`: create, list, rotate and activate the domains' DKIM signing keys.

A key signs nothing until its record is published: `activate` and `rotate
--activate` look the record up first (through the `[dns]` resolvers) and refuse
while DNS does not carry the key, unless told `--force`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click

from listserv import dnscheck
from listserv.cli.app import FORMATS, App, echo_json, echo_table, pass_app
from listserv.distribute import dkim as keys
from listserv.dns import DnsError, Resolver
from listserv.errors import InvalidInput, ListservError, NotFound

ALGORITHM = click.Choice(list(keys.ALGORITHMS))


@click.group()
def dkim() -> None:
    """DKIM signing keys for the domains of the lists."""


@dkim.command()
@click.argument("domain")
@click.option("--selector", required=True, metavar="SEL", help="A new, never used selector.")
@click.option(
    "--algorithm",
    type=ALGORITHM,
    default="rsa",
    show_default=True,
    help="rsa, or ed25519 (RFC 8463) for a second signature beside the RSA one.",
)
@click.option(
    "--bits",
    type=click.Choice([str(b) for b in keys.KEY_SIZES]),
    default="2048",
    show_default=True,
    help="RSA key size (ignored for ed25519).",
)
@click.option(
    "--activate",
    is_flag=True,
    help="Sign with the new key at once, before its DNS record is published"
    " (receivers fail DKIM until it is).",
)
@pass_app
def keygen(
    app: App, domain: str, selector: str, algorithm: keys.Algorithm, bits: str, activate: bool
) -> None:
    """Create a new key for DOMAIN under a new selector; print its DNS record.

    A domain's first key is active at once. A later key (an Ed25519 key beside
    an RSA one too) signs nothing until `listserv dkim activate DOMAIN SEL`, run
    once its record is published. A selector is never reused: the old key's
    record must stay in DNS until the mail it signed has been delivered.

    \b
    Example:
      listserv dkim keygen lists.example.org --selector 2025a
      listserv dkim keygen lists.example.org --selector 2025e --algorithm ed25519
    """
    keys_dir = app.settings.keys_dir
    key = keys.generate_key(
        keys_dir, domain, selector, int(bits), activate=activate, algorithm=algorithm
    )
    path = key.path(keys_dir)
    try:
        now_active = keys.active_selector(keys_dir, key.domain, algorithm) == key.selector
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
    if now_active and algorithm == "ed25519" and keys.active_key(keys_dir, key.domain) is None:
        click.echo(
            "note: many receivers verify only RSA signatures; keep an RSA key active"
            f" too (`listserv dkim keygen {key.domain} --selector SEL`)"
        )


@dkim.command()
@click.argument("domain")
@click.argument("selector")
@click.option(
    "--force", is_flag=True, help="Activate even though DNS does not publish the key (yet)."
)
@pass_app
def activate(app: App, domain: str, selector: str, force: bool) -> None:
    """Sign DOMAIN's mail with its existing key SELECTOR from the next post on.

    The key's DNS record must be published first (`listserv dkim keygen` printed
    it): this looks it up and refuses while DNS does not carry the key, since
    mail signed with an unpublished key fails DKIM. The key it replaces (of the
    same algorithm) is kept, marked retired. No restart is needed.

    \b
    Example:
      listserv dkim activate lists.example.org 2025b
    """
    settings = app.settings
    key = keys.find_key(settings.keys_dir, domain, selector)
    _require_published(app, key, force)
    _activate(app, key)


@dkim.command()
@click.argument("domain")
@click.option(
    "--algorithm",
    type=ALGORITHM,
    default="rsa",
    show_default=True,
    help="Which of the domain's keys to rotate.",
)
@click.option("--selector", metavar="SEL", help="The new key's selector (default: sYYYYMMDD).")
@click.option(
    "--bits",
    type=click.Choice([str(b) for b in keys.KEY_SIZES]),
    default="2048",
    show_default=True,
    help="RSA key size.",
)
@click.option(
    "--activate",
    "finish",
    is_flag=True,
    help="Second step: sign with the waiting key, once DNS publishes it.",
)
@click.option("--force", is_flag=True, help="With --activate: even when DNS does not publish it.")
@pass_app
def rotate(
    app: App,
    domain: str,
    algorithm: keys.Algorithm,
    selector: str | None,
    bits: str,
    finish: bool,
    force: bool,
) -> None:
    """Replace DOMAIN's signing key in two steps, without breaking mail in flight.

    \b
    1. `listserv dkim rotate DOMAIN` makes a new key (pending) and prints its
       TXT record; publish it. Run again, it shows the waiting key and whether
       DNS carries it yet.
    2. `listserv dkim rotate DOMAIN --activate` checks that DNS publishes the
       new key, then signs with it. The old key is kept (retired): leave its
       record published for as long as `listserv dns check` says, because mail
       it signed may still be queued or retried.

    \b
    Example:
      listserv dkim rotate lists.example.org
      listserv dkim rotate lists.example.org --activate
    """
    settings = app.settings
    keys_dir = settings.keys_dir
    domain = keys.check_domain(domain)
    if force and not finish:
        raise InvalidInput("--force goes with --activate")
    if finish:
        key = _waiting_key(app, domain, algorithm, selector)
        _require_published(app, key, force)
        _activate(app, key)
        return
    pending = keys.pending_keys(keys_dir, domain, algorithm)
    if pending and selector is None:
        waiting = keys.find_key(keys_dir, domain, str(pending[-1].selector))
        click.echo(f"{waiting.selector} is waiting to replace the active {algorithm} key")
        _show_published(app, waiting)
        return
    if selector is None:
        selector = keys.new_selector(keys_dir, domain, algorithm, datetime.now(UTC).date())
    key = keys.generate_key(keys_dir, domain, selector, int(bits), algorithm=algorithm)
    path = key.path(keys_dir)
    if keys.active_selector(keys_dir, key.domain, algorithm) == key.selector:
        click.echo(f"wrote {path} (the first {algorithm} key of {key.domain}: active now)")
        click.echo(f"publish at {key.dns_name()} as a TXT record:")
        click.echo(key.dns_record())
        return
    click.echo(f"wrote {path} (pending: {key.domain} keeps signing with its current key)")
    click.echo(f"publish at {key.dns_name()} as a TXT record:")
    click.echo(key.dns_record())
    click.echo(
        f"then run `listserv dkim rotate {key.domain}"
        f"{'' if algorithm == 'rsa' else ' --algorithm ' + algorithm} --activate`"
    )


def _waiting_key(
    app: App, domain: str, algorithm: keys.Algorithm, selector: str | None
) -> keys.SigningKey:
    """The key `rotate --activate` switches to: SELECTOR, or the only pending key."""
    keys_dir = app.settings.keys_dir
    if selector is not None:
        return keys.find_key(keys_dir, domain, selector)
    pending = keys.pending_keys(keys_dir, domain, algorithm)
    if not pending:
        raise NotFound(
            f"no {algorithm} key of {domain} is waiting to be activated:"
            f" run `listserv dkim rotate {domain}` first"
        )
    if len(pending) > 1:
        names = ", ".join(str(p.selector) for p in pending)
        raise InvalidInput(f"several {algorithm} keys of {domain} wait ({names}): add --selector")
    return keys.find_key(keys_dir, domain, str(pending[0].selector))


def _require_published(app: App, key: keys.SigningKey, force: bool) -> None:
    """Refuse (one line, exit 1) unless DNS publishes `key`, or warn under --force."""
    try:
        published = dnscheck.key_published(Resolver(app.settings.dns), key)
    except DnsError as exc:
        published = dnscheck.Published(False, f"DNS error: {exc}")
    if published.matches:
        return
    if force:
        click.echo(f"warning: {published.detail}; activating anyway (--force)", err=True)
        return
    raise InvalidInput(
        f"not activating {key.selector}: {published.detail}; publish the record"
        f" `listserv dkim rotate {key.domain}` printed and try again, or add --force"
    )


def _activate(app: App, key: keys.SigningKey) -> None:
    settings = app.settings
    keys_dir = settings.keys_dir
    before = keys.active_selector(keys_dir, key.domain, key.algorithm)
    now = datetime.now(UTC)
    key = keys.activate_key(keys_dir, key.domain, key.selector, now=now)
    click.echo(
        f"{key.selector} is now the active DKIM key for {key.domain}"
        f" (its record must be published at {key.dns_name()})"
    )
    if before and before != key.selector:
        keep = timedelta(seconds=settings.delivery.retry_give_up_after) + dnscheck.KEEP_MARGIN
        click.echo(
            f"{before} is retired, not deleted: keep its record published until"
            f" {now + keep:%Y-%m-%d %H:%M} UTC (mail it signed may still be in flight)"
        )


def _show_published(app: App, key: keys.SigningKey) -> None:
    try:
        published = dnscheck.key_published(Resolver(app.settings.dns), key)
    except DnsError as exc:
        published = dnscheck.Published(False, f"DNS error: {exc}")
    if published.matches:
        click.echo(f"{published.detail}: run `listserv dkim rotate {key.domain} --activate`")
    else:
        click.echo(f"not published yet ({published.detail}); publish at {key.dns_name()}:")
        click.echo(key.dns_record())


@dkim.command("list")
@click.argument("domain", required=False)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_app
def list_(app: App, domain: str | None, fmt: str) -> None:
    """Every DKIM key (or DOMAIN's): selector, algorithm, size, state and problems.

    State: active (signing), pending (made, not yet activated: publish its
    record first), retired (replaced; keep its record published while mail it
    signed may be in flight, see `listserv dns check`).
    """
    infos = keys.list_keys(app.settings.keys_dir, domain)
    if fmt == "json":
        echo_json(
            [
                {
                    "domain": i.domain,
                    "selector": i.selector,
                    "algorithm": i.algorithm,
                    "bits": i.bits,
                    "active": i.active,
                    "state": i.state,
                    "retired_at": i.retired_at.isoformat() if i.retired_at else None,
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
            i.algorithm,
            i.bits or "-",
            _state(i),
            i.problem or "ok",
        )
        for i in infos
    ]
    echo_table(rows, header=("DOMAIN", "SELECTOR", "ALGORITHM", "BITS", "STATE", "STATUS"))


def _state(info: keys.KeyInfo) -> str:
    if info.state == "retired" and info.retired_at is not None:
        return f"retired {info.retired_at:%Y-%m-%d}"
    return info.state or "-"
