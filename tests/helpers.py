"""Reading the database back in tests (plain SQL through SQLAlchemy Core)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import URL

from etl.db import create_db_engine
from etl.schema import chat_events, chat_members, chats, sync_run_items, sync_runs

TABLES = {
    "chats": chats,
    "chat_members": chat_members,
    "chat_events": chat_events,
    "sync_runs": sync_runs,
    "sync_run_items": sync_run_items,
}
ORDER = {
    "chats": [chats.c.chatid],
    "chat_members": [chat_members.c.chatid, chat_members.c.userid],
    "chat_events": [chat_events.c.id],
    "sync_runs": [sync_runs.c.id],
    "sync_run_items": [sync_run_items.c.run_id, sync_run_items.c.chatid],
}


def rows(url: URL, table: str) -> list[dict[str, Any]]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            result = conn.execute(select(TABLES[table]).order_by(*ORDER[table])).mappings()
            return [dict(row) for row in result]
    finally:
        engine.dispose()


def snapshot(url: URL) -> dict[str, list[dict[str, Any]]]:
    return {name: rows(url, name) for name in ("chats", "chat_members", "chat_events")}


def current_members(url: URL) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for row in rows(url, "chat_members"):
        if row["left_at"] is None:
            found.setdefault(row["chatid"], set()).add(row["userid"])
    return found


def events(url: URL, **match: Any) -> list[dict[str, Any]]:
    return [e for e in rows(url, "chat_events") if all(e[k] == v for k, v in match.items())]
