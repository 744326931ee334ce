"""The chat writer: a batch of fetched chats -> their rows, in one transaction.

SQL only. ``Store.write_chats`` reads what the batch needs of the stored state, asks the
planner (``etl.planner``) what each changed chat writes, and sends the rows through
``etl.bulk``, which knows how each database takes them fastest. A batch costs a handful of
statements whatever its size: a read of the fingerprints, of the changed chats' rows and of
their members, then one statement per kind of write. The common case, a chat whose
fingerprint did not change, reads nothing more and costs its share of one update of
``last_synced_at``. SQLAlchemy and driver errors become ``DatabaseFailure`` here
(``raise ... from``), passwords hidden.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy import ARRAY, Connection, Dialect, Engine, any_, bindparam, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from etl.budgetstore import record_calls
from etl.bulk import BatchRows, BulkWriter, padded
from etl.db import as_writer, describe_db_error, utcnow
from etl.errors import DatabaseFailure
from etl.eventstore import RECONCILED_OUTCOMES, mark_reconciled
from etl.normalize import ATTRIBUTE_FIELDS, ChatRecord
from etl.planner import ChatPlan, LogRow, StoredChat, explain, plan_chat
from etl.polling import NextPoll
from etl.quota import EndpointCalls
from etl.schema import chat_events, chat_members, chats, pushed_events


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


class _Reads:
    """The batch's reads of the stored state, built once for one database (``dialect``):
    constructing a statement costs SQLAlchemy more than running a cached one, and these run
    for every batch of every sync."""

    def __init__(self, dialect: Dialect) -> None:
        one_of = partial(_one_of, postgresql=dialect.name == "postgresql")
        # FOR UPDATE: an event for one of these chats (etl.eventstore) waits for this batch,
        # and this batch for it (SQLite: the writer's lock does the same).
        self.fingerprints = (
            select(chats.c.chatid, chats.c.fingerprint, chats.c.poll_interval_seconds)
            .where(one_of(chats.c.chatid, "chatids"))
            .with_for_update()
        )
        # The batch's events that no read of their chat has confirmed yet, with what they
        # are about.
        self.unconfirmed = (
            select(
                pushed_events.c.chatid,
                pushed_events.c.event_id,
                chat_events.c.userid,
                chat_events.c.field,
            )
            .select_from(
                pushed_events.outerjoin(
                    chat_events, chat_events.c.event_id == pushed_events.c.event_id
                )
            )
            .where(
                one_of(pushed_events.c.chatid, "chatids"),
                pushed_events.c.reconciled_at.is_(None),
                pushed_events.c.outcome.in_(RECONCILED_OUTCOMES),
            )
        )
        self.history = (
            select(
                chat_events.c.chatid,
                chat_events.c.occurred_at,
                chat_events.c.id,
                chat_events.c.event_type,
                chat_events.c.userid,
                chat_events.c.field,
                chat_events.c.new_value,
            )
            .where(
                one_of(chat_events.c.chatid, "chatids"),
                or_(
                    one_of(chat_events.c.userid, "userids"),
                    one_of(chat_events.c.field, "fields"),
                ),
                chat_events.c.event_type.in_(("member_joined", "member_left", "attribute_changed")),
            )
            .order_by(chat_events.c.chatid, chat_events.c.occurred_at, chat_events.c.id)
        )
        self.stored = select(
            chats.c.chatid,
            *(chats.c[name] for name in ATTRIBUTE_FIELDS),
            chats.c.member_count,
            chats.c.first_seen_at,
            chats.c.last_changed_at,
            chats.c.dismissed_at,
        ).where(one_of(chats.c.chatid, "chatids"))
        self.members = select(
            chat_members.c.chatid, chat_members.c.userid, chat_members.c.left_at
        ).where(one_of(chat_members.c.chatid, "chatids"))


def _one_of(column: ColumnElement[Any], name: str, *, postgresql: bool) -> ColumnElement[bool]:
    """``column`` is one of the list bound as ``name``.

    On PostgreSQL that is one array parameter (``= ANY``): the statement's text stays the same
    whatever the list's length, so psycopg parses it once and the server prepares it. An IN
    list of a batch's 64 chats was a new text to parse for every statement (psycopg keeps the
    parsed form of statements with at most 50 parameters): half the writer's CPU on an
    unchanged re-sync. Elsewhere an expanding IN; its callers pass lists ``padded`` to a
    power of two for that (in an array the repeated last chat changes nothing).
    """
    if postgresql:
        return column == any_(bindparam(name, type_=ARRAY(column.type)))
    return column.in_(bindparam(name, expanding=True))


class Store:
    """The chat writes of one database. Not thread-safe: the sync writes from one thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._bulk = BulkWriter(engine.dialect)
        self._reads = _Reads(engine.dialect)
        # Converted once: every event row and run item carries one of the two.
        flags = (False, True)
        self._is_baseline = {flag: self._bulk.events.bind("is_baseline", flag) for flag in flags}
        self._changed = {flag: self._bulk.items.bind("changed", flag) for flag in flags}
        self._writer: Connection | None = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Give back the connection the chat writes hold."""
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
            conn = self._writer = as_writer(self.engine.connect())
        with conn.begin():
            yield conn

    def write_chats(
        self,
        run_id: int,
        outcomes: Sequence[ChatOutcome],
        *,
        calls: Sequence[EndpointCalls] = (),
        source: str = "manual",
        next_poll: NextPoll | None = None,
    ) -> list[bool]:
        """Write a batch of fetched chats in one transaction; return whether each changed.

        Every chat's writes (chats row, members, events, run item) commit together, and
        together with the rest of the batch: a transaction costs the database the same for
        one chat as for ten. ``calls``: the API calls made since the last batch, counted in
        the same transaction; ``next_poll``: sets each chat's poll plan (adaptive polling).
        """
        if not outcomes and not calls:
            return []
        try:
            with self._writing() as conn:
                record_calls(conn, calls, source=source, at=utcnow(), run_id=run_id)
                return self._write(conn, run_id, outcomes, next_poll) if outcomes else []
        except SQLAlchemyError as exc:
            doing = "writing " + _describe_chats([o.chatid for o in outcomes])
            raise DatabaseFailure(
                f"database error while {doing}: {describe_db_error(exc)}"
            ) from exc

    def _write(
        self,
        conn: Connection,
        run_id: int,
        outcomes: Sequence[ChatOutcome],
        next_poll: NextPoll | None,
    ) -> list[bool]:
        records = [o.record for o in outcomes if o.record is not None]
        chatids = [r.chatid for r in records]
        # Fingerprints first: most chats need nothing else of their stored state.
        reads = self._reads
        known, intervals = _fingerprints(conn, reads, chatids) if records else ({}, {})
        unconfirmed = _unconfirmed(conn, reads, chatids) if records else Unconfirmed()
        changed = [
            r
            for r in records
            if known.get(r.chatid) != r.fingerprint or r.chatid in unconfirmed.event_ids
        ]
        stored = _stored_chats(conn, reads, [r for r in changed if r.chatid in known])
        history = _history(conn, reads, unconfirmed)
        rows = BatchRows()
        changes: list[bool] = []
        for outcome in outcomes:
            record, is_changed = outcome.record, False
            if record is None:
                pass
            elif record.chatid in unconfirmed.event_ids:
                plan = explain(
                    record,
                    stored.get(record.chatid),
                    history.get(record.chatid, ()),
                    outcome.observed_at,
                )
                self._add_plan(rows, run_id, plan)
                is_changed = plan.changed
            elif known.get(record.chatid) == record.fingerprint:
                rows.touch[record.chatid] = outcome.observed_at
            else:
                plan = plan_chat(record, stored.get(record.chatid), outcome.observed_at)
                self._add_plan(rows, run_id, plan)
                is_changed = plan.changed
            if record is not None and next_poll is not None:
                interval, due = next_poll.after(intervals.get(record.chatid), is_changed)
                rows.plans.append((record.chatid, interval, due))
            rows.items.append(
                (
                    run_id,
                    outcome.chatid,
                    "ok" if record is not None else "failed",
                    self._changed[is_changed],
                    outcome.attempts,
                    outcome.errcode,
                    outcome.error,
                    outcome.duration_ms,
                )
            )
            changes.append(is_changed)
        self._bulk.write(conn, rows)
        confirmed = [
            event_id
            for chatid in {r.chatid for r in records}
            for event_id in unconfirmed.event_ids.get(chatid, ())
        ]
        mark_reconciled(conn, confirmed, utcnow())
        return changes

    def _add_plan(self, rows: BatchRows, run_id: int, plan: ChatPlan) -> None:
        """A chat's planned writes as rows, with the values converted for the driver."""
        chatid, now = plan.chatid, plan.observed_at
        rows.chats.append(plan.chat_row)
        joined_at = self._bulk.members.bind("joined_at", now)
        rows.members.extend((chatid, userid, joined_at) for userid in plan.new_members)
        rows.rejoins.extend((chatid, userid, now) for userid in plan.rejoined)
        rows.leaves.extend((chatid, userid, now) for userid in plan.left)
        rows.member_states.extend((chatid, *state) for state in plan.member_states)
        # ``plan.events`` as rows, built from the plan's parts: one tuple per member event,
        # not two (a new chat has thousands). A poll row's change happened when it was
        # observed, as far as anyone knows: occurred_at is observed_at.
        at = self._bulk.events.bind("observed_at", now)
        poll = ("poll", self._bulk.events.bind("occurred_at", now))
        not_baseline, joins = self._is_baseline[False], self._is_baseline[plan.discovered]
        if plan.discovered:
            rows.events.append(
                (run_id, chatid, at, "chat_discovered", None, None, None, None, not_baseline, *poll)
            )
        rows.events.extend(
            (run_id, chatid, at, "attribute_changed", None, name, old, new, not_baseline, *poll)
            for name, old, new in plan.attribute_changes
        )
        rows.events.extend(
            (run_id, chatid, at, "member_joined", userid, None, None, None, joins, *poll)
            for userid in plan.joined
        )
        rows.events.extend(
            (run_id, chatid, at, "member_left", userid, None, None, None, not_baseline, *poll)
            for userid in plan.left
        )


