"""A list's members kept in step with another system: a CSV file or an SQL query.

A sync named NAME owns the member rows it added (`members.source` "sync:NAME"):
it adds the source's addresses that are not members yet and removes its own
rows whose address left the source. Owners, moderators, senders and members
from anywhere else (manual, import, subscribe, another sync) are never removed,
and an address that unsubscribed (`members.unsubscribed`) is never added back:
it is reported as skipped.

The source is read completely, and every address checked (syntax by
email-validator through `addresses`, and with `check_mx` its domain's mail
servers, one look-up per domain) before the database is touched, so a source
that fails half-way (a bad byte in the file, an SQL error on row 50,000)
changes nothing; then one transaction reads the roster once, inserts and
deletes in bulk and commits. 100,000 rows cost a few statements, not one per row.

The daemon runs the ``[[sync]]`` entries of the configuration (`run`), each
every `interval` seconds, first at start; a failing source is logged and
changes nothing.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import lists, members
from listserv.config import SYNC_NAME, DnsSettings, Settings, SyncSettings
from listserv.db import Database
from listserv.dns import DnsError, Resolver
from listserv.errors import InvalidAddress, InvalidInput, ListservError
from listserv.models import MailingList, Member, Role

log = logging.getLogger(__name__)

#: column names a source's CSV header may give the address under
ADDRESS_COLUMNS = ("address", "email")
#: members.display_name's length: a longer name is cut, not an error for the whole sync
NAME_LENGTH = 255
#: rows per INSERT or DELETE statement (SQLite allows 32,766 parameters a statement)
CHUNK = 5000


class SyncError(InvalidInput):
    """The sync source could not be read."""


@dataclass(frozen=True, slots=True)
class SourceRow:
    row: int  # the CSV line, or the query's row number (from 1)
    address: str
    name: str


@dataclass
class SyncReport:
    """What a sync did (or, dry run, would do)."""

    source: str  # "sync:NAME"
    dry_run: bool = False
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    #: (row, reason): not a valid address, or its domain does not accept mail
    invalid: list[tuple[int, str]] = field(default_factory=list)
    #: (row, address): left the list themselves, so not added back
    unsubscribed: list[tuple[int, str]] = field(default_factory=list)
    unchanged: int = 0

    def summary(self) -> str:
        return (
            f"added {len(self.added)}, removed {len(self.removed)}, unchanged {self.unchanged},"
            f" invalid {len(self.invalid)}, skipped {len(self.unsubscribed)} (unsubscribed)"
        )


def source_name(name: str) -> str:
    """`members.source` of the rows sync `name` adds; InvalidInput for a bad name."""
    if not SYNC_NAME.match(name):
        raise InvalidInput(
            f"not a sync name: {name!r} (lower-case letters, digits, '.', '-' and '_',"
            " at most 59 characters)"
        )
    return f"sync:{name}"


# -- reading sources -------------------------------------------------------------


def read_csv(path: str | Path) -> list[SourceRow]:
    """Rows of a CSV file whose header names an `address` (or `email`) column and
    optionally `name`; other columns are ignored. SyncError when the file is unusable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SyncError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_csv(data, str(path))


