"""Initial schema: chats, chat_members, chat_events, sync_runs, sync_run_items.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Case-sensitive, full-Unicode ids and names on MySQL/MariaDB.
MYSQL: dict[str, Any] = {
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
    "mysql_engine": "InnoDB",
}


def _ts(name: str, nullable: bool = True) -> sa.Column[Any]:
    # UTC everywhere; MySQL keeps microseconds so events stay ordered.
    kind = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
    return sa.Column(name, kind, nullable=nullable)


def _id(name: str, **kw: Any) -> sa.Column[Any]:
    return sa.Column(name, sa.String(128), **kw)


def upgrade() -> None:
    op.create_table(
        "sync_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        _ts("started_at", nullable=False),
        _ts("finished_at"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("chats_total", sa.Integer, nullable=False),
        sa.Column("chats_succeeded", sa.Integer, nullable=False),
        sa.Column("chats_failed", sa.Integer, nullable=False),
        sa.Column("chats_changed", sa.Integer, nullable=False),
        sa.Column("api_calls", sa.Integer, nullable=False),
        sa.Column("retries", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("hostname", sa.String(255)),
        sa.Column("pid", sa.Integer),
        **MYSQL,
    )
    op.create_index("ix_sync_runs_started_at", "sync_runs", ["started_at"])
    op.create_index("ix_sync_runs_status", "sync_runs", ["status"])

    op.create_table(
        "chats",
        _id("chatid", primary_key=True),
        sa.Column("name", sa.Text),
        _id("owner_userid"),
        sa.Column("conversation_tag", sa.Integer),
        sa.Column("chat_banned_type", sa.Integer),
        sa.Column("searchable", sa.Integer),
        sa.Column("validation_type", sa.Integer),
        sa.Column("mention_all_authority", sa.Integer),
        sa.Column("management_type", sa.Integer),
        sa.Column("show_history_type", sa.Integer),
        sa.Column("icon", sa.Text),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("member_count", sa.Integer, nullable=False),
        _ts("first_seen_at", nullable=False),
        _ts("last_synced_at", nullable=False),
        _ts("last_changed_at", nullable=False),
        _ts("dismissed_at"),
        sa.Column("raw", sa.JSON, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        **MYSQL,
    )
    op.create_index("ix_chats_owner_userid", "chats", ["owner_userid"])
    op.create_index("ix_chats_status", "chats", ["status"])

    op.create_table(
        "chat_members",
        _id("chatid", nullable=False),
        _id("userid", nullable=False),
        _ts("joined_at", nullable=False),
        _ts("left_at"),
        sa.PrimaryKeyConstraint("chatid", "userid", name="pk_chat_members"),
        **MYSQL,
    )
    op.create_index("ix_chat_members_userid", "chat_members", ["userid"])

    op.create_table(
        "chat_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column(
            "run_id",
            sa.Integer,
            sa.ForeignKey("sync_runs.id", name="fk_chat_events_run_id"),
        ),
        _id("chatid", nullable=False),
        _ts("observed_at", nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        _id("userid"),
        sa.Column("field", sa.String(64)),
        sa.Column("old_value", sa.Text),
        sa.Column("new_value", sa.Text),
        sa.Column("is_baseline", sa.Boolean, nullable=False),
        **MYSQL,
    )
    op.create_index("ix_chat_events_chatid_observed_at", "chat_events", ["chatid", "observed_at"])
    op.create_index("ix_chat_events_userid_observed_at", "chat_events", ["userid", "observed_at"])
    op.create_index("ix_chat_events_observed_at", "chat_events", ["observed_at"])
    op.create_index("ix_chat_events_run_id", "chat_events", ["run_id"])

    op.create_table(
        "sync_run_items",
        sa.Column(
            "run_id",
            sa.Integer,
            sa.ForeignKey("sync_runs.id", name="fk_sync_run_items_run_id"),
            nullable=False,
        ),
        _id("chatid", nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("changed", sa.Boolean, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("errcode", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "chatid", name="pk_sync_run_items"),
        **MYSQL,
    )
    op.create_index("ix_sync_run_items_chatid", "sync_run_items", ["chatid"])


def downgrade() -> None:
    op.drop_table("sync_run_items")
    op.drop_table("chat_events")
    op.drop_table("chat_members")
    op.drop_table("chats")
    op.drop_table("sync_runs")
