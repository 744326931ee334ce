"""One sync run, read top to bottom: lock, run row, fetch stage -> writer stage -> outcome.

``run_sync`` opens the database, checks the schema and takes the lock; ``_run`` starts the
run's row, lets the fetch stage (``etl.fetch``: worker threads read and normalize chats) hand
its batches to the writer stage (``WriterStage``: one transaction per batch, counted on the
``RunResult``), asks the run's ``RunStop`` (``etl.stop``) why it stopped early, if it did,
and records the outcome. ``RunRecorder`` is the one place that touches the run's row.

Orchestrates the lower layers (client, normalize, store, lock, migrate) and knows none of
their internals.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

import structlog
from sqlalchemy import Engine

from etl import budget, migrate
from etl.budget import choose_chats
from etl.config import Config
from etl.db import database_errors, open_database, utcnow
from etl.dingtalk import DingTalkClient, Pacer
from etl.errors import EtlError, ExitCode, FatalError, LockBusy, QuotaExhausted
from etl.eventstore import synced_chatids
from etl.fetch import FetchStage
from etl.lock import OwnedLock, run_lock
from etl.polling import NextPoll
from etl.quota import QUOTA_EXHAUSTED, EndpointCalls, quota_month
from etl.runlog import RunLog
from etl.stop import RunStop, StopReason
from etl.store import ChatOutcome, Store

log = structlog.get_logger("etl.sync")

# A reconcile waits this long for a sync that holds the lock, trying every LOCK_POLL_SECONDS.
RECONCILE_LOCK_WAIT_SECONDS: Final = 60.0
LOCK_POLL_SECONDS: Final = 0.25
# How often the writer confirms it still holds the sync lock (one cheap query each time).
LOCK_CHECK_SECONDS: Final = 1.0
# Failed chats a summary names one by one; cron mails and health pings stay readable.
FAILURES_SHOWN: Final = 20


@dataclass(frozen=True)
class ChatFailure:
    chatid: str
    errcode: int | None
    error: str


@dataclass
class RunResult:
    """What a run did; ``exit_code`` follows the contract."""

    run_id: int | None
    status: str
    trigger: str
    chats_total: int
    chats_succeeded: int = 0
    chats_failed: int = 0
    chats_changed: int = 0
    api_calls: int = 0
    retries: int = 0
    duration_seconds: float = 0.0
    error: str | None = None
    failures: list[ChatFailure] = field(default_factory=list)
    # In the synced set, not read: not due, or deferred for the quota.
    chats_skipped: int = 0
    # DingTalk said 90020: the month's quota is used up.
    quota_exhausted: bool = False

    @property
    def exit_code(self) -> ExitCode:
        if self.status == "succeeded":
            return ExitCode.OK
        if self.status == "partial":
            return ExitCode.PARTIAL
        return ExitCode.FAILED

    def summary(self) -> str:
        skipped = f", {self.chats_skipped} not due" if self.chats_skipped else ""
        line = (
            f"run {self.run_id} {self.status}: {self.chats_succeeded} ok, "
            f"{self.chats_failed} failed, {self.chats_changed} changed of {self.chats_total} "
            f"chats{skipped}; {self.api_calls} api calls, {self.retries} retries; "
            f"{self.duration_seconds:.1f}s"
        )
        if self.error:
            line += f"; error: {self.error}"
        return line

    def failure_lines(self, limit: int = FAILURES_SHOWN) -> list[str]:
        """The first ``limit`` failed chats, a line each, then how many more there are."""
        lines = [f"failed {f.chatid}: {f.error}" for f in self.failures[:limit]]
        if len(self.failures) > limit:
            lines.append(f"... and {len(self.failures) - limit} more failed chats")
        return lines


def run_sync(
    config: Config,
    *,
    chatids: Sequence[str] | None = None,
    all_chats: bool = False,
    trigger: str = "manual",
    migrate_schema: bool = False,
    stop: threading.Event | None = None,
) -> RunResult:
    """Run one sync over ``chatids``, else (``all_chats``) the whole synced set, else the
    chats of the synced set that are due (``etl.budget.choose_chats``: the poll plan and the
    monthly quota decide).

    Raises ``ConfigError`` (schema not migrated), ``LockBusy`` and ``DatabaseFailure`` before a
    run row exists; once the run has started, problems are recorded on it and returned.
    """
    with open_database(config) as engine:
        with database_errors("connecting to the database"):
            if migrate_schema:
                migrate.upgrade(engine)
            else:
                migrate.check_schema(engine)
        with (
            database_errors("taking the sync lock"),
            run_lock(engine) as lock,
            Store(engine) as store,
        ):
            started_at = utcnow()
            if chatids:
                wanted, skipped = tuple(dict.fromkeys(chatids)), 0
            else:
                synced = synced_chatids(config, engine)
                budget.warn_if_over(config, engine, synced, started_at)
                if all_chats:
                    wanted, skipped = synced, 0
                else:
                    selection = choose_chats(config, engine, synced, started_at)
                    wanted, skipped = selection.due, len(selection.skipped)
            return _run(config, store, lock, _Chats(wanted, skipped, started_at), trigger, stop)


@dataclass(frozen=True)
class _Chats:
    """What a run reads, how many of the synced set it leaves, and when it started."""

    wanted: tuple[str, ...]
    skipped: int
    started_at: dt.datetime


def _run(
    config: Config,
    store: Store,
    lock: OwnedLock,
    chats: _Chats,
    trigger: str,
    signal: threading.Event | None,
) -> RunResult:
    """One run, the lock held: its row, fetch stage -> writer stage, why it stopped, outcome."""
    started = time.monotonic()
    chatids = chats.wanted
    recorder = RunRecorder(RunLog(store.engine))
    total, skipped = len(chatids), chats.skipped
    with _recorded_run(config, recorder, trigger, total, skipped, chats.started_at) as result:
        stop = RunStop(signal, config.sync.run_budget_seconds)
        with _client(config, stop.halt) as client:
            if chatids:
                fetch = FetchStage(client, chatids, config.sync.concurrency, stop)
                writer = WriterStage(
                    store, lock, result, client, _next_poll(config, chats.started_at)
                )
                with stop.watching():
                    _fetch_and_write(fetch, writer, stop)
                reason = _stop_reason(stop, writer, result)
            else:
                reason = None  # nothing is due: no token, no call
            _settle(result, reason, client, started)
            recorder.finish(result, client.take_calls())
        return result


@contextmanager
def _recorded_run(
    config: Config,
    recorder: RunRecorder,
    trigger: str,
    chats_total: int,
    chats_skipped: int,
    started_at: dt.datetime,
) -> Iterator[RunResult]:
    """The run's row written (dead runs marked abandoned) and ``run.started`` logged; the
    block runs with the run's id bound to every log event."""
    run_id, abandoned = recorder.start(trigger, chats_total, chats_skipped, started_at)
    result = RunResult(
        run_id=run_id,
        status="running",
        trigger=trigger,
        chats_total=chats_total,
        chats_skipped=chats_skipped,
    )
    with structlog.contextvars.bound_contextvars(run_id=run_id):
        if abandoned:
            log.warning("run.abandoned_marked", count=abandoned)
        log.info(
            "run.started",
            trigger=trigger,
            chats_total=chats_total,
            chats_skipped=chats_skipped,
            concurrency=config.sync.concurrency,
        )
        yield result


