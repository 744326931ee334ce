"""Helpers shared by the tests: server databases, and reading tables back (plain SQL through
SQLAlchemy Core).

Server databases: PostgreSQL (127.0.0.1:5432) and MariaDB (127.0.0.1:3306) when they answer;
with CI=true an unreachable server fails the test instead of skipping it. They are all created
here, so one registry knows them, and the session drops them when it ends (conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError

from etl import migrate
from etl.schema import chat_events, chat_members, chats, sync_run_items, sync_runs
from etl.store import create_db_engine

APP_KEY = "test-key"
APP_SECRET = "test-secret-9f8e7d6c5b4a"

# -- server databases ----------------------------------------------------------------------------

ADMIN_URLS = {
    "postgresql": os.environ.get(
        "DINGTALK_ETL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    ),
    "mariadb": os.environ.get(
        "DINGTALK_ETL_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4"
    ),
}
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
# One tag per process (each xdist worker has its own): parallel sessions never share a name.
_SESSION_TAG = uuid.uuid4().hex[:8]
_reachable: dict[str, str | None] = {}
# The server databases this process created, (kind, name), until drop_test_databases().
_created: set[tuple[str, str]] = set()


def _probe(kind: str) -> str | None:
    """None when the server answers, else the reason."""
    if kind not in _reachable:
        url = ADMIN_URLS[kind]
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            _reachable[kind] = None
        except Exception as exc:
            _reachable[kind] = f"{kind} not reachable at {make_url(url).host}: {exc}"[:300]
        finally:
            engine.dispose()
    return _reachable[kind]


def _require(kind: str) -> None:
    reason = _probe(kind)
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(reason)


def _drop(conn: Connection, kind: str, name: str) -> None:
    """Drop database ``name`` after ending the sessions still in it (killed children, pools)."""
    if kind == "postgresql":
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :n AND pid <> pg_backend_pid()"
            ),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        return
    sessions = conn.execute(
        text(
            "SELECT id FROM information_schema.processlist WHERE db = :n AND id <> CONNECTION_ID()"
        ),
        {"n": name},
    )
    for session in sessions.scalars().all():
        with contextlib.suppress(DBAPIError):  # it may have ended meanwhile
            conn.execute(text(f"KILL {int(session)}"))
    conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))


def fresh_database(kind: str, tmp_path: Path, suffix: str = "") -> URL:
    """An empty database of ``kind``; the caller migrates it. ``suffix`` names a separate
    server database, for fixtures that keep theirs while other tests recreate the default."""
    if kind == "sqlite":
        return make_url(f"sqlite:///{tmp_path / 'etl.db'}")
    if kind not in ADMIN_URLS:
        raise ValueError(kind)
    _require(kind)
    name = f"etl_test_{_SESSION_TAG}{suffix}"
    _created.add((kind, name))
    admin = create_engine(ADMIN_URLS[kind], isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            _drop(conn, kind, name)
            if kind == "postgresql":
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            else:
                conn.execute(
                    text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
                )
    finally:
        admin.dispose()
    return make_url(ADMIN_URLS[kind]).set(database=name)


def drop_test_databases() -> None:
    """Drop every server database this process created (at the end of its test session)."""
    for kind in sorted({kind for kind, _ in _created}):
        admin = create_engine(ADMIN_URLS[kind], isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                for name in sorted(name for of, name in _created if of == kind):
                    _drop(conn, kind, name)
                    _created.discard((kind, name))
        finally:
            admin.dispose()


def migrated(url: URL) -> URL:
    """``url`` after ``alembic upgrade head`` on it (the product's own migration)."""
    engine = create_db_engine(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    return url


# -- reading tables back ---------------------------------------------------------------------------

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
