"""The store: every SQL statement of the sync, and nothing else.

One chat's writes (chats row, members, events, run item) happen in one transaction. The
common case, a chat whose fingerprint did not change, costs one read of its ``chats`` row and
one short update; a changed chat reads its member rows once and writes its changes in bulk.
SQLAlchemy errors become ``DatabaseError`` here (``raise ... from``), passwords hidden.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, create_engine, event, func, insert, select
from sqlalchemy import update as sa_update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

from etl.errors import DatabaseError
from etl.normalize import ATTRIBUTE_FIELDS, STATUS_DISMISSED, AttrValue, ChatRecord
from etl.schema import chat_events, chat_members, chats, sync_run_items, sync_runs

RUN_STATUSES = ("running", "succeeded", "partial", "failed", "abandoned")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_db_engine(url: URL | str) -> Engine:
    """An engine with settings suited to a batch writer on each supported database."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        # Wait for another writer instead of failing at once ("database is locked").
        kwargs["connect_args"] = {"timeout": 30}
    engine = create_engine(url, **kwargs)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets analysts read while a sync writes; foreign keys are off by default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def describe_db_error(exc: SQLAlchemyError) -> str:
    """A one-line reason without the SQL text and parameters SQLAlchemy appends."""
    orig = getattr(exc, "orig", None)
    source: BaseException = orig if isinstance(orig, BaseException) else exc
    first_line = (str(source).strip().splitlines() or [type(source).__name__])[0]
    return f"{type(source).__name__}: {first_line}"[:500]


@contextmanager
def database_errors(action: str) -> Iterator[None]:
    """Convert SQLAlchemy exceptions raised in the block into ``DatabaseError``."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise DatabaseError(f"database error while {action}: {describe_db_error(exc)}") from exc


def attr_text(value: AttrValue) -> str | None:
    """The contract's text form of an attribute value (integers in decimal)."""
    return None if value is None else str(value)


