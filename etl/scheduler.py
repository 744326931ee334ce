"""``dingtalk-etl schedule``: APScheduler 3's BlockingScheduler firing monitored syncs.

Sits on top of ``etl.monitoring`` (which wraps ``etl.sync``); takes a ``threading.Event`` that the
caller sets on SIGTERM/SIGINT and never touches signals or the command line itself.

One job, one worker thread: ``max_instances=1`` (a fire while the previous run goes on is
skipped and logged), ``coalesce=True`` (fires missed in a row run once) and the configured
``misfire_grace_time``. Nothing a run does can stop the scheduler: a refused lock, a database
that is down, a failed run or a bug in a run is logged and the next fire comes as planned.
Intervals are aligned to the UTC epoch, so instances on several machines fire together and the
database lock lets exactly one of them sync.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import subprocess
import sys
import threading
import time
import zoneinfo
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import structlog
from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    EVENT_SCHEDULER_STARTED,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.blocking import BlockingScheduler

from etl import budget
from etl.config import Config
from etl.db import open_database, require_schema, utcnow
from etl.errors import (
    ConfigError,
    DatabaseFailure,
    ExitCode,
    LockBusy,
    describe_exception,
    exit_code_for,
)
from etl.eventstore import synced_chatids
from etl.monitoring import monitored_sync
from etl.quota import quota_month
from etl.triggers import build_trigger, describe_trigger

log = structlog.get_logger("etl.scheduler")

JOB_ID: Final = "dingtalk-etl-sync"
# APScheduler's own log lines are replaced by the schedule.* events below.
_APSCHEDULER_LOGGER: Final = "apscheduler"


def run_schedule(config: Config, stop: threading.Event) -> None:
    """Fire syncs on the configured trigger until ``stop`` is set; return when the run in hand
    (told to stop: it finishes its chat and marks itself interrupted) is over.

    Raises ``ConfigError`` before starting (no trigger, schema not migrated).
    """
    SyncScheduler(config, stop).run()


class SyncScheduler:
    def __init__(self, config: Config, stop: threading.Event) -> None:
        self.config = config
        self.stop = stop
        self.trigger = build_trigger(config)
        # Held by the job while it runs; the main thread takes it before returning.
        self._running = threading.Lock()
        self._scheduler = BlockingScheduler(
            timezone=zoneinfo.ZoneInfo(config.schedule.timezone),
            logger=logging.getLogger(f"{_APSCHEDULER_LOGGER}.scheduler"),
            executors={"default": ThreadPoolExecutor(max_workers=1)},
        )

    def add_job(self) -> Any:
        """Schedule the sync job (before ``run``); returns APScheduler's ``Job``."""
        options: dict[str, Any] = {
            "id": JOB_ID,
            "name": "dingtalk-etl sync",
            "max_instances": 1,  # a fire while a run goes on is skipped (schedule.still_running)
            "coalesce": True,  # fires missed in a row run once
            "misfire_grace_time": self.config.schedule.misfire_grace_time,
            "replace_existing": True,
        }
        if self.config.schedule.run_on_start:
            options["next_run_time"] = utcnow()
        return self._scheduler.add_job(self._fire, self.trigger, **options)

    def run(self) -> None:
        _check_database(self.config)
        self.add_job()
        self._scheduler.add_listener(self._on_started, EVENT_SCHEDULER_STARTED)
        self._scheduler.add_listener(
            self._on_job_event, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES | EVENT_JOB_ERROR
        )
        if self.stop.is_set():
            return
        listener = ListenerProcess(self.config, self.stop) if self.config.events.enabled else None
        try:
            if listener is not None:
                listener.start()
            with _quiet_apscheduler():
                self._scheduler.start()  # blocks until _shutdown_on_stop shuts it down
                with self._running:  # the run in hand, if any, has finished
                    pass
        finally:
            if listener is not None:
                listener.join()
        log.info("schedule.stopped")

    # -- scheduler callbacks (APScheduler's threads) -----------------------------------------

    def _on_started(self, _event: Any) -> None:
        settings = self.config.schedule
        log.info(
            "schedule.started",
            trigger=describe_trigger(self.config),
            timezone=settings.timezone,
            jitter_seconds=settings.jitter_seconds,
            misfire_grace_time=settings.misfire_grace_time,
            run_on_start=settings.run_on_start,
            next_fire=_iso(self._next_fire()),
        )
        threading.Thread(target=self._shutdown_on_stop, name="schedule-stop", daemon=True).start()

    def _shutdown_on_stop(self) -> None:
        self.stop.wait()
        log.info("schedule.stopping", reason="signal")
        # wait=False: the run in hand may need the scheduler's locks to finish; run() waits
        # for it instead.
        self._scheduler.shutdown(wait=False)

    def _on_job_event(self, event: Any) -> None:
        if self.stop.is_set():
            return
        if event.code == EVENT_JOB_MISSED:
            log.warning(
                "schedule.missed",
                scheduled_for=_iso(event.scheduled_run_time),
                misfire_grace_time=self.config.schedule.misfire_grace_time,
            )
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            times = event.scheduled_run_times
            log.warning(
                "schedule.still_running",
                scheduled_for=_iso(times[-1] if times else None),
                reason="the previous run has not finished; this fire is skipped",
            )
        else:  # cannot happen: _fire catches everything
            log.error("schedule.run_failed", exit_code=ExitCode.FAILED, error=repr(event.exception))

    # -- one fire ---------------------------------------------------------------------------

    def _fire(self) -> None:
        with self._running:
            if self.stop.is_set():
                return
            try:
                self._sync_once()
            finally:
                if not self.stop.is_set():
                    log.info("schedule.next_fire", next_fire=_iso(self._next_fire()))

    def _sync_once(self) -> None:
        if self._quota_exhausted():
            return
        try:
            result = monitored_sync(self.config, trigger="schedule", stop=self.stop)
        except LockBusy:
            log.info(
                "schedule.skipped_locked",
                exit_code=ExitCode.LOCKED,
                reason="skipped, another instance holds the lock",
            )
        except Exception as exc:  # nothing a run does may stop the scheduler
            log.error(
                "schedule.run_failed",
                exit_code=exit_code_for(exc),
                run_id=None,
                status=None,
                error=describe_exception(exc),
                exc_info=not isinstance(exc, ConfigError | DatabaseFailure),
            )
        else:
            fields = {
                "exit_code": result.exit_code,
                "run_id": result.run_id,
                "status": result.status,
                "error": result.error,
            }
            if result.exit_code == ExitCode.FAILED:
                log.error("schedule.run_failed", **fields)
            elif result.exit_code == ExitCode.OK:
                log.info("schedule.run_done", **fields)
            else:
                log.warning("schedule.run_done", **fields)

    def _quota_exhausted(self) -> bool:
        """Whether DingTalk said 90020 this quota month: then no fire polls until the next."""
        now = utcnow()
        try:
            with open_database(self.config) as engine:
                exhausted_at = budget.exhausted(self.config, engine, now)
        except DatabaseFailure:
            return False  # the run says what is wrong with the database
        if exhausted_at is None:
            return False
        month = quota_month(now, self.config.dingtalk.quota_timezone)
        log.warning(
            "schedule.quota_exhausted",
            exhausted_at=exhausted_at.isoformat(),
            polls_again_at=month.end.isoformat(),
            reason="DingTalk said the month's API quota is used up (90020); this fire is skipped",
        )
        return True

    def _next_fire(self) -> dt.datetime | None:
        job = self._scheduler.get_job(JOB_ID)
        if job is None or job.next_run_time is None:
            return None
        when: dt.datetime = job.next_run_time
        return when


