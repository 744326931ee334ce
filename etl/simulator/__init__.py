"""A local stand-in for DingTalk: ``gettoken`` and ``chat/get`` over real HTTP, and the
Stream-mode gateway that pushes group events over a real websocket.

Boundary: this package is test, demo and benchmark infrastructure. It uses the standard library
and, for the Stream-mode websocket only, the third-party ``websockets`` package; it imports
nothing from the rest of ``etl``, so the sync code can only reach it over the network, exactly
as it reaches ``oapi.dingtalk.com`` and ``api.dingtalk.com``; nothing here can leak into, or
mask a bug in, the production path.

It models what the sync job depends on (see ``dingtalk-api-notes.md`` and
``dingtalk-events.md``): token issue, reuse and expiry; the ``chat_info`` payload; DingTalk's
errcodes answered with HTTP 200; a per-API sliding-window rate limit; scripted faults
(errcodes, proxy pages, IP-block JSON, slow, truncated and reset responses) consumed once each
in FIFO order; and Stream mode: one-use tickets, event and ping frames, ACKs, redelivery, and
scripted faults of its own (dropped, silent and disconnected sockets, duplicated, reordered,
delayed, lost and malformed pushes, refused connections). The :class:`World` can be changed
while the fronts serve it, tells listeners about each change (the gateway turns them into
events), and records statistics that tests assert on.

Modules, each importing only those listed before it:

- :mod:`~etl.simulator.chat` (one chat), :mod:`~etl.simulator.faults` (fault specs, queues),
  :mod:`~etl.simulator.tokens` (access tokens), :mod:`~etl.simulator.ratelimit` (admission);
- :mod:`~etl.simulator.scenario` (scenario files, generated chats, planned mutations);
- :mod:`~etl.simulator.world` (the state, its lock, change listeners, statistics);
- :mod:`~etl.simulator.events` (the group event a change pushes, stream fault specs, delivery
  records and counters: data only);
- :mod:`~etl.simulator.api` (what DingTalk answers to a call, whatever carries it);
- fronts that carry calls: :mod:`~etl.simulator.http` (:class:`Simulator`), and
  :mod:`~etl.simulator.stream` (:class:`StreamGateway`, Stream mode, from the world's changes).
"""

from etl.simulator.api import (
    CHAT_GET_PATH,
    GETTOKEN_FAULT_KEY,
    GETTOKEN_PATH,
    THROTTLED_ERRMSG,
    Admission,
    Answer,
    DingTalkApi,
    errmsg_for,
)
from etl.simulator.chat import CHAT_INFO_KEYS, SimChat
from etl.simulator.events import (
    GROUP_EVENT_TYPES,
    AckRecord,
    Delivery,
    StreamFault,
    StreamStats,
    open_conversation_id,
    union_id,
)
from etl.simulator.faults import Fault, FaultKind, FaultQueue
from etl.simulator.http import Simulator
from etl.simulator.ratelimit import RateLimiter
from etl.simulator.stream import OPEN_CONNECTION_PATH, StreamGateway
from etl.simulator.tokens import TokenService, TokenState
from etl.simulator.world import ChangeKind, SimStats, World, WorldChange, WorldListener

__all__ = [
    "CHAT_GET_PATH",
    "CHAT_INFO_KEYS",
    "GETTOKEN_FAULT_KEY",
    "GETTOKEN_PATH",
    "GROUP_EVENT_TYPES",
    "OPEN_CONNECTION_PATH",
    "THROTTLED_ERRMSG",
    "AckRecord",
    "Admission",
    "Answer",
    "ChangeKind",
    "Delivery",
    "DingTalkApi",
    "Fault",
    "FaultKind",
    "FaultQueue",
    "RateLimiter",
    "SimChat",
    "SimStats",
    "Simulator",
    "StreamFault",
    "StreamGateway",
    "StreamStats",
    "TokenService",
    "TokenState",
    "World",
    "WorldChange",
    "WorldListener",
    "errmsg_for",
    "open_conversation_id",
    "union_id",
]
