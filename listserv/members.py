"""Storage verbs for a list's members (every role), and CSV import/export.

Bulk paths look up a chunk of addresses at a time through the list's address
index (`ix_members_address`) and insert the new ones in one statement: an import
of 1,000,000 rows costs a few hundred queries, not one a row, and holds neither
the file nor the list's roster in memory (it peaked near 740 MB when it did).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import BinaryIO, Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import addresses
from listserv.errors import InvalidAddress, InvalidInput, NotFound
from listserv.lists import audit
from listserv.models import (
    DeliveryStatus,
    MailingList,
    Member,
    ModerationAction,
    Role,
    Unsubscription,
    utcnow,
)

CSV_FIELDS = ("address", "name", "role")
#: what `export` adds after CSV_FIELDS; `import_csv` reads past them, so an export
#: imports again (as new rows: status, source and date are the new list's own)
EXPORT_FIELDS = (*CSV_FIELDS, "status", "reason", "source", "subscribed")
#: roles whose posts an own moderation action can steer (owners and moderators are trusted)
MODERATED_ROLES = (Role.MEMBER, Role.SENDER)


@dataclass
class ImportReport:
    added: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    invalid: list[tuple[int, str]] = field(default_factory=list)


def member_address(mlist: MailingList, address: str) -> str:
    """The normalized address, refused if it is one of the list's own: a list that
    is its own member mails every post back to itself. Another list is fine."""
    addr = addresses.normalize(address)
    if addresses.is_own(addr, mlist.local_part, mlist.domain):
        raise InvalidAddress(f"{addr} is one of the addresses of {mlist.address} itself")
    return addr


#: rows an import checks and inserts at a time
IMPORT_CHUNK = 5000
#: bytes of the file an import reads at a time
READ_BLOCK = 1 << 16

#: `list_id` and lower-cased addresses `lowered` (bound per call): the rows these
#: addresses hold on a list, through ix_members_address. Statements built once, as
#: lists.find's: every post asks one (0.50 ms against 0.24 ms, issue 15)
_ON_LIST = sa.and_(
    Member.list_id == sa.bindparam("list_id"),
    sa.func.lower(Member.address).in_(sa.bindparam("lowered", expanding=True)),
)
_PRESENT = sa.select(sa.func.lower(Member.address), Member.role).where(_ON_LIST)
_ROLES_OF = sa.select(Member.role).where(_ON_LIST)
_ROWS_FOR = sa.select(Member).where(_ON_LIST)


def _present(
    session: Session, mlist: MailingList, lowered: Collection[str]
) -> set[tuple[str, Role]]:
    """(lower-case address, role) of those of `lowered` already on the list, asked
    IMPORT_CHUNK addresses at a time."""
    ordered = sorted(lowered)
    found: set[tuple[str, Role]] = set()
    for start in range(0, len(ordered), IMPORT_CHUNK):
        chunk = ordered[start : start + IMPORT_CHUNK]
        rows = session.execute(_PRESENT, {"list_id": mlist.id, "lowered": chunk})
        found.update((address, role) for address, role in rows)
    return found


def add(
    session: Session,
    mlist: MailingList,
    addrs: Sequence[str],
    *,
    role: Role = Role.MEMBER,
    name: str = "",
    moderation: ModerationAction | None = None,
    emergency: bool = False,
    actor: str = "cli",
    source: str = "manual",
) -> tuple[list[str], list[str]]:
    """Add members; returns (added, already present). Every address is validated first.

    `source` says where the rows came from (models.Member.source): a sync removes
    only rows it added itself.

    Addresses already present keep their flags: `set_flags` changes those.
    """
    _check_flags(role, moderation, emergency)
    normalized = [member_address(mlist, a) for a in addrs]
    existing = _present(session, mlist, {a.lower() for a in normalized})
    added: list[str] = []
    skipped: list[str] = []
    for addr in normalized:
        if (addr.lower(), role) in existing:
            skipped.append(addr)
            continue
        existing.add((addr.lower(), role))
        added.append(addr)
    if added:
        session.execute(
            sa.insert(Member),
            [
                {
                    "list_id": mlist.id,
                    "address": a,
                    "role": role,
                    "display_name": name,
                    "moderation_action": moderation,
                    "emergency": emergency,
                    "source": source,
                }
                for a in added
            ],
        )
        flags = _describe_flags(moderation, emergency)
        audit(
            session,
            actor,
            "members.add",
            mlist.address,
            f"{role.value}{f' ({flags})' if flags else ''}: {', '.join(added)}",
        )
    return added, skipped


def _check_flags(role: Role | None, moderation: ModerationAction | None, emergency: bool) -> None:
    if moderation is not None and role is not None and role not in MODERATED_ROLES:
        raise InvalidInput(
            f"a moderation action applies to members and senders only, not to {role.value}s"
        )
    if emergency and role is not None and role is not Role.SENDER:
        raise InvalidInput(
            "only an authorized sender (role sender) can be an emergency sender,"
            f" not a {role.value}"
        )


def _describe_flags(moderation: ModerationAction | None, emergency: bool) -> str:
    parts = [f"moderation={moderation.value}"] if moderation is not None else []
    return ", ".join([*parts, "emergency"] if emergency else parts)


#: `set_flags(moderation=CLEAR)`: the list decides again
CLEAR: Literal["none"] = "none"


def set_flags(
    session: Session,
    mlist: MailingList,
    address: str,
    *,
    moderation: ModerationAction | Literal["none"] | None = None,
    emergency: bool | None = None,
    role: Role | None = None,
    actor: str = "cli",
) -> list[Member]:
    """Change an address's own moderation action (CLEAR: back to the list's) and
    emergency flag, on its member and sender rows (or those of `role`); None: unchanged.

    Returns the rows changed. An address that holds no such row is NotFound; an
    emergency flag needs a sender row (it lets posts past threshold and blackouts).
    """
    if moderation is None and emergency is None:
        raise InvalidInput("nothing to change: give --moderation and/or --emergency/--no-emergency")
    _check_flags(role, moderation if moderation != CLEAR else None, bool(emergency))
    addr = addresses.normalize(address)
    roles = (role,) if role is not None else MODERATED_ROLES
    rows = list(
        session.scalars(
            sa.select(Member).where(
                Member.list_id == mlist.id,
                sa.func.lower(Member.address) == addr.lower(),
                Member.role.in_(roles),
            )
        )
    )
    if not rows:
        held = " or ".join(r.value for r in roles)
        raise NotFound(f"{addr} is not a {held} of {mlist.address}")
    senders = [m for m in rows if m.role is Role.SENDER]
    if emergency and not senders:
        raise InvalidInput(
            f"{addr} is not an authorized sender of {mlist.address}: only a sender can be an"
            f" emergency sender (add it with --role sender)"
        )
    changes: list[str] = []
    if moderation is not None:
        action = None if moderation == CLEAR else ModerationAction(moderation)
        for m in rows:
            m.moderation_action = action
        changes.append(f"moderation={action.value if action else 'none'}")
    if emergency is not None:
        for m in senders:
            m.emergency = emergency
        changes.append(f"emergency={'yes' if emergency else 'no'}")
    detail = f"{addr} ({', '.join(sorted({m.role.value for m in rows}))}): {', '.join(changes)}"
    audit(session, actor, "members.set", mlist.address, detail)
    return rows


def remove(
    session: Session,
    mlist: MailingList,
    addrs: Sequence[str],
    *,
    role: Role | None = None,
    actor: str = "cli",
) -> tuple[list[str], list[str]]:
    """Remove addresses (in the given role, or every role); returns (removed, not found)."""
    removed: list[str] = []
    missing: list[str] = []
    for addr in (addresses.normalize(a) for a in addrs):
        stmt = sa.delete(Member).where(
            Member.list_id == mlist.id, sa.func.lower(Member.address) == addr.lower()
        )
        if role is not None:
            stmt = stmt.where(Member.role == role)
        result = session.execute(stmt)
        (removed if result.rowcount else missing).append(addr)  # type: ignore[attr-defined]
    if removed:
        audit(session, actor, "members.remove", mlist.address, ", ".join(removed))
    return removed, missing


def roster(session: Session, mlist: MailingList, role: Role | None = None) -> list[Member]:
    stmt = sa.select(Member).where(Member.list_id == mlist.id)
    if role is not None:
        stmt = stmt.where(Member.role == role)
    order = sa.case({r: i for i, r in enumerate(Role)}, value=Member.role)
    return list(session.scalars(stmt.order_by(order, sa.func.lower(Member.address))))


def count_by_role(session: Session, mlist: MailingList) -> dict[Role, int]:
    rows = session.execute(
        sa.select(Member.role, sa.func.count(Member.id))
        .where(Member.list_id == mlist.id)
        .group_by(Member.role)
    )
    return {role: n for role, n in rows}


def roles_of(session: Session, mlist: MailingList, addrs: Iterable[str]) -> set[Role]:
    """The roles any of these addresses hold on the list (case-insensitive match)."""
    lowered = {a.lower() for a in addrs}
    if not lowered:
        return set()
    return set(session.scalars(_ROLES_OF, {"list_id": mlist.id, "lowered": sorted(lowered)}))


def rows_for(session: Session, mlist: MailingList, addrs: Iterable[str]) -> list[Member]:
    """Every row these addresses hold on the list (case-insensitive match)."""
    lowered = sorted({a.lower() for a in addrs})
    if not lowered:
        return []
    return list(session.scalars(_ROWS_FOR, {"list_id": mlist.id, "lowered": lowered}))


def recipient_count(session: Session, list_ids: Iterable[int]) -> int:
    """Active recipients of these lists together: distinct addresses (any case) of
    members with delivery enabled, as the queue would snapshot them, counted in SQL."""
    ids = sorted(set(list_ids))
    if not ids:
        return 0
    count = session.scalar(
        sa.select(sa.func.count(sa.distinct(sa.func.lower(Member.address)))).where(
            Member.list_id.in_(ids),
            Member.role == Role.MEMBER,
            Member.delivery_status == DeliveryStatus.ENABLED,
        )
    )
    return int(count or 0)


def import_csv(
    session: Session, mlist: MailingList, data: bytes | BinaryIO, *, actor: str = "cli"
) -> ImportReport:
    """Import `address,name,role` rows from a file or its bytes, IMPORT_CHUNK at a time.

    A fatal problem (not CSV, not UTF-8, a bad header) raises, and the caller's
    transaction, rolled back, has then written nothing.
    """
    reader = csv.reader(_utf8_lines(io.BytesIO(data) if isinstance(data, bytes) else data))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise InvalidInput(
            "the file is empty: expected a header line 'address,name,role'"
        ) from None
    except csv.Error as exc:
        raise InvalidInput(f"line 1: not valid CSV: {exc}") from None
    if "address" not in header:
        raise InvalidInput(
            f"line 1: the header must name an 'address' column, got {','.join(header)!r}"
        )
    unknown = [h for h in header if h not in EXPORT_FIELDS]
    if unknown:
        raise InvalidInput(
            f"line 1: unknown column(s) {', '.join(unknown)}; expected address,name,role"
        )
    index = {h: i for i, h in enumerate(header) if h in CSV_FIELDS}
    report = ImportReport()
    rows: list[tuple[int, str, Role, str]] = []  # (line, address, role, name)
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) > len(header):
                report.invalid.append((line, f"{len(row)} fields, the header has {len(header)}"))
                continue
            values = {h: (row[i].strip() if i < len(row) else "") for h, i in index.items()}
            try:
                addr = member_address(mlist, values["address"])
            except InvalidAddress as exc:
                report.invalid.append((line, str(exc)))
                continue
            try:
                role = Role(values.get("role") or "member")
            except ValueError:
                report.invalid.append((line, f"unknown role {values.get('role')!r}"))
                continue
            rows.append((line, addr, role, values.get("name", "")))
            if len(rows) >= IMPORT_CHUNK:
                _import_chunk(session, mlist, rows, report)
                rows = []
    except csv.Error as exc:
        raise InvalidInput(f"line {reader.line_num}: not valid CSV: {exc}") from None
    _import_chunk(session, mlist, rows, report)
    audit(session, actor, "members.import", mlist.address, f"added {report.added}")
    return report


def _utf8_lines(stream: BinaryIO) -> Iterator[str]:
    """The file's lines with their endings (CRLF, LF, or CR alone, as Excel for Mac
    writes), decoded one at a time: csv reads them as they come, and a byte that is
    not UTF-8 is reported with its line."""
    number = 0
    carry = b""
    pending: list[bytes] = []  # blocks of a line longer than a block, joined once
    while True:
        block = stream.read(READ_BLOCK)
        if block and b"\n" not in block and b"\r" not in block:
            pending.append(block)
            continue
        lines = b"".join([carry, *pending, block]).splitlines(keepends=True)
        pending = []
        # the last line may go on in the next block, and a CR there may have its LF
        carry = lines.pop() if block and lines and not lines[-1].endswith(b"\n") else b""
        for raw in lines:
            number += 1
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(
                    f"line {number}: not UTF-8 text (byte {exc.start + 1})"
                ) from None
        if not block:
            return


def _import_chunk(
    session: Session,
    mlist: MailingList,
    rows: list[tuple[int, str, Role, str]],
    report: ImportReport,
) -> None:
    """Insert the rows not on the list yet; earlier chunks of the same file are (the
    same transaction reads them), so a line repeating one is skipped too."""
    present = _present(session, mlist, {addr.lower() for _, addr, _, _ in rows})
    new: list[dict[str, object]] = []
    for line, addr, role, name in rows:
        if (addr.lower(), role) in present:
            report.skipped.append((line, f"{addr} is already a {role.value}"))
            continue
        present.add((addr.lower(), role))
        new.append({"list_id": mlist.id, "address": addr, "role": role, "display_name": name})
    if new:
        session.execute(sa.insert(Member), new)
    report.added += len(new)


def export(members: Sequence[Member], fmt: str) -> str:
    """CSV (EXPORT_FIELDS; `import_csv` takes it back) or JSON: each row's role, delivery
    status with the reason it is disabled, source ("manual", "sync:NAME", ...) and
    subscribe date (UTC, ISO 8601)."""
    if fmt == "json":
        return (
            json.dumps(
                [
                    {
                        "address": m.address,
                        "name": m.display_name,
                        "role": m.role.value,
                        "status": m.delivery_status.value,
                        "disabled_reason": m.disabled_reason,
                        "source": m.source,
                        "subscribed": _when(m),
                    }
                    for m in members
                ],
                indent=2,
                ensure_ascii=False,
            )
            + "\n"
        )
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_FIELDS)
    for m in members:
        writer.writerow(
            (
                m.address,
                m.display_name,
                m.role.value,
                m.delivery_status.value,
                m.disabled_reason,
                m.source,
                _when(m),
            )
        )
    return out.getvalue()


def _when(m: Member) -> str:
    return m.created_at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def unsubscribe(
    session: Session, mlist: MailingList, address: str, *, via: str, actor: str = ""
) -> bool:
    """`address` leaves `mlist` (its member row goes; owner, moderator and sender rows
    stay), and the leaving is recorded so that no sync adds it back. Returns whether
    it was a member; recording happens either way (idempotent: one row per address).
    """
    addr = addresses.normalize(address).lower()
    result = session.execute(
        sa.delete(Member).where(
            Member.list_id == mlist.id,
            sa.func.lower(Member.address) == addr,
            Member.role == Role.MEMBER,
        )
    )
    was_member = bool(result.rowcount)  # type: ignore[attr-defined]
    record = session.scalar(
        sa.select(Unsubscription).where(
            Unsubscription.list_id == mlist.id, Unsubscription.address == addr
        )
    )
    if record is None:
        session.add(Unsubscription(list_id=mlist.id, address=addr, via=via, actor=actor or addr))
    elif was_member:  # left again after coming back: the latest leaving counts
        record.via, record.actor, record.at = via, actor or addr, utcnow()
    if was_member:
        audit(session, actor or addr, "members.unsubscribe", mlist.address, f"{addr} via {via}")
    return was_member


def unsubscribed(session: Session, mlist: MailingList) -> set[str]:
    """The (lower-case) addresses that left `mlist` and must not be synced back."""
    return set(
        session.scalars(sa.select(Unsubscription.address).where(Unsubscription.list_id == mlist.id))
    )


def forget_unsubscription(session: Session, mlist: MailingList, address: str) -> None:
    """The person subscribed again themselves (confirmed): the old leaving is void."""
    session.execute(
        sa.delete(Unsubscription).where(
            Unsubscription.list_id == mlist.id,
            Unsubscription.address == addresses.normalize(address).lower(),
        )
    )
