"""Access tokens that keep expiring, and a gettoken endpoint that is itself unwell.

Every expiry costs one refresh (shared by the workers) and one resent chat/get; a token
refused although freshly issued stops the run at once rather than refreshing in a loop; and
gettoken answering -1 is retried like any transient failure, then fails the run (exit 3)
without a single chat/get.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.engine import URL

from etl.simulator import Simulator
from etl.sync import RunResult, run_sync
from tests.conftest import MakeConfig
from tests.faults.checks import audit_problems, numbered_world, world_problems, world_state
from tests.helpers import rows, wait_for

MAX_ATTEMPTS = 3


def test_token_expiring_every_few_hundred_milliseconds(
    db_url: URL, make_config: MakeConfig
) -> None:
    # DingTalk says expires_in=1 (whole seconds) for a token that lives 0.8 s: the client,
    # which refreshes at 0.9 s, cannot refresh early and meets 42001 again and again. A fresh
    # token outlives a request by far, even on a busy machine.
    # 80 chats, two at a time, 60 ms each: about 2.4 s of calls, three lifetimes or more.
    world = numbered_world(80, token_ttl_seconds=0.8, latency_ms=60)
    with Simulator(world) as sim:
        config = make_config(db_url, sim.base_url, world.chatids(), sync={"concurrency": 2})
        result = run_sync(config)
        stats = world.stats
        chat_gets = stats.requests_by_path["/chat/get"]

    assert result.status == "succeeded"
    assert stats.tokens_issued >= 3  # it did expire, more than once
    assert result.api_calls == stats.total_requests == stats.gettoken_calls + chat_gets
    # Each 42001 cost one resent chat/get, counted as a retry (a refresh is a new fetch).
    assert result.retries == chat_gets - 80 >= stats.tokens_issued - 1
    assert world_problems(db_url, world_state(world)) == []
    assert audit_problems(db_url) == []


def test_each_expiry_costs_one_refresh(sqlite_url: URL, make_config: MakeConfig) -> None:
    world = numbered_world(12)
    expired = world.chatids()[1::3]
    for chatid in expired:
        world.inject(chatid, "expire_token")
    with Simulator(world) as sim:
        config = make_config(sqlite_url, sim.base_url, world.chatids(), sync={"concurrency": 1})
        result = run_sync(config)
        gettoken_calls = world.stats.gettoken_calls
        requests = world.stats.total_requests

    assert result.status == "succeeded"
    assert gettoken_calls == 1 + len(expired)
    assert result.api_calls == requests == gettoken_calls + 12 + len(expired)


def test_token_refused_although_fresh_stops_the_run_at_once(
    sqlite_url: URL, make_config: MakeConfig
) -> None:
    # Every token is dead before any chat/get reaches the server: refreshing cannot help.
    world = numbered_world(30, token_ttl_seconds=0.001, latency_ms=5)
    with Simulator(world) as sim:
        config = make_config(sqlite_url, sim.base_url, world.chatids(), sync={"concurrency": 4})
        result = run_sync(config)
        gettoken_calls = world.stats.gettoken_calls
        requests = world.stats.total_requests

    assert (result.status, result.exit_code) == ("failed", 3)
    assert result.error is not None
    assert "errcode 42001" in result.error
    assert result.error.endswith("(again with a freshly issued token)")
    assert gettoken_calls <= 1 + 4  # at most one refresh per worker, no refresh storm
    assert result.api_calls == requests <= 3 * 4
    assert rows(sqlite_url, "chats") == []


@pytest.mark.parametrize(
    ("busy", "status"),
    [(MAX_ATTEMPTS - 1, "succeeded"), (MAX_ATTEMPTS, "failed")],
    ids=["busy-then-ok", "busy-every-time"],
)
def test_gettoken_answering_minus_1(
    sqlite_url: URL, make_config: MakeConfig, busy: int, status: str
) -> None:
    world = numbered_world(5)
    world.inject("@gettoken", *["errcode:-1"] * busy)
    with Simulator(world) as sim:
        config = make_config(sqlite_url, sim.base_url, world.chatids())
        result = run_sync(config)
        stats = world.stats
        gettoken_calls, chat_gets = stats.gettoken_calls, stats.requests_by_path["/chat/get"]

    assert result.status == status
    assert gettoken_calls == min(busy + 1, MAX_ATTEMPTS)
    assert result.api_calls == gettoken_calls + chat_gets
    if status == "succeeded":
        assert (chat_gets, result.retries) == (5, busy)
        return
    assert result.exit_code == 3
    assert chat_gets == 0
    assert result.error == (
        "cannot get an access token: gettoken: errcode -1: 系统繁忙 (gave up after 3 attempts)"
    )
    run = rows(sqlite_url, "sync_runs")[0]
    assert (run["status"], run["error"], run["api_calls"]) == ("failed", result.error, 3)
    assert rows(sqlite_url, "sync_run_items") == []


def test_refresh_mid_run_meets_a_busy_gettoken(sqlite_url: URL, make_config: MakeConfig) -> None:
    world = numbered_world(4)
    world.inject("chat-01", "slow:2")  # time enough to react to its arrival, however loaded
    with Simulator(world) as sim:
        config = make_config(sqlite_url, sim.base_url, world.chatids(), sync={"concurrency": 1})
        out: dict[str, RunResult] = {}
        worker = threading.Thread(target=lambda: out.setdefault("r", run_sync(config)))
        worker.start()
        # While chat-01's answer is on its way, its token expires (42001), and the refresh
        # meets a busy gettoken once.
        wait_for("chat-01's request", lambda: world.stats.requests_by_chat["chat-01"])
        world.inject("@gettoken", "errcode:-1")
        world.expire_token()
        worker.join(timeout=30)
        assert not worker.is_alive()
        stats = world.stats

    result = out["r"]
    assert result.status == "succeeded"
    assert stats.gettoken_calls == 3  # the first token, then busy, then the refresh
    assert result.api_calls == stats.total_requests == 3 + 4 + 1
    assert result.retries == 2  # the resent chat/get and the retried gettoken
