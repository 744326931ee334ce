"""The API budget on every database: which chats a run reads, every call counted, the quota.

The rules of ``etl.polling`` and ``etl.budget`` as a user meets them: syncs against the
simulator over HTTP, the plan and the counts in the database. Time does not pass in a test:
where a rule needs a chat to have fallen due (an interval run out, a month gone), the test
moves the chat's ``next_poll_at`` (or a row's time) back, as the passing time would.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from click.testing import CliRunner
from sqlalchemy import insert, update
from sqlalchemy.engine import URL

from etl.budget import choose_chats
from etl.budgetstore import record_exhaustion
from etl.cli import cli
from etl.config import Config
from etl.db import create_db_engine, utcnow
from etl.eventstore import ListenerLog, synced_chatids
from etl.quota import quota_month
from etl.schema import api_calls, chats, pushed_events, quota_exhaustions
from etl.simulator import Simulator, World
from etl.sync import run_sync
from tests.conftest import MakeConfig
from tests.helpers import clean_env, rows, wait_for, write_config
from tests.test_listen import Running, Setup, first_sync, listen, setup, table, until
from tests.test_schedule import SCHEDULE_LOG, StartSchedule, schedule_runs, start_schedule

CHATS = ["chat-a", "chat-b", "chat-c"]
SECOND = dt.timedelta(seconds=1)
# Fixtures used here, defined with the tests of `listen` and `schedule`.
__all__ = ["listen", "setup", "start_schedule"]
ADAPTIVE = {
    "polling": "adaptive",
    "poll_interval_seconds": 3600,
    "max_poll_interval_seconds": 86400,
}


def execute(url: URL, statement: Any) -> None:
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(statement)
    finally:
        engine.dispose()


def make_due(url: URL, chatid: str, at: dt.datetime | None = None) -> None:
    """The chat's interval has run out (``at``: when it falls due; default a minute ago)."""
    due = at or utcnow() - dt.timedelta(minutes=1)
    execute(url, update(chats).where(chats.c.chatid == chatid).values(next_poll_at=due))


def chat_row(url: URL, chatid: str) -> dict[str, Any]:
    return next(r for r in rows(url, "chats") if r["chatid"] == chatid)


def calls_to(world: World, chatid: str) -> int:
    return world.stats.requests_by_chat[chatid]


@pytest.fixture
def config(db_url: URL, simulator: Simulator, make_config: MakeConfig) -> Any:
    def build(**sync: Any) -> Config:
        dingtalk = sync.pop("dingtalk", None)
        return make_config(db_url, simulator.base_url, CHATS, sync=sync, dingtalk=dingtalk)

    return build


# -- point 2: poll only what can have changed ----------------------------------------------


def test_a_dismissed_chat_is_read_again_only_when_asked(
    config: Any, db_url: URL, world: World
) -> None:
    settings = config()
    run_sync(settings)
    world.dismiss("chat-b")
    assert run_sync(settings).status == "succeeded"  # reads the dismissal
    assert chat_row(db_url, "chat-b")["status"] == 2
    before = calls_to(world, "chat-b")

    plain = run_sync(settings)

    assert calls_to(world, "chat-b") == before
    assert (plain.chats_total, plain.chats_skipped) == (2, 1)
    assert rows(db_url, "sync_runs")[-1]["chats_skipped"] == 1
    run_sync(settings, all_chats=True)
    assert calls_to(world, "chat-b") == before + 1
    run_sync(settings, chatids=["chat-b"])
    assert calls_to(world, "chat-b") == before + 2


