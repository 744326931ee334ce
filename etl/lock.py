"""One sync per database: a lock that dies with its process.

PostgreSQL: a session advisory lock; MySQL/MariaDB: ``GET_LOCK``; SQLite: an OS file lock
(``filelock``, i.e. flock) on ``<database file>.lock``. All are released by the server or the
kernel when the holder's connection or process dies, so no stale lock survives a crash.

The other side of that: a server-side lock also goes when only its session ends (an admin's
``pg_terminate_backend``, a failover, a firewall dropping an idle connection) while the process
goes on. ``OwnedLock.verify`` lets the holder find out, so it stops instead of writing unguarded.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import filelock
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from etl.errors import LockBusy, LockLost

_NAME = "dingtalk-etl sync"
# pg advisory locks take a signed 64-bit key; derive a fixed one from the lock's name.
PG_LOCK_KEY = int.from_bytes(hashlib.sha256(_NAME.encode()).digest()[:8], "big", signed=True)


_PG_KEY_BITS = PG_LOCK_KEY & 0xFFFF_FFFF_FFFF_FFFF
# pg_locks shows a bigint advisory key as two oids: high half in classid, low half in objid.
_PG_HOLDS_LOCK = text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid() AND classid::bigint = :hi AND objid::bigint = :lo"
    " AND objsubid = 1)"
)


def _held(what: str) -> LockBusy:
    return LockBusy(
        f"another dingtalk-etl sync holds the lock on this database ({what}); nothing was done"
    )


class OwnedLock:
    """The sync lock while it is held; ``verify`` raises ``LockLost`` once it is gone."""

    def __init__(self, still_held: Callable[[], bool] | None = None) -> None:
        # None: a file lock, which only ends with the process holding it.
        self._still_held = still_held

    def verify(self) -> None:
        if self._still_held is None:
            return
        try:
            held = self._still_held()
        except SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            first_line = (str(cause).strip().splitlines() or [""])[0][:200]
            reason = f"its database session failed ({type(cause).__name__}: {first_line})"
        else:
            if held:
                return
            reason = "its database session was replaced"
        raise LockLost(
            f"lost the sync lock: {reason}; stopped so that no other sync writes at the same time"
        )


@contextmanager
def run_lock(engine: Engine) -> Iterator[OwnedLock]:
    """Hold the database's sync lock for the duration of the block or raise ``LockBusy``."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        database = engine.url.database
        if not database or database == ":memory:":
            yield OwnedLock()  # a private in-memory database has no other writer
            return
        lock = filelock.FileLock(f"{database}.lock", timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise _held(f"file lock {database}.lock") from None
        try:
            yield OwnedLock()
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
            held = OwnedLock(
                lambda: bool(
                    conn.execute(
                        _PG_HOLDS_LOCK, {"hi": _PG_KEY_BITS >> 32, "lo": _PG_KEY_BITS & 0xFFFF_FFFF}
                    ).scalar()
                )
            )
        else:
            # GET_LOCK names are server-wide: include the database so two databases on one
            # server do not block each other. 64 characters at most.
            name = f"dingtalk_etl.{engine.url.database or ''}"[:64]
            got = conn.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": name})
            if got.scalar() != 1:
                raise _held("MySQL GET_LOCK")
            release = text("SELECT RELEASE_LOCK(:n)")
            params = {"n": name}
            held = OwnedLock(
                lambda: (
                    conn.execute(text("SELECT IS_USED_LOCK(:n) = CONNECTION_ID()"), params).scalar()
                    == 1
                )
            )
        try:
            yield held
        finally:
            # If this fails the connection is gone, and with it the lock.
            with contextlib.suppress(SQLAlchemyError):
                conn.execute(release, params)
