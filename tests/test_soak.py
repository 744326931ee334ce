"""Load: many consecutive syncs against a world that keeps changing.

Between runs members join and leave (``World.mutate``), chats are renamed, change owner, are
dismissed and new ones are added. After every run the database must equal the world (a
dismissed chat keeps the members last observed) and the run's events must be exactly the
changes made since the previous run: no change missed, none recorded twice.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import URL

from etl.db import create_db_engine
from etl.normalize import STATUS_DISMISSED
from etl.schema import chat_events, chat_members, chats
from etl.simulator import SimChat, Simulator, World
from etl.sync import run_sync
from tests.conftest import APP_KEY, APP_SECRET, MakeConfig
from tests.faults.checks import audit_problems, world_problems

# SimChat attribute -> chats column (and attribute_changed field).
COLUMNS = {
    "name": "name",
    "owner": "owner_userid",
    "conversationTag": "conversation_tag",
    "chatBannedType": "chat_banned_type",
    "searchable": "searchable",
    "validationType": "validation_type",
    "mentionAllAuthority": "mention_all_authority",
    "managementType": "management_type",
    "showHistoryType": "show_history_type",
    "icon": "icon",
    "status": "status",
}
EventKey = tuple[str, str, str | None, bool]  # event_type, chatid, userid or field, baseline
FULL_AUDIT_EVERY = 10


@dataclass(frozen=True)
class Seen:
    """One chat as the database should hold it after a run."""

    attrs: dict[str, Any]
    members: frozenset[str]


def _observe(chat: SimChat) -> tuple[dict[str, Any], frozenset[str] | None]:
    """What a sync reads: attributes, and members unless a dismissed chat lists none."""
    attrs = {column: getattr(chat, key) for key, column in COLUMNS.items()}
    if chat.status == STATUS_DISMISSED and not chat.useridlist:
        return attrs, None
    return attrs, frozenset(chat.useridlist)


def _changes(before: dict[str, Seen], world: World) -> tuple[Counter[EventKey], dict[str, Seen]]:
    """The events the next run must write, and the state it must leave."""
    expected: Counter[EventKey] = Counter()
    after: dict[str, Seen] = {}
    with world.lock:
        observed = {chatid: _observe(chat) for chatid, chat in world.chats.items()}
    for chatid, (attrs, members) in observed.items():
        old = before.get(chatid)
        if old is None:
            expected[("chat_discovered", chatid, None, False)] += 1
            expected.update(("member_joined", chatid, u, True) for u in members or ())
            after[chatid] = Seen(attrs, members or frozenset())
            continue
        expected.update(
            ("attribute_changed", chatid, column, False)
            for column, value in attrs.items()
            if old.attrs[column] != value
        )
        if members is not None:
            expected.update(("member_joined", chatid, u, False) for u in members - old.members)
            expected.update(("member_left", chatid, u, False) for u in old.members - members)
        after[chatid] = Seen(attrs, old.members if members is None else members)
    return expected, after


def _read(url: URL, run_id: int | None) -> dict[str, list[dict[str, Any]]]:
    """Chats, member rows and this run's events (not the whole, growing, log)."""
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn, conn.begin():
            return {
                "chats": [dict(r) for r in conn.execute(select(chats)).mappings()],
                "chat_members": [dict(r) for r in conn.execute(select(chat_members)).mappings()],
                "events": [
                    dict(r)
                    for r in conn.execute(
                        select(chat_events).where(chat_events.c.run_id == run_id)
                    ).mappings()
                ],
            }
    finally:
        engine.dispose()


def _written(events: list[dict[str, Any]]) -> Counter[EventKey]:
    return Counter(
        (e["event_type"], e["chatid"], e["userid"] or e["field"], bool(e["is_baseline"]))
        for e in events
    )


def _change_world(world: World, rng: random.Random, run: int, pool: list[str]) -> None:
    world.mutate(0.25, seed=run)  # joins, leaves, now and then a rename or a new owner
    if rng.random() < 0.3:
        members = rng.sample(pool, rng.randint(1, 40))
        world.add_chat(SimChat(f"soak-new-{run:04d}", f"New {run}", members[0], members))
    active = [c for c in world.chatids() if world.chat(c).status == 1]
    if rng.random() < 0.15 and len(active) > 5:
        # Half the time DingTalk answers a dismissed chat with an empty member list.
        world.dismiss(rng.choice(active), keep_members=rng.random() < 0.5)
    if rng.random() < 0.2:
        world.set_attr(rng.choice(active), searchable=rng.randint(0, 1), icon=f"@icon{run}")


@pytest.mark.parametrize(
    "runs",
    [
        # Minutes rather than seconds when the machine is busy: past the default timeout.
        pytest.param(30, id="30-runs", marks=pytest.mark.timeout(600)),
        pytest.param(80, id="80-runs", marks=[pytest.mark.slow, pytest.mark.timeout(600)]),
    ],
)
def test_soak_database_follows_a_changing_world(
    db_url: URL, db_kind: str, make_config: MakeConfig, runs: int
) -> None:
    rng = random.Random(f"soak-{db_kind}-{runs}")
    world = World.generate(24, seed=3, users=600, min_members=3, max_members=150)
    world.app_key, world.app_secret = APP_KEY, APP_SECRET
    pool = [f"user-{i:06d}" for i in range(1, 601)]
    state: dict[str, Seen] = {}
    totals: Counter[str] = Counter()
    with Simulator(world) as sim:
        for run in range(runs):
            if run:
                _change_world(world, rng, run, pool)
            expected, state = _changes(state, world)
            result = run_sync(make_config(db_url, sim.base_url, world.chatids()))

            assert result.status == "succeeded", result.summary()
            tables = _read(db_url, result.run_id)
            assert _written(tables["events"]) == expected, f"run {run + 1}"
            assert result.chats_changed == len({key[1] for key in expected})
            want = {
                chatid: {
                    "members": seen.members,
                    "name": seen.attrs["name"],
                    "owner": seen.attrs["owner_userid"],
                    "status": seen.attrs["status"],
                }
                for chatid, seen in state.items()
            }
            assert world_problems(tables, want) == [], f"run {run + 1}"
            if (run + 1) % FULL_AUDIT_EVERY == 0 or run + 1 == runs:
                # The whole log replayed: cost grows with it, so not after every run.
                assert audit_problems(db_url) == [], f"run {run + 1}"
            totals.update(key[0] for key in expected.elements())
            totals["chats synced"] += result.chats_total

    print(f"\n{db_kind}: {runs} runs, {dict(totals)}")
