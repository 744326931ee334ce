"""`dingtalk-etl status`: the verdict, its exit code and exact messages, over the three databases.

Runs older than the test are written into sync_runs directly (the job cannot be made to have
run three hours ago), and API calls and 90020s into api_calls and quota_exhaustions through
the product's own writers (``etl.budgetstore``); everything else comes from real syncs against
the simulator. Where a projection depends on the clock, ``read_health`` is given a fixed
``now``; the command line's tests use a schedule with no fire left this month, so that the
projection is exactly the calls made.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import insert
from sqlalchemy.engine import URL

from etl import migrate
from etl.budgetstore import BudgetLog, record_calls, record_exhaustion
from etl.cli import cli
from etl.config import load_config
from etl.db import create_db_engine
from etl.monitoring import format_duration, parse_duration, read_health
from etl.quota import EndpointCalls, QuotaMonth, quota_month
from etl.schema import sync_run_items, sync_runs
from etl.simulator import Simulator
from tests.helpers import rows, write_config
from tests.test_schema_docs import run as run_documented
from tests.test_schema_docs import sql_blocks

HOUR = 3600.0
DURATION_ERROR = (
    "is not a duration: use a whole number > 0 of seconds, or with a unit as in 90s, 30m, 2h, 1d"
)


def invoke(args: list[str]) -> Result:
    env = {k: None for k in os.environ if k.startswith("DINGTALK")}
    result = CliRunner().invoke(cli, args, env=env, prog_name="dingtalk-etl")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def database_config(folder: Path, db: URL | str) -> Path:
    """Only [database]: `status` needs no credentials and no chatids."""
    url = db if isinstance(db, str) else db.render_as_string(hide_password=False)
    path = folder / "status.toml"
    path.write_text(f'[database]\nurl = "{url}"\n[logging]\nlevel = "ERROR"\n', encoding="utf-8")
    return path


def add_run(
    db: URL,
    status: str,
    *,
    hours_ago: float,
    trigger: str = "schedule",
    failing: dict[str, str] | None = None,
    error: str | None = None,
    chats_skipped: int = 0,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """A finished run ``hours_ago`` (a 30-second run; ``running`` ones are unfinished)."""
    now = now or dt.datetime.now(dt.UTC)
    finished = now.replace(microsecond=0) - dt.timedelta(hours=hours_ago)
    started = finished - dt.timedelta(seconds=30)
    failing = failing or {}
    row: dict[str, Any] = {
        "started_at": started,
        "finished_at": None if status == "running" else finished,
        "status": status,
        "trigger": trigger,
        "chats_total": 3,
        "chats_succeeded": 3 - len(failing),
        "chats_failed": len(failing),
        "chats_changed": 0,
        "api_calls": 4,
        "retries": 0,
        "error": error,
        "hostname": "etl-1",
        "pid": 4242,
        "chats_skipped": chats_skipped,
    }
    engine = create_db_engine(db)
    try:
        with engine.begin() as conn:
            row["id"] = conn.execute(insert(sync_runs).values(**row)).inserted_primary_key[0]
            for chatid, message in failing.items():
                conn.execute(
                    insert(sync_run_items).values(
                        run_id=row["id"],
                        chatid=chatid,
                        status="failed",
                        changed=False,
                        attempts=1,
                        errcode=40016,
                        error=message,
                        duration_ms=12,
                    )
                )
    finally:
        engine.dispose()
    return row


def iso(value: dt.datetime) -> str:
    return value.isoformat(timespec="seconds")


def this_month(timezone: str = "Asia/Shanghai") -> QuotaMonth:
    return quota_month(dt.datetime.now(dt.UTC), timezone)


def idle_budget_line(timezone: str = "Asia/Shanghai") -> str:
    """The API line of a database without calls, no quota set."""
    label = this_month(timezone).start.astimezone(ZoneInfo(timezone)).strftime("%Y-%m")
    return (
        f"api calls this month ({label}, {timezone}): 0, no quota set; projected 0 at the "
        "month's end (basis: pace)"
    )


# -- verdict and exit code -------------------------------------------------------------------

VERDICTS: list[tuple[str, list[tuple[str, float]], list[str], int, str]] = [
    # id, runs (status, hours ago), options, exit code, first line
    ("no-runs", [], [], 1, "STALE: no successful run recorded"),
    ("no-runs-max-age", [], ["--max-age", "1d"], 1, "STALE: no successful run recorded"),
    (
        "only-failures",
        [("failed", 5), ("partial", 2)],
        [],
        1,
        "STALE: no successful run recorded",
    ),
    ("success-no-max-age", [("succeeded", 3)], [], 0, "OK: last success 3h ago (run 1)"),
    (
        "success-within-max-age",
        [("succeeded", 3)],
        ["--max-age", "4h"],
        0,
        "OK: last success 3h ago (run 1)",
    ),
    (
        "success-older-than-max-age",
        [("succeeded", 3)],
        ["--max-age", "2h"],
        1,
        "STALE: last success 3h ago (run 1), more than the allowed 2h",
    ),
    (
        "max-age-in-plain-seconds",
        [("succeeded", 3)],
        ["--max-age", "10800"],
        1,
        "STALE: last success 3h ago (run 1), more than the allowed 3h",
    ),
    (
        "max-age-in-minutes",
        [("succeeded", 3)],
        ["--max-age", "240m"],
        0,
        "OK: last success 3h ago (run 1)",
    ),
    (
        "max-age-in-days",
        [("succeeded", 50)],
        ["--max-age", "1d"],
        1,
        "STALE: last success 2d 2h ago (run 1), more than the allowed 1d",
    ),
    (
        "later-partial-runs-do-not-count",
        [("succeeded", 5), ("partial", 1)],
        ["--max-age", "2h"],
        1,
        "STALE: last success 5h ago (run 1), more than the allowed 2h",
    ),
    (
        "latest-success-counts",
        [("succeeded", 5), ("failed", 3), ("succeeded", 1)],
        ["--max-age", "2h"],
        0,
        "OK: last success 1h ago (run 3)",
    ),
]


@pytest.mark.parametrize(
    ("runs", "options", "code", "verdict"),
    [v[1:] for v in VERDICTS],
    ids=[v[0] for v in VERDICTS],
)
def test_status_verdict_and_exit_code(
    sqlite_url: URL,
    tmp_path: Path,
    runs: list[tuple[str, float]],
    options: list[str],
    code: int,
    verdict: str,
) -> None:
    for status, hours in runs:
        add_run(sqlite_url, status, hours_ago=hours)

    result = invoke(["--config", str(database_config(tmp_path, sqlite_url)), "status", *options])

    assert result.exit_code == code
    assert result.stdout.splitlines()[0] == verdict
    assert result.stderr == ""


def test_status_report_on_each_database(db_url: URL, tmp_path: Path) -> None:
    success = add_run(db_url, "succeeded", hours_ago=3)
    partial = add_run(
        db_url,
        "partial",
        hours_ago=1,
        failing={"chat-x": "chat/get: errcode 40016: no permission", "chat-y": "timed out"},
    )
    running = add_run(db_url, "running", hours_ago=0.25, trigger="manual")

    result = invoke(
        ["--config", str(database_config(tmp_path, db_url)), "status", "--max-age", "2h"]
    )

    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "STALE: last success 3h ago (run 1), more than the allowed 2h",
        f"last success: run 1, finished {iso(success['finished_at'])}",
        f"last run: run 2 partial (schedule), started {iso(partial['started_at'])}, "
        f"finished {iso(partial['finished_at'])}; 1 ok, 2 failed of 3 chats",
        f"running now: run 3 (manual), started {iso(running['started_at'])} on etl-1 pid 4242",
        "failing chats in run 2: 2",
        "  chat-x: chat/get: errcode 40016: no permission",
        "  chat-y: timed out",
        idle_budget_line(),
    ]


def test_status_json(db_url: URL, tmp_path: Path) -> None:
    success = add_run(db_url, "succeeded", hours_ago=3)
    add_run(db_url, "failed", hours_ago=1, error="gettoken: errcode 40089: invalid appkey")

    result = invoke(
        ["--config", str(database_config(tmp_path, db_url)), "status", "--max-age", "4h", "--json"]
    )

    assert result.exit_code == 0
    state = json.loads(result.stdout)
    assert sorted(state) == [
        "api_calls_this_month",
        "checked_at",
        "discovered_chats",
        "events_waiting",
        "exit_code",
        "failing_chats",
        "healthy",
        "last_run",
        "last_success",
        "last_success_age_seconds",
        "listener",
        "max_age_seconds",
        "monthly_call_quota",
        "projected_calls",
        "projected_percent_of_quota",
        "projection_basis",
        "quota_exhausted_at",
        "quota_month_resets_at",
        "quota_month_started_at",
        "quota_timezone",
        "quota_verdict",
        "quota_warn_percent",
        "running",
        "verdict",
    ]
    assert (state["listener"], state["events_waiting"], state["discovered_chats"]) == (None, 0, 0)
    assert (state["healthy"], state["exit_code"], state["max_age_seconds"]) == (True, 0, 14400)
    assert state["verdict"] == "OK: last success 3h ago (run 1)"
    assert state["last_success"]["finished_at"] == success["finished_at"].isoformat()
    assert 3 * HOUR <= state["last_success_age_seconds"] < 3 * HOUR + 60
    assert (state["last_run"]["id"], state["last_run"]["status"]) == (2, "failed")
    assert state["last_run"]["error"] == "gettoken: errcode 40089: invalid appkey"
    assert (state["running"], state["failing_chats"]) == (None, [])
    month = this_month()
    assert {key: state[key] for key in BUDGET_KEYS} == {
        "api_calls_this_month": 0,
        "monthly_call_quota": None,
        "projected_calls": 0,
        "projection_basis": "pace",
        "projected_percent_of_quota": None,
        "quota_timezone": "Asia/Shanghai",
        "quota_month_started_at": month.start.isoformat(),
        "quota_month_resets_at": month.end.isoformat(),
        "quota_exhausted_at": None,
        "quota_warn_percent": None,
        "quota_verdict": None,
    }


BUDGET_KEYS = [
    "api_calls_this_month",
    "monthly_call_quota",
    "projected_calls",
    "projection_basis",
    "projected_percent_of_quota",
    "quota_timezone",
    "quota_month_started_at",
    "quota_month_resets_at",
    "quota_exhausted_at",
    "quota_warn_percent",
    "quota_verdict",
]


def test_status_after_real_runs(sqlite_url: URL, simulator: Simulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, sqlite_url, simulator.base_url, ["chat-a", "chat-x"])
    assert invoke(["--config", str(config), "sync"]).exit_code == 1
    assert invoke(["--config", str(config), "sync", "--chatid", "chat-a"]).exit_code == 0
    assert invoke(["--config", str(config), "sync"]).exit_code == 1

    result = invoke(["--config", str(config), "status", "--max-age", "1h"])

    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("OK: last success ")
    assert lines[0].endswith(" ago (run 2)")
    assert lines[2].startswith("last run: run 3 partial (manual), started ")
    assert lines[3] == "failing chats in run 3: 1"
    assert lines[4].startswith("  chat-x: chat/get: errcode 40016: ")
    # Every request the runs sent is counted: a token and a chat/get per chat each.
    calls = sum(run["api_calls"] for run in rows(sqlite_url, "sync_runs"))
    label = this_month().start.astimezone(ZoneInfo("Asia/Shanghai")).strftime("%Y-%m")
    assert lines[5].startswith(
        f"api calls this month ({label}, Asia/Shanghai): {calls}, no quota set; projected "
    )
    assert lines[5].endswith(" at the month's end (basis: pace)")
    assert len(lines) == 6


# -- the API budget --------------------------------------------------------------------------

# 08:00 on 20 November in Asia/Shanghai: the quota month began at 2026-10-31T16:00:00Z.
NOW = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
SHANGHAI = ZoneInfo("Asia/Shanghai")
# Never fires this month (its slots are 190 years apart): the projection is the calls made.
NO_FIRE_LEFT = {"interval_minutes": 100_000_000}
ERROR_90020 = "chat/get: errcode 90020: the month's API quota is used up"


def count_calls(
    db: URL,
    at: dt.datetime,
    calls: int,
    *,
    source: str = "schedule",
    endpoint: str = "chat/get",
    throttled: int = 0,
) -> None:
    engine = create_db_engine(db)
    try:
        with engine.begin() as conn:
            record_calls(conn, [EndpointCalls(endpoint, calls, throttled)], source=source, at=at)
    finally:
        engine.dispose()


def add_exhaustion(db: URL, at: dt.datetime) -> None:
    engine = create_db_engine(db)
    try:
        with engine.begin() as conn:
            record_exhaustion(conn, at=at, source="schedule", run_id=None, error=ERROR_90020)
    finally:
        engine.dispose()


def budget_config(
    folder: Path,
    db: URL,
    *,
    quota: int | None = None,
    timezone: str | None = None,
    schedule: dict[str, Any] | None = None,
    chatids: list[str] | None = None,
) -> Path:
    """[database] and the budget's keys; no credentials (`status` needs none)."""
    return write_config(
        folder,
        db,
        chatids=chatids,
        app_key=None,
        app_secret=None,
        name="status.toml",
        dingtalk={"monthly_call_quota": quota, "quota_timezone": timezone},
        schedule=schedule or {},
    )