class Store:
    """SQL for one database. Not thread-safe: the sync writes from a single thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name

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
                    error="the process running this sync died before finishing",
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

    def record_failure(
        self,
        run_id: int,
        chatid: str,
        *,
        attempts: int,
        errcode: int | None,
        error: str,
        duration_ms: int,
    ) -> None:
        with (
            database_errors(f"recording the failure of chat {chatid!r}"),
            self.engine.begin() as conn,
        ):
            conn.execute(
                insert(sync_run_items).values(
                    run_id=run_id,
                    chatid=chatid,
                    status="failed",
                    changed=False,
                    attempts=attempts,
                    errcode=errcode,
                    error=error,
                    duration_ms=duration_ms,
                )
            )

    def recent_runs(self, limit: int) -> list[dict[str, Any]]:
        with database_errors("reading runs"), self.engine.connect() as conn:
            rows = conn.execute(
                select(sync_runs).order_by(sync_runs.c.id.desc()).limit(limit)
            ).mappings()
            return [dict(row) for row in rows]

    def run_items(self, run_id: int) -> list[dict[str, Any]]:
        with database_errors("reading run items"), self.engine.connect() as conn:
            rows = conn.execute(
                select(sync_run_items)
                .where(sync_run_items.c.run_id == run_id)
                .order_by(sync_run_items.c.chatid)
            ).mappings()
            return [dict(row) for row in rows]

    # -- one chat --------------------------------------------------------------------------

    def apply_chat(
        self,
        run_id: int,
        record: ChatRecord,
        *,
        observed_at: dt.datetime,
        attempts: int,
        duration_ms: int,
    ) -> bool:
        """Write one observed chat atomically; return whether anything changed."""
        with database_errors(f"writing chat {record.chatid!r}"), self.engine.begin() as conn:
            changed = self._apply(conn, run_id, record, observed_at)
            conn.execute(
                insert(sync_run_items).values(
                    run_id=run_id,
                    chatid=record.chatid,
                    status="ok",
                    changed=changed,
                    attempts=attempts,
                    errcode=None,
                    error=None,
                    duration_ms=duration_ms,
                )
            )
            return changed

    def _apply(self, conn: Connection, run_id: int, record: ChatRecord, now: dt.datetime) -> bool:
        chatid = record.chatid
        stored = (
            conn.execute(
                select(
                    *(chats.c[name] for name in ATTRIBUTE_FIELDS),
                    chats.c.fingerprint,
                    chats.c.member_count,
                    chats.c.first_seen_at,
                    chats.c.last_changed_at,
                    chats.c.dismissed_at,
                ).where(chats.c.chatid == chatid)
            )
            .mappings()
            .first()
        )
        if stored is not None and stored["fingerprint"] == record.fingerprint:
            conn.execute(
                sa_update(chats).where(chats.c.chatid == chatid).values(last_synced_at=now)
            )
            return False

        def event_row(event_type: str, **kw: Any) -> dict[str, Any]:
            row = {
                "run_id": run_id,
                "chatid": chatid,
                "observed_at": now,
                "event_type": event_type,
                "userid": None,
                "field": None,
                "old_value": None,
                "new_value": None,
                "is_baseline": False,
            }
            row.update(kw)
            return row

        events: list[dict[str, Any]] = []
        if stored is None:
            members = sorted(record.members or ())
            events.append(event_row("chat_discovered"))
            events.extend(event_row("member_joined", userid=u, is_baseline=True) for u in members)
            if members:
                conn.execute(
                    insert(chat_members),
                    [{"chatid": chatid, "userid": u, "joined_at": now} for u in members],
                )
            member_count = len(members)
            first_seen_at = now
            dismissed_at = now if record.status == STATUS_DISMISSED else None
        else:
            for name in ATTRIBUTE_FIELDS:
                old, new = stored[name], record.attributes[name]
                if old != new:
                    events.append(
                        event_row(
                            "attribute_changed",
                            field=name,
                            old_value=attr_text(old),
                            new_value=attr_text(new),
                        )
                    )
            member_count = stored["member_count"]
            if record.members is not None:
                events.extend(
                    event_row(kind, userid=u)
                    for kind, u in self._diff_members(conn, chatid, record.members, now)
                )
                member_count = len(record.members)
            first_seen_at = stored["first_seen_at"]
            if record.status == STATUS_DISMISSED:
                dismissed_at = stored["dismissed_at"] or now
            else:
                dismissed_at = None

        changed = bool(events)
        if events:
            conn.execute(insert(chat_events), events)
        values = {
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
        self._upsert_chat(conn, values)
        return changed

    def _diff_members(
        self, conn: Connection, chatid: str, members: frozenset[str], now: dt.datetime
    ) -> list[tuple[str, str]]:
        """Apply joins, leaves and re-joins in bulk; return (event_type, userid) pairs."""
        rows = conn.execute(
            select(chat_members.c.userid, chat_members.c.left_at).where(
                chat_members.c.chatid == chatid
            )
        ).all()
        current = {userid for userid, left_at in rows if left_at is None}
        former = {userid for userid, left_at in rows if left_at is not None}
        joined = members - current
        left = current - members
        rejoined = sorted(joined & former)
        new = sorted(joined - former)
        if new:
            conn.execute(
                insert(chat_members),
                [{"chatid": chatid, "userid": u, "joined_at": now} for u in new],
            )
        key = (chat_members.c.chatid == chatid) & (chat_members.c.userid == bindparam("uid"))
        if rejoined:
            conn.execute(
                sa_update(chat_members).where(key).values(joined_at=bindparam("now"), left_at=None),
                [{"uid": u, "now": now} for u in rejoined],
            )
        if left:
            conn.execute(
                sa_update(chat_members).where(key).values(left_at=bindparam("now")),
                [{"uid": u, "now": now} for u in sorted(left)],
            )
        return [("member_joined", u) for u in sorted(joined)] + [
            ("member_left", u) for u in sorted(left)
        ]

    def _upsert_chat(self, conn: Connection, values: Mapping[str, Any]) -> None:
        updates = [name for name in values if name not in ("chatid", "first_seen_at")]
        stmt: Any
        if self._dialect in {"mysql", "mariadb"}:
            ins = mysql.insert(chats).values(**values)
            stmt = ins.on_duplicate_key_update({n: ins.inserted[n] for n in updates})
        else:
            dialect_insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
            ins_pg = dialect_insert(chats).values(**values)
            stmt = ins_pg.on_conflict_do_update(
                index_elements=[chats.c.chatid],
                set_={n: ins_pg.excluded[n] for n in updates},
            )
        conn.execute(stmt)

    # -- reads used by the CLI and tests ----------------------------------------------------

    def current_members(self, chatid: str) -> set[str]:
        with database_errors("reading members"), self.engine.connect() as conn:
            rows = conn.execute(
                select(chat_members.c.userid).where(
                    (chat_members.c.chatid == chatid) & chat_members.c.left_at.is_(None)
                )
            ).scalars()
            return set(rows)

    def count_rows(self, table_name: str) -> int:
        table = {t.name: t for t in (chats, chat_members, chat_events, sync_runs, sync_run_items)}[
            table_name
        ]
        with database_errors("counting rows"), self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())
