"""`dingtalk-etl status`: the verdict, its exit code and exact messages, over the three databases.

Runs older than the test are written into sync_runs directly (the job cannot be made to have
run three hours ago); everything else comes from real syncs against the simulator.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import insert
from sqlalchemy.engine import URL

from etl.cli import cli
from etl.db import create_db_engine
from etl.monitoring import format_duration, parse_duration
from etl.schema import sync_run_items, sync_runs
from etl.simulator import Simulator
from tests.helpers import write_config

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
) -> dict[str, Any]:
    """A finished run ``hours_ago`` (a 30-second run; ``running`` ones are unfinished)."""
    finished = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=hours_ago)
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
    assert len(lines) == 5


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
        "0003: run `dingtalk-etl db upgrade` (or pass --migrate)\n"
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
        "1   unhealthy: no successful run recorded, or the last is older than --max-age",
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
