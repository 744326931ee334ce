"""Monitoring: healthchecks.io-style pings in the right order, Prometheus textfile metrics that
parse and are replaced atomically, and neither ever failing a run or leaking a secret.

Pings go to a real HTTP server on 127.0.0.1 (port 0) that the test starts and stops.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import itertools
import json
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import URL

from etl.budgetstore import record_calls, record_exhaustion
from etl.cli import cli
from etl.config import Config, parse_config
from etl.db import create_db_engine
from etl.errors import DatabaseFailure, LockBusy
from etl.lock import run_lock
from etl.logs import configure_logging
from etl.monitoring import HealthPinger, monitored_sync
from etl.output import write_text_atomic
from etl.quota import EndpointCalls, quota_month
from etl.simulator import Simulator, errmsg_for
from etl.sync import run_sync
from tests.conftest import APP_KEY, APP_SECRET
from tests.helpers import rows, wait_for, write_config
from tests.test_schedule import SCHEDULE_LOG, StartSchedule, schedule_processes

CHECK = "0f1e2d3c-4b5a-6978-8a9b-aabbccddeeff"  # the secret part of a ping URL
WRONG_SECRET = "wrong-secret-0123456789"


class PingServer:
    """Records each request's method, path (with query) and body; answers ``status``."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []
        self.status = 200
        self.delay = 0.0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8") if length else ""
                with server.lock:
                    server.requests.append((self.command, self.path, body))
                time.sleep(server.delay)
                self.send_response(server.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(b"OK")

            do_GET = do_POST = do_HEAD = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        # Stops itself even if a test forgets to.
        self.timer = threading.Timer(300, self.close)
        self.timer.daemon = True
        self.timer.start()

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def url(self) -> str:
        return f"{self.base}/{CHECK}"

    def paths(self) -> list[str]:
        with self.lock:
            return [path for _method, path, _body in self.requests]

    def close(self) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pings() -> Iterator[PingServer]:
    server = PingServer()
    yield server
    server.close()


@pytest.fixture
def start_schedule(tmp_path: Path) -> Iterator[StartSchedule]:
    yield from schedule_processes(tmp_path)


@pytest.fixture
def log_lines() -> io.StringIO:
    """The structured log of this test (the autouse fixture resets logging after it)."""
    buffer = io.StringIO()
    configure_logging("INFO", "json", stream=buffer)
    return buffer


def events(buffer: io.StringIO, name: str) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in buffer.getvalue().splitlines() if line]
    return [e for e in found if e["event"] == name]


def monitored_config(
    tmp_path: Path,
    db: URL | str,
    base_url: str,
    chatids: list[str],
    *,
    healthcheck_url: str | None = None,
    metrics_file: str | None = None,
    app_secret: str = APP_SECRET,
    dingtalk: dict[str, Any] | None = None,
    schedule: dict[str, Any] | None = None,
) -> Config:
    monitoring: dict[str, Any] = {}
    if healthcheck_url is not None:
        monitoring["healthcheck_url"] = healthcheck_url
    if metrics_file is not None:
        monitoring["metrics_file"] = metrics_file
    raw: dict[str, Any] = {
        "dingtalk": {
            "base_url": base_url,
            "app_key": APP_KEY,
            "app_secret": app_secret,
            "max_requests_per_second": 1000,
            "max_attempts": 2,
            **(dingtalk or {}),
        },
        "database": {"url": db if isinstance(db, str) else db.render_as_string(False)},
        "sync": {"chatids": chatids},
        "monitoring": monitoring,
        "schedule": schedule or {},
    }
    return parse_config(raw, tmp_path / "config.toml", environ={})


DOWN_DB = "postgresql://etl@127.0.0.1:1/etl"  # nothing listens on port 1

# -- pings ----------------------------------------------------------------------------------

