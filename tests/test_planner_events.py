"""explain: a read of a chat whose log holds unconfirmed events, as a pure replay (no database).

Each case gives what the tables hold (as of the last read), the log rows about the users and
fields the events are about, and what the read at ``NOW`` shows; it names the poll rows the
read must add (only what the log does not already say at ``NOW``) and the member rows and
``chats`` values the tables must end with (what the whole log says).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import pytest

from etl.planner import Event, LogRow, explain
from tests.test_planner import REFERENCE_MEMBERS, record, stored

T = dt.datetime(2026, 3, 5, 8, 0, tzinfo=dt.UTC)
NOW = T + dt.timedelta(hours=1)
BASELINE = T - dt.timedelta(days=3)


def at(minutes: int) -> dt.datetime:
    return T + dt.timedelta(minutes=minutes)


def join(minutes: int, userid: str, row_id: int) -> LogRow:
    return LogRow(at(minutes), row_id, "member_joined", userid, None, None)


def leave(minutes: int, userid: str, row_id: int) -> LogRow:
    return LogRow(at(minutes), row_id, "member_left", userid, None, None)


def attr(minutes: int, name: str, value: str, row_id: int) -> LogRow:
    return LogRow(at(minutes), row_id, "attribute_changed", None, name, value)


def baseline(userid: str, row_id: int) -> LogRow:
    return LogRow(BASELINE, row_id, "member_joined", userid, None, None)


def poll_join(*userids: str) -> list[Event]:
    return [("member_joined", u, None, None, None, False) for u in userids]


def poll_leave(*userids: str) -> list[Event]:
    return [("member_left", u, None, None, None, False) for u in userids]


@dataclass(frozen=True)
class Case:
    id: str
    history: list[LogRow]
    read: dict[str, Any] = field(default_factory=dict)  # chat_info changes (API keys)
    members: dict[str, dt.datetime | None] | None = None  # the stored member rows
    # expected
    events: list[Event] = field(default_factory=list)
    states: list[tuple[str, dt.datetime, dt.datetime | None]] = field(default_factory=list)
    chat: dict[str, Any] = field(default_factory=dict)
    member_count: int | None = None


# reference.json: owner manager4220, members manager4220 and user123, name "All-staff Chat".
CASES = [
    Case(
        "join-confirmed-keeps-the-event-time",
        history=[join(10, "u9", 5)],
        read={"useridlist": ["user123", "manager4220", "u9"]},
        states=[("u9", at(10), None)],
        member_count=3,
    ),
    Case(
        "leave-confirmed-keeps-the-event-time",
        history=[baseline("user123", 1), leave(10, "user123", 5)],
        read={"useridlist": ["manager4220"]},
        states=[("user123", BASELINE, at(10))],
        member_count=1,
    ),
    Case(
        "add-then-remove-inside-one-window",
        history=[join(10, "u9", 5), leave(20, "u9", 6)],
        states=[("u9", at(10), at(20))],
        member_count=2,
    ),
    Case(
        "out-of-order-arrival-replays-by-time",
        # The removal arrived (and got its id) before the addition it follows.
        history=[join(10, "u9", 6), leave(20, "u9", 5)],
        states=[("u9", at(10), at(20))],
        member_count=2,
    ),
    Case(
        "missed-removal-becomes-a-poll-row",
        history=[join(10, "u9", 5)],
        states=[("u9", at(10), NOW)],
        events=poll_leave("u9"),
        member_count=2,
    ),
    Case(
        "missed-addition-is-a-poll-row-beside-the-event",
        history=[join(10, "u9", 5)],
        read={"useridlist": ["user123", "manager4220", "u9", "u8"]},
        events=poll_join("u8"),
        states=[("u9", at(10), None)],
        member_count=4,
    ),
    Case(
        "stale-event-corrected-by-one-row",
        # The event says user123 left, but the read still has them: one row says so.
        history=[baseline("user123", 1), leave(10, "user123", 5)],
        events=poll_join("user123"),
        states=[("user123", NOW, None)],
        member_count=2,
    ),
    Case(
        "duplicate-rows-change-nothing",
        history=[join(10, "u9", 5), join(10, "u9", 6)],
        read={"useridlist": ["user123", "manager4220", "u9"]},
        states=[("u9", at(10), None)],
        member_count=3,
    ),
    Case(
        "event-older-than-the-last-poll",
        # A poll recorded u9's join at minute 30; the event (minute 10) came late and was
        # recorded, the poll's row still stands after it: nothing more to write.
        history=[join(10, "u9", 7), join(30, "u9", 5)],
        read={"useridlist": ["user123", "manager4220", "u9"]},
        members={**REFERENCE_MEMBERS, "u9": None},
        states=[("u9", at(30), None)],
        member_count=3,
    ),
    Case(
        "event-after-the-read-wins",
        # Happened after the read (arrived while it was written): the tables follow it.
        history=[baseline("user123", 1), leave(90, "user123", 5)],
        states=[("user123", BASELINE, at(90))],
        member_count=1,
    ),
    Case(
        "rename-confirmed",
        history=[attr(10, "name", "Finance", 5)],
        read={"name": "Finance"},
        chat={"name": "Finance"},
    ),
    Case(
        "rename-then-rename-back-unseen",
        history=[attr(10, "name", "Finance", 5), attr(20, "name", "All-staff Chat", 6)],
        chat={"name": "All-staff Chat"},
    ),
    Case(
        "missed-rename-is-a-poll-row",
        history=[attr(10, "owner_userid", "user123", 5)],
        read={"owner": "user123", "name": "Renamed"},
        events=[("attribute_changed", None, "name", "All-staff Chat", "Renamed", False)],
        chat={"owner_userid": "user123", "name": "Renamed"},
    ),
    Case(
        "stale-owner-corrected",
        history=[attr(10, "owner_userid", "user123", 5)],
        events=[("attribute_changed", None, "owner_userid", "user123", "manager4220", False)],
        chat={"owner_userid": "manager4220"},
    ),
    Case(
        "disband-keeps-the-event-time",
        history=[attr(10, "status", "2", 5)],
        read={"status": 2, "useridlist": []},
        chat={"status": 2, "dismissed_at": at(10)},
        member_count=None,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_explain(case: Case) -> None:
    before = stored(members=case.members)
    fetched = record(**case.read)

    plan = explain(fetched, before, sorted(case.history, key=lambda r: (r.occurred_at, r.id)), NOW)

    assert list(plan.events) == case.events
    assert sorted(plan.member_states) == sorted(case.states)
    for name, value in case.chat.items():
        assert plan.chat_row[name] == value, name
    if case.member_count is not None:
        assert plan.chat_row["member_count"] == case.member_count


def test_first_read_of_a_chat_with_events() -> None:
    history = [join(10, "u9", 5), leave(20, "u8", 6)]

    plan = explain(record(useridlist=["manager4220", "u9"]), None, history, NOW)

    assert plan.events[0][0] == "chat_discovered"
    assert ("member_joined", "u9", None, None, None, True) in plan.events
    # u9's last row is the baseline at NOW; u8 never joined in the log, so has no row.
    assert plan.member_states == [("u9", NOW, None)]
    assert plan.chat_row["member_count"] == 2
