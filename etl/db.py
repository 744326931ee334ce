"""Opening the database: one way for every command, and SQLAlchemy's errors turned into ours.

Knows SQLAlchemy and the ``[database]`` settings only. ``open_database`` gives a command an
engine with the dialect's settings (SQLite's busy timeout, WAL and foreign keys) and disposes
of it afterwards; ``database_errors`` is the one place where SQLAlchemy exceptions become
``DatabaseFailure`` (``raise ... from``), with the driver's reason and no SQL or password.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.exc import SQLAlchemyError

from etl.errors import DatabaseFailure

DEFAULT_BUSY_TIMEOUT_SECONDS = 30.0
# Execution option of a connection that writes: its transactions begin IMMEDIATE on SQLite.
_WRITER_OPTION = "dingtalk_etl_writer"


class DatabaseSettings(Protocol):
    """What opening the database needs of the configuration (``etl.config.Config``)."""

    @property
    def database_url(self) -> URL: ...

    @property
    def busy_timeout_seconds(self) -> float: ...


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_db_engine(
    url: URL | str,
    *,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT_SECONDS,
    read_only: bool = False,
) -> Engine:
    """An engine with settings suited to a batch writer on each supported database.

    ``read_only``: for a command that only reads, for a few seconds (``status``, ``runs``, the
    metrics file). On a database server each read then costs one round trip, not four: no
    transaction around a single statement (a reader that needs one snapshot asks for its
    isolation level on its connection), and no ping before each checkout. A connection that
    young is lost only with the server, and the command then fails with the server's error,
    having written nothing. `status` on PostgreSQL went from 76 round trips to 27.
    """
    backend = make_url(url).get_backend_name()
    server = backend != "sqlite"
    kwargs: dict[str, Any] = {"pool_pre_ping": not (read_only and server)}
    if read_only and server:
        kwargs["isolation_level"] = "AUTOCOMMIT"
    if backend == "sqlite":
        # Wait for another writer instead of failing at once ("database is locked").
        kwargs["connect_args"] = {"timeout": busy_timeout}
    engine = create_engine(url, **kwargs)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    if backend in {"mysql", "mariadb"}:
        event.listen(engine, "handle_error", _end_lost_stream)
    return engine


@contextmanager
def open_database(settings: DatabaseSettings, *, read_only: bool = False) -> Iterator[Engine]:
    """The configured database's engine for the duration of the block, then disposed;
    ``read_only`` as in ``create_db_engine``."""
    engine = create_db_engine(
        settings.database_url, busy_timeout=settings.busy_timeout_seconds, read_only=read_only
    )
    try:
        yield engine
    finally:
        engine.dispose()


def require_schema(engine: Engine, action: str) -> None:
    """Raise ``SchemaNotMigrated`` unless the schema is at head; ``action`` names the command's
    work in the message of a database that cannot be reached."""
    from etl import migrate  # Alembic only for the commands that read the schema

    with database_errors(action):
        migrate.check_schema(engine)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets analysts read while a sync writes; foreign keys are off by default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA wal_autocheckpoint=16384")
    cursor.close()
    # Transactions are begun by _sqlite_begin, not by the driver: the driver's own BEGIN
    # comes only before the first write, so a transaction's reads could see an older state
    # than its writes replace.
    dbapi_conn.isolation_level = None


def _end_lost_stream(context: ExceptionContext) -> None:
    """A streamed result (PyMySQL's unbuffered ``SSCursor``) whose connection was lost stays
    "active" in PyMySQL (PyMySQL#810): closing it then reads the closed socket and prints
    tracebacks over the error message. The server sends nothing more: mark it finished."""
    if not context.is_disconnect:
        return
    cursor = getattr(context.execution_context, "cursor", None)
    result = getattr(cursor, "_result", None)
    if getattr(result, "unbuffered_active", False):
        result.unbuffered_active = False  # type: ignore[union-attr]


def _sqlite_begin(conn: Connection) -> None:
    # A writer takes the write lock at once (waiting up to the busy timeout for it): had it
    # read first, another process's commit in between would end it with SQLITE_BUSY.
    immediate = conn.get_execution_options().get(_WRITER_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """A write transaction, committed at the end of the block, rolled back on error.

    On SQLite it holds the database's write lock from its first statement, so that what it
    reads stays true until it commits; elsewhere writers lock the rows they decide on.
    """
    with engine.connect() as conn, as_writer(conn).begin():
        yield conn


def as_writer(conn: Connection) -> Connection:
    """``conn``, whose transactions from now on take SQLite's write lock when they begin."""
    return conn.execution_options(**{_WRITER_OPTION: True})


def describe_db_error(exc: SQLAlchemyError) -> str:
    """A one-line reason without the SQL text and parameters SQLAlchemy appends."""
    orig = getattr(exc, "orig", None)
    source: BaseException = orig if isinstance(orig, BaseException) else exc
    first_line = (str(source).strip().splitlines() or [type(source).__name__])[0]
    return f"{type(source).__name__}: {first_line}"[:500]


@contextmanager
def database_errors(action: str) -> Iterator[None]:
    """Convert SQLAlchemy exceptions raised in the block into ``DatabaseFailure``."""
    try:
        yield
    except SQLAlchemyError as exc:
        reason = describe_db_error(exc)
        raise DatabaseFailure(f"database error while {action}: {reason}") from exc
