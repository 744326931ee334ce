"""Being watched: Prometheus textfile metrics, healthchecks.io-style pings, the health verdict.

Sits on top of ``etl.sync``: ``monitored_sync`` wraps one run for both ``dingtalk-etl sync`` and
each fire of ``dingtalk-etl schedule``, and ``read_health`` answers ``dingtalk-etl status``.
Both show the month's API budget as ``etl.budget.month_budget`` reckons it (calls this quota
month, the quota, the projected total, a 90020). Nothing here can change a run's outcome: a
metrics file that cannot be written or a ping that fails is logged
(``monitoring.metrics_failed``, ``monitoring.ping_failed``) and the run goes on.
Knows files, HTTP (requests) and the read queries of the run log, the listener's row and the
budget; takes no part in the command line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import math
import re
import threading
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit, urlunsplit

import structlog
from sqlalchemy import Engine, select

from etl import __version__
from etl.budget import MonthBudget, month_budget
from etl.config import Config, check_chatid
from etl.db import database_errors, open_database, require_schema, utcnow
from etl.errors import (
    DatabaseFailure,
    EtlError,
    ExitCode,
    LockBusy,
    describe_exception,
    exit_code_for,
)
from etl.eventstore import EventStore, ListenerLog, synced_chatids
from etl.output import plain, write_text_atomic
from etl.runlog import RunLog
from etl.schema import chats

if TYPE_CHECKING:
    from etl.sync import RunResult

log = structlog.get_logger("etl.monitoring")

PING_TIMEOUT_SECONDS: Final = 5.0
METRIC_PREFIX: Final = "dingtalk_etl_"
# The statuses a finished run can end with; the status gauge has one series for each.
FINAL_STATUSES: Final = ("succeeded", "partial", "failed")
_MAX_PING_BODY = 10_000  # bytes; healthchecks.io keeps up to 100 kB


# -- durations --------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in ``90s``, ``30m``, ``2h``, ``1d`` or plain ``3600``; ``ValueError`` otherwise."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(
            f"{text!r} is not a duration: use a whole number > 0 of seconds, or with a unit "
            "as in 90s, 30m, 2h, 1d"
        )
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def format_duration(seconds: float) -> str:
    """``3h 5m``, ``2d 1h``, ``45s``: the two largest units, a zero second one left out."""
    total = max(0, math.floor(seconds))
    units = [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)]
    parts: list[tuple[int, str]] = []
    for name, size in units:
        value, total = divmod(total, size)
        if value or parts:
            parts.append((value, name))
    if not parts:
        return "0s"
    shown = parts[:2]
    if len(shown) == 2 and shown[1][0] == 0:
        shown = shown[:1]
    return " ".join(f"{value}{name}" for value, name in shown)


# -- healthchecks.io-style pings -----------------------------------------------------------


class HealthPinger:
    """``<url>/start`` before a run, ``<url>`` after a success, ``<url>/fail`` after a failure.

    One POST each, with a short timeout, the run summary as the body; never raises. The URL
    itself is a credential (registered as a secret at config load) and is never logged.
    """

    def __init__(self, url: str | None, *, timeout: float = PING_TIMEOUT_SECONDS) -> None:
        self.url = url
        self.timeout = timeout

    def start(self) -> None:
        self._send("start", "")

    def finish(self, exit_code: int, body: str) -> None:
        self._send("" if exit_code == ExitCode.OK else "fail", body)

    def _send(self, suffix: str, body: str) -> None:
        if not self.url:
            return
        kind = suffix or "success"
        parts = urlsplit(self.url)
        path = parts.path.rstrip("/") + (f"/{suffix}" if suffix else "")
        target = urlunsplit(parts._replace(path=path or "/"))
        import requests  # only a run with a ping URL needs it

        try:
            response = requests.post(
                target,
                data=body.encode("utf-8")[:_MAX_PING_BODY],
                timeout=self.timeout,
                headers={
                    "User-Agent": f"dingtalk-etl/{__version__}",
                    "Content-Type": "text/plain; charset=utf-8",
                },
            )
        except requests.RequestException as exc:
            # The exception's text names the URL: log only what kind of failure it was.
            log.warning("monitoring.ping_failed", ping=kind, error=type(exc).__name__)
            return
        with contextlib.closing(response):
            if response.status_code >= 400:
                log.warning("monitoring.ping_failed", ping=kind, http_status=response.status_code)


# -- Prometheus textfile metrics -----------------------------------------------------------


@dataclass(frozen=True)
class RunMetrics:
    """What the metrics file says about the last run this process attempted."""

    status: str
    exit_code: int
    trigger: str
    started_at: dt.datetime
    finished_at: dt.datetime
    duration_seconds: float
    run_id: int | None = None
    chats_total: int = 0
    chats_succeeded: int = 0
    chats_failed: int = 0
    chats_changed: int = 0
    api_calls: int = 0
    retries: int = 0
    chats_skipped: int = 0
    # None: the database could not tell (the metric is left out); epoch 0: never succeeded.
    last_success_at: dt.datetime | None = None
    # [dingtalk] monthly_call_quota; None: not configured (the metric is left out).
    api_call_quota: int | None = None
    # This quota month's calls and where it is heading; None: the database could not tell.
    budget: MonthBudget | None = None


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def render_metrics(metrics: RunMetrics) -> str:
    """The Prometheus text exposition format (version 0.0.4) for ``metrics``."""
    lines: list[str] = []

    def gauge(name: str, help_text: str, samples: Sequence[tuple[str, float]]) -> None:
        lines.append(f"# HELP {METRIC_PREFIX}{name} {help_text}")
        lines.append(f"# TYPE {METRIC_PREFIX}{name} gauge")
        for labels, value in samples:
            lines.append(f"{METRIC_PREFIX}{name}{labels} {_number(value)}")

    gauge(
        "last_run_status",
        "Status of the last sync run: 1 for the status it ended with, 0 for the others.",
        [(f'{{status="{s}"}}', float(metrics.status == s)) for s in FINAL_STATUSES],
    )
    gauge(
        "last_run_exit_code",
        "Exit code of the last sync run (0 ok, 1 partial, 3 failed, 78 configuration).",
        [("", metrics.exit_code)],
    )
    if metrics.run_id is not None:
        gauge("last_run_id", "sync_runs.id of the last sync run.", [("", metrics.run_id)])
    gauge(
        "last_run_start_timestamp_seconds",
        "When the last sync run started, in seconds since the epoch.",
        [("", metrics.started_at.timestamp())],
    )
    gauge(
        "last_run_end_timestamp_seconds",
        "When the last sync run ended, in seconds since the epoch.",
        [("", metrics.finished_at.timestamp())],
    )
    gauge(
        "last_run_duration_seconds",
        "How long the last sync run took.",
        [("", metrics.duration_seconds)],
    )
    if metrics.last_success_at is not None:
        gauge(
            "last_success_timestamp_seconds",
            "When the last succeeded run (any process) finished, from sync_runs; 0 if none.",
            [("", metrics.last_success_at.timestamp())],
        )
    counts = [
        ("last_run_chats", "Chats the last sync run was asked to sync.", metrics.chats_total),
        ("last_run_chats_ok", "Chats the last sync run synced.", metrics.chats_succeeded),
        ("last_run_chats_failed", "Chats that failed in the last sync run.", metrics.chats_failed),
        (
            "last_run_chats_changed",
            "Chats whose state changed in the last sync run.",
            metrics.chats_changed,
        ),
        (
            "last_run_api_calls",
            "HTTP requests the last sync run sent (token calls and retries included).",
            metrics.api_calls,
        ),
        ("last_run_retries", "Requests the last sync run repeated.", metrics.retries),
        (
            "last_run_chats_skipped",
            "Chats of the synced set the last sync run did not read (not due, or deferred "
            "for the quota).",
            metrics.chats_skipped,
        ),
    ]
    for name, help_text, value in counts:
        gauge(name, help_text, [("", value)])
    if metrics.api_call_quota is not None:
        gauge(
            "api_call_quota",
            "API calls the organisation may make in a quota month ([dingtalk] monthly_call_quota).",
            [("", metrics.api_call_quota)],
        )
    month = metrics.budget
    if month is not None:
        gauge(
            "api_calls_month",
            "API calls made this quota month (every command, every machine), from api_calls.",
            [("", month.used)],
        )
        gauge(
            "api_calls_projected",
            "API calls expected by the end of this quota month: the schedule and the poll "
            "plan, else this month's pace.",
            [("", month.projection.calls)],
        )
        gauge(
            "api_quota_exhausted",
            "1 when DingTalk said 90020 (quota used up) this quota month, else 0.",
            [("", float(month.exhausted_at is not None))],
        )
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return repr(round(float(value), 6))


def write_metrics(path: Path, metrics: RunMetrics) -> None:
    """Write the metrics file; a failure is logged, never raised."""
    try:
        # The collector (node_exporter) usually runs as another user.
        write_text_atomic(path, render_metrics(metrics), mode=0o644)
    except OSError as exc:
        log.error("monitoring.metrics_failed", path=str(path), error=exc.strerror or str(exc))


def listener_metrics_path(metrics_path: Path) -> Path:
    """The listener's own file beside the runs' (``x.prom`` -> ``x-events.prom``): two
    processes replacing one file would each drop the other's metrics."""
    return metrics_path.with_name(f"{metrics_path.stem}-events{metrics_path.suffix}")


