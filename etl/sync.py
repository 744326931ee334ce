"""One sync run: lock, run row, concurrent fetches, a single writer, the run's outcome.

Orchestrates the lower layers (client, normalize, store, lock, migrate) and knows none of
their internals. Fetch workers (``[sync] concurrency``) call the API and normalize; this
thread writes, so fetching and writing overlap and at most ``2 x concurrency`` fetched chats
wait in memory whatever the number of chats. A fatal error stops new calls at once.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Final

import structlog

from etl import migrate
from etl.config import Config
from etl.dingtalk import CallCounter, DingTalkClient, Pacer
from etl.errors import ChatError, EtlError, FatalError, RunInterrupted
from etl.lock import run_lock
from etl.normalize import ChatRecord, normalize_chat
from etl.store import Store, create_db_engine, database_errors, utcnow

log = structlog.get_logger("etl.sync")

EXIT_OK: Final = 0
EXIT_PARTIAL: Final = 1
EXIT_USAGE: Final = 2
EXIT_FAILED: Final = 3
EXIT_LOCKED: Final = 75
EXIT_CONFIG: Final = 78


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
    def exit_code(self) -> int:
        if self.status == "succeeded":
            return EXIT_OK
        if self.status == "partial":
            return EXIT_PARTIAL
        return EXIT_FAILED

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

    Raises ``ConfigError`` (schema not migrated), ``LockHeld`` and ``DatabaseError`` before a
    run row exists; once the run has started, problems are recorded on it and returned.
    """
    wanted = tuple(dict.fromkeys(chatids)) if chatids else config.chatids
    engine = create_db_engine(config.database_url)
    try:
        with database_errors("connecting to the database"):
            if migrate_schema:
                migrate.upgrade(engine)
            else:
                migrate.check_schema(engine)
        with database_errors("taking the sync lock"), run_lock(engine):
            return _Run(config, Store(engine), wanted, trigger, stop).execute()
    finally:
        engine.dispose()


class _Run:
    def __init__(
        self,
        config: Config,
        store: Store,
        chatids: tuple[str, ...],
        trigger: str,
        stop: threading.Event | None,
    ) -> None:
        self.config = config
        self.store = store
        self.chatids = chatids
        self.external_stop = stop or threading.Event()
        # Set by us on a fatal error, or relayed from the caller's stop (signal).
        self.halt = threading.Event()
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
                for done in self._completed(pool, todo, pending, concurrency * 2):
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
                    self._write(fetched)
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
        return fatal

    def _completed(
        self,
        pool: ThreadPoolExecutor,
        todo: Iterator[str],
        pending: set[Future[_Fetched]],
        window: int,
    ) -> Iterator[Future[_Fetched]]:
        """Keep ``window`` fetches in flight; yield each as it completes."""
        while True:
            while len(pending) < window and not self.halt.is_set():
                chatid = next(todo, None)
                if chatid is None:
                    break
                # Each task gets its own copy: one Context cannot run in two threads at once.
                ctx = contextvars.copy_context()
                pending.add(pool.submit(ctx.run, self._fetch, chatid))
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                pending.discard(future)
                if not future.cancelled():
                    yield future

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

    def _write(self, fetched: _Fetched) -> None:
        run_id = self.result.run_id
        assert run_id is not None
        if fetched.record is not None:
            changed = self.store.apply_chat(
                run_id,
                fetched.record,
                observed_at=fetched.observed_at,
                attempts=fetched.attempts,
                duration_ms=fetched.duration_ms,
            )
            self.result.chats_succeeded += 1
            self.result.chats_changed += int(changed)
            return
        assert fetched.error is not None
        error = fetched.error
        self.store.record_failure(
            run_id,
            fetched.chatid,
            attempts=fetched.attempts,
            errcode=error.errcode,
            error=error.message,
            duration_ms=fetched.duration_ms,
        )
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
        while not self.halt.is_set():
            if self.external_stop.wait(0.1):
                log.warning("run.stopping", reason="interrupted")
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
