"""member address index: one address on a list is found without reading the list

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-24 19:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # An expression index outside batch mode, as ix_members_snapshot (migration 0011).
    address: sa.ColumnClause[str] = sa.column("address", sa.String())
    op.create_index(
        "ix_members_address", "members", ["list_id", sa.func.lower(address), "role", "address"]
    )


def downgrade() -> None:
    op.drop_index("ix_members_address", table_name="members")