def render_listener_metrics(stats: Any) -> str:
    """The Prometheus text for a listener's ``ListenerStats``."""
    last_event = stats.last_event_at.timestamp() if stats.last_event_at is not None else 0
    samples = [
        (
            "events_connected",
            "gauge",
            "1 while the Stream connection is up, else 0.",
            stats.connected,
        ),
        ("events_received_total", "counter", "Group events received.", stats.events_received),
        (
            "events_ignored_total",
            "counter",
            "Frames and events ignored: unreadable, other types, invalid, unknown chats.",
            stats.events_ignored,
        ),
        (
            "events_last_event_timestamp_seconds",
            "gauge",
            "When the last event was received, in seconds since the epoch; 0 if none.",
            last_event,
        ),
        ("events_reconnects_total", "counter", "Connections opened again.", stats.reconnects),
    ]
    lines: list[str] = []
    for name, kind, help_text, value in samples:
        lines.append(f"# HELP {METRIC_PREFIX}{name} {help_text}")
        lines.append(f"# TYPE {METRIC_PREFIX}{name} {kind}")
        lines.append(f"{METRIC_PREFIX}{name} {_number(float(value))}")
    return "\n".join(lines) + "\n"


def listener_metrics_writer(config: Config) -> Any:
    """A callback that writes the listener's metrics file, or None without [monitoring]."""
    if config.metrics_path is None:
        return None
    path = listener_metrics_path(config.metrics_path)

    def write(stats: Any) -> None:
        try:
            write_text_atomic(path, render_listener_metrics(stats), mode=0o644)
        except OSError as exc:
            log.error("monitoring.metrics_failed", path=str(path), error=exc.strerror or str(exc))

    return write