def add_month_of_calls(db: URL) -> None:
    """The calls of November 2026 (and the last of October) around ``NOW``."""
    count_calls(db, dt.datetime(2026, 10, 31, 15, 59, 59, 999999, tzinfo=dt.UTC), 7000)
    # 00:00 on 1 November in Shanghai, still 31 October in UTC.
    count_calls(db, dt.datetime(2026, 10, 31, 16, tzinfo=dt.UTC), 100)
    # DingTalk does not count the calls it refused as throttled.
    count_calls(db, dt.datetime(2026, 11, 10, 3, tzinfo=dt.UTC), 50, throttled=10)
    count_calls(
        db,
        dt.datetime(2026, 11, 15, 12, tzinfo=dt.UTC),
        10,
        source="listen",
        endpoint="gateway/connections/open",
    )
    count_calls(db, dt.datetime(2026, 11, 19, 23, tzinfo=dt.UTC), 900)


BY_SCHEDULE = [
    # id, quota_timezone, the API line, the verdict of --quota-warn 40
    (
        "shanghai",
        None,
        # 1,050 made (the 7,000 of October do not count); 256 fires left at minute 10 until
        # 16:00 UTC on 30 November, each reading the 3 chats and a token: 1,024; the
        # listener's 10 calls at this month's pace add 6.
        "api calls this month (2026-11, Asia/Shanghai): 1,050 of the quota of 5,000; "
        "projected 2,080 at the month's end, 41.6% of the quota (basis: schedule)",
        "QUOTA: projected 2,080 API calls this month, 41.6% of the quota of 5,000, more than "
        "the allowed 40%",
    ),
    (
        "utc",
        "UTC",
        # The month begins 8 hours later: the 100 calls at 16:00 UTC on 31 October are
        # October's; 264 fires left until midnight UTC on 30 November.
        "api calls this month (2026-11, UTC): 950 of the quota of 5,000; "
        "projected 2,012 at the month's end, 40.3% of the quota (basis: schedule)",
        "QUOTA: projected 2,012 API calls this month, 40.3% of the quota of 5,000, more than "
        "the allowed 40%",
    ),
]