def parse_csv(data: bytes, where: str = "the file") -> list[SourceRow]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SyncError(f"{where} is not UTF-8 text (byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader)]
        column = next((header.index(c) for c in ADDRESS_COLUMNS if c in header), None)
        if column is None:
            raise SyncError(
                f"{where}, line 1: the header must name an 'address' column,"
                f" got {','.join(header)!r}"
            )
        name_column = header.index("name") if "name" in header else None
        rows: list[SourceRow] = []
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            address = row[column].strip() if column < len(row) else ""
            name = ""
            if name_column is not None and name_column < len(row):
                name = row[name_column].strip()
            rows.append(SourceRow(reader.line_num, address, name))
    except StopIteration:
        raise SyncError(f"{where} is empty: expected a header line naming 'address'") from None
    except csv.Error as exc:
        raise SyncError(f"{where}, line {reader.line_num}: not valid CSV: {exc}") from None
    return rows


def read_sql(url: str, query: str) -> list[SourceRow]:
    """Rows of `query` (address[, name]) on the database at `url`, read in a transaction
    that is rolled back, never committed. SyncError for a bad URL, a database that
    cannot be reached or a failing query; its password is never shown."""
    try:
        target = sa.engine.make_url(url)
        if target.drivername == "postgresql":  # as db.Database: psycopg 3 is what we ship
            target = target.set(drivername="postgresql+psycopg")
        engine = sa.create_engine(target)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ValueError) as exc:
        raise SyncError(f"bad SQL URL {_hide(url)}: {_first_line(exc)}") from None
    except ImportError as exc:
        raise SyncError(f"bad SQL URL {_hide(url)}: its driver is missing ({exc})") from None
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.text(query))
            if not result.returns_rows:
                raise SyncError("the query returned no rows: it must SELECT address[, name]")
            rows = [
                SourceRow(
                    number,
                    "" if row[0] is None else str(row[0]).strip(),
                    "" if len(row) < 2 or row[1] is None else str(row[1]).strip(),
                )
                for number, row in enumerate(result, 1)
            ]
    except sa.exc.SQLAlchemyError as exc:
        reason = exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig else exc
        raise SyncError(f"SQL source {_hide(url)}: {_first_line(reason)}") from None
    finally:
        engine.dispose()
    return rows


def _hide(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):
        return repr(url[:80])


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__


# -- checking addresses -------------------------------------------------------------


class MailDomains:
    """Whether a domain accepts mail, asked once per domain (one sync's cache).

    RFC 5321 §5.1: mail goes to the MX hosts, else to the domain's own A/AAAA
    address; a null MX (RFC 7505: one MX whose host is ".") says no mail at all.
    A DNS failure refuses too (the address is not added this time, and retried
    at the next sync): an unchecked address is not a checked one.
    """

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self._seen: dict[str, str | None] = {}

    def refusal(self, domain: str) -> str | None:
        """Why `domain` does not accept mail, or None when it does."""
        if domain not in self._seen:
            self._seen[domain] = self._ask(domain)
        return self._seen[domain]

    def _ask(self, domain: str) -> str | None:
        try:
            mx = self.resolver.mx(domain)
            if mx:
                if all(host == "." for _, host in mx):
                    return f"{domain} accepts no mail (null MX, RFC 7505)"
                return None
            if self.resolver.a(domain) or self.resolver.aaaa(domain):
                return None
        except DnsError as exc:
            return f"could not check {domain} in DNS: {exc}"
        return f"{domain} has no mail server (no MX, A or AAAA record)"


@dataclass
class _Checked:
    """The source's rows by lower-case address (first row wins), and the refused ones."""

    wanted: dict[str, SourceRow] = field(default_factory=dict)
    #: listed in the source but refused by the DNS check: not added, not removed
    listed: set[str] = field(default_factory=set)
    invalid: list[tuple[int, str]] = field(default_factory=list)


def _check(mlist: MailingList, rows: Sequence[SourceRow], domains: MailDomains | None) -> _Checked:
    checked = _Checked()
    for row in rows:
        if not row.address:
            checked.invalid.append((row.row, "no address"))
            continue
        try:
            addr = members.member_address(mlist, row.address)
        except InvalidAddress as exc:
            checked.invalid.append((row.row, str(exc)))
            continue
        key = addr.lower()
        if key in checked.wanted or key in checked.listed:
            continue  # listed twice: the first row counts
        refused = domains.refusal(addr.rpartition("@")[2]) if domains else None
        if refused:
            checked.listed.add(key)
            checked.invalid.append((row.row, f"{addr}: {refused}"))
            continue
        checked.wanted[key] = SourceRow(row.row, addr, row.name[:NAME_LENGTH])
    return checked


# -- applying -------------------------------------------------------------------------


def sync(
    db: Database,
    list_address: str,
    rows: Sequence[SourceRow],
    *,
    name: str,
    domains: MailDomains | None = None,
    dry_run: bool = False,
    actor: str = "",
) -> SyncReport:
    """Bring the members of `list_address` from sync `name` in step with `rows`.

    Addresses are checked (and DNS asked) before the write transaction opens, so
    the database is never locked while the network is slow.
    """
    source = source_name(name)
    with db.reading() as session:
        mlist = lists.get(session, list_address)
    checked = _check(mlist, rows, domains)
    if dry_run:
        with db.reading() as session:
            return _apply(session, lists.get(session, list_address), checked, source, True, actor)
    with db.session() as session:
        return _apply(session, lists.get(session, list_address), checked, source, False, actor)


