"""The SQL of pushed group events: ``pushed_events``, their ``chat_events`` rows, discovery.

Knows SQL only. ``EventStore.record`` writes one event in one transaction: its
``pushed_events`` row (what became of it) and the ``chat_events`` rows of the changes it
describes, unless a poll already recorded them (``already_recorded``). ``record_many`` writes
the events that arrived together the same way, in one transaction. A redelivered event id
writes nothing. The reconcile that follows is the sync's (``etl.store``), which reads the
chats whose events wait for one here (``waiting_chats``).

The chat's ``chats`` row is locked first (``FOR UPDATE``; SQLite's writer lock), as the sync's
writer locks it, so an event and a poll of the same chat never decide on each other's
half-written rows.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, insert, select

from etl.config import Config
from etl.db import database_errors, writing
from etl.events import (
    ALREADY_RECORDED,
    DISCOVERED,
    INVALID,
    RECORDED,
    UNKNOWN_CHAT,
    Change,
    PushedEvent,
)
from etl.normalize import ATTRIBUTE_FIELDS
from etl.schema import chat_events, chats, discovered_chats, event_listeners, pushed_events

# Events a reconcile of their chat confirms (the others wait for nothing).
RECONCILED_OUTCOMES = (RECORDED, ALREADY_RECORDED, DISCOVERED)
MEMBER_EVENTS = ("member_joined", "member_left")


# The statements of ``record``, built once with bound parameters: building a statement and its
# cache key anew for each execution cost more than half of ``record``'s CPU time.
_KNOWN = select(pushed_events.c.event_id).where(pushed_events.c.event_id == bindparam("event_id"))
_DISCOVERED = select(discovered_chats.c.chatid).where(
    discovered_chats.c.chatid == bindparam("chatid")
)
_INSERT_DISCOVERED = insert(discovered_chats)
_INSERT_PUSHED = insert(pushed_events)
_INSERT_ROWS = insert(chat_events)
# Taken before anything is read: the sync's writer takes the same lock.
_LOCK_CHAT = (
    select(*(chats.c[name] for name in ATTRIBUTE_FIELDS))
    .where(chats.c.chatid == bindparam("chatid"))
    .with_for_update()
)
_FOLLOWING_COLUMNS = (chat_events.c.source, chat_events.c.event_type, chat_events.c.new_value)
_FOLLOWING_ORDER = (chat_events.c.occurred_at, chat_events.c.id)
# The next row about the same user (a member change) or field (an attribute change) after ``at``.
_FOLLOWING_MEMBER = (
    select(*_FOLLOWING_COLUMNS)
    .where(
        chat_events.c.chatid == bindparam("chatid"),
        chat_events.c.userid == bindparam("key"),
        chat_events.c.event_type.in_(MEMBER_EVENTS),
        chat_events.c.occurred_at > bindparam("at"),
    )
    .order_by(*_FOLLOWING_ORDER)
    .limit(1)
)
_FOLLOWING_FIELD = (
    select(*_FOLLOWING_COLUMNS)
    .where(
        chat_events.c.chatid == bindparam("chatid"),
        chat_events.c.field == bindparam("key"),
        chat_events.c.event_type == "attribute_changed",
        chat_events.c.occurred_at > bindparam("at"),
    )
    .order_by(*_FOLLOWING_ORDER)
    .limit(1)
)
_VALUE_BEFORE = (
    select(chat_events.c.new_value)
    .where(
        chat_events.c.chatid == bindparam("chatid"),
        chat_events.c.field == bindparam("field"),
        chat_events.c.event_type == "attribute_changed",
        chat_events.c.occurred_at <= bindparam("at"),
    )
    .order_by(chat_events.c.occurred_at.desc(), chat_events.c.id.desc())
    .limit(1)
)


@dataclass(frozen=True)
class Recorded:
    """What ``record`` did with an event: its outcome and how many ``chat_events`` rows."""

    outcome: str
    rows: int = 0


class EventStore:
    """SQL of pushed events for one database. One writer thread at a time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def discovered(self) -> set[str]:
        """The chats that events added to the synced set."""
        with database_errors("reading discovered chats"), self.engine.connect() as conn:
            return set(conn.execute(select(discovered_chats.c.chatid)).scalars())

    def waiting_chats(self) -> dict[str, dt.datetime]:
        """Chats with events that wait for a reconcile, and when the last of them arrived."""
        query = (
            select(pushed_events.c.chatid, func.max(pushed_events.c.received_at))
            .where(
                pushed_events.c.reconciled_at.is_(None),
                pushed_events.c.outcome.in_(RECONCILED_OUTCOMES),
                pushed_events.c.chatid.is_not(None),
            )
            .group_by(pushed_events.c.chatid)
        )
        with (
            database_errors("reading events waiting for a reconcile"),
            self.engine.connect() as conn,
        ):
            return {chatid: at for chatid, at in conn.execute(query)}

    def record(
        self,
        event: PushedEvent,
        *,
        received_at: dt.datetime,
        synced: bool,
        discover: bool,
    ) -> Recorded | None:
        """Write ``event`` and its changes in one transaction; None when its id is known.

        ``synced``: whether its chat is in the synced set; ``discover``: whether an event for
        another chat adds that chat to it.
        """
        synced_chats = {event.chatid} if synced and event.chatid is not None else set()
        return self.record_many([(event, received_at)], synced=synced_chats, discover=discover)[0]

    def record_many(
        self,
        events: Sequence[tuple[PushedEvent, dt.datetime]],
        *,
        synced: Container[str],
        discover: bool,
    ) -> list[Recorded | None]:
        """Write each ``(event, received_at)`` as ``record`` does, all in one transaction.

        One commit for the events that wait on the socket together: on PostgreSQL a commit
        is a WAL flush, which would otherwise bound the listener to a few dozen events a
        second. ``synced``: the chats of the synced set (a chat an earlier event of the same
        batch discovered counts as synced for the later ones, as it would one by one).
        """
        first = events[0][0].event_id if events else "none"
        doing = (
            f"recording event {first}"
            if len(events) == 1
            else (f"recording {len(events)} events from {first}")
        )
        discovered: set[str] = set()
        results: list[Recorded | None] = []
        with database_errors(doing), writing(self.engine) as conn:
            for event, received_at in events:
                chatid = event.chatid
                in_set = chatid is not None and (chatid in synced or chatid in discovered)
                result = _record(conn, event, received_at, synced=in_set, discover=discover)
                if result is not None and result.outcome == DISCOVERED and chatid is not None:
                    discovered.add(chatid)
                results.append(result)
        return results