def _fingerprints(
    conn: Connection, reads: _Reads, chatids: list[str]
) -> tuple[dict[str, str], dict[str, int | None]]:
    """The stored fingerprint and poll interval of each of ``chatids`` that has a row."""
    fingerprints: dict[str, str] = {}
    intervals: dict[str, int | None] = {}
    for chatid, fingerprint, interval in conn.execute(
        reads.fingerprints, {"chatids": padded(chatids)}
    ):
        fingerprints[chatid] = fingerprint
        intervals[chatid] = interval
    return fingerprints, intervals


@dataclass
class Unconfirmed:
    """A batch's events that wait for a read of their chat, and the users and fields they
    are about (an event with no rows of its own, e.g. a discovery, is about nothing)."""

    event_ids: dict[str, list[str]] = field(default_factory=dict)
    users: dict[str, set[str]] = field(default_factory=dict)
    fields: dict[str, set[str]] = field(default_factory=dict)


def _unconfirmed(conn: Connection, reads: _Reads, chatids: list[str]) -> Unconfirmed:
    found = Unconfirmed()
    for chatid, event_id, userid, name in conn.execute(
        reads.unconfirmed, {"chatids": padded(chatids)}
    ):
        ids = found.event_ids.setdefault(chatid, [])
        if event_id not in ids:
            ids.append(event_id)
        if name is not None:
            found.fields.setdefault(chatid, set()).add(name)
        elif userid is not None:
            found.users.setdefault(chatid, set()).add(userid)
    return found


