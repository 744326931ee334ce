"""Hostile and odd input: arbitrary chat_info payloads, SQL- and path-like ids, oversized answers.

Property-based (hypothesis): whatever JSON DingTalk, a proxy or an attacker sends as
``chat_info``, normalization either returns a record that says exactly what the payload said or
raises ``PayloadError`` naming a ``chat_info`` field; and through the simulator into each
database, a chat is either stored exactly (name, members, raw) or rejected with nothing written.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect
from sqlalchemy.engine import URL

from etl.db import create_db_engine
from etl.dingtalk import classify
from etl.errors import ApiError, EtlError, PayloadError, RequestFailed, TransientError
from etl.normalize import STATUS_DISMISSED, ChatRecord, normalize_chat
from etl.simulator import SimChat, Simulator, World
from etl.sync import run_sync
from tests.conftest import APP_KEY, APP_SECRET, MakeConfig
from tests.helpers import current_members, rows

FLAG_KEYS = (
    "conversationTag",
    "chatBannedType",
    "searchable",
    "validationType",
    "mentionAllAuthority",
    "managementType",
    "showHistoryType",
)
# A rejection names the field: "chat_info.useridlist[3]: ...", "chat_info: expected an object".
NAMES_A_FIELD = re.compile(
    r'chat_info(?:\.[A-Za-z0-9_]+|\[\d+\]|\["(?:[^"\\]|\\.)*"\])*(?: \(a key\))?: \S'
)
NORMALIZE_EXAMPLES = 400
CLASSIFY_EXAMPLES = 200
ROUND_TRIP_EXAMPLES = 25

# -- strategies --------------------------------------------------------------------------------

ODD_STRINGS = [
    "",
    " ",
    "u1 ",
    " u1",
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff\ud800",
    "\U0001f4b0" * 3,
    "\u202e\u2028\u2029",
    "\x1b[31mred",
    "x'; DROP TABLE chats; --",
    "../../etc/passwd",
    "%s",
    "?",
    "%(x)s",
    ":name",
    "\\",
    '"',
    "NaN",
    "null",
]
FLAG_VALUES = st.one_of(st.none(), st.integers(-2, 3))


def _repeat(unit: str, times: int) -> str:
    return unit * times


def _many_ids(prefix: str, count: int, distinct: int) -> list[str]:
    # Up to 12,000 entries with repeats: a big group, and duplicate userids.
    return [f"{prefix}{i % distinct}" for i in range(count)]


def _encodes(text: str) -> bool:
    return not any("\ud800" <= char <= "\udfff" for char in text)


def chat_infos(*, wire: bool = False) -> st.SearchStrategy[Any]:
    """chat_info objects: half valid but odd, half with one to three fields missing, null,
    of the wrong type or holding what no database stores; now and then not an object at all.

    Valid but odd: names up to 16,000 characters from all of Unicode (control characters and
    non-BMP included), groups of up to 12,000 members with duplicate userids, dismissed chats
    without a member list, unknown keys. ``wire``: only what can travel as UTF-8 JSON (no lone
    surrogates, NaN or infinity), for payloads served by the simulator.
    """
    # Every code point, and (off the wire) lone surrogates, which json.loads makes from
    # "\ud800"; storable text has neither those nor NUL.
    chars = st.characters(exclude_categories=("Cs",) if wire else ())
    storable = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
    odd = [text for text in ODD_STRINGS if not wire or _encodes(text)]
    short_text = st.text(chars, max_size=12) | st.sampled_from(odd)
    # Long strings cheaply: a short unit repeated (up to 70,000 characters).
    long_text = st.builds(_repeat, st.text(chars, min_size=1, max_size=3), st.integers(1, 70_000))
    any_text = st.one_of(short_text, long_text)
    valid_text = st.one_of(
        st.text(storable, max_size=40),
        st.builds(_repeat, st.text(storable, min_size=1, max_size=4), st.integers(1, 4_000)),
    )
    plain_ids = st.from_regex(r"[A-Za-z0-9_.@-]{1,24}", fullmatch=True)
    json_scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(10**40), max_value=10**40),
        # json.loads turns 1e400 into inf.
        st.floats(allow_nan=not wire, allow_infinity=not wire),
        any_text,
    )
    json_values = st.recursive(
        json_scalars,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(short_text, children, max_size=4)
        ),
        max_leaves=16,
    )
    storable_values = st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.floats(allow_nan=False, allow_infinity=False),
            valid_text,
        ),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(storable, max_size=10), children, max_size=4)
        ),
        max_leaves=12,
    )
    member_lists = st.one_of(
        st.lists(plain_ids, min_size=1, max_size=20),
        st.builds(_many_ids, plain_ids, st.integers(1, 12_000), st.integers(1, 12_000)),
    )
    hostile = {
        "missing": st.just(None),
        "null": st.none(),
        "anything": json_values,
        "odd text": any_text,
        "odd ids": st.one_of(
            st.lists(st.one_of(plain_ids, short_text), max_size=8),
            st.builds(_many_ids, short_text, st.integers(1, 50), st.integers(1, 50)),
        ),
    }

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        if draw(st.integers(0, 19)) == 0:
            return draw(json_values)  # not even an object
        status = draw(st.sampled_from([1, 1, 2]))
        payload: dict[str, Any] = {
            "name": draw(st.one_of(plain_ids, valid_text)),
            "owner": draw(plain_ids),
            "useridlist": draw(member_lists),
            "status": status,
            **{key: draw(FLAG_VALUES) for key in FLAG_KEYS},
            **draw(st.dictionaries(st.sampled_from(["icon", "chatid", "agentidlist"]), valid_text)),
        }
        payload["useridlist"].append(payload["owner"])
        if status == 2 and draw(st.booleans()):
            if draw(st.booleans()):
                del payload["useridlist"]
            else:
                payload["useridlist"] = []
        payload.update(draw(st.dictionaries(st.text(storable, max_size=10), storable_values)))
        for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
            key = draw(st.sampled_from(sorted(payload)))
            how = draw(st.sampled_from(sorted(hostile)))
            if how == "missing":
                del payload[key]
            else:
                payload[key] = draw(hostile[how])
        if draw(st.integers(0, 9)) == 0:
            payload[draw(short_text)] = draw(json_values)  # an unknown key, anything in it
        return payload

    return build()


# Hundreds of examples, some of them 70,000 characters: minutes when the machine is busy.
SLOW = pytest.mark.timeout(600)
HOSTILE = settings(
    max_examples=NORMALIZE_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _expected_members(payload: dict[str, Any]) -> frozenset[str] | None:
    listed = payload.get("useridlist")
    if payload["status"] == STATUS_DISMISSED and listed in (None, []):
        return None
    return frozenset(listed)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=True, allow_nan=False)


# -- normalization -----------------------------------------------------------------------------


def _normalized(payload: Any) -> ChatRecord | str:
    """The record, or the PayloadError's message; any other exception propagates."""
    try:
        return normalize_chat("chat-h", payload)
    except PayloadError as exc:
        return exc.message