def _from_database(
    config: Config, now: dt.datetime
) -> tuple[dt.datetime | None, MonthBudget | None]:
    """When the last succeeded run finished (epoch 0 if never) and this quota month's budget
    at ``now``; None for what the database cannot say."""
    last_success: dt.datetime | None = None
    budget: MonthBudget | None = None
    with open_database(config, read_only=True) as engine:
        try:
            row = RunLog(engine).latest_run(status="succeeded")
        except EtlError:
            pass
        else:
            finished = row["finished_at"] if row is not None else None
            last_success = finished if isinstance(finished, dt.datetime) else _EPOCH
        with contextlib.suppress(EtlError):
            budget = month_budget(config, engine, lambda: _planned_chats(config, engine), now)
    return last_success, budget


def _planned_chats(config: Config, engine: Engine) -> tuple[str, ...]:
    """The synced set the month's projection plans for.

    The configured chats with the discovered ones (``etl.eventstore.synced_chatids``). A command
    that loads the configuration without chatids (``status`` needs only ``[database]``) has
    the ``[sync] chatids`` list of the file; when a ``chatids_file`` completes it, or there
    is none, every chat the database knows is taken too.
    """
    chatids = config.chatids
    if not chatids:
        listed = (chatid.strip() for chatid in config.sync.chatids)
        chatids = tuple(dict.fromkeys(c for c in listed if check_chatid(c) is None))
        if config.sync.chatids_file is not None or not chatids:
            with database_errors("reading the known chats"), engine.connect() as conn:
                known = conn.execute(_KNOWN_CHATS).scalars().all()
            chatids = tuple(dict.fromkeys((*chatids, *known)))
    return synced_chatids(replace(config, chatids=chatids), engine)


