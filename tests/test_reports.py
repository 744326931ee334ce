"""Each report on each database, against the history in tests/report_scenario.py, and the
`dingtalk-etl report` command line: formats, --output, exit codes and messages."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner, Result
from sqlalchemy.engine import Engine

from etl import reports
from etl.cli import cli
from etl.errors import ExitCode, NoAnswer
from etl.reports import parse_timestamp
from tests.report_scenario import MEMBERS, Scenario

UTC = ZoneInfo("UTC")
SHANGHAI = ZoneInfo("Asia/Shanghai")
US = dt.timedelta(microseconds=1)
When = Callable[[Scenario], dt.datetime | None]


def at(chatid: str, run: int, delta: dt.timedelta = dt.timedelta(0)) -> When:
    return lambda s: s.at(chatid, run) + delta


def between(chatid: str, run: int, next_run: int) -> When:
    return lambda s: s.between(chatid, run, next_run)


def now(_s: Scenario) -> None:
    return None


def after_event(number: int) -> When:
    """After ``EVENTS[number]`` happened, before it was received and before the next one."""
    return lambda s: s.after_event(number)


def before_event(number: int) -> When:
    return lambda s: s.occurred(number) - US


# -- members ------------------------------------------------------------------------------------

MEMBER_CASES: list[tuple[str, When, frozenset[str]]] = [
    ("chat-fin", at("chat-fin", 1), MEMBERS["chat-fin"][1]),
    ("chat-fin", between("chat-fin", 1, 2), MEMBERS["chat-fin"][1]),
    ("chat-fin", at("chat-fin", 2, -US), MEMBERS["chat-fin"][1]),
    ("chat-fin", at("chat-fin", 2), MEMBERS["chat-fin"][2]),
    ("chat-fin", between("chat-fin", 2, 3), MEMBERS["chat-fin"][2]),
    ("chat-fin", at("chat-fin", 3), MEMBERS["chat-fin"][3]),
    ("chat-fin", at("chat-fin", 5), MEMBERS["chat-fin"][5]),
    ("chat-fin", before_event(0), MEMBERS["chat-fin"][5]),
    ("chat-fin", after_event(0), frozenset({"alice", "carol"})),
    ("chat-fin", after_event(1), MEMBERS["chat-fin"][5]),
    ("chat-fin", at("chat-fin", 6), MEMBERS["chat-fin"][6]),
    ("chat-fin", now, MEMBERS["chat-fin"][6]),
    ("chat-eng", between("chat-eng", 3, 5), MEMBERS["chat-eng"][3]),
    ("chat-eng", at("chat-eng", 5), MEMBERS["chat-eng"][5]),
    ("chat-eng", after_event(2), frozenset({"bob", "frank"})),
    ("chat-eng", after_event(3), MEMBERS["chat-eng"][5]),
    ("chat-eng", now, MEMBERS["chat-eng"][6]),
    ("chat-old", at("chat-old", 3), MEMBERS["chat-old"][3]),
    ("chat-old", now, MEMBERS["chat-old"][4]),
]
MEMBER_IDS = [
    "fin-at-run1",
    "fin-between-runs-1-2",
    "fin-just-before-run2",
    "fin-at-run2-leave-and-join",
    "fin-between-runs-2-3",
    "fin-at-run3-rejoin",
    "fin-at-run5",
    "fin-just-before-alice-removes-dan",
    "fin-alice-removed-dan-event-not-yet-received",
    "fin-alice-added-dan-back",
    "fin-at-reconcile",
    "fin-now",
    "eng-between-run3-and-5",
    "eng-at-run5-leave",
    "eng-frank-added-by-event-no-poll-saw",
    "eng-frank-quit-by-event",
    "eng-now",
    "old-at-dismissal",
    "old-now-dismissed",
]


@pytest.mark.parametrize(("chat", "when", "expected"), MEMBER_CASES, ids=MEMBER_IDS)
def test_members_at_a_point_in_time(
    scenario: Scenario, engine: Engine, chat: str, when: When, expected: frozenset[str]
) -> None:
    report = reports.members(engine, chat, as_of=when(scenario), tz=UTC)

    assert {row["userid"] for row in report.rows} == expected
    assert [row["userid"] for row in report.rows] == sorted(expected)
    assert report.columns == ("userid", "joined_at", "baseline", "left_at", "is_owner")


def test_members_joined_left_baseline_and_owner(scenario: Scenario, engine: Engine) -> None:
    s = scenario
    early = reports.members(engine, "chat-fin", as_of=s.between("chat-fin", 1, 2), tz=UTC)
    late = reports.members(engine, "chat-fin", as_of=s.at("chat-fin", 3), tz=UTC)

    def view(report: reports.Report) -> dict[str, tuple[Any, ...]]:
        return {
            r["userid"]: (r["joined_at"], r["baseline"], r["left_at"], r["is_owner"])
            for r in report.rows
        }

    first = s.at("chat-fin", 1)
    assert view(early) == {
        "alice": (first, True, None, True),
        "bob": (first, True, s.at("chat-fin", 3), False),
        "carol": (first, True, s.at("chat-fin", 2), False),
    }
    assert view(late) == {
        "alice": (first, True, None, True),
        "carol": (s.at("chat-fin", 3), False, None, False),  # re-joined: a new interval
        "dan": (s.at("chat-fin", 2), False, s.occurred(0), False),  # alice removed him
    }


def test_members_as_of_follows_occurred_at_not_observed_at(
    scenario: Scenario, engine: Engine
) -> None:
    """Between DingTalk's time of a change and the time it was recorded, the change decides:
    the event row occurred before it was received, and before the reconcile's read."""
    s = scenario
    removed, added_back = s.event(0), s.event(1)
    as_of = s.after_event(0)
    assert removed["occurred_at"] < as_of < removed["observed_at"] < s.at("chat-fin", 6)

    during = reports.members(engine, "chat-fin", as_of=as_of, tz=UTC)
    received = reports.members(engine, "chat-fin", as_of=removed["observed_at"], tz=UTC)
    later = reports.members(engine, "chat-fin", as_of=s.at("chat-fin", 6), tz=UTC)

    assert "dan" not in {r["userid"] for r in during.rows}
    # Received after alice added him back: the re-join (occurred later) decides.
    assert added_back["occurred_at"] < removed["observed_at"]
    dan = next(r for r in received.rows if r["userid"] == "dan")
    assert (dan["joined_at"], dan["baseline"], dan["left_at"]) == (
        added_back["occurred_at"],
        False,
        None,
    )
    assert [r for r in later.rows if r["userid"] == "dan"] == [dan]