@SLOW
@HOSTILE
@given(payload=chat_infos())
def test_any_payload_normalizes_exactly_or_is_rejected_naming_a_field(payload: Any) -> None:
    record = _normalized(payload)
    event("rejected" if isinstance(record, str) else "accepted")
    if isinstance(record, str):
        assert NAMES_A_FIELD.match(record), record
        assert len(record) <= 2000  # it lands in a TEXT column and a log line
        return
    assert isinstance(payload, dict)
    assert record.raw is payload
    assert record.attributes["name"] == payload["name"]
    assert record.attributes["owner_userid"] == payload["owner"]
    assert record.attributes["status"] == payload["status"]
    assert record.attributes["icon"] == payload.get("icon")
    assert record.members == _expected_members(payload)
    # Storable as it is: JSON without NaN, valid UTF-8 everywhere.
    _canonical(payload).encode("utf-8")
    assert re.fullmatch(r"[0-9a-f]{64}", record.fingerprint)
    if isinstance(payload.get("useridlist"), list):
        shuffled = {**payload, "useridlist": list(reversed(payload["useridlist"]))}
        again = normalize_chat("chat-h", shuffled)
        assert again.fingerprint == record.fingerprint


@SLOW
@settings(HOSTILE, max_examples=CLASSIFY_EXAMPLES)
@given(
    chat_info=chat_infos(),
    errcode=st.one_of(st.just(0), st.integers(), st.text(max_size=5), st.none(), st.floats()),
)
def test_any_answer_is_classified_without_crashing(chat_info: Any, errcode: Any) -> None:
    """The whole client-side path of one answer: bytes -> classify -> normalize."""
    try:
        body = json.dumps({"errcode": errcode, "errmsg": "ok", "chat_info": chat_info})
    except (ValueError, RecursionError):
        assume(False)
    wire = body.encode("utf-8", "surrogatepass")
    outcome = _read_answer(wire)
    if not (_finite(errcode) and _finite(chat_info)):
        # json.dumps wrote NaN or Infinity, which is not JSON: an unreadable answer.
        event("not JSON")
        assert isinstance(outcome, TransientError)
        assert outcome.message == f"chat/get: answer is not JSON (HTTP 200, {len(wire)} bytes)"
    elif type(errcode) is not int:
        event("errcode not an integer")
        assert isinstance(outcome, RequestFailed)
        assert outcome.message == f"chat/get: errcode is not an integer: {errcode!r}"
    elif errcode != 0:
        event("errcode")
        assert isinstance(outcome, ApiError)
        assert (outcome.errcode, outcome.message) == (errcode, f"chat/get: errcode {errcode}: ok")
    else:
        # chat_info as it came over the wire: accepted, or rejected exactly as on its own.
        expected = _normalized(json.loads(body)["chat_info"])
        event("rejected" if isinstance(expected, str) else "accepted")
        if isinstance(expected, str):
            assert isinstance(outcome, PayloadError)
            assert outcome.message == expected
        else:
            assert outcome is None


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in ``value``."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _read_answer(body: bytes) -> EtlError | None:
    """What the client does with one chat/get answer; other exceptions propagate."""
    try:
        answer = classify("chat/get", 200, body, {})
        normalize_chat("chat-h", answer.get("chat_info"))
    except EtlError as exc:
        return exc
    return None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"errcode": 0, "chat_info": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
        (b'{"errcode": 0, "chat_info": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001, "nested"),
        (b'{"errcode": 0, "chat_info": {"name": 1' + b"0" * 5000 + b"}}", "not JSON"),
        (b'{"errcode": 0, "chat_info": {"name": 1e400}}', "chat_info.name: inf is not a JSON"),
    ],
    ids=["deep-lists", "deep-objects", "5000-digit-integer", "float-overflow"],
)
def test_pathological_json_is_an_error_not_a_crash(body: bytes, message: str) -> None:
    error = _read_answer(body)
    assert error is not None
    assert message in error.message


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            {"name": "\U0001f4b0" * 20_000, "owner": "u1", "useridlist": ["u1"], "status": 1},
            "chat_info.name: longer than",
        ),
        (
            {"name": "n", "owner": "u1", "useridlist": ["u1"], "status": 1, "icon": "i" * 70_000},
            "chat_info.icon: longer than",
        ),
        (
            {"name": "n", "owner": "u1", "useridlist": ["u1", "u1 "], "status": 1},
            "chat_info.useridlist[1]: id begins or ends with whitespace",
        ),
        (
            {"name": "n", "owner": " u1", "useridlist": [" u1"], "status": 1},
            "chat_info.owner: id begins or ends with whitespace",
        ),
        (
            {"name": "n", "owner": "u1", "useridlist": ["u1"], "status": 1, "k" * 9000: "\x00"},
            'chat_info["kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk..."]: contains a NUL character',
        ),
    ],
    ids=["name-80kb", "icon-70k", "userid-trailing-space", "owner-leading-space", "huge-key"],
)
def test_values_no_database_can_hold_alike_are_rejected(
    payload: dict[str, Any], message: str
) -> None:
    """MySQL's TEXT holds 64 KB, and its PAD SPACE collation makes 'u1' and 'u1 ' one key:
    such payloads would fail the write there, and a failed write stops the whole run."""
    with pytest.raises(PayloadError) as caught:
        normalize_chat("chat-h", payload)
    assert caught.value.message.startswith(message)
    assert len(caught.value.message) <= 2000


