"""Per-database bulk writes: a batch's rows reach each database in one statement per kind.

SQL only, on a connection and transaction the caller holds. ``BulkWriter.write`` sends a
batch's ``BatchRows`` (chats upserts, member inserts, re-joins, leaves, events,
``last_synced_at`` updates, run items) with each database's fastest means: ``COPY`` and
array parameters (``unnest``) on PostgreSQL, multi-row ``VALUES`` on SQLite, the driver's
executemany on MySQL and MariaDB. Every statement is a round trip after which the writer
waits for the interpreter lock behind busy fetch workers: their number, not their size, sets
the cost, so a kind of write is one statement however many rows it has (SQLite: as few as its
parameter limit allows).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Dialect,
    Table,
    Text,
    bindparam,
    case,
    insert,
    text,
)
from sqlalchemy import update as sa_update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from etl.normalize import ATTRIBUTE_FIELDS
from etl.schema import chat_events, chat_members, chats, sync_run_items

_T = TypeVar("_T")

# Parameters per multi-row INSERT on SQLite (see BulkInsert._insert_values).
SQLITE_PARAMETERS = 4096

# The rows' layouts: ``BatchRows`` holds tuples in these column orders, chats rows by name.
EVENT_COLUMNS = (
    "run_id",
    "chatid",
    "observed_at",
    "event_type",
    "userid",
    "field",
    "old_value",
    "new_value",
    "is_baseline",
    "source",
    "occurred_at",
)
MEMBER_COLUMNS = ("chatid", "userid", "joined_at")
CHAT_COLUMNS = (
    "chatid",
    *ATTRIBUTE_FIELDS,
    "member_count",
    "first_seen_at",
    "last_synced_at",
    "last_changed_at",
    "dismissed_at",
    "raw",
    "fingerprint",
)
ITEM_COLUMNS = (
    "run_id",
    "chatid",
    "status",
    "changed",
    "attempts",
    "errcode",
    "error",
    "duration_ms",
)


@dataclass
class BatchRows:
    """What a batch writes, gathered chat by chat and sent kind by kind (``BulkWriter.write``).

    Tuples follow the column orders above, their values as ``bind`` gives them where the
    column's ``BulkInsert`` needs it.
    """

    chats: list[dict[str, Any]] = field(default_factory=list)
    members: list[tuple[Any, ...]] = field(default_factory=list)
    # (chatid, userid, time of the change)
    rejoins: list[tuple[str, str, dt.datetime]] = field(default_factory=list)
    leaves: list[tuple[str, str, dt.datetime]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    # (chatid, userid, joined_at, left_at): member rows set to what the log says (rare)
    member_states: list[tuple[str, str, dt.datetime, dt.datetime | None]] = field(
        default_factory=list
    )
    # chatid -> its fetch time, for chats whose fetch changed nothing
    touch: dict[str, dt.datetime] = field(default_factory=dict)
    # (chatid, poll_interval_seconds, next_poll_at): the poll plan of chats read (adaptive)
    plans: list[tuple[str, int, dt.datetime]] = field(default_factory=list)
    items: list[tuple[Any, ...]] = field(default_factory=list)


class BulkWriter:
    """The batch statements for one database (``dialect``), each built once."""

    def __init__(self, dialect: Dialect) -> None:
        self._postgresql = dialect.name == "postgresql"
        self._upsert_chats = _chat_upsert(dialect.name, CHAT_COLUMNS)
        if dialect.name == "sqlite":
            # With RETURNING, SQLAlchemy sends an executemany as multi-row statements
            # ("insertmanyvalues"), where sqlite3 would let go of the interpreter lock for
            # every row: chats rows are large, and each wait behind the fetch workers long.
            self._upsert_chats = self._upsert_chats.returning(chats.c.chatid)
        self.members = BulkInsert(chat_members, MEMBER_COLUMNS, dialect, bound=["joined_at"])
        self.events = BulkInsert(
            chat_events,
            EVENT_COLUMNS,
            dialect,
            bound=["observed_at", "is_baseline", "occurred_at"],
        )
        self._upsert_members = _member_upsert(dialect.name)
        self.items = BulkInsert(sync_run_items, ITEM_COLUMNS, dialect, bound=["changed"])

    def write(self, conn: Connection, rows: BatchRows) -> None:
        """Send a batch's rows: one statement for each kind of write that has rows."""
        pg = self._postgresql
        if rows.chats and pg:
            arrays = {n: [c[n] for c in rows.chats] for n in CHAT_COLUMNS}
            arrays["raw"] = [json.dumps(raw) for raw in arrays["raw"]]
            conn.execute(_PG_UPSERT_CHATS, arrays)
        elif rows.chats:
            conn.execute(self._upsert_chats, rows.chats)
        self.members.execute(conn, rows.members)
        for pairs, statement, pg_statement, at in (
            (rows.rejoins, _REJOIN_MEMBER, _PG_REJOIN_MEMBERS, "joined_at"),
            (rows.leaves, _LEAVE_MEMBER, _PG_LEAVE_MEMBERS, "left_at"),
        ):
            if pairs and pg:
                chatids, userids, ats = (list(c) for c in zip(*pairs, strict=True))
                conn.execute(pg_statement, {"chatid": chatids, "userid": userids, at: ats})
            elif pairs:
                keys = ("key_chatid", "key_userid", "key_now")
                conn.execute(statement, [dict(zip(keys, row, strict=True)) for row in pairs])
        if rows.member_states:
            names = ("chatid", "userid", "joined_at", "left_at")
            states = [dict(zip(names, row, strict=True)) for row in rows.member_states]
            conn.execute(self._upsert_members, states)
        self.events.execute(conn, rows.events)
        if rows.touch and pg:
            touched = {"chatid": list(rows.touch), "last_synced_at": list(rows.touch.values())}
            conn.execute(_PG_TOUCH, touched)
        elif rows.touch:
            size, params = _touch_params(rows.touch)
            conn.execute(_touch_statement(size), params)
        if rows.plans:
            keys = ("key_chatid", "interval", "next_at")
            conn.execute(_SET_PLAN, [dict(zip(keys, row, strict=True)) for row in rows.plans])
        self.items.execute(conn, rows.items)


