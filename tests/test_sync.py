"""The contract's guarantees, end to end: simulator over HTTP -> sync -> each database."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.engine import URL

from etl import reports
from etl.db import create_db_engine
from etl.logs import configure_logging
from etl.simulator import SimChat, Simulator, World
from etl.sync import ReconcileRuns, run_sync
from tests.conftest import APP_SECRET, MakeConfig
from tests.helpers import current_members, events, rows, snapshot

READABLE = ["chat-a", "chat-b", "chat-c"]


def test_first_sync_discovers_chats_with_baseline_members(
    db_url: URL, simulator: Simulator, world: World, make_config: MakeConfig
) -> None:
    result = run_sync(make_config(db_url, simulator.base_url, READABLE))

    assert (result.status, result.exit_code) == ("succeeded", 0)
    assert (result.chats_succeeded, result.chats_failed, result.chats_changed) == (3, 0, 3)
    assert result.api_calls == 1 + 3  # one gettoken, one chat/get per chat
    assert current_members(db_url) == {
        k: set(v) for k, v in world.membership().items() if k in READABLE
    }
    chat_a = {r["chatid"]: r for r in rows(db_url, "chats")}["chat-a"]
    assert chat_a["name"] == "Alpha"
    assert chat_a["owner_userid"] == "u1"
    assert chat_a["member_count"] == 3
    assert chat_a["status"] == 1
    assert chat_a["raw"]["useridlist"] == ["u1", "u2", "u3"]
    assert chat_a["first_seen_at"] == chat_a["last_synced_at"] == chat_a["last_changed_at"]
    assert chat_a["first_seen_at"].utcoffset() is not None
    assert chat_a["dismissed_at"] is None
    discovered = events(db_url, chatid="chat-a", event_type="chat_discovered")
    baseline = events(db_url, chatid="chat-a", event_type="member_joined")
    assert len(discovered) == 1
    assert discovered[0]["is_baseline"] is False
    assert {e["userid"] for e in baseline} == {"u1", "u2", "u3"}
    assert all(e["is_baseline"] and e["run_id"] == result.run_id for e in baseline)
    run = rows(db_url, "sync_runs")[0]
    assert run["status"] == "succeeded"
    assert run["trigger"] == "manual"
    assert run["api_calls"] == 4
    assert run["retries"] == 0
    assert run["finished_at"] is not None
    items = rows(db_url, "sync_run_items")
    assert [(i["chatid"], i["status"], i["changed"], i["attempts"]) for i in items] == [
        (c, "ok", True, 1) for c in READABLE
    ]


def test_join_leave_and_rejoin(
    db_url: URL, simulator: Simulator, world: World, make_config: MakeConfig
) -> None:
    config = make_config(db_url, simulator.base_url, ["chat-a"])
    run_sync(config)
    world.add_members("chat-a", ["u4"])
    world.remove_members("chat-a", ["u2"])
    second = run_sync(config)
    world.add_members("chat-a", ["u2"])
    third = run_sync(config)

    assert current_members(db_url) == {"chat-a": {"u1", "u2", "u3", "u4"}}
    later = [
        (e["run_id"], e["event_type"], e["userid"], e["is_baseline"])
        for e in events(db_url, chatid="chat-a")
        if not e["is_baseline"] and e["event_type"] != "chat_discovered"
    ]
    assert later == [
        (second.run_id, "member_joined", "u4", False),
        (second.run_id, "member_left", "u2", False),
        (third.run_id, "member_joined", "u2", False),
    ]
    members = {r["userid"]: r for r in rows(db_url, "chat_members")}
    assert len(members) == 4  # u2 re-joined: same row, not a second one
    assert members["u2"]["left_at"] is None
    assert members["u2"]["joined_at"] > members["u1"]["joined_at"]  # reset on re-join
    assert {r["chatid"]: r["member_count"] for r in rows(db_url, "chats")} == {"chat-a": 4}


def test_membership_at_time_t_from_events(
    db_url: URL, simulator: Simulator, world: World, make_config: MakeConfig
) -> None:
    config = make_config(db_url, simulator.base_url, ["chat-a"])
    run_sync(config)
    world.remove_members("chat-a", ["u1"])
    run_sync(config)
    evs = events(db_url, chatid="chat-a")
    first_run = max(e["observed_at"] for e in evs if e["is_baseline"])
    second_run = max(e["observed_at"] for e in evs)

    # The report's own as-of query, which reads the events alone.
    engine = create_db_engine(db_url)
    try:

        def members_at(at: dt.datetime) -> set[str]:
            report = reports.members(engine, "chat-a", as_of=at, tz=ZoneInfo("UTC"))
            return {row["userid"] for row in report.rows}

        assert members_at(first_run) == {"u1", "u2", "u3"}
        assert members_at(second_run) == {"u2", "u3"}
    finally:
        engine.dispose()


def test_attribute_changes_record_old_and_new_text(
    db_url: URL, simulator: Simulator, world: World, make_config: MakeConfig
) -> None:
    config = make_config(db_url, simulator.base_url, ["chat-b"])
    run_sync(config)
    world.set_attr("chat-b", name="Beta 2", owner="u4", searchable=0, validationType=1)
    result = run_sync(config)

    changes = {
        e["field"]: (e["old_value"], e["new_value"])
        for e in events(db_url, event_type="attribute_changed", run_id=result.run_id)
    }
    assert changes == {
        "name": ("Beta", "Beta 2"),
        "owner_userid": ("u2", "u4"),
        "searchable": ("1", "0"),
        "validation_type": ("0", "1"),
    }
    chat = rows(db_url, "chats")[0]
    assert (chat["name"], chat["owner_userid"], chat["searchable"]) == ("Beta 2", "u4", 0)
    assert chat["last_changed_at"] > chat["first_seen_at"]


def test_dismissal_keeps_membership_and_sets_dismissed_at_once(
    db_url: URL, simulator: Simulator, world: World, make_config: MakeConfig
) -> None:
    config = make_config(db_url, simulator.base_url, ["chat-c"])
    run_sync(config)
    world.dismiss("chat-c")  # status 2, useridlist emptied
    run_sync(config)
    first = rows(db_url, "chats")[0]
    run_sync(config)
    again = rows(db_url, "chats")[0]

    status_events = events(db_url, event_type="attribute_changed", field="status")
    assert [(e["old_value"], e["new_value"]) for e in status_events] == [("1", "2")]
    assert events(db_url, event_type="member_left") == []
    assert current_members(db_url) == {"chat-c": {"u5", "u6", "u7", "u8"}}
    assert first["status"] == 2
    assert first["dismissed_at"] is not None
    assert again["dismissed_at"] == first["dismissed_at"]
    assert again["member_count"] == 4


def test_unchanged_resync_writes_no_members_or_events(
    db_url: URL, simulator: Simulator, world: World, make_config: MakeConfig
) -> None:
    config = make_config(db_url, simulator.base_url, READABLE)
    run_sync(config)
    before = snapshot(db_url)
    # The API may list members in any order: that is no change.
    world.set_attr("chat-a", useridlist=["u3", "u1", "u2"])
    result = run_sync(config)
    after = snapshot(db_url)

    assert result.chats_changed == 0
    assert result.status == "succeeded"
    assert after["chat_members"] == before["chat_members"]
    assert after["chat_events"] == before["chat_events"]
    for old, new in zip(before["chats"], after["chats"], strict=True):
        assert new["last_synced_at"] > old["last_synced_at"]
        assert {k: v for k, v in new.items() if k != "last_synced_at"} == {
            k: v for k, v in old.items() if k != "last_synced_at"
        }
    items = [i for i in rows(db_url, "sync_run_items") if i["run_id"] == result.run_id]
    assert [i["changed"] for i in items] == [False, False, False]


def test_failed_fetch_changes_nothing(
    db_url: URL, simulator: Simulator, world: World, make_config: MakeConfig
) -> None:
    config = make_config(db_url, simulator.base_url, ["chat-a", "chat-b"])
    run_sync(config)
    before = snapshot(db_url)
    world.remove_members("chat-a", ["u1", "u2", "u3"])
    world.set_attr("chat-a", status=2, name="gone")
    world.inject("chat-a", "http:502", "http:502", "http:502")  # max_attempts is 3
    result = run_sync(config)

    assert (result.status, result.exit_code, result.chats_failed) == ("partial", 1, 1)
    after = snapshot(db_url)
    assert after["chat_members"] == before["chat_members"]
    assert after["chat_events"] == before["chat_events"]
    chat_a = next(c for c in after["chats"] if c["chatid"] == "chat-a")
    old_a = next(c for c in before["chats"] if c["chatid"] == "chat-a")
    assert chat_a == old_a  # not even last_synced_at: that is the last *successful* fetch
    item = [i for i in rows(db_url, "sync_run_items") if i["run_id"] == result.run_id]
    failed = next(i for i in item if i["status"] == "failed")
    assert failed["chatid"] == "chat-a"
    assert failed["attempts"] == 3
    assert "HTTP 502" in failed["error"]
    assert "gave up after 3 attempts" in failed["error"]


@pytest.mark.parametrize(
    ("faults", "attempts", "retries"),
    [
        (["errcode:-1"], 2, 1),
        (["errcode:-1", "nonjson"], 3, 2),
        (["block:0"], 2, 1),
    ],
    ids=["busy-once", "busy-then-html", "ip-block"],
)
def test_transient_errors_are_retried_then_succeed(
    db_url: URL,
    simulator: Simulator,
    world: World,
    make_config: MakeConfig,
    faults: list[str],
    attempts: int,
    retries: int,
) -> None:
    world.inject("chat-a", *faults)
    result = run_sync(make_config(db_url, simulator.base_url, ["chat-a"]))

    assert result.status == "succeeded"
    assert result.retries == retries
    assert result.api_calls == 1 + attempts
    item = rows(db_url, "sync_run_items")[0]
    assert (item["status"], item["attempts"]) == ("ok", attempts)
    assert rows(db_url, "sync_runs")[0]["retries"] == retries


def test_expired_token_is_refreshed_once(
    db_url: URL, simulator: Simulator, world: World, make_config: MakeConfig
) -> None:
    config = make_config(db_url, simulator.base_url, READABLE, sync={"concurrency": 1})
    run_sync(config)
    calls_before = world.stats.gettoken_calls
    world.inject("chat-b", "expire_token")  # chat-b gets 42001 with the cached token
    # A new run gets a new client: it fetches one token, then one more after 42001.
    result = run_sync(config)

    assert result.status == "succeeded"
    assert world.stats.gettoken_calls - calls_before == 2
    assert result.api_calls == 2 + 3 + 1  # two gettoken, three chats, one resent chat/get


def test_unreadable_chat_fails_alone(
    db_url: URL, simulator: Simulator, make_config: MakeConfig
) -> None:
    result = run_sync(make_config(db_url, simulator.base_url, ["chat-x", *READABLE]))

    assert (result.status, result.exit_code) == ("partial", 1)
    assert (result.chats_succeeded, result.chats_failed) == (3, 1)
    failed = [i for i in rows(db_url, "sync_run_items") if i["status"] == "failed"]
    assert [(i["chatid"], i["errcode"], i["attempts"]) for i in failed] == [("chat-x", 40016, 1)]
    assert "chat-x" not in {c["chatid"] for c in rows(db_url, "chats")}
    assert rows(db_url, "sync_runs")[0]["status"] == "partial"


@pytest.mark.parametrize(
    ("world_kwargs", "errcode"),
    [({"permission": False}, 43007), ({"app_secret": "another-secret"}, 40089)],
    ids=["no-permission-43007", "bad-credentials-40089"],
)
def test_run_level_errors_stop_the_run(
    db_url: URL, make_config: MakeConfig, world_kwargs: dict[str, object], errcode: int
) -> None:
    world = World("test-key", **{"app_secret": "test-secret-9f8e7d6c5b4a", **world_kwargs})  # type: ignore[arg-type]
    for n in range(6):
        world.add_chat(SimChat(f"chat-{n}", f"C{n}", "u1", ["u1"]))
    with Simulator(world) as sim:
        config = make_config(
            db_url, sim.base_url, [f"chat-{n}" for n in range(6)], sync={"concurrency": 1}
        )
        result = run_sync(config)

    assert (result.status, result.exit_code) == ("failed", 3)
    assert str(errcode) in (result.error or "")
    # Nothing more was asked of the API once the run knew it was over.
    assert world.stats.requests_by_path["/chat/get"] <= 1
    run = rows(db_url, "sync_runs")[0]
    assert run["status"] == "failed"
    assert str(errcode) in run["error"]
    assert rows(db_url, "chats") == []


@pytest.mark.parametrize(
    ("chat_info", "message"),
    [
        (
            {"name": "n", "owner": "u1", "useridlist": ["u1", 5], "status": 1},
            "chat_info.useridlist[1]: expected a string, got an integer (5)",
        ),
        (
            {"name": "n", "owner": "u1", "useridlist": ["u1"], "status": 1, "searchable": "yes"},
            "chat_info.searchable: expected an integer",
        ),
        (
            {"name": "n", "owner": "u1", "useridlist": "u1", "status": 1},
            "chat_info.useridlist: expected a list",
        ),
        (
            {"name": "n", "owner": "u1", "useridlist": ["u1"], "status": 7},
            "chat_info.status: expected 1 or 2, got 7",
        ),
    ],
    ids=["userid-int", "flag-string", "list-string", "status-7"],
)
def test_bad_payload_fails_the_chat_and_writes_nothing_for_it(
    db_url: URL,
    simulator: Simulator,
    world: World,
    make_config: MakeConfig,
    chat_info: dict[str, object],
    message: str,
) -> None:
    config = make_config(db_url, simulator.base_url, ["chat-a", "chat-b"])
    run_sync(config)
    before = snapshot(db_url)
    world.set_attr("chat-a", raw_chat_info=chat_info)
    world.add_members("chat-b", ["u9"])
    result = run_sync(config)

    assert (result.status, result.chats_failed, result.chats_changed) == ("partial", 1, 1)
    failed = next(i for i in rows(db_url, "sync_run_items") if i["status"] == "failed")
    assert failed["chatid"] == "chat-a"
    assert message in failed["error"]
    after = snapshot(db_url)
    assert [m for m in after["chat_members"] if m["chatid"] == "chat-a"] == [
        m for m in before["chat_members"] if m["chatid"] == "chat-a"
    ]
    assert [c for c in after["chats"] if c["chatid"] == "chat-a"] == [
        c for c in before["chats"] if c["chatid"] == "chat-a"
    ]


def test_ids_are_case_sensitive_and_unicode_is_kept(db_url: URL, make_config: MakeConfig) -> None:
    world = World("test-key", "test-secret-9f8e7d6c5b4a")
    name = "财务部 \U0001f4b0 Ünïcödé"
    world.add_chat(SimChat("chat-Case", name, "User1", ["User1", "user1", "USER1"]))
    with Simulator(world) as sim:
        run_sync(make_config(db_url, sim.base_url, ["chat-Case"]))
    assert current_members(db_url) == {"chat-Case": {"User1", "user1", "USER1"}}
    assert rows(db_url, "chats")[0]["name"] == name


def test_duplicate_chatids_are_synced_once(
    db_url: URL, simulator: Simulator, world: World, make_config: MakeConfig
) -> None:
    result = run_sync(make_config(db_url, simulator.base_url, ["chat-a", "chat-a", "chat-b"]))
    assert result.chats_total == 2
    assert world.stats.requests_by_path["/chat/get"] == 2


def test_secrets_never_reach_logs_or_tables(
    db_url: URL, simulator: Simulator, world: World, make_config: MakeConfig
) -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream=stream)
    world.inject("chat-a", "reset", "http:502")
    world.inject("chat-b", "expire_token", "errcode:-1")
    world.inject("chat-c", "errcode:40001", "errcode:40001")  # refused twice: fatal
    config = make_config(db_url, simulator.base_url, ["chat-x", *READABLE], sync={"concurrency": 1})
    result = run_sync(config)
    token = world.current_token

    assert result.status == "failed"
    logged = stream.getvalue()
    lines = [json.loads(line) for line in logged.splitlines()]
    assert lines
    assert all("run_id" in line for line in lines)
    dumped = logged + json.dumps(
        {t: rows(db_url, t) for t in ("chats", "chat_events", "sync_runs", "sync_run_items")},
        default=str,
    )
    assert token
    assert token not in dumped
    assert APP_SECRET not in dumped
    # The simulator issues 32-hex-digit tokens: none of them, current or expired, is printed.
    assert re.search(r"\b[0-9a-f]{32}\b", dumped) is None


def test_refused_credentials_are_asked_once_however_many_workers(
    sqlite_url: URL, make_config: MakeConfig
) -> None:
    world = World("test-key", "not-the-configured-secret")
    chatids = [f"chat-{n}" for n in range(16)]
    for chatid in chatids:
        world.add_chat(SimChat(chatid, chatid, "u1", ["u1"]))
    world.latency_ms = 50  # every worker is queued on the token while the first asks
    with Simulator(world) as sim:
        result = run_sync(make_config(sqlite_url, sim.base_url, chatids, sync={"concurrency": 8}))

    assert result.exit_code == 3
    assert result.api_calls == 1
    assert world.stats.gettoken_calls == 1
    assert world.stats.requests_by_path["/chat/get"] == 0


def test_every_run_logs_its_start_with_the_same_keys(
    sqlite_url: URL, simulator: Simulator, make_config: MakeConfig
) -> None:
    """A sync's run and a listener's reconcile run start the same way (README, Logs)."""
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    config = make_config(sqlite_url, simulator.base_url, READABLE)
    engine = create_db_engine(sqlite_url)
    reconcile = ReconcileRuns(config, engine, stop=None)
    try:
        synced = run_sync(config)
        reconciled = reconcile(["chat-b", "chat-a", "chat-b"])
    finally:
        reconcile.close()
        engine.dispose()

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    started = [line for line in lines if line["event"] == "run.started"]
    assert [(e["run_id"], e["trigger"], e["chats_total"]) for e in started] == [
        (synced.run_id, "manual", 3),
        (reconciled.run_id, "event", 2),
    ]
    keys = {"run_id", "trigger", "chats_total", "chats_skipped", "concurrency"}
    assert all(set(e) == keys | {"event", "level", "timestamp"} for e in started)
    assert all((e["chats_skipped"], e["concurrency"]) == (0, 4) for e in started)
