"""API budget: calls counted, a poll plan per chat, skipped chats, 90020 remembered.

- ``api_calls``: every HTTP request to DingTalk, counted by whoever sent it (``calls`` per
  ``endpoint``, of which ``throttled``), so that calls this month are one query.
- ``quota_exhaustions``: each 90020 (the organisation's monthly quota used up).
- ``chats`` gains the poll plan: ``poll_interval_seconds`` and ``next_poll_at`` (NULL until a
  poll sets them: such a chat is due).
- ``sync_runs`` gains ``chats_skipped`` (in the synced set, not read by the run; 0 for every
  existing run).
- The views are unchanged (the downgrade drops and recreates them around SQLite's rebuild of
  ``chats``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

MYSQL: dict[str, Any] = {
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
    "mysql_engine": "InnoDB",
}


# The views of 0003, unchanged: SQLite rebuilds ``chats`` to drop a column, which a view on
# it would block, so the downgrade drops them first and creates them again.
CURRENT_CHAT_MEMBERS = """
CREATE VIEW current_chat_members AS
SELECT
    m.chatid AS chatid,
    c.name AS chat_name,
    m.userid AS userid,
    m.joined_at AS joined_at,
    CASE WHEN c.owner_userid = m.userid THEN 1 ELSE 0 END AS is_owner,
    c.status AS chat_status
FROM chat_members m
JOIN chats c ON c.chatid = m.chatid
WHERE m.left_at IS NULL
"""

MEMBERSHIP_CHANGES = """
CREATE VIEW membership_changes AS
SELECT
    e.observed_at AS observed_at,
    e.chatid AS chatid,
    c.name AS chat_name,
    e.userid AS userid,
    CASE WHEN e.event_type = 'member_joined' THEN 'joined' ELSE 'left' END AS change_type,
    e.run_id AS run_id,
    e.id AS event_id,
    e.occurred_at AS occurred_at,
    e.source AS source,
    e.operator_userid AS operator_userid
FROM chat_events e
LEFT JOIN chats c ON c.chatid = e.chatid
WHERE e.event_type IN ('member_joined', 'member_left')
  AND NOT e.is_baseline
"""


def _ts(name: str, nullable: bool = True) -> sa.Column[Any]:
    kind = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
    return sa.Column(name, kind, nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "api_calls",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        _ts("counted_at", nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.Column("throttled", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("run_id", sa.Integer()),
        **MYSQL,
    )
    op.create_index("ix_api_calls_counted_at", "api_calls", ["counted_at"])
    op.create_table(
        "quota_exhaustions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        _ts("occurred_at", nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("run_id", sa.Integer()),
        sa.Column("error", sa.Text()),
        **MYSQL,
    )
    op.create_index("ix_quota_exhaustions_occurred_at", "quota_exhaustions", ["occurred_at"])
    with op.batch_alter_table("chats") as batch:
        batch.add_column(sa.Column("poll_interval_seconds", sa.Integer()))
        batch.add_column(_ts("next_poll_at"))
    with op.batch_alter_table("sync_runs") as batch:
        batch.add_column(
            sa.Column("chats_skipped", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )


def downgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.drop_column("chats_skipped")
    op.execute("DROP VIEW IF EXISTS membership_changes")
    op.execute("DROP VIEW IF EXISTS current_chat_members")
    with op.batch_alter_table("chats") as batch:
        batch.drop_column("next_poll_at")
        batch.drop_column("poll_interval_seconds")
    op.execute(CURRENT_CHAT_MEMBERS)
    op.execute(MEMBERSHIP_CHANGES)
    op.drop_index("ix_quota_exhaustions_occurred_at", table_name="quota_exhaustions")
    op.drop_table("quota_exhaustions")
    op.drop_index("ix_api_calls_counted_at", table_name="api_calls")
    op.drop_table("api_calls")
