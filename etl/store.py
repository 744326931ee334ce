"""The store: every SQL statement of the sync, and nothing else.

One chat's writes (chats row, members, events, run item) happen in one transaction, which
the sync shares between the chats it has in hand (a batch). A batch costs a handful of
statements whatever its size: a read of the fingerprints, the changed chats' rows and
members, then one bulk statement per kind of write. The common case, a chat whose
fingerprint did not change, reads no members and costs its share of one update of
``last_synced_at``. Bulk inserts are ``COPY`` on PostgreSQL and multi-row statements
elsewhere. SQLAlchemy and driver errors become ``DatabaseFailure`` here (``raise ... from``),
passwords hidden.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import socket
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Dialect,
    Engine,
    RowMapping,
    Table,
    Text,
    bindparam,
    case,
    insert,
    select,
    text,
)
from sqlalchemy import update as sa_update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from etl.db import database_errors, describe_db_error
from etl.errors import DatabaseFailure
from etl.normalize import ATTRIBUTE_FIELDS, STATUS_DISMISSED, AttrValue, ChatRecord
from etl.schema import chat_events, chat_members, chats, sync_run_items, sync_runs

_T = TypeVar("_T")

# Parameters per multi-row INSERT on SQLite (see _BulkInsert._insert_values).
SQLITE_PARAMETERS = 4096
RUN_STATUSES = ("running", "succeeded", "partial", "failed", "abandoned")


def attr_text(value: AttrValue) -> str | None:
    """The contract's text form of an attribute value (integers in decimal)."""
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class ChatOutcome:
    """One chat's fetch as the store writes it: its record, or the error the fetch ended in."""

    chatid: str
    observed_at: dt.datetime
    attempts: int
    duration_ms: int
    record: ChatRecord | None = None
    errcode: int | None = None
    error: str | None = None
    http_status: int | None = None


def _describe_chats(chatids: Sequence[str]) -> str:
    if len(chatids) == 1:
        return f"chat {chatids[0]!r}"
    shown = ", ".join(repr(c) for c in chatids[:3])
    return f"chats {shown}" + (f" and {len(chatids) - 3} more" if len(chatids) > 3 else "")


class _Events:
    """A changed chat's ``chat_events`` rows, ready for ``_BulkInsert.execute``."""

    def __init__(self, bulk: _BulkInsert, run_id: int, chatid: str, now: dt.datetime) -> None:
        self._head = (run_id, chatid, bulk.bind("observed_at", now))
        self._flags = {flag: bulk.bind("is_baseline", flag) for flag in (False, True)}
        self.rows: list[tuple[Any, ...]] = []

    def add(
        self,
        event_type: str,
        *,
        field: str | None = None,
        old_value: str | None = None,
        new_value: str | None = None,
    ) -> None:
        later = self._flags[False]
        self.rows.append((*self._head, event_type, None, field, old_value, new_value, later))

    def add_members(
        self, event_type: str, userids: Iterable[str], *, baseline: bool = False
    ) -> None:
        head, flag = self._head, self._flags[baseline]
        self.rows.extend((*head, event_type, u, None, None, None, flag) for u in userids)