PING_CASES: list[tuple[str, list[str], str, list[str], str]] = [
    # id, chatids, app_secret, expected paths, the completion body starts with
    ("success", ["chat-a", "chat-b"], APP_SECRET, ["/start", ""], "exit 0: run 1 succeeded"),
    ("partial", ["chat-a", "chat-x"], APP_SECRET, ["/start", "/fail"], "exit 1: run 1 partial"),
    ("run-failed", ["chat-a"], WRONG_SECRET, ["/start", "/fail"], "exit 3: run 1 failed"),
]


@pytest.mark.parametrize(
    ("chatids", "secret", "expected", "body"),
    [c[1:] for c in PING_CASES],
    ids=[c[0] for c in PING_CASES],
)
def test_pings_start_then_the_outcome(
    sqlite_url: URL,
    simulator: Simulator,
    pings: PingServer,
    tmp_path: Path,
    chatids: list[str],
    secret: str,
    expected: list[str],
    body: str,
) -> None:
    config = monitored_config(
        tmp_path,
        sqlite_url,
        simulator.base_url,
        chatids,
        healthcheck_url=pings.url,
        app_secret=secret,
    )

    monitored_sync(config)

    assert pings.paths() == [f"/{CHECK}{suffix}" for suffix in expected]
    assert [method for method, _path, _body in pings.requests] == ["POST", "POST"]
    assert pings.requests[0][2] == ""
    assert pings.requests[1][2].startswith(body)
    assert secret not in pings.requests[1][2]


def test_a_run_that_cannot_start_pings_fail_with_the_reason(
    simulator: Simulator, pings: PingServer, tmp_path: Path
) -> None:
    config = monitored_config(
        tmp_path, DOWN_DB, simulator.base_url, ["chat-a"], healthcheck_url=pings.url
    )

    with pytest.raises(DatabaseFailure):
        monitored_sync(config)

    assert pings.paths() == [f"/{CHECK}/start", f"/{CHECK}/fail"]
    assert pings.requests[1][2].startswith(
        "exit 3: database error while connecting to the database: "
    )


def test_a_sync_refused_by_the_lock_sends_no_outcome(
    sqlite_url: URL, simulator: Simulator, pings: PingServer, tmp_path: Path
) -> None:
    config = monitored_config(
        tmp_path,
        sqlite_url,
        simulator.base_url,
        ["chat-a"],
        healthcheck_url=pings.url,
        metrics_file="etl.prom",
    )
    engine = create_db_engine(sqlite_url)
    try:
        with run_lock(engine), pytest.raises(LockBusy):
            monitored_sync(config)
    finally:
        engine.dispose()

    # The holder of the lock reports its own run; this one did nothing.
    assert pings.paths() == [f"/{CHECK}/start"]
    assert not (tmp_path / "etl.prom").exists()


URLS: list[tuple[str, str, list[str]]] = [
    ("plain", "/{check}", ["/{check}/start", "/{check}", "/{check}/fail"]),
    ("trailing-slash", "/{check}/", ["/{check}/start", "/{check}", "/{check}/fail"]),
    (
        "slug-and-query",
        "/ping/{check}/etl-prod?create=1",
        [
            "/ping/{check}/etl-prod/start?create=1",
            "/ping/{check}/etl-prod?create=1",
            "/ping/{check}/etl-prod/fail?create=1",
        ],
    ),
]


@pytest.mark.parametrize(("path", "expected"), [u[1:] for u in URLS], ids=[u[0] for u in URLS])
def test_ping_urls(pings: PingServer, path: str, expected: list[str]) -> None:
    pinger = HealthPinger(pings.base + path.format(check=CHECK))

    pinger.start()
    pinger.finish(0, "ok")
    pinger.finish(3, "failed")

    assert pings.paths() == [e.format(check=CHECK) for e in expected]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("answer", "logged"),
    [(500, {"http_status": 500}), (None, {"error": "ConnectionError"})],
    ids=["server-error", "unreachable"],
)
def test_a_failing_ping_never_fails_the_run_nor_logs_the_url(
    sqlite_url: URL,
    simulator: Simulator,
    pings: PingServer,
    tmp_path: Path,
    log_lines: io.StringIO,
    answer: int | None,
    logged: dict[str, Any],
) -> None:
    if answer is None:
        url = f"http://127.0.0.1:{closed_port()}/{CHECK}"
    else:
        pings.status = answer
        url = pings.url
    config = monitored_config(
        tmp_path, sqlite_url, simulator.base_url, ["chat-a"], healthcheck_url=url
    )

    result = monitored_sync(config)

    assert result.status == "succeeded"
    failed = events(log_lines, "monitoring.ping_failed")
    assert [e["ping"] for e in failed] == ["start", "success"]
    for event in failed:
        assert {k: event[k] for k in logged} == logged
    assert CHECK not in log_lines.getvalue()


