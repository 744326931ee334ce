"""`dingtalk-etl schedule`: fires on time, never overlaps itself or another instance, survives
failing runs and stops cleanly on SIGTERM; crontab expressions read as cron reads them.

The scheduler runs as a real subprocess against the in-test simulator and real databases.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy.engine import URL

from etl.cli import cli
from etl.config import load_config, parse_config
from etl.crontab import crontab_fields
from etl.errors import ConfigError
from etl.scheduler import JOB_ID, SyncScheduler
from etl.simulator import Simulator, World
from etl.sync import run_sync
from etl.triggers import AlignedInterval, build_trigger
from tests.conftest import APP_KEY, APP_SECRET, MakeConfig
from tests.helpers import clean_env, rows, wait_for, write_config

CLI = [sys.executable, "-m", "etl"]
NO_FIRE = "0 0 1 1 *"  # once a year: only run_on_start fires within a test


# The scheduler's JSON log lines, which these tests read.
SCHEDULE_LOG = {"level": "INFO", "format": "json"}


class ScheduleProcess:
    """``dingtalk-etl schedule`` in a subprocess; its JSON log lines go to a file."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [*CLI, "--config", str(config), "schedule"],
            # Warnings are errors here too (APScheduler, tzlocal, ...).
            env={**clean_env(), "PYTHONWARNINGS": "error"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if name is None or event["event"] == name:
                    found.append(event)
        return found

    def stop(self, timeout: float = 20.0) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - started

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


StartSchedule = Callable[..., ScheduleProcess]


def schedule_processes(folder: Path) -> Iterator[StartSchedule]:
    """A fixture body: start schedulers; every one still running is killed by pid after."""
    started: list[ScheduleProcess] = []

    def start(config: Path, name: str = "schedule") -> ScheduleProcess:
        process = ScheduleProcess(config, folder / f"{name}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


@pytest.fixture
def start_schedule(tmp_path: Path) -> Iterator[StartSchedule]:
    yield from schedule_processes(tmp_path)


def schedule_runs(db: URL) -> list[dict[str, Any]]:
    return [r for r in rows(db, "sync_runs") if r["trigger"] == "schedule"]


# -- a schedule fires ---------------------------------------------------------------------


def test_schedule_fires_on_the_interval_and_stops_on_sigterm(
    sqlite_url: URL, simulator: Simulator, tmp_path: Path, start_schedule: StartSchedule
) -> None:
    config = write_config(
        tmp_path,
        sqlite_url,
        simulator.base_url,
        ["chat-a", "chat-b"],
        schedule={"interval_seconds": 1, "run_on_start": True},
        logging=SCHEDULE_LOG,
    )
    process = start_schedule(config)
    wait_for(
        "three finished scheduled runs",
        lambda: sum(r["status"] == "succeeded" for r in schedule_runs(sqlite_url)) >= 3,
    )
    code, elapsed = process.stop()

    assert code == 0
    assert elapsed < 15  # the run in hand, then out: seconds on a busy machine, not a fire
    # Nothing but structured lines: no warning, no traceback, no APScheduler text.
    lines = process.log_path.read_text(encoding="utf-8").splitlines()
    assert [line for line in lines if not line.startswith("{")] == []
    runs = rows(sqlite_url, "sync_runs")
    assert {r["trigger"] for r in runs} == {"schedule"}
    assert {r["status"] for r in runs} == {"succeeded"}
    names = [e["event"] for e in process.events() if e["event"].startswith("schedule.")]
    assert names[0] == "schedule.started"
    assert names[-2:] == ["schedule.stopping", "schedule.stopped"]
    started = process.events("schedule.started")[0]
    assert {k: started[k] for k in ("trigger", "timezone", "run_on_start", "jitter_seconds")} == {
        "trigger": "every 1 seconds",
        "timezone": "UTC",
        "run_on_start": True,
        "jitter_seconds": 0,
    }
    assert started["misfire_grace_time"] == 300
    done = process.events("schedule.run_done")
    assert len(done) >= 3
    assert [(e["exit_code"], e["status"]) for e in done] == [(0, "succeeded")] * len(done)
    # The next fire is logged after each run, on whole-second slots (no jitter).
    fires = [
        dt.datetime.fromisoformat(e["next_fire"]) for e in process.events("schedule.next_fire")
    ]
    assert len(fires) >= len(done)
    assert all(f.microsecond == 0 for f in fires)
    assert fires == sorted(fires)


def test_a_fire_during_a_long_run_is_skipped_not_queued(
    sqlite_url: URL,
    simulator: Simulator,
    world: World,
    tmp_path: Path,
    start_schedule: StartSchedule,
) -> None:
    world.inject("chat-a", "slow:3")  # the first run outlasts two fires
    config = write_config(
        tmp_path,
        sqlite_url,
        simulator.base_url,
        ["chat-a"],
        schedule={"interval_seconds": 1, "run_on_start": True},
        logging=SCHEDULE_LOG,
    )
    process = start_schedule(config)
    wait_for("two scheduled runs", lambda: len(schedule_runs(sqlite_url)) >= 2)
    code, _ = process.stop()

    assert code == 0
    assert process.events("schedule.still_running")
    runs = [r for r in schedule_runs(sqlite_url) if r["status"] != "running"]
    for earlier, later in itertools.pairwise(runs):
        assert earlier["finished_at"] <= later["started_at"]


# -- SIGTERM in the middle of a run --------------------------------------------------------


def test_sigterm_mid_run_finishes_the_chat_in_hand_and_marks_the_run(
    db_url: URL,
    simulator: Simulator,
    world: World,
    tmp_path: Path,
    start_schedule: StartSchedule,
    make_config: MakeConfig,
) -> None:
    # SIGTERM comes while chat-a's answer is on its way, however slowly the machine reacts.
    world.inject("chat-a", "slow:4")
    config = write_config(
        tmp_path,
        db_url,
        simulator.base_url,
        ["chat-a", "chat-b", "chat-c"],
        schedule={"cron": NO_FIRE, "run_on_start": True},
        sync={"concurrency": 1},  # chat-a alone in hand
        logging=SCHEDULE_LOG,
    )
    process = start_schedule(config)
    wait_for("chat-a's request", lambda: simulator.stats.requests_by_chat["chat-a"])
    code, elapsed = process.stop()

    assert code == 0
    assert elapsed < 15  # the 4 s request in hand, then out
    [run] = rows(db_url, "sync_runs")
    assert (run["status"], run["error"], run["trigger"]) == ("partial", "interrupted", "schedule")
    assert (run["chats_succeeded"], run["chats_failed"]) == (1, 0)
    assert run["finished_at"] is not None
    # The chat in hand was committed whole; the others were never touched.
    assert [(i["chatid"], i["status"]) for i in rows(db_url, "sync_run_items")] == [
        ("chat-a", "ok")
    ]
    assert [c["chatid"] for c in rows(db_url, "chats")] == ["chat-a"]
    assert {m["userid"] for m in rows(db_url, "chat_members")} == {"u1", "u2", "u3"}
    assert simulator.stats.requests_by_chat["chat-b"] == 0
    assert [
        e["event"] for e in process.events() if e["event"] in {"run.stopping", "run.finished"}
    ] == [
        "run.stopping",
        "run.finished",
    ]
    assert process.events("schedule.stopped")

    # The lock was released: the next run goes ahead and syncs the rest.
    result = run_sync(make_config(db_url, simulator.base_url, ["chat-a", "chat-b", "chat-c"]))
    assert (result.status, result.chats_changed) == ("succeeded", 2)


# -- failures never stop the scheduler -----------------------------------------------------


def test_database_down_at_fire_time_is_logged_and_retried_at_the_next_fire(
    simulator: Simulator, tmp_path: Path, start_schedule: StartSchedule
) -> None:
    config = write_config(
        tmp_path,
        "postgresql://etl@127.0.0.1:1/etl",  # nothing listens on port 1
        simulator.base_url,
        ["chat-a"],
        schedule={"interval_seconds": 1, "run_on_start": True},
        logging=SCHEDULE_LOG,
    )
    process = start_schedule(config)
    wait_for("two failed fires", lambda: len(process.events("schedule.run_failed")) >= 2)
    code, _ = process.stop()

    assert code == 0
    assert process.events("schedule.database_unreachable")
    for event in process.events("schedule.run_failed"):
        assert event["exit_code"] == 3
        assert event["run_id"] is None
        assert event["error"].startswith("database error while connecting to the database: ")
    assert len(process.events("schedule.next_fire")) >= 2


def test_a_failed_run_does_not_stop_the_scheduler(
    sqlite_url: URL, simulator: Simulator, tmp_path: Path, start_schedule: StartSchedule
) -> None:
    config = write_config(
        tmp_path,
        sqlite_url,
        simulator.base_url,
        ["chat-a"],
        schedule={"interval_seconds": 1, "run_on_start": True},
        app_secret="wrong-secret-0123456789",
        logging=SCHEDULE_LOG,
    )
    process = start_schedule(config)
    wait_for("two failed runs", lambda: len(schedule_runs(sqlite_url)) >= 2)
    code, _ = process.stop()

    assert code == 0
    failed = process.events("schedule.run_failed")
    assert len(failed) >= 2
    assert {(e["exit_code"], e["status"]) for e in failed} == {(3, "failed")}
    assert "wrong-secret-0123456789" not in process.log_path.read_text(encoding="utf-8")


# -- several instances on one database -------------------------------------------------------


@pytest.mark.timeout(300)  # two schedulers for several fires: minutes on a busy machine
@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_two_schedulers_never_sync_at_once(
    db_url: URL,
    simulator: Simulator,
    world: World,
    tmp_path: Path,
    start_schedule: StartSchedule,
) -> None:
    # Each run holds the lock for two seconds and more, long enough for the other instance
    # to find it taken at the same fire; and ends before the next fire, 6 s later, even on a
    # busy machine (a run still going at its next fire would skip it).
    world.inject("chat-a", *["slow:2"] * 40)
    config = write_config(
        tmp_path,
        db_url,
        simulator.base_url,
        ["chat-a", "chat-b"],
        schedule={"interval_seconds": 6},
        logging=SCHEDULE_LOG,
    )
    first = start_schedule(config, "first")
    second = start_schedule(config, "second")

    def both_attempted_three_fires() -> bool:
        return all(
            len(p.events("run.started")) + len(p.events("schedule.skipped_locked")) >= 3
            for p in (first, second)
        )

    wait_for("three fires in both instances", both_attempted_three_fires, timeout=120)
    for process in (first, second):
        code, _ = process.stop()
        assert code == 0

    # Fires are aligned to the epoch, so both instances fire at the same times. Each attempt
    # belongs to the fire the instance announced before it (a loaded machine may log it
    # seconds later).
    attempts: dict[str | None, list[str]] = {}
    for process, who in ((first, "first"), (second, "second")):
        fire: str | None = None
        for event in process.events():
            if event["event"] in {"schedule.started", "schedule.next_fire"}:
                fire = event["next_fire"]
            elif event["event"] == "run.started":
                attempts.setdefault(fire, []).append(f"{who} synced")
            elif event["event"] == "schedule.skipped_locked":
                assert event["reason"] == "skipped, another instance holds the lock"
                attempts.setdefault(fire, []).append(f"{who} skipped")
    shared = {s: sorted(a) for s, a in attempts.items() if len({x.split()[0] for x in a}) == 2}
    assert len(shared) >= 2, attempts
    for outcome in shared.values():
        assert outcome in (
            ["first skipped", "second synced"],
            ["first synced", "second skipped"],
        ), attempts
    # Exactly one sync per fire, and the runs never overlap in time.
    assert all(sum(a.endswith("synced") for a in found) == 1 for found in attempts.values())
    runs = [r for r in rows(db_url, "sync_runs") if r["status"] != "running"]
    assert len(runs) >= 3
    for earlier, later in itertools.pairwise(runs):
        assert earlier["finished_at"] <= later["started_at"]


# -- configuration -------------------------------------------------------------------------


def invoke(args: list[str]) -> Any:
    env = {k: None for k in os.environ if k.startswith("DINGTALK")}
    return CliRunner().invoke(cli, args, env=env, prog_name="dingtalk-etl")


def test_schedule_without_a_trigger_exits_78(
    sqlite_url: URL, simulator: Simulator, tmp_path: Path
) -> None:
    config = write_config(tmp_path, sqlite_url, simulator.base_url, ["chat-a"])

    result = invoke(["--config", str(config), "schedule"])

    assert result.exit_code == 78
    assert result.stderr == (
        f"dingtalk-etl: error: {config}: [schedule] cron, interval_minutes: "
        '`dingtalk-etl schedule` needs one of them (e.g. cron = "10 * * * *")\n'
    )


def test_schedule_on_an_unmigrated_database_exits_78(tmp_path: Path, simulator: Simulator) -> None:
    config = write_config(
        tmp_path,
        f"sqlite:///{tmp_path / 'empty.db'}",
        simulator.base_url,
        ["chat-a"],
        schedule={"interval_minutes": 60},
    )

    result = invoke(["--config", str(config), "schedule"])

    assert result.exit_code == 78
    assert result.stderr.startswith("dingtalk-etl: error: the database has no dingtalk-etl schema")
    assert result.stderr.endswith("run `dingtalk-etl db upgrade` (or pass --migrate)\n")


MINIMAL = {
    "dingtalk": {"app_key": APP_KEY, "app_secret": APP_SECRET},
    "sync": {"chatids": ["chat-a"]},
}
BAD_SETTINGS: list[tuple[str, dict[str, Any], str]] = [
    (
        "cron-four-fields",
        {"schedule": {"cron": "10 * * *"}},
        "[schedule] cron: not a crontab expression: expected 5 fields (minute hour "
        "day-of-month month day-of-week), got 4 (got '10 * * *')",
    ),
    (
        "cron-minute-out-of-range",
        {"schedule": {"cron": "61 * * * *"}},
        "[schedule] cron: not a crontab expression: '61': the last value (61) is higher than "
        "the maximum value (59) (got '61 * * * *')",
    ),
    (
        "cron-bad-weekday",
        {"schedule": {"cron": "0 9 * * funday"}},
        "[schedule] cron: not a crontab expression: day-of-week 'funday': 'funday' is not a "
        "day (0-7 with 0 and 7 = Sunday, or sun-sat) (got '0 9 * * funday')",
    ),
    (
        "cron-day-and-weekday",
        {"schedule": {"cron": "0 9 1 * 1"}},
        "[schedule] cron: not a crontab expression: restricting both day-of-month and "
        "day-of-week is not supported (cron would fire on either, this scheduler only on "
        "both); restrict one of them (got '0 9 1 * 1')",
    ),
    (
        "cron-and-interval-seconds",
        {"schedule": {"cron": "10 * * * *", "interval_seconds": 30}},
        "[schedule] cron, interval_seconds: give one of them, not both",
    ),
    (
        "unknown-timezone",
        {"schedule": {"timezone": "Mars/Olympus"}},
        "[schedule] timezone: unknown time zone (use an IANA name such as 'Asia/Shanghai' or "
        "'UTC') (got 'Mars/Olympus')",
    ),
    (
        "negative-jitter",
        {"schedule": {"jitter_seconds": -1}},
        "[schedule] jitter_seconds: Input should be greater than or equal to 0 (got -1)",
    ),
    (
        "zero-misfire-grace-time",
        {"schedule": {"misfire_grace_time": 0}},
        "[schedule] misfire_grace_time: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "run-on-start-not-bool",
        {"schedule": {"run_on_start": "yes"}},
        "[schedule] run_on_start: Input should be a valid boolean (got 'yes')",
    ),
    (
        "healthcheck-not-http",
        {"monitoring": {"healthcheck_url": "ftp://hc.example.com/x"}},
        "[monitoring] healthcheck_url: must be an http(s) URL such as "
        "https://hc-ping.com/<uuid> (got 'ftp://hc.example.com/x')",
    ),
    (
        "metrics-file-not-a-string",
        {"monitoring": {"metrics_file": 3}},
        "[monitoring] metrics_file: Input should be a valid string (got 3)",
    ),
    (
        "monitoring-unknown-key",
        {"monitoring": {"pushgateway": "http://x"}},
        "[monitoring] pushgateway: unknown key",
    ),
]


@pytest.mark.parametrize(
    ("extra", "message"), [c[1:] for c in BAD_SETTINGS], ids=[c[0] for c in BAD_SETTINGS]
)
def test_bad_schedule_and_monitoring_settings_name_the_key(
    tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    path = tmp_path / "config.toml"
    with pytest.raises(ConfigError) as caught:
        parse_config({**MINIMAL, **extra}, path, environ={})
    assert caught.value.message == f"{path}: {message}"


def test_schedule_and_monitoring_defaults(tmp_path: Path) -> None:
    config = parse_config(dict(MINIMAL), tmp_path / "config.toml", environ={})

    settings = config.schedule
    assert (settings.cron, settings.interval_minutes, settings.interval_seconds) == (
        None,
        None,
        None,
    )
    assert (settings.run_on_start, settings.timezone) == (False, "UTC")
    assert (settings.jitter_seconds, settings.misfire_grace_time) == (0, 300)
    assert (config.monitoring.metrics_file, config.monitoring.healthcheck_url) == (None, None)
    assert config.metrics_path is None


def test_metrics_file_is_relative_to_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "config.toml"
    path.write_text(
        f'[dingtalk]\napp_key = "{APP_KEY}"\napp_secret = "{APP_SECRET}"\n'
        '[sync]\nchatids = ["chat-a"]\n'
        '[monitoring]\nmetrics_file = "metrics/etl.prom"\n',
        encoding="utf-8",
    )
    config = load_config(path, environ={})
    assert config.metrics_path == tmp_path / "etc" / "metrics" / "etl.prom"


def test_the_job_is_added_with_explicit_options(tmp_path: Path) -> None:
    raw = {
        **MINIMAL,
        "schedule": {
            "cron": "10 * * * *",
            "timezone": "Asia/Shanghai",
            "jitter_seconds": 30,
            "misfire_grace_time": 120,
        },
    }
    config = parse_config(raw, tmp_path / "config.toml", environ={})
    scheduler = SyncScheduler(config, stop=threading.Event())

    job = scheduler.add_job()

    assert job.id == JOB_ID
    assert (job.max_instances, job.coalesce, job.misfire_grace_time) == (1, True, 120)
    assert str(job.trigger.timezone) == "Asia/Shanghai"
    assert job.trigger.jitter == 30


# -- triggers --------------------------------------------------------------------------------

WEEKDAYS: list[tuple[str, str]] = [
    ("0", "sun"),
    ("7", "sun"),
    ("1-5", "mon,tue,wed,thu,fri"),
    ("mon-fri", "mon,tue,wed,thu,fri"),
    ("5-7", "fri,sat,sun"),
    ("0,6", "sat,sun"),
    ("*/2", "tue,thu,sat,sun"),
    ("1/2", "mon,wed,fri,sun"),
    ("SUN,Wed", "wed,sun"),
    ("0-7", "*"),
    ("*", "*"),
]


@pytest.mark.parametrize(("field", "expected"), WEEKDAYS, ids=[w[0] for w in WEEKDAYS])
def test_crontab_weekdays_are_numbered_from_sunday(field: str, expected: str) -> None:
    assert crontab_fields(f"0 9 * * {field}")["day_of_week"] == expected


def test_a_sunday_cron_fires_on_sunday_in_its_timezone(tmp_path: Path) -> None:
    raw = {**MINIMAL, "schedule": {"cron": "30 9 * * 0", "timezone": "Asia/Shanghai"}}
    config = parse_config(raw, tmp_path / "config.toml", environ={})
    monday = dt.datetime(2024, 5, 6, 12, 0, tzinfo=dt.UTC)

    fire = build_trigger(config).get_next_fire_time(None, monday)

    assert fire.isoformat() == "2024-05-12T09:30:00+08:00"
    assert fire.strftime("%A") == "Sunday"


TIMES: list[tuple[str, int, int | None, str, str]] = [
    # id, seconds, previous (seconds past the epoch slot), now, expected
    ("first-fire-next-slot", 3600, None, "10:20:00", "11:00:00"),
    ("on-the-slot", 3600, None, "11:00:00", "11:00:00"),
    ("after-run-on-start", 3600, 1, "10:20:01", "11:00:00"),
    ("after-a-fire", 60, 0, "10:20:00", "10:21:00"),
    ("after-an-overlong-run", 60, 0, "10:23:30", "10:24:00"),
]


@pytest.mark.parametrize(
    ("seconds", "previous", "now", "expected"), [t[1:] for t in TIMES], ids=[t[0] for t in TIMES]
)
def test_intervals_stay_on_epoch_aligned_slots(
    seconds: int, previous: int | None, now: str, expected: str
) -> None:
    day = "2024-05-06T"
    current = dt.datetime.fromisoformat(f"{day}{now}+00:00")
    prev = None
    if previous is not None:
        prev = current - dt.timedelta(seconds=previous)
    fire = AlignedInterval(seconds).get_next_fire_time(prev, current)
    assert fire == dt.datetime.fromisoformat(f"{day}{expected}+00:00")


def test_interval_jitter_does_not_accumulate() -> None:
    trigger = AlignedInterval(60, jitter=20)
    now = dt.datetime(2024, 5, 6, 10, 0, 5, tzinfo=dt.UTC)
    fire = trigger.get_next_fire_time(None, now)
    for _ in range(50):
        slot = dt.datetime.fromtimestamp(fire.timestamp() // 60 * 60, tz=dt.UTC)
        assert 0 <= (fire - slot).total_seconds() < 20
        following = trigger.get_next_fire_time(fire, fire)
        assert following.timestamp() // 60 == fire.timestamp() // 60 + 1
        fire = following