def _next_poll(config: Config, started_at: dt.datetime) -> NextPoll | None:
    """How a run sets the poll plan of what it reads (adaptive polling only: with every_run
    the plan is not used, and an unchanged chat's write stays one shared update)."""
    settings = config.sync
    if settings.polling != "adaptive":
        return None
    return NextPoll(started_at, settings.poll_interval_seconds, settings.max_poll_interval_seconds)


def _fetch_and_write(fetch: FetchStage, writer: WriterStage, stop: RunStop) -> None:
    """Hand each batch the fetch stage yields to the writer until the chats or the run end."""
    with contextlib.closing(fetch.batches()) as batches:
        _write(batches, writer, stop)


def _write(batches: Iterable[list[ChatOutcome]], writer: WriterStage, stop: RunStop) -> None:
    try:
        for batch in batches:
            writer.write(batch)
    except FatalError as exc:  # the database failed, or the lock was lost, while writing
        # Before the fetch stage closes: its workers must stop rather than finish.
        stop.write_failed(exc)


def _stop_reason(stop: RunStop, writer: WriterStage, result: RunResult) -> StopReason | None:
    """Why the run stopped early; else, whether the lock was lost after the last check."""
    finished = result.chats_succeeded + result.chats_failed
    reason = stop.reason(unfinished=finished < result.chats_total)
    if reason is not None:
        return reason
    try:
        writer.verify_lock()  # the last writes may be younger than the last check
    except FatalError as exc:
        return StopReason.of(exc)
    return None


