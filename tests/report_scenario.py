"""The history the report, view and data-dictionary tests ask questions about.

Built for real: the simulator over HTTP, five sync runs into a migrated database of each kind.

    run 1  discover chat-fin (alice bob carol), chat-eng (dave bob), chat-old (erin bob);
           chat-x cannot be read (40016) in every run
    run 2  chat-fin: dan joins, carol leaves; chat-eng: owner dave -> bob
    run 3  chat-fin: carol re-joins, bob leaves; chat-old is dismissed (members kept)
    run 4  nothing changes; chat-eng fails (HTTP 502 three times)
    run 5  chat-fin renamed "Finance & Controlling" and made searchable; chat-eng: dave
           leaves; chat-old fails (HTTP 502 three times)

The fixtures ``scenario`` (per module and database) and ``engine`` are registered for the
whole suite by ``tests/conftest.py``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import URL, Engine

from etl.config import parse_config
from etl.db import create_db_engine
from etl.logs import configure_logging
from etl.schema import chats
from etl.simulator import SimChat, Simulator, World
from etl.sync import run_sync
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
    },
    "chat-eng": {
        1: frozenset({"dave", "bob"}),
        2: frozenset({"dave", "bob"}),
        3: frozenset({"dave", "bob"}),
        5: frozenset({"bob"}),
    },
    "chat-old": {
        1: frozenset({"erin", "bob"}),
        2: frozenset({"erin", "bob"}),
        3: frozenset({"erin", "bob"}),
        4: frozenset({"erin", "bob"}),
    },
}
OWNERS = {"chat-fin": "alice", "chat-eng": "bob", "chat-old": "erin"}


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

    def engine(self) -> Engine:
        return create_db_engine(self.url)

    def at(self, chatid: str, run: int) -> dt.datetime:
        return self.synced_at[(chatid, run)]

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

        def sync(number: int) -> None:
            result = run_sync(config)
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
        sync(4)
        world.set_attr("chat-fin", name="Finance & Controlling", searchable=1)
        world.remove_members("chat-eng", ["dave"])
        world.inject("chat-old", "http:502", "http:502", "http:502")
        sync(5)
    return scenario


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