@pytest.mark.parametrize(
    ("timezone", "line", "verdict"), [b[1:] for b in BY_SCHEDULE], ids=[b[0] for b in BY_SCHEDULE]
)
def test_status_shows_the_month_by_the_schedule(
    db_url: URL, tmp_path: Path, timezone: str | None, line: str, verdict: str
) -> None:
    add_run(db_url, "succeeded", hours_ago=1, now=NOW)
    add_month_of_calls(db_url)
    path = budget_config(
        tmp_path,
        db_url,
        quota=5000,
        timezone=timezone,
        schedule={"cron": "10 * * * *"},
        chatids=["chat-a", "chat-b", "chat-c"],
    )
    config = load_config(path, need_api=False, environ={})

    health = read_health(config, now=NOW)
    warned = read_health(config, quota_warn_percent=40, now=NOW)
    within = read_health(config, quota_warn_percent=42, now=NOW)

    assert (health.exit_code, health.lines()[0], health.lines()[-1]) == (
        0,
        "OK: last success 1h ago (run 1)",
        line,
    )
    assert warned.exit_code == 1
    assert warned.lines()[:2] == [verdict, "OK: last success 1h ago (run 1)"]
    assert warned.lines()[-1] == line
    assert within.exit_code == 0
    assert within.lines() == health.lines()


