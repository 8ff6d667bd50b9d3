"""throttle: shared token buckets, paused posts, the cancelled post state

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import listserv.models

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: SQLite rebuilds a table to alter it; keep its ids AUTOINCREMENT (migration 0002)
KEEP = {"sqlite_autoincrement": True}

STATES = "'held', 'accepted', 'sending', 'sent', 'rejected', 'discarded', 'failed'"


def upgrade() -> None:
    buckets = op.create_table(
        "throttle_buckets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("updated_at", listserv.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("factor", sa.Float(), nullable=False),
        sa.Column("changed_at", listserv.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("paused_until", listserv.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_throttle_buckets")),
        sa.UniqueConstraint("key", name=op.f("uq_throttle_buckets_key")),
        sqlite_autoincrement=True,
    )
    assert buckets is not None
    # the row every throttle transaction locks first (distribute/throttle.py)
    op.bulk_insert(
        buckets,
        [
            {
                "key": "*messages",
                "tokens": 0.0,
                "updated_at": listserv.models.utcnow(),
                "factor": 1.0,
                "note": "",
            }
        ],
    )
    with op.batch_alter_table("posts", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.drop_constraint(op.f("ck_posts_poststate"), type_="check")
        batch_op.create_check_constraint("poststate", sa.text(f"state IN ({STATES}, 'cancelled')"))
        batch_op.add_column(
            sa.Column("paused", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    op.execute("UPDATE posts SET state = 'failed' WHERE state = 'cancelled'")
    with op.batch_alter_table("posts", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.drop_column("paused")
        batch_op.drop_constraint(op.f("ck_posts_poststate"), type_="check")
        batch_op.create_check_constraint("poststate", sa.text(f"state IN ({STATES})"))
    op.drop_table("throttle_buckets")
