"""The change planner: a chat's stored state and its fetched record -> the rows to write.

Pure: plain values in, plain values out, no SQL and no driver types. ``plan_chat`` decides
what a successful fetch changes under the contract's rules: the ``chats`` row, the member
rows to insert, re-open or close, and the ``chat_events`` that record why. The stored state
is given as plain data (``StoredChat``), so it may come from the tables or from a replay of
a chat's log alike.

It runs on the writer's hot path (chats of 10,000 members, batches of 2,000 chats): the work
per member is a set operation and a sort, nothing more. Member events stay lists of userids
until the writer turns them into rows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from etl.normalize import ATTRIBUTE_FIELDS, STATUS_DISMISSED, AttrValue, ChatRecord

# A ``chat_events`` row's own values, in this order:
# (event_type, userid, field, old_value, new_value, is_baseline).
Event = tuple[str, str | None, str | None, str | None, str | None, bool]
# An ``attribute_changed`` event's (field, old_value, new_value), values as text.
AttributeChange = tuple[str, str | None, str | None]


@dataclass(frozen=True, slots=True)
class StoredChat:
    """What is known of a chat before this fetch.

    ``members`` maps every userid ever seen in the chat to its ``left_at`` (None while a
    member). It is only consulted when the fetched record lists members, so a reader may
    leave it empty for a record without a member list.
    """

    attributes: Mapping[str, AttrValue]
    member_count: int
    first_seen_at: dt.datetime
    last_changed_at: dt.datetime
    dismissed_at: dt.datetime | None
    members: Mapping[str, dt.datetime | None]


@dataclass(frozen=True, slots=True)
class ChatPlan:
    """A fetched chat's writes, all at ``observed_at``; userid lists are sorted.

    ``chat_row`` is the ``chats`` row, by column name. The events, in the order they are
    recorded (``events`` lists them): ``chat_discovered`` if ``discovered``, then one
    ``attribute_changed`` per item of ``attribute_changes``, ``member_joined`` for each of
    ``joined`` (the baseline if ``discovered``), ``member_left`` for each of ``left``.

    Of the ``joined``, ``new_members`` get a ``chat_members`` row and ``rejoined`` former
    members have theirs re-opened (``joined_at`` reset, ``left_at`` cleared); the ``left``
    have theirs closed.
    """

    chatid: str
    observed_at: dt.datetime
    chat_row: dict[str, Any]
    discovered: bool
    attribute_changes: Sequence[AttributeChange]
    joined: Sequence[str]
    left: Sequence[str]
    new_members: Sequence[str]
    rejoined: Sequence[str]
    # (userid, joined_at, left_at) of members whose row the log sets (``explain``); written
    # after the other member writes, so these win.
    member_states: Sequence[tuple[str, dt.datetime, dt.datetime | None]] = ()

    @property
    def changed(self) -> bool:
        """Whether the fetch changed anything the contract records: it has an event."""
        return self.discovered or bool(self.attribute_changes or self.joined or self.left)

    @property
    def events(self) -> list[Event]:
        """The plan's ``chat_events`` rows, in the order they are recorded."""
        events: list[Event] = []
        if self.discovered:
            events.append(("chat_discovered", None, None, None, None, False))
        events.extend(
            ("attribute_changed", None, name, old, new, False)
            for name, old, new in self.attribute_changes
        )
        baseline = self.discovered
        events.extend(("member_joined", u, None, None, None, baseline) for u in self.joined)
        events.extend(("member_left", u, None, None, None, False) for u in self.left)
        return events


def attr_text(value: AttrValue) -> str | None:
    """The contract's text form of an attribute value (integers in decimal)."""
    return None if value is None else str(value)


