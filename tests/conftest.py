"""Shared fixtures: the simulator over real HTTP and a fresh, migrated database per test.

Databases: SQLite always; PostgreSQL (127.0.0.1:5432) and MariaDB (127.0.0.1:3306) when they
answer. With CI=true an unreachable server fails the suite instead of skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from etl import migrate
from etl.config import Config, parse_config
from etl.db import create_db_engine
from etl.logs import configure_logging
from etl.redact import forget_secrets
from etl.simulator import SimChat, Simulator, World

PG_ADMIN_URL = os.environ.get(
    "DINGTALK_ETL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MYSQL_ADMIN_URL = os.environ.get(
    "DINGTALK_ETL_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4"
)
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
# The report tests' shared history and its fixtures (scenario, engine).
pytest_plugins = ["tests.report_scenario"]

DATABASES = ["sqlite", "postgresql", "mariadb"]
APP_KEY = "test-key"
APP_SECRET = "test-secret-9f8e7d6c5b4a"
_SESSION_TAG = uuid.uuid4().hex[:8]
_reachable: dict[str, str | None] = {}


def _probe(name: str, url: str) -> str | None:
    """None when the server answers, else the reason."""
    if name not in _reachable:
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            _reachable[name] = None
        except Exception as exc:
            _reachable[name] = f"{name} not reachable at {make_url(url).host}: {exc}"[:300]
        finally:
            engine.dispose()
    return _reachable[name]


def _require(name: str, url: str) -> None:
    reason = _probe(name, url)
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(reason)


def fresh_database(kind: str, tmp_path: Path, suffix: str = "") -> URL:
    """An empty database of ``kind``; the caller migrates it. ``suffix`` names a separate
    server database, for fixtures that keep theirs while other tests recreate the default."""
    if kind == "sqlite":
        return make_url(f"sqlite:///{tmp_path / 'etl.db'}")
    if kind == "postgresql":
        _require(kind, PG_ADMIN_URL)
        name = f"etl_test_{_SESSION_TAG}{suffix}"
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                # Other sessions (killed children) may still hold connections: end them first.
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :n AND pid <> pg_backend_pid()"
                    ),
                    {"n": name},
                )
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return make_url(PG_ADMIN_URL).set(database=name)
    if kind == "mariadb":
        _require(kind, MYSQL_ADMIN_URL)
        name = f"etl_test_{_SESSION_TAG}{suffix}"
        admin = create_engine(MYSQL_ADMIN_URL, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
                conn.execute(
                    text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
                )
        finally:
            admin.dispose()
        return make_url(MYSQL_ADMIN_URL).set(database=name)
    raise ValueError(kind)


def migrated(url: URL) -> URL:
    """``url`` after ``alembic upgrade head`` on it (the product's own migration)."""
    engine = create_db_engine(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    return url


@pytest.fixture(params=DATABASES, ids=DATABASES)
def db_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def empty_db(db_kind: str, tmp_path: Path) -> URL:
    """A fresh, empty database of each kind (no schema)."""
    return fresh_database(db_kind, tmp_path)


@pytest.fixture
def db_url(empty_db: URL) -> URL:
    """A fresh database of each kind, schema built by ``alembic upgrade head``."""
    return migrated(empty_db)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> URL:
    """A migrated SQLite database, for tests about the API side only."""
    return migrated(fresh_database("sqlite", tmp_path))


def sample_world(**kw: Any) -> World:
    """Three readable chats and one the app may not read (40016)."""
    world = World(APP_KEY, APP_SECRET, **kw)
    world.add_chat(SimChat("chat-a", "Alpha", "u1", ["u1", "u2", "u3"]))
    world.add_chat(SimChat("chat-b", "Beta", "u2", ["u2", "u4"], searchable=1))
    world.add_chat(SimChat("chat-c", "Gamma", "u5", ["u5", "u6", "u7", "u8"]))
    world.add_chat(SimChat("chat-x", "Secret", "u9", ["u9"], readable=False))
    return world


@pytest.fixture
def world() -> World:
    return sample_world()


@pytest.fixture
def simulator(world: World) -> Iterator[Simulator]:
    with Simulator(world) as sim:
        yield sim


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    configure_logging(os.environ.get("DINGTALK_ETL_TEST_LOG", "WARNING"), "json")
    yield
    forget_secrets()


MakeConfig = Callable[..., Config]


@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    """Build a Config as the CLI would, without touching the process environment."""

    def build(
        db: URL,
        base_url: str,
        chatids: list[str],
        *,
        dingtalk: dict[str, Any] | None = None,
        sync: dict[str, Any] | None = None,
    ) -> Config:
        raw: dict[str, Any] = {
            "dingtalk": {
                "base_url": base_url,
                "app_key": APP_KEY,
                "app_secret": APP_SECRET,
                "timeout_seconds": 5,
                "max_requests_per_second": 1000,
                "max_attempts": 3,
                **(dingtalk or {}),
            },
            "database": {"url": db.render_as_string(hide_password=False)},
            "sync": {"chatids": chatids, "concurrency": 4, **(sync or {})},
            "logging": {"level": "WARNING", "format": "json"},
        }
        return parse_config(raw, tmp_path / "config.toml", environ={})

    return build
