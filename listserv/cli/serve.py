"""`listserv init` (create or upgrade the schema) and `listserv serve` (run the daemon)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable

import click

from listserv import memory
from listserv.cli.app import App, pass_app
from listserv.daemon import INBOUND_DRAIN, Daemon, ListenerPool
from listserv.workers import WorkerPool

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMAT_PID = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


@click.command()
@pass_app
def init(app: App) -> None:
    """Create or upgrade the database schema.

    Brings the schema to this version's newest revision. Safe to run again: an
    up-to-date database is left alone. Run it after installing and after every
    upgrade of listserv.
    """
    db = app.database()
    before, after = db.upgrade()
    if before is None:
        what = f"created at revision {after}"
    elif before == after:
        what = f"already at revision {after}"
    else:
        what = f"upgraded from {before} to {after}"
    click.echo(f"database {db.safe_url}: {what}")


@click.command()
@click.option("--host", default=None, help="Listen on this address instead of [server] host.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Listen on this SMTP port instead of [server] port (0: any free port).",
)
@click.option(
    "--workers",
    type=click.IntRange(0, 64),
    default=None,
    help="Deliver in this many worker processes beside the SMTP listener, instead of"
    " [delivery] workers (0: in the listener's own process).",
)
@click.option(
    "--listeners",
    type=click.IntRange(1, 64),
    default=None,
    help="Take SMTP sessions in this many processes sharing the port, instead of"
    " [server] listeners.",
)
@click.option("--delivery-only", is_flag=True, hidden=True)
@click.option("--listen-only", is_flag=True, hidden=True)
@click.option("--listen-fd", "listen_fds", type=int, multiple=True, hidden=True)
@pass_app
def serve(
    app: App,
    host: str | None,
    port: int | None,
    workers: int | None,
    listeners: int | None,
    delivery_only: bool,
    listen_only: bool,
    listen_fds: tuple[int, ...],
) -> None:
    """Run the daemon (SMTP in, delivery, HTTP).

    One process runs the SMTP listener, the post scheduler, the delivery
    workers and the HTTP endpoint; logs go to stderr. With --workers N, N
    processes beside it deliver (one Python process uses one core), each line
    of the log then naming its process. With --listeners N (2 or more), N
    processes take the SMTP sessions from the port this one binds, which then
    keeps the scheduler and the HTTP endpoint.
    SIGTERM or SIGINT stops it gracefully: no new mail is accepted, and the
    batches in hand are finished or handed back (exit 0).

    The SMTP listener belongs behind an MTA (e.g. Postfix relaying the list
    domains to it): keep it on loopback and a high port, not port 25 on all
    interfaces. Logs are at [logging] level; --debug adds aiosmtpd's
    per-command log (logger mail.log).

    \b
    Example:
      listserv --config /etc/listserv.toml serve --host 127.0.0.1 --port 8025
    """
    settings = app.settings
    if host is not None or port is not None:
        server = dataclasses.replace(
            settings.server,
            host=settings.server.host if host is None else host,
            port=settings.server.port if port is None else port,
        )
        settings = dataclasses.replace(settings, server=server)
    count = settings.delivery.workers if workers is None else workers
    listening = settings.server.listeners if listeners is None else listeners
    level = logging.DEBUG if app.debug else settings.logging.level.upper()
    several = count > 0 or listening > 1 or delivery_only or listen_only
    logging.basicConfig(format=LOG_FORMAT_PID if several else LOG_FORMAT, level=level, force=True)
    if not app.debug:  # alembic logs two INFO lines each time the schema revision is read
        logging.getLogger("alembic").setLevel(logging.WARNING)
        # aiosmtpd logs every command at INFO: 3.5 MB for 50,000 NOOPs.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    more = _listener_pool(app, listening) if listening > 1 else None
    if delivery_only:
        daemon = Daemon(settings, app.db, role="delivery")
    elif listen_only:
        if not listen_fds:
            raise click.UsageError("--listen-only takes the sockets of its front (--listen-fd)")
        daemon = Daemon(settings, app.db, role="listener", listen_fds=listen_fds)
    elif count:
        pool = WorkerPool(
            _child_argv(app, "--delivery-only"),
            count,
            # a worker's own stop: the engine's two waits of [delivery] timeout, and more
            stop_timeout=2 * settings.delivery.timeout + 45,
        )
        daemon = Daemon(settings, app.db, role="front", workers=pool, listeners=more)
    else:
        daemon = Daemon(settings, app.db, listeners=more)
    try:
        asyncio.run(_run(daemon))
    except OSError as exc:  # the listener could not bind: in use, not ours, no permission
        if app.debug:
            raise
        raise click.ClickException(f"cannot start: {exc.strerror or exc}") from exc


def _listener_pool(app: App, count: int) -> ListenerPool:
    """`count` SMTP listener processes, for the sockets the front binds."""

    def pool(fds: list[int], on_accepted: Callable[[], None]) -> WorkerPool:
        argv = _child_argv(app, "--listen-only")
        for fd in fds:
            argv += ["--listen-fd", str(fd)]
        return WorkerPool(
            argv,
            count,
            stop_timeout=INBOUND_DRAIN + 15,
            kind="SMTP listener",
            on_output=on_accepted,
            pass_fds=fds,
        )

    return pool


def _child_argv(app: App, *args: str) -> list[str]:
    """The command line of a child process: this listserv, the same configuration."""
    argv = [sys.executable, "-m", "listserv.cli"]
    if app.config_path is not None:
        argv += ["--config", str(app.config_path)]
    if app.debug:
        argv.append("--debug")
    return [*argv, "serve", *args]


async def _run(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, daemon.stop)
    settled = loop.create_task(_settle(daemon))
    try:
        await daemon.run()
    finally:
        settled.cancel()
        for signum in signals:
            loop.remove_signal_handler(signum)


async def _settle(daemon: Daemon) -> None:
    """Once the daemon runs, what this process made so far is kept out of the garbage
    collector's full scans (memory.settle). Here, not in Daemon: it freezes the
    whole process, which is the daemon's only when it was started by `serve`."""
    await daemon.ready.wait()
    memory.settle()