def plan_chat(record: ChatRecord, stored: StoredChat | None, now: dt.datetime) -> ChatPlan:
    """The writes of ``record``, fetched at ``now``; ``stored`` is None for a new chat."""
    if stored is None:
        return _discovered(record, now)
    old, new = stored.attributes, record.attributes
    changes = [
        (name, attr_text(old[name]), attr_text(new[name]))
        for name in ATTRIBUTE_FIELDS
        if old[name] != new[name]
    ]
    joined: list[str] = []
    left: list[str] = []
    member_count = stored.member_count
    # No member list (a dismissed chat's empty one): the membership stays as last observed.
    if record.members is not None:
        current = {userid for userid, left_at in stored.members.items() if left_at is None}
        joined = sorted(record.members - current)
        left = sorted(current - record.members)
        member_count = len(record.members)
    # Not a current member, so a known one is a former member: its row is re-opened.
    rejoined = [userid for userid in joined if userid in stored.members]
    new_members = [userid for userid in joined if userid not in stored.members]
    # Kept from the first observation of status 2; cleared if the chat is ever restored.
    dismissed = record.status == STATUS_DISMISSED
    dismissed_at = (stored.dismissed_at or now) if dismissed else None
    changed_at = now if changes or joined or left else stored.last_changed_at
    row = _chat_row(record, member_count, stored.first_seen_at, now, changed_at, dismissed_at)
    return ChatPlan(record.chatid, now, row, False, changes, joined, left, new_members, rejoined)


def _discovered(record: ChatRecord, now: dt.datetime) -> ChatPlan:
    """A chat's first successful fetch: its members are the baseline."""
    members = sorted(record.members or ())
    dismissed_at = now if record.status == STATUS_DISMISSED else None
    row = _chat_row(record, len(members), now, now, now, dismissed_at)
    return ChatPlan(record.chatid, now, row, True, [], members, [], members, [])


def _chat_row(
    record: ChatRecord,
    member_count: int,
    first_seen_at: dt.datetime,
    now: dt.datetime,
    last_changed_at: dt.datetime,
    dismissed_at: dt.datetime | None,
) -> dict[str, Any]:
    return {
        "chatid": record.chatid,
        **record.attributes,
        "member_count": member_count,
        "first_seen_at": first_seen_at,
        "last_synced_at": now,
        "last_changed_at": last_changed_at,
        "dismissed_at": dismissed_at,
        "raw": dict(record.raw),
        "fingerprint": record.fingerprint,
    }


@dataclass(frozen=True, slots=True)
class LogRow:
    """A ``chat_events`` row about a user (``userid``) or a field (``field``), for a replay."""

    occurred_at: dt.datetime
    id: int
    event_type: str
    userid: str | None
    field: str | None
    new_value: str | None


def explain(
    record: ChatRecord, stored: StoredChat | None, history: Sequence[LogRow], now: dt.datetime
) -> ChatPlan:
    """``plan_chat`` for a chat whose log holds events that no read has confirmed yet.

    ``history`` is every log row about the users and fields those events are about, in the
    log's order (``occurred_at``, then ``id``); the other users and fields are as stored.
    Rows are written for exactly the differences between what was read at ``now`` and what
    the log says at ``now``: a change an event recorded is not recorded again, a missed
    event becomes a row at ``now``, a stale one is corrected by one. The tables then take
    what the whole log says, these rows included: an event's time for the changes it
    recorded (``joined_at``, ``left_at``, ``dismissed_at``), and an event later than the
    read wins over the read.
    """
    users = {row.userid for row in history if row.field is None and row.userid is not None}
    fields = {row.field for row in history if row.field is not None}
    known = _as_logged(stored, history, now) if stored is not None else None
    plan = plan_chat(record, known, now)
    log = sorted([*history, *_rows_of(plan, users, fields)], key=_log_order)
    member_states = _member_states(log, users)
    chat_row = dict(plan.chat_row)
    for name in fields:
        value = _last(log, lambda row, name=name: row.field == name)
        if value is not None:
            chat_row[name] = _typed(name, value.new_value)
    if "status" in fields:
        dismissal = _last(log, lambda row: row.field == "status")
        dismissed = dismissal is not None and dismissal.new_value == str(STATUS_DISMISSED)
        chat_row["dismissed_at"] = dismissal.occurred_at if dismissed and dismissal else None
    current = _members_after(plan, stored, record, users, member_states)
    if current is not None:
        chat_row["member_count"] = current
    # The plan's member writes stay (its rows record the read's differences); the member
    # states, written after them, settle the users the log speaks of.
    return dataclasses.replace(plan, chat_row=chat_row, member_states=member_states)


