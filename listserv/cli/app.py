"""What every command shares: the `App` context object, built lazily, and output helpers.

Nothing is loaded until a command asks for it, so ``--help`` works without a
config file or a database.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from listserv import config
from listserv.config import Settings
from listserv.db import Database


class App:
    """Settings and database for one invocation; the click context object."""

    def __init__(self, config_path: Path | None, *, debug: bool = False) -> None:
        self.config_path = config_path
        self.debug = debug
        self._settings: Settings | None = None
        self._database: Database | None = None
        self._ready = False

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = config.load(self.config_path)
        return self._settings

    def database(self) -> Database:
        """The database, whatever state its schema is in (for `init`)."""
        if self._database is None:
            s = self.settings.database
            self._database = Database(s.url, echo=s.echo)
        return self._database

    @property
    def db(self) -> Database:
        """The database, checked once to be at the newest schema revision."""
        database = self.database()
        if not self._ready:
            database.check_ready()
            self._ready = True
        return database

    def close(self) -> None:
        if self._database is not None:
            self._database.dispose()
            self._database = None


pass_app = click.make_pass_decorator(App)

FORMATS = click.Choice(["table", "json"])


def echo_table(rows: Sequence[Sequence[object]], header: Sequence[str] | None = None) -> None:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    lines = [[str(c) for c in row] for row in ([header] if header else []) + list(rows)]
    if not lines:
        return
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    for line in lines:
        cells = [c.ljust(w) for c, w in zip(line, widths, strict=False)] + line[len(widths) :]
        click.echo("  ".join(cells).rstrip())


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def one_line(text: str) -> str:
    """An error message fit for a single ``Error:`` line."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or text
