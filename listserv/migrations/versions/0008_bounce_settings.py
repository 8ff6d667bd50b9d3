"""bounce scoring settings per list; members disabled for bounces found by index

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: SQLite rebuilds a table to alter it; keep its ids AUTOINCREMENT (migration 0002)
KEEP = {"sqlite_autoincrement": True}


def upgrade() -> None:
    with op.batch_alter_table("mailing_lists", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.add_column(
            sa.Column("bounce_score_threshold", sa.Float(), server_default="5", nullable=False)
        )
        batch_op.add_column(
            sa.Column("bounce_info_stale_after", sa.Integer(), server_default="7", nullable=False)
        )
        batch_op.add_column(
            sa.Column(
                "bounce_you_are_disabled_warnings",
                sa.Integer(),
                server_default="3",
                nullable=False,
            )
        )
        batch_op.add_column(
            sa.Column(
                "bounce_you_are_disabled_warnings_interval",
                sa.Integer(),
                server_default="7",
                nullable=False,
            )
        )
        batch_op.add_column(
            sa.Column("bounce_temporary_weight", sa.Float(), server_default="0.5", nullable=False)
        )
    with op.batch_alter_table("members", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.create_index("ix_members_disabled_reason", ["disabled_reason"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("members", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.drop_index("ix_members_disabled_reason")
    with op.batch_alter_table("mailing_lists", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.drop_column("bounce_temporary_weight")
        batch_op.drop_column("bounce_you_are_disabled_warnings_interval")
        batch_op.drop_column("bounce_you_are_disabled_warnings")
        batch_op.drop_column("bounce_info_stale_after")
        batch_op.drop_column("bounce_score_threshold")
