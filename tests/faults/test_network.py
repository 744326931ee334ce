"""A hostile network between the sync and DingTalk: every fault the simulator can inject.

Resets, timeouts, truncated bodies, HTML error pages, the IP limiter's ``status 1111`` JSON and
bursts of -1 and 90018 are retried up to ``max_attempts``; one more makes that chat fail alone.
Each request is counted exactly, and ``[sync] run_budget_seconds`` bounds a run that the
network keeps slow.
"""

from __future__ import annotations

import random
import time

import pytest
from sqlalchemy.engine import URL

from etl.simulator import Simulator
from etl.sync import run_sync
from tests.conftest import MakeConfig
from tests.faults.checks import audit_problems, numbered_world, world_problems, world_state
from tests.helpers import rows

MAX_ATTEMPTS = 3


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("reset", "chat/get: connection failed"),
        ("slow:1.5", "chat/get: timed out after 0.5s"),
        ("truncate", "chat/get: connection failed"),
        ("http:502", "chat/get: HTTP 502"),
        ("http:503", "chat/get: HTTP 503"),
        ("http:429", "chat/get: HTTP 429"),
        ("nonjson", "chat/get: answer is not JSON (HTTP 200"),
        ("block:1", "chat/get: blocked by the IP rate limiter (wait 1)"),
        ("errcode:-1", "chat/get: errcode -1: "),
        ("errcode:90018", "chat/get: errcode 90018: "),
        ("errcode:88", "chat/get: errcode 88: ding talk error[subcode=90018"),
    ],
    ids=[
        "reset",
        "timeout",
        "truncated-body",
        "html-502",
        "html-503",
        "html-429",
        "html-200",
        "ip-block-1111",
        "busy-minus-1",
        "qps-90018",
        "gateway-88-90018",
    ],
)
def test_fault_is_retried_then_fails_the_chat_alone(
    sqlite_url: URL, make_config: MakeConfig, fault: str, message: str
) -> None:
    world = numbered_world(3)
    # chat-00: one fault fewer than max_attempts (it gets through); chat-01: as many (it fails).
    world.inject("chat-00", *[fault] * (MAX_ATTEMPTS - 1))
    world.inject("chat-01", *[fault] * MAX_ATTEMPTS)
    with Simulator(world) as sim:
        config = make_config(
            sqlite_url,
            sim.base_url,
            world.chatids(),
            dingtalk={"max_attempts": MAX_ATTEMPTS, "timeout_seconds": 0.5},
        )
        started = time.monotonic()
        result = run_sync(config)
        elapsed = time.monotonic() - started
        requests = world.stats.total_requests
        fired = sum(world.stats.faults_fired.values())

    assert (result.status, result.exit_code) == ("partial", 1)
    assert fired == 2 * MAX_ATTEMPTS - 1
    assert (result.api_calls, result.retries) == (requests, 2 * (MAX_ATTEMPTS - 1))
    assert requests == 1 + MAX_ATTEMPTS + MAX_ATTEMPTS + 1  # gettoken, chat-00, chat-01, chat-02
    items = {i["chatid"]: i for i in rows(sqlite_url, "sync_run_items")}
    assert (items["chat-00"]["status"], items["chat-00"]["attempts"]) == ("ok", MAX_ATTEMPTS)
    assert (items["chat-01"]["status"], items["chat-01"]["attempts"]) == ("failed", MAX_ATTEMPTS)
    assert items["chat-01"]["error"].startswith(message)
    assert items["chat-01"]["error"].endswith(f"(gave up after {MAX_ATTEMPTS} attempts)")
    assert (items["chat-02"]["status"], items["chat-02"]["attempts"]) == ("ok", 1)
    assert "chat-01" not in {c["chatid"] for c in rows(sqlite_url, "chats")}
    # Throttling answers pause at least 1 s per retry; nothing else should take long.
    assert elapsed < 12


def test_bursts_of_busy_and_throttled_answers_across_many_chats(
    db_url: URL, make_config: MakeConfig
) -> None:
    rng = random.Random(6)
    world = numbered_world(10)
    injected = 0
    for chatid in world.chatids():
        burst = [rng.choice(["errcode:-1", "errcode:-1", "errcode:90018"])]
        burst *= rng.randint(0, MAX_ATTEMPTS - 1)
        world.inject(chatid, *burst)
        injected += len(burst)
    with Simulator(world) as sim:
        config = make_config(
            db_url, sim.base_url, world.chatids(), dingtalk={"max_attempts": MAX_ATTEMPTS}
        )
        started = time.monotonic()
        result = run_sync(config)
        elapsed = time.monotonic() - started
        requests = world.stats.total_requests

    assert result.status == "succeeded"
    assert (result.api_calls, result.retries) == (requests, injected)
    assert requests == 1 + 10 + injected
    assert world_problems(db_url, world_state(world)) == []
    assert audit_problems(db_url) == []
    assert elapsed < 30


def test_time_budget_stops_a_run_the_network_keeps_slow(
    db_url: URL, make_config: MakeConfig
) -> None:
    world = numbered_world(12)
    for chatid in world.chatids():
        world.inject(chatid, "slow:0.4")
    with Simulator(world) as sim:
        config = make_config(
            db_url,
            sim.base_url,
            world.chatids(),
            sync={"concurrency": 1, "run_budget_seconds": 1.5},
        )
        result = run_sync(config)
        world.clear_faults()

        done = result.chats_succeeded
        assert (result.status, result.exit_code) == ("partial", 1)
        assert result.error == "time budget of 1.5 s exceeded"
        assert 2 <= done < 12
        assert result.chats_failed == 0
        # Stopped within the chat in hand (0.4 s) of the budget, not after 12 x 0.4 s: by the
        # simulator's request log, which the run's start-up on a loaded machine does not skew.
        fetched = world.stats.arrivals("/chat/get")
        assert len(fetched) == done
        assert fetched[-1] - fetched[0] < 1.5 + 0.4
        run = rows(db_url, "sync_runs")[-1]
        assert (run["status"], run["error"]) == ("partial", "time budget of 1.5 s exceeded")
        assert len(rows(db_url, "sync_run_items")) == done  # chats not reached: no item
        assert len(rows(db_url, "chats")) == done

        # Without a budget, which the rest might overrun on a busy machine.
        again = run_sync(make_config(db_url, sim.base_url, world.chatids()))

    assert (again.status, again.chats_changed) == ("succeeded", 12 - done)
    assert world_problems(db_url, world_state(world)) == []
    assert audit_problems(db_url) == []


def test_time_budget_ends_retry_pauses_at_once(sqlite_url: URL, make_config: MakeConfig) -> None:
    """Every chat throttled on every attempt: without a budget this run takes minutes."""
    world = numbered_world(20)
    for chatid in world.chatids():
        world.inject(chatid, *["errcode:90018"] * 5)
    with Simulator(world) as sim:
        config = make_config(
            sqlite_url,
            sim.base_url,
            world.chatids(),
            dingtalk={"max_attempts": 5},
            sync={"concurrency": 2, "run_budget_seconds": 2},
        )
        result = run_sync(config)
        requests = world.stats.total_requests

    assert (result.status, result.exit_code) == ("failed", 3)
    assert result.error == "time budget of 2 s exceeded"
    assert result.api_calls == requests
    assert rows(sqlite_url, "chats") == []
    [run] = rows(sqlite_url, "sync_runs")
    assert run["status"] == "failed"
    # By the run's own times: a process starting slowly on a busy machine is not the budget's.
    assert (run["finished_at"] - run["started_at"]).total_seconds() < 2 + 1.0