class ListenerProcess:
    """`dingtalk-etl listen` in a process of its own beside the scheduler ([events] enabled).

    Started with the same configuration file and environment; stderr is shared, so its log
    lines go where the scheduler's go. A listener that ends is started again after a pause
    that doubles up to ``RESTART_MAX_SECONDS`` (a refused credential will not fix itself, but
    an operator who fixes the file should not have to restart the service). On ``stop`` it
    gets SIGTERM, and SIGKILL if it has not ended ``STOP_TIMEOUT_SECONDS`` later.
    """

    RESTART_SECONDS: Final = 5.0
    RESTART_MAX_SECONDS: Final = 300.0
    STOP_TIMEOUT_SECONDS: Final = 30.0

    def __init__(self, config: Config, stop: threading.Event) -> None:
        self._args = [sys.executable, "-m", "etl", "--config", str(config.path), "listen"]
        self._stop = stop
        self._thread = threading.Thread(target=self._supervise, name="listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._stop.set()
        self._thread.join()

    def _supervise(self) -> None:
        pause = self.RESTART_SECONDS
        while not self._stop.is_set():
            started = time.monotonic()
            process = subprocess.Popen(self._args, stdin=subprocess.DEVNULL)
            log.info("schedule.listener_started", pid=process.pid)
            while process.poll() is None:
                if self._stop.wait(0.5):
                    self._terminate(process)
                    return
            if time.monotonic() - started > self.RESTART_MAX_SECONDS:
                pause = self.RESTART_SECONDS  # it had been running well: no penalty
            log.error(
                "schedule.listener_exited", exit_code=process.returncode, restart_in_seconds=pause
            )
            if self._stop.wait(pause):
                return
            pause = min(pause * 2, self.RESTART_MAX_SECONDS)

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self.STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.info("schedule.listener_stopped", exit_code=process.returncode)


def _check_database(config: Config) -> None:
    """Refuse to start on an unmigrated schema; a database that is down is only logged.

    Also says (``quota.projection_exceeds``) when the schedule cannot fit the monthly quota.
    """
    try:
        with open_database(config) as engine:
            require_schema(engine, "checking the schema")
            budget.warn_if_over(config, engine, synced_chatids(config, engine), utcnow())
    except DatabaseFailure as exc:
        log.warning("schedule.database_unreachable", error=exc.message)


@contextmanager
def _quiet_apscheduler() -> Iterator[None]:
    """APScheduler logs through the standard library; its lines are replaced by ours."""
    logger = logging.getLogger(_APSCHEDULER_LOGGER)
    handler = logging.NullHandler()
    saved = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = saved


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()