def test_values_mysql_cannot_hold_fail_their_chat_alone_on_every_database(
    db_url: URL, make_config: MakeConfig
) -> None:
    world = World(APP_KEY, APP_SECRET)
    world.add_chat(SimChat("chat-long-name", "\U0001f4b0" * 20_000, "u1", ["u1"]))
    world.add_chat(SimChat("chat-long-icon", "icon", "u1", ["u1"], icon="i" * 70_000))
    world.add_chat(SimChat("chat-padded", "padded", "u1", ["u1", "u1 ", "u2"]))
    world.add_chat(SimChat("chat-fine", "fine", "u1", ["u1", "u2"]))
    with Simulator(world) as sim:
        result = run_sync(make_config(db_url, sim.base_url, world.chatids()))

    assert (result.status, result.exit_code) == ("partial", 1)
    assert (result.chats_succeeded, result.chats_failed) == (1, 3)
    assert [c["chatid"] for c in rows(db_url, "chats")] == ["chat-fine"]
    assert current_members(db_url) == {"chat-fine": {"u1", "u2"}}


# -- through the simulator into each database ---------------------------------------------------


_serial = itertools.count(1)


@SLOW  # 25 syncs into a server database
@settings(
    max_examples=ROUND_TRIP_EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(payload=chat_infos(wire=True))
def test_stored_exactly_or_rejected_with_nothing_written(
    db_url: URL, make_config: MakeConfig, payload: Any
) -> None:
    # The simulator serves its own placeholder for None: not a hostile answer.
    assume(payload is not None)
    chatid = f"hostile-{next(_serial)}"
    world = World(APP_KEY, APP_SECRET)
    world.add_chat(SimChat(chatid, "placeholder", "u1", ["u1"], raw_chat_info={"x": 1}))
    world.set_attr(chatid, raw_chat_info=payload)
    with Simulator(world) as sim:
        result = run_sync(make_config(db_url, sim.base_url, [chatid], dingtalk={"max_attempts": 1}))

    item = next(i for i in rows(db_url, "sync_run_items") if i["run_id"] == result.run_id)
    event(f"chat {item['status']}")
    stored = [c for c in rows(db_url, "chats") if c["chatid"] == chatid]
    if item["status"] == "failed":
        assert (result.status, result.exit_code) == ("partial", 1)
        assert NAMES_A_FIELD.match(item["error"]), item["error"]
        assert stored == []
        assert chatid not in current_members(db_url)
        assert not [e for e in rows(db_url, "chat_events") if e["chatid"] == chatid]
        return
    assert result.status == "succeeded"
    (chat,) = stored
    assert chat["name"] == payload["name"]
    assert chat["owner_userid"] == payload["owner"]
    assert chat["icon"] == payload.get("icon")
    assert _canonical(chat["raw"]) == _canonical(payload)
    expected = _expected_members(payload) or frozenset()
    assert current_members(db_url).get(chatid, set()) == expected
    assert chat["member_count"] == len(expected)


# -- ids with SQL and path syntax ---------------------------------------------------------------

ODD_CHATIDS = [
    "x'; DROP TABLE chats; --",
    "../../etc/passwd",
    "%s",
    "?",
    "%(chatid)s",
    ":chatid",
    "$1",
    "chat\\x",
    'a"b`c',
    "*",
    "%",
    "_",
    "Robert'); DROP TABLE chat_members;--",
    "/dev/null",
    "C:\\Windows\\system32",
    "chat\u202e\U0001f4b0",
]
ODD_USERIDS = ["' OR '1'='1", "u1; DELETE FROM chat_events", "%", "_", "?", "%s", "../u", "$1"]


def test_ids_with_sql_and_path_syntax_are_only_data(
    db_url: URL, make_config: MakeConfig, tmp_path: Path
) -> None:
    world = World(APP_KEY, APP_SECRET)
    for index, chatid in enumerate(ODD_CHATIDS):
        world.add_chat(
            SimChat(chatid, f"name {chatid}", ODD_USERIDS[0], ODD_USERIDS[: index % 8 + 1])
        )
    with Simulator(world) as sim:
        config = make_config(db_url, sim.base_url, ODD_CHATIDS)
        first = run_sync(config)
        for chatid in ODD_CHATIDS[::2]:
            world.remove_members(chatid, ODD_USERIDS[1:])
            world.set_attr(chatid, name=f"{chatid}'--")
        second = run_sync(config)
        third = run_sync(config)

    assert (first.status, second.status, third.status) == ("succeeded",) * 3
    assert (second.chats_changed, third.chats_changed) == (len(ODD_CHATIDS[::2]), 0)
    engine = create_db_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"chats", "chat_members", "chat_events", "sync_runs", "sync_run_items"} <= tables
    assert current_members(db_url) == {k: set(v) for k, v in world.membership().items()}
    assert {c["chatid"]: c["name"] for c in rows(db_url, "chats")} == {
        k: world.chat(k).name for k in ODD_CHATIDS
    }
    # Nothing named after a chatid appeared on disk (the SQLite database's folder included).
    assert not [p for p in tmp_path.rglob("*") if "passwd" in p.name or "DROP" in p.name]


