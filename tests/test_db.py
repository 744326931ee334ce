"""Opening the database: every command honours ``[database] busy_timeout_seconds``."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.engine import URL, Engine

from etl.db import create_db_engine, utcnow
from etl.schema import discovered_chats

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


# Whether a second read on the same connection sees a row another connection committed after
# the first read: (plain engine, read-only engine, read-only engine asking for a snapshot).
# SQLite's reads in one block are one transaction, read-only or not; a server's read-only
# reads are each their own (MariaDB's default REPEATABLE READ would otherwise keep the
# first read's snapshot), and a reader that asks for a snapshot still gets one.
SEES_LATER_COMMITS = {
    "sqlite": (False, False, False),
    "postgresql": (True, True, False),
    "mariadb": (False, True, False),
}


# How a reader asks for a snapshot (as the reports do): SQLite's transactions always are.
SNAPSHOT = {
    "postgresql": {"isolation_level": "REPEATABLE READ"},
    "mariadb": {"isolation_level": "REPEATABLE READ"},
}


def test_what_a_reader_sees_of_a_commit_made_between_its_reads(db_url: URL, db_kind: str) -> None:
    def sees_later_commit(engine: Engine, writer: Engine, options: dict[str, str]) -> bool:
        count = select(func.count()).select_from(discovered_chats)
        with engine.connect() as conn:
            conn.execution_options(**options)
            before = conn.execute(count).scalar_one()
            with writer.begin() as other:
                row = {"chatid": f"chat-{before}", "discovered_at": utcnow()}
                other.execute(insert(discovered_chats).values(row))
            return conn.execute(count).scalar_one() == before + 1

    writer = create_db_engine(db_url)
    plain = create_db_engine(db_url)
    reader = create_db_engine(db_url, read_only=True)
    try:
        seen = (
            sees_later_commit(plain, writer, {}),
            sees_later_commit(reader, writer, {}),
            sees_later_commit(reader, writer, SNAPSHOT.get(db_kind, {})),
        )
    finally:
        for engine in (writer, plain, reader):
            engine.dispose()
    assert seen == SEES_LATER_COMMITS[db_kind]
