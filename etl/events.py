"""Stream-mode frames and DingTalk's six group events, as plain data.

Pure: text in, frozen dataclasses out; no I/O, no database, no clock. ``parse_frame`` reads one
websocket frame (``dingtalk-events.md``, "Stream mode protocol"); ``parse_event`` turns an
EVENT frame of a group event into a ``PushedEvent`` carrying the ``chat_events`` changes it
describes (``Change``), or says why it is ``invalid``; ``ack`` builds the answer a frame gets.
The listener (``etl.listener``) moves frames; the store (``etl.eventstore``) writes events.

Mapping (the contract's): ``chat_add_member`` -> one ``member_joined`` per userid;
``chat_remove_member`` -> one ``member_left`` per userid; ``chat_quit`` -> ``member_left`` of
the operator; ``chat_update_owner`` -> ``attribute_changed`` of ``owner_userid``;
``chat_update_title`` -> ``attribute_changed`` of ``name``; ``chat_disband`` ->
``attribute_changed`` of ``status`` from ``'1'`` to ``'2'``. Both the Stream keys (``chatId``,
``userId``, ``timeStamp`` ...) and the older capitalised callback keys are read.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from etl.errors import PayloadError
from etl.normalize import STATUS_DISMISSED, STATUS_NORMAL, check_id

GROUP_EVENT_TYPES: Final = (
    "chat_add_member",
    "chat_remove_member",
    "chat_quit",
    "chat_update_owner",
    "chat_update_title",
    "chat_disband",
)
# Outcomes of a pushed event (pushed_events.outcome).
RECORDED: Final = "recorded"
ALREADY_RECORDED: Final = "already_recorded"
UNKNOWN_CHAT: Final = "unknown_chat"
DISCOVERED: Final = "discovered"
INVALID: Final = "invalid"

# DingTalk's times are milliseconds since the epoch; outside these years a value is garbage.
_EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_LATEST = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
_MAX_TITLE = 16_000


class FrameError(ValueError):
    """A frame that cannot be read as the protocol's JSON; the message says why."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One Stream-mode frame: ``type`` EVENT, SYSTEM or CALLBACK, its headers and data text."""

    type: str
    headers: Mapping[str, Any]
    data: str

    @property
    def message_id(self) -> str | None:
        value = self.headers.get("messageId")
        return value if isinstance(value, str) and value else None

    @property
    def topic(self) -> str | None:
        value = self.headers.get("topic")
        return value if isinstance(value, str) else None

    @property
    def event_type(self) -> str | None:
        value = self.headers.get("eventType")
        return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Change:
    """One ``chat_events`` row an event describes; ``old_value`` of an attribute is the log's."""

    event_type: str  # member_joined, member_left, attribute_changed
    userid: str | None = None
    field: str | None = None
    new_value: str | None = None
    # Only the status change of a dismissal knows its old value; the others take the log's.
    old_value: str | None = None


@dataclass(frozen=True, slots=True)
class PushedEvent:
    """A group event as received: what ``pushed_events`` keeps, and the changes it describes.

    ``invalid`` names the unusable field of an event that is kept but writes no change.
    """

    event_id: str
    event_type: str
    chatid: str | None
    occurred_at: dt.datetime
    operator_userid: str | None
    payload: Mapping[str, Any]
    changes: tuple[Change, ...] = ()
    invalid: str | None = None


