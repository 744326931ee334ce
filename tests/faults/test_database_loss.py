"""The database going away mid-run: the chat in hand is rolled back, the run says why, and the
next run converges.

What a run does (documented in README "Reliability"):
- its connection killed in the middle of writing a chat (``pg_terminate_backend``): that chat's
  transaction is rolled back, the run stops and records ``failed`` with the driver's reason on
  a fresh connection;
- every session killed while it waits for the API: the sync lock (a PostgreSQL session lock) is
  gone with them, so the run stops at its next write rather than going on unguarded;
- SQLite locked by another writer for less than ``busy_timeout_seconds``: the run waits and
  goes on; for longer: the chat in hand is rolled back and the run fails ("database is
  locked"); if the lock still holds when the run records its end, the row stays ``running`` and
  the next run marks it ``abandoned``.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Connection, Engine

from etl.config import Config, load_config
from etl.lock import PG_LOCK_KEY
from etl.simulator import SimChat, Simulator, World
from etl.sync import RunResult, run_sync
from tests.conftest import APP_KEY, APP_SECRET, MakeConfig
from tests.faults.checks import audit_problems, world_problems, world_state
from tests.helpers import fresh_database, migrated, rows, wait_for, write_config

CHATS = ["chat-a", "chat-b", "chat-c"]


_WRITING = re.compile(
    r"database error while writing chats? ((?:'[^']+'(?:, )?)+)(?: and \d+ more)?: "
)


def _batch_named(error: str | None) -> set[str]:
    """The chats a 'database error while writing ...' message names (its batch's)."""
    match = _WRITING.match(error or "")
    assert match is not None, error
    return set(re.findall(r"'([^']+)'", match.group(1)))


def _world() -> World:
    world = World(APP_KEY, APP_SECRET)
    world.add_chat(SimChat("chat-a", "Alpha", "u1", ["u1", "u2", "u3"]))
    world.add_chat(SimChat("chat-b", "Beta", "u2", ["u2", "u4"]))
    world.add_chat(SimChat("chat-c", "Gamma", "u5", ["u5", "u6"]))
    return world


def _change_everything(world: World) -> None:
    for chatid in CHATS:
        world.add_members(chatid, [f"{chatid}-new-{n}" for n in range(50)])
        world.set_attr(chatid, name=f"{chatid} renamed")


@contextmanager
def _in_thread(action: Callable[[], RunResult]) -> Iterator[dict[str, RunResult]]:
    """Run ``action`` on a thread; the dict holds its result once the block has ended."""
    out: dict[str, RunResult] = {}
    worker = threading.Thread(target=lambda: out.setdefault("result", action()))
    worker.start()
    try:
        yield out
    finally:
        worker.join(timeout=60)
        assert not worker.is_alive(), "the run did not end"


# -- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture
def pg_url(tmp_path: Path) -> URL:
    return migrated(fresh_database("postgresql", tmp_path))


@pytest.fixture
def pg_admin(pg_url: URL) -> Iterator[Engine]:
    """Another client of the same database."""
    engine = create_engine(pg_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _autocommit(engine: Engine) -> Connection:
    # Not in a transaction: pg_stat_activity is a snapshot taken once per transaction.
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def test_pg_connection_killed_mid_write_rolls_the_chat_back(
    pg_url: URL, pg_admin: Engine, make_config: MakeConfig
) -> None:
    world = _world()
    with Simulator(world) as sim:
        config = make_config(pg_url, sim.base_url, CHATS, sync={"concurrency": 1})
        run_sync(config)
        before = {t: rows(pg_url, t) for t in ("chat_members", "chat_events")}
        _change_everything(world)
        with pg_admin.connect() as blocker, _autocommit(pg_admin) as killer:
            # Hold chat-b's row: its writer blocks mid-transaction, members and events already
            # inserted, until its connection is terminated from this other session.
            blocker.execute(text("SELECT 1 FROM chats WHERE chatid = 'chat-b' FOR UPDATE"))
            with _in_thread(lambda: run_sync(config)) as out:
                query = text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = :db"
                    " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
                pid = wait_for(
                    "the writer to block on chat-b's row",
                    lambda: killer.execute(query, {"db": pg_url.database}).scalar(),
                )
                killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            blocker.rollback()
        result = out["result"]

        assert (result.status, result.exit_code) == ("failed", 3)
        assert result.error is not None
        # The whole batch rolls back together, and the message names its chats.
        assert "chat-b" in _batch_named(result.error)
        assert "terminating connection due to administrator command" in result.error
        run = rows(pg_url, "sync_runs")[-1]
        assert (run["status"], run["error"]) == ("failed", result.error)
        # Two chats are fetched at a time: chat-a (or chat-c) may have been written before
        # chat-b, never after it. chat-b got none of its 50 joins, nor its rename.
        written = {i["chatid"] for i in rows(pg_url, "sync_run_items") if i["run_id"] == run["id"]}
        assert "chat-b" not in written
        members = rows(pg_url, "chat_members")
        events = rows(pg_url, "chat_events")
        for chatid in set(CHATS) - written:
            assert [m for m in members if m["chatid"] == chatid] == [
                m for m in before["chat_members"] if m["chatid"] == chatid
            ]
            assert [e for e in events if e["chatid"] == chatid] == [
                e for e in before["chat_events"] if e["chatid"] == chatid
            ]
        assert audit_problems(pg_url) == []

        again = run_sync(config)

    assert again.status == "succeeded"
    assert (again.chats_changed, again.chats_total) == (3 - len(written), 3)
    assert world_problems(pg_url, world_state(world)) == []
    assert audit_problems(pg_url) == []


def test_pg_sessions_killed_between_writes_stop_the_run_before_it_writes_unlocked(
    pg_url: URL, pg_admin: Engine, make_config: MakeConfig
) -> None:
    world = _world()
    with Simulator(world) as sim:
        config = make_config(pg_url, sim.base_url, CHATS, sync={"concurrency": 1})
        run_sync(config)
        _change_everything(world)
        world.inject("chat-b", "slow:2")  # the run waits on the API with idle connections
        with _autocommit(pg_admin) as killer, _in_thread(lambda: run_sync(config)) as out:
            wait_for("chat-a to be written", lambda: len(rows(pg_url, "sync_run_items")) == 4)
            killed = killer.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": pg_url.database},
            ).scalar()
            # The lock goes with its session (once the backend has exited): another sync
            # could start now.
            try_lock = text("SELECT pg_try_advisory_lock(:k)")
            wait_for(
                "the lock to be free", lambda: killer.execute(try_lock, {"k": PG_LOCK_KEY}).scalar()
            )
            killer.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_LOCK_KEY})
        result = out["result"]
        assert killed >= 2  # the lock's session and the writer's pooled connection

        assert (result.status, result.exit_code) == ("failed", 3)
        assert result.error is not None
        assert result.error.startswith("lost the sync lock: its database session failed")
        assert [i["chatid"] for i in rows(pg_url, "sync_run_items")][-1] == "chat-a"
        assert rows(pg_url, "sync_runs")[-1]["status"] == "failed"
        assert {e["chatid"] for e in rows(pg_url, "chat_events") if e["run_id"] == 2} == {"chat-a"}

        again = run_sync(config)

    assert (again.status, again.chats_changed) == ("succeeded", 2)
    assert world_problems(pg_url, world_state(world)) == []
    assert audit_problems(pg_url) == []


