"""Store.write_chats writes what the planner plans, on every database.

One chat fetched again and again (a recorded payload, edited step by step). Before each
write the stored state is read back as the planner's input; after it, the tables must hold
exactly the plan: its ``chats`` row, its member writes, its events in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from etl.bulk import CHAT_COLUMNS
from etl.db import create_db_engine, utcnow
from etl.normalize import ATTRIBUTE_FIELDS, normalize_chat
from etl.planner import StoredChat, plan_chat
from etl.runlog import RunLog
from etl.store import ChatOutcome, Store
from tests.helpers import rows

FIXTURES = Path(__file__).parent / "fixtures" / "chat_info"
# A ``chat_events`` row's columns in the order of the planner's ``Event``.
EVENT = ("event_type", "userid", "field", "old_value", "new_value", "is_baseline")

# Each step edits the payload of the step before (API keys).
STEPS: list[tuple[str, dict[str, Any]]] = [
    ("discovered", {}),
    (
        "rename-joins-leaves",
        {"name": "Renamed", "searchable": 1, "useridlist": ["u-b", "manager4220", "u-a"]},
    ),
    ("rejoin", {"useridlist": ["manager4220", "u-a", "u-b", "user123"]}),
    ("same-members-other-order", {"useridlist": ["user123", "u-b", "u-a", "manager4220"]}),
    ("unmodelled-key-only", {"extra": "x"}),
    ("dismissed-empty-useridlist", {"status": 2, "useridlist": []}),
    ("still-dismissed", {"extra": "y"}),
]


def stored_state(url: URL) -> StoredChat | None:
    chats = rows(url, "chats")
    if not chats:
        return None
    (chat,) = chats
    return StoredChat(
        attributes={name: chat[name] for name in ATTRIBUTE_FIELDS},
        member_count=chat["member_count"],
        first_seen_at=chat["first_seen_at"],
        last_changed_at=chat["last_changed_at"],
        dismissed_at=chat["dismissed_at"],
        members={m["userid"]: m["left_at"] for m in rows(url, "chat_members")},
    )


def test_the_tables_hold_the_plan_step_after_step(db_url: URL) -> None:
    payload = json.loads((FIXTURES / "reference.json").read_text(encoding="utf-8"))
    engine = create_db_engine(db_url)
    try:
        with Store(engine) as store:
            for step, changes in STEPS:
                # One run per fetch: a run has one item per chat.
                run_id, _ = RunLog(engine).start_run("manual", 1, now=utcnow())
                payload = {**payload, **changes}
                record = normalize_chat("chat-1", payload)
                before = {name: rows(db_url, name) for name in ("chats", "chat_members")}
                stored = stored_state(db_url)
                # Same fingerprint: the store does not even ask the planner.
                unchanged = any(c["fingerprint"] == record.fingerprint for c in before["chats"])
                now = utcnow()
                plan = plan_chat(record, stored, now)
                seen = len(rows(db_url, "chat_events"))

                changed = store.write_chats(run_id, [ChatOutcome("chat-1", now, 1, 5, record)])

                written = rows(db_url, "chat_events")[seen:]
                got = [tuple(e[column] for column in EVENT) for e in written]
                assert got == ([] if unchanged else plan.events), step
                assert {(e["run_id"], e["observed_at"]) for e in written} <= {(run_id, now)}
                assert changed == [bool(written)], step
                (chat,) = rows(db_url, "chats")
                if unchanged:
                    assert chat == {**before["chats"][0], "last_synced_at": now}, step
                    assert rows(db_url, "chat_members") == before["chat_members"], step
                    continue
                assert {name: chat[name] for name in CHAT_COLUMNS} == plan.chat_row, step
                members = {m["userid"]: m for m in rows(db_url, "chat_members")}
                olds = {m["userid"]: m for m in before["chat_members"]}
                for userid, member in members.items():
                    if userid in (*plan.new_members, *plan.rejoined):
                        expected = {**member, "joined_at": now, "left_at": None}
                    elif userid in plan.left:
                        expected = {**olds[userid], "left_at": now}
                    else:
                        expected = olds[userid]
                    assert member == expected, (step, userid)
                assert set(members) == set(olds) | set(plan.new_members), step
    finally:
        engine.dispose()