@pytest.mark.parametrize(
    ("when", "owner"),
    [(at("chat-eng", 1), "dave"), (between("chat-eng", 1, 2), "dave"), (at("chat-eng", 2), "bob")],
    ids=["at-run1", "before-owner-change", "at-owner-change"],
)
def test_members_is_owner_follows_owner_changes(
    scenario: Scenario, engine: Engine, when: When, owner: str
) -> None:
    report = reports.members(engine, "chat-eng", as_of=when(scenario), tz=UTC)
    assert [row["userid"] for row in report.rows if row["is_owner"]] == [owner]


@pytest.mark.parametrize(
    ("when", "dismissed"),
    [(at("chat-old", 2), False), (at("chat-old", 3), True), (now, True)],
    ids=["before", "at-dismissal", "now"],
)
def test_members_of_a_dismissed_chat_say_so(
    scenario: Scenario, engine: Engine, when: When, dismissed: bool
) -> None:
    report = reports.members(engine, "chat-old", as_of=when(scenario), tz=UTC)
    assert any("dismissed" in note for note in report.notes) is dismissed
    assert {row["userid"] for row in report.rows} == {"erin", "bob"}


@pytest.mark.parametrize(
    ("chat", "when", "message"),
    [
        ("chat-fin", at("chat-fin", 1, -US), "was first synced at"),
        ("chat-fin", lambda s: dt.datetime(2000, 1, 1, tzinfo=dt.UTC), "is unknown"),
        ("chat-x", now, "was never synced successfully (latest error: chat/get: errcode 40016"),
        ("chat-nope", now, "no chat 'chat-nope' in the database"),
    ],
    ids=["1us-before-first-sync", "long-before", "never-synced", "unknown"],
)
def test_members_without_an_answer(
    scenario: Scenario, engine: Engine, chat: str, when: When, message: str
) -> None:
    with pytest.raises(NoAnswer, match=re.escape(message)):
        reports.members(engine, chat, as_of=when(scenario), tz=UTC)


def test_no_answer_says_what_was_asked(scenario: Scenario, engine: Engine) -> None:
    as_of = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    with pytest.raises(NoAnswer) as before:
        reports.members(engine, "Finance & Controlling", as_of=as_of, tz=SHANGHAI)
    with pytest.raises(NoAnswer) as unknown:
        reports.user(engine, "nobody", tz=UTC)

    found = before.value
    assert (found.chat, found.as_of, found.first_synced_at) == (
        "chat-fin",
        as_of,
        scenario.at("chat-fin", 1),
    )
    assert (unknown.value.userid, unknown.value.chat) == ("nobody", None)
    assert found.exit_code == ExitCode.NO_ANSWER == 1