def test_status_json_has_the_month(db_url: URL, tmp_path: Path) -> None:
    add_run(db_url, "succeeded", hours_ago=1, now=NOW)
    add_month_of_calls(db_url)
    add_exhaustion(db_url, dt.datetime(2026, 11, 19, 23, 30, tzinfo=dt.UTC))
    path = budget_config(
        tmp_path, db_url, quota=5000, schedule={"cron": "10 * * * *"}, chatids=["chat-a"]
    )

    state = read_health(
        load_config(path, need_api=False, environ={}), quota_warn_percent=100, now=NOW
    ).as_json()

    verdict = (
        "QUOTA: DingTalk said the month's API quota is used up (90020) at "
        "2026-11-19T23:30:00+00:00; polling is paused until 2026-11-30T16:00:00+00:00"
    )
    # 1,050 made, 256 fires of one chat and a token left, the listener's pace.
    assert {key: state[key] for key in BUDGET_KEYS} == {
        "api_calls_this_month": 1050,
        "monthly_call_quota": 5000,
        "projected_calls": 1050 + 256 * 2 + 6,
        "projection_basis": "schedule",
        "projected_percent_of_quota": 31.4,
        "quota_timezone": "Asia/Shanghai",
        "quota_month_started_at": "2026-10-31T16:00:00+00:00",
        "quota_month_resets_at": "2026-11-30T16:00:00+00:00",
        "quota_exhausted_at": "2026-11-19T23:30:00+00:00",
        "quota_warn_percent": 100.0,
        "quota_verdict": verdict,
    }
    assert (state["healthy"], state["exit_code"], state["verdict"]) == (False, 1, verdict)


