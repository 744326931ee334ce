"""One sync per database: a lock that dies with its process.

PostgreSQL: a session advisory lock; MySQL/MariaDB: ``GET_LOCK``; SQLite: an OS file lock
(``filelock``, i.e. flock) on ``<database file>.lock``. All are released by the server or the
kernel when the holder's connection or process dies, so no stale lock survives a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import filelock
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from etl.errors import LockHeld

_NAME = "dingtalk-etl sync"
# pg advisory locks take a signed 64-bit key; derive a fixed one from the lock's name.
PG_LOCK_KEY = int.from_bytes(hashlib.sha256(_NAME.encode()).digest()[:8], "big", signed=True)


def _held(what: str) -> LockHeld:
    return LockHeld(f"another dingtalk-etl sync holds the lock on this database ({what})")


@contextmanager
def run_lock(engine: Engine) -> Iterator[None]:
    """Hold the database's sync lock for the duration of the block or raise ``LockHeld``."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        database = engine.url.database
        if not database or database == ":memory:":
            yield  # a private in-memory database has no other writer
            return
        lock = filelock.FileLock(f"{database}.lock", timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise _held(f"file lock {database}.lock") from None
        try:
            yield
        finally:
            lock.release()
        return

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if dialect == "postgresql":
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": PG_LOCK_KEY})
            if not got.scalar():
                raise _held("PostgreSQL advisory lock")
            release = text("SELECT pg_advisory_unlock(:k)")
            params: dict[str, object] = {"k": PG_LOCK_KEY}
        else:
            # GET_LOCK names are server-wide: include the database so two databases on one
            # server do not block each other. 64 characters at most.
            name = f"dingtalk_etl.{engine.url.database or ''}"[:64]
            got = conn.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": name})
            if got.scalar() != 1:
                raise _held("MySQL GET_LOCK")
            release = text("SELECT RELEASE_LOCK(:n)")
            params = {"n": name}
        try:
            yield
        finally:
            # If this fails the connection is gone, and with it the lock.
            with contextlib.suppress(SQLAlchemyError):
                conn.execute(release, params)