def test_adaptive_polling_reads_what_is_due_and_sets_each_chats_interval(
    config: Any, db_url: URL, world: World
) -> None:
    settings = config(**ADAPTIVE)
    first = run_sync(settings)
    started = rows(db_url, "sync_runs")[-1]["started_at"]
    assert first.chats_total == 3
    for chatid in CHATS:
        row = chat_row(db_url, chatid)
        assert row["poll_interval_seconds"] == 3600
        assert row["next_poll_at"] == started + dt.timedelta(hours=1)

    # Nothing is due: the run records its row and makes no call at all, not even a token.
    requests = world.stats.total_requests
    idle = run_sync(settings)
    assert (idle.status, idle.exit_code, idle.chats_total, idle.chats_skipped) == (
        "succeeded",
        0,
        0,
        3,
    )
    assert (idle.api_calls, world.stats.total_requests) == (0, requests)

    # chat-a's interval ran out, unchanged: read alone, its interval doubles.
    make_due(db_url, "chat-a")
    quiet = run_sync(settings)
    assert (quiet.chats_total, quiet.chats_skipped, quiet.chats_changed) == (1, 2, 0)
    assert chat_row(db_url, "chat-a")["poll_interval_seconds"] == 7200
    make_due(db_url, "chat-a")
    run_sync(settings)
    assert chat_row(db_url, "chat-a")["poll_interval_seconds"] == 14400

    # Changed: back to the base interval.
    world.add_members("chat-a", ["u9"])
    make_due(db_url, "chat-a")
    changed = run_sync(settings)
    assert changed.chats_changed == 1
    assert chat_row(db_url, "chat-a")["poll_interval_seconds"] == 3600


@pytest.mark.parametrize(
    ("due_in", "read"),
    [(dt.timedelta(seconds=30), True), (dt.timedelta(minutes=10), False)],
    ids=["due-within-the-runs-span", "due-later"],
)
def test_a_run_that_starts_early_reads_what_falls_due_while_it_runs(
    config: Any, db_url: URL, world: World, due_in: dt.timedelta, read: bool
) -> None:
    settings = config(**ADAPTIVE)
    run_sync(settings)
    make_due(db_url, "chat-c", utcnow() + due_in)

    result = run_sync(settings)

    assert result.chats_total == int(read)


def listener_connected(url: URL, *, connected: bool = True) -> None:
    engine = create_db_engine(url)
    try:
        log = ListenerLog(engine)
        listener_id = log.start(at=utcnow())
        log.update(listener_id, {"connected": connected, "updated_at": utcnow()})
    finally:
        engine.dispose()


def test_with_a_listener_connected_polls_are_a_safety_net_at_the_maximum(
    config: Any, db_url: URL
) -> None:
    settings = config(**ADAPTIVE)
    run_sync(settings)
    listener_connected(db_url)
    make_due(db_url, "chat-a")  # its hourly interval ran out, but events would have said
    day_old = utcnow() - dt.timedelta(days=1, minutes=5)
    execute(db_url, update(chats).where(chats.c.chatid == "chat-b").values(last_synced_at=day_old))

    result = run_sync(settings)

    assert (result.chats_total, result.chats_skipped) == (1, 2)
    assert rows(db_url, "sync_run_items")[-1]["chatid"] == "chat-b"


def test_a_chat_with_unexplained_events_is_due_at_its_reconcile(config: Any, db_url: URL) -> None:
    settings = config(**ADAPTIVE)
    run_sync(settings)
    arrived = utcnow() - dt.timedelta(minutes=5)  # reconcile_delay_seconds (30) ago and more
    execute(
        db_url,
        insert(pushed_events).values(
            event_id="evt-1",
            event_type="chat_add_member",
            chatid="chat-c",
            occurred_at=arrived,
            received_at=arrived,
            operator_userid="u5",
            payload={},
            outcome="recorded",
        ),
    )

    result = run_sync(settings)

    assert result.chats_total == 1
    assert rows(db_url, "sync_run_items")[-1]["chatid"] == "chat-c"


# -- every call counted --------------------------------------------------------------------


def test_every_request_to_dingtalk_is_counted(config: Any, db_url: URL, world: World) -> None:
    settings = config()
    world.inject("chat-a", "http:502")  # one retry
    world.inject("chat-b", "errcode:90018")  # throttled: DingTalk does not count it

    result = run_sync(settings)

    counted = rows(db_url, "api_calls")
    by_endpoint: dict[str, int] = {}
    for row in counted:
        assert (row["source"], row["run_id"]) == ("manual", result.run_id)
        by_endpoint[row["endpoint"]] = by_endpoint.get(row["endpoint"], 0) + row["calls"]
    assert sum(by_endpoint.values()) == result.api_calls == world.stats.total_requests == 6
    assert by_endpoint == {"gettoken": 1, "chat/get": 5}
    assert sum(row["throttled"] for row in counted) == 1