_KNOWN_CHATS = select(chats.c.chatid).order_by(chats.c.chatid)


# -- one monitored run ---------------------------------------------------------------------


def monitored_sync(
    config: Config,
    *,
    chatids: Sequence[str] | None = None,
    all_chats: bool = False,
    trigger: str = "manual",
    migrate_schema: bool = False,
    stop: threading.Event | None = None,
) -> RunResult:
    """``run_sync`` with the configured pings before and after and the metrics file after.

    Raises what ``run_sync`` raises. A sync refused because another holds the lock (exit 75)
    sends no completion ping and leaves the metrics file alone: the holder reports its run.
    """
    from etl.sync import run_sync  # the status command, also here, needs none of it

    pinger = HealthPinger(config.monitoring.healthcheck_url)
    pinger.start()
    started_at = utcnow()
    try:
        result = run_sync(
            config,
            chatids=chatids,
            all_chats=all_chats,
            trigger=trigger,
            migrate_schema=migrate_schema,
            stop=stop,
        )
    except LockBusy:
        raise
    except Exception as exc:
        code = exit_code_for(exc)
        finished_at = utcnow()
        reason = describe_exception(exc)
        if config.metrics_path is not None:
            # A database that just failed is not asked again.
            last_success, budget = (
                (None, None)
                if isinstance(exc, DatabaseFailure)
                else _from_database(config, finished_at)
            )
            metrics = RunMetrics(
                status="failed",
                exit_code=code,
                trigger=trigger,
                started_at=started_at,
                finished_at=finished_at,
                duration_seconds=(finished_at - started_at).total_seconds(),
                chats_total=len(chatids) if chatids else len(config.chatids),
                last_success_at=last_success,
                api_call_quota=config.dingtalk.monthly_call_quota,
                budget=budget,
            )
            write_metrics(config.metrics_path, metrics)
        pinger.finish(code, f"exit {code}: {reason}\n")
        raise
    finished_at = utcnow()
    if config.metrics_path is not None:
        last_success, budget = _from_database(config, finished_at)
        if last_success is None and result.status == "succeeded":
            last_success = finished_at
        metrics = RunMetrics(
            status=result.status,
            exit_code=result.exit_code,
            trigger=trigger,
            started_at=started_at,
            finished_at=finished_at,
            duration_seconds=result.duration_seconds,
            run_id=result.run_id,
            chats_total=result.chats_total,
            chats_succeeded=result.chats_succeeded,
            chats_failed=result.chats_failed,
            chats_changed=result.chats_changed,
            api_calls=result.api_calls,
            retries=result.retries,
            chats_skipped=result.chats_skipped,
            last_success_at=last_success,
            api_call_quota=config.dingtalk.monthly_call_quota,
            budget=budget,
        )
        write_metrics(config.metrics_path, metrics)
    pinger.finish(result.exit_code, ping_body(result))
    return result


def ping_body(result: RunResult) -> str:
    """The summary line and the first failed chats, for the healthcheck's event log."""
    lines = [f"exit {result.exit_code}: {result.summary()}", *result.failure_lines()]
    return "\n".join(lines) + "\n"


# -- `status`: is the job healthy? ---------------------------------------------------------


