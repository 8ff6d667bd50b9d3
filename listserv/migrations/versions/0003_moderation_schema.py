"""posting policy and moderation: list settings, member actions, tokens, notices

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 01:14:55.678150
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import listserv.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


#: SQLite rebuilds a table to alter it; keep its ids AUTOINCREMENT (migration 0002)
KEEP = {"sqlite_autoincrement": True}


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "moderation", name="tokenkind", native_enum=False, create_constraint=True, length=16
            ),
            nullable=False,
        ),
        sa.Column("list_id", sa.Integer(), nullable=False),
        sa.Column("post_id", sa.Integer(), nullable=True),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("created_at", listserv.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", listserv.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("used_at", listserv.models.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["list_id"],
            ["mailing_lists.id"],
            name=op.f("fk_tokens_list_id_mailing_lists"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["post_id"], ["posts.id"], name=op.f("fk_tokens_post_id_posts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tokens")),
        sa.UniqueConstraint("digest", name=op.f("uq_tokens_digest")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("mailing_lists", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.add_column(
            sa.Column(
                "nonmember_action",
                sa.Enum(
                    "hold",
                    "reject",
                    "discard",
                    name="nonmemberaction",
                    native_enum=False,
                    create_constraint=True,
                    length=16,
                ),
                nullable=True,
            )
        )
        batch_op.add_column(
            sa.Column(
                "require_authenticated_sender",
                sa.Boolean(),
                nullable=False,
                server_default=sa.false(),
            )
        )
        batch_op.add_column(
            sa.Column("max_message_kb", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("plain_text_only", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(
            sa.Column(
                "content_filter",
                sa.Enum(
                    "reject",
                    "convert",
                    name="contentfilter",
                    native_enum=False,
                    create_constraint=True,
                    length=16,
                ),
                nullable=False,
                server_default="reject",
            )
        )
        batch_op.add_column(
            sa.Column("allow_attachments", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch_op.add_column(
            sa.Column("allowed_mime_types", sa.Text(), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("approval_threshold", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("blackout", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(
            sa.Column(
                "external_links",
                sa.Enum(
                    "allow",
                    "hold",
                    name="linkpolicy",
                    native_enum=False,
                    create_constraint=True,
                    length=16,
                ),
                nullable=False,
                server_default="allow",
            )
        )
        batch_op.add_column(
            sa.Column("link_allowlist", sa.Text(), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("hold_expiry_days", sa.Integer(), nullable=False, server_default="14")
        )
        batch_op.add_column(
            sa.Column("last_reminder_at", listserv.models.UTCDateTime(timezone=True), nullable=True)
        )

    with op.batch_alter_table("members", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.add_column(
            sa.Column(
                "moderation_action",
                sa.Enum(
                    "accept",
                    "hold",
                    "reject",
                    "discard",
                    name="moderationaction",
                    native_enum=False,
                    create_constraint=True,
                    length=16,
                ),
                nullable=True,
            )
        )
        batch_op.add_column(
            sa.Column("emergency", sa.Boolean(), nullable=False, server_default=sa.false())
        )

    with op.batch_alter_table("posts", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.drop_constraint(op.f("ck_posts_audience"), type_="check")
        batch_op.create_check_constraint(
            "audience", sa.text("audience IN ('members', 'owners', 'notice')")
        )
        batch_op.add_column(sa.Column("notice_to", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column("not_before", listserv.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("decided_by", sa.String(length=320), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("decided_at", listserv.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.alter_column("inbound_id", existing_type=sa.INTEGER(), nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("posts", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.alter_column("inbound_id", existing_type=sa.INTEGER(), nullable=False)
        batch_op.drop_column("decided_at")
        batch_op.drop_column("decided_by")
        batch_op.drop_column("not_before")
        batch_op.drop_column("notice_to")

    with op.batch_alter_table("members", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.drop_column("emergency")
        batch_op.drop_column("moderation_action")

    with op.batch_alter_table("mailing_lists", schema=None, table_kwargs=KEEP) as batch_op:
        batch_op.drop_column("last_reminder_at")
        batch_op.drop_column("hold_expiry_days")
        batch_op.drop_column("link_allowlist")
        batch_op.drop_column("external_links")
        batch_op.drop_column("blackout")
        batch_op.drop_column("approval_threshold")
        batch_op.drop_column("allowed_mime_types")
        batch_op.drop_column("allow_attachments")
        batch_op.drop_column("content_filter")
        batch_op.drop_column("plain_text_only")
        batch_op.drop_column("max_message_kb")
        batch_op.drop_column("require_authenticated_sender")
        batch_op.drop_column("nonmember_action")

    op.drop_table("tokens")
