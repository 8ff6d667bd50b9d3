"""Errors an operator can see. Each class's docstring is its default message.

ListservError
 ├── ConfigError          bad or missing configuration
 ├── DatabaseError        database missing, not initialized, unreachable
 ├── NotFound             no such list / member
 ├── AlreadyExists        list already exists
 ├── InvalidAddress       not an e-mail address we accept
 └── InvalidInput         any other bad argument (CSV, setting value, file)
"""

from __future__ import annotations


class ListservError(Exception):
    """listserv failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(ListservError):
    """The configuration is not valid."""


class DatabaseError(ListservError):
    """The database is not usable."""


class NotFound(ListservError):
    """Not found."""


class AlreadyExists(ListservError):
    """Already exists."""


class InvalidAddress(ListservError):
    """Not a valid e-mail address."""


class InvalidInput(ListservError):
    """Invalid input."""
