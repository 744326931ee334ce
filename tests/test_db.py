"""Opening the database: every command honours ``[database] busy_timeout_seconds``."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

BIN = Path(sys.executable).parent
# Far below SQLite's default wait (30 s) and the subprocess deadline below.
BUSY_TIMEOUT = 0.2
DEADLINE = 20.0

COMMANDS = [
    (["db", "upgrade"], "migrating the schema"),
    (["runs"], "reading runs"),
    (["status"], "reading runs"),
    (["report", "chats"], "reading the database"),
]


@pytest.fixture
def locked_sqlite(sqlite_url: URL) -> Iterator[URL]:
    """The migrated SQLite file in rollback-journal mode, exclusively locked by another writer.

    Every connection of ours switches the file to WAL first, which needs that lock: a command
    waits its busy timeout, then fails with "database is locked".
    """
    assert sqlite_url.database is not None
    holder = sqlite3.connect(sqlite_url.database, isolation_level=None)
    try:
        holder.execute("PRAGMA journal_mode=DELETE")
        holder.execute("BEGIN EXCLUSIVE")
        yield sqlite_url
    finally:
        holder.close()


@pytest.mark.parametrize(("args", "action"), COMMANDS, ids=[" ".join(args) for args, _ in COMMANDS])
def test_command_waits_only_its_busy_timeout(
    locked_sqlite: URL, tmp_path: Path, args: list[str], action: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[database]\nurl = "{locked_sqlite.render_as_string(hide_password=False)}"\n'
        f"busy_timeout_seconds = {BUSY_TIMEOUT}\n"
        '[logging]\nlevel = "ERROR"\n',
        encoding="utf-8",
    )

    # With SQLite's default wait instead of the configured one this runs past the deadline.
    result = subprocess.run(
        [BIN / "dingtalk-etl", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )

    assert result.returncode == 3, result.stderr
    assert result.stderr == (
        f"dingtalk-etl: error: database error while {action}: "
        "OperationalError: database is locked\n"
    )
