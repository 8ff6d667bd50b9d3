"""domains of lists and members in A-label (punycode) form

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 01:25:00

Addresses are now normalized with email-validator, which stores internationalized
domains as A-labels; rows written before kept the U-label form, and would no
longer match (a list not found, a sender not recognized). An address present in
both forms becomes one row.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _a_label(domain: str) -> str:
    try:
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return domain  # not convertible: left for the operator, as before


def upgrade() -> None:
    conn = op.get_bind()
    lists = sa.table("mailing_lists", sa.column("id", sa.Integer), sa.column("domain", sa.String))
    for list_id, domain in conn.execute(sa.select(lists.c.id, lists.c.domain)).all():
        if not domain.isascii():
            conn.execute(
                lists.update().where(lists.c.id == list_id).values(domain=_a_label(domain))
            )
    members = sa.table(
        "members",
        sa.column("id", sa.Integer),
        sa.column("list_id", sa.Integer),
        sa.column("address", sa.String),
        sa.column("role", sa.String),
    )
    rows = conn.execute(
        sa.select(members.c.id, members.c.list_id, members.c.address, members.c.role)
    ).all()
    taken = {(lid, address.lower(), role) for _, lid, address, role in rows}
    for member_id, list_id, address, role in rows:
        local, _, domain = address.rpartition("@")
        if domain.isascii():
            continue
        converted = f"{local}@{_a_label(domain)}"
        if (list_id, converted.lower(), role) in taken:
            conn.execute(members.delete().where(members.c.id == member_id))
            continue
        taken.add((list_id, converted.lower(), role))
        conn.execute(members.update().where(members.c.id == member_id).values(address=converted))


def downgrade() -> None:
    pass  # A-labels are valid in the old form too