def test_a_ping_gives_up_after_its_timeout(pings: PingServer, log_lines: io.StringIO) -> None:
    pings.delay = 3.0
    started = time.monotonic()

    HealthPinger(pings.url, timeout=0.3).start()

    assert time.monotonic() - started < 2
    [event] = events(log_lines, "monitoring.ping_failed")
    assert (event["ping"], event["error"]) == ("start", "ReadTimeout")


def test_sync_command_pings_and_writes_metrics(
    sqlite_url: URL, simulator: Simulator, pings: PingServer, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        sqlite_url,
        simulator.base_url,
        ["chat-a"],
        monitoring={"healthcheck_url": pings.url, "metrics_file": "etl.prom"},
    )
    env = {k: None for k in os.environ if k.startswith("DINGTALK")}

    result = CliRunner().invoke(cli, ["--config", str(config), "sync"], env=env)

    assert result.exit_code == 0, result.output
    assert pings.paths() == [f"/{CHECK}/start", f"/{CHECK}"]
    metrics = parse_metrics((tmp_path / "etl.prom").read_text(encoding="utf-8"))
    assert metrics["dingtalk_etl_last_run_id"] == {(): 1.0}


@pytest.mark.parametrize(
    ("failing", "tail"),
    [(2, []), (22, ["... and 2 more failed chats"])],
    ids=["2-failed-chats", "22-failed-chats"],
)
def test_the_command_and_the_ping_name_the_same_failed_chats(
    sqlite_url: URL,
    simulator: Simulator,
    pings: PingServer,
    tmp_path: Path,
    failing: int,
    tail: list[str],
) -> None:
    unknown = [f"chat-x{n:02d}" for n in range(failing)]
    config = write_config(
        tmp_path,
        sqlite_url,
        simulator.base_url,
        ["chat-a", *unknown],
        monitoring={"healthcheck_url": pings.url},
    )
    env = {k: None for k in os.environ if k.startswith("DINGTALK")}

    result = CliRunner().invoke(cli, ["--config", str(config), "sync"], env=env)

    assert result.exit_code == 1, result.output
    body = pings.requests[1][2].splitlines()[1:]
    # stderr also carries the JSON log lines; the failed chats are indented.
    assert [line for line in result.stderr.splitlines() if line.startswith("  ")] == [
        f"  {line}" for line in body
    ]
    named, rest = body[: min(failing, 20)], body[min(failing, 20) :]
    failure = rf"failed chat-x\d\d: chat/get: errcode 40016: {re.escape(errmsg_for(40016))}"
    assert all(re.fullmatch(failure, line) for line in named)
    assert len(set(named)) == len(named)
    assert rest == tail


def test_each_scheduled_run_pings_and_writes_metrics(
    sqlite_url: URL,
    simulator: Simulator,
    pings: PingServer,
    tmp_path: Path,
    start_schedule: StartSchedule,
) -> None:
    config = write_config(
        tmp_path,
        sqlite_url,
        simulator.base_url,
        ["chat-a"],
        schedule={"interval_seconds": 1, "run_on_start": True},
        monitoring={"healthcheck_url": pings.url, "metrics_file": "etl.prom"},
        logging=SCHEDULE_LOG,
    )
    process = start_schedule(config)
    wait_for("two runs reported", lambda: pings.paths().count(f"/{CHECK}") >= 2)
    code, _ = process.stop()

    assert code == 0
    paths = pings.paths()
    pairs = [paths[i : i + 2] for i in range(0, len(paths) - 1, 2)]
    assert pairs[:2] == [[f"/{CHECK}/start", f"/{CHECK}"]] * 2
    for start, outcome in pairs:
        assert start == f"/{CHECK}/start"
        assert outcome in {f"/{CHECK}", f"/{CHECK}/fail"}
    metrics = parse_metrics((tmp_path / "etl.prom").read_text(encoding="utf-8"))
    assert metrics["dingtalk_etl_last_run_id"] == {
        (): float(rows(sqlite_url, "sync_runs")[-1]["id"])
    }


