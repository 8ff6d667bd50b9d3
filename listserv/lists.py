"""Storage verbs for mailing lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import addresses
from listserv.errors import AlreadyExists, InvalidInput, NotFound
from listserv.models import (
    AuditEntry,
    DeliveryMode,
    MailingList,
    Member,
    PostingPolicy,
    Role,
)

#: Settings `lists set` may change, with their parser.
SETTINGS: dict[str, type[Any]] = {
    "posting_policy": PostingPolicy,
    "delivery_mode": DeliveryMode,
    "subject_prefix": str,
    "description": str,
    "footer": str,
}
LIMITS = {"subject_prefix": 100, "description": 255}
ALIASES = {"policy": "posting_policy", "mode": "delivery_mode"}


def find(session: Session, address: str) -> MailingList | None:
    name, _, domain = address.rpartition("@")
    return session.scalar(
        sa.select(MailingList).where(
            MailingList.local_part == name.lower(), MailingList.domain == domain.lower()
        )
    )


def get(session: Session, address: str) -> MailingList:
    mlist = find(session, address.strip())
    if mlist is None:
        raise NotFound(f"no such list: {address}")
    return mlist


def create(
    session: Session,
    address: str,
    *,
    owners: Sequence[str] = (),
    policy: PostingPolicy = PostingPolicy.MEMBERS,
    subject_prefix: str | None = None,
    description: str = "",
    delivery_mode: DeliveryMode = DeliveryMode.SHARED,
    actor: str = "cli",
) -> MailingList:
    name, domain = addresses.list_name(address)
    for key, value in (("description", description), ("subject_prefix", subject_prefix or "")):
        if len(value) > LIMITS[key]:
            raise InvalidInput(f"{key}: at most {LIMITS[key]} characters")
    if find(session, f"{name}@{domain}") is not None:
        raise AlreadyExists(f"list already exists: {name}@{domain}")
    owner_addrs = [addresses.normalize(o) for o in owners]
    mlist = MailingList(
        local_part=name,
        domain=domain,
        posting_policy=policy,
        delivery_mode=delivery_mode,
        subject_prefix=f"[{name}]" if subject_prefix is None else subject_prefix,
        description=description,
        footer="",
    )
    session.add(mlist)
    session.flush()
    for owner in dict.fromkeys(owner_addrs):
        session.add(Member(list_id=mlist.id, address=owner, role=Role.OWNER))
    audit(session, actor, "list.create", mlist.address, f"policy={policy.value}")
    return mlist


def all_lists(session: Session) -> list[tuple[MailingList, int]]:
    """Every list with its member count."""
    count = (
        sa.select(sa.func.count(Member.id))
        .where(Member.list_id == MailingList.id, Member.role == Role.MEMBER)
        .scalar_subquery()
    )
    rows = session.execute(
        sa.select(MailingList, count).order_by(MailingList.domain, MailingList.local_part)
    )
    return [(m, n) for m, n in rows]


def set_setting(
    session: Session, mlist: MailingList, key: str, value: str, *, actor: str = "cli"
) -> None:
    key = ALIASES.get(key, key)
    kind = SETTINGS.get(key)
    if kind is None:
        raise InvalidInput(f"unknown setting {key!r}; settable: {', '.join(sorted(SETTINGS))}")
    parsed: Any = value
    if kind is not str:
        try:
            parsed = kind(value)
        except ValueError:
            choices = ", ".join(m.value for m in kind)
            raise InvalidInput(f"{key}: {value!r} is not one of {choices}") from None
    limit = LIMITS.get(key)
    if limit is not None and len(value) > limit:
        raise InvalidInput(f"{key}: at most {limit} characters")
    setattr(mlist, key, parsed)
    audit(session, actor, "list.set", mlist.address, f"{key}={value}")


def delete(session: Session, mlist: MailingList, *, actor: str = "cli") -> None:
    session.delete(mlist)
    audit(session, actor, "list.delete", mlist.address, "")


def settings_of(mlist: MailingList) -> dict[str, str]:
    return {
        "address": mlist.address,
        "list_id": mlist.list_id,
        "posting_policy": mlist.posting_policy.value,
        "delivery_mode": mlist.delivery_mode.value,
        "subject_prefix": mlist.subject_prefix,
        "description": mlist.description,
        "footer": mlist.footer,
        "created_at": mlist.created_at.isoformat(timespec="seconds"),
    }


def audit(session: Session, actor: str, action: str, list_address: str, detail: str) -> None:
    session.add(AuditEntry(actor=actor, action=action, list_address=list_address, detail=detail))
