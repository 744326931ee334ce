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
)
from sqlalchemy.dialects import mysql
from sqlalchemy.types import TypeDecorator, TypeEngine

from etl.normalize import MAX_ID_LENGTH

# Keys compared byte-for-byte on MySQL: DingTalk ids are case-sensitive.
MYSQL_TABLE_ARGS: dict[str, Any] = {
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
    "mysql_engine": "InnoDB",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC in Python everywhere, whatever the database keeps.

    SQLite and MySQL have no zone-aware type: UTC is stored naive and re-labelled on read.
    MySQL gets microseconds (``DATETIME(6)``) so events keep their order.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in {"mysql", "mariadb"}:
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
    Index("ix_sync_runs_started_at", "started_at"),
    Index("ix_sync_runs_status", "status"),
    **MYSQL_TABLE_ARGS,
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
    Index("ix_chats_owner_userid", "owner_userid"),
    Index("ix_chats_status", "status"),
    **MYSQL_TABLE_ARGS,
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
    **MYSQL_TABLE_ARGS,
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
    Index("ix_chat_events_chatid_observed_at", "chatid", "observed_at"),
    Index("ix_chat_events_userid_observed_at", "userid", "observed_at"),
    Index("ix_chat_events_observed_at", "observed_at"),
    Index("ix_chat_events_run_id", "run_id"),
    **MYSQL_TABLE_ARGS,
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
    **MYSQL_TABLE_ARGS,
)