def test_status_projects_by_pace_without_a_schedule(db_url: URL, tmp_path: Path) -> None:
    add_run(db_url, "succeeded", hours_ago=1, now=NOW)
    count_calls(db_url, dt.datetime(2026, 11, 10, tzinfo=dt.UTC), 1000)
    config = load_config(budget_config(tmp_path, db_url), need_api=False, environ={})

    health = read_health(config, quota_warn_percent=80, now=NOW)

    # 1,000 calls in 19 days and 8 hours, carried to the 30 days of November: 1,551.7.
    assert health.lines()[-2:] == [
        "api calls this month (2026-11, Asia/Shanghai): 1,000, no quota set; projected 1,552 "
        "at the month's end (basis: pace)",
        "quota check: no [dingtalk] monthly_call_quota set, nothing to check for --quota-warn 80%",
    ]
    assert health.exit_code == 0


QUOTA_WARN: list[tuple[str, list[str], int, list[str]]] = [
    # id, options, exit code, first lines (OK: the runs' verdict)
    ("no-check", [], 0, ["OK"]),
    (
        "past-80",
        ["--quota-warn", "80"],
        1,
        [
            "QUOTA: projected 4,500 API calls this month, 90% of the quota of 5,000, more than "
            "the allowed 80%",
            "OK",
        ],
    ),
    ("exactly-90-passes-nothing", ["--quota-warn", "90"], 0, ["OK"]),
    (
        "past-89.9-percent",
        ["--quota-warn", "89.9%"],
        1,
        [
            "QUOTA: projected 4,500 API calls this month, 90% of the quota of 5,000, more than "
            "the allowed 89.9%",
            "OK",
        ],
    ),
    ("within-100", ["--quota-warn", "100"], 0, ["OK"]),
    (
        "stale-and-past",
        ["--max-age", "30m", "--quota-warn", "80"],
        1,
        [
            "STALE: last success 1h ago (run 1), more than the allowed 30m",
            "QUOTA: projected 4,500 API calls this month, 90% of the quota of 5,000, more than "
            "the allowed 80%",
        ],
    ),
    (
        "stale-within",
        ["--max-age", "30m", "--quota-warn", "100"],
        1,
        ["STALE: last success 1h ago (run 1), more than the allowed 30m", "last success: run 1"],
    ),
]


