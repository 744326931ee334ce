"""Tests for the fetch stage alone: the simulator over real HTTP, no database.

The stage draws a chatid from its input only when it starts that chat's fetch, so the tests
hand it an iterable that counts the draws: the window bound and "no new call after the stop"
are then exact, not timed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from etl.dingtalk import DingTalkClient, Pacer
from etl.fetch import WINDOW_PER_WORKER, FetchStage
from etl.simulator import SimChat, Simulator, World, errmsg_for
from etl.stop import RunStop, StopReason
from etl.store import ChatOutcome
from tests.conftest import APP_KEY, APP_SECRET

NO_LIMIT = 1000.0  # requests per second: pacing that never gets in the way
LONG = 60.0  # a linger no test waits out: a batch goes once it holds half the window
WAIT = 10.0  # the longest any test waits for a condition


class Counted:
    """Chatids that count how many the fetch stage has drawn, i.e. started to fetch."""

    def __init__(self, chatids: list[str]) -> None:
        self._chatids = chatids
        self.drawn = 0

    def __iter__(self) -> Iterator[str]:
        for chatid in self._chatids:
            self.drawn += 1
            yield chatid


@dataclass
class Stage:
    fetch: FetchStage
    stop: RunStop
    chatids: Counted
    world: World

    def chat_gets(self) -> int:
        return self.world.stats.requests_by_path["/chat/get"]


StartStage = Callable[..., Stage]


@pytest.fixture
def start_stage() -> Iterator[StartStage]:
    """A fetch stage over a simulator serving ``world``; all are stopped at the end."""
    simulators: list[Simulator] = []
    clients: list[DingTalkClient] = []

    def start(
        world: World,
        *,
        concurrency: int,
        window: int | None = None,
        linger: float = LONG,
        signal: threading.Event | None = None,
        budget: float | None = None,
    ) -> Stage:
        simulators.append(sim := Simulator(world).start())
        stop = RunStop(signal, budget)
        pacer = Pacer(NO_LIMIT, stop=stop.halt)
        clients.append(client := DingTalkClient(sim.base_url, APP_KEY, APP_SECRET, pacer=pacer))
        chatids = Counted(world.chatids())
        fetch = FetchStage(client, chatids, concurrency, stop, window=window, linger=linger)
        return Stage(fetch, stop, chatids, world)

    yield start
    for client in clients:
        client.close()
    for sim in simulators:
        sim.stop()


def numbered_world(n: int, **world_options: Any) -> World:
    world = World(APP_KEY, APP_SECRET, **world_options)
    for i in range(n):
        world.add_chat(SimChat(f"chat-{i:03d}", f"Chat {i}", "u1", ["u1", f"u{i + 2}"]))
    return world


def chatids_of(batches: list[list[ChatOutcome]]) -> list[str]:
    return [outcome.chatid for batch in batches for outcome in batch]


# -- batches -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chats", "concurrency", "window"),
    [(12, 1, 4), (40, 4, 8), (5, 2, 32), (70, 2, None)],
    ids=["one-worker", "four-workers", "fewer-chats-than-half-a-window", "default-window"],
)
def test_every_chat_is_handed_on_once_in_batches_of_half_the_window(
    start_stage: StartStage, chats: int, concurrency: int, window: int | None
) -> None:
    stage = start_stage(numbered_world(chats), concurrency=concurrency, window=window)

    batches = list(stage.fetch.batches())

    assert sorted(chatids_of(batches)) == stage.world.chatids()
    assert all(o.record is not None and o.attempts == 1 for b in batches for o in b)
    limit = window or concurrency * WINDOW_PER_WORKER
    # The linger never runs out here: only the last batch goes before it holds half a window.
    assert all(len(batch) >= limit // 2 for batch in batches[:-1])
    assert all(len(batch) <= limit for batch in batches)
    assert stage.chat_gets() == chats


def _unreadable(world: World) -> None:
    world.add_chat(SimChat("chat-bad", "Hidden", "u1", ["u1"], readable=False))


def _invalid_payload(world: World) -> None:
    world.add_chat(SimChat("chat-bad", "Odd", "u1", [], raw_chat_info={"name": 5}))


def _http_404(world: World) -> None:
    world.add_chat(SimChat("chat-bad", "Gone", "u1", ["u1"]))
    world.inject("chat-bad", "http:404")


@pytest.mark.parametrize(
    ("arrange", "errcode", "http_status", "message"),
    [
        (_unreadable, 40016, None, "chat/get: errcode 40016: "),
        (_invalid_payload, None, None, "chat_info"),
        (_http_404, None, 404, "chat/get: HTTP 404"),
    ],
    ids=["unreadable-40016", "invalid-chat-info", "http-404"],
)
def test_a_chat_error_is_that_chats_outcome_and_the_others_go_on(
    start_stage: StartStage,
    arrange: Callable[[World], None],
    errcode: int | None,
    http_status: int | None,
    message: str,
) -> None:
    world = numbered_world(3)
    arrange(world)
    stage = start_stage(world, concurrency=2)

    outcomes = {o.chatid: o for batch in stage.fetch.batches() for o in batch}

    bad = outcomes.pop("chat-bad")
    assert (bad.record, bad.errcode, bad.http_status, bad.attempts) == (
        None,
        errcode,
        http_status,
        1,
    )
    assert (bad.error or "").startswith(message)
    assert sorted(outcomes) == ["chat-000", "chat-001", "chat-002"]
    assert all(o.record is not None and o.error is None for o in outcomes.values())
    assert stage.stop.reason(unfinished=False) is None


# -- the window ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("concurrency", "window", "linger"),
    [(1, 2, 0.0), (2, 4, 0.0), (4, 16, 0.01), (3, 6, LONG)],
    ids=["1-worker-window-2", "2-workers-window-4", "4-workers-window-16", "long-linger"],
)
def test_fetches_in_flight_and_fetched_chats_waiting_stay_within_the_window(
    start_stage: StartStage, concurrency: int, window: int, linger: float
) -> None:
    stage = start_stage(numbered_world(60), concurrency=concurrency, window=window, linger=linger)
    handed_on = 0
    drawn_at_first_batch = None

    for batch in stage.fetch.batches():
        # Drawn = handed on before + this batch + in flight: all within one window.
        assert stage.chatids.drawn - handed_on <= window
        drawn_at_first_batch = drawn_at_first_batch or stage.chatids.drawn
        handed_on += len(batch)

    assert drawn_at_first_batch == window  # the window is used, not only bounded
    assert handed_on == stage.chatids.drawn == stage.chat_gets() == 60


# -- stopping ---------------------------------------------------------------------------------


def _signal_at_first_batch(stage: Stage, signal: threading.Event) -> None:
    if not signal.is_set():
        signal.set()
        # The watcher relays the signal; the stage holds still meanwhile (it is our caller).
        assert stage.stop.halt.wait(WAIT)


def _nothing(stage: Stage, signal: threading.Event) -> None:
    pass


@pytest.mark.parametrize(
    ("on_batch", "budget", "latency_ms", "expected"),
    [
        (_signal_at_first_batch, None, 0, StopReason("signal", "interrupted")),
        (_nothing, 0.3, 100, StopReason("time budget", "time budget of 0.3 s exceeded")),
    ],
    ids=["signal", "time-budget"],
)
def test_a_stop_starts_no_new_fetch_and_hands_on_what_was_fetched(
    start_stage: StartStage,
    on_batch: Callable[[Stage, threading.Event], None],
    budget: float | None,
    latency_ms: int,
    expected: StopReason,
) -> None:
    signal = threading.Event()
    world = numbered_world(40, latency_ms=latency_ms)
    stage = start_stage(world, concurrency=1, window=2, signal=signal, budget=budget)
    drawn_when_halted = None
    handed_on = 0

    with stage.stop.watching():
        for batch in stage.fetch.batches():
            on_batch(stage, signal)
            if stage.stop.halt.is_set() and drawn_when_halted is None:
                drawn_when_halted = stage.chatids.drawn
            handed_on += len(batch)

    assert stage.stop.reason(unfinished=True) == expected
    assert stage.chatids.drawn < 40
    if drawn_when_halted is not None:
        assert stage.chatids.drawn == drawn_when_halted
    # A fetch stopped before its request made none; every request made was handed on.
    assert stage.chat_gets() == handed_on


@pytest.mark.parametrize(
    ("concurrency", "exact"),
    [(1, True), (4, False)],
    ids=["one-worker", "four-workers"],
)
def test_a_fatal_error_stops_new_calls_at_once(
    start_stage: StartStage, concurrency: int, exact: bool
) -> None:
    world = numbered_world(30)
    world.inject("chat-005", "errcode:43007")
    stage = start_stage(world, concurrency=concurrency, window=8)

    handed_on = chatids_of(list(stage.fetch.batches()))

    reason = stage.stop.reason(unfinished=True)
    assert reason == StopReason(
        "fatal error", f"chat/get: errcode 43007: {errmsg_for(43007)}", errcode=43007
    )
    assert "chat-005" not in handed_on
    # Requests already under way end and are handed on; none starts after the fatal one.
    assert stage.chat_gets() == len(handed_on) + 1
    if exact:  # one worker: the chats before the fatal one, and nothing after it
        assert handed_on == [f"chat-{i:03d}" for i in range(5)]
    assert stage.chatids.drawn <= 8 + len(handed_on)
