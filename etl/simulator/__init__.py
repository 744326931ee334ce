"""A local stand-in for DingTalk: the ``gettoken`` and ``chat/get`` endpoints over real HTTP.

Boundary: this package is test, demo and benchmark infrastructure. It uses only the standard
library and imports nothing from the rest of ``etl``, so the sync code can only reach it over
real HTTP, exactly as it reaches ``oapi.dingtalk.com``; nothing here can leak into, or mask a bug
in, the production path.

It models what the sync job depends on (see ``dingtalk-api-notes.md``): token issue, reuse and
expiry; the ``chat_info`` payload; DingTalk's errcodes answered with HTTP 200; a per-API
sliding-window rate limit; and scripted faults (errcodes, proxy pages, IP-block JSON, slow,
truncated and reset responses) consumed once each in FIFO order. The :class:`World` can be
changed while the server runs, tells listeners about each change, and records statistics that
tests assert on.

Modules, each importing only those listed before it:

- :mod:`~etl.simulator.chat` (one chat), :mod:`~etl.simulator.faults` (fault specs, queues),
  :mod:`~etl.simulator.tokens` (access tokens), :mod:`~etl.simulator.ratelimit` (admission);
- :mod:`~etl.simulator.scenario` (scenario files, generated chats, planned mutations);
- :mod:`~etl.simulator.world` (the state, its lock, change listeners, statistics);
- :mod:`~etl.simulator.api` (what DingTalk answers to a call, whatever carries it);
- fronts that carry calls: :mod:`~etl.simulator.http` (:class:`Simulator`).
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
from etl.simulator.faults import Fault, FaultKind, FaultQueue
from etl.simulator.http import Simulator
from etl.simulator.ratelimit import RateLimiter
from etl.simulator.tokens import TokenService, TokenState
from etl.simulator.world import ChangeKind, SimStats, World, WorldChange, WorldListener

__all__ = [
    "CHAT_GET_PATH",
    "CHAT_INFO_KEYS",
    "GETTOKEN_FAULT_KEY",
    "GETTOKEN_PATH",
    "THROTTLED_ERRMSG",
    "Admission",
    "Answer",
    "ChangeKind",
    "DingTalkApi",
    "Fault",
    "FaultKind",
    "FaultQueue",
    "RateLimiter",
    "SimChat",
    "SimStats",
    "Simulator",
    "TokenService",
    "TokenState",
    "World",
    "WorldChange",
    "WorldListener",
    "errmsg_for",
]