def _record(
    conn: Connection,
    event: PushedEvent,
    received_at: dt.datetime,
    *,
    synced: bool,
    discover: bool,
) -> Recorded | None:
    if _known(conn, event.event_id):
        return None
    if event.invalid is not None or event.chatid is None:
        result = Recorded(INVALID)
    elif not synced:
        result = Recorded(UNKNOWN_CHAT)
        if discover:
            _discover(conn, event.chatid, event.event_id, received_at)
            result = Recorded(DISCOVERED)
    else:
        result = _record_changes(conn, event, received_at)
    conn.execute(
        _INSERT_PUSHED,
        {
            "event_id": event.event_id,
            "event_type": event.event_type[:64],
            "chatid": event.chatid,
            "occurred_at": event.occurred_at,
            "received_at": received_at,
            "operator_userid": event.operator_userid,
            "payload": dict(event.payload),
            "outcome": result.outcome,
        },
    )
    return result


def _known(conn: Connection, event_id: str) -> bool:
    return conn.execute(_KNOWN, {"event_id": event_id}).first() is not None


def _discover(conn: Connection, chatid: str, event_id: str, at: dt.datetime) -> None:
    if conn.execute(_DISCOVERED, {"chatid": chatid}).first() is None:
        conn.execute(
            _INSERT_DISCOVERED, {"chatid": chatid, "discovered_at": at, "event_id": event_id}
        )


