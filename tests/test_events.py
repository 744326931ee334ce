"""Stream-mode frames and group events as plain data, over recorded frames (no I/O)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from etl.events import (
    Change,
    FrameError,
    ack_later,
    ack_success,
    parse_event,
    parse_frame,
)

FRAMES = Path(__file__).parent / "fixtures" / "stream"
RECEIVED = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


def ms(value: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(value / 1000, tz=dt.UTC)


@dataclass(frozen=True)
class Case:
    id: str
    file: str
    chatid: str | None
    occurred_at: dt.datetime
    operator: str | None
    changes: tuple[Change, ...] = ()
    invalid: str | None = None


CASES = [
    Case(
        "reference-add",
        "add_member_reference.json",
        "chat28367b03",
        ms(1608027106990),
        "10203029011219896",
        (Change("member_joined", userid="user456"),),
    ),
    Case(
        "add-two-deduplicated",
        "add_members_two.json",
        "chat-a",
        ms(1700000000000),
        "u1",
        (Change("member_joined", userid="u7"), Change("member_joined", userid="u8")),
    ),
    Case(
        "remove",
        "remove_member.json",
        "chat-a",
        ms(1700000001000),
        "u1",
        (Change("member_left", userid="u2"),),
    ),
    Case(
        "quit-is-the-operator-leaving",
        "quit.json",
        "chat-a",
        ms(1700000002000),
        "u3",
        (Change("member_left", userid="u3"),),
    ),
    Case(
        "owner",
        "update_owner.json",
        "chat-a",
        ms(1700000003000),
        "u1",
        (Change("attribute_changed", field="owner_userid", new_value="u2"),),
    ),
    Case(
        "title",
        "update_title.json",
        "chat-a",
        ms(1700000004000),
        "u1",
        (Change("attribute_changed", field="name", new_value="财务群 2026"),),
    ),
    Case(
        "disband",
        "disband.json",
        "chat-a",
        ms(1700000005000),
        "u1",
        (Change("attribute_changed", field="status", old_value="1", new_value="2"),),
    ),
    Case(
        "callback-keys-and-string-time",
        "callback_keys.json",
        "chat-a",
        ms(1700000006000),
        "u1",
        (Change("member_left", userid="u4"),),
    ),
    Case(
        "no-timestamp-uses-born-time",
        "no_timestamp.json",
        "chat-a",
        ms(1700000007000),
        "u1",
        (Change("member_joined", userid="u9"),),
    ),
    Case(
        "unknown-fields-ignored",
        "extra_fields.json",
        "chat-a",
        ms(1700000012000),
        "u1",
        (Change("member_joined", userid="u9"),),
    ),
    Case(
        "reference-owner-has-no-chatid",
        "update_owner_reference.json",
        None,
        ms(1608027106990),
        None,
        invalid="data.chatId: missing",
    ),
    Case(
        "quit-without-operator",
        "quit_without_operator.json",
        "chat-a",
        ms(1700000008000),
        None,
        invalid="data.operator: missing (who left)",
    ),
    Case(
        "add-without-userids",
        "add_without_userids.json",
        "chat-a",
        ms(1700000009000),
        "u1",
        invalid="data.userId: expected a non-empty list of userids",
    ),
    Case(
        "userid-not-a-string",
        "userid_not_string.json",
        "chat-a",
        ms(1700000010000),
        "u1",
        invalid="data.userId[1]: expected a string",
    ),
    Case(
        "timestamp-garbage",
        "timestamp_garbage.json",
        "chat-a",
        RECEIVED,
        "u1",
        invalid="data.timeStamp: expected milliseconds since the epoch",
    ),
    Case(
        "chatid-too-long",
        "chatid_too_long.json",
        None,
        ms(1700000011000),
        "u1",
        invalid="data.chatId: id longer than 128 characters",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_recorded_event(case: Case) -> None:
    text = (FRAMES / case.file).read_text(encoding="utf-8")
    frame = parse_frame(text)

    event = parse_event(frame, RECEIVED)

    assert frame.type == "EVENT"
    assert event.event_id == "evt-0001"
    assert event.event_type == frame.event_type
    assert (event.chatid, event.occurred_at, event.operator_userid) == (
        case.chatid,
        case.occurred_at,
        case.operator,
    )
    assert event.changes == case.changes
    assert event.invalid == case.invalid
    assert event.payload == json.loads(json.loads(text)["data"])


def test_every_recorded_frame_is_a_case() -> None:
    assert {c.file for c in CASES} == {p.name for p in FRAMES.glob("*.json")}


BAD_FRAMES = [
    ("not-json", "{", "frame is not JSON: JSONDecodeError"),
    ("not-an-object", "[1, 2]", "frame is JSON but not an object"),
    ("no-type", '{"headers": {}}', "frame has no type"),
    ("no-headers", '{"type": "EVENT"}', "frame has no headers object"),
    ("deep", "[" * 100_000, "frame is not JSON: RecursionError"),
]


@pytest.mark.parametrize(
    ("text", "message"), [b[1:] for b in BAD_FRAMES], ids=[b[0] for b in BAD_FRAMES]
)
def test_unreadable_frame(text: str, message: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_frame(text)
    assert str(info.value) == message


BAD_EVENTS = [
    ("no-event-id", {"eventType": "chat_quit"}, "{}", "event frame has no usable eventId header"),
    (
        "data-not-json",
        {"eventId": "e1", "eventType": "chat_quit"},
        "{oops",
        "event e1: data is not JSON",
    ),
    (
        "data-not-object",
        {"eventId": "e1", "eventType": "chat_quit"},
        '"text"',
        "event e1: data is not a JSON object",
    ),
]


@pytest.mark.parametrize(
    ("headers", "data", "message"), [b[1:] for b in BAD_EVENTS], ids=[b[0] for b in BAD_EVENTS]
)
def test_event_frame_that_cannot_be_kept(headers: dict[str, str], data: str, message: str) -> None:
    frame = parse_frame(json.dumps({"type": "EVENT", "headers": headers, "data": data}))
    with pytest.raises(FrameError) as info:
        parse_event(frame, RECEIVED)
    assert str(info.value) == message


def test_acks_follow_the_go_sdk() -> None:
    assert json.loads(ack_success("m1")) == {
        "code": 200,
        "headers": {"messageId": "m1", "contentType": "application/json"},
        "message": "OK",
        "data": '{"status": "SUCCESS", "message": "success"}',
    }
    later = json.loads(ack_later("m2"))
    assert later["code"] == 500
    assert json.loads(later["data"]) == {"status": "LATER", "message": "later"}