def _apply(
    session: Session,
    mlist: MailingList,
    checked: _Checked,
    source: str,
    dry_run: bool,
    actor: str,
) -> SyncReport:
    report = SyncReport(source=source, dry_run=dry_run, invalid=checked.invalid)
    present: dict[str, tuple[int, str, str]] = {
        address.lower(): (member_id, address, row_source)
        for member_id, address, row_source in session.execute(
            sa.select(Member.id, Member.address, Member.source).where(
                Member.list_id == mlist.id, Member.role == Role.MEMBER
            )
        )
    }
    gone = members.unsubscribed(session, mlist)
    new: list[SourceRow] = []
    for key, row in checked.wanted.items():
        if key in present:
            report.unchanged += 1
        elif key in gone:
            report.unsubscribed.append((row.row, row.address))
        else:
            new.append(row)
    stale = [
        (member_id, address)
        for key, (member_id, address, row_source) in present.items()
        if row_source == source and key not in checked.wanted and key not in checked.listed
    ]
    report.added = [row.address for row in new]
    report.removed = sorted((address for _, address in stale), key=str.lower)
    report.invalid.sort()
    if dry_run or not (new or stale):
        return report
    for start in range(0, len(new), CHUNK):
        session.execute(
            sa.insert(Member),
            [
                {
                    "list_id": mlist.id,
                    "address": r.address,
                    "display_name": r.name,
                    "source": source,
                }
                for r in new[start : start + CHUNK]
            ],
        )
    ids = [member_id for member_id, _ in stale]
    for start in range(0, len(ids), CHUNK):
        session.execute(sa.delete(Member).where(Member.id.in_(ids[start : start + CHUNK])))
    lists.audit(
        session, actor or source, "members.sync", mlist.address, f"{source}: {report.summary()}"
    )
    return report


# -- the daemon's schedule ----------------------------------------------------------------


def run_once(
    db: Database, entry: SyncSettings, *, resolver: Resolver | None = None
) -> SyncReport | None:
    """One scheduled sync, logged with its counts; None (logged as an error, nothing
    changed) when its source or list failed."""
    try:
        if entry.path:
            rows = read_csv(entry.path)
        else:
            rows = read_sql(entry.from_sql, entry.query)
        domains = None
        if entry.check_mx:
            domains = MailDomains(resolver or Resolver.from_settings(DnsSettings()))
        report = sync(db, entry.list, rows, name=entry.name, domains=domains)
    except (ListservError, sa.exc.SQLAlchemyError) as exc:
        log.error(
            "sync %s to %s failed, nothing changed: %s",
            entry.name,
            entry.list,
            _first_line(exc),
            extra={"event": "sync_failed", "sync": entry.name},
        )
        return None
    log.info(
        "sync %s to %s: %s",
        entry.name,
        entry.list,
        report.summary(),
        extra={
            "event": "sync_done",
            "sync": entry.name,
            "added": len(report.added),
            "removed": len(report.removed),
            "invalid": len(report.invalid),
            "skipped": len(report.unsubscribed),
        },
    )
    return report


async def run(
    db: Database,
    settings: Settings,
    *,
    stop: asyncio.Event,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run every ``[[sync]]`` entry at start and then every `interval` seconds, one at a
    time, in a thread, until `stop`. Returns at once when there are none."""
    if not settings.sync:
        return
    resolver = None
    if any(e.check_mx for e in settings.sync):
        resolver = await asyncio.to_thread(Resolver.from_settings, settings.dns)
    due = {e.name: clock() for e in settings.sync}
    while not stop.is_set():
        for entry in settings.sync:
            if stop.is_set():
                return
            if due[entry.name] <= clock():
                try:
                    await asyncio.to_thread(run_once, db, entry, resolver=resolver)
                except Exception:  # a bug in one sync must not stop the daemon
                    log.exception("sync %s to %s failed", entry.name, entry.list)
                due[entry.name] = clock() + entry.interval
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, min(due.values()) - clock()))
        except TimeoutError:
            pass
