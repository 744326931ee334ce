"""docs/schema.md: every ```sql block runs unchanged on each database and gives the answer
the scenario (tests/report_scenario.py) says it must; the dictionary names every column."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import bindparam, inspect, text
from sqlalchemy.engine import Engine

from etl import reports
from etl.budgetstore import BudgetLog
from etl.normalize import ATTRIBUTE_FIELDS
from etl.schema import UTCDateTime, metadata
from tests.report_scenario import MEMBERS, Scenario

DOC = Path(__file__).resolve().parent.parent / "docs" / "schema.md"
TIME_PARAMS = ("as_of", "since", "until")
UTC = ZoneInfo("UTC")
US = dt.timedelta(microseconds=1)


def sql_blocks() -> dict[str, str]:
    """``-- query: NAME`` -> the block's SQL, for each ```sql block of the document."""
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    found: dict[str, str] = {}
    for block in blocks:
        header = re.match(r"-- query: ([\w-]+)\n", block)
        assert header, f"a sql block without a '-- query: name' first line:\n{block}"
        assert header[1] not in found, f"two blocks named {header[1]}"
        found[header[1]] = block
    return found


def run(engine: Engine, name: str, **params: Any) -> list[tuple[Any, ...]]:
    statement = text(sql_blocks()[name])
    times = [bindparam(p, type_=UTCDateTime()) for p in TIME_PARAMS if p in params]
    if times:
        statement = statement.bindparams(*times)
    with engine.connect() as conn:
        return [tuple(normal(value) for value in row) for row in conn.execute(statement, params)]


def normal(value: Any) -> Any:
    """Plain SQL answers differ by database: times as text (SQLite), naive UTC (MySQL) or
    aware (PostgreSQL); booleans as 0/1 or bool. Make them comparable."""
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?", value):
        value = dt.datetime.fromisoformat(value)
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    return value


Check = Callable[[Scenario, Engine], None]


def check_find_chat(s: Scenario, engine: Engine) -> None:
    assert run(engine, "find-chat", pattern="Finance%") == [
        ("chat-fin", "Finance & Controlling", 1, 3)
    ]


def check_members_at(s: Scenario, engine: Engine) -> None:
    cases = [
        ("chat-fin", s.at("chat-fin", 1), MEMBERS["chat-fin"][1]),
        ("chat-fin", s.between("chat-fin", 1, 2), MEMBERS["chat-fin"][1]),
        ("chat-fin", s.at("chat-fin", 2), MEMBERS["chat-fin"][2]),
        ("chat-fin", s.between("chat-fin", 2, 3), MEMBERS["chat-fin"][2]),
        ("chat-fin", s.at("chat-fin", 3), MEMBERS["chat-fin"][3]),
        # Alice removed dan: he is out from DingTalk's time of it, before it was received.
        ("chat-fin", s.after_event(0), MEMBERS["chat-fin"][5] - {"dan"}),
        ("chat-fin", s.after_event(1), MEMBERS["chat-fin"][5]),
        ("chat-fin", s.at("chat-fin", 6), MEMBERS["chat-fin"][6]),
        ("chat-eng", s.after_event(2), MEMBERS["chat-eng"][5] | {"frank"}),
        ("chat-eng", s.after_event(3), MEMBERS["chat-eng"][5]),
    ]
    for chatid, as_of, expected in cases:
        rows = run(engine, "members-at", chatid=chatid, as_of=as_of)
        assert [r[0] for r in rows] == sorted(expected)
        report = reports.members(engine, chatid, as_of=as_of, tz=UTC)
        assert [(u, since, bool(base)) for u, since, base in rows] == [
            (r["userid"], r["joined_at"], r["baseline"]) for r in report.rows
        ]
    assert s.after_event(0) < s.event(0)["observed_at"]
    dan = run(engine, "members-at", chatid="chat-fin", as_of=s.after_event(1))[-1]
    assert dan == ("dan", s.occurred(1), False)
    before = run(
        engine,
        "members-at",
        chatid="chat-fin",
        as_of=s.at("chat-fin", 1) - dt.timedelta(microseconds=1),
    )
    assert before == []  # unknown, not empty: the text says to check first_seen_at


def check_current_members(s: Scenario, engine: Engine) -> None:
    rows = run(engine, "current-members", chatid="chat-fin")
    assert [(u, owner) for u, _, owner in rows] == [("alice", 1), ("carol", 0), ("dan", 0)]
    assert rows[1][1] == s.at("chat-fin", 3)  # carol re-joined


def check_joins_and_leaves(s: Scenario, engine: Engine) -> None:
    rows = run(engine, "joins-and-leaves", since=s.at("chat-fin", 2), until=s.at("chat-fin", 3))
    fin = ("chat-fin", "Finance & Controlling")
    assert rows == [
        (s.at("chat-fin", 2), *fin, "dan", "joined", "poll", None),
        (s.at("chat-fin", 2), *fin, "carol", "left", "poll", None),
    ]
    # Selected by DingTalk's time: the window ends before the events were received.
    events = run(engine, "joins-and-leaves", since=s.occurred(0), until=s.after_event(2))
    assert events == [
        (s.occurred(0), *fin, "dan", "left", "event", "alice"),
        (s.occurred(1), *fin, "dan", "joined", "event", "alice"),
        (s.occurred(2), "chat-eng", "Engineering", "frank", "joined", "event", "bob"),
    ]


