"""Table definitions (SQLAlchemy Core) that the chat writer, run log and reports query.

The schema itself is created by the Alembic revisions in ``migrations/``; a test checks that
these definitions and the migrated database agree. Knows SQL types only.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

from etl.normalize import MAX_ID_LENGTH

# On MySQL and MariaDB the migrations create every table InnoDB, utf8mb4 with the utf8mb4_bin
# collation: keys are compared byte for byte, as DingTalk's case-sensitive ids must be. The
# definitions below leave those options out: a ``mysql_*`` keyword makes SQLAlchemy load its
# MySQL dialect when this module is imported, in every command, whatever the database.


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC in Python everywhere, whatever the database keeps.

    SQLite and MySQL have no zone-aware type: UTC is stored naive and re-labelled on read.
    MySQL gets microseconds (``DATETIME(6)``) so events keep their order.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in {"mysql", "mariadb"}:
            # Imported here: the MySQL dialect package (and its drivers' modules) costs every
            # command's start otherwise, and only a MySQL engine needs it, which has it loaded.
            from sqlalchemy.dialects import mysql

            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where UTC is required")
        value = value.astimezone(dt.UTC)
        if dialect.name != "postgresql":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def _id(name: str, **kw: Any) -> Column[str]:
    return Column(name, String(MAX_ID_LENGTH), **kw)


# SQLite only auto-increments INTEGER PRIMARY KEY; elsewhere events deserve 64 bits.
BigID = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

sync_runs = Table(
    "sync_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime()),
    Column("status", String(16), nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("chats_total", Integer, nullable=False, default=0),
    Column("chats_succeeded", Integer, nullable=False, default=0),
    Column("chats_failed", Integer, nullable=False, default=0),
    Column("chats_changed", Integer, nullable=False, default=0),
    Column("api_calls", Integer, nullable=False, default=0),
    Column("retries", Integer, nullable=False, default=0),
    Column("error", Text),
    Column("hostname", String(255)),
    Column("pid", Integer),
    # In the synced set, not due (or not affordable under the quota), not read.
    Column("chats_skipped", Integer, nullable=False, default=0, server_default=text("0")),
    Index("ix_sync_runs_started_at", "started_at"),
    Index("ix_sync_runs_status", "status"),
)

chats = Table(
    "chats",
    metadata,
    _id("chatid", primary_key=True),
    Column("name", Text),
    _id("owner_userid"),
    Column("conversation_tag", Integer),
    Column("chat_banned_type", Integer),
    Column("searchable", Integer),
    Column("validation_type", Integer),
    Column("mention_all_authority", Integer),
    Column("management_type", Integer),
    Column("show_history_type", Integer),
    Column("icon", Text),
    Column("status", Integer, nullable=False),
    Column("member_count", Integer, nullable=False),
    Column("first_seen_at", UTCDateTime(), nullable=False),
    Column("last_synced_at", UTCDateTime(), nullable=False),
    Column("last_changed_at", UTCDateTime(), nullable=False),
    Column("dismissed_at", UTCDateTime()),
    Column("raw", JSON, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    # The poll plan ([sync] polling = "adaptive"): the chat's interval and when it is due.
    Column("poll_interval_seconds", Integer),
    Column("next_poll_at", UTCDateTime()),
    Index("ix_chats_owner_userid", "owner_userid"),
    Index("ix_chats_status", "status"),
)

chat_members = Table(
    "chat_members",
    metadata,
    _id("chatid", nullable=False),
    _id("userid", nullable=False),
    Column("joined_at", UTCDateTime(), nullable=False),
    Column("left_at", UTCDateTime()),
    PrimaryKeyConstraint("chatid", "userid", name="pk_chat_members"),
    Index("ix_chat_members_userid", "userid"),
)

chat_events = Table(
    "chat_events",
    metadata,
    Column("id", BigID, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("sync_runs.id", name="fk_chat_events_run_id")),
    _id("chatid", nullable=False),
    Column("observed_at", UTCDateTime(), nullable=False),
    Column("event_type", String(32), nullable=False),
    _id("userid"),
    Column("field", String(64)),
    Column("old_value", Text),
    Column("new_value", Text),
    Column("is_baseline", Boolean, nullable=False, default=False),
    # 'poll' (a sync saw the change) or 'event' (DingTalk pushed it).
    Column("source", String(8), nullable=False, server_default=text("'poll'")),
    # DingTalk's time of the change for an event row, observed_at for a poll row.
    Column("occurred_at", UTCDateTime(), nullable=False),
    _id("operator_userid"),
    _id("event_id"),
    Index("ix_chat_events_chatid_observed_at", "chatid", "observed_at"),
    Index("ix_chat_events_chatid_occurred_at", "chatid", "occurred_at"),
    Index("ix_chat_events_chatid_userid_occurred_at", "chatid", "userid", "occurred_at"),
    Index("ix_chat_events_event_id", "event_id"),
    Index("ix_chat_events_occurred_at", "occurred_at"),
    Index("ix_chat_events_userid_observed_at", "userid", "observed_at"),
    Index("ix_chat_events_observed_at", "observed_at"),
    Index("ix_chat_events_run_id", "run_id"),
)

sync_run_items = Table(
    "sync_run_items",
    metadata,
    Column(
        "run_id",
        Integer,
        ForeignKey("sync_runs.id", name="fk_sync_run_items_run_id"),
        nullable=False,
    ),
    _id("chatid", nullable=False),
    Column("status", String(16), nullable=False),
    Column("changed", Boolean, nullable=False, default=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("errcode", Integer),
    Column("error", Text),
    Column("duration_ms", Integer, nullable=False, default=0),
    PrimaryKeyConstraint("run_id", "chatid", name="pk_sync_run_items"),
    Index("ix_sync_run_items_chatid", "chatid"),
)

pushed_events = Table(
    "pushed_events",
    metadata,
    _id("event_id", primary_key=True),
    Column("event_type", String(64), nullable=False),
    _id("chatid"),
    Column("occurred_at", UTCDateTime(), nullable=False),
    Column("received_at", UTCDateTime(), nullable=False),
    _id("operator_userid"),
    Column("payload", JSON, nullable=False),
    # recorded, already_recorded, unknown_chat, discovered, invalid
    Column("outcome", String(16), nullable=False),
    # When a reconcile of its chat read the chat after it: NULL while it waits for one.
    Column("reconciled_at", UTCDateTime()),
    Index("ix_pushed_events_chatid", "chatid"),
    Index("ix_pushed_events_received_at", "received_at"),
    Index("ix_pushed_events_outcome", "outcome"),
)

discovered_chats = Table(
    "discovered_chats",
    metadata,
    _id("chatid", primary_key=True),
    Column("discovered_at", UTCDateTime(), nullable=False),
    _id("event_id"),
)

event_listeners = Table(
    "event_listeners",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("hostname", String(255)),
    Column("pid", Integer),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("stopped_at", UTCDateTime()),
    Column("connected", Boolean, nullable=False),
    Column("connected_since", UTCDateTime()),
    Column("last_frame_at", UTCDateTime()),
    Column("last_event_at", UTCDateTime()),
    Column("events_received", Integer, nullable=False),
    Column("events_ignored", Integer, nullable=False),
    Column("reconnects", Integer, nullable=False),
    Column("error", Text),
    Column("updated_at", UTCDateTime(), nullable=False),
    Index("ix_event_listeners_updated_at", "updated_at"),
)

# Every HTTP request to DingTalk, counted by whoever sent it: a run's calls per writer batch,
# the listener's gateway calls as they happen. Calls this month: one sum over counted_at.
api_calls = Table(
    "api_calls",
    metadata,
    Column("id", BigID, primary_key=True, autoincrement=True),
    Column("counted_at", UTCDateTime(), nullable=False),
    # The run's trigger (manual, schedule, event) or "listen".
    Column("source", String(16), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("calls", Integer, nullable=False),
    # Of these, refused by throttling (errcode 88/90018...): DingTalk does not count them.
    Column("throttled", Integer, nullable=False, default=0, server_default=text("0")),
    Column("run_id", Integer),
    Index("ix_api_calls_counted_at", "counted_at"),
)

# Each 90020 (the organisation's monthly quota used up) DingTalk answered.
quota_exhaustions = Table(
    "quota_exhaustions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("occurred_at", UTCDateTime(), nullable=False),
    Column("source", String(16), nullable=False),
    Column("run_id", Integer),
    Column("error", Text),
    Index("ix_quota_exhaustions_occurred_at", "occurred_at"),
)
