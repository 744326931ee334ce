"""What "nothing lost, nothing half-written" means, as checks over the whole database.

Used after kill loops, lost databases and soak runs. Each function returns a list of problems
(empty when all is well), so a failing test shows every contradiction at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import URL

from etl.db import create_db_engine
from etl.simulator import SimChat, World
from tests.conftest import APP_KEY, APP_SECRET
from tests.helpers import ORDER, TABLES

MEMBER_EVENTS = ("member_joined", "member_left")
Tables = Mapping[str, list[dict[str, Any]]]


def load_tables(url: URL) -> dict[str, list[dict[str, Any]]]:
    """Every table of the schema, read in one transaction (a consistent snapshot)."""
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn, conn.begin():
            return {
                name: [dict(r) for r in conn.execute(select(t).order_by(*ORDER[name])).mappings()]
                for name, t in TABLES.items()
            }
    finally:
        engine.dispose()


def audit_problems(db: URL | Tables, *, finished: bool = True) -> list[str]:
    """Contradictions between the tables: every guarantee that does not need the world.

    - a chat row's member_count equals its current member rows;
    - each chat has exactly one chat_discovered, its baseline joins come from that run, and
      every chatid in members or events has a chat row (no half-written chat);
    - replaying each chat's member events from the baseline gives exactly its current member
      rows, each join of a non-member and each leave of a member (no duplicate events);
    - at most one member event per (run, chat, user);
    - a run item says changed=True exactly when that run wrote events for that chat, and every
      event has an ok item of its run (the item commits with the chat's writes);
    - ``finished``: no run is left ``running``.
    """
    tables = load_tables(db) if isinstance(db, URL) else db
    problems: list[str] = []
    chats = {c["chatid"]: c for c in tables["chats"]}
    members = tables["chat_members"]
    events = tables["chat_events"]
    items = tables["sync_run_items"]
    runs = tables["sync_runs"]

    current: dict[str, set[str]] = {}
    for member in members:
        if member["chatid"] not in chats:
            problems.append(f"member row of unknown chat {member['chatid']!r}")
        if member["left_at"] is None:
            current.setdefault(member["chatid"], set()).add(member["userid"])
        elif member["left_at"] < member["joined_at"]:
            problems.append(f"{member['chatid']}/{member['userid']}: left before it joined")
    for chatid, chat in chats.items():
        count = len(current.get(chatid, ()))
        if chat["member_count"] != count:
            problems.append(f"{chatid}: member_count {chat['member_count']} but {count} rows")

    by_chat: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_chat.setdefault(event["chatid"], []).append(event)
    for chatid in sorted(set(by_chat) | set(chats)):
        problems.extend(_replay(chatid, by_chat.get(chatid, []), chatid in chats, current))

    per_user = Counter(
        (e["run_id"], e["chatid"], e["userid"]) for e in events if e["event_type"] in MEMBER_EVENTS
    )
    problems.extend(
        f"run {run}: {count} member events for {chatid}/{userid}"
        for (run, chatid, userid), count in per_user.items()
        if count > 1
    )

    item_by_key = {(i["run_id"], i["chatid"]): i for i in items}
    written = {(e["run_id"], e["chatid"]) for e in events}
    for key in sorted(written):
        item = item_by_key.get(key)
        if item is None or item["status"] != "ok" or not item["changed"]:
            problems.append(f"run {key[0]} wrote events for {key[1]} but its item is {item}")
    for key, item in sorted(item_by_key.items()):
        if item["changed"] and key not in written:
            problems.append(f"run {key[0]}: {key[1]} marked changed without events")
        if item["status"] == "ok" and key[1] not in chats:
            problems.append(f"run {key[0]}: {key[1]} ok but has no chat row")

    if finished:
        problems.extend(f"run {r['id']} left running" for r in runs if r["status"] == "running")
    return problems


def _replay(
    chatid: str, events: list[dict[str, Any]], has_row: bool, current: Mapping[str, set[str]]
) -> list[str]:
    problems: list[str] = []
    discovered = [e for e in events if e["event_type"] == "chat_discovered"]
    if not has_row:
        return [f"{chatid}: {len(events)} events but no chat row"] if events else []
    if len(discovered) != 1:
        return [f"{chatid}: {len(discovered)} chat_discovered events"]
    discovery_run = discovered[0]["run_id"]
    state: set[str] = set()
    for event in sorted(events, key=lambda e: e["id"]):
        kind, userid = event["event_type"], event["userid"]
        if event["is_baseline"] and (kind != "member_joined" or event["run_id"] != discovery_run):
            problems.append(f"{chatid}: baseline {kind} of {userid} in run {event['run_id']}")
        if kind == "member_joined":
            if userid in state:
                problems.append(f"{chatid}: {userid} joined twice without leaving")
            state.add(userid)
        elif kind == "member_left":
            if userid not in state:
                problems.append(f"{chatid}: {userid} left without being a member")
            state.discard(userid)
    if state != current.get(chatid, set()):
        problems.append(
            f"{chatid}: events replay to {len(state)} members, rows say "
            f"{len(current.get(chatid, set()))} (differences: "
            f"{sorted(state ^ current.get(chatid, set()))[:5]})"
        )
    return problems


def world_problems(db: URL | Tables, expected: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Differences between the database and what it should hold.

    ``expected``: chatid -> {"members": set, "name": str, "owner": str, "status": int}.
    """
    tables = load_tables(db) if isinstance(db, URL) else db
    problems: list[str] = []
    chats = {c["chatid"]: c for c in tables["chats"]}
    current: dict[str, set[str]] = {}
    for member in tables["chat_members"]:
        if member["left_at"] is None:
            current.setdefault(member["chatid"], set()).add(member["userid"])
    if set(chats) != set(expected):
        problems.append(f"chats {sorted(set(chats) ^ set(expected))[:5]} differ")
    for chatid, want in sorted(expected.items()):
        chat = chats.get(chatid)
        if chat is None:
            continue
        got = current.get(chatid, set())
        if got != set(want["members"]):
            diff = sorted(got ^ set(want["members"]))
            problems.append(f"{chatid}: {len(diff)} members differ, e.g. {diff[:5]}")
        for column, key in (("name", "name"), ("owner_userid", "owner"), ("status", "status")):
            if chat[column] != want[key]:
                problems.append(f"{chatid}: {column} {chat[column]!r} != {want[key]!r}")
    return problems


def world_state(world: World) -> dict[str, dict[str, Any]]:
    """The simulated chats as ``world_problems`` expects them: a deep copy, read under the
    world's lock while the simulator may be serving it."""
    with world.lock:
        return {
            chat.chatid: {
                "members": set(chat.useridlist),
                "name": chat.name,
                "owner": chat.owner,
                "status": chat.status,
            }
            for chat in world.chats.values()
        }


def numbered_world(n: int, **settings: Any) -> World:
    """``n`` chats ``chat-00``... of two members each, one user shared by all of them;
    ``settings`` are the ``World``'s (token lifetime, latency)."""
    world = World(APP_KEY, APP_SECRET, **settings)
    for i in range(n):
        world.add_chat(SimChat(f"chat-{i:02d}", f"Chat {i}", f"u{i}", [f"u{i}", "u-shared"]))
    return world
