"""delivery reports: list settings, and on each post when its report and follow-up went

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24 03:33:32.074795
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import listserv.models

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

#: SQLite rebuilds a table to alter it; keep its ids AUTOINCREMENT (migration 0002)
KEEP = {"sqlite_autoincrement": True}


def upgrade() -> None:
    with op.batch_alter_table("mailing_lists", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.add_column(
            sa.Column("delivery_reports", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("report_to_owners", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("report_window_hours", sa.Integer(), server_default="24", nullable=False)
        )

    with op.batch_alter_table("posts", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.add_column(
            sa.Column("reported_at", listserv.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("followup_due_at", listserv.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("followup_sent_at", listserv.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.create_index("ix_posts_followup", ["followup_due_at"], unique=False)
        batch_op.create_index("ix_posts_report", ["state", "reported_at"], unique=False)

    # Posts finished before this revision are not owed a report: an upgrade must not
    # mail one for every post ever sent.
    op.execute(
        "UPDATE posts SET reported_at = COALESCE(finished_at, created_at)"
        " WHERE state IN ('sent', 'cancelled')"
    )


def downgrade() -> None:
    with op.batch_alter_table("posts", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.drop_index("ix_posts_report")
        batch_op.drop_index("ix_posts_followup")
        batch_op.drop_column("followup_sent_at")
        batch_op.drop_column("followup_due_at")
        batch_op.drop_column("reported_at")

    with op.batch_alter_table("mailing_lists", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.drop_column("report_window_hours")
        batch_op.drop_column("report_to_owners")
        batch_op.drop_column("delivery_reports")