# -- metrics -------------------------------------------------------------------------------

GAUGES = {
    "dingtalk_etl_last_run_status",
    "dingtalk_etl_last_run_exit_code",
    "dingtalk_etl_last_run_id",
    "dingtalk_etl_last_run_start_timestamp_seconds",
    "dingtalk_etl_last_run_end_timestamp_seconds",
    "dingtalk_etl_last_run_duration_seconds",
    "dingtalk_etl_last_success_timestamp_seconds",
    "dingtalk_etl_last_run_chats",
    "dingtalk_etl_last_run_chats_ok",
    "dingtalk_etl_last_run_chats_failed",
    "dingtalk_etl_last_run_chats_changed",
    "dingtalk_etl_last_run_api_calls",
    "dingtalk_etl_last_run_retries",
    "dingtalk_etl_last_run_chats_skipped",
    # The quota month's (dingtalk_etl_api_call_quota only with a quota configured).
    "dingtalk_etl_api_calls_month",
    "dingtalk_etl_api_calls_projected",
    "dingtalk_etl_api_quota_exhausted",
}


def parse_metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {labels: value}; every family must be a documented gauge."""
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge", family.name
        assert family.documentation, family.name
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def status_of(metrics: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> str:
    [status] = [
        dict(labels)["status"]
        for labels, value in metrics["dingtalk_etl_last_run_status"].items()
        if value == 1
    ]
    assert len(metrics["dingtalk_etl_last_run_status"]) == 3
    return status


def test_metrics_file_is_prometheus_text_and_keeps_the_last_success_from_the_database(
    db_url: URL, simulator: Simulator, tmp_path: Path
) -> None:
    path = tmp_path / "etl.prom"
    # A success by another process (no metrics there): the database remembers it.
    first = run_sync(monitored_config(tmp_path, db_url, simulator.base_url, ["chat-a"]))
    assert first.status == "succeeded"
    success_at = rows(db_url, "sync_runs")[0]["finished_at"].timestamp()

    failing = monitored_config(
        tmp_path,
        db_url,
        simulator.base_url,
        ["chat-a", "chat-b"],
        metrics_file="etl.prom",
        app_secret=WRONG_SECRET,
    )
    monitored_sync(failing)
    metrics = parse_metrics(path.read_text(encoding="utf-8"))

    assert set(metrics) == GAUGES
    assert status_of(metrics) == "failed"
    assert metrics["dingtalk_etl_last_run_exit_code"] == {(): 3.0}
    assert metrics["dingtalk_etl_last_run_id"] == {(): 2.0}
    assert metrics["dingtalk_etl_last_success_timestamp_seconds"][()] == pytest.approx(
        success_at, abs=0.001
    )
    assert metrics["dingtalk_etl_last_run_chats"] == {(): 2.0}
    assert metrics["dingtalk_etl_last_run_chats_ok"] == {(): 0.0}
    failed_run = rows(db_url, "sync_runs")[1]
    assert metrics["dingtalk_etl_last_run_api_calls"] == {(): failed_run["api_calls"]}

    inode = path.stat().st_ino
    ok = monitored_config(
        tmp_path, db_url, simulator.base_url, ["chat-a", "chat-b"], metrics_file="etl.prom"
    )
    result = monitored_sync(ok)
    metrics = parse_metrics(path.read_text(encoding="utf-8"))

    assert path.stat().st_ino != inode
    assert status_of(metrics) == "succeeded"
    third = rows(db_url, "sync_runs")[2]
    assert metrics["dingtalk_etl_last_success_timestamp_seconds"][()] == pytest.approx(
        third["finished_at"].timestamp(), abs=0.001
    )
    expected = {
        "dingtalk_etl_last_run_id": 3,
        "dingtalk_etl_last_run_exit_code": 0,
        "dingtalk_etl_last_run_chats": 2,
        "dingtalk_etl_last_run_chats_ok": 2,
        "dingtalk_etl_last_run_chats_failed": 0,
        "dingtalk_etl_last_run_chats_changed": 1,
        "dingtalk_etl_last_run_api_calls": result.api_calls,
        "dingtalk_etl_last_run_retries": 0,
    }
    assert {name: metrics[name][()] for name in expected} == expected
    start = metrics["dingtalk_etl_last_run_start_timestamp_seconds"][()]
    end = metrics["dingtalk_etl_last_run_end_timestamp_seconds"][()]
    assert start <= third["started_at"].timestamp() <= third["finished_at"].timestamp() <= end
    assert 0 < metrics["dingtalk_etl_last_run_duration_seconds"][()] <= end - start
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir() if "prom" in p.name) == ["etl.prom"]


def test_metrics_without_any_success_say_zero(
    sqlite_url: URL, simulator: Simulator, tmp_path: Path
) -> None:
    config = monitored_config(
        tmp_path,
        sqlite_url,
        simulator.base_url,
        ["chat-a"],
        metrics_file="etl.prom",
        app_secret=WRONG_SECRET,
    )
    monitored_sync(config)
    metrics = parse_metrics((tmp_path / "etl.prom").read_text(encoding="utf-8"))
    assert metrics["dingtalk_etl_last_success_timestamp_seconds"] == {(): 0.0}


def test_metrics_when_the_database_is_down(simulator: Simulator, tmp_path: Path) -> None:
    config = monitored_config(
        tmp_path, DOWN_DB, simulator.base_url, ["chat-a"], metrics_file="etl.prom"
    )

    with pytest.raises(DatabaseFailure):
        monitored_sync(config)
    metrics = parse_metrics((tmp_path / "etl.prom").read_text(encoding="utf-8"))

    assert status_of(metrics) == "failed"
    assert metrics["dingtalk_etl_last_run_exit_code"] == {(): 3.0}
    # Unknown rather than wrong: no run row, and no word from the database on the last success
    # or the month's calls.
    assert "dingtalk_etl_last_run_id" not in metrics
    assert "dingtalk_etl_last_success_timestamp_seconds" not in metrics
    assert not set(MONTH_GAUGES) & set(metrics)


MONTH_GAUGES = [
    "dingtalk_etl_api_calls_month",
    "dingtalk_etl_api_call_quota",
    "dingtalk_etl_api_calls_projected",
    "dingtalk_etl_api_quota_exhausted",
]
# Never fires this month (its slots are 190 years apart): the projection is the calls made.
NO_FIRE_LEFT = {"interval_minutes": 100_000_000}


def test_metrics_count_the_calls_of_the_quota_month(
    db_url: URL, simulator: Simulator, tmp_path: Path
) -> None:
    month = quota_month(dt.datetime.now(dt.UTC), "Asia/Shanghai")
    engine = create_db_engine(db_url)
    try:
        with engine.begin() as conn:
            # The last microsecond of last month in Shanghai does not count; its first does.
            before = month.start - dt.timedelta(microseconds=1)
            record_calls(conn, [EndpointCalls("chat/get", 10_000)], source="schedule", at=before)
            record_calls(conn, [EndpointCalls("chat/get", 4500)], source="schedule", at=month.start)
    finally:
        engine.dispose()
    config = monitored_config(
        tmp_path,
        db_url,
        simulator.base_url,
        ["chat-a", "chat-b"],
        metrics_file="etl.prom",
        dingtalk={"monthly_call_quota": 5000},
        schedule=NO_FIRE_LEFT,
    )
    path = tmp_path / "etl.prom"

    first = monitored_sync(config, trigger="schedule")
    metrics = parse_metrics(path.read_text(encoding="utf-8"))

    assert (first.status, first.chats_total, first.chats_skipped) == ("succeeded", 2, 0)
    assert set(metrics) == GAUGES | {"dingtalk_etl_api_call_quota"}
    assert {name: metrics[name][()] for name in MONTH_GAUGES} == {
        "dingtalk_etl_api_calls_month": 4500 + first.api_calls,
        "dingtalk_etl_api_call_quota": 5000,
        "dingtalk_etl_api_calls_projected": 4500 + first.api_calls,
        "dingtalk_etl_api_quota_exhausted": 0,
    }
    assert metrics["dingtalk_etl_last_run_chats_skipped"] == {(): 0}

    # DingTalk said 90020: the next run reads nothing, and the file says why.
    engine = create_db_engine(db_url)
    try:
        with engine.begin() as conn:
            record_exhaustion(
                conn, at=month.start, source="schedule", run_id=first.run_id, error="90020"
            )
    finally:
        engine.dispose()
    second = monitored_sync(config, trigger="schedule")
    metrics = parse_metrics(path.read_text(encoding="utf-8"))

    assert (second.status, second.chats_total, second.chats_skipped) == ("succeeded", 0, 2)
    assert second.api_calls == 0
    assert {name: metrics[name][()] for name in MONTH_GAUGES} == {
        "dingtalk_etl_api_calls_month": 4500 + first.api_calls,
        "dingtalk_etl_api_call_quota": 5000,
        "dingtalk_etl_api_calls_projected": 4500 + first.api_calls,
        "dingtalk_etl_api_quota_exhausted": 1,
    }
    assert metrics["dingtalk_etl_last_run_chats_skipped"] == {(): 2}

    # `runs` shows the chats the runs skipped.
    runs_config = write_config(tmp_path, db_url, app_key=None, app_secret=None, name="runs.toml")
    table = CliRunner().invoke(cli, ["--config", str(runs_config), "runs"])
    as_json = CliRunner().invoke(cli, ["--config", str(runs_config), "runs", "--json"])

    header, _rule, *lines = table.stdout.splitlines()
    assert header.split()[9] == "chats_skipped"
    assert [line.split()[11] for line in lines] == ["2", "0"]
    assert [run["chats_skipped"] for run in json.loads(as_json.stdout)] == [2, 0]


def test_a_metrics_file_that_cannot_be_written_never_fails_the_run(
    sqlite_url: URL, simulator: Simulator, tmp_path: Path, log_lines: io.StringIO
) -> None:
    config = monitored_config(
        tmp_path, sqlite_url, simulator.base_url, ["chat-a"], metrics_file="missing/etl.prom"
    )

    result = monitored_sync(config)

    assert result.status == "succeeded"
    [event] = events(log_lines, "monitoring.metrics_failed")
    assert event["path"] == str(tmp_path / "missing" / "etl.prom")
    assert event["error"] == "No such file or directory"


def test_the_metrics_file_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "etl.prom"
    # Large, different texts: a reader seeing a half-written file would notice.
    texts = [f"# {i}\n" + "".join(f"metric_{i} {j}\n" for j in range(4000)) for i in range(40)]
    write_text_atomic(path, texts[0])
    seen: set[str] = set()
    partial: list[int] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            content = path.read_text(encoding="utf-8")
            if content in texts:
                seen.add(content)
            else:
                partial.append(len(content))

    reader = threading.Thread(target=read)
    reader.start()
    inodes = [path.stat().st_ino]
    try:
        for text in itertools.islice(texts, 1, None):
            write_text_atomic(path, text)
            inodes.append(path.stat().st_ino)
            time.sleep(0.002)
    finally:
        done.set()
        reader.join()

    assert partial == []
    assert len(seen) > 1
    # A new file each time, never rewritten in place (freed inode numbers may come back later).
    assert all(before != after for before, after in itertools.pairwise(inodes))
    assert path.read_text(encoding="utf-8") == texts[-1]
    assert [p.name for p in tmp_path.iterdir()] == ["etl.prom"]  # no temporary file left
