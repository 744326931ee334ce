"""normalize_chat over recorded chat_info payloads: typed records, or errors naming the field."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from etl.errors import ChatError, PayloadError
from etl.normalize import ChatRecord, fingerprint, normalize_chat

FIXTURES = Path(__file__).parent / "fixtures" / "chat_info"

# The ``chats`` columns a ChatRecord's attributes map to, in the contract's order.
CONTRACT_COLUMNS = (
    "name",
    "owner_userid",
    "conversation_tag",
    "chat_banned_type",
    "searchable",
    "validation_type",
    "mention_all_authority",
    "management_type",
    "show_history_type",
    "icon",
    "status",
)
REFERENCE_FLAGS = {
    "conversation_tag": 2,
    "chat_banned_type": 0,
    "searchable": 0,
    "validation_type": 0,
    "mention_all_authority": 0,
    "management_type": 0,
    "show_history_type": 0,
}


def load(name: str) -> Any:
    """A recorded payload, parsed as Python's json does by default (NaN included)."""
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def reference() -> dict[str, Any]:
    payload = load("reference.json")
    assert isinstance(payload, dict)
    return payload


# file -> (expected attributes, expected members; None = membership left as is)
VALID: list[tuple[str, dict[str, Any], frozenset[str] | None]] = [
    (
        "reference.json",
        {
            "name": "All-staff Chat",
            "owner_userid": "manager4220",
            **REFERENCE_FLAGS,
            "icon": "@lADPDfJ6Q7LLejDNAljNAlg",
            "status": 1,
        },
        frozenset({"user123", "manager4220"}),
    ),
    (
        "extra_keys.json",
        {
            "name": "财务部 \U0001f4b0 Finance",
            "owner_userid": "0420506555",
            **REFERENCE_FLAGS,
            "searchable": 1,
            "management_type": 1,
            "show_history_type": 1,
            "icon": "@lADPDfJ6Q7LLejDNAljNAlg",
            "status": 1,
        },
        # "user123" is listed twice: one member.
        frozenset({"0420506555", "manager4220", "user123"}),
    ),
    (
        "dismissed_empty_useridlist.json",
        {
            "name": "Old Project",
            "owner_userid": "manager4220",
            **REFERENCE_FLAGS,
            "icon": "@lADPDfJ6Q7LLejDNAljNAlg",
            "status": 2,
        },
        None,
    ),
    (
        "dismissed_missing_useridlist.json",
        {
            "name": "Old Project",
            "owner_userid": "manager4220",
            **REFERENCE_FLAGS,
            "icon": "@lADPDfJ6Q7LLejDNAljNAlg",
            "status": 2,
        },
        None,
    ),
    (
        "minimal.json",
        {
            "name": "",
            "owner_userid": "u1",
            **dict.fromkeys(REFERENCE_FLAGS),
            "icon": None,
            "status": 1,
        },
        frozenset({"u1"}),
    ),
]

INVALID: list[tuple[str, str]] = [
    (
        "invalid_useridlist_not_list.json",
        "chat_info.useridlist: expected a list, got a string ('user123,manager4220')",
    ),
    (
        "invalid_userid_integer.json",
        "chat_info.useridlist[1]: expected a string, got an integer (5)",
    ),
    (
        "invalid_flag_boolean.json",
        "chat_info.searchable: expected an integer, got a boolean (True)",
    ),
    (
        "invalid_flag_string.json",
        "chat_info.chatBannedType: expected an integer, got a string ('0')",
    ),
    ("invalid_status_3.json", "chat_info.status: expected 1 or 2, got 3"),
    ("invalid_status_string.json", "chat_info.status: expected 1 or 2, got a string ('1')"),
    ("invalid_status_missing.json", "chat_info.status: missing"),
    ("invalid_name_missing.json", "chat_info.name: missing"),
    ("invalid_owner_empty.json", "chat_info.owner: empty id"),
    ("invalid_name_nul.json", "chat_info.name: contains a NUL character"),
    ("invalid_name_lone_surrogate.json", "chat_info.name: contains an unpaired surrogate"),
    ("invalid_userid_too_long.json", "chat_info.useridlist[1]: id longer than 128 characters"),
    ("invalid_nan.json", "chat_info.validationType: nan is not a JSON number"),
    ("invalid_not_an_object.json", "chat_info: expected an object, got a list"),
]


def test_every_recorded_payload_has_a_case() -> None:
    recorded = {path.name for path in FIXTURES.glob("*.json")}
    covered = {case[0] for case in VALID} | {case[0] for case in INVALID}
    assert recorded == covered