def test_members_by_chat_name_and_in_the_report_timezone(
    scenario: Scenario, engine: Engine
) -> None:
    report = reports.members(engine, "Finance & Controlling", as_of=None, tz=SHANGHAI)

    assert report.title.startswith("Members of chat-fin (Finance & Controlling) now: 3")
    alice = report.rows[0]
    assert alice["joined_at"] == scenario.at("chat-fin", 1)
    assert alice["joined_at"].utcoffset() == dt.timedelta(hours=8)
    assert report.timezone == "Asia/Shanghai"


# -- changes ------------------------------------------------------------------------------------

# (chatid, change, userid, old_value, new_value, the run that saw it or None for an event,
# operator_userid)
Change = tuple[str, str, str | None, str | None, str | None, int | None, str | None]
ALL_CHANGES: list[Change] = [
    ("chat-fin", "joined", "dan", None, None, 2, None),
    ("chat-fin", "left", "carol", None, None, 2, None),
    ("chat-eng", "owner_changed", None, "dave", "bob", 2, None),
    ("chat-fin", "joined", "carol", None, None, 3, None),
    ("chat-fin", "left", "bob", None, None, 3, None),
    ("chat-old", "dismissed", None, "1", "2", 3, None),
    ("chat-fin", "renamed", None, "Finance", "Finance & Controlling", 5, None),
    ("chat-fin", "setting_changed", None, "0", "1", 5, None),
    ("chat-eng", "left", "dave", None, None, 5, None),
    # The group events (EVENTS), in the order they occurred; the reconcile added nothing.
    ("chat-fin", "left", "dan", None, None, None, "alice"),
    ("chat-fin", "joined", "dan", None, None, None, "alice"),
    ("chat-eng", "joined", "frank", None, None, None, "bob"),
    ("chat-eng", "left", "frank", None, None, None, "frank"),  # quit
]
CHANGE_COLUMNS = (
    "occurred_at",
    "observed_at",
    "chatid",
    "chat_name",
    "change",
    "userid",
    "field",
    "old_value",
    "new_value",
    "run_id",
    "source",
    "operator_userid",
)


CHANGE_CASES: list[tuple[str, Callable[[Scenario], dict[str, Any]], list[Change]]] = [
    ("everything", lambda s: {}, ALL_CHANGES),
    (
        "exactly-one-sync",
        lambda s: {"since": s.at("chat-fin", 3), "until": s.at("chat-fin", 3)},
        ALL_CHANGES[3:5],
    ),
    (
        "run3-inclusive-bounds",
        lambda s: {"since": s.at("chat-fin", 3), "until": s.at("chat-old", 3)},
        ALL_CHANGES[3:6],
    ),
    ("until-just-before-run2", lambda s: {"until": s.at("chat-fin", 2) - US}, []),
    ("until-at-run2", lambda s: {"until": s.at("chat-fin", 2)}, ALL_CHANGES[:2]),
    ("since-between-runs-4-5", lambda s: {"since": s.between("chat-fin", 4, 5)}, ALL_CHANGES[6:]),
    (
        "chat-eng",
        lambda s: {"chats_filter": ["chat-eng"]},
        [ALL_CHANGES[i] for i in (2, 8, 11, 12)],
    ),
    (
        "two-chats-by-name-and-id",
        lambda s: {"chats_filter": ["Old project", "chat-eng"]},
        [ALL_CHANGES[i] for i in (2, 5, 8, 11, 12)],
    ),
    ("user-bob-incl-owner-change", lambda s: {"userid": "bob"}, [ALL_CHANGES[2], ALL_CHANGES[4]]),
    (
        "user-carol-leave-and-rejoin",
        lambda s: {"userid": "carol"},
        [ALL_CHANGES[1], ALL_CHANGES[3]],
    ),
    (
        "chat-and-user",
        lambda s: {"chats_filter": ["chat-fin"], "userid": "dan"},
        [ALL_CHANGES[i] for i in (0, 9, 10)],
    ),
    (
        "one-event-by-its-time-not-its-receipt",
        lambda s: {"since": s.occurred(0), "until": s.after_event(0)},
        [ALL_CHANGES[9]],
    ),
    ("since-the-reconcile", lambda s: {"since": s.at("chat-fin", 6)}, []),
    ("operator-bob", lambda s: {"operator": "bob"}, [ALL_CHANGES[11]]),
    ("operator-frank-quit", lambda s: {"operator": "frank"}, [ALL_CHANGES[12]]),
    (
        "operator-alice-in-chat-fin",
        lambda s: {"operator": "alice", "chats_filter": ["chat-fin"]},
        ALL_CHANGES[9:11],
    ),
    ("operator-and-user", lambda s: {"operator": "bob", "userid": "dan"}, []),
]