def _history(conn: Connection, reads: _Reads, unconfirmed: Unconfirmed) -> dict[str, list[LogRow]]:
    """Every log row about the users and fields of each chat's unconfirmed events."""
    chatids = sorted(set(unconfirmed.users) | set(unconfirmed.fields))
    if not chatids:
        return {}
    users = sorted(set().union(*unconfirmed.users.values())) or [""]
    fields = sorted(set().union(*unconfirmed.fields.values())) or [""]
    history: dict[str, list[LogRow]] = {}
    params = {"chatids": chatids, "userids": users, "fields": fields}
    for chatid, occurred_at, row_id, kind, userid, name, new_value in conn.execute(
        reads.history, params
    ):
        # The query's IN lists mix the chats' users and fields: keep each chat's own.
        if name is not None and name not in unconfirmed.fields.get(chatid, ()):
            continue
        if name is None and userid not in unconfirmed.users.get(chatid, ()):
            continue
        row = LogRow(occurred_at, row_id, kind, userid, name, new_value)
        history.setdefault(chatid, []).append(row)
    return history


def _stored_chats(
    conn: Connection, reads: _Reads, records: list[ChatRecord]
) -> dict[str, StoredChat]:
    """The stored state of ``records``' chats, which all have a ``chats`` row.

    Members are read only for records that list members: the planner leaves the others'
    membership alone.
    """
    if not records:
        return {}
    stored = conn.execute(reads.stored, {"chatids": [r.chatid for r in records]}).mappings()
    rows = {row["chatid"]: row for row in stored}
    members: dict[str, dict[str, dt.datetime | None]] = {chatid: {} for chatid in rows}
    listed = [r.chatid for r in records if r.members is not None]
    if listed:
        for chatid, userid, left_at in conn.execute(reads.members, {"chatids": listed}):
            members[chatid][userid] = left_at
    return {
        chatid: StoredChat(
            attributes={name: row[name] for name in ATTRIBUTE_FIELDS},
            member_count=row["member_count"],
            first_seen_at=row["first_seen_at"],
            last_changed_at=row["last_changed_at"],
            dismissed_at=row["dismissed_at"],
            members=members[chatid],
        )
        for chatid, row in rows.items()
    }


def _describe_chats(chatids: Sequence[str]) -> str:
    if len(chatids) == 1:
        return f"chat {chatids[0]!r}"
    shown = ", ".join(repr(c) for c in chatids[:3])
    return f"chats {shown}" + (f" and {len(chatids) - 3} more" if len(chatids) > 3 else "")