@pytest.mark.parametrize(
    ("filename", "attributes", "members"),
    VALID,
    ids=[case[0].removesuffix(".json") for case in VALID],
)
def test_valid_payload_becomes_a_chat_record(
    filename: str, attributes: dict[str, Any], members: frozenset[str] | None
) -> None:
    payload = load(filename)
    untouched = copy.deepcopy(payload)

    record = normalize_chat("chat-1", payload)

    assert isinstance(record, ChatRecord)
    assert record.chatid == "chat-1"
    assert tuple(record.attributes) == CONTRACT_COLUMNS
    assert dict(record.attributes) == attributes
    assert record.status == attributes["status"]
    assert record.members == members
    assert record.member_count == (None if members is None else len(members))
    if members is not None:
        assert isinstance(record.members, frozenset)
    # The raw payload is kept whole, unknown keys included, and the input is not altered.
    assert record.raw == untouched
    assert payload == untouched
    assert len(record.fingerprint) == 64


def test_unknown_keys_are_kept_in_raw() -> None:
    record = normalize_chat("chat9a8b7c6d", load("extra_keys.json"))

    assert record.raw["agentidlist"] == ["1234567", "7654321"]
    assert record.raw["extInfo"] == {"source": "openapi", "tags": ["a", None, 1.5]}
    assert record.raw["chatid"] == "chat9a8b7c6d"
    assert record.raw["useridlist"] == ["0420506555", "manager4220", "user123", "user123"]


def test_chat_record_is_frozen() -> None:
    record = normalize_chat("chat-1", reference())
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.members = frozenset()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("filename", "message"), INVALID, ids=[case[0].removesuffix(".json") for case in INVALID]
)
def test_invalid_payload_raises_payload_error_naming_the_field(filename: str, message: str) -> None:
    with pytest.raises(PayloadError) as caught:
        normalize_chat("chat-1", load(filename))

    assert caught.value.message == message
    # A bad payload fails its chat only: the sync catches ChatError and goes on.
    assert isinstance(caught.value, ChatError)


# Variations of the reference payload: (change, message)
VARIANTS: list[tuple[dict[str, Any], str]] = [
    ({"useridlist": None}, "chat_info.useridlist: expected a list, got null"),
    ({"useridlist": {"u1": True}}, "chat_info.useridlist: expected a list, got an object"),
    ({"useridlist": ["u1", ""]}, "chat_info.useridlist[1]: empty id"),
    ({"useridlist": ["u1", None]}, "chat_info.useridlist[1]: expected a string, got null"),
    (
        {"status": 2, "useridlist": [7]},
        "chat_info.useridlist[0]: expected a string, got an integer (7)",
    ),
    (
        {"status": 2, "useridlist": "u1"},
        "chat_info.useridlist: expected a list, got a string ('u1')",
    ),
    ({"status": True}, "chat_info.status: expected 1 or 2, got a boolean (True)"),
    ({"status": None}, "chat_info.status: expected 1 or 2, got null"),
    ({"status": 1.0}, "chat_info.status: expected 1 or 2, got a number (1.0)"),
    ({"status": 0}, "chat_info.status: expected 1 or 2, got 0"),
    ({"name": None}, "chat_info.name: expected a string, got null"),
    ({"name": 42}, "chat_info.name: expected a string, got an integer (42)"),
    ({"owner": "o" * 129}, "chat_info.owner: id longer than 128 characters"),
    ({"owner": ["u1"]}, "chat_info.owner: expected a string, got a list"),
    ({"icon": 5}, "chat_info.icon: expected a string, got an integer (5)"),
    ({"searchable": 1.0}, "chat_info.searchable: expected an integer, got a number (1.0)"),
    ({"searchable": False}, "chat_info.searchable: expected an integer, got a boolean (False)"),
    ({"searchable": 2**31}, "chat_info.searchable: integer out of range (2147483648)"),
    ({"showHistoryType": float("inf")}, "chat_info.showHistoryType: inf is not a JSON number"),
    ({"agentidlist": ["a\x00b"]}, "chat_info.agentidlist[0]: contains a NUL character"),
    ({"extra": {"\udc80": 1}}, "chat_info.extra (a key): contains an unpaired surrogate"),
    ({"useridlist": ["u1", "u\ud800"]}, "chat_info.useridlist[1]: contains an unpaired surrogate"),
    ({"extra": [float("-inf")]}, "chat_info.extra[0]: -inf is not a JSON number"),
]