@pytest.mark.parametrize(
    ("window", "expected"), [c[1:] for c in CHANGE_CASES], ids=[c[0] for c in CHANGE_CASES]
)
def test_changes_in_a_window(
    scenario: Scenario,
    engine: Engine,
    window: Callable[[Scenario], dict[str, Any]],
    expected: list[Change],
) -> None:
    kwargs: dict[str, Any] = {"since": None, "until": None, **window(scenario)}
    report = reports.changes(engine, tz=UTC, **kwargs)

    got = [
        (
            r["chatid"],
            r["change"],
            r["userid"],
            r["old_value"],
            r["new_value"],
            r["run_id"],
            r["source"],
            r["operator_userid"],
        )
        for r in report.rows
    ]
    assert got == [
        (*c[:5], None, "event", c[6])
        if c[5] is None
        else (*c[:5], scenario.run_ids[c[5]], "poll", c[6])
        for c in expected
    ]
    assert report.columns == CHANGE_COLUMNS
    assert {r["change"] for r in report.rows} <= set(reports.CHANGE_KINDS)
    events = {(e["chatid"], e["userid"], e["event_type"]): e for e in scenario.event_rows}
    for row in report.rows:
        if row["source"] == "poll":
            run = next(n for n, rid in scenario.run_ids.items() if rid == row["run_id"])
            assert row["occurred_at"] == row["observed_at"] == scenario.at(row["chatid"], run)
        else:
            event = events[(row["chatid"], row["userid"], f"member_{row['change']}")]
            # DingTalk's time of the change, and the (later) time it was received.
            assert (row["occurred_at"], row["observed_at"]) == (
                event["occurred_at"],
                event["observed_at"],
            )
            assert row["occurred_at"] < row["observed_at"]
    times = [row["occurred_at"] for row in report.rows]
    assert times == sorted(times)


@pytest.mark.parametrize("window", [c[1] for c in CHANGE_CASES], ids=[c[0] for c in CHANGE_CASES])
def test_changes_stream_is_the_changes_report_row_by_row(
    scenario: Scenario, engine: Engine, window: Callable[[Scenario], dict[str, Any]]
) -> None:
    kwargs: dict[str, Any] = {"since": None, "until": None, **window(scenario)}
    whole = reports.changes(engine, tz=SHANGHAI, **kwargs)

    with reports.changes_stream(engine, tz=SHANGHAI, **kwargs) as stream:
        assert (stream.name, stream.title, stream.columns, stream.notes, stream.timezone) == (
            whole.name,
            whole.title,
            whole.columns,
            whole.notes,
            whole.timezone,
        )
        assert list(stream.rows) == whole.rows
    with reports.changes_stream(engine, tz=SHANGHAI, counted=False, **kwargs) as uncounted:
        assert f"{uncounted.title}: {len(whole.rows)}" == whole.title
        assert list(uncounted.rows) == whole.rows


def test_changes_note_chats_discovered_in_the_window(scenario: Scenario, engine: Engine) -> None:
    report = reports.changes(engine, since=None, until=scenario.at("chat-old", 1), tz=UTC)
    assert report.rows == []  # the baseline is no join
    assert any("3 chat(s) first synced in this window" in note for note in report.notes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chats_filter": ["nope"]}, "no chat 'nope'"),
        ({"userid": "nobody"}, "userid 'nobody' was never seen"),
    ],
    ids=["unknown-chat", "unknown-user"],
)
def test_changes_without_an_answer(engine: Engine, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(NoAnswer, match=re.escape(message)):
        reports.changes(engine, since=None, until=None, tz=UTC, **kwargs)


# -- user ---------------------------------------------------------------------------------------

# (chatid, joined, baseline, left, is_owner, chat_status, dismissed): a time is a run
# number (when that run saw it) or "event N" (when EVENTS[N] happened).
Interval = tuple[str, int | str, bool, int | str | None, bool, str, int | None]
USER_CASES: list[tuple[str, list[Interval]]] = [
    (
        "bob",
        [
            ("chat-eng", 1, True, None, True, "normal", None),
            ("chat-fin", 1, True, 3, False, "normal", None),
            ("chat-old", 1, True, None, False, "dismissed", 3),
        ],
    ),
    (
        "carol",
        [
            ("chat-fin", 1, True, 2, False, "normal", None),
            ("chat-fin", 3, False, None, False, "normal", None),
        ],
    ),
    ("dave", [("chat-eng", 1, True, 5, False, "normal", None)]),
    (
        "dan",
        [
            ("chat-fin", 2, False, "event 0", False, "normal", None),
            ("chat-fin", "event 1", False, None, False, "normal", None),
        ],
    ),
    ("frank", [("chat-eng", "event 2", False, "event 3", False, "normal", None)]),
]


@pytest.mark.parametrize(("userid", "intervals"), USER_CASES, ids=[c[0] for c in USER_CASES])
def test_user_intervals(
    scenario: Scenario, engine: Engine, userid: str, intervals: list[Interval]
) -> None:
    report = reports.user(engine, userid, tz=UTC)

    def when(chatid: str, ref: int | str | None) -> dt.datetime | None:
        if isinstance(ref, str):
            return scenario.occurred(int(ref.removeprefix("event ")))
        return None if ref is None else scenario.at(chatid, ref)

    assert [
        (
            r["chatid"],
            r["joined_at"],
            r["baseline"],
            r["left_at"],
            r["is_owner"],
            r["chat_status"],
            r["dismissed_at"],
        )
        for r in report.rows
    ] == [
        (chat, when(chat, joined), base, when(chat, left), owner, status, when(chat, dismissed))
        for chat, joined, base, left, owner, status, dismissed in intervals
    ]


@pytest.mark.parametrize("userid", ["zed", "nobody"], ids=["only-in-unreadable-chat", "unknown"])
def test_user_never_seen(engine: Engine, userid: str) -> None:
    with pytest.raises(NoAnswer, match=f"userid '{userid}' was never seen in any synced chat"):
        reports.user(engine, userid, tz=UTC)


# -- chats --------------------------------------------------------------------------------------

CHAT_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("all", {}, ["chat-eng", "chat-fin", "chat-old"]),
    ("dismissed", {"status": "dismissed"}, ["chat-old"]),
    ("normal", {"status": "normal"}, ["chat-eng", "chat-fin"]),
    ("risky", {"risky": True}, ["chat-eng", "chat-fin"]),
    ("risky-dismissed", {"risky": True, "status": "dismissed"}, []),
]


