"""The history the report, view and data-dictionary tests ask questions about.

Built for real: the simulator over HTTP, five sync runs into a migrated database of each kind.

    run 1  discover chat-fin (alice bob carol), chat-eng (dave bob), chat-old (erin bob);
           chat-x cannot be read (40016) in every run
    run 2  chat-fin: dan joins, carol leaves; chat-eng: owner dave -> bob
    run 3  chat-fin: carol re-joins, bob leaves; chat-old is dismissed (members kept)
    run 4  (`sync --all` from here: chat-old, dismissed, is read only when asked) nothing
           changes; chat-eng fails (HTTP 502 three times)
    run 5  chat-fin renamed "Finance & Controlling" and made searchable; chat-eng: dave
           leaves; chat-old fails (HTTP 502 three times)
    events group events over Stream mode, received late (the listener connects after the
           changes, so DingTalk's time is well before the time of receipt): chat-fin: alice
           removes dan, then adds him back; chat-eng: bob adds frank, then frank quits (a
           poll sees neither); chat-new, not synced: gina adds hank, and discovery adds the
           chat to the synced set (its event waits for a reconcile)
    run 6  the reconcile (trigger 'event') re-reads chat-fin and chat-eng: the events said
           it all, so it writes no row

The fixtures ``scenario`` (per module and database) and ``engine`` are registered for the
whole suite by ``tests/conftest.py``.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import URL, Engine

from etl.config import Config, parse_config
from etl.db import create_db_engine
from etl.listener import run_listen
from etl.logs import configure_logging
from etl.schema import chat_events, chats, pushed_events
from etl.simulator import SimChat, Simulator, StreamGateway, World
from etl.sync import reconcile, run_sync
from tests.conftest import APP_KEY, APP_SECRET, DATABASES
from tests.helpers import fresh_database, migrated

CHATIDS = ["chat-fin", "chat-eng", "chat-old", "chat-x"]
SAFE = {"validationType": 1, "searchable": 0, "mentionAllAuthority": 1, "managementType": 1}

# Members after each run (1-based), as the tables must remember them.
MEMBERS: dict[str, dict[int, frozenset[str]]] = {
    "chat-fin": {
        1: frozenset({"alice", "bob", "carol"}),
        2: frozenset({"alice", "bob", "dan"}),
        3: frozenset({"alice", "carol", "dan"}),
        4: frozenset({"alice", "carol", "dan"}),
        5: frozenset({"alice", "carol", "dan"}),
        6: frozenset({"alice", "carol", "dan"}),
    },
    "chat-eng": {
        1: frozenset({"dave", "bob"}),
        2: frozenset({"dave", "bob"}),
        3: frozenset({"dave", "bob"}),
        5: frozenset({"bob"}),
        6: frozenset({"bob"}),
    },
    "chat-old": {
        1: frozenset({"erin", "bob"}),
        2: frozenset({"erin", "bob"}),
        3: frozenset({"erin", "bob"}),
        4: frozenset({"erin", "bob"}),
    },
}
OWNERS = {"chat-fin": "alice", "chat-eng": "bob", "chat-old": "erin"}
# The group events, in the order they happened: (chatid, event_type, userid, operator).
EVENTS: list[tuple[str, str, str, str]] = [
    ("chat-fin", "member_left", "dan", "alice"),
    ("chat-fin", "member_joined", "dan", "alice"),
    ("chat-eng", "member_joined", "frank", "bob"),
    ("chat-eng", "member_left", "frank", "frank"),
]
# How much later than DingTalk's time of the change its event is received, at least.
RECEIVED_LATE = dt.timedelta(milliseconds=300)


def build_world() -> World:
    world = World(APP_KEY, APP_SECRET)
    world.add_chat(
        SimChat(
            "chat-fin",
            "Finance",
            "alice",
            ["alice", "bob", "carol"],
            **{**SAFE, "mentionAllAuthority": 0},
        )
    )
    world.add_chat(
        SimChat("chat-eng", "Engineering", "dave", ["dave", "bob"], **{**SAFE, "validationType": 0})
    )
    world.add_chat(SimChat("chat-old", "Old project", "erin", ["erin", "bob"], **SAFE))
    world.add_chat(SimChat("chat-x", "Secret", "zed", ["zed"], readable=False))
    return world


@dataclass
class Scenario:
    kind: str
    url: URL
    folder: Path
    run_ids: dict[int, int] = field(default_factory=dict)
    # (chatid, run) -> when that run fetched the chat (observed_at of its events, if any)
    synced_at: dict[tuple[str, int], dt.datetime] = field(default_factory=dict)
    runs: dict[int, dict[str, Any]] = field(default_factory=dict)
    # The chat_events rows of the group events (source 'event'), by (occurred_at, id).
    event_rows: list[dict[str, Any]] = field(default_factory=list)
    # The pushed_events rows, by occurred_at.
    pushed: list[dict[str, Any]] = field(default_factory=list)

    def engine(self) -> Engine:
        return create_db_engine(self.url)

    def at(self, chatid: str, run: int) -> dt.datetime:
        return self.synced_at[(chatid, run)]

    def event(self, number: int) -> dict[str, Any]:
        """The ``chat_events`` row of ``EVENTS[number]``."""
        return self.event_rows[number]

    def occurred(self, number: int) -> dt.datetime:
        """DingTalk's time of ``EVENTS[number]``."""
        at: dt.datetime = self.event(number)["occurred_at"]
        return at

    def after_event(self, number: int) -> dt.datetime:
        """A time after ``EVENTS[number]`` happened, before the next one happened and before
        it was received."""
        occurred, received = self.occurred(number), self.event(number)["observed_at"]
        following = self.occurred(number + 1) if number + 1 < len(self.event_rows) else received
        return occurred + (min(received, following) - occurred) / 2

    def between(self, chatid: str, run: int, next_run: int) -> dt.datetime:
        first, second = self.at(chatid, run), self.at(chatid, next_run)
        return first + (second - first) / 2

    def config_file(self, timezone: str = "UTC", name: str = "config.toml") -> Path:
        """A configuration with only [database] and [report], as an analyst would have."""
        path = self.folder / name
        url = self.url.render_as_string(hide_password=False)
        path.write_text(
            f'[database]\nurl = "{url}"\n[report]\ntimezone = "{timezone}"\n'
            '[logging]\nlevel = "ERROR"\n',
            encoding="utf-8",
        )
        return path


