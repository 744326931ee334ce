"""One sync run: lock, run row, concurrent fetches, a single writer, the run's outcome.

Orchestrates the lower layers (client, normalize, store, lock, migrate) and knows none of
their internals. Fetch workers (``[sync] concurrency``) call the API and normalize; this
thread writes what they fetched in batches (one transaction for the chats it has in hand), so
fetching and writing overlap and at most ``16 x concurrency`` fetched chats wait in memory
whatever the number of chats. A fatal error stops new calls at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final

import structlog

from etl import migrate
from etl.config import Config
from etl.db import database_errors, open_database, utcnow
from etl.dingtalk import CallCounter, DingTalkClient, Pacer
from etl.errors import ChatError, EtlError, ExitCode, FatalError, RunInterrupted
from etl.lock import OwnedLock, run_lock
from etl.normalize import ChatRecord, normalize_chat
from etl.store import ChatOutcome, Store

log = structlog.get_logger("etl.sync")

# How often the writer confirms it still holds the sync lock (one cheap query each time).
LOCK_CHECK_SECONDS: Final = 1.0
# How long the writer waits for more fetched chats to share one transaction with.
WRITE_LINGER_SECONDS: Final = 0.2
# Chats in flight or fetched and waiting, per worker: enough that the workers keep fetching
# while the writer writes a batch of half as many. Big batches matter: every statement makes
# the writer give up the interpreter lock and wait for it behind busy fetch workers.
WINDOW_PER_WORKER: Final = 16
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

    @property
    def exit_code(self) -> ExitCode:
        if self.status == "succeeded":
            return ExitCode.OK
        if self.status == "partial":
            return ExitCode.PARTIAL
        return ExitCode.FAILED

    def summary(self) -> str:
        line = (
            f"run {self.run_id} {self.status}: {self.chats_succeeded} ok, "
            f"{self.chats_failed} failed, {self.chats_changed} changed of {self.chats_total} "
            f"chats; {self.api_calls} api calls, {self.retries} retries; "
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


@dataclass
class _Fetched:
    chatid: str
    attempts: int
    duration_ms: int
    observed_at: dt.datetime
    record: ChatRecord | None = None
    error: ChatError | None = None


def run_sync(
    config: Config,
    *,
    chatids: Sequence[str] | None = None,
    trigger: str = "manual",
    migrate_schema: bool = False,
    stop: threading.Event | None = None,
) -> RunResult:
    """Run one sync over ``chatids`` (default: the configured ones).

    Raises ``ConfigError`` (schema not migrated), ``LockBusy`` and ``DatabaseFailure`` before a
    run row exists; once the run has started, problems are recorded on it and returned.
    """
    wanted = tuple(dict.fromkeys(chatids)) if chatids else config.chatids
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
            return _Run(config, store, wanted, trigger, stop, lock).execute()


class _Run:
    def __init__(
        self,
        config: Config,
        store: Store,
        chatids: tuple[str, ...],
        trigger: str,
        stop: threading.Event | None,
        lock: OwnedLock | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.lock = lock or OwnedLock()
        self.lock_checked = time.monotonic()
        self.chatids = chatids
        self.external_stop = stop or threading.Event()
        # Set by us on a fatal error, or relayed from the caller's stop (signal).
        self.halt = threading.Event()
        # The reason, once the [sync] run_budget_seconds has run out.
        self.out_of_time: str | None = None
        self.result = RunResult(
            run_id=None, status="running", trigger=trigger, chats_total=len(chatids)
        )
        settings = config.dingtalk
        self.pacer = Pacer(settings.max_requests_per_second, stop=self.halt)
        self.client = DingTalkClient(
            settings.base_url,
            config.app_key,
            config.app_secret,
            pacer=self.pacer,
            timeout=settings.timeout_seconds,
            max_attempts=settings.max_attempts,
            max_response_bytes=settings.max_response_bytes,
        )

    def execute(self) -> RunResult:
        started = time.monotonic()
        run_id, abandoned = self.store.start_run(
            self.result.trigger, len(self.chatids), now=utcnow()
        )
        self.result.run_id = run_id
        tokens = structlog.contextvars.bind_contextvars(run_id=run_id)
        try:
            if abandoned:
                log.warning("run.abandoned_marked", count=abandoned)
            log.info(
                "run.started",
                trigger=self.result.trigger,
                chats_total=len(self.chatids),
                concurrency=self.config.sync.concurrency,
            )
            fatal = self._fetch_and_write()
            if fatal is None:
                try:
                    self.lock.verify()  # the last writes may be younger than the last check
                except FatalError as exc:
                    fatal = exc
            self._finish(fatal, started)
            return self.result
        finally:
            self.client.close()
            structlog.contextvars.reset_contextvars(**tokens)

    # -- the pipeline ------------------------------------------------------------------------

    def _fetch_and_write(self) -> FatalError | None:
        watcher = threading.Thread(target=self._relay_stop, daemon=True)
        watcher.start()
        fatal: FatalError | None = None
        concurrency = self.config.sync.concurrency
        pending: set[Future[_Fetched]] = set()
        todo = iter(self.chatids)
        with ThreadPoolExecutor(concurrency, thread_name_prefix="fetch") as pool:
            try:
                window = concurrency * WINDOW_PER_WORKER
                batch_size = window // 2
                for batch in self._completed(pool, todo, pending, window, batch_size):
                    ready: list[_Fetched] = []
                    for done in batch:
                        try:
                            fetched = done.result()
                        except FatalError as exc:
                            # Workers stopped by the halt report RunInterrupted; keep the cause.
                            if fatal is None or isinstance(fatal, RunInterrupted):
                                fatal = exc
                            self.halt.set()
                            continue
                        if fatal is not None and fetched.record is None:
                            continue
                        ready.append(fetched)
                    if ready:
                        self._write(ready)
            except FatalError as exc:  # a database failure while writing
                fatal = exc
                self.halt.set()
            finally:
                for future in pending:
                    future.cancel()
        self.halt.set()
        watcher.join(timeout=1)
        if self.external_stop.is_set() and (fatal is None or isinstance(fatal, RunInterrupted)):
            # Workers report where they noticed the stop; the run's reason is the stop itself.
            fatal = RunInterrupted("interrupted")
        elif self.out_of_time is not None and (fatal is None or isinstance(fatal, RunInterrupted)):
            finished = self.result.chats_succeeded + self.result.chats_failed
            # The budget may run out while the last chat is written: that is no reason.
            if finished < len(self.chatids):
                fatal = RunInterrupted(self.out_of_time)
        return fatal

    def _completed(
        self,
        pool: ThreadPoolExecutor,
        todo: Iterator[str],
        pending: set[Future[_Fetched]],
        window: int,
        batch_size: int,
    ) -> Iterator[list[Future[_Fetched]]]:
        """Keep fetches in flight; yield the completed ones in batches for the writer.

        A batch is what completes within ``WRITE_LINGER_SECONDS`` of its first fetch, at most
        ``batch_size``: the writer commits a batch in one transaction, which costs about what
        one chat's did. Fetches in flight plus fetched chats waiting stay within ``window``.
        """
        # Completed fetches arrive through a queue: wait() would scan every pending future
        # for each completion.
        completed: queue.SimpleQueue[Future[_Fetched]] = queue.SimpleQueue()
        batch: list[Future[_Fetched]] = []
        deadline = 0.0
        while True:
            while len(pending) + len(batch) < window and not self.halt.is_set():
                chatid = next(todo, None)
                if chatid is None:
                    break
                # Each task gets its own copy: one Context cannot run in two threads at once.
                ctx = contextvars.copy_context()
                future = pool.submit(ctx.run, self._fetch, chatid)
                pending.add(future)
                future.add_done_callback(completed.put)
            if not pending:
                if batch:
                    yield batch
                return
            timeout = max(0.0, deadline - time.monotonic()) if batch else None
            done: list[Future[_Fetched]] = []
            with contextlib.suppress(queue.Empty):
                done.append(completed.get(timeout=timeout))
                while True:
                    done.append(completed.get_nowait())
            for future in done:
                pending.discard(future)
                if not future.cancelled():
                    if not batch:
                        deadline = time.monotonic() + WRITE_LINGER_SECONDS
                    batch.append(future)
            if batch and (
                len(batch) >= batch_size or time.monotonic() >= deadline or self.halt.is_set()
            ):
                yield batch
                batch = []

    def _fetch(self, chatid: str) -> _Fetched:
        counter = CallCounter()
        started = time.monotonic()
        record: ChatRecord | None = None
        error: ChatError | None = None
        try:
            chat_info = self.client.get_chat(chatid, counter)
            record = normalize_chat(chatid, chat_info)
        except ChatError as exc:
            error = exc
        except FatalError:
            # Stop the other workers before they start another request, not when the
            # writer gets round to reading this result.
            self.halt.set()
            raise
        return _Fetched(
            chatid=chatid,
            attempts=counter.attempts,
            duration_ms=int((time.monotonic() - started) * 1000),
            observed_at=utcnow(),
            record=record,
            error=error,
        )

    def _write(self, ready: list[_Fetched]) -> None:
        run_id = self.result.run_id
        assert run_id is not None
        if time.monotonic() - self.lock_checked >= LOCK_CHECK_SECONDS:
            # A server-side lock ends with its session, which can die while we go on.
            self.lock.verify()
            self.lock_checked = time.monotonic()
        outcomes = [
            ChatOutcome(
                fetched.chatid,
                fetched.observed_at,
                fetched.attempts,
                fetched.duration_ms,
                fetched.record,
                fetched.error.errcode if fetched.error is not None else None,
                fetched.error.message if fetched.error is not None else None,
            )
            for fetched in ready
        ]
        changes = self.store.write_chats(run_id, outcomes)
        for fetched, changed in zip(ready, changes, strict=True):
            if fetched.record is not None:
                self.result.chats_succeeded += 1
                self.result.chats_changed += int(changed)
            else:
                self._failed(fetched)

    def _failed(self, fetched: _Fetched) -> None:
        assert fetched.error is not None
        error = fetched.error
        self.result.chats_failed += 1
        self.result.failures.append(ChatFailure(fetched.chatid, error.errcode, error.message))
        log.warning(
            "chat.failed",
            chatid=fetched.chatid,
            errcode=error.errcode,
            http_status=error.http_status,
            attempts=fetched.attempts,
            error=error.message,
        )

    def _relay_stop(self) -> None:
        budget = self.config.sync.run_budget_seconds
        deadline = None if budget is None else time.monotonic() + budget
        while not self.halt.is_set():
            if self.external_stop.wait(0.1):
                log.warning("run.stopping", reason="interrupted")
                self.halt.set()
                return
            if deadline is not None and time.monotonic() >= deadline:
                # Same path as a signal: no new chat starts, the ones in hand are written.
                self.out_of_time = f"time budget of {budget:g} s exceeded"
                log.warning("run.stopping", reason=self.out_of_time)
                self.halt.set()
                return

    # -- the end -------------------------------------------------------------------------------

    def _finish(self, fatal: FatalError | None, started: float) -> None:
        result = self.result
        result.api_calls = self.client.api_calls
        result.retries = self.client.retries
        result.duration_seconds = time.monotonic() - started
        if fatal is not None:
            interrupted = isinstance(fatal, RunInterrupted)
            result.status = "partial" if interrupted and result.chats_succeeded else "failed"
            result.error = fatal.message
        elif result.chats_failed:
            result.status = "partial"
        else:
            result.status = "succeeded"
        assert result.run_id is not None
        try:
            self.store.finish_run(
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
            )
        except EtlError as exc:
            # The database is gone: the row stays "running" and the next run marks it
            # abandoned. Say so rather than hide it.
            result.status = "failed"
            result.error = f"{result.error or 'run finished'}; and {exc.message}"
            log.error("run.finish_not_recorded", error=exc.message)
        log.info(
            "run.finished",
            status=result.status,
            chats_total=result.chats_total,
            chats_succeeded=result.chats_succeeded,
            chats_failed=result.chats_failed,
            chats_changed=result.chats_changed,
            api_calls=result.api_calls,
            retries=result.retries,
            duration_seconds=round(result.duration_seconds, 3),
            error=result.error,
        )