# -- SQLite ------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_file(sqlite_url: URL) -> Path:
    assert sqlite_url.database is not None
    return Path(sqlite_url.database)


@contextmanager
def _exclusive(database: Path) -> Iterator[None]:
    """Another program holding the database's write lock."""
    other = sqlite3.connect(database, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        yield
        other.execute("ROLLBACK")
    finally:
        other.close()


def _sqlite_config(folder: Path, db: URL, base_url: str, busy_timeout: float) -> Config:
    path = write_config(
        folder,
        db,
        base_url,
        CHATS,
        database={"busy_timeout_seconds": busy_timeout},
        sync={"concurrency": 1},
    )
    return load_config(path, environ={})


def test_sqlite_writer_waits_for_a_short_lock(
    sqlite_url: URL, sqlite_file: Path, tmp_path: Path
) -> None:
    world = _world()
    with Simulator(world) as sim:
        config = _sqlite_config(tmp_path, sqlite_url, sim.base_url, 5.0)
        run_sync(config)
        _change_everything(world)
        world.inject("chat-b", "slow:2")
        with _in_thread(lambda: run_sync(config)) as out:
            wait_for("chat-a to be written", lambda: len(rows(sqlite_url, "sync_run_items")) == 4)
            with _exclusive(sqlite_file):
                # Taken while chat-b's answer is on its way, held until a second after it was
                # sent: chat-b's writer waits about a second, well under the 5 s busy timeout.
                wait_for("chat-b's request", lambda: world.stats.requests_by_chat["chat-b"] == 2)
                answered = world.stats.arrivals("/chat/get")[-1] + 2  # one fetcher: chat-b's
                time.sleep(max(0.0, answered + 1 - time.monotonic()))
        result = out["result"]

    assert (result.status, result.chats_changed) == ("succeeded", 3)
    assert world_problems(sqlite_url, world_state(world)) == []
    assert audit_problems(sqlite_url) == []


def test_sqlite_lock_held_past_the_busy_timeout_fails_the_run_and_loses_nothing(
    sqlite_url: URL, sqlite_file: Path, tmp_path: Path
) -> None:
    world = _world()
    with Simulator(world) as sim:
        config = _sqlite_config(tmp_path, sqlite_url, sim.base_url, 0.3)
        run_sync(config)
        before = {t: rows(sqlite_url, t) for t in ("chats", "chat_members", "chat_events")}
        _change_everything(world)
        world.inject("chat-b", "slow:2")  # the lock is taken while its answer is on its way
        started = time.monotonic()
        with _in_thread(lambda: run_sync(config)) as out:
            wait_for("chat-a to be written", lambda: len(rows(sqlite_url, "sync_run_items")) == 4)
            with _exclusive(sqlite_file):
                wait_for("the run to give up", lambda: "result" in out)
        result = out["result"]
        elapsed = time.monotonic() - started

        assert (result.status, result.exit_code) == ("failed", 3)
        assert "chat-b" in _batch_named(result.error)
        assert result.error.endswith(
            ": OperationalError: database is locked;"
            " and database error while finishing the run: OperationalError: database is locked"
        )
        assert elapsed < 15  # a 2 s answer and two waits of 0.3 s, not of the 30 s default
        after = {t: rows(sqlite_url, t) for t in ("chats", "chat_members", "chat_events")}
        for table in after:
            assert [r for r in after[table] if r["chatid"] != "chat-a"] == [
                r for r in before[table] if r["chatid"] != "chat-a"
            ]
        # The database refused the run's end too: the row says running until the next run.
        assert rows(sqlite_url, "sync_runs")[-1]["status"] == "running"

        again = run_sync(config)

    runs = rows(sqlite_url, "sync_runs")
    assert [r["status"] for r in runs] == ["succeeded", "abandoned", "succeeded"]
    assert "lost the database" in runs[1]["error"]
    assert again.chats_changed == 2
    assert world_problems(sqlite_url, world_state(world)) == []
    assert audit_problems(sqlite_url) == []