def build_scenario(kind: str, folder: Path) -> Scenario:
    configure_logging("WARNING", "json")
    url = migrated(fresh_database(kind, folder, suffix="_reports"))
    scenario = Scenario(kind, url, folder)
    world = build_world()
    with Simulator(world) as sim:
        raw = {
            "dingtalk": {
                "base_url": sim.base_url,
                "app_key": APP_KEY,
                "app_secret": APP_SECRET,
                "max_requests_per_second": 1000,
                "max_attempts": 3,
            },
            "database": {"url": url.render_as_string(hide_password=False)},
            "sync": {"chatids": CHATIDS, "concurrency": 1},
            "logging": {"level": "WARNING", "format": "json"},
        }
        config = parse_config(raw, folder / "sync.toml", environ={})

        last: dict[str, dt.datetime] = {}

        def sync(number: int, run: Callable[[], Any] = lambda: run_sync(config)) -> None:
            result = run()
            scenario.run_ids[number] = result.run_id
            scenario.runs[number] = {"status": result.status}
            engine = create_db_engine(url)
            try:
                with engine.connect() as conn:
                    rows = conn.execute(select(chats.c.chatid, chats.c.last_synced_at)).all()
            finally:
                engine.dispose()
            for chatid, synced in rows:
                if last.get(chatid) != synced:  # fetched successfully in this run
                    scenario.synced_at[(chatid, number)] = last[chatid] = synced

        sync(1)
        world.add_members("chat-fin", ["dan"])
        world.remove_members("chat-fin", ["carol"])
        world.set_attr("chat-eng", owner="bob")
        sync(2)
        world.add_members("chat-fin", ["carol"])
        world.remove_members("chat-fin", ["bob"])
        world.dismiss("chat-old")
        sync(3)
        world.inject("chat-eng", "http:502", "http:502", "http:502")
        # `sync --all`: chat-old, dismissed, is read only when asked.
        sync(4, lambda: run_sync(config, all_chats=True))
        world.set_attr("chat-fin", name="Finance & Controlling", searchable=1)
        world.remove_members("chat-eng", ["dave"])
        world.inject("chat-old", "http:502", "http:502", "http:502")
        sync(5, lambda: run_sync(config, all_chats=True))

        with StreamGateway(world, ping_interval=0.5, redeliver_after=0.5) as gateway:
            # The changes happen while no listener is connected: their events wait.
            world.remove_members("chat-fin", ["dan"], operator="alice")
            world.add_members("chat-fin", ["dan"], operator="alice")
            world.add_members("chat-eng", ["frank"], operator="bob")
            world.quit("chat-eng", "frank")
            world.add_chat(SimChat("chat-new", "New team", "gina", ["gina"]))
            world.add_members("chat-new", ["hank"], operator="gina")
            time.sleep(RECEIVED_LATE.total_seconds())
            events = {
                **raw,
                "events": {
                    "gateway_url": gateway.gateway_url,
                    "discover_chats": True,
                    # The reconcile is run below, as run 6, once every event is stored.
                    "reconcile_delay_seconds": 3600,
                },
            }
            listen(parse_config(events, folder / "listen.toml", environ={}), url, expected=5)
        sync(6, lambda: reconcile(config, ["chat-fin", "chat-eng"]))
        scenario.event_rows, scenario.pushed = _recorded_events(url)
    return scenario