@pytest.mark.parametrize(
    ("kwargs", "expected"), [c[1:] for c in CHAT_CASES], ids=[c[0] for c in CHAT_CASES]
)
def test_chats_filters(engine: Engine, kwargs: dict[str, Any], expected: list[str]) -> None:
    report = reports.chat_list(engine, tz=UTC, **kwargs)
    assert [row["chatid"] for row in report.rows] == expected


def test_chats_owner_count_dismissal_and_risks(scenario: Scenario, engine: Engine) -> None:
    rows = {r["chatid"]: r for r in reports.chat_list(engine, tz=UTC).rows}

    got = {
        chatid: (r["name"], r["status"], r["owner_userid"], r["member_count"], r["risks"])
        for chatid, r in rows.items()
    }
    assert got == {
        "chat-eng": ("Engineering", "normal", "bob", 1, ["no join verification"]),
        "chat-fin": (
            "Finance & Controlling",
            "normal",
            "alice",
            3,
            ["searchable", "anyone may @all"],
        ),
        "chat-old": ("Old project", "dismissed", "erin", 2, []),
    }
    assert rows["chat-old"]["dismissed_at"] == scenario.at("chat-old", 3)
    assert rows["chat-fin"]["dismissed_at"] is None
    assert rows["chat-old"]["last_synced_at"] == scenario.at("chat-old", 4)


# -- sync health --------------------------------------------------------------------------------


def test_sync_health(scenario: Scenario, engine: Engine) -> None:
    rows = {r["chatid"]: r for r in reports.sync_health(engine, tz=UTC).rows}
    run = scenario.run_ids

    def view(r: dict[str, Any]) -> tuple[Any, ...]:
        return (
            r["state"],
            r["last_ok_run_id"],
            r["last_run_id"],
            r["failures_since_ok"],
            r["latest_error_run_id"],
            r["latest_errcode"],
        )

    assert {chatid: view(r) for chatid, r in rows.items()} == {
        "chat-eng": ("ok", run[6], run[6], 0, run[4], None),
        "chat-fin": ("ok", run[6], run[6], 0, None, None),
        "chat-old": ("failing", run[4], run[5], 1, run[5], None),
        "chat-x": ("never synced", None, run[5], 5, run[5], 40016),
    }
    assert rows["chat-old"]["last_synced_at"] == scenario.at("chat-old", 4)
    assert rows["chat-x"]["last_synced_at"] is None
    assert "HTTP 502" in rows["chat-old"]["latest_error"]
    assert "HTTP 502" in rows["chat-eng"]["latest_error"]
    assert rows["chat-fin"]["latest_error"] is None
    assert rows["chat-old"]["latest_error_at"] is not None


# -- timestamps (no database) -------------------------------------------------------------------

