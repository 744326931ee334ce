"""Helpers shared by the tests: server databases, configuration files and the environment of a
child process, waiting on another thread or process, and reading tables back (plain SQL
through SQLAlchemy Core).

Server databases: PostgreSQL (127.0.0.1:5432) and MariaDB (127.0.0.1:3306) when they answer;
with CI=true an unreachable server fails the test instead of skipping it. They are all created
here, so one registry knows them, and the session drops them when it ends (conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from etl import migrate
from etl.db import create_db_engine
from etl.schema import (
    api_calls,
    chat_events,
    chat_members,
    chats,
    quota_exhaustions,
    sync_run_items,
    sync_runs,
)

APP_KEY = "test-key"
APP_SECRET = "test-secret-9f8e7d6c5b4a"

T = TypeVar("T")

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
    for engine in _readers.values():
        engine.dispose()
    _readers.clear()
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


# -- configuration files and child processes -------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    # A JSON string is a valid TOML basic string.
    return json.dumps(value)


def write_config(
    folder: Path,
    db: URL | str | None = None,
    base_url: str | None = None,
    chatids: list[str] | None = None,
    *,
    app_key: str | None = APP_KEY,
    app_secret: str | None = APP_SECRET,
    name: str = "config.toml",
    extra: str = "",
    **sections: dict[str, Any],
) -> Path:
    """``folder/name``: a config file as an operator writes it, for the command line.

    Against the simulator: no client-side rate limit, two attempts per request; logs at ERROR
    (a test that reads the log asks for its level); everything else is the product's default.
    A key given as None is left out, as is a section left empty. ``sections`` add or override
    keys (``sync={"concurrency": 1}``); ``extra`` is appended as it is, after the last section
    (``[logging]`` unless others were added).
    """
    database = db.render_as_string(hide_password=False) if isinstance(db, URL) else db
    settings: dict[str, dict[str, Any]] = {
        "dingtalk": {
            "base_url": base_url,
            "app_key": app_key,
            "app_secret": app_secret,
            "max_requests_per_second": 1000,
            "max_attempts": 2,
        },
        "database": {"url": database},
        "sync": {"chatids": chatids},
        "logging": {"level": "ERROR"},
    }
    for section, values in sections.items():
        settings.setdefault(section, {}).update(values)
    body = "\n".join(
        f"[{section}]\n"
        + "".join(f"{key} = {_toml(value)}\n" for key, value in values.items() if value is not None)
        for section, values in settings.items()
        if any(value is not None for value in values.values())
    )
    path = folder / name
    path.write_text(body + extra, encoding="utf-8")
    path.chmod(0o600)  # it may hold app_secret: owner-only, or the loader warns on stderr
    return path


def clean_env() -> dict[str, str]:
    """This process's environment without any DINGTALK_* override, for a child process."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DINGTALK")}


def wait_for(what: str, condition: Callable[[], T], timeout: float = 60.0) -> T:
    """Poll ``condition`` until it returns something true, and return that; fail naming
    ``what`` after ``timeout`` seconds. The way to wait for another thread or process."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


# -- reading tables back ---------------------------------------------------------------------------

TABLES = {
    "chats": chats,
    "chat_members": chat_members,
    "chat_events": chat_events,
    "sync_runs": sync_runs,
    "sync_run_items": sync_run_items,
    "api_calls": api_calls,
    "quota_exhaustions": quota_exhaustions,
}
ORDER = {
    "chats": [chats.c.chatid],
    "chat_members": [chat_members.c.chatid, chat_members.c.userid],
    "chat_events": [chat_events.c.id],
    "sync_runs": [sync_runs.c.id],
    "sync_run_items": [sync_run_items.c.run_id, sync_run_items.c.chatid],
    "api_calls": [api_calls.c.id],
    "quota_exhaustions": [quota_exhaustions.c.id],
}


# One engine per database for the tests' reads, without a pool: a new engine costs its
# dialect's first-connect set-up (50 ms on MariaDB) at every call, and pooled connections would
# keep a database the session must drop.
_readers: dict[str, Engine] = {}


def reader(url: URL) -> Engine:
    key = url.render_as_string(hide_password=False)
    if key not in _readers:
        _readers[key] = create_engine(url, poolclass=NullPool)
    return _readers[key]


def rows(url: URL, table: str) -> list[dict[str, Any]]:
    """Every row of ``table`` (by name), in its natural order."""
    return table_rows(url, TABLES[table], *ORDER[table])


def table_rows(url: URL, table: Any, *order: Any) -> list[dict[str, Any]]:
    """Every row of ``table`` (a Table), ordered by ``order`` if given."""
    query = select(table).order_by(*order) if order else select(table)
    with reader(url).connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


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