# -- point 3: the quota ----------------------------------------------------------------------


def test_a_run_reads_the_most_overdue_chats_the_quota_affords(
    config: Any, db_url: URL, world: World
) -> None:
    run_sync(config())  # 4 calls: a token and three chats
    # chat-b was read longest ago, then chat-c; chat-a last.
    for chatid, ago in (("chat-a", 1), ("chat-b", 3), ("chat-c", 2)):
        at = utcnow() - dt.timedelta(hours=ago)
        execute(db_url, update(chats).where(chats.c.chatid == chatid).values(last_synced_at=at))
    # Three calls left: a token and two chats.
    settings = config(dingtalk={"monthly_call_quota": 7})
    before = {chatid: calls_to(world, chatid) for chatid in CHATS}

    with structlog.testing.capture_logs() as logs:
        result = run_sync(settings)

    read = {chatid for chatid in CHATS if calls_to(world, chatid) > before[chatid]}
    assert read == {"chat-b", "chat-c"}
    assert (result.chats_total, result.chats_skipped) == (2, 1)
    [deferred] = [e for e in logs if e["event"] == "quota.chats_deferred"]
    assert (deferred["deferred"], deferred["reading"], deferred["calls_left"]) == (1, 2, 3)
    # The month is spent: the next run reads nothing and calls nothing.
    requests = world.stats.total_requests
    spent = run_sync(settings)
    assert (spent.chats_total, spent.chats_skipped, world.stats.total_requests) == (
        0,
        3,
        requests,
    )


def test_last_months_calls_and_90020_do_not_count_this_month(
    config: Any, db_url: URL, world: World
) -> None:
    settings = config(dingtalk={"monthly_call_quota": 10})
    month = quota_month(utcnow(), "Asia/Shanghai")
    last_month = month.start - dt.timedelta(seconds=1)
    execute(
        db_url,
        insert(api_calls).values(
            counted_at=last_month, source="schedule", endpoint="chat/get", calls=5000
        ),
    )
    add_exhaustion(db_url, last_month)

    result = run_sync(settings)

    assert (result.status, result.chats_total) == ("succeeded", 3)
    engine = create_db_engine(db_url)
    try:
        assert choose_chats(settings, engine, synced_chatids(settings, engine), utcnow()).due
        add_exhaustion(db_url, utcnow())
        selection = choose_chats(settings, engine, synced_chatids(settings, engine), utcnow())
        assert (selection.due, len(selection.deferred)) == ((), 3)
    finally:
        engine.dispose()


def add_exhaustion(url: URL, at: dt.datetime) -> None:
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            record_exhaustion(conn, at=at, source="schedule", run_id=None, error="90020")
    finally:
        engine.dispose()


def test_90020_fails_the_run_and_is_remembered(config: Any, db_url: URL, world: World) -> None:
    world.inject("chat-b", "errcode:90020")

    result = run_sync(config(concurrency=1))

    assert (result.status, result.exit_code, result.quota_exhausted) == ("failed", 3, True)
    [exhausted] = rows(db_url, "quota_exhaustions")
    assert (exhausted["source"], exhausted["run_id"]) == ("manual", result.run_id)
    assert "90020" in exhausted["error"]


# -- 90020 and the month rolling over, with `schedule` and `listen` ------------------------


def test_after_90020_schedule_stops_polling_until_the_next_quota_month(
    db_url: URL, simulator: Simulator, world: World, tmp_path: Path, start_schedule: StartSchedule
) -> None:
    config = write_config(
        tmp_path,
        db_url,
        simulator.base_url,
        CHATS,
        schedule={"interval_seconds": 1, "run_on_start": True},
        sync={"concurrency": 1},
        logging=SCHEDULE_LOG,
    )
    # In the middle of the first run: chat-a is read, chat-b gets 90020.
    world.inject("chat-b", "errcode:90020")
    process = start_schedule(config)

    wait_for("two fires skipped", lambda: len(process.events("schedule.quota_exhausted")) >= 2)
    [failed] = schedule_runs(db_url)
    assert failed["status"] == "failed"
    assert "90020" in failed["error"]
    assert [r["run_id"] for r in rows(db_url, "quota_exhaustions")] == [failed["id"]]
    assert world.stats.requests_by_chat["chat-c"] == 0
    skipped = process.events("schedule.quota_exhausted")[0]
    month = quota_month(utcnow(), "Asia/Shanghai")
    assert skipped["polls_again_at"] == month.end.isoformat()

    # The quota month ends (as if its time had passed): the next fire polls again.
    execute(db_url, update(quota_exhaustions).values(occurred_at=month.start - SECOND))
    wait_for(
        "a run after the month's end",
        lambda: any(r["status"] == "succeeded" for r in schedule_runs(db_url)),
    )
    code, _ = process.stop()
    assert code == 0
    assert world.stats.requests_by_chat["chat-c"] >= 1


