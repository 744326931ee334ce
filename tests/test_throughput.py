"""Throughput guarantees that hold by construction, checked without timing anything.

- The pacer at sync level: a run at DingTalk's limit against a simulator enforcing that limit
  draws no throttled answer, and no one-second window of the simulator's arrivals (token and
  chat calls together) holds more than the limit. The pacer counts each request's window
  from its answer, so late arrivals cannot bunch up at the server.
- Writes proportional to change, by counting the SQL statements the sync sends (a
  ``before_cursor_execute`` listener on every engine; an executemany counts once): an
  unchanged re-sync reads no member rows and writes no member or event rows; a changed
  chat reads its members once and writes joins, leaves and events with one statement each,
  however many users changed; a batch of new chats costs one statement per table, however
  many chats it holds.
- ``dingtalk-etl simulate`` serves a generated, mutated, rate-limited world from the command
  line, as the benchmark in ``bench/`` uses it.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, event
from sqlalchemy.engine import URL
from sqlalchemy.pool import Pool

from etl.dingtalk import Pacer
from etl.simulator import SimChat, Simulator, World
from etl.sync import run_sync
from tests.conftest import APP_KEY, APP_SECRET, MakeConfig
from tests.helpers import current_members, rows
from tests.test_dingtalk import FakeClock, RecordingStop, max_in_window

REPO = Path(__file__).resolve().parents[1]


def generated(
    n_chats: int, *, seed: int = 5, min_members: int = 10, max_members: int = 120, **kw: Any
) -> World:
    world = World.generate(n_chats, seed=seed, min_members=min_members, max_members=max_members)
    world.app_key, world.app_secret = APP_KEY, APP_SECRET
    for key, value in kw.items():
        setattr(world, key, value)
    return world


# --------------------------------------------------------------------------------------------
# 1. Pacing


def test_sync_at_the_limit_draws_no_throttling(sqlite_url: URL, make_config: MakeConfig) -> None:
    rate = 20
    world = generated(60, rate_limit=rate)
    with Simulator(world) as sim:
        config = make_config(
            sqlite_url,
            sim.base_url,
            world.chatids(),
            dingtalk={"max_requests_per_second": rate},
            sync={"concurrency": 8},
        )
        started = time.monotonic()
        result = run_sync(config)
        elapsed = time.monotonic() - started

    assert (result.status, result.chats_succeeded) == ("succeeded", 60)
    assert (result.api_calls, result.retries) == (61, 0)
    assert world.stats.throttled == 0
    every = world.stats.arrivals("/gettoken") + world.stats.arrivals("/chat/get")
    assert len(every) == 61
    assert max_in_window(every) <= rate
    # 61 starts at <= 20 per second: the last ones cannot start before three windows passed.
    assert elapsed >= 3.0


WINDOW = 1.0 + Pacer.SAFETY_SECONDS
ANCHORS = [
    # (how long the first request takes, when the third asks, when the third may start)
    (0.0, 0.0, WINDOW),
    (0.5, 0.6, 0.5 + WINDOW),
    (3.0, 3.0, 3.0 + WINDOW),
    (0.2, 2.0, 2.0),
]


@pytest.mark.parametrize(
    ("takes", "asks", "starts"),
    ANCHORS,
    ids=["instant-answer", "slow-answer", "3s-answer", "asks-after-the-window"],
)
def test_pacer_counts_each_window_from_the_answer(takes: float, asks: float, starts: float) -> None:
    """Virtual time, rate 2: the third request waits a window after the first one's answer.

    The server counts a request when it arrives, somewhere between our start and its answer;
    counting from the answer keeps late arrivals from bunching up in the server's window.
    """
    clock = FakeClock()
    stop = RecordingStop(clock)
    pacer = Pacer(2, clock=clock, stop=stop)
    begin = clock.now
    first = pacer.slot()
    first.__enter__()
    with pacer.slot():  # the second request, answered at once
        pass
    clock.advance(takes)
    first.__exit__(None, None, None)

    clock.now = begin + asks
    waited = len(stop.waits)
    with pacer.slot():
        started = clock.now + sum(stop.waits[waited:])

    assert started - begin == pytest.approx(starts)


# --------------------------------------------------------------------------------------------
# 2. Writes proportional to change, by statement count


@dataclass(frozen=True)
class Statement:
    verb: str
    table: str | None
    many: bool
    text: str  # the SQL, whitespace collapsed


_TABLE_OF = {
    "INSERT": re.compile(r"^INSERT\s+INTO\s+[`\"]?(\w+)", re.IGNORECASE),
    "UPDATE": re.compile(r"^UPDATE\s+[`\"]?(\w+)", re.IGNORECASE),
    "DELETE": re.compile(r"^DELETE\s+FROM\s+[`\"]?(\w+)", re.IGNORECASE),
    "COPY": re.compile(r"^COPY\s+[`\"]?(\w+)", re.IGNORECASE),
    "SELECT": re.compile(r"\bFROM\s+[`\"]?(\w+)", re.IGNORECASE),
}


@contextmanager
def statements() -> Iterator[list[Statement]]:
    """Every statement any engine sends while the block runs; an executemany is one."""
    seen: list[Statement] = []

    def record(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        text = " ".join(statement.split())
        verb = text.split(" ", 1)[0].upper()
        match = _TABLE_OF[verb].search(text) if verb in _TABLE_OF else None
        table = match.group(1).lower() if match else None
        # PostgreSQL's COPY ... FROM STDIN is the store's bulk insert there.
        seen.append(Statement("INSERT" if verb == "COPY" else verb, table, executemany, text))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def counts(seen: list[Statement]) -> Counter[tuple[str, str | None]]:
    return Counter((s.verb, s.table) for s in seen)


def test_unchanged_resync_reads_no_members_and_writes_no_members_or_events(
    db_url: URL, make_config: MakeConfig
) -> None:
    world = generated(12)
    with Simulator(world) as sim:
        config = make_config(db_url, sim.base_url, world.chatids())
        first = run_sync(config)
        with statements() as seen:
            again = run_sync(config)

    assert (first.status, first.chats_changed) == ("succeeded", 12)
    assert (again.status, again.chats_succeeded, again.chats_changed) == ("succeeded", 12, 0)
    sent = counts(seen)
    assert sent[("SELECT", "chat_members")] == 0
    for verb in ("INSERT", "UPDATE", "DELETE"):
        assert sent[(verb, "chat_members")] == 0
        assert sent[(verb, "chat_events")] == 0
    # At most one read and one update of the chats rows per chat (fewer when chats share them).
    assert 1 <= sent[("SELECT", "chats")] <= 12
    assert 1 <= sent[("UPDATE", "chats")] <= 12
    assert sent[("INSERT", "chats")] == 0


def test_a_batch_of_new_chats_costs_a_few_statements_not_a_few_per_chat(
    db_url: URL, make_config: MakeConfig
) -> None:
    # Small chats: a batch's rows fit in one statement on every database (SQLite's
    # statements hold a few thousand parameters; see the next test for bigger ones).
    world = generated(40, min_members=2, max_members=8)
    with Simulator(world) as sim:
        config = make_config(db_url, sim.base_url, world.chatids())
        with statements() as seen:
            result = run_sync(config)

    assert (result.status, result.chats_changed) == ("succeeded", 40)
    sent = counts(seen)
    # One fingerprint read and one run-items insert per batch (one transaction each), and
    # one read of the poll plan for the run.
    batches = sent[("INSERT", "sync_run_items")]
    assert batches + 1 == sent[("SELECT", "chats")]
    # 40 chats from 4 workers on loopback arrive within a batch's linger of each other.
    assert batches < 40 / 4
    for table in ("chats", "chat_members", "chat_events"):
        assert sent[("INSERT", table)] == batches, table
    assert sent[("SELECT", "chat_members")] == 0  # new chats have no members to read


def test_a_batch_read_has_one_text_on_postgresql_and_a_power_of_two_list_elsewhere(
    db_url: URL, db_kind: str, make_config: MakeConfig
) -> None:
    # A batch of one chat, then batches of several: on PostgreSQL the chats are one array
    # parameter (a text psycopg parses once and the server prepares); elsewhere an IN list
    # padded to a power of two (a handful of texts to compile).
    world = generated(24)
    with Simulator(world) as sim:
        config = make_config(db_url, sim.base_url, world.chatids())
        with statements() as seen:
            run_sync(config, chatids=world.chatids()[:1])
            run_sync(config)

    fingerprints = "SELECT chats.chatid, chats.fingerprint, chats.poll_interval_seconds FROM"
    texts = [s.text for s in seen if s.text.startswith(fingerprints)]
    assert len(texts) >= 2
    if db_kind == "postgresql":
        assert len(set(texts)) == 1, texts
        assert "= ANY (" in texts[0]
        return
    for text in texts:
        listed = re.search(r"\bIN \(([^)]*)\)", text)
        assert listed is not None, text
        size = len(listed.group(1).split(","))
        assert size & (size - 1) == 0, text


@contextmanager
def sqlite_parameter_limit(limit: int) -> Iterator[None]:
    """New SQLite connections take at most ``limit`` parameters per statement (as builds
    before SQLite 3.32 did: 999), so that a test can reach the limit with a small chat."""

    def lower(dbapi_conn: Any, _record: Any) -> None:
        if isinstance(dbapi_conn, sqlite3.Connection):
            dbapi_conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)

    event.listen(Pool, "connect", lower)
    try:
        yield
    finally:
        event.remove(Pool, "connect", lower)


def test_a_chat_beyond_one_statements_parameters_is_written_whole(
    db_url: URL, make_config: MakeConfig
) -> None:
    # 400 members: 3,600 event parameters, more than SQLite takes here in one statement.
    userids = [f"user-{n:05d}" for n in range(400)]
    world = World(APP_KEY, APP_SECRET)
    world.add_chat(SimChat("chat-huge", "Huge", userids[0], userids))
    with Simulator(world) as sim, sqlite_parameter_limit(999), statements() as seen:
        result = run_sync(make_config(db_url, sim.base_url, ["chat-huge"]))

    assert (result.status, result.chats_changed) == ("succeeded", 1)
    assert current_members(db_url)["chat-huge"] == set(userids)
    joined = [e for e in rows(db_url, "chat_events") if e["event_type"] == "member_joined"]
    assert sorted(e["userid"] for e in joined) == userids
    if db_url.get_backend_name() == "sqlite":
        # At most 111 events of 9 columns per statement (SQLite refuses more parameters).
        assert counts(seen)[("INSERT", "chat_events")] >= 4


BIG = "chat-big"
QUIET = "chat-quiet"


def _users(prefix: str, first: int, last: int) -> list[str]:
    return [f"{prefix}{n:03d}" for n in range(first, last + 1)]


def _join(n: int) -> Callable[[World], None]:
    return lambda world: world.add_members(BIG, _users("new", 1, n))


def _leave(n: int) -> Callable[[World], None]:
    return lambda world: world.remove_members(BIG, _users("u", 1, n))


def _rename(world: World) -> None:
    world.set_attr(BIG, name="Big, renamed")


def _rejoin_prepare(world: World) -> None:
    world.remove_members(BIG, _users("u", 101, 120))


def _rejoin_join_and_leave(world: World) -> None:
    world.add_members(BIG, _users("u", 101, 120) + _users("new", 1, 30))
    world.remove_members(BIG, _users("u", 1, 30))


MEMBER_TABLES = ("chat_members", "chat_events")
READ = {"SELECT chat_members": 1}
JOINS = {**READ, "INSERT chat_members": 1, "INSERT chat_events": 1}
LEAVES = {**READ, "UPDATE chat_members": 1, "INSERT chat_events": 1}
# New members inserted, re-joins and leaves updated: one statement each, events in one.
MIXED = {**READ, "INSERT chat_members": 1, "UPDATE chat_members": 2, "INSERT chat_events": 1}
RENAME = {**READ, "INSERT chat_events": 1}
CHANGES: list[tuple[Callable[[World], None] | None, Callable[[World], None], dict[str, int]]] = [
    # (change synced beforehand, the change measured, statements on chat_members/chat_events)
    (None, _join(1), JOINS),
    (None, _join(80), JOINS),
    (None, _leave(1), LEAVES),
    (None, _leave(80), LEAVES),
    (_rejoin_prepare, _rejoin_join_and_leave, MIXED),
    (None, _rename, RENAME),
]


@pytest.mark.parametrize(
    ("prepare", "change", "expected"),
    CHANGES,
    ids=["1-join", "80-joins", "1-leave", "80-leaves", "rejoins-joins-leaves", "rename"],
)
def test_changed_chat_reads_members_once_and_writes_in_bulk(
    db_url: URL,
    make_config: MakeConfig,
    prepare: Callable[[World], None] | None,
    change: Callable[[World], None],
    expected: dict[str, int],
) -> None:
    world = World(APP_KEY, APP_SECRET)
    world.add_chat(SimChat(BIG, "Big", "u120", _users("u", 1, 120)))
    world.add_chat(SimChat(QUIET, "Quiet", "q001", _users("q", 1, 40)))
    with Simulator(world) as sim:
        config = make_config(db_url, sim.base_url, [BIG, QUIET])
        run_sync(config)
        if prepare is not None:
            prepare(world)
            run_sync(config)
        change(world)
        with statements() as seen:
            result = run_sync(config)
        expected_members = world.membership()[BIG]

    assert (result.status, result.chats_changed) == ("succeeded", 1)
    sent = counts(seen)
    measured = {
        f"{verb} {table}": sent[(verb, table)]
        for verb in ("SELECT", "INSERT", "UPDATE", "DELETE")
        for table in MEMBER_TABLES
        if sent[(verb, table)]
    }
    assert measured == expected
    assert current_members(db_url)[BIG] == set(expected_members)


# --------------------------------------------------------------------------------------------
# 3. The simulator from the command line


@contextmanager
def simulate_process(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``python -m etl simulate ARGS`` on a free loopback port; (process, first line)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl", "simulate", "--port", "0", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout.readline()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_simulate_serves_a_generated_mutated_rate_limited_world() -> None:
    expected = World.generate(30, seed=3, max_members=200)
    changed = expected.mutate(0.5, seed=9)
    args = ["--generate", "30", "--seed", "3", "--max-members", "200"]
    args += ["--mutate", "0.5", "--mutate-seed", "9", "--rate-limit", "2", "--latency-ms", "30"]
    with simulate_process(*args) as (proc, first_line):
        found = re.search(
            r"DingTalk simulator on (http://127\.0\.0\.1:\d+) \(30 chats, ", first_line
        )
        assert found is not None, first_line
        url = found.group(1)
        with requests.Session() as http:
            token = http.get(
                f"{url}/gettoken", params={"appkey": "demo-key", "appsecret": "demo-secret"}
            ).json()["access_token"]
            answers = []
            for chatid in ("gen-000001", "gen-000002", "gen-000003"):
                started = time.monotonic()
                answers.append(
                    http.get(
                        f"{url}/chat/get", params={"access_token": token, "chatid": chatid}
                    ).json()
                )
                assert time.monotonic() - started >= 0.03
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.stdout is not None
        # Through the same reader as the first line: it may already hold the next ones.
        rest = proc.stdout.read()

    assert proc.returncode == 0
    # Two chat/get calls a second pass; the third, within the same second, is throttled.
    assert [a["chat_info"] for a in answers[:2]] == [
        expected.chat(c).chat_info() for c in ("gen-000001", "gen-000002")
    ]
    assert answers[2]["errcode"] == 88
    assert f"changed {changed} chats (--mutate 0.5, seed 9)" in rest
    assert rest.splitlines()[-1] == "served 4 requests, 1 throttled"


def test_simulate_refuses_scenario_and_generate_together() -> None:
    scenario = REPO / "tests" / "fixtures" / "scenario_small.toml"
    done = subprocess.run(
        [sys.executable, "-m", "etl", "simulate", "--generate", "3", "--scenario", str(scenario)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--scenario and --generate are alternatives" in done.stderr