TIMESTAMPS: list[tuple[str, str, ZoneInfo, str, str]] = [
    ("day", "2026-06-30", UTC, "2026-06-30T00:00:00+00:00", "2026-06-30T23:59:59.999999+00:00"),
    (
        "day-in-zone",
        "2026-06-30",
        SHANGHAI,
        "2026-06-29T16:00:00+00:00",
        "2026-06-30T15:59:59.999999+00:00",
    ),
    ("basic-day", "20260630", UTC, "2026-06-30T00:00:00+00:00", "2026-06-30T23:59:59.999999+00:00"),
    ("month", "2026-06", UTC, "2026-06-01T00:00:00+00:00", "2026-06-30T23:59:59.999999+00:00"),
    ("last-month", "9999-12", UTC, "9999-12-01T00:00:00+00:00", "9999-12-31T23:59:59.999999+00:00"),
    (
        "last-day",
        "9999-12-31",
        UTC,
        "9999-12-31T00:00:00+00:00",
        "9999-12-31T23:59:59.999999+00:00",
    ),
    (
        "december",
        "2026-12",
        UTC,
        "2026-12-01T00:00:00+00:00",
        "2026-12-31T23:59:59.999999+00:00",
    ),
    (
        "naive",
        "2026-06-30T18:00",
        SHANGHAI,
        "2026-06-30T10:00:00+00:00",
        "2026-06-30T10:00:00+00:00",
    ),
    (
        "space",
        "2026-06-30 18:00:00.5",
        UTC,
        "2026-06-30T18:00:00.500000+00:00",
        "2026-06-30T18:00:00.500000+00:00",
    ),
    (
        "zulu",
        "2026-06-30T10:00:00Z",
        SHANGHAI,
        "2026-06-30T10:00:00+00:00",
        "2026-06-30T10:00:00+00:00",
    ),
    (
        "offset",
        "2026-06-30T18:00+08:00",
        UTC,
        "2026-06-30T10:00:00+00:00",
        "2026-06-30T10:00:00+00:00",
    ),
]


@pytest.mark.parametrize(
    ("text", "tz", "start", "end"), [c[1:] for c in TIMESTAMPS], ids=[c[0] for c in TIMESTAMPS]
)
def test_parse_timestamp(text: str, tz: ZoneInfo, start: str, end: str) -> None:
    value = parse_timestamp(text)
    assert value.start(tz).isoformat() == start
    assert value.end(tz).isoformat() == end


@pytest.mark.parametrize(
    "text",
    ["yesterday", "", "2026-13", "2026-02-30", "2026-06-30T25:00", "30/06/2026", "2026-6-3x"],
    ids=["word", "empty", "month-13", "feb-30", "hour-25", "european", "garbage"],
)
def test_parse_timestamp_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not an ISO 8601 date or time"):
        parse_timestamp(text)


@pytest.mark.parametrize(
    ("text", "tz"),
    [("9999-12-31", ZoneInfo("Etc/GMT+12")), ("0001-01-01", SHANGHAI)],
    ids=["after-year-9999", "before-year-1"],
)
def test_timestamps_beyond_the_calendar_are_out_of_range(text: str, tz: ZoneInfo) -> None:
    value = parse_timestamp(text)
    with pytest.raises(ValueError, match="is out of range"):
        value.end(tz) if text.startswith("9999") else value.start(tz)


# -- command line -------------------------------------------------------------------------------


def invoke(args: list[str]) -> Result:
    env = {
        "DINGTALK_APP_KEY": None,
        "DINGTALK_APP_SECRET": None,
        "DINGTALK_ETL_CONFIG": None,
        "DINGTALK_ETL_DATABASE_URL": None,
    }
    result = CliRunner().invoke(cli, args, env=env, prog_name="dingtalk-etl")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def report_cli(scenario: Scenario, *args: str, timezone: str = "UTC") -> Result:
    config = scenario.config_file(timezone)
    return invoke(["--config", str(config), "report", *args])


def test_cli_members_json_and_csv_parse(scenario: Scenario) -> None:
    when = scenario.at("chat-fin", 2).isoformat()
    as_json = report_cli(
        scenario, "members", "--chat", "chat-fin", "--as-of", when, "--format", "json"
    )
    as_csv = report_cli(
        scenario, "members", "--chat", "chat-fin", "--as-of", when, "--format", "csv"
    )

    assert (as_json.exit_code, as_csv.exit_code) == (0, 0)
    rows = json.loads(as_json.stdout)
    assert [r["userid"] for r in rows] == sorted(MEMBERS["chat-fin"][2])
    assert list(rows[0]) == ["userid", "joined_at", "baseline", "left_at", "is_owner"]
    dan = next(r for r in rows if r["userid"] == "dan")
    assert dt.datetime.fromisoformat(dan["joined_at"]) == scenario.at("chat-fin", 2)
    assert dan["baseline"] is False
    parsed = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["userid"] for r in parsed] == [r["userid"] for r in rows]
    assert [r["baseline"] for r in parsed] == ["true", "true", "false"]
    assert dt.datetime.fromisoformat(parsed[2]["joined_at"]) == scenario.at("chat-fin", 2)