def test_quota_warn_exit_codes(db_url: URL, tmp_path: Path) -> None:
    month = this_month()
    run = add_run(db_url, "succeeded", hours_ago=1, chats_skipped=5)
    count_calls(db_url, month.start - dt.timedelta(microseconds=1), 10_000)  # last month
    count_calls(db_url, month.start, 4500)
    config = budget_config(
        tmp_path, db_url, quota=5000, schedule=NO_FIRE_LEFT, chatids=["chat-a", "chat-b"]
    )
    label = f"{month.start.astimezone(SHANGHAI):%Y-%m}"
    ok = "OK: last success 1h ago (run 1)"

    for case, options, code, first in QUOTA_WARN:
        result = invoke(["--config", str(config), "status", *options])

        lines = result.stdout.splitlines()
        assert (case, result.exit_code) == (case, code)
        expected = [ok if line == "OK" else line for line in first]
        assert [line[: len(e)] for line, e in zip(lines, expected, strict=False)] == expected
        assert f"last run: run 1 succeeded (schedule), started {iso(run['started_at'])}, " in (
            result.stdout
        )
        assert "; 3 ok, 0 failed of 3 chats, 5 skipped\n" in result.stdout
        assert lines[-1] == (
            f"api calls this month ({label}, Asia/Shanghai): 4,500 of the quota of 5,000; "
            "projected 4,500 at the month's end, 90% of the quota (basis: schedule)"
        )
        assert result.stderr == ""

    state = json.loads(
        invoke(["--config", str(config), "status", "--quota-warn", "80", "--json"]).stdout
    )
    assert (state["healthy"], state["exit_code"]) == (False, 1)
    assert state["verdict"] == state["quota_verdict"] == QUOTA_WARN[1][3][0]
    assert (state["api_calls_this_month"], state["projected_calls"]) == (4500, 4500)
    assert (state["projected_percent_of_quota"], state["quota_warn_percent"]) == (90.0, 80.0)
    assert state["last_run"]["chats_skipped"] == 5


def test_a_90020_this_month_pauses_polling(db_url: URL, tmp_path: Path) -> None:
    month = this_month()
    add_run(db_url, "succeeded", hours_ago=1)
    add_exhaustion(db_url, month.start - dt.timedelta(microseconds=1))  # last month's
    config = budget_config(tmp_path, db_url, schedule=NO_FIRE_LEFT)
    label = f"{month.start.astimezone(SHANGHAI):%Y-%m}"
    budget_line = (
        f"api calls this month ({label}, Asia/Shanghai): 0, no quota set; projected 0 at the "
        "month's end (basis: schedule)"
    )

    before = invoke(["--config", str(config), "status", "--quota-warn", "100"])

    assert before.exit_code == 0
    assert before.stdout.splitlines()[0] == "OK: last success 1h ago (run 1)"
    assert before.stdout.splitlines()[-2:] == [
        budget_line,
        "quota check: no [dingtalk] monthly_call_quota set, nothing to check for --quota-warn 100%",
    ]

    add_exhaustion(db_url, month.start)
    plain = invoke(["--config", str(config), "status"])
    warned = invoke(["--config", str(config), "status", "--quota-warn", "100"])
    state = json.loads(invoke(["--config", str(config), "status", "--json"]).stdout)

    resets = f"{month.end.astimezone(SHANGHAI):%Y-%m-%d %H:%M}"
    paused = [
        budget_line,
        f"quota used up: DingTalk said 90020 at {iso(month.start)}; polling is paused until "
        f"the quota month resets at {iso(month.end)} ({resets} Asia/Shanghai)",
    ]
    assert resets.endswith(" 00:00")
    assert plain.exit_code == 0
    assert plain.stdout.splitlines()[0] == "OK: last success 1h ago (run 1)"
    assert plain.stdout.splitlines()[-2:] == paused
    # A quota used up fails --quota-warn, whether a quota is configured or not.
    assert warned.exit_code == 1
    assert warned.stdout.splitlines()[:2] == [
        f"QUOTA: DingTalk said the month's API quota is used up (90020) at {iso(month.start)}; "
        f"polling is paused until {iso(month.end)}",
        "OK: last success 1h ago (run 1)",
    ]
    assert warned.stdout.splitlines()[-2:] == paused
    assert state["quota_exhausted_at"] == month.start.isoformat()
    assert state["quota_month_resets_at"] == month.end.isoformat()
    assert (state["exit_code"], state["quota_verdict"]) == (0, None)