@pytest.mark.parametrize(
    ("change", "message"),
    VARIANTS,
    ids=[
        "useridlist-null",
        "useridlist-object",
        "userid-empty",
        "userid-null",
        "dismissed-userid-int",
        "dismissed-useridlist-string",
        "status-bool",
        "status-null",
        "status-float",
        "status-0",
        "name-null",
        "name-int",
        "owner-too-long",
        "owner-list",
        "icon-int",
        "flag-float",
        "flag-false",
        "flag-out-of-range",
        "flag-infinity",
        "nul-in-unknown-key",
        "surrogate-in-key",
        "surrogate-in-userid",
        "nested-negative-infinity",
    ],
)
def test_invalid_variant_names_the_field(change: dict[str, Any], message: str) -> None:
    payload = {**reference(), **change}
    with pytest.raises(PayloadError) as caught:
        normalize_chat("chat-1", payload)
    assert caught.value.message == message


def test_missing_useridlist_on_a_normal_chat_is_an_error() -> None:
    payload = reference()
    del payload["useridlist"]
    with pytest.raises(PayloadError, match=r"^chat_info\.useridlist: missing$"):
        normalize_chat("chat-1", payload)


def test_normal_chat_with_empty_useridlist_has_no_members() -> None:
    # Only a dismissed chat's empty list is distrusted; a normal chat may really be empty.
    record = normalize_chat("chat-1", {**reference(), "useridlist": []})
    assert record.members == frozenset()
    assert record.member_count == 0


def test_absurdly_nested_payload_is_refused() -> None:
    nested: Any = 1
    for _ in range(40):
        nested = [nested]
    with pytest.raises(PayloadError, match=r": nested too deeply$"):
        normalize_chat("chat-1", {**reference(), "extra": nested})


def test_duplicate_userids_collapse() -> None:
    record = normalize_chat("chat-1", {**reference(), "useridlist": ["a", "b", "a", "a", "b"]})
    assert record.members == frozenset({"a", "b"})
    assert record.member_count == 2
    assert (
        record.fingerprint
        == normalize_chat("chat-1", {**reference(), "useridlist": ["b", "a"]}).fingerprint
    )


def test_ids_are_case_sensitive() -> None:
    record = normalize_chat("chat-1", {**reference(), "useridlist": ["User1", "user1", "USER1"]})
    assert record.members == frozenset({"User1", "user1", "USER1"})


def test_userid_of_exactly_128_characters_is_accepted() -> None:
    longest = "u" * 128
    record = normalize_chat("chat-1", {**reference(), "owner": longest, "useridlist": [longest]})
    assert record.members == frozenset({longest})


def test_fingerprint_ignores_member_order() -> None:
    payload = reference()
    reordered = {**payload, "useridlist": list(reversed(payload["useridlist"]))}
    assert reordered["useridlist"] != payload["useridlist"]
    assert (
        normalize_chat("chat-1", payload).fingerprint
        == normalize_chat("chat-1", reordered).fingerprint
    )


def test_fingerprint_is_stable_across_key_order() -> None:
    payload = reference()
    shuffled = dict(reversed(list(payload.items())))
    assert (
        normalize_chat("chat-1", payload).fingerprint
        == normalize_chat("chat-1", shuffled).fingerprint
    )


@pytest.mark.parametrize(
    "change",
    [
        {"searchable": 1},
        {"chatBannedType": 1},
        {"status": 2},
        {"name": "All-staff chat"},
        {"owner": "user123"},
        {"icon": ""},
        {"useridlist": ["user123", "manager4220", "newbie"]},
        {"useridlist": ["user123"]},
        {"useridlist": ["user123", "Manager4220"]},
        {"agentidlist": ["1234567"]},
        {"chatid": "chate39f540dyyyy"},
    ],
    ids=[
        "flag",
        "banned",
        "dismissed",
        "name",
        "owner",
        "icon",
        "member-joined",
        "member-left",
        "member-case",
        "extra-key-added",
        "extra-key-changed",
    ],
)
def test_fingerprint_changes_with_any_change(change: dict[str, Any]) -> None:
    payload = reference()
    changed = {**payload, **change}
    assert (
        normalize_chat("chat-1", payload).fingerprint
        != normalize_chat("chat-1", changed).fingerprint
    )


def test_dismissed_fingerprint_same_for_empty_and_missing_useridlist() -> None:
    empty = normalize_chat("chat-1", load("dismissed_empty_useridlist.json"))
    missing = normalize_chat("chat-1", load("dismissed_missing_useridlist.json"))
    assert empty.fingerprint == missing.fingerprint
    assert empty.fingerprint == fingerprint(load("dismissed_missing_useridlist.json"), None)