@pytest.mark.parametrize(
    ("args", "columns"),
    [
        (["changes"], reports.changes),
        (["user", "--userid", "bob"], reports.user),
        (["chats", "--risky"], reports.chat_list),
        (["sync-health"], reports.sync_health),
    ],
    ids=["changes", "user", "chats", "sync-health"],
)
def test_cli_reports_as_json_and_csv(
    scenario: Scenario, args: list[str], columns: Callable[..., Any]
) -> None:
    as_json = report_cli(scenario, *args, "--format", "json")
    as_csv = report_cli(scenario, *args, "--format", "csv")
    table = report_cli(scenario, *args)

    assert (as_json.exit_code, as_csv.exit_code, table.exit_code) == (0, 0, 0), as_json.stderr
    rows = json.loads(as_json.stdout)
    parsed = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert rows
    assert len(parsed) == len(rows)
    assert list(parsed[0]) == list(rows[0])
    assert "(times in UTC)" in table.stdout


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_cli_changes_show_the_operator_and_the_source(scenario: Scenario, fmt: str) -> None:
    result = report_cli(scenario, "changes", "--operator", "alice", "--format", fmt)
    every = report_cli(scenario, "changes", "--format", fmt)

    assert (result.exit_code, every.exit_code) == (0, 0), result.stderr
    if fmt == "table":
        assert "Changes since the first sync made by alice: 2" in result.stdout
        assert "operator_userid" in result.stdout
        return
    if fmt == "json":
        rows, all_rows = json.loads(result.stdout), json.loads(every.stdout)
    else:
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        all_rows = list(csv.DictReader(io.StringIO(every.stdout)))
    assert list(rows[0]) == list(CHANGE_COLUMNS)
    assert [(r["change"], r["userid"], r["source"], r["operator_userid"]) for r in rows] == [
        ("left", "dan", "event", "alice"),
        ("joined", "dan", "event", "alice"),
    ]
    removed = rows[0]
    assert dt.datetime.fromisoformat(removed["occurred_at"]) == scenario.occurred(0)
    assert dt.datetime.fromisoformat(removed["observed_at"]) == scenario.event(0)["observed_at"]
    assert removed["run_id"] in (None, "")
    # Changes a sync found: source poll, no operator, the time of the sync.
    polled = [r for r in all_rows if r["source"] == "poll"]
    assert len(polled) == 9
    assert {r["operator_userid"] for r in polled} <= {None, ""}
    assert all(r["occurred_at"] == r["observed_at"] for r in polled)


def test_cli_shows_and_reads_times_in_the_report_timezone(scenario: Scenario) -> None:
    run2 = scenario.at("chat-fin", 2)
    local = run2.astimezone(SHANGHAI).replace(tzinfo=None).isoformat()  # naive: read in the zone
    result = report_cli(
        scenario,
        "members",
        "--chat",
        "chat-fin",
        "--as-of",
        local,
        "--format",
        "json",
        timezone="Asia/Shanghai",
    )

    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {r["userid"] for r in rows} == MEMBERS["chat-fin"][2]
    assert all(r["joined_at"].endswith("+08:00") for r in rows)