def test_the_documented_calls_this_month_query(db_url: URL) -> None:
    """docs/schema.md's `calls-this-month` answers what `status` counts."""
    add_month_of_calls(db_url)
    engine = create_db_engine(db_url)
    try:
        for since, expected in [
            (dt.datetime(2026, 10, 31, 16, tzinfo=dt.UTC), 1050),  # November in Shanghai
            (dt.datetime(2026, 11, 1, tzinfo=dt.UTC), 950),  # November in UTC
            (dt.datetime(2026, 12, 1, tzinfo=dt.UTC), 0),
        ]:
            assert run_documented(engine, "calls-this-month", since=since) == [(expected,)]
            assert BudgetLog(engine).used_since(since) == expected
    finally:
        engine.dispose()
    assert "calls-this-month" in sql_blocks()


BAD_PERCENTS = ["0", "-5", "abc", "", "nan", "inf", "80%%"]


@pytest.mark.parametrize("value", BAD_PERCENTS, ids=[repr(v) for v in BAD_PERCENTS])
def test_bad_quota_warn_is_a_usage_error(sqlite_url: URL, tmp_path: Path, value: str) -> None:
    config = database_config(tmp_path, sqlite_url)

    result = invoke(["--config", str(config), "status", "--quota-warn", value])

    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"Error: Invalid value for '--quota-warn': {value!r} is not a percentage: use a "
        "number > 0, as in 80 or 100"
    )


# -- errors ----------------------------------------------------------------------------------

BAD_DURATIONS = ["5x", "0", "-1", "1.5h", "", "2 h", "h"]


@pytest.mark.parametrize("value", BAD_DURATIONS, ids=[repr(v) for v in BAD_DURATIONS])
def test_bad_max_age_is_a_usage_error(sqlite_url: URL, tmp_path: Path, value: str) -> None:
    config = database_config(tmp_path, sqlite_url)

    result = invoke(["--config", str(config), "status", "--max-age", value])

    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"Error: Invalid value for '--max-age': {value!r} {DURATION_ERROR}"
    )


def test_status_on_an_unmigrated_database_exits_78(tmp_path: Path) -> None:
    config = database_config(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}")

    result = invoke(["--config", str(config), "status"])

    assert result.exit_code == 78
    assert result.stderr == (
        "dingtalk-etl: error: the database has no dingtalk-etl schema, this version needs "
        f"{migrate.head_revision()}: run `dingtalk-etl db upgrade` (or pass --migrate)\n"
    )


def test_status_with_the_database_down_exits_3(tmp_path: Path) -> None:
    config = database_config(tmp_path, "postgresql://etl@127.0.0.1:1/etl")

    result = invoke(["--config", str(config), "status"])

    assert result.exit_code == 3
    assert result.stderr.startswith(
        "dingtalk-etl: error: database error while reading runs: OperationalError: "
    )


def test_status_help_documents_the_exit_codes() -> None:
    result = invoke(["status", "--help"])

    assert result.exit_code == 0
    for text in (
        "--max-age DURATION",
        "90s, 30m, 2h, 1d or plain seconds",
        "0   healthy",
        "1   unhealthy: no successful run recorded, or the last is older than --max-age,",
        "or the projection passes --quota-warn of the quota, or DingTalk said 90020",
        "--quota-warn PERCENT",
        "78  configuration error",
        "--json",
    ):
        assert text in result.stdout


# -- durations -------------------------------------------------------------------------------

DURATIONS = [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("3600", 3600), ("2H", 7200)]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS, ids=[d[0] for d in DURATIONS])
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


FORMATTED = [
    (0, "0s"),
    (59.9, "59s"),
    (90, "1m 30s"),
    (3600, "1h"),
    (3 * 3600 + 61, "3h 1m"),
    (86400, "1d"),
    (2 * 86400 + 7200 + 5, "2d 2h"),
]


@pytest.mark.parametrize(("seconds", "text"), FORMATTED, ids=[f[1] for f in FORMATTED])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