# -- oversized answers --------------------------------------------------------------------------


def test_oversized_answer_fails_that_chat_alone(db_url: URL, make_config: MakeConfig) -> None:
    world = World(APP_KEY, APP_SECRET)
    world.add_chat(SimChat("chat-small", "small", "u1", ["u1", "u2"]))
    big = [f"user-{i:05d}" for i in range(400)]  # about 6 KB of JSON
    world.add_chat(SimChat("chat-big", "big", big[0], big))
    with Simulator(world) as sim:
        config = make_config(
            db_url, sim.base_url, ["chat-big", "chat-small"], dingtalk={"max_response_bytes": 4096}
        )
        result = run_sync(config)
        requests_made = world.stats.requests_by_chat["chat-big"]

    assert (result.status, result.exit_code) == ("partial", 1)
    failed = next(i for i in rows(db_url, "sync_run_items") if i["status"] == "failed")
    assert failed["chatid"] == "chat-big"
    assert "answer larger than max_response_bytes (4096)" in failed["error"]
    # Not worth retrying: it would be just as big the next time.
    assert (failed["attempts"], requests_made) == (1, 1)
    assert [c["chatid"] for c in rows(db_url, "chats")] == ["chat-small"]
    assert set(current_members(db_url)) == {"chat-small"}