def listen(config: Config, url: URL, *, expected: int) -> None:
    """``dingtalk-etl listen`` until ``expected`` events are stored, then stop it."""
    stop = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            run_listen(config, stop, lambda _chatids: None)
        except BaseException as exc:  # handed to the builder
            failed.append(exc)

    thread = threading.Thread(target=run, name="scenario-listen", daemon=True)
    thread.start()
    try:
        _wait(lambda: failed or len(_rows(url, pushed_events)) >= expected, "the events")
    finally:
        stop.set()
        thread.join(timeout=30)
    if failed:
        raise failed[0]
    assert len(_rows(url, pushed_events)) == expected


def _wait(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _rows(url: URL, table: Any, *order: Any) -> list[dict[str, Any]]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(table).order_by(*order)).mappings()]
    finally:
        engine.dispose()


def _recorded_events(url: URL) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = [
        r
        for r in _rows(url, chat_events, chat_events.c.occurred_at, chat_events.c.id)
        if r["source"] == "event"
    ]
    got = [(r["chatid"], r["event_type"], r["userid"], r["operator_userid"]) for r in rows]
    assert got == EVENTS, got
    assert all(r["observed_at"] - r["occurred_at"] >= RECEIVED_LATE for r in rows)
    return rows, _rows(url, pushed_events, pushed_events.c.occurred_at)


@pytest.fixture(scope="module", params=DATABASES, ids=DATABASES)
def scenario(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    """The history, built once per test module and database."""
    kind = str(request.param)
    return build_scenario(kind, tmp_path_factory.mktemp(f"scenario-{kind}"))


@pytest.fixture
def engine(scenario: Scenario) -> Iterator[Engine]:
    """An engine on the scenario's database, disposed of after the test."""
    engine = scenario.engine()
    yield engine
    engine.dispose()