def check_all_changes(s: Scenario, engine: Engine) -> None:
    rows = run(engine, "all-changes", since=s.at("chat-fin", 2), until=s.at("chat-fin", 3))
    assert [(r[1], r[3], r[4], r[5], r[6], r[7], r[8], r[9]) for r in rows] == [
        ("chat-fin", "member_joined", "dan", None, None, None, "poll", None),
        ("chat-fin", "member_left", "carol", None, None, None, "poll", None),
        ("chat-eng", "attribute_changed", None, "owner_userid", "dave", "bob", "poll", None),
    ]
    later = run(engine, "all-changes", since=s.at("chat-fin", 3), until=s.at("chat-fin", 5))
    assert ("chat-old", "status", "1", "2") in [(r[1], r[5], r[6], r[7]) for r in later]
    every = run(engine, "all-changes", since=s.at("chat-fin", 1), until=s.at("chat-fin", 6) + US)
    report = reports.changes(engine, since=None, until=None, tz=UTC)
    assert [(r[0], r[1], r[4], r[8], r[9]) for r in every] == [
        (r["occurred_at"], r["chatid"], r["userid"], r["source"], r["operator_userid"])
        for r in report.rows
    ]


def check_removed_by(s: Scenario, engine: Engine) -> None:
    window = {"since": s.at("chat-fin", 1), "until": s.at("chat-fin", 6)}
    assert run(engine, "removed-by", chatid="chat-fin", **window) == [
        (s.at("chat-fin", 2), "carol", None, "seen by a sync"),
        (s.at("chat-fin", 3), "bob", None, "seen by a sync"),
        (s.occurred(0), "dan", "alice", "removed"),
    ]
    assert run(engine, "removed-by", chatid="chat-eng", **window) == [
        (s.at("chat-eng", 5), "dave", None, "seen by a sync"),
        (s.occurred(3), "frank", "frank", "quit"),
    ]
    # The window is half-open, by the time of the change.
    assert run(
        engine, "removed-by", chatid="chat-fin", since=s.at("chat-fin", 3), until=s.occurred(0)
    ) == [(s.at("chat-fin", 3), "bob", None, "seen by a sync")]


def check_changes_by_operator(s: Scenario, engine: Engine) -> None:
    alice = run(engine, "changes-by-operator", operator="alice")
    assert alice == [
        (
            s.occurred(0),
            "chat-fin",
            "Finance & Controlling",
            "member_left",
            "dan",
            None,
            None,
            None,
        ),
        (
            s.occurred(1),
            "chat-fin",
            "Finance & Controlling",
            "member_joined",
            "dan",
            None,
            None,
            None,
        ),
    ]
    for operator in ("alice", "bob", "frank", "dave"):
        report = reports.changes(engine, since=None, until=None, operator=operator, tz=UTC)
        assert [
            (r[0], r[1], r[4]) for r in run(engine, "changes-by-operator", operator=operator)
        ] == [(r["occurred_at"], r["chatid"], r["userid"]) for r in report.rows]
    assert run(engine, "changes-by-operator", operator="gina") == []


def check_events_by_operator(s: Scenario, engine: Engine) -> None:
    assert [r[:4] for r in run(engine, "events-by-operator", operator="alice")] == [
        (s.occurred(0), "chat_remove_member", "chat-fin", "recorded"),
        (s.occurred(1), "chat_add_member", "chat-fin", "recorded"),
    ]
    # gina's event is about a chat nobody synced: in pushed_events only.
    gina = next(p for p in s.pushed if p["operator_userid"] == "gina")
    assert run(engine, "events-by-operator", operator="gina") == [
        (gina["occurred_at"], "chat_add_member", "chat-new", "discovered", gina["event_id"])
    ]


def check_events_waiting(s: Scenario, engine: Engine) -> None:
    gina = next(p for p in s.pushed if p["chatid"] == "chat-new")
    assert run(engine, "events-waiting") == [
        (
            gina["received_at"],
            gina["event_id"],
            "chat_add_member",
            "chat-new",
            "gina",
            "discovered",
        )
    ]
    # Every event of a synced chat was reconciled by run 6, after it was received.
    reconciled = [p for p in s.pushed if p["chatid"] != "chat-new"]
    assert len(reconciled) == 4
    assert all(p["received_at"] < p["reconciled_at"] for p in reconciled)


def check_discovered_chats(s: Scenario, engine: Engine) -> None:
    gina = next(p for p in s.pushed if p["chatid"] == "chat-new")
    assert run(engine, "discovered-chats") == [
        ("chat-new", gina["received_at"], "chat_add_member", "gina", None, None)
    ]