def test_cli_output_file_is_written_whole(scenario: Scenario, tmp_path: Path) -> None:
    target = tmp_path / "chats.csv"
    target.write_text("old content", encoding="utf-8")
    result = report_cli(scenario, "chats", "--format", "csv", "--output", str(target))

    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert f"wrote {target}" in result.stderr
    assert (
        target.read_text(encoding="utf-8")
        == report_cli(scenario, "chats", "--format", "csv").stdout
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chats.csv"]


def test_cli_html_members_page(scenario: Scenario) -> None:
    result = report_cli(scenario, "members", "--chat", "chat-fin", "--format", "html")
    assert result.exit_code == 0
    assert result.stdout.startswith("<!DOCTYPE html>")
    assert result.stdout.count("<svg") == 1
    assert "Finance &amp; Controlling" in result.stdout


CLI_ERRORS: list[tuple[str, list[str], int, str]] = [
    (
        "bad-as-of",
        ["members", "--chat", "chat-fin", "--as-of", "yesterday"],
        2,
        "Invalid value for '--as-of': 'yesterday' is not an ISO 8601 date or time (e.g. 2026-06-30",
    ),
    ("bad-since", ["changes", "--since", "2026-13"], 2, "Invalid value for '--since': '2026-13'"),
    (
        "since-after-until",
        ["changes", "--since", "2026-07-01", "--until", "2026-06-30"],
        2,
        "--since is after --until",
    ),
    ("missing-chat", ["members"], 2, "Missing option '--chat'"),
    ("bad-status", ["chats", "--status", "gone"], 2, "Invalid value for '--status'"),
    ("bad-format", ["chats", "--format", "xml"], 2, "Invalid value for '--format'"),
    (
        "unknown-chat",
        ["members", "--chat", "chat-nope"],
        1,
        "dingtalk-etl: error: no chat 'chat-nope' in the database (neither a synced chatid nor "
        "a chat name); `dingtalk-etl report chats` lists them\n",
    ),
    (
        "as-of-before-first-sync",
        ["members", "--chat", "chat-fin", "--as-of", "2000-01-01"],
        1,
        "its membership at 2000-01-01 23:59:59.999999 UTC is unknown (nothing is recorded "
        "before a chat's first sync)\n",
    ),
    ("never-synced", ["members", "--chat", "chat-x"], 1, "was never synced successfully"),
    ("unknown-chat-in-changes", ["changes", "--chat", "nope"], 1, "no chat 'nope'"),
    ("unknown-user", ["user", "--userid", "nobody"], 1, "userid 'nobody' was never seen"),
    (
        "unknown-operator",
        ["changes", "--operator", "nobody"],
        1,
        "userid 'nobody' was never seen",
    ),
]


@pytest.mark.parametrize(
    ("args", "code", "message"), [c[1:] for c in CLI_ERRORS], ids=[c[0] for c in CLI_ERRORS]
)
def test_cli_exit_codes_and_messages(
    scenario: Scenario, args: list[str], code: int, message: str
) -> None:
    result = report_cli(scenario, *args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert result.stdout == ""


def test_cli_before_first_sync_names_the_first_sync(scenario: Scenario) -> None:
    result = report_cli(scenario, "members", "--chat", "chat-fin", "--as-of", "2000-01-01")
    first = scenario.at("chat-fin", 1).strftime("%Y-%m-%d %H:%M:%S")
    assert f"chat 'chat-fin' (Finance & Controlling) was first synced at {first}" in result.stderr


@pytest.mark.parametrize(
    ("config", "code", "message"),
    [
        ('[database]\nurl = "sqlite:///{folder}/empty.db"\n', 78, "run `dingtalk-etl db upgrade`"),
        (
            '[database]\nurl = "sqlite:///{folder}/x.db"\n[report]\ntimezone = "Mars/Olympus"\n',
            78,
            "[report] timezone: unknown time zone (use an IANA name such as 'Asia/Shanghai'",
        ),
        ('[report]\ntimezon = "UTC"\n', 78, "[report] timezon: unknown key"),
    ],
    ids=["schema-not-migrated", "bad-timezone", "unknown-key"],
)
def test_cli_configuration_errors(tmp_path: Path, config: str, code: int, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(config.format(folder=tmp_path), encoding="utf-8")
    result = invoke(["--config", str(path), "report", "chats"])
    assert result.exit_code == code, result.output
    assert message in result.stderr


def test_cli_unwritable_output(scenario: Scenario, tmp_path: Path) -> None:
    target = tmp_path / "missing-folder" / "out.csv"
    result = report_cli(scenario, "chats", "--output", str(target))
    assert result.exit_code == 3
    assert f"cannot write {target}: No such file or directory" in result.stderr


HELP_EXAMPLES = [
    "dingtalk-etl report members --chat chat-finance --as-of 2026-06-30",
    "dingtalk-etl report changes --since 2026-06 --until 2026-06",
    "dingtalk-etl report user --userid user0042",
    "dingtalk-etl report chats --status dismissed",
    "dingtalk-etl report chats --risky --status normal",
    "dingtalk-etl report sync-health",
    "--format html --output audit.html",
    "1   no answer: unknown chat or user, or --as-of before the chat's first sync",
]


def test_cli_report_help_answers_each_question() -> None:
    result = invoke(["report", "--help"])
    assert result.exit_code == 0
    for example in HELP_EXAMPLES:
        assert example in result.stdout


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("members", "--as-of TIMESTAMP"),
        ("changes", "--since TIMESTAMP"),
        ("changes", "--operator ID"),
        ("user", "--userid ID"),
        ("chats", "--risky"),
        ("sync-health", "--format [table|csv|json|html]"),
    ],
    ids=["members", "changes", "changes-operator", "user", "chats", "sync-health"],
)
def test_cli_report_subcommand_help(command: str, expected: str) -> None:
    result = invoke(["report", command, "--help"])
    assert result.exit_code == 0
    assert expected in result.stdout
    assert "Examples:" in result.stdout
    assert "--output FILE" in result.stdout
