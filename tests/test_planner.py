"""plan_chat over recorded chat_info payloads and stored states: the contract's rules, no database.

Each case gives a fetched record (a recorded payload, maybe edited) and what was stored
before (None for a new chat), and names the events, member writes and ``chats`` values the
planner must decide.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from etl.bulk import CHAT_COLUMNS
from etl.normalize import ATTRIBUTE_FIELDS, ChatRecord, normalize_chat
from etl.planner import ChatPlan, Event, StoredChat, plan_chat

FIXTURES = Path(__file__).parent / "fixtures" / "chat_info"

FIRST_SEEN = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.UTC)
LAST_CHANGED = dt.datetime(2026, 3, 2, 8, 0, tzinfo=dt.UTC)
DISMISSED = dt.datetime(2026, 3, 3, 8, 0, tzinfo=dt.UTC)
LEFT = dt.datetime(2026, 3, 4, 8, 0, tzinfo=dt.UTC)
NOW = dt.datetime(2026, 3, 5, 8, 0, tzinfo=dt.UTC)

FLAGS = (
    "conversation_tag",
    "chat_banned_type",
    "searchable",
    "validation_type",
    "mention_all_authority",
    "management_type",
    "show_history_type",
)
# reference.json lists these two.
REFERENCE_MEMBERS = {"manager4220": None, "user123": None}


def record(fixture: str = "reference.json", **changes: Any) -> ChatRecord:
    """The recorded payload ``fixture`` with ``changes`` (API keys; None drops the key)."""
    payload = json.loads((FIXTURES / fixture).read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    return normalize_chat("chat-1", payload)


def stored(
    fixture: str = "reference.json",
    *,
    members: dict[str, dt.datetime | None] | None = None,
    dismissed_at: dt.datetime | None = None,
    **attributes: Any,
) -> StoredChat:
    """``fixture`` as stored by earlier syncs, with ``attributes`` (columns) as given."""
    members = dict(REFERENCE_MEMBERS) if members is None else members
    return StoredChat(
        attributes={**record(fixture).attributes, **attributes},
        member_count=sum(left_at is None for left_at in members.values()),
        first_seen_at=FIRST_SEEN,
        last_changed_at=LAST_CHANGED,
        dismissed_at=dismissed_at,
        members=members,
    )


DISCOVERED: Event = ("chat_discovered", None, None, None, None, False)


def joined(*userids: str, baseline: bool = False) -> list[Event]:
    return [("member_joined", userid, None, None, None, baseline) for userid in userids]


def left(*userids: str) -> list[Event]:
    return [("member_left", userid, None, None, None, False) for userid in userids]


def changed(name: str, old: str | None, new: str | None) -> Event:
    return ("attribute_changed", None, name, old, new, False)


@dataclass(frozen=True)
class Case:
    id: str
    record: ChatRecord
    stored: StoredChat | None
    events: list[Event]
    member_count: int
    last_changed_at: dt.datetime
    dismissed_at: dt.datetime | None = None
    new_members: list[str] = field(default_factory=list)
    rejoined: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


CASES = [
    Case(
        "new-chat-baseline-members",
        record(),
        None,
        events=[DISCOVERED, *joined("manager4220", "user123", baseline=True)],
        new_members=["manager4220", "user123"],
        member_count=2,
        last_changed_at=NOW,
    ),
    Case(
        "new-chat-dismissed-at-discovery",
        record("dismissed_empty_useridlist.json"),
        None,
        events=[DISCOVERED],
        member_count=0,
        last_changed_at=NOW,
        dismissed_at=NOW,
    ),
    Case(
        "no-change-keeps-last-changed-at",
        # Listed in another order, with a key the tables do not model: a new fingerprint.
        record(useridlist=["user123", "manager4220"], extra="x"),
        stored(),
        events=[],
        member_count=2,
        last_changed_at=LAST_CHANGED,
    ),
    Case(
        "flag-set-where-none-was",
        record("minimal.json", searchable=1),
        stored("minimal.json", members={"u1": None}),
        events=[changed("searchable", None, "1")],
        member_count=1,
        last_changed_at=NOW,
    ),
    Case(
        "member-joins",
        record(useridlist=["user123", "manager4220", "u-new"]),
        stored(),
        events=joined("u-new"),
        new_members=["u-new"],
        member_count=3,
        last_changed_at=NOW,
    ),
    Case(
        "member-leaves",
        record(useridlist=["manager4220"]),
        stored(),
        events=left("user123"),
        left=["user123"],
        member_count=1,
        last_changed_at=NOW,
    ),
    Case(
        "former-member-rejoins",
        record(useridlist=["user123", "manager4220", "u-old"]),
        stored(members={**REFERENCE_MEMBERS, "u-old": LEFT}),
        events=joined("u-old"),
        rejoined=["u-old"],  # its row is re-opened, not inserted a second time
        member_count=3,
        last_changed_at=NOW,
    ),
    Case(
        "former-member-stays-away",
        record(),
        stored(members={**REFERENCE_MEMBERS, "u-old": LEFT}),
        events=[],
        member_count=2,
        last_changed_at=LAST_CHANGED,
    ),
    Case(
        "attributes-then-joins-then-leaves-sorted",
        record(name="Renamed", searchable=1, useridlist=["manager4220", "u-b", "u-a", "u-old"]),
        stored(members={**REFERENCE_MEMBERS, "u-old": LEFT}),
        events=[
            changed("name", "All-staff Chat", "Renamed"),
            changed("searchable", "0", "1"),
            *joined("u-a", "u-b", "u-old"),
            *left("user123"),
        ],
        new_members=["u-a", "u-b"],
        rejoined=["u-old"],
        left=["user123"],
        member_count=4,
        last_changed_at=NOW,
    ),
    Case(
        "dismissed-empty-useridlist-keeps-members",
        record("dismissed_empty_useridlist.json"),
        stored("dismissed_empty_useridlist.json", status=1),
        events=[changed("status", "1", "2")],
        member_count=2,
        last_changed_at=NOW,
        dismissed_at=NOW,
    ),
    Case(
        "dismissed-missing-useridlist-keeps-members",
        record("dismissed_missing_useridlist.json"),
        stored("dismissed_missing_useridlist.json", status=1),
        events=[changed("status", "1", "2")],
        member_count=2,
        last_changed_at=NOW,
        dismissed_at=NOW,
    ),
    Case(
        "dismissed-with-useridlist-compares-members",
        record(status=2, useridlist=["manager4220"]),
        stored(),
        events=[changed("status", "1", "2"), *left("user123")],
        left=["user123"],
        member_count=1,
        last_changed_at=NOW,
        dismissed_at=NOW,
    ),
    Case(
        "still-dismissed-keeps-dismissed-at",
        record("dismissed_empty_useridlist.json", extra="x"),
        stored("dismissed_empty_useridlist.json", dismissed_at=DISMISSED),
        events=[],
        member_count=2,
        last_changed_at=LAST_CHANGED,
        dismissed_at=DISMISSED,
    ),
    Case(
        "restored-clears-dismissed-at",
        record(),
        stored(status=2, dismissed_at=DISMISSED),
        events=[changed("status", "2", "1")],
        member_count=2,
        last_changed_at=NOW,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_plan(case: Case) -> None:
    before = copy.deepcopy(case.stored)

    plan = plan_chat(case.record, case.stored, NOW)

    assert list(plan.events) == case.events
    assert plan.changed == bool(case.events)
    assert list(plan.new_members) == case.new_members
    assert list(plan.rejoined) == case.rejoined
    assert list(plan.left) == case.left
    row = plan.chat_row
    assert {name: row[name] for name in ATTRIBUTE_FIELDS} == dict(case.record.attributes)
    assert row["member_count"] == case.member_count
    assert row["first_seen_at"] == (NOW if case.stored is None else FIRST_SEEN)
    assert row["last_synced_at"] == NOW
    assert row["last_changed_at"] == case.last_changed_at
    assert row["dismissed_at"] == case.dismissed_at
    assert (row["raw"], row["fingerprint"]) == (case.record.raw, case.record.fingerprint)
    assert (plan.chatid, plan.observed_at) == ("chat-1", NOW)
    assert case.stored == before  # the stored state is read, never altered


# field -> (payload change in API keys, old value as text, new value as text)
ATTRIBUTE_CHANGES: dict[str, tuple[dict[str, Any], str | None, str | None]] = {
    "name": ({"name": "Renamed"}, "All-staff Chat", "Renamed"),
    "owner_userid": ({"owner": "user123"}, "manager4220", "user123"),
    "conversation_tag": ({"conversationTag": 0}, "2", "0"),
    "chat_banned_type": ({"chatBannedType": 1}, "0", "1"),
    "searchable": ({"searchable": 1}, "0", "1"),
    "validation_type": ({"validationType": 1}, "0", "1"),
    "mention_all_authority": ({"mentionAllAuthority": 1}, "0", "1"),
    "management_type": ({"managementType": 1}, "0", "1"),
    "show_history_type": ({"showHistoryType": 1}, "0", "1"),
    "icon": ({"icon": None}, "@lADPDfJ6Q7LLejDNAljNAlg", None),
    "status": ({"status": 2}, "1", "2"),
}


def test_every_attribute_has_a_change_case() -> None:
    assert tuple(ATTRIBUTE_CHANGES) == ATTRIBUTE_FIELDS


@pytest.mark.parametrize(
    ("name", "change", "old", "new"),
    [(name, *case) for name, case in ATTRIBUTE_CHANGES.items()],
    ids=list(ATTRIBUTE_CHANGES),
)
def test_attribute_change_is_one_event_with_text_values(
    name: str, change: dict[str, Any], old: str | None, new: str | None
) -> None:
    plan = plan_chat(record(**change), stored(), NOW)

    assert list(plan.events) == [changed(name, old, new)]
    assert plan.chat_row["last_changed_at"] == NOW
    assert (plan.new_members, plan.rejoined, plan.left) == ([], [], [])


def test_new_chat_row_holds_every_written_column_as_plain_values() -> None:
    fetched = record("minimal.json")

    plan: ChatPlan = plan_chat(fetched, None, NOW)

    assert plan.chat_row == {
        "chatid": "chat-1",
        "name": "",
        "owner_userid": "u1",
        **dict.fromkeys(FLAGS),
        "icon": None,
        "status": 1,
        "member_count": 1,
        "first_seen_at": NOW,
        "last_synced_at": NOW,
        "last_changed_at": NOW,
        "dismissed_at": None,
        "raw": {"name": "", "owner": "u1", "useridlist": ["u1"], "status": 1},
        "fingerprint": fetched.fingerprint,
    }
    assert tuple(plan.chat_row) == CHAT_COLUMNS