def _settle(
    result: RunResult,
    reason: StopReason | None,
    client: DingTalkClient,
    started: float,
    counted: tuple[int, int] = (0, 0),
) -> None:
    """The run's outcome: an interrupted run keeps what it synced, a fatal error fails it.

    ``counted``: the client's calls and retries before the run (a client serves many runs).
    """
    result.api_calls = client.api_calls - counted[0]
    result.retries = client.retries - counted[1]
    result.duration_seconds = time.monotonic() - started
    result.quota_exhausted = reason is not None and reason.errcode == QUOTA_EXHAUSTED
    if reason is None:
        result.status = "partial" if result.chats_failed else "succeeded"
        return
    result.status = "partial" if reason.interrupted and result.chats_succeeded else "failed"
    result.error = reason.message


@contextmanager
def _client(config: Config, halt: threading.Event) -> Iterator[DingTalkClient]:
    """The run's DingTalk client, paced; ``halt`` stops its waits for a slot or a retry."""
    client = _new_client(config, halt)
    try:
        yield client
    finally:
        client.close()


def _new_client(config: Config, halt: threading.Event) -> DingTalkClient:
    settings = config.dingtalk
    return DingTalkClient(
        settings.base_url,
        config.app_key,
        config.app_secret,
        pacer=Pacer(settings.max_requests_per_second, stop=halt),
        timeout=settings.timeout_seconds,
        max_attempts=settings.max_attempts,
        max_response_bytes=settings.max_response_bytes,
    )


class WriterStage:
    """Writes the fetched chats, one transaction per batch, and counts them on the result.

    Before a batch, at most once per ``LOCK_CHECK_SECONDS``, it confirms the run still holds
    the sync lock: a server-side lock ends with its session, which can die while we go on.
    """

    def __init__(
        self,
        store: Store,
        lock: OwnedLock,
        result: RunResult,
        client: DingTalkClient,
        next_poll: NextPoll | None = None,
    ) -> None:
        assert result.run_id is not None
        self._run_id = result.run_id
        self._store = store
        self._lock = lock
        self._lock_checked = time.monotonic()
        self._result = result
        self._client = client
        self._next_poll = next_poll

    def write(self, batch: list[ChatOutcome]) -> None:
        """Write ``batch``, and count the API calls made since the last one, in one
        transaction; raise ``FatalError`` if the database fails or the lock is gone."""
        if time.monotonic() - self._lock_checked >= LOCK_CHECK_SECONDS:
            self.verify_lock()
        changes = self._store.write_chats(
            self._run_id,
            batch,
            calls=self._client.take_calls(),
            source=self._result.trigger,
            next_poll=self._next_poll,
        )
        for outcome, changed in zip(batch, changes, strict=True):
            if outcome.record is not None:
                self._result.chats_succeeded += 1
                self._result.chats_changed += int(changed)
            else:
                self._failed(outcome)

    def verify_lock(self) -> None:
        self._lock.verify()
        self._lock_checked = time.monotonic()

    def _failed(self, outcome: ChatOutcome) -> None:
        assert outcome.error is not None
        self._result.chats_failed += 1
        failure = ChatFailure(outcome.chatid, outcome.errcode, outcome.error)
        self._result.failures.append(failure)
        log.warning(
            "chat.failed",
            chatid=outcome.chatid,
            errcode=outcome.errcode,
            http_status=outcome.http_status,
            attempts=outcome.attempts,
            error=outcome.error,
        )


class RunRecorder:
    """The run's row in ``sync_runs``: the one place that starts and finishes it."""

    def __init__(self, runlog: RunLog) -> None:
        self._runlog = runlog

    def start(
        self,
        trigger: str,
        chats_total: int,
        chats_skipped: int = 0,
        at: dt.datetime | None = None,
    ) -> tuple[int, int]:
        """Insert the run's row (started ``at``, default now); return its id and how many
        dead runs were marked abandoned."""
        return self._runlog.start_run(
            trigger, chats_total, now=at or utcnow(), chats_skipped=chats_skipped
        )

    def finish(self, result: RunResult, calls: Sequence[EndpointCalls] = ()) -> None:
        """Record the outcome on the run's row with the ``calls`` no batch counted, and log it."""
        assert result.run_id is not None
        try:
            self._runlog.finish_run(
                result.run_id,
                {
                    "finished_at": utcnow(),
                    "status": result.status,
                    "chats_succeeded": result.chats_succeeded,
                    "chats_failed": result.chats_failed,
                    "chats_changed": result.chats_changed,
                    "api_calls": result.api_calls,
                    "retries": result.retries,
                    "error": result.error,
                },
                calls=calls,
                source=result.trigger,
                quota_exhausted=result.error if result.quota_exhausted else None,
            )
        except EtlError as exc:
            # The database is gone: the row stays "running" and the next run marks it
            # abandoned. Say so rather than hide it.
            result.status = "failed"
            result.error = f"{result.error or 'run finished'}; and {exc.message}"
            log.error("run.finish_not_recorded", error=exc.message)
        _log_finished(result)
        if result.quota_exhausted:
            log.error("quota.exhausted", error=result.error)


