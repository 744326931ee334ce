"""Shared fixtures: the simulator over real HTTP and a fresh, migrated database per test.

Databases: SQLite always; PostgreSQL and MariaDB when they answer (see tests/helpers.py). The
server databases a session creates are dropped when it ends, whether its tests failed or not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL

from etl.config import Config, parse_config
from etl.logs import configure_logging
from etl.redact import forget_secrets
from etl.simulator import SimChat, Simulator, World
from tests.helpers import APP_KEY, APP_SECRET, drop_test_databases, fresh_database, migrated

# The report tests' shared history and its fixtures (scenario, engine).
pytest_plugins = ["tests.report_scenario"]

DATABASES = ["sqlite", "postgresql", "mariadb"]


@pytest.fixture(scope="session", autouse=True)
def _drop_test_databases() -> Iterator[None]:
    """Each session (each xdist worker) drops the server databases it created, at its end."""
    yield
    drop_test_databases()


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
    configure_logging("WARNING", "json")
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
