"""Group events: pushed_events, discovered_chats, event_listeners; chat_events gains time and actor.

- ``chat_events`` gains ``source`` (``poll`` or ``event``; every existing row ``poll``),
  ``occurred_at`` (NOT NULL; existing rows get their ``observed_at``), ``operator_userid`` and
  ``event_id``, with indexes for the replay by ``occurred_at`` (per chat, and per chat and user).
- ``pushed_events``: one row per distinct event id received over Stream mode, with what became
  of it (``outcome``) and when a reconcile covered it (``reconciled_at``).
- ``discovered_chats``: chats added to the synced set by an event (``[events] discover_chats``).
- ``event_listeners``: one row per ``listen`` process, the state ``status`` reports.
- The views ``membership_changes`` and ``current_chat_members`` are dropped and created again
  (SQLite rebuilds ``chat_events`` to make ``occurred_at`` NOT NULL, which a view on it would
  block); ``membership_changes`` gains ``occurred_at``, ``source`` and ``operator_userid``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

MYSQL: dict[str, Any] = {
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
    "mysql_engine": "InnoDB",
}


def _ts_type() -> Any:
    return sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _ts(name: str, nullable: bool = True) -> sa.Column[Any]:
    return sa.Column(name, _ts_type(), nullable=nullable)


def _id(name: str, **kw: Any) -> sa.Column[Any]:
    return sa.Column(name, sa.String(128), **kw)


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

# As revision 0002 created it, for the downgrade.
MEMBERSHIP_CHANGES_0002 = """
CREATE VIEW membership_changes AS
SELECT
    e.observed_at AS observed_at,
    e.chatid AS chatid,
    c.name AS chat_name,
    e.userid AS userid,
    CASE WHEN e.event_type = 'member_joined' THEN 'joined' ELSE 'left' END AS change_type,
    e.run_id AS run_id,
    e.id AS event_id
FROM chat_events e
LEFT JOIN chats c ON c.chatid = e.chatid
WHERE e.event_type IN ('member_joined', 'member_left')
  AND NOT e.is_baseline
"""


def _drop_views() -> None:
    op.execute("DROP VIEW IF EXISTS membership_changes")
    op.execute("DROP VIEW IF EXISTS current_chat_members")


def upgrade() -> None:
    _drop_views()
    with op.batch_alter_table("chat_events") as batch:
        batch.add_column(
            sa.Column("source", sa.String(8), nullable=False, server_default=sa.text("'poll'"))
        )
        batch.add_column(_ts("occurred_at"))
        batch.add_column(_id("operator_userid"))
        batch.add_column(_id("event_id"))
    op.execute("UPDATE chat_events SET occurred_at = observed_at")
    with op.batch_alter_table("chat_events") as batch:
        batch.alter_column("occurred_at", existing_type=_ts_type(), nullable=False)
    op.create_index("ix_chat_events_chatid_occurred_at", "chat_events", ["chatid", "occurred_at"])
    op.create_index(
        "ix_chat_events_chatid_userid_occurred_at",
        "chat_events",
        ["chatid", "userid", "occurred_at"],
    )
    op.create_index("ix_chat_events_event_id", "chat_events", ["event_id"])
    # Reports select changes across all chats by the time they happened.
    op.create_index("ix_chat_events_occurred_at", "chat_events", ["occurred_at"])

    op.create_table(
        "pushed_events",
        _id("event_id", primary_key=True),
        sa.Column("event_type", sa.String(64), nullable=False),
        _id("chatid"),
        _ts("occurred_at", nullable=False),
        _ts("received_at", nullable=False),
        _id("operator_userid"),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        _ts("reconciled_at"),
        **MYSQL,
    )
    op.create_index("ix_pushed_events_chatid", "pushed_events", ["chatid"])
    op.create_index("ix_pushed_events_received_at", "pushed_events", ["received_at"])
    op.create_index("ix_pushed_events_outcome", "pushed_events", ["outcome"])

    op.create_table(
        "discovered_chats",
        _id("chatid", primary_key=True),
        _ts("discovered_at", nullable=False),
        _id("event_id"),
        **MYSQL,
    )

    op.create_table(
        "event_listeners",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("hostname", sa.String(255)),
        sa.Column("pid", sa.Integer),
        _ts("started_at", nullable=False),
        _ts("stopped_at"),
        sa.Column("connected", sa.Boolean, nullable=False),
        _ts("connected_since"),
        _ts("last_frame_at"),
        _ts("last_event_at"),
        sa.Column("events_received", sa.Integer, nullable=False),
        sa.Column("events_ignored", sa.Integer, nullable=False),
        sa.Column("reconnects", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        _ts("updated_at", nullable=False),
        **MYSQL,
    )
    op.create_index("ix_event_listeners_updated_at", "event_listeners", ["updated_at"])

    op.execute(CURRENT_CHAT_MEMBERS)
    op.execute(MEMBERSHIP_CHANGES)


def downgrade() -> None:
    _drop_views()
    op.drop_table("event_listeners")
    op.drop_table("discovered_chats")
    op.drop_table("pushed_events")
    op.drop_index("ix_chat_events_occurred_at", table_name="chat_events")
    op.drop_index("ix_chat_events_event_id", table_name="chat_events")
    op.drop_index("ix_chat_events_chatid_userid_occurred_at", table_name="chat_events")
    op.drop_index("ix_chat_events_chatid_occurred_at", table_name="chat_events")
    with op.batch_alter_table("chat_events") as batch:
        batch.drop_column("event_id")
        batch.drop_column("operator_userid")
        batch.drop_column("occurred_at")
        batch.drop_column("source")
    op.execute(CURRENT_CHAT_MEMBERS)
    op.execute(MEMBERSHIP_CHANGES_0002)
