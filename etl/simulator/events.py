"""Stream-mode events as data: what a world change pushes, fault specs, delivery records.

Boundary: no sockets and no threads. This module says which group event DingTalk pushes for a
world change and with which fields, parses the gateway's fault specs, and defines the records
and counters tests read; :mod:`etl.simulator.stream` puts them on the wire.
"""

from __future__ import annotations

import base64
import hashlib
import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

from etl.simulator.world import WorldChange

__all__ = [
    "DEFAULT_CORP_ID",
    "GROUP_EVENT_TYPES",
    "AckRecord",
    "Delivery",
    "FaultTarget",
    "StreamFault",
    "StreamFaultKind",
    "StreamStats",
    "event_data",
    "event_for_change",
    "open_conversation_id",
    "union_id",
]

GROUP_EVENT_TYPES: Final = (
    "chat_add_member",
    "chat_remove_member",
    "chat_quit",
    "chat_update_owner",
    "chat_update_title",
    "chat_disband",
)
DEFAULT_CORP_ID: Final = "dingsimulatedcorp0000000000000000"


# -- identifiers -------------------------------------------------------------------------------


def _digest(kind: str, value: str, length: int) -> str:
    raw = hashlib.sha256(f"{kind}:{value}".encode()).digest()
    return base64.b64encode(raw).decode("ascii")[:length]


def union_id(userid: str) -> str:
    """The simulated ``unionId`` of ``userid``: stable, so tests can predict it."""
    return _digest("union", userid, 22)


def open_conversation_id(chatid: str) -> str:
    """The simulated ``openConversationId`` of ``chatid`` (``cid`` + 22 characters, stable)."""
    return "cid" + _digest("conversation", chatid, 22)


def event_data(
    event_type: str, chatid: str | None, operator: str | None, at: float, corp_id: str
) -> dict[str, Any]:
    """The fields every group event's data carries; ``at`` is the change's wall-clock time."""
    return {
        "eventType": event_type,
        "timeStamp": int(at * 1000),
        "chatId": chatid,
        "corpId": corp_id,
        "openConversationId": open_conversation_id(chatid) if chatid is not None else None,
        "operator": operator,
        "operatorUnionId": union_id(operator) if operator is not None else None,
    }


def event_for_change(change: WorldChange) -> tuple[str, dict[str, Any]] | None:
    """The group event DingTalk pushes for a world change, with its own data fields."""
    if change.kind in ("members_added", "members_removed"):
        event_type = "chat_add_member" if change.kind == "members_added" else "chat_remove_member"
        userids = list(change.userids)
        return event_type, {"userId": userids, "unionId": [union_id(u) for u in userids]}
    if change.kind == "member_quit":
        return "chat_quit", {}
    if change.kind == "dismissed":
        return "chat_disband", {}
    if change.field == "owner":
        return "chat_update_owner", {"owner": change.new}
    if change.field == "name":
        return "chat_update_title", {"title": change.new}
    if change.field == "status" and change.new == 2 and change.old != 2:
        # Setting status 2 directly is a dismissal too.
        return "chat_disband", {}
    # DingTalk has no event for the other attributes.
    return None


# -- faults ------------------------------------------------------------------------------------

StreamFaultKind = Literal[
    "drop",
    "silence",
    "disconnect",
    "duplicate",
    "reorder",
    "delay",
    "lose",
    "lose_ack",
    "malformed",
    "refuse",
]
FaultTarget = Literal["open", "connection", "event"]


def _seconds(name: str, arg: str) -> float:
    try:
        seconds = float(arg)
    except ValueError:
        raise ValueError(f"expected {name}:<seconds>") from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError("seconds must be finite and >= 0")
    return seconds


def _refusal(name: str, arg: str) -> float:
    try:
        status = int(arg)
    except ValueError:
        raise ValueError(f"expected {name}:<HTTP status>") from None
    if not 400 <= status <= 599:
        raise ValueError("a refusal is an HTTP status 400..599")
    return float(status)


