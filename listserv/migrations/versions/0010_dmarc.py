"""mailing_lists.dmarc_mitigation, dmarc_mitigate_only_when, dmarc_original_from_in

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24 03:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

#: SQLite rebuilds a table to alter it; keep its ids AUTOINCREMENT (migration 0002)
KEEP = {"sqlite_autoincrement": True}


def _enum(name: str, *values: str, length: int = 16) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=length)


def upgrade() -> None:
    with op.batch_alter_table("mailing_lists", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.add_column(
            sa.Column(
                "dmarc_mitigation",
                _enum("dmarcmitigation", "munge_from", "wrap_message", "none"),
                server_default="munge_from",
                nullable=False,
            )
        )
        batch_op.add_column(
            sa.Column(
                "dmarc_mitigate_only_when",
                _enum("dmarcmitigatewhen", "reject_quarantine", "always", length=24),
                server_default="reject_quarantine",
                nullable=False,
            )
        )
        batch_op.add_column(
            sa.Column(
                "dmarc_original_from_in",
                _enum("originalfromin", "reply_to", "cc"),
                server_default="reply_to",
                nullable=False,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("mailing_lists", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.drop_column("dmarc_original_from_in")
        batch_op.drop_column("dmarc_mitigate_only_when")
        batch_op.drop_column("dmarc_mitigation")
