"""The fetch stage of a run: chats read and normalized on worker threads, handed on in batches.

``FetchStage.batches`` yields lists of ``ChatOutcome`` (the record the store writes): each
chat's normalized record, or the chat error its fetch ended in. Workers (``[sync]
concurrency``) call ``chat/get`` and normalize; whoever iterates writes what they fetched, so
fetching and writing overlap, and fetches in flight plus fetched chats not yet handed on stay
within a window of ``16 x concurrency`` whatever the number of chats.

Knows the DingTalk client, ``normalize`` and the run's ``RunStop`` only: no database. A fatal
error stops new calls at once (the worker reports it to the ``RunStop``, whose ``halt`` the
pacer and this stage watch); so does a signal or the time budget.
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import time
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

from etl.db import utcnow
from etl.dingtalk import CallCounter, DingTalkClient
from etl.errors import ChatError, FatalError, RunInterrupted
from etl.normalize import normalize_chat
from etl.stop import RunStop
from etl.store import ChatOutcome

# How long a batch waits for more fetched chats to share the writer's transaction with.
WRITE_LINGER_SECONDS: Final = 0.2
# Chats in flight or fetched and waiting, per worker: enough that the workers keep fetching
# while the writer writes a batch of half as many. Big batches matter: every statement makes
# the writer give up the interpreter lock and wait for it behind busy fetch workers.
WINDOW_PER_WORKER: Final = 16


class FetchStage:
    """Fetch ``chatids`` on ``concurrency`` workers; ``batches`` hands them on.

    A batch is what completes within ``linger`` seconds of its first fetch; it goes at once
    when it holds half the window (more if more completed together), or when the run stops.
    The writer commits a batch in one transaction, which costs about what one chat's did.
    ``window`` defaults to ``concurrency x WINDOW_PER_WORKER``.
    """

    def __init__(
        self,
        client: DingTalkClient,
        chatids: Iterable[str],
        concurrency: int,
        stop: RunStop,
        *,
        window: int | None = None,
        linger: float = WRITE_LINGER_SECONDS,
    ) -> None:
        self._client = client
        self._todo = iter(chatids)
        self._concurrency = concurrency
        self._stop = stop
        self._window = window or concurrency * WINDOW_PER_WORKER
        self._batch_size = max(1, self._window // 2)
        self._linger = linger
        self._run_ended = False

    def batches(self) -> Generator[list[ChatOutcome], None, None]:
        """Yield the fetched chats in batches until all are fetched or the run stops.

        Close the iterator when leaving it early: fetches not started are cancelled, and it
        returns once the ones in flight are over (set ``halt`` first to make that quick).
        """
        with ThreadPoolExecutor(self._concurrency, thread_name_prefix="fetch") as pool:
            pending: set[Future[ChatOutcome]] = set()
            try:
                for done in self._completed(pool, pending):
                    ready = self._outcomes(done)
                    if ready:
                        yield ready
            finally:
                for future in pending:
                    future.cancel()

    def _completed(
        self, pool: ThreadPoolExecutor, pending: set[Future[ChatOutcome]]
    ) -> Iterator[list[Future[ChatOutcome]]]:
        """Keep the window full; yield the completed fetches in batches."""
        # Completed fetches arrive through a queue: wait() would scan every pending future
        # for each completion.
        completed: queue.SimpleQueue[Future[ChatOutcome]] = queue.SimpleQueue()
        batch: list[Future[ChatOutcome]] = []
        deadline = 0.0
        while True:
            self._start_fetches(pool, pending, len(batch), completed)
            if not pending:
                if batch:
                    yield batch
                return
            for future in _arrived(completed, deadline if batch else None):
                pending.discard(future)
                if not future.cancelled():
                    if not batch:
                        deadline = time.monotonic() + self._linger
                    batch.append(future)
            if batch and (
                len(batch) >= self._batch_size
                or time.monotonic() >= deadline
                or self._stop.halt.is_set()
            ):
                yield batch
                batch = []

    def _start_fetches(
        self,
        pool: ThreadPoolExecutor,
        pending: set[Future[ChatOutcome]],
        waiting: int,
        completed: queue.SimpleQueue[Future[ChatOutcome]],
    ) -> None:
        """Start fetches until the window is full, the chats run out or the run stops."""
        while len(pending) + waiting < self._window and not self._stop.halt.is_set():
            chatid = next(self._todo, None)
            if chatid is None:
                return
            # Each task gets its own copy: one Context cannot run in two threads at once.
            ctx = contextvars.copy_context()
            future = pool.submit(ctx.run, self._fetch, chatid)
            pending.add(future)
            future.add_done_callback(completed.put)

    def _outcomes(self, done: list[Future[ChatOutcome]]) -> list[ChatOutcome]:
        """The completed fetches worth writing."""
        ready: list[ChatOutcome] = []
        for future in done:
            try:
                outcome = future.result()
            except (FatalError, RunInterrupted):
                # The worker told the RunStop (a fatal error) or was stopped by it.
                self._run_ended = True
                continue
            # Once a worker has seen the run end, the run's reason stands for the chats
            # that fail after it: only what was fetched is still written.
            if self._run_ended and outcome.record is None:
                continue
            ready.append(outcome)
        return ready

    def _fetch(self, chatid: str) -> ChatOutcome:
        """One worker's job: read and normalize one chat; a chat error is its outcome."""
        counter = CallCounter()
        started = time.monotonic()
        try:
            record = normalize_chat(chatid, self._client.get_chat(chatid, counter))
        except ChatError as exc:
            return ChatOutcome(
                chatid,
                attempts=counter.attempts,
                duration_ms=_ms_since(started),
                observed_at=utcnow(),
                errcode=exc.errcode,
                error=exc.message,
                http_status=exc.http_status,
            )
        except FatalError as exc:
            # Stop the other workers before they start another request, not when the
            # writer gets round to reading this result.
            self._stop.fetch_failed(exc)
            raise
        return ChatOutcome(
            chatid,
            attempts=counter.attempts,
            duration_ms=_ms_since(started),
            observed_at=utcnow(),
            record=record,
        )


def _arrived(
    completed: queue.SimpleQueue[Future[ChatOutcome]], deadline: float | None
) -> list[Future[ChatOutcome]]:
    """Wait for a fetch to complete (until ``deadline``, if given); take all that have."""
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    done: list[Future[ChatOutcome]] = []
    with contextlib.suppress(queue.Empty):
        done.append(completed.get(timeout=timeout))
        while True:
            done.append(completed.get_nowait())
    return done


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