_EVENT_COLUMNS = (
    "run_id",
    "chatid",
    "observed_at",
    "event_type",
    "userid",
    "field",
    "old_value",
    "new_value",
    "is_baseline",
)
_MEMBER_COLUMNS = ("chatid", "userid", "joined_at")
_CHAT_COLUMNS = (
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
_ITEM_COLUMNS = (
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
class _Writes:
    """What a batch writes, gathered chat by chat and sent kind by kind (``Store._flush``)."""

    chats: list[dict[str, Any]] = field(default_factory=list)
    members: list[tuple[Any, ...]] = field(default_factory=list)
    # (chatid, userid, time of the change)
    rejoins: list[tuple[str, str, dt.datetime]] = field(default_factory=list)
    leaves: list[tuple[str, str, dt.datetime]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    touch: dict[str, dt.datetime] = field(default_factory=dict)
    items: list[tuple[Any, ...]] = field(default_factory=list)


class _BulkInsert:
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


def _padded(items: list[_T]) -> list[_T]:
    """``items`` to the next power of two in length, the last one repeated.

    For statements whose text grows with a batch (``IN (...)``, ``CASE``): a handful of
    texts to compile, and for the server to prepare, instead of one per batch size. A chat
    named twice changes nothing.
    """
    size = 1 << (len(items) - 1).bit_length()
    return items + [items[-1]] * (size - len(items))


def _touch_params(synced: Mapping[str, dt.datetime]) -> tuple[int, dict[str, Any]]:
    """The statement size for ``synced`` and its parameters (see ``_padded``)."""
    pairs = _padded(list(synced.items()))
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
    f"INSERT INTO chats ({', '.join(_CHAT_COLUMNS)})"
    f" SELECT {', '.join('raw::json' if n == 'raw' else n for n in _CHAT_COLUMNS)} FROM {{given}}"
    " ON CONFLICT (chatid) DO UPDATE SET "
    + ", ".join(
        f"{n} = excluded.{n}" for n in _CHAT_COLUMNS if n not in ("chatid", "first_seen_at")
    ),
    chats,
    _CHAT_COLUMNS,
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

# Built once: constructing a statement costs SQLAlchemy more than running a cached one, and
# these run for every chat of every sync. Parameters named key_* feed WHERE clauses.
_SELECT_FINGERPRINTS = select(chats.c.chatid, chats.c.fingerprint).where(
    chats.c.chatid.in_(bindparam("chatids", expanding=True))
)
_SELECT_STORED = select(
    chats.c.chatid,
    *(chats.c[name] for name in ATTRIBUTE_FIELDS),
    chats.c.fingerprint,
    chats.c.member_count,
    chats.c.first_seen_at,
    chats.c.last_changed_at,
    chats.c.dismissed_at,
).where(chats.c.chatid.in_(bindparam("chatids", expanding=True)))
_SELECT_MEMBERS = select(
    chat_members.c.chatid, chat_members.c.userid, chat_members.c.left_at
).where(chat_members.c.chatid.in_(bindparam("chatids", expanding=True)))
_MEMBER_KEY = (chat_members.c.chatid == bindparam("key_chatid")) & (
    chat_members.c.userid == bindparam("key_userid")
)
_REJOIN_MEMBER = (
    sa_update(chat_members).where(_MEMBER_KEY).values(joined_at=bindparam("key_now"), left_at=None)
)
_LEAVE_MEMBER = sa_update(chat_members).where(_MEMBER_KEY).values(left_at=bindparam("key_now"))


class Store:
    """SQL for one database. Not thread-safe: the sync writes from a single thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name
        dialect = engine.dialect
        self._upsert_chats = _chat_upsert(self._dialect, _CHAT_COLUMNS)
        if self._dialect == "sqlite":
            # With RETURNING, SQLAlchemy sends an executemany as multi-row statements
            # ("insertmanyvalues"), where sqlite3 would let go of the interpreter lock for
            # every row: chats rows are large, and each wait behind the fetch workers long.
            self._upsert_chats = self._upsert_chats.returning(chats.c.chatid)
        self._insert_members = _BulkInsert(
            chat_members, _MEMBER_COLUMNS, dialect, bound=["joined_at"]
        )
        self._insert_events = _BulkInsert(
            chat_events, _EVENT_COLUMNS, dialect, bound=["observed_at", "is_baseline"]
        )
        self._insert_items = _BulkInsert(sync_run_items, _ITEM_COLUMNS, dialect, bound=["changed"])
        self._writer: Connection | None = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Give back the connection the chat writes hold (reads use the pool as they go)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(SQLAlchemyError):
                writer.close()

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A transaction on the connection kept for chat writes.

        Taking a pooled connection per batch would cost a ping and a checkout each time;
        a connection that failed is replaced on the next call.
        """
        conn = self._writer
        if conn is None or conn.closed or conn.invalidated:
            conn = self._writer = self.engine.connect()
        with conn.begin():
            yield conn

    # -- run log ---------------------------------------------------------------------------

    def start_run(self, trigger: str, chats_total: int, *, now: dt.datetime) -> tuple[int, int]:
        """Mark runs left ``running`` by dead processes ``abandoned``; insert this run's row.

        Only called while holding the sync lock, so any ``running`` row is a dead run's.
        Returns (run id, number of runs marked abandoned).
        """
        with database_errors("starting the run"), self.engine.begin() as conn:
            abandoned = conn.execute(
                sa_update(sync_runs)
                .where(sync_runs.c.status == "running")
                .values(
                    status="abandoned",
                    finished_at=now,
                    # Or it lived but its database was gone when it tried to record the end.
                    error="the run never recorded its end: its process died, or lost the database",
                )
            ).rowcount
            result = conn.execute(
                insert(sync_runs).values(
                    started_at=now,
                    status="running",
                    trigger=trigger,
                    chats_total=chats_total,
                    chats_succeeded=0,
                    chats_failed=0,
                    chats_changed=0,
                    api_calls=0,
                    retries=0,
                    hostname=socket.gethostname()[:255],
                    pid=os.getpid(),
                )
            )
            run_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
            assert isinstance(run_id, int)
            return run_id, abandoned

    def finish_run(self, run_id: int, values: Mapping[str, Any]) -> None:
        with database_errors("finishing the run"), self.engine.begin() as conn:
            conn.execute(sa_update(sync_runs).where(sync_runs.c.id == run_id).values(**values))

    def recent_runs(self, limit: int) -> list[dict[str, Any]]:
        with database_errors("reading runs"), self.engine.connect() as conn:
            rows = conn.execute(
                select(sync_runs).order_by(sync_runs.c.id.desc()).limit(limit)
            ).mappings()
            return [dict(row) for row in rows]

    def latest_run(
        self, *, status: str | None = None, finished: bool = False
    ) -> dict[str, Any] | None:
        """The newest run, or the newest with ``status``, or (``finished``) not ``running``."""
        query = select(sync_runs).order_by(sync_runs.c.id.desc()).limit(1)
        if status is not None:
            query = query.where(sync_runs.c.status == status)
        if finished:
            query = query.where(sync_runs.c.status != "running")
        with database_errors("reading runs"), self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
            return dict(row) if row is not None else None

    def run_items(self, run_id: int) -> list[dict[str, Any]]:
        with database_errors("reading run items"), self.engine.connect() as conn:
            rows = conn.execute(
                select(sync_run_items)
                .where(sync_run_items.c.run_id == run_id)
                .order_by(sync_run_items.c.chatid)
            ).mappings()
            return [dict(row) for row in rows]

    # -- chats -----------------------------------------------------------------------------

    def write_chats(self, run_id: int, outcomes: Sequence[ChatOutcome]) -> list[bool]:
        """Write a batch of fetched chats in one transaction; return whether each changed.

        Every chat's writes (chats row, members, events, run item) commit together, and
        together with the rest of the batch: a transaction costs the database the same for
        one chat as for ten. The statements are the batch's, not each chat's: one read of
        the fingerprints; for the changed chats alone one read of their ``chats`` rows and
        one of their members; then one statement for each kind of write. Unchanged chats
        (same fingerprint) share one update of ``last_synced_at`` and read no members.
        """
        if not outcomes:
            return []
        doing = "writing " + _describe_chats([o.chatid for o in outcomes])
        try:
            with self._writing() as conn:
                observed = [o.chatid for o in outcomes if o.record is not None]
                # Fingerprints first: most chats need nothing else of their stored row.
                known = self._fingerprints(conn, observed) if observed else {}
                changed = [
                    o.record
                    for o in outcomes
                    if o.record is not None and known.get(o.chatid) != o.record.fingerprint
                ]
                stored: dict[str, RowMapping] = {}
                members: dict[str, list[tuple[str, dt.datetime | None]]] = {}
                known_changed = [r for r in changed if r.chatid in known]
                if known_changed:
                    chatids = [r.chatid for r in known_changed]
                    result = conn.execute(_SELECT_STORED, {"chatids": chatids})
                    stored = {row["chatid"]: row for row in result.mappings()}
                    listed = [r.chatid for r in known_changed if r.members is not None]
                    if listed:
                        for chatid, userid, left_at in conn.execute(
                            _SELECT_MEMBERS, {"chatids": listed}
                        ):
                            members.setdefault(chatid, []).append((userid, left_at))
                writes = _Writes()
                yes, no = (self._insert_items.bind("changed", flag) for flag in (True, False))
                changes: list[bool] = []
                for outcome in outcomes:
                    record, is_changed = outcome.record, False
                    if record is None:
                        pass
                    elif known.get(record.chatid) == record.fingerprint:
                        writes.touch[record.chatid] = outcome.observed_at
                    else:
                        is_changed = self._plan(
                            writes,
                            run_id,
                            record,
                            stored.get(record.chatid),
                            members.get(record.chatid, []),
                            outcome.observed_at,
                        )
                    writes.items.append(
                        (
                            run_id,
                            outcome.chatid,
                            "ok" if record is not None else "failed",
                            yes if is_changed else no,
                            outcome.attempts,
                            outcome.errcode,
                            outcome.error,
                            outcome.duration_ms,
                        )
                    )
                    changes.append(is_changed)
                self._flush(conn, writes)
        except SQLAlchemyError as exc:
            raise DatabaseFailure(
                f"database error while {doing}: {describe_db_error(exc)}"
            ) from exc
        return changes

    def _flush(self, conn: Connection, writes: _Writes) -> None:
        """Send a batch's planned writes, one statement for each kind.

        Every statement is a round trip, after which the writer waits for the interpreter
        lock behind the busy fetch workers: their number, not their size, sets the cost.
        """
        pg = self._dialect == "postgresql"
        if writes.chats and pg:
            arrays = {n: [c[n] for c in writes.chats] for n in _CHAT_COLUMNS}
            arrays["raw"] = [json.dumps(raw) for raw in arrays["raw"]]
            conn.execute(_PG_UPSERT_CHATS, arrays)
        elif writes.chats:
            conn.execute(self._upsert_chats, writes.chats)
        self._insert_members.execute(conn, writes.members)
        for rows, statement, pg_statement, at in (
            (writes.rejoins, _REJOIN_MEMBER, _PG_REJOIN_MEMBERS, "joined_at"),
            (writes.leaves, _LEAVE_MEMBER, _PG_LEAVE_MEMBERS, "left_at"),
        ):
            if rows and pg:
                chatids, userids, ats = (list(c) for c in zip(*rows, strict=True))
                conn.execute(pg_statement, {"chatid": chatids, "userid": userids, at: ats})
            elif rows:
                keys = ("key_chatid", "key_userid", "key_now")
                conn.execute(statement, [dict(zip(keys, row, strict=True)) for row in rows])
        self._insert_events.execute(conn, writes.events)
        if writes.touch and pg:
            touched = {"chatid": list(writes.touch), "last_synced_at": list(writes.touch.values())}
            conn.execute(_PG_TOUCH, touched)
        elif writes.touch:
            size, params = _touch_params(writes.touch)
            conn.execute(_touch_statement(size), params)
        self._insert_items.execute(conn, writes.items)

    def _fingerprints(self, conn: Connection, chatids: list[str]) -> dict[str, str]:
        """The stored fingerprint of each of ``chatids`` that has a ``chats`` row."""
        params = {"chatids": _padded(chatids)}
        return {
            chatid: fingerprint
            for chatid, fingerprint in conn.execute(_SELECT_FINGERPRINTS, params)
        }

    def _plan(
        self,
        writes: _Writes,
        run_id: int,
        record: ChatRecord,
        stored: RowMapping | None,
        stored_members: list[tuple[str, dt.datetime | None]],
        now: dt.datetime,
    ) -> bool:
        """Add a new or changed chat's writes to ``writes``; return whether it changed.

        ``stored`` is its ``chats`` row (None for a new chat), ``stored_members`` its member
        rows as (userid, left_at).
        """
        chatid = record.chatid
        events = _Events(self._insert_events, run_id, chatid, now)
        if stored is None:
            joined = sorted(record.members or ())
            events.add("chat_discovered")
            events.add_members("member_joined", joined, baseline=True)
            joined_at = self._insert_members.bind("joined_at", now)
            writes.members.extend((chatid, u, joined_at) for u in joined)
            member_count = len(joined)
            first_seen_at = now
            dismissed_at = now if record.status == STATUS_DISMISSED else None
        else:
            for name in ATTRIBUTE_FIELDS:
                old, new = stored[name], record.attributes[name]
                if old != new:
                    events.add(
                        "attribute_changed",
                        field=name,
                        old_value=attr_text(old),
                        new_value=attr_text(new),
                    )
            member_count = stored["member_count"]
            if record.members is not None:
                joined, left = self._plan_members(
                    writes, chatid, record.members, stored_members, now
                )
                events.add_members("member_joined", joined)
                events.add_members("member_left", left)
                member_count = len(record.members)
            first_seen_at = stored["first_seen_at"]
            if record.status == STATUS_DISMISSED:
                dismissed_at = stored["dismissed_at"] or now
            else:
                dismissed_at = None

        changed = bool(events.rows)
        writes.events.extend(events.rows)
        writes.chats.append(
            {
                "chatid": chatid,
                **record.attributes,
                "member_count": member_count,
                "first_seen_at": first_seen_at,
                "last_synced_at": now,
                "last_changed_at": now if changed or stored is None else stored["last_changed_at"],
                "dismissed_at": dismissed_at,
                "raw": dict(record.raw),
                "fingerprint": record.fingerprint,
            }
        )
        return changed

    def _plan_members(
        self,
        writes: _Writes,
        chatid: str,
        members: frozenset[str],
        stored: list[tuple[str, dt.datetime | None]],
        now: dt.datetime,
    ) -> tuple[list[str], list[str]]:
        """Plan joins, leaves and re-joins; return (joined, left), sorted."""
        current = {userid for userid, left_at in stored if left_at is None}
        former = {userid for userid, left_at in stored if left_at is not None}
        joined = sorted(members - current)
        left = sorted(current - members)
        joined_at = self._insert_members.bind("joined_at", now)
        for userid in joined:
            if userid in former:
                writes.rejoins.append((chatid, userid, now))
            else:
                writes.members.append((chatid, userid, joined_at))
        writes.leaves.extend((chatid, userid, now) for userid in left)
        return joined, left