@dataclass(frozen=True)
class Health:
    """The state of the runs as ``dingtalk-etl status`` reports it."""

    checked_at: dt.datetime
    max_age_seconds: int | None
    last_run: dict[str, Any] | None  # newest run that is not running
    running: dict[str, Any] | None  # a newer run still marked running
    last_success: dict[str, Any] | None
    failing_chats: list[dict[str, Any]] = field(default_factory=list)
    # The most recently active `listen` (event_listeners row), if any ever ran.
    listener: dict[str, Any] | None = None
    events_waiting: int = 0
    discovered_chats: int = 0
    # This quota month's API calls, the quota and the projection (``etl.budget``).
    budget: MonthBudget | None = None
    quota_timezone: str = "Asia/Shanghai"
    # --quota-warn: unhealthy when the projection passes this share of the quota, in percent.
    quota_warn_percent: float | None = None

    @property
    def listener_silence_seconds(self) -> float | None:
        """How long the listener has heard nothing (no frame); None without a listener."""
        if self.listener is None:
            return None
        heard: dt.datetime = self.listener["last_frame_at"] or self.listener["started_at"]
        return max(0.0, (self.checked_at - heard).total_seconds())

    @property
    def listener_silent(self) -> bool:
        silence = self.listener_silence_seconds
        limit = self.max_age_seconds
        return silence is not None and limit is not None and silence > limit

    @property
    def success_age_seconds(self) -> float | None:
        if self.last_success is None or self.last_success["finished_at"] is None:
            return None
        finished: dt.datetime = self.last_success["finished_at"]
        return max(0.0, (self.checked_at - finished).total_seconds())

    @property
    def runs_healthy(self) -> bool:
        """A success recorded (within ``max_age_seconds``), and no listener silent for longer."""
        age = self.success_age_seconds
        if age is None or self.listener_silent:
            return False
        return self.max_age_seconds is None or age <= self.max_age_seconds

    @property
    def quota_passed(self) -> bool:
        """What --quota-warn fails on: DingTalk said 90020 this month (whatever the quota
        configured), or the projection passes ``quota_warn_percent`` of the quota. Without a
        quota there is nothing to compare the projection with: that passes nothing."""
        month = self.budget
        if self.quota_warn_percent is None or month is None:
            return False
        if month.exhausted_at is not None:
            return True
        # In decimals, so that a projection of exactly the share (4,160 of 5,000 at 83.2%)
        # does not pass it by a binary rounding.
        share = decimal.Decimal(repr(self.quota_warn_percent))
        return month.quota is not None and month.projection.calls * 100 > share * month.quota

    @property
    def healthy(self) -> bool:
        return self.runs_healthy and not self.quota_passed

    @property
    def exit_code(self) -> int:
        return ExitCode.OK if self.healthy else ExitCode.UNHEALTHY

    def verdict(self) -> str:
        """The first line: what is wrong (STALE or QUOTA), else OK."""
        return self.verdicts()[0]

    def verdicts(self) -> list[str]:
        """The runs' verdict, and the quota's when --quota-warn fails: failures first."""
        runs = self._runs_verdict()
        quota = self.quota_verdict()
        if quota is None:
            return [runs]
        return [quota, runs] if self.runs_healthy else [runs, quota]

    def quota_verdict(self) -> str | None:
        """``QUOTA: ...`` when --quota-warn fails, else None."""
        month = self.budget
        if not self.quota_passed or month is None:
            return None
        if month.exhausted_at is not None:
            return (
                f"QUOTA: DingTalk said the month's API quota is used up (90020) at "
                f"{_when(month.exhausted_at)}; polling is paused until {_when(month.month.end)}"
            )
        assert month.quota is not None
        assert self.quota_warn_percent is not None
        return (
            f"QUOTA: projected {month.projection.calls:,} API calls this month, "
            f"{_percent(month.projection.calls, month.quota)}% of the quota of "
            f"{month.quota:,}, more than the allowed {self.quota_warn_percent:g}%"
        )

    def _runs_verdict(self) -> str:
        age = self.success_age_seconds
        if age is None or self.last_success is None:
            return "STALE: no successful run recorded"
        seen = f"last success {format_duration(age)} ago (run {self.last_success['id']})"
        if self.max_age_seconds is not None and age > self.max_age_seconds:
            return f"STALE: {seen}, more than the allowed {format_duration(self.max_age_seconds)}"
        silence = self.listener_silence_seconds
        if self.listener_silent and silence is not None and self.max_age_seconds is not None:
            return (
                f"STALE: the event listener has heard nothing for {format_duration(silence)}, "
                f"more than the allowed {format_duration(self.max_age_seconds)}"
            )
        return f"OK: {seen}"

    def lines(self) -> list[str]:
        lines = self.verdicts()
        if self.last_success is not None:
            lines.append(
                f"last success: run {self.last_success['id']}, finished "
                f"{_when(self.last_success['finished_at'])}"
            )
        else:
            lines.append("last success: none")
        run = self.last_run
        if run is None:
            lines.append("last run: none")
        else:
            lines.append(
                f"last run: run {run['id']} {run['status']} ({run['trigger']}), started "
                f"{_when(run['started_at'])}, finished {_when(run['finished_at'])}; "
                f"{run['chats_succeeded']} ok, {run['chats_failed']} failed of "
                f"{run['chats_total']} chats"
                + (f", {run['chats_skipped']} skipped" if run.get("chats_skipped") else "")
                + (f"; error: {run['error']}" if run["error"] else "")
            )
        if self.running is not None:
            lines.append(
                f"running now: run {self.running['id']} ({self.running['trigger']}), started "
                f"{_when(self.running['started_at'])} on {self.running['hostname']} "
                f"pid {self.running['pid']}"
            )
        if run is not None:
            if self.failing_chats:
                lines.append(f"failing chats in run {run['id']}: {len(self.failing_chats)}")
                for item in self.failing_chats:
                    error = (item["error"] or "").replace("\n", " ")
                    lines.append(f"  {item['chatid']}: {error[:200]}")
            else:
                lines.append(f"failing chats in run {run['id']}: none")
        lines.extend(self._listener_lines())
        lines.extend(self._budget_lines())
        return lines

    def _listener_lines(self) -> list[str]:
        listener = self.listener
        if listener is None:
            return []
        if listener["stopped_at"] is not None:
            state = f"stopped {_when(listener['stopped_at'])}"
        elif listener["connected"]:
            state = f"connected since {_when(listener['connected_since'])}"
        else:
            state = "not connected"
        silence = self.listener_silence_seconds
        heard = "-" if silence is None else f"{format_duration(silence)} ago"
        return [
            f"event listener: {state} ({listener['hostname']} pid {listener['pid']}); "
            f"last frame {heard}; last event {_when(listener['last_event_at'])}",
            f"events: {listener['events_received']} received, {listener['events_ignored']} "
            f"ignored, {self.events_waiting} waiting for their reconcile; "
            f"{listener['reconnects']} reconnects; {self.discovered_chats} chats discovered",
        ]

    def _budget_lines(self) -> list[str]:
        month = self.budget
        if month is None:
            return []
        zone = zoneinfo.ZoneInfo(self.quota_timezone)
        label = f"{month.month.start.astimezone(zone):%Y-%m}, {self.quota_timezone}"
        calls = month.projection.calls
        if month.quota is None:
            used, share = f"{month.used:,}, no quota set", ""
        else:
            used = f"{month.used:,} of the quota of {month.quota:,}"
            share = f", {_percent(calls, month.quota)}% of the quota"
        lines = [
            f"api calls this month ({label}): {used}; projected {calls:,} at the month's end"
            f"{share} (basis: {month.projection.basis})"
        ]
        if month.exhausted_at is not None:
            resets = f"{month.month.end.astimezone(zone):%Y-%m-%d %H:%M} {self.quota_timezone}"
            lines.append(
                f"quota used up: DingTalk said 90020 at {_when(month.exhausted_at)}; polling is "
                f"paused until the quota month resets at {_when(month.month.end)} ({resets})"
            )
        elif self.quota_warn_percent is not None and month.quota is None:
            lines.append(
                "quota check: no [dingtalk] monthly_call_quota set, nothing to check for "
                f"--quota-warn {self.quota_warn_percent:g}%"
            )
        return lines

    def as_json(self) -> dict[str, Any]:
        def row(value: dict[str, Any] | None) -> dict[str, Any] | None:
            return None if value is None else {k: plain(v) for k, v in value.items()}

        age = self.success_age_seconds
        return {
            "healthy": self.healthy,
            "exit_code": self.exit_code,
            "verdict": self.verdict(),
            "checked_at": self.checked_at.isoformat(),
            "max_age_seconds": self.max_age_seconds,
            "last_success_age_seconds": None if age is None else round(age, 3),
            "last_success": row(self.last_success),
            "last_run": row(self.last_run),
            "running": row(self.running),
            "failing_chats": [
                {k: item[k] for k in ("chatid", "errcode", "error", "attempts")}
                for item in self.failing_chats
            ],
            "listener": row(self.listener),
            "events_waiting": self.events_waiting,
            "discovered_chats": self.discovered_chats,
            **self._budget_json(),
        }

    def _budget_json(self) -> dict[str, Any]:
        month = self.budget
        if month is None:
            return dict.fromkeys(_BUDGET_KEYS)
        quota = month.quota
        share = None if quota is None else round(month.projection.calls * 100 / quota, 1)
        exhausted = month.exhausted_at
        return {
            "api_calls_this_month": month.used,
            "monthly_call_quota": quota,
            "projected_calls": month.projection.calls,
            "projection_basis": month.projection.basis,
            "projected_percent_of_quota": share,
            "quota_timezone": self.quota_timezone,
            "quota_month_started_at": month.month.start.isoformat(),
            "quota_month_resets_at": month.month.end.isoformat(),
            "quota_exhausted_at": None if exhausted is None else exhausted.isoformat(),
            "quota_warn_percent": self.quota_warn_percent,
            "quota_verdict": self.quota_verdict(),
        }


