"""Why a run stops before its last chat: a signal, the time budget, a fatal error, a lost lock.

``RunStop`` is the one place that knows. Its ``halt`` event stops new API calls (the pacer and
the fetch stage watch it); a watcher thread relays the caller's stop event (SIGTERM/SIGINT)
and the ``[sync] run_budget_seconds`` deadline to it; fetch workers and the writer report
fatal errors to it. ``reason`` then names the run's one ``StopReason``. A signal or the time
budget is a stop asked for, not a failure: the chats synced until then count.

Knows threads and the error classes only: no database, no HTTP.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Literal

import structlog

from etl.errors import FatalError, LockLost

log = structlog.get_logger("etl.stop")

# How often the watcher looks at the caller's stop event and the clock.
WATCH_SECONDS: Final = 0.1

StopKind = Literal["signal", "time budget", "fatal error", "lost lock"]


@dataclass(frozen=True)
class StopReason:
    """Why a run ended early; ``message`` is what the run row's ``error`` says."""

    kind: StopKind
    message: str
    # DingTalk's errcode, when a fatal API error stopped the run (90020: quota used up).
    errcode: int | None = None

    @property
    def interrupted(self) -> bool:
        """A stop asked for (signal, time budget), not a failure."""
        return self.kind in ("signal", "time budget")

    @classmethod
    def of(cls, exc: FatalError) -> StopReason:
        kind: StopKind = "lost lock" if isinstance(exc, LockLost) else "fatal error"
        return cls(kind, exc.message, getattr(exc, "errcode", None))


class RunStop:
    """Stops one run and says why. Thread-safe."""

    def __init__(self, signal: threading.Event | None, budget_seconds: float | None) -> None:
        self.halt = threading.Event()
        self._signal = signal or threading.Event()
        self._budget = budget_seconds
        self._fetch_error: FatalError | None = None
        self._write_error: FatalError | None = None
        self._out_of_time: str | None = None
        self._lock = threading.Lock()

    def fetch_failed(self, exc: FatalError) -> None:
        """A fetch worker met a fatal error: no worker starts another request."""
        with self._lock:
            if self._fetch_error is None:
                self._fetch_error = exc
        self.halt.set()

    def write_failed(self, exc: FatalError) -> None:
        """The writer failed (the database, or the lock went): nothing more is written."""
        self._write_error = exc
        self.halt.set()

    def reason(self, *, unfinished: bool) -> StopReason | None:
        """The run's reason to have stopped, if any; ``unfinished``: chats were left over.

        The writer's failure comes first (the chats in hand were lost with it), then a
        fetch's fatal error, the signal, and the time budget, which may run out while the
        last chat is written: then it stopped nothing.
        """
        error = self._write_error or self._fetch_error
        if error is not None:
            return StopReason.of(error)
        # Workers report where they noticed the stop; the run's reason is the stop itself.
        if self._signal.is_set():
            return StopReason("signal", "interrupted")
        if self._out_of_time is not None and unfinished:
            return StopReason("time budget", self._out_of_time)
        return None

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Relay the caller's stop event and the time budget to ``halt`` during the block."""
        watcher = threading.Thread(target=self._watch, name="run-stop", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            self.halt.set()
            watcher.join(timeout=1)

    def _watch(self) -> None:
        deadline = None if self._budget is None else time.monotonic() + self._budget
        while not self.halt.is_set():
            if self._signal.wait(WATCH_SECONDS):
                log.warning("run.stopping", reason="interrupted")
                self.halt.set()
                return
            if deadline is not None and time.monotonic() >= deadline:
                # Same path as a signal: no new chat starts, the ones in hand are written.
                self._out_of_time = f"time budget of {self._budget:g} s exceeded"
                log.warning("run.stopping", reason=self._out_of_time)
                self.halt.set()
                return
