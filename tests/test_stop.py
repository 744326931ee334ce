"""Tests for ``RunStop``: which of a run's reasons to stop early is the one it records."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from etl.errors import DatabaseFailure, FatalApiError, LockLost
from etl.stop import RunStop, StopReason

WAIT = 10.0  # the longest a test waits for the watcher

QUOTA = FatalApiError("chat/get: errcode 90020: quota", errcode=90020)
REFUSED = FatalApiError("gettoken: errcode 40089: invalid appkey", errcode=40089)
DB_DOWN = DatabaseFailure("database error while writing chat 'c1': connection refused")
LOCK_GONE = LockLost("lost the sync lock: its database session was replaced; stopped")

Step = Callable[[RunStop, threading.Event], None]


def signal(stop: RunStop, event: threading.Event) -> None:
    event.set()


def fetch(error: FatalApiError) -> Step:
    return lambda stop, _event: stop.fetch_failed(error)


def write(error: DatabaseFailure) -> Step:
    return lambda stop, _event: stop.write_failed(error)


@pytest.mark.parametrize(
    ("steps", "unfinished", "expected"),
    [
        ([], True, None),
        ([signal], True, StopReason("signal", "interrupted")),
        ([signal], False, StopReason("signal", "interrupted")),
        ([fetch(QUOTA)], True, StopReason("fatal error", QUOTA.message, 90020)),
        ([fetch(QUOTA), fetch(REFUSED)], True, StopReason("fatal error", QUOTA.message, 90020)),
        ([signal, fetch(REFUSED)], True, StopReason("fatal error", REFUSED.message, 40089)),
        ([fetch(QUOTA), write(DB_DOWN)], True, StopReason("fatal error", DB_DOWN.message)),
        ([write(LOCK_GONE)], True, StopReason("lost lock", LOCK_GONE.message)),
        ([signal, write(LOCK_GONE)], False, StopReason("lost lock", LOCK_GONE.message)),
    ],
    ids=[
        "nothing",
        "signal",
        "signal-after-the-last-chat",
        "fatal-error",
        "the-first-fatal-error",
        "a-fatal-error-over-the-signal",
        "the-writers-failure-over-a-fetch-error",
        "lost-lock",
        "lost-lock-over-the-signal",
    ],
)
def test_the_reason_recorded(steps: list[Step], unfinished: bool, expected: StopReason) -> None:
    event = threading.Event()
    stop = RunStop(event, budget_seconds=None)

    for step in steps:
        step(stop, event)

    assert stop.reason(unfinished=unfinished) == expected


@pytest.mark.parametrize(
    ("unfinished", "expected"),
    [(True, StopReason("time budget", "time budget of 0.05 s exceeded")), (False, None)],
    ids=["chats-left-over", "ran-out-while-the-last-chat-was-written"],
)
def test_the_time_budget_halts_the_run_and_counts_only_if_chats_were_left(
    unfinished: bool, expected: StopReason | None
) -> None:
    stop = RunStop(None, budget_seconds=0.05)

    with stop.watching():
        assert stop.halt.wait(WAIT)

    assert stop.reason(unfinished=unfinished) == expected


def test_the_watcher_relays_a_signal_to_halt() -> None:
    event = threading.Event()
    stop = RunStop(event, budget_seconds=None)

    with stop.watching():
        assert not stop.halt.is_set()
        event.set()
        assert stop.halt.wait(WAIT)


@pytest.mark.parametrize(
    ("kind", "interrupted"),
    [("signal", True), ("time budget", True), ("fatal error", False), ("lost lock", False)],
    ids=["signal", "time-budget", "fatal-error", "lost-lock"],
)
def test_only_a_stop_asked_for_is_an_interruption(kind: str, interrupted: bool) -> None:
    assert StopReason(kind, "why").interrupted is interrupted  # type: ignore[arg-type]