# Per kind: its argument parser (None: no argument) and what takes it. "open" faults are taken
# by the next connections/open request; "connection" faults by the current connection as soon
# as there is one, before anything else is sent on it; "event" faults by the next event push.
_FAULT_KINDS: Final[dict[str, tuple[Callable[[str, str], float] | None, FaultTarget]]] = {
    "refuse": (_refusal, "open"),
    "drop": (None, "connection"),
    "silence": (_seconds, "connection"),
    "disconnect": (None, "connection"),
    "duplicate": (None, "event"),
    "reorder": (None, "event"),
    "delay": (_seconds, "event"),
    "lose": (None, "event"),
    "lose_ack": (None, "event"),
    "malformed": (None, "event"),
}


@dataclass(frozen=True)
class StreamFault:
    """One scripted misbehaviour of the gateway, consumed once."""

    kind: StreamFaultKind
    value: float = 0.0
    spec: str = ""

    @property
    def target(self) -> FaultTarget:
        return _FAULT_KINDS[self.kind][1]

    @classmethod
    def parse(cls, spec: str) -> StreamFault:
        """Parse ``"drop"``, ``"silence:S"``, ``"disconnect"``, ``"duplicate"``, ``"reorder"``,
        ``"delay:S"``, ``"lose"``, ``"lose_ack"``, ``"malformed"`` or ``"refuse:STATUS"``."""
        if not isinstance(spec, str):
            raise ValueError(f"fault spec must be a string, got {spec!r}")
        name, sep, arg = spec.strip().partition(":")
        if name not in _FAULT_KINDS:
            raise ValueError(f"unknown stream fault {spec!r}")
        parse_argument = _FAULT_KINDS[name][0]
        kind = cast(StreamFaultKind, name)
        if parse_argument is None:
            if sep:
                raise ValueError(f"fault {spec!r}: {name!r} takes no argument")
            return cls(kind, 0.0, spec)
        try:
            return cls(kind, parse_argument(name, arg), spec)
        except ValueError as exc:
            raise ValueError(f"fault {spec!r}: {exc}") from None


# -- records and statistics --------------------------------------------------------------------


@dataclass(frozen=True)
class AckRecord:
    """One ACK the client sent for a push of an event (``at`` is monotonic)."""

    message_id: str
    code: Any
    status: str | None
    at: float

    @property
    def success(self) -> bool:
        return self.code == 200 and self.status != "LATER"


@dataclass(frozen=True)
class Delivery:
    """What happened to one event: every push (monotonic times, one messageId each) and ACK."""

    event_id: str
    event_type: str
    data: dict[str, Any]
    pushed_at: tuple[float, ...]
    message_ids: tuple[str, ...]
    acks: tuple[AckRecord, ...]
    acked_at: float | None
    latency: float | None
    lost: bool

    @property
    def delivered(self) -> bool:
        return self.acked_at is not None

    @property
    def times_pushed(self) -> int:
        return len(self.pushed_at)

    @property
    def ack_code(self) -> Any:
        return self.acks[-1].code if self.acks else None

    @property
    def ack_status(self) -> str | None:
        return self.acks[-1].status if self.acks else None


class StreamStats:
    """Counters of the gateway; the gateway updates them under its lock."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self.gateway_requests = 0
        self.gateway_refused = 0
        self.tickets_issued = 0
        self.handshakes_refused = 0
        self.connections_opened = 0
        self.events_created = 0
        # EVENT frames sent, duplicates and redeliveries included.
        self.events_pushed = 0
        # Pushes of an event after an earlier push got no successful ACK in time.
        self.events_redelivered = 0
        # Events delivered: each counts once, at its first successful ACK.
        self.events_acked = 0
        self.events_lost = 0
        self.acks_received = 0
        self.acks_negative = 0
        self.acks_unmatched = 0
        self.bad_frames = 0
        self.pings_sent = 0
        self.pings_acked = 0
        self.pings_echoed = 0
        self.raw_frames_sent = 0
        self.faults_fired: Counter[str] = Counter()
        # Per delivered event: seconds from the push it acknowledges to the ACK's arrival.
        self.ack_latencies: dict[str, float] = {}

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            counters = {k: v for k, v in vars(self).items() if isinstance(v, int)}
            return {
                **counters,
                "faults_fired": dict(self.faults_fired),
                "ack_latencies": dict(self.ack_latencies),
            }
