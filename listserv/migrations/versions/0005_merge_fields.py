"""mailing_lists.merge_fields: fill $name, $address, $unsubscribe_url per recipient

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


#: SQLite rebuilds a table to alter it; keep its ids AUTOINCREMENT (migration 0002)
KEEP = {"sqlite_autoincrement": True}


def upgrade() -> None:
    with op.batch_alter_table("mailing_lists", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.add_column(
            sa.Column("merge_fields", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("mailing_lists", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.drop_column("merge_fields")
