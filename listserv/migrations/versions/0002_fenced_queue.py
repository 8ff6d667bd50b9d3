"""ids never reused on SQLite; posts keep how they were queued; claims carry a token

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import listserv.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

#: every table with an integer key; on SQLite each is rebuilt as AUTOINCREMENT
TABLES = (
    "audit_log",
    "inbound_messages",
    "mailing_lists",
    "members",
    "posts",
    "delivery_batches",
    "deliveries",
)

_MODE = sa.Enum(
    "shared",
    "personalized",
    name="deliverymode",
    native_enum=False,
    create_constraint=True,
    length=16,
)


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table("posts") as batch:
        batch.add_column(sa.Column("delivery_mode", _MODE, nullable=True))
        batch.add_column(sa.Column("render", sa.JSON(), nullable=True))
        batch.add_column(
            sa.Column("queued_at", listserv.models.UTCDateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("delivery_batches") as batch:
        batch.add_column(sa.Column("claim_token", sa.String(length=32), nullable=True))
    if sqlite:
        # Rebuilt with foreign keys off (db.Database.upgrade), so dropping the old
        # table cascades nothing; ids are copied, and AUTOINCREMENT continues above them.
        for table in TABLES:
            with op.batch_alter_table(
                table, recreate="always", table_kwargs={"sqlite_autoincrement": True}
            ):
                pass


def downgrade() -> None:
    with op.batch_alter_table("delivery_batches") as batch:
        batch.drop_column("claim_token")
    with op.batch_alter_table("posts") as batch:
        batch.drop_column("queued_at")
        batch.drop_column("render")
        batch.drop_column("delivery_mode")