_BUDGET_KEYS: Final = (
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
)


def _when(value: object) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat(timespec="seconds")
    return "-"


def _percent(calls: int, quota: int) -> str:
    """``calls`` as a percentage of ``quota``, rounded up (a projection past a share never
    reads as that share): to a tenth below 100, whole from there."""
    tenths = -(-calls * 1000 // quota)
    if tenths >= 1000:
        return f"{-(-tenths // 10):,}"
    whole, tenth = divmod(tenths, 10)
    return f"{whole}.{tenth}" if tenth else f"{whole}"


def read_health(
    config: Config,
    *,
    max_age_seconds: int | None = None,
    quota_warn_percent: float | None = None,
    now: dt.datetime | None = None,
) -> Health:
    """Read the run log, the listener's row and the month's API budget. Raises
    ``SchemaNotMigrated`` and ``DatabaseFailure`` like the others."""
    checked_at = now or utcnow()
    with open_database(config, read_only=True) as engine:
        require_schema(engine, "reading runs")
        runlog = RunLog(engine)
        latest = runlog.latest_run()
        last_run = runlog.latest_run(finished=True)
        last_success = runlog.latest_run(status="succeeded")
        failing: list[dict[str, Any]] = []
        if last_run is not None:
            failing = runlog.run_items(last_run["id"], status="failed")
        listeners = ListenerLog(engine)
        listener = listeners.latest()
        waiting = listeners.waiting_events()
        discovered = len(EventStore(engine).discovered())
        budget = month_budget(config, engine, lambda: _planned_chats(config, engine), checked_at)
    running = latest if latest is not None and latest["status"] == "running" else None
    return Health(
        checked_at=checked_at,
        max_age_seconds=max_age_seconds,
        last_run=last_run,
        running=running,
        last_success=last_success,
        failing_chats=failing,
        listener=listener,
        events_waiting=waiting,
        discovered_chats=discovered,
        budget=budget,
        quota_timezone=config.dingtalk.quota_timezone,
        quota_warn_percent=quota_warn_percent,
    )