class BulkInsert:
    """An ``INSERT`` of many rows in one statement, whatever their number.

    SQLAlchemy converts every value of every row in Python before the driver sees it; for a
    batch of new chats (tens of thousands of members, as many events) that costs more than
    the database's own work. Here the statement is compiled once, and the values that need
    converting (a timestamp, a flag) are converted once per chat by ``bind``, with the
    column type's own converter: rows then hold only values the driver takes as they are.
    The statement still runs on the connection, so the transaction, events and errors are
    SQLAlchemy's.

    PostgreSQL gets the rows by ``COPY ... FROM STDIN``, its bulk load: psycopg's
    executemany would wait for each row's answer in turn, and arrays of parameters are
    dumped in Python element by element. SQLite gets multi-row ``VALUES`` lists, as many
    rows per statement as its parameter limit allows. MySQL and MariaDB get the driver's
    executemany, which PyMySQL folds into multi-row statements itself.
    """

    def __init__(
        self, table: Table, columns: Sequence[str], dialect: Dialect, *, bound: Iterable[str]
    ) -> None:
        compiled = insert(table).compile(
            dialect=dialect, column_keys=list(columns), for_executemany=True
        )
        if compiled.positional and list(compiled.positiontup or ()) != list(columns):
            raise ValueError(f"{table.name}: give the columns in the statement's order")
        self._sql = compiled.string
        # Positional drivers (SQLite) take the rows as they are, the others a dict per row.
        self._names = None if compiled.positional else tuple(columns)
        self._converters = {
            name: table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in columns
        }
        unbound = {n for n, c in self._converters.items() if c is not None} - set(bound)
        if unbound:
            # A type that starts to need converting must go through bind(), or rows go wrong.
            raise ValueError(f"{table.name}: columns {sorted(unbound)} need bind()")
        self._values: tuple[str, str] | None = None
        if dialect.name == "sqlite":
            head, _, group = self._sql.partition(" VALUES ")
            self._values = (head, group)
        self._copy: str | None = None
        if dialect.name == "postgresql":
            quote = dialect.identifier_preparer.quote
            names = ", ".join(quote(name) for name in columns)
            target = dialect.identifier_preparer.format_table(table)
            self._copy = f"COPY {target} ({names}) FROM STDIN"

    def bind(self, column: str, value: Any) -> Any:
        """``value`` as the driver must get it for ``column``."""
        convert = self._converters[column]
        return value if convert is None else convert(value)

    def execute(self, conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        if self._copy is not None:
            self._copy_rows(conn, rows)
            return
        if self._values is not None:
            self._insert_values(conn, rows)
            return
        params: Sequence[Any] = rows
        if self._names is not None:
            names = self._names
            params = [dict(zip(names, row, strict=True)) for row in rows]
        conn.exec_driver_sql(self._sql, params)

    def _insert_values(self, conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        """SQLite: the rows as ``INSERT ... VALUES (...), (...), ...`` in a few statements.

        sqlite3's executemany lets go of the interpreter lock for every row, and getting it
        back behind busy fetch workers can take a switch interval (5 ms) each time.
        """
        assert self._values is not None
        head, group = self._values
        driver = conn.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        # SQLite takes 32,766 parameters per statement since 3.32, 999 before. Fewer is
        # enough: sqlite3 keeps the last 128 statements prepared, and a prepared statement
        # holds memory in proportion to its parameters.
        limit = min(driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), SQLITE_PARAMETERS)
        step = max(1, limit // len(rows[0]))
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            sql = f"{head} VALUES {', '.join([group] * len(chunk))}"
            conn.exec_driver_sql(sql, tuple(value for row in chunk for value in row))

    def _copy_rows(self, conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        """PostgreSQL's ``COPY ... FROM STDIN`` on the connection's own transaction.

        COPY goes past SQLAlchemy to the driver, so its errors are turned into SQLAlchemy's
        here, and a connection the server dropped is marked invalid, as SQLAlchemy would.
        """
        assert self._copy is not None
        dbapi_conn = conn.connection
        dbapi_error = conn.dialect.loaded_dbapi.Error
        cursor = dbapi_conn.cursor()
        # What listens to SQLAlchemy's statements (tracing, the tests' statement counts)
        # hears of this one too.
        conn.dispatch.before_cursor_execute(conn, cursor, self._copy, (), None, True)
        try:
            with cursor.copy(self._copy) as copy:
                for row in rows:
                    copy.write_row(row)
        except dbapi_error as exc:
            dropped = conn.dialect.is_disconnect(exc, dbapi_conn, cursor)
            if dropped:
                conn.invalidate(exc)
            raise DBAPIError.instance(
                self._copy, None, exc, dbapi_error, connection_invalidated=dropped
            ) from exc
        finally:
            with contextlib.suppress(conn.dialect.loaded_dbapi.Error):
                cursor.close()


def _chat_upsert(dialect: str, names: tuple[str, ...]) -> Any:
    """INSERT ... ON CONFLICT/DUPLICATE KEY UPDATE of the ``names`` columns of a chat."""
    updates = [name for name in names if name not in ("chatid", "first_seen_at")]
    if dialect in {"mysql", "mariadb"}:
        ins = mysql.insert(chats)
        return ins.on_duplicate_key_update({n: ins.inserted[n] for n in updates})
    dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    ins_pg = dialect_insert(chats)
    return ins_pg.on_conflict_do_update(
        index_elements=[chats.c.chatid], set_={n: ins_pg.excluded[n] for n in updates}
    )


def _member_upsert(dialect: str) -> Any:
    """INSERT ... ON CONFLICT/DUPLICATE KEY UPDATE of a member row's two times."""
    if dialect in {"mysql", "mariadb"}:
        ins = mysql.insert(chat_members)
        return ins.on_duplicate_key_update(
            joined_at=ins.inserted.joined_at, left_at=ins.inserted.left_at
        )
    dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    ins_pg = dialect_insert(chat_members)
    return ins_pg.on_conflict_do_update(
        index_elements=[chat_members.c.chatid, chat_members.c.userid],
        set_={"joined_at": ins_pg.excluded.joined_at, "left_at": ins_pg.excluded.left_at},
    )


_SET_PLAN = (
    sa_update(chats)
    .where(chats.c.chatid == bindparam("key_chatid"))
    .values(poll_interval_seconds=bindparam("interval"), next_poll_at=bindparam("next_at"))
)


# A batch's shared statements, one per batch size, each built once: SQLAlchemy then finds
# the compiled form by the statement object, where a statement built per batch would cost
# more Python than the database spends on it (and the writer shares the interpreter lock
# with the fetch workers).


@functools.cache
def _touch_statement(size: int) -> Any:
    """UPDATE of ``last_synced_at`` for ``size`` unchanged chats, each to its own fetch time.

    Parameters ``chatid_<i>`` and ``at_<i>``; see ``_touch_params``.
    """
    ids = [bindparam(f"chatid_{i}", type_=chats.c.chatid.type) for i in range(size)]
    ats = [bindparam(f"at_{i}", type_=chats.c.last_synced_at.type) for i in range(size)]
    synced_at = case(*((chats.c.chatid == c, t) for c, t in zip(ids, ats, strict=True)))
    return sa_update(chats).where(chats.c.chatid.in_(ids)).values(last_synced_at=synced_at)


def padded(items: list[_T]) -> list[_T]:
    """``items`` to the next power of two in length, the last one repeated.

    For statements whose text grows with a batch (``IN (...)``, ``CASE``): a handful of
    texts to compile, and for the server to prepare, instead of one per batch size. A chat
    named twice changes nothing.
    """
    size = 1 << (len(items) - 1).bit_length()
    return items + [items[-1]] * (size - len(items))


def _touch_params(synced: Mapping[str, dt.datetime]) -> tuple[int, dict[str, Any]]:
    """The statement size for ``synced`` and its parameters (see ``padded``)."""
    pairs = padded(list(synced.items()))
    size = len(pairs)
    params: dict[str, Any] = {}
    for i, (chatid, at) in enumerate(pairs):
        params[f"chatid_{i}"] = chatid
        params[f"at_{i}"] = at
    return size, params


def _pg_statement(sql: str, table: Table, names: Sequence[str], as_text: Sequence[str] = ()) -> Any:
    """PostgreSQL: ``sql`` reading a batch from ``{given}``, one array parameter per column.

    ``{given}`` becomes ``unnest(:name, ...) AS given(name, ...)`` for ``names``, columns of
    ``table`` whose types convert the arrays' items; ``as_text`` columns travel as text.
    One short statement whatever the batch's size, which the server prepares once.
    """
    arrays = ", ".join(f":{name}" for name in names)
    given = f"unnest({arrays}) AS given({', '.join(names)})"
    return text(sql.format(given=given)).bindparams(
        *(
            bindparam(
                name, type_=postgresql.ARRAY(Text() if name in as_text else table.c[name].type)
            )
            for name in names
        )
    )


_PG_TOUCH = _pg_statement(
    "UPDATE chats SET last_synced_at = given.last_synced_at FROM {given}"
    " WHERE chats.chatid = given.chatid",
    chats,
    ("chatid", "last_synced_at"),
)
# The chats' raw JSON as text: psycopg has no array form of its JSON wrapper.
_PG_UPSERT_CHATS = _pg_statement(
    f"INSERT INTO chats ({', '.join(CHAT_COLUMNS)})"
    f" SELECT {', '.join('raw::json' if n == 'raw' else n for n in CHAT_COLUMNS)} FROM {{given}}"
    " ON CONFLICT (chatid) DO UPDATE SET "
    + ", ".join(
        f"{n} = excluded.{n}" for n in CHAT_COLUMNS if n not in ("chatid", "first_seen_at")
    ),
    chats,
    CHAT_COLUMNS,
    as_text=["raw"],
)
_PG_REJOIN_MEMBERS = _pg_statement(
    "UPDATE chat_members SET joined_at = given.joined_at, left_at = NULL FROM {given}"
    " WHERE chat_members.chatid = given.chatid AND chat_members.userid = given.userid",
    chat_members,
    ("chatid", "userid", "joined_at"),
)
_PG_LEAVE_MEMBERS = _pg_statement(
    "UPDATE chat_members SET left_at = given.left_at FROM {given}"
    " WHERE chat_members.chatid = given.chatid AND chat_members.userid = given.userid",
    chat_members,
    ("chatid", "userid", "left_at"),
)

# Elsewhere re-joins and leaves are an executemany of one UPDATE each; key_* parameters
# feed its WHERE clause.
_MEMBER_KEY = (chat_members.c.chatid == bindparam("key_chatid")) & (
    chat_members.c.userid == bindparam("key_userid")
)
_REJOIN_MEMBER = (
    sa_update(chat_members).where(_MEMBER_KEY).values(joined_at=bindparam("key_now"), left_at=None)
)
_LEAVE_MEMBER = sa_update(chat_members).where(_MEMBER_KEY).values(left_at=bindparam("key_now"))