def test_listen_records_events_and_defers_reconciles_after_90020(
    setup: Setup, listen: Callable[..., Running], tmp_path: Path
) -> None:
    first_sync(setup, tmp_path)
    add_exhaustion(setup.url, utcnow())
    calls = setup.world.stats.requests_by_chat["chat-a"]

    with structlog.testing.capture_logs() as logs:
        listen()
        setup.world.remove_members("chat-a", ["u2"], operator="u1")
        until(
            lambda: [e for e in logs if e["event"] == "events.reconcile_deferred"],
            "the reconcile to be deferred",
        )

    [deferred] = [e for e in logs if e["event"] == "events.reconcile_deferred"]
    assert deferred["reason"] == "monthly API quota used up (90020)"
    [pushed] = table(setup.url, pushed_events)
    assert (pushed["outcome"], pushed["reconciled_at"]) == ("recorded", None)
    assert setup.world.stats.requests_by_chat["chat-a"] == calls
    # The listener's own call (opening the connection) is counted.
    counted = [r for r in rows(setup.url, "api_calls") if r["source"] == "listen"]
    assert [(r["endpoint"], r["calls"]) for r in counted] == [("gateway/connections/open", 1)]


# -- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "stderr_ends"),
    [
        (["sync", "--all", "--chatid", "chat-a"], 2, "Error: give --chatid or --all, not both\n"),
        (["sync", "--all"], 0, ""),
    ],
    ids=["all-and-chatid", "all"],
)
def test_sync_all_on_the_command_line(
    sqlite_url: URL,
    simulator: Simulator,
    tmp_path: Path,
    args: list[str],
    code: int,
    stderr_ends: str,
) -> None:
    config = write_config(tmp_path, sqlite_url, simulator.base_url, CHATS)
    result = CliRunner().invoke(cli, ["--config", str(config), *args], env=clean_env())
    assert result.exit_code == code, result.output
    assert result.stderr.endswith(stderr_ends)


def test_sync_summary_says_how_many_chats_were_not_due(
    sqlite_url: URL, simulator: Simulator, tmp_path: Path
) -> None:
    config = write_config(tmp_path, sqlite_url, simulator.base_url, CHATS, sync=ADAPTIVE)
    assert (
        CliRunner().invoke(cli, ["--config", str(config), "sync"], env=clean_env()).exit_code == 0
    )

    result = CliRunner().invoke(cli, ["--config", str(config), "sync"], env=clean_env())

    assert result.exit_code == 0
    assert ", 0 changed of 0 chats, 3 not due; 0 api calls, 0 retries;" in result.stdout


def test_sync_says_when_the_month_cannot_fit_the_quota(
    db_url: URL, simulator: Simulator, make_config: MakeConfig, tmp_path: Path
) -> None:
    raw = make_config(db_url, simulator.base_url, CHATS, dingtalk={"monthly_call_quota": 50})
    # Every second, three chats every run: 4 calls a second, far more than 50 a month
    # (whatever the time of the month the test runs at).
    settings = dataclasses.replace(
        raw, schedule=raw.schedule.model_copy(update={"interval_seconds": 1})
    )

    with structlog.testing.capture_logs() as logs:
        run_sync(settings)

    [warning] = [e for e in logs if e["event"] == "quota.projection_exceeds"]
    assert (warning["quota"], warning["basis"]) == (50, "schedule")
    assert warning["projected_calls"] > 50
