"""chunked snapshot: a post's recipients are written in committed chunks

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-25 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import listserv.models
from listserv.models import email_domain

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

#: SQLite rebuilds a table to alter it; keep its ids AUTOINCREMENT (migration 0002)
KEEP = {"sqlite_autoincrement": True}


def upgrade() -> None:
    with op.batch_alter_table("posts", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.add_column(
            sa.Column("snapshotting", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("snapshot_after", sa.String(length=320), nullable=True))
        batch_op.add_column(sa.Column("snapshot_owner", sa.String(length=200), nullable=True))
        batch_op.add_column(
            sa.Column(
                "snapshot_expires_at",
                listserv.models.UTCDateTime(timezone=True),
                nullable=True,
            )
        )
    # An expression index, created outside batch mode: SQLite cannot reflect one, so a
    # later batch rebuild of `members` must create it again (it would be lost).
    address: sa.ColumnClause[str] = sa.column("address", sa.String())
    op.create_index(
        "ix_members_snapshot",
        "members",
        ["list_id", "role", sa.func.lower(email_domain(address)), sa.func.lower(address)],
    )


def downgrade() -> None:
    op.drop_index("ix_members_snapshot", table_name="members")
    with op.batch_alter_table("posts", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.drop_column("snapshot_expires_at")
        batch_op.drop_column("snapshot_owner")
        batch_op.drop_column("snapshot_after")
        batch_op.drop_column("snapshotting")