def parse_frame(text: str | bytes) -> Frame:
    """The frame in ``text``; ``FrameError`` when it is not the protocol's JSON object."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FrameError(f"frame is not JSON: {type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise FrameError("frame is JSON but not an object")
    kind = raw.get("type")
    if not isinstance(kind, str) or not kind:
        raise FrameError("frame has no type")
    headers = raw.get("headers")
    if not isinstance(headers, dict):
        raise FrameError("frame has no headers object")
    data = raw.get("data", "")
    if data is None:
        data = ""
    if not isinstance(data, str):
        # Some senders put the object itself; it is the same document.
        data = json.dumps(data)
    return Frame(kind, headers, data)


def ack(message_id: str, data: Mapping[str, Any], *, code: int = 200) -> str:
    """The answer to a frame, as the official SDKs send it."""
    return json.dumps(
        {
            "code": code,
            "headers": {"messageId": message_id, "contentType": "application/json"},
            "message": "OK" if code == 200 else "later",
            "data": json.dumps(data),
        }
    )


def ack_success(message_id: str) -> str:
    return ack(message_id, {"status": "SUCCESS", "message": "success"})


def ack_later(message_id: str) -> str:
    """Ask DingTalk to push the event again (the Go SDK's form)."""
    return ack(message_id, {"status": "LATER", "message": "later"}, code=500)


def parse_event(frame: Frame, received_at: dt.datetime) -> PushedEvent:
    """The group event in an EVENT ``frame`` (``frame.event_type`` in ``GROUP_EVENT_TYPES``).

    An event without a usable time gets ``received_at`` as its time, and is invalid.
    Raises ``FrameError`` when the frame has no event id or its data is not a JSON object:
    such a frame cannot be kept. An event whose fields are unusable comes back with
    ``invalid`` set and no changes.
    """
    event_id = frame.headers.get("eventId")
    if not isinstance(event_id, str) or not event_id.strip() or len(event_id) > 128:
        raise FrameError("event frame has no usable eventId header")
    try:
        data = json.loads(frame.data) if frame.data else {}
    except (ValueError, RecursionError):
        raise FrameError(f"event {event_id}: data is not JSON") from None
    if not isinstance(data, dict):
        raise FrameError(f"event {event_id}: data is not a JSON object")
    event_type = frame.event_type or _text(data, "eventType", "EventType") or ""
    occurred_at, time_problem = _occurred_at(data, frame.headers, received_at)
    chatid, chat_problem = _id_field(data, "chatId", "ChatId")
    operator, operator_problem = _id_field(data, "operator", "Operator")
    base = PushedEvent(
        event_id=event_id,
        event_type=event_type,
        chatid=chatid,
        occurred_at=occurred_at,
        operator_userid=operator,
        payload=data,
    )
    problem = time_problem or chat_problem
    if chatid is None and problem is None:
        problem = "data.chatId: missing"
    if problem is None:
        changes, problem = _changes(event_type, data, operator, operator_problem)
        if problem is None:
            return dataclasses.replace(base, changes=changes)
    return dataclasses.replace(base, invalid=problem)


def _changes(
    event_type: str, data: Mapping[str, Any], operator: str | None, operator_problem: str | None
) -> tuple[tuple[Change, ...], str | None]:
    """The changes of a valid event, or (), and the reason it has none."""
    if event_type in ("chat_add_member", "chat_remove_member"):
        userids, problem = _userids(data)
        if problem is not None:
            return (), problem
        kind = "member_joined" if event_type == "chat_add_member" else "member_left"
        return tuple(Change(kind, userid=u) for u in userids), None
    if event_type == "chat_quit":
        if operator is None:
            return (), operator_problem or "data.operator: missing (who left)"
        return (Change("member_left", userid=operator),), None
    if event_type == "chat_update_owner":
        owner, problem = _id_field(data, "owner", "Owner")
        if owner is None:
            return (), problem or "data.owner: missing"
        return (Change("attribute_changed", field="owner_userid", new_value=owner),), None
    if event_type == "chat_update_title":
        title = _text(data, "title", "Title")
        if title is None or len(title) > _MAX_TITLE or "\x00" in title:
            return (), "data.title: missing or not a usable string"
        return (Change("attribute_changed", field="name", new_value=title),), None
    if event_type == "chat_disband":
        change = Change(
            "attribute_changed",
            field="status",
            old_value=str(STATUS_NORMAL),
            new_value=str(STATUS_DISMISSED),
        )
        return (change,), None
    return (), f"eventType {event_type!r}: not a group event"


def _field(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if data.get(key) is not None:
            return data[key]
    return None


def _text(data: Mapping[str, Any], *keys: str) -> str | None:
    value = _field(data, *keys)
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _id_field(data: Mapping[str, Any], *keys: str) -> tuple[str | None, str | None]:
    """The id under ``keys`` (None if absent) and what is wrong with a present one."""
    value = _field(data, *keys)
    if value is None:
        return None, None
    where = f"data.{keys[0]}"
    if not isinstance(value, str):
        return None, f"{where}: expected a string"
    try:
        check_id(value, where)
        value.encode("utf-8")
    except PayloadError as exc:
        return None, exc.message
    except UnicodeEncodeError:
        return None, f"{where}: not valid Unicode"
    return value, None


def _userids(data: Mapping[str, Any]) -> tuple[tuple[str, ...], str | None]:
    value = _field(data, "userId", "UserId")
    if value is None:
        return (), "data.userId: missing"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        return (), "data.userId: expected a non-empty list of userids"
    userids: list[str] = []
    for index, item in enumerate(value):
        userid, problem = _id_field({"userId": item}, "userId")
        if userid is None:
            return (), (problem or "data.userId: null item").replace(
                "data.userId", f"data.userId[{index}]"
            )
        userids.append(userid)
    return tuple(dict.fromkeys(userids)), None


def _occurred_at(
    data: Mapping[str, Any], headers: Mapping[str, Any], fallback: dt.datetime
) -> tuple[dt.datetime, str | None]:
    """``data.timeStamp``, else the frame's ``eventBornTime`` (ms); or ``fallback`` and why."""
    for where, value in (
        ("data.timeStamp", _field(data, "timeStamp", "TimeStamp")),
        ("headers.eventBornTime", headers.get("eventBornTime")),
    ):
        if value is None:
            continue
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if type(value) is not int:
            return fallback, f"{where}: expected milliseconds since the epoch"
        try:
            when = dt.datetime.fromtimestamp(value / 1000, tz=dt.UTC)
        except (OverflowError, OSError, ValueError):
            when = _EARLIEST - dt.timedelta(days=1)
        if not _EARLIEST <= when < _LATEST:
            return fallback, f"{where}: {value} is not a plausible time"
        return when, None
    return fallback, "data.timeStamp: missing, and no eventBornTime header"
