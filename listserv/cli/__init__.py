"""The ``listserv`` command: one click group, one module per noun.

Errors are mapped here, once: a `ListservError` (and any database error)
becomes a one-line ``Error: ...`` with exit status 1; click's own usage
errors exit with 2. ``--debug`` lets the original exception and its traceback
through instead.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa

from listserv.cli import bounces, dkim, dns, held, inject, lists, members, queue, report, serve
from listserv.cli.app import App, one_line
from listserv.errors import ListservError


class ListservGroup(click.Group):
    """The top-level group: turns operator-facing errors into one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except ListservError as exc:
            if _debug(ctx):
                raise
            raise click.ClickException(one_line(str(exc))) from exc
        except sa.exc.DBAPIError as exc:  # locked, unreachable, or a schema behind the code
            if _debug(ctx):
                raise
            reason = one_line(str(exc.orig if exc.orig is not None else exc))
            hint = ""
            if "no such table" in reason or "does not exist" in reason:
                hint = " (is the database initialized? run `listserv init`)"
            raise click.ClickException(f"database error: {reason}{hint}") from exc
        except Exception as exc:
            if _debug(ctx) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE):
                raise  # click itself handles a closed pipe (`listserv ... | head`)
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {one_line(str(exc))}"
                " (run with --debug for the traceback)"
            ) from exc


def _debug(ctx: click.Context) -> bool:
    app = ctx.find_object(App)
    return app is not None and app.debug


@click.group(cls=ListservGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="PATH",
    help="Config file. Default: $LISTSERV_CONFIG, else config/listserv.toml if it exists,"
    " else built-in defaults.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks (and debug logs for `serve`).")
@click.version_option(package_name="listserv")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, debug: bool) -> None:
    """listserv: a mailing-list server (SMTP in, posting policy, DKIM, batched delivery).

    \b
    First steps:
      listserv init
      listserv lists create staff@lists.example.org --owner boss@example.org
      listserv members add staff@lists.example.org alice@example.org bob@example.org
      listserv serve
    """
    app = App(config_path, debug=debug)
    ctx.obj = app
    ctx.call_on_close(app.close)


cli.add_command(serve.init)
cli.add_command(serve.serve)
cli.add_command(lists.lists)
cli.add_command(members.members)
cli.add_command(inject.inject)
cli.add_command(queue.queue)
cli.add_command(dkim.dkim)
cli.add_command(dns.dns)
cli.add_command(held.held)
cli.add_command(report.report)
cli.add_command(bounces.bounces)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="listserv")