def _record_changes(conn: Connection, event: PushedEvent, received_at: dt.datetime) -> Recorded:
    assert event.chatid is not None
    chatid = event.chatid
    # The chat's row is locked before anything is read.
    stored = conn.execute(_LOCK_CHAT, {"chatid": chatid}).first()
    rows: list[dict[str, Any]] = []
    for change in event.changes:
        if _already_recorded(conn, chatid, event.occurred_at, change):
            continue
        old_value = change.old_value
        if change.field is not None and old_value is None:
            old_value = _value_before(conn, chatid, change.field, event.occurred_at, stored)
        rows.append(
            {
                "run_id": None,
                "chatid": chatid,
                "observed_at": received_at,
                "event_type": change.event_type,
                "userid": change.userid,
                "field": change.field,
                "old_value": old_value,
                "new_value": change.new_value,
                "is_baseline": False,
                "source": "event",
                "occurred_at": event.occurred_at,
                "operator_userid": event.operator_userid,
                "event_id": event.event_id,
            }
        )
    if rows:
        conn.execute(_INSERT_ROWS, rows)
        return Recorded(RECORDED, len(rows))
    return Recorded(ALREADY_RECORDED)


def _already_recorded(conn: Connection, chatid: str, at: dt.datetime, change: Change) -> bool:
    """Whether the next row about the same user or field after ``at`` is a poll row of the
    same change: a sync saw it before DingTalk's event reached us."""
    if change.field is None:
        query, key = _FOLLOWING_MEMBER, change.userid
    else:
        query, key = _FOLLOWING_FIELD, change.field
    following = conn.execute(query, {"chatid": chatid, "key": key, "at": at}).first()
    if following is None or following.source != "poll":
        return False
    if change.field is None:
        return bool(following.event_type == change.event_type)
    return bool(following.new_value == change.new_value)


def _value_before(
    conn: Connection, chatid: str, field: str, at: dt.datetime, stored: Any
) -> str | None:
    """The log's value of ``field`` just before ``at``: the last change's, else the chat's."""
    previous = conn.execute(_VALUE_BEFORE, {"chatid": chatid, "field": field, "at": at}).first()
    if previous is not None:
        return previous.new_value  # type: ignore[no-any-return]
    if stored is None:
        return None
    value = stored._mapping[field]
    return None if value is None else str(value)


def mark_reconciled(conn: Connection, event_ids: Iterable[str], at: dt.datetime) -> None:
    """Record that a reconcile read the chats of ``event_ids`` after them."""
    ids = list(event_ids)
    if ids:
        conn.execute(
            pushed_events.update().where(pushed_events.c.event_id.in_(ids)).values(reconciled_at=at)
        )


class ListenerLog:
    """The ``event_listeners`` row of a running ``listen``, and what ``status`` reads of it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def start(self, *, at: dt.datetime) -> int:
        with database_errors("recording the listener"), self.engine.begin() as conn:
            result = conn.execute(
                insert(event_listeners).values(
                    hostname=socket.gethostname()[:255],
                    pid=os.getpid(),
                    started_at=at,
                    connected=False,
                    events_received=0,
                    events_ignored=0,
                    reconnects=0,
                    updated_at=at,
                )
            )
            listener_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
            assert isinstance(listener_id, int)
            return listener_id

    def update(self, listener_id: int, values: Mapping[str, Any]) -> None:
        with database_errors("recording the listener's state"), self.engine.begin() as conn:
            conn.execute(
                event_listeners.update().where(event_listeners.c.id == listener_id).values(**values)
            )

    def latest(self) -> dict[str, Any] | None:
        """The most recently updated listener's row."""
        query = select(event_listeners).order_by(event_listeners.c.updated_at.desc()).limit(1)
        with database_errors("reading the listener's state"), self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
            return dict(row) if row is not None else None

    def waiting_events(self) -> int:
        """Events of synced chats that wait for their chat's reconcile."""
        query = select(func.count()).where(
            pushed_events.c.reconciled_at.is_(None),
            pushed_events.c.outcome.in_(RECONCILED_OUTCOMES),
        )
        with database_errors("counting events"), self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())


def synced_chatids(config: Config, engine: Engine) -> tuple[str, ...]:
    """The synced set: the configured chats, then those that events added (discovery)."""
    discovered = EventStore(engine).discovered()
    return config.chatids + tuple(sorted(discovered - set(config.chatids)))