def _log_finished(result: RunResult) -> None:
    log.info(
        "run.finished",
        status=result.status,
        chats_total=result.chats_total,
        chats_succeeded=result.chats_succeeded,
        chats_failed=result.chats_failed,
        chats_changed=result.chats_changed,
        chats_skipped=result.chats_skipped,
        api_calls=result.api_calls,
        retries=result.retries,
        duration_seconds=round(result.duration_seconds, 3),
        error=result.error,
    )


def reconcile(
    config: Config, chatids: Sequence[str], *, stop: threading.Event | None = None
) -> RunResult:
    """Re-read chats that received events: a run with trigger 'event' (``etl.listener``).

    Opens the database and checks its schema for this one run; ``ReconcileRuns`` keeps both,
    and the client, for the runs of a listener. Raises what ``ReconcileRuns`` raises.
    """
    with open_database(config) as engine:
        with database_errors("connecting to the database"):
            migrate.check_schema(engine)
        with contextlib.closing(ReconcileRuns(config, engine, stop)) as runs:
            return runs(chatids)


class ReconcileRuns:
    """The reconcile runs of one listener, on its engine (whose schema it has checked), with
    one client for all of them: its token is kept, and the statements SQLAlchemy compiled for
    one run serve the next (a new engine per run cost more CPU than the run's own work).

    Each call fetches the chats first, without the lock; the lock is held only while the
    run's rows are written, so that `sync` and `schedule` run beside `listen`. Waits up to
    ``RECONCILE_LOCK_WAIT_SECONDS`` for a sync that holds the lock, then raises ``LockBusy``
    (the events wait in the database for the next try); raises what ``run_sync`` raises.
    """

    def __init__(self, config: Config, engine: Engine, stop: threading.Event | None) -> None:
        self._config = config
        self._engine = engine
        self._stop = stop if stop is not None else threading.Event()
        self._client = _new_client(config, self._stop)

    def __call__(self, chatids: Sequence[str]) -> RunResult:
        """One reconcile run; raises ``QuotaExhausted`` (no call) after a 90020 this month."""
        config, engine, client = self._config, self._engine, self._client
        _refuse_when_exhausted(config, engine)
        wanted = tuple(dict.fromkeys(chatids))
        started, started_at = time.monotonic(), utcnow()
        counted = (client.api_calls, client.retries)
        run_stop = RunStop(self._stop, config.sync.run_budget_seconds)
        fetch = FetchStage(client, wanted, config.sync.concurrency, run_stop)
        with run_stop.watching(), contextlib.closing(fetch.batches()) as batches:
            fetched = list(batches)
        with (
            database_errors("taking the sync lock"),
            _waiting_lock(engine, run_stop.halt) as lock,
            Store(engine) as store,
        ):
            recorder = RunRecorder(RunLog(engine))
            with _recorded_run(config, recorder, "event", len(wanted), 0, started_at) as result:
                writer = WriterStage(store, lock, result, client, _next_poll(config, started_at))
                _write(fetched, writer, run_stop)
                _settle(result, _stop_reason(run_stop, writer, result), client, started, counted)
                recorder.finish(result, client.take_calls())
            return result

    def close(self) -> None:
        self._client.close()


def _refuse_when_exhausted(config: Config, engine: Engine) -> None:
    now = utcnow()
    exhausted_at = budget.exhausted(config, engine, now)
    if exhausted_at is not None:
        month = quota_month(now, config.dingtalk.quota_timezone)
        raise QuotaExhausted(
            f"DingTalk said the month's API quota is used up (90020) at "
            f"{exhausted_at.isoformat()}; no call until {month.end.isoformat()}",
            resets_at=month.end,
        )


@contextmanager
def _waiting_lock(engine: Engine, halt: threading.Event) -> Iterator[OwnedLock]:
    """The sync lock, waited for up to ``RECONCILE_LOCK_WAIT_SECONDS`` (a sync's run is short)."""
    deadline = time.monotonic() + RECONCILE_LOCK_WAIT_SECONDS
    with contextlib.ExitStack() as held:
        while True:
            try:
                lock = held.enter_context(run_lock(engine))
                break
            except LockBusy:
                if time.monotonic() >= deadline or halt.wait(LOCK_POLL_SECONDS):
                    raise
        yield lock
