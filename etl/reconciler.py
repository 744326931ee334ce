"""Re-reading chats that received events: one chat/get per chat, after its last event.

A ``Reconciler`` keeps, for each chat with new events, the time its reconcile is due
(``[events] reconcile_delay_seconds`` after the arrival of its last event: a burst costs one
call), and runs the due chats together through the function it is given (the sync's
reconcile, a run with ``trigger = 'event'``). A run refused because another sync holds the
lock, that fails, or that DingTalk's monthly quota does not allow (90020 this month) is tried
again later; the events wait in the database meanwhile
(``pushed_events.reconciled_at`` NULL), so a listener that restarts finds them again.
Knows threads and time only.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import structlog

from etl.errors import LockBusy, QuotaExhausted, describe_exception

log = structlog.get_logger("etl.reconciler")

# A chat whose reconcile could not run (lock held, database or API down) waits this long.
RETRY_SECONDS: Final = 5.0
RETRY_MAX_SECONDS: Final = 300.0
# After a 90020, the reconciles wait for the quota month to end, looking again this often.
QUOTA_RETRY_SECONDS: Final = 3600.0


class Reconciler:
    """Runs ``reconcile(chatids)`` for chats once they are due, in a thread of its own."""

    def __init__(
        self,
        reconcile: Callable[[Sequence[str]], object],
        *,
        delay: float,
        stop: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reconcile = reconcile
        self._delay = delay
        self._stop = stop
        self._clock = clock
        self._due: dict[str, float] = {}
        self._failures = 0
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
        self.runs = 0

    def start(self) -> Reconciler:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        with self._changed:
            self._changed.notify_all()
        self._thread.join(timeout)

    def touch(self, chatid: str) -> None:
        """``chatid`` received an event now: its reconcile is due ``delay`` from now."""
        with self._changed:
            self._due[chatid] = self._clock() + self._delay
            self._changed.notify_all()

    def resume(self, chatids: Iterable[str]) -> None:
        """Chats whose events waited when the listener started: due after the delay."""
        for chatid in chatids:
            self.touch(chatid)

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._due)

    def _run(self) -> None:
        while not self._stop.is_set():
            chatids = self._next_due()
            if not chatids:
                continue
            try:
                self._reconcile(chatids)
            except LockBusy:
                log.info("events.reconcile_deferred", chats=len(chatids), reason="lock held")
                self._again(chatids, RETRY_SECONDS)
                continue
            except QuotaExhausted as exc:
                # The events are recorded meanwhile; their chats are read once calls are
                # allowed again (looked at hourly, in case the quota was raised).
                wait = max(RETRY_SECONDS, min(QUOTA_RETRY_SECONDS, _seconds_until(exc.resets_at)))
                log.warning(
                    "events.reconcile_deferred",
                    chats=len(chatids),
                    reason="monthly API quota used up (90020)",
                    retry_in_seconds=round(wait),
                )
                self._again(chatids, wait)
                continue
            except Exception as exc:  # noqa: BLE001 - the listener goes on; the events wait
                self._failures += 1
                wait = min(RETRY_MAX_SECONDS, RETRY_SECONDS * 2 ** (self._failures - 1))
                log.error(
                    "events.reconcile_failed",
                    chats=len(chatids),
                    error=describe_exception(exc),
                    retry_in_seconds=wait,
                )
                self._again(chatids, wait)
                continue
            self._failures = 0
            self.runs += 1

    def _next_due(self) -> list[str]:
        """Wait until a chat is due (or a stop); take the due chats off the list."""
        with self._changed:
            now = self._clock()
            due = sorted(c for c, at in self._due.items() if at <= now)
            if due:
                for chatid in due:
                    del self._due[chatid]
                return due
            upcoming = min(self._due.values(), default=None)
            timeout = None if upcoming is None else max(0.0, upcoming - now)
            self._changed.wait(timeout if timeout is not None else 1.0)
            return []

    def _again(self, chatids: Sequence[str], wait: float) -> None:
        with self._changed:
            at = self._clock() + wait
            for chatid in chatids:
                # A newer event may have made it due later already.
                self._due[chatid] = max(self._due.get(chatid, 0.0), at)
            self._changed.notify_all()


def _seconds_until(at: dt.datetime) -> float:
    return (at - dt.datetime.now(dt.UTC)).total_seconds()