def check_user_groups(s: Scenario, engine: Engine) -> None:
    rows = run(engine, "user-groups", userid="carol")
    fin = ("chat-fin", "Finance & Controlling", 1)
    assert [(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows] == [
        (*fin, s.at("chat-fin", 1), True, s.at("chat-fin", 2)),
        (*fin, s.at("chat-fin", 3), False, None),
    ]
    dan = run(engine, "user-groups", userid="dan")
    assert [(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in dan] == [
        (*fin, s.at("chat-fin", 2), False, s.occurred(0)),
        (*fin, s.occurred(1), False, None),
    ]
    for userid in ("bob", "dan", "frank"):
        report = reports.user(engine, userid, tz=UTC)
        assert [(r[0], r[3], r[5]) for r in run(engine, "user-groups", userid=userid)] == [
            (r["chatid"], r["joined_at"], r["left_at"]) for r in report.rows
        ]


def check_dismissed_chats(s: Scenario, engine: Engine) -> None:
    assert run(engine, "dismissed-chats") == [
        ("chat-old", "Old project", "erin", s.at("chat-old", 3), 2)
    ]


def check_owner_history(s: Scenario, engine: Engine) -> None:
    assert run(engine, "owner-history", chatid="chat-eng") == [
        (s.at("chat-eng", 2), "dave", "bob", None)
    ]


def check_risky_chats(s: Scenario, engine: Engine) -> None:
    assert run(engine, "risky-chats") == [
        ("chat-eng", "Engineering", "bob", 1, 1, 0),
        ("chat-fin", "Finance & Controlling", "alice", 3, 0, 1),
    ]


def check_latest_errors(s: Scenario, engine: Engine) -> None:
    rows = run(engine, "latest-errors")
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("chat-eng", s.run_ids[4], None),
        ("chat-old", s.run_ids[5], None),
        ("chat-x", s.run_ids[5], 40016),
    ]
    health = {r["chatid"]: r for r in reports.sync_health(engine, tz=UTC).rows}
    assert [(r[0], r[4]) for r in rows] == [
        (chatid, health[chatid]["latest_error"]) for chatid in ("chat-eng", "chat-old", "chat-x")
    ]


def check_last_sync(s: Scenario, engine: Engine) -> None:
    # chat-old failed in run 5; run 6, the reconcile, read chat-fin then chat-eng.
    assert run(engine, "last-sync") == [
        ("chat-old", "Old project", s.at("chat-old", 4)),
        ("chat-fin", "Finance & Controlling", s.at("chat-fin", 6)),
        ("chat-eng", "Engineering", s.at("chat-eng", 6)),
    ]


def check_calls_this_month(s: Scenario, engine: Engine) -> None:
    budget = BudgetLog(engine)
    first = s.at("chat-fin", 1)
    for since in (first - dt.timedelta(hours=1), s.at("chat-fin", 4), s.at("chat-fin", 6) + US):
        assert run(engine, "calls-this-month", since=since) == [(budget.used_since(since),)]
    assert run(engine, "calls-this-month", since=first - dt.timedelta(hours=1))[0][0] > 0


CHECKS: dict[str, Check] = {
    "find-chat": check_find_chat,
    "members-at": check_members_at,
    "current-members": check_current_members,
    "joins-and-leaves": check_joins_and_leaves,
    "all-changes": check_all_changes,
    "removed-by": check_removed_by,
    "changes-by-operator": check_changes_by_operator,
    "events-by-operator": check_events_by_operator,
    "user-groups": check_user_groups,
    "dismissed-chats": check_dismissed_chats,
    "owner-history": check_owner_history,
    "risky-chats": check_risky_chats,
    "latest-errors": check_latest_errors,
    "last-sync": check_last_sync,
    "events-waiting": check_events_waiting,
    "discovered-chats": check_discovered_chats,
    "calls-this-month": check_calls_this_month,
}


def test_every_sql_block_is_checked() -> None:
    assert sorted(sql_blocks()) == sorted(CHECKS)


@pytest.mark.parametrize("name", list(CHECKS), ids=list(CHECKS))
def test_example_query(scenario: Scenario, engine: Engine, name: str) -> None:
    CHECKS[name](scenario, engine)


def test_dictionary_names_every_table_column_and_attribute_field() -> None:
    doc = DOC.read_text(encoding="utf-8")
    for table in metadata.tables.values():
        section = doc.split(f"### `{table.name}`", 1)
        assert len(section) == 2, f"no section for {table.name}"
        body = section[1].split("\n### ", 1)[0]
        for column in table.columns:
            assert f"| `{column.name}` |" in body, f"{table.name}.{column.name} not documented"
    for field in ATTRIBUTE_FIELDS:
        assert f"`{field}`" in doc
    for name in ("chat_discovered", "member_joined", "member_left", "attribute_changed"):
        assert f"| `{name}` |" in doc
    for view in ("current_chat_members", "membership_changes"):
        assert f"### `{view}`" in doc


@pytest.mark.parametrize("view", ["current_chat_members", "membership_changes"])
def test_dictionary_lists_the_view_columns_the_database_has(engine: Engine, view: str) -> None:
    body = DOC.read_text(encoding="utf-8").split(f"### `{view}`", 1)[1].split("\n### ", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", body, flags=re.M)
    assert documented == [column["name"] for column in inspect(engine).get_columns(view)]