# The rows this plan adds sort after every row already logged at the same time.
_NEW_ROW_ID = 1 << 62


def _log_order(row: LogRow) -> tuple[dt.datetime, int]:
    return row.occurred_at, row.id


def _rows_of(plan: ChatPlan, users: set[str], fields: set[str]) -> list[LogRow]:
    """``plan``'s events about ``users`` and ``fields``, as log rows at the read's time."""
    rows: list[LogRow] = []
    for kind, userid, name, _old, new, _baseline in plan.events:
        if (name is None and userid in users) or (name is not None and name in fields):
            rows.append(LogRow(plan.observed_at, _NEW_ROW_ID + len(rows), kind, userid, name, new))
    return rows


def _last(log: Sequence[LogRow], wanted: Any) -> LogRow | None:
    for row in reversed(log):
        if wanted(row):
            return row
    return None


def _as_logged(stored: StoredChat, history: Sequence[LogRow], now: dt.datetime) -> StoredChat:
    """``stored`` with its users and fields replaced by what the log says at ``now``."""
    attributes = dict(stored.attributes)
    members = dict(stored.members)
    dismissed_at = stored.dismissed_at
    for row in history:  # in the log's order: the last row at or before now wins
        if row.occurred_at > now:
            break
        if row.field is not None:
            attributes[row.field] = _typed(row.field, row.new_value)
            if row.field == "status":
                dismissed = row.new_value == str(STATUS_DISMISSED)
                dismissed_at = row.occurred_at if dismissed else None
        elif row.userid is not None:
            members[row.userid] = None if row.event_type == "member_joined" else row.occurred_at
    return StoredChat(
        attributes=attributes,
        member_count=stored.member_count,
        first_seen_at=stored.first_seen_at,
        last_changed_at=stored.last_changed_at,
        dismissed_at=dismissed_at,
        members=members,
    )


def _member_states(
    log: Sequence[LogRow], users: set[str]
) -> list[tuple[str, dt.datetime, dt.datetime | None]]:
    """(userid, joined_at, left_at) of each of ``users`` that ever joined, from the log."""
    joined: dict[str, dt.datetime] = {}
    left: dict[str, dt.datetime | None] = {}
    for row in log:
        if row.field is not None or row.userid not in users:
            continue
        if row.event_type == "member_joined":
            joined[row.userid], left[row.userid] = row.occurred_at, None
        elif row.event_type == "member_left":
            left[row.userid] = row.occurred_at
    return [(userid, joined[userid], left[userid]) for userid in sorted(joined)]


def _members_after(
    plan: ChatPlan,
    stored: StoredChat | None,
    record: ChatRecord,
    users: set[str],
    states: Sequence[tuple[str, dt.datetime, dt.datetime | None]],
) -> int | None:
    """The member count once the log's users are settled; None when they change nothing."""
    if not users:
        return None
    if record.members is not None:
        base = set(record.members)
    elif stored is not None:
        base = {userid for userid, left_at in stored.members.items() if left_at is None}
    else:
        return None
    base -= users
    base |= {userid for userid, _joined, left_at in states if left_at is None}
    return len(base)


_INTEGER_FIELDS = frozenset(ATTRIBUTE_FIELDS) - {"name", "owner_userid", "icon"}


def _typed(name: str, value: str | None) -> AttrValue:
    """An attribute's value as the ``chats`` column holds it, from the log's text."""
    if value is None or name not in _INTEGER_FIELDS:
        return value
    try:
        return int(value)
    except ValueError:
        return value
