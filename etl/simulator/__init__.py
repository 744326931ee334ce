"""A local stand-in for DingTalk's ``gettoken`` and ``chat/get`` endpoints.

Boundary: this module is test, demo and benchmark infrastructure. It uses only the standard
library and imports nothing from the rest of ``etl``, so the sync code can only reach it over
real HTTP, exactly as it reaches ``oapi.dingtalk.com``; nothing here can leak into, or mask a bug
in, the production path.

It models what the sync job depends on (see ``dingtalk-api-notes.md``): token issue, reuse and
expiry; the ``chat_info`` payload; DingTalk's errcodes answered with HTTP 200; a per-API
sliding-window rate limit; and scripted faults (errcodes, proxy pages, IP-block JSON, slow,
truncated and reset responses) consumed once each in FIFO order. The :class:`World` can be
changed while the server runs, and it records statistics that tests assert on.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import secrets
import selectors
import socket
import socketserver
import struct
import threading
import time
import tomllib
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final, Literal, cast
from urllib.parse import parse_qs, urlsplit

__all__ = ["Fault", "SimChat", "SimStats", "Simulator", "World"]

logger = logging.getLogger(__name__)
# Without a handler, logging's last-resort handler would write warnings to stderr; the server
# must stay silent unless the embedding application configures logging.
logger.addHandler(logging.NullHandler())

GETTOKEN_PATH: Final = "/gettoken"
CHAT_GET_PATH: Final = "/chat/get"
GETTOKEN_FAULT_KEY: Final = "@gettoken"

_JSON_TYPE: Final = "application/json;charset=utf-8"
_HTML_TYPE: Final = "text/html;charset=utf-8"

THROTTLED_ERRMSG: Final = "ding talk error[subcode=90018,submsg=app接口调用超过限流]"

# Messages close to what DingTalk sends, so client code that logs or pattern-matches errmsg
# (notably "90018" inside the errcode-88 message) sees realistic input. The fullwidth commas are
# DingTalk's own punctuation, hence the RUF001 exemptions.
_ERRMSG: Final[dict[int, str]] = {
    -1: "系统繁忙",
    88: THROTTLED_ERRMSG,
    40001: "获取access_token时Secret错误，或者access_token无效",  # noqa: RUF001
    40014: "不合法的access_token",
    40016: "不合法的会话ID",
    40089: "invalid appkey or appsecret",
    42001: "access_token超时",
    43007: "需要授权",
    49000: "缺少参数chatid",
    70001: "企业不存在或者已经被解散",
    90001: "您的服务器调用钉钉开放平台所有接口的请求都被暂时禁用了",
    90002: "您的服务器调用钉钉开放平台当前接口的所有请求都被暂时禁用了",
    90003: "您的企业调用钉钉开放平台所有接口的请求都被暂时禁用了",
    90004: "您当前使用的CorpId及CorpSecret被暂时禁用了",
    90005: "您的企业调用当前接口次数过多，请求被暂时禁用了",  # noqa: RUF001
    90006: "您当前使用的CorpId及CorpSecret调用当前接口次数过多，请求被暂时禁用了",  # noqa: RUF001
    90018: "app接口调用超过限流",
    90020: "企业调用钉钉开放平台接口的次数超过本月限额",
}

# On /gettoken these two codes mean "parameter missing", unlike on other endpoints.
_GETTOKEN_ERRMSG: Final[dict[int, str]] = {
    90002: "缺少参数appkey",
    90003: "缺少参数appsecret",
}


def errmsg_for(errcode: int) -> str:
    """The simulator's errmsg for ``errcode`` (a generic text for codes it does not know)."""
    return _ERRMSG.get(errcode, f"simulated error {errcode}")


def _error(errcode: int, errmsg: str | None = None) -> dict[str, Any]:
    return {"errcode": errcode, "errmsg": errmsg if errmsg is not None else errmsg_for(errcode)}


# --------------------------------------------------------------------------------------------
# Faults

FaultKind = Literal[
    "errcode", "http", "nonjson", "block", "slow", "truncate", "reset", "expire_token"
]
_NO_ARG_FAULTS: Final = frozenset({"nonjson", "truncate", "reset", "expire_token"})
_INT_ARG_FAULTS: Final = frozenset({"errcode", "http", "block"})


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, consumed by exactly one request."""

    kind: FaultKind
    value: float = 0.0
    spec: str = ""

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """Parse ``"errcode:N"``, ``"http:N"``, ``"nonjson"``, ``"block:N"``, ``"slow:S"``,
        ``"truncate"``, ``"reset"`` or ``"expire_token"``; ``ValueError`` otherwise."""
        if not isinstance(spec, str):
            raise ValueError(f"fault spec must be a string, got {spec!r}")
        name, sep, arg = spec.strip().partition(":")
        if name in _NO_ARG_FAULTS:
            if sep:
                raise ValueError(f"fault {spec!r}: {name!r} takes no argument")
            return cls(cast(FaultKind, name), 0.0, spec)
        if name in _INT_ARG_FAULTS:
            try:
                number = int(arg)
            except ValueError:
                raise ValueError(f"fault {spec!r}: expected {name}:<integer>") from None
            if name == "http" and not 200 <= number <= 599:
                raise ValueError(f"fault {spec!r}: HTTP status must be 200..599")
            if name == "block" and number < 0:
                raise ValueError(f"fault {spec!r}: wait must be >= 0")
            return cls(cast(FaultKind, name), float(number), spec)
        if name == "slow":
            try:
                seconds = float(arg)
            except ValueError:
                raise ValueError(f"fault {spec!r}: expected slow:<seconds>") from None
            if not (math.isfinite(seconds) and seconds >= 0):
                raise ValueError(f"fault {spec!r}: seconds must be finite and >= 0")
            return cls("slow", seconds, spec)
        raise ValueError(f"unknown fault {spec!r}")


# --------------------------------------------------------------------------------------------
# World model

# Order of the reference response body; sent in this order so captured payloads look real.
CHAT_INFO_KEYS: Final = (
    "name",
    "owner",
    "useridlist",
    "conversationTag",
    "chatBannedType",
    "searchable",
    "validationType",
    "mentionAllAuthority",
    "managementType",
    "showHistoryType",
    "icon",
    "status",
    "chatid",
)


@dataclass
class SimChat:
    """One group chat as the simulated organisation holds it."""

    chatid: str
    name: str
    owner: str
    useridlist: list[str]
    conversationTag: int = 2
    chatBannedType: int = 0
    searchable: int = 0
    validationType: int = 0
    mentionAllAuthority: int = 0
    managementType: int = 0
    showHistoryType: int = 0
    icon: str = ""
    status: int = 1
    readable: bool = True
    raw_chat_info: dict[str, Any] | None = None

    def chat_info(self) -> dict[str, Any]:
        """The ``chat_info`` object ``chat/get`` answers with (a copy, safe to serialise)."""
        if self.raw_chat_info is not None:
            return copy.deepcopy(self.raw_chat_info)
        info = {key: getattr(self, key) for key in CHAT_INFO_KEYS}
        info["useridlist"] = list(self.useridlist)
        return info


_CHAT_FIELDS: Final = tuple(f.name for f in dataclasses.fields(SimChat))
_CHAT_REQUIRED: Final = ("chatid", "name", "owner", "useridlist")
_CHAT_STR_FIELDS: Final = frozenset({"chatid", "name", "owner", "icon"})
_CHAT_INT_FIELDS: Final = frozenset(
    {
        "conversationTag",
        "chatBannedType",
        "searchable",
        "validationType",
        "mentionAllAuthority",
        "managementType",
        "showHistoryType",
        "status",
    }
)
_APP_KEYS: Final = (
    "app_key",
    "app_secret",
    "token_ttl_seconds",
    "permission",
    "rate_limit",
    "latency_ms",
)
_TOP_KEYS: Final = ("app", "chats", "faults")


class SimStats:
    """Request counters and arrival times, updated by the server under the world's lock."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self.requests_by_path: Counter[str] = Counter()
        self.requests_by_chat: Counter[str] = Counter()
        self.gettoken_calls = 0
        self.tokens_issued = 0
        self.throttled = 0
        self.throttled_by_path: Counter[str] = Counter()
        self.faults_fired: Counter[str] = Counter()
        self._arrivals: dict[str, list[float]] = {}

    @property
    def total_requests(self) -> int:
        with self._lock:
            return sum(self.requests_by_path.values())

    def arrivals(self, path: str) -> list[float]:
        """Monotonic arrival times of requests to ``path`` (e.g. ``"/chat/get"``), sorted."""
        with self._lock:
            return sorted(self._arrivals.get(_norm_path(path), ()))

    def max_requests_in_any_window(self, path: str, window: float = 1.0) -> int:
        """The most requests to ``path`` that arrived within any half-open ``window`` seconds."""
        times = self.arrivals(path)
        best = 0
        start = 0
        for end, t in enumerate(times):
            while t - times[start] >= window:
                start += 1
            best = max(best, end - start + 1)
        return best

    def reset(self) -> None:
        with self._lock:
            self.requests_by_path.clear()
            self.requests_by_chat.clear()
            self.gettoken_calls = 0
            self.tokens_issued = 0
            self.throttled = 0
            self.throttled_by_path.clear()
            self.faults_fired.clear()
            self._arrivals.clear()

    def _record(self, path: str, chatid: str | None, at: float) -> None:
        self.requests_by_path[path] += 1
        self._arrivals.setdefault(path, []).append(at)
        if path == GETTOKEN_PATH:
            self.gettoken_calls += 1
        elif chatid:
            self.requests_by_chat[chatid] += 1


def _norm_path(path: str) -> str:
    return path if path.startswith("/") else "/" + path


@dataclass(frozen=True)
class _Admission:
    throttled: bool
    fault: Fault | None
    latency_s: float


_DEPARTMENTS: Final = (
    "Finance",
    "Sales",
    "Engineering",
    "Support",
    "Marketing",
    "Legal",
    "People",
    "Ops",
    "Design",
    "Research",
)
_TOPICS: Final = ("Weekly", "Project", "Alerts", "Launch", "Planning", "Social", "Review", "All")
# Pareto shape for generated group sizes: about 84% of groups stay under 10x min_members and
# about 2.5% exceed 100x, which resembles an organisation's mix of team and all-hands groups.
_SIZE_ALPHA: Final = 0.8


class World:
    """The simulated organisation and app: credentials, chats, faults, tokens and statistics.

    Every method takes ``lock``; to change a :class:`SimChat` in place, hold ``world.lock``.
    """

    def __init__(
        self,
        app_key: str = "demo-key",
        app_secret: str = "demo-secret",  # noqa: S107 - credentials of the fake app
        *,
        token_ttl_seconds: float = 7200,
        permission: bool = True,
        rate_limit: int = 0,
        latency_ms: int = 0,
    ) -> None:
        self.lock = threading.RLock()
        self.app_key = app_key
        self.app_secret = app_secret
        self.token_ttl_seconds = token_ttl_seconds
        self.permission = permission
        self.rate_limit = rate_limit
        self.latency_ms = latency_ms
        self.chats: dict[str, SimChat] = {}
        self.stats = SimStats(self.lock)
        self._faults: dict[str, deque[Fault]] = {}
        self._tokens: dict[str, float] = {}
        self._current_token: str | None = None
        self._windows: dict[str, deque[float]] = {}
        # Users that mutate() may add to chats; None means "everyone already in some chat".
        self._user_pool: list[str] | None = None

    # -- chats --------------------------------------------------------------------------------

    def add_chat(self, chat: SimChat) -> None:
        with self.lock:
            if chat.chatid in self.chats:
                raise ValueError(f"chat {chat.chatid!r} already exists")
            self.chats[chat.chatid] = chat

    def chat(self, chatid: str) -> SimChat:
        """The live chat object; mutate it only while holding ``world.lock``."""
        with self.lock:
            try:
                return self.chats[chatid]
            except KeyError:
                raise KeyError(f"no chat {chatid!r} in the simulated world") from None

    def chatids(self) -> list[str]:
        with self.lock:
            return sorted(self.chats)

    def add_members(self, chatid: str, userids: Iterable[str]) -> None:
        with self.lock:
            chat = self.chat(chatid)
            present = set(chat.useridlist)
            for userid in userids:
                if userid not in present:
                    chat.useridlist.append(userid)
                    present.add(userid)

    def remove_members(self, chatid: str, userids: Iterable[str]) -> None:
        with self.lock:
            chat = self.chat(chatid)
            leaving = set(userids)
            chat.useridlist = [u for u in chat.useridlist if u not in leaving]

    def dismiss(self, chatid: str, keep_members: bool = False) -> None:
        with self.lock:
            chat = self.chat(chatid)
            chat.status = 2
            if not keep_members:
                chat.useridlist = []

    def set_attr(self, chatid: str, **changes: Any) -> None:
        with self.lock:
            chat = self.chat(chatid)
            for key in changes:
                if key not in _CHAT_FIELDS or key == "chatid":
                    raise AttributeError(f"SimChat has no settable attribute {key!r}")
            for key, value in changes.items():
                setattr(chat, key, value)

    def membership(self) -> dict[str, frozenset[str]]:
        """Snapshot of every chat's members, dismissed and unreadable chats included."""
        with self.lock:
            return {cid: frozenset(chat.useridlist) for cid, chat in self.chats.items()}

    # -- faults and tokens --------------------------------------------------------------------

    def inject(self, key: str, *faults: str | Fault) -> None:
        """Queue faults for a chatid, or for ``"@gettoken"``; each hits exactly one request."""
        parsed = [f if isinstance(f, Fault) else Fault.parse(f) for f in faults]
        with self.lock:
            self._faults.setdefault(key, deque()).extend(parsed)

    def pending_faults(self, key: str) -> list[str]:
        with self.lock:
            return [f.spec or f.kind for f in self._faults.get(key, ())]

    def clear_faults(self, key: str | None = None) -> None:
        with self.lock:
            if key is None:
                self._faults.clear()
            else:
                self._faults.pop(key, None)

    @property
    def current_token(self) -> str | None:
        with self.lock:
            return self._current_token

    def expire_token(self) -> None:
        """Make the current token expired as of now (it then answers 42001, not 40014)."""
        with self.lock:
            if self._current_token is not None:
                self._tokens[self._current_token] = time.monotonic()

    # -- loaders ------------------------------------------------------------------------------

    @classmethod
    def from_scenario(cls, path: str | os.PathLike[str]) -> World:
        """Load a TOML scenario (``[app]``, ``[[chats]]``, ``[faults]``)."""
        source = os.fspath(path)
        try:
            with Path(source).open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{source}: invalid TOML: {exc}") from exc
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> World:
        """Build a world from a scenario mapping; unknown keys raise ``ValueError``."""
        _check_mapping(data, _TOP_KEYS, source, "the top level")
        app = data.get("app", {})
        _check_mapping(app, _APP_KEYS, source, "[app]")
        world = cls(**_app_settings(app, source))

        chats = data.get("chats", [])
        if not isinstance(chats, list):
            raise ValueError(f"{source}: 'chats' must be an array of tables ([[chats]])")
        for index, raw in enumerate(chats, start=1):
            where = f"[[chats]] #{index}"
            _check_mapping(raw, _CHAT_FIELDS, source, where)
            chat = _chat_from_mapping(raw, source, where)
            if chat.chatid in world.chats:
                raise ValueError(f"{source}: {where}: duplicate chatid {chat.chatid!r}")
            world.add_chat(chat)

        faults = data.get("faults", {})
        if not isinstance(faults, Mapping):
            raise ValueError(f"{source}: 'faults' must be a table")
        for key, specs in faults.items():
            if not isinstance(specs, list):
                raise ValueError(f"{source}: [faults] {key!r} must be a list of strings")
            try:
                world.inject(key, *specs)
            except ValueError as exc:
                raise ValueError(f"{source}: [faults] {key!r}: {exc}") from exc
        return world

    @classmethod
    def generate(
        cls,
        n_chats: int,
        *,
        seed: int = 0,
        users: int = 5000,
        min_members: int = 10,
        max_members: int = 10000,
        dismissed: int = 0,
    ) -> World:
        """A deterministic world of ``n_chats`` chats (``gen-000001``...) for benchmarks.

        Sizes follow a heavy-tailed distribution between ``min_members`` and ``max_members``
        (most groups small); the first chat always has exactly ``max_members`` so every
        generated world contains the largest group. Members come from one shared pool of
        ``max(users, max_members)`` users (``user-000001``...), so users belong to many chats.
        ``dismissed`` randomly chosen chats get status 2 and an empty member list.
        """
        if n_chats < 0:
            raise ValueError("n_chats must be >= 0")
        if min_members < 1 or max_members < min_members:
            raise ValueError("need 1 <= min_members <= max_members")
        if users < 1:
            raise ValueError("users must be >= 1")
        if not 0 <= dismissed <= n_chats:
            raise ValueError("dismissed must be between 0 and n_chats")
        rng = random.Random(seed)
        pool = [f"user-{i:06d}" for i in range(1, max(users, max_members) + 1)]
        world = cls()
        world._user_pool = pool
        for index in range(1, n_chats + 1):
            if index == 1:
                size = max_members
            else:
                # Inverse-CDF sampling of a Pareto tail starting at min_members.
                size = int(min_members / (1.0 - rng.random()) ** (1.0 / _SIZE_ALPHA))
                size = min(size, max_members)
            members = sorted(rng.sample(pool, size))
            world.add_chat(
                SimChat(
                    chatid=f"gen-{index:06d}",
                    name=f"{rng.choice(_DEPARTMENTS)} {rng.choice(_TOPICS)} {index}",
                    owner=rng.choice(members),
                    useridlist=members,
                    searchable=int(rng.random() < 0.2),
                    validationType=int(rng.random() < 0.1),
                    icon=f"@lADP{rng.getrandbits(64):016x}",
                )
            )
        for index in sorted(rng.sample(range(1, n_chats + 1), dismissed)):
            world.dismiss(f"gen-{index:06d}")
        return world

    def mutate(self, share: float, *, seed: int) -> int:
        """Change ``round(share * active chats)`` chats; return how many changed.

        Active means status 1 without ``raw_chat_info``. Each chosen chat changes for sure:
        a few members join (from the user pool) and/or leave (never the owner, never the last
        member), and about one in ten also gets a new name or owner.
        """
        if not 0.0 <= share <= 1.0:
            raise ValueError("share must be between 0 and 1")
        rng = random.Random(seed)
        with self.lock:
            eligible = sorted(
                cid
                for cid, chat in self.chats.items()
                if chat.status == 1 and chat.raw_chat_info is None
            )
            chosen = sorted(rng.sample(eligible, round(share * len(eligible))))
            pool = self._user_pool
            if pool is None:
                pool = sorted({u for chat in self.chats.values() for u in chat.useridlist})
            for chatid in chosen:
                _mutate_chat(self.chats[chatid], rng, pool)
            return len(chosen)

    # -- request handling (called by the HTTP handler) ----------------------------------------

    def _admit(self, path: str, chatid: str | None, api: bool, at: float) -> _Admission:
        with self.lock:
            self.stats._record(path, chatid, at)
            latency_s = max(self.latency_ms, 0) / 1000.0
            if not api:
                return _Admission(False, None, latency_s)
            if self.rate_limit > 0:
                window = self._windows.setdefault(path, deque())
                while window and window[0] <= at - 1.0:
                    window.popleft()
                # Only admitted calls fill the window, so a client that backs off recovers
                # one second after its last successful call.
                if len(window) >= self.rate_limit:
                    self.stats.throttled += 1
                    self.stats.throttled_by_path[path] += 1
                    return _Admission(True, None, latency_s)
                window.append(at)
            key = GETTOKEN_FAULT_KEY if path == GETTOKEN_PATH else chatid
            fault: Fault | None = None
            queue = self._faults.get(key) if key else None
            if queue:
                fault = queue.popleft()
                self.stats.faults_fired[fault.kind] += 1
            return _Admission(False, fault, latency_s)

    def _gettoken(self, appkey: str, appsecret: str) -> dict[str, Any]:
        if not appkey:
            return _error(90002, _GETTOKEN_ERRMSG[90002])
        if not appsecret:
            return _error(90003, _GETTOKEN_ERRMSG[90003])
        with self.lock:
            if appkey != self.app_key or appsecret != self.app_secret:
                return _error(40089)
            now = time.monotonic()
            token = self._current_token
            if token is None or self._tokens[token] <= now:
                token = secrets.token_hex(16)
                self._current_token = token
                self.stats.tokens_issued += 1
            # DingTalk extends a live token's lifetime when it is fetched again.
            expires_at = now + self.token_ttl_seconds
            self._tokens[token] = expires_at
        return {
            "errcode": 0,
            "errmsg": "ok",
            "access_token": token,
            # From the TTL itself: (now + ttl) - now is not always ttl in floating point.
            "expires_in": math.ceil(self.token_ttl_seconds),
        }

    def _chat_get(self, token: str, chatid: str) -> dict[str, Any]:
        with self.lock:
            expires_at = self._tokens.get(token) if token else None
            if expires_at is None:
                return _error(40014)
            if expires_at <= time.monotonic():
                return _error(42001)
            if not self.permission:
                return _error(43007)
            if not chatid:
                return _error(49000)
            chat = self.chats.get(chatid)
            if chat is None or not chat.readable:
                return _error(40016)
            info = chat.chat_info()
        return {"errcode": 0, "errmsg": "ok", "chat_info": info}


def _mutate_chat(chat: SimChat, rng: random.Random, pool: list[str]) -> None:
    members = chat.useridlist
    present = set(members)
    step = max(1, len(members) // 20)
    n_join = rng.randint(0, step)
    n_leave = rng.randint(0, step)
    changed = False

    roll = rng.random()
    if roll < 0.05:
        new_name = f"{rng.choice(_DEPARTMENTS)} {rng.choice(_TOPICS)} ({chat.chatid} renamed)"
        # A chat renamed before may draw the same name again, which would be no change.
        changed = new_name != chat.name
        chat.name = new_name
    elif roll < 0.10 and len(members) > 1:
        chat.owner = rng.choice([m for m in members if m != chat.owner])
        changed = True

    can_leave = [m for m in members if m != chat.owner]
    leaving = set(rng.sample(can_leave, min(n_leave, len(can_leave))))

    joining: list[str] = []
    # Rejection sampling keeps this cheap for big pools; the attempt cap keeps it bounded when
    # nearly everyone is already a member.
    for _ in range(n_join * 20):
        if len(joining) >= n_join:
            break
        candidate = rng.choice(pool) if pool else ""
        if candidate and candidate not in present and candidate not in joining:
            joining.append(candidate)

    if not (changed or leaving or joining):
        outsiders = [u for u in pool if u not in present]
        if outsiders:
            joining.append(rng.choice(outsiders))
        elif can_leave:
            leaving.add(rng.choice(can_leave))
        else:
            chat.name = f"{chat.name} (renamed)"

    chat.useridlist = [m for m in members if m not in leaving] + joining


def _check_mapping(value: Any, allowed: Iterable[str], source: str, where: str) -> None:
    if not isinstance(value, Mapping):
        raise ValueError(f"{source}: {where} must be a table")
    allowed_set = set(allowed)
    for key in value:
        if key not in allowed_set:
            raise ValueError(
                f"{source}: unknown key {key!r} in {where} (allowed: {', '.join(allowed)})"
            )


def _app_settings(app: Mapping[str, Any], source: str) -> dict[str, Any]:
    def fail(key: str, expected: str) -> ValueError:
        return ValueError(f"{source}: [app] {key} must be {expected}, got {app[key]!r}")

    settings: dict[str, Any] = {}
    for key in ("app_key", "app_secret"):
        if key in app:
            if not isinstance(app[key], str):
                raise fail(key, "a string")
            settings[key] = app[key]
    if "token_ttl_seconds" in app:
        ttl = app["token_ttl_seconds"]
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0:
            raise fail("token_ttl_seconds", "a positive number")
        settings["token_ttl_seconds"] = ttl
    if "permission" in app:
        if not isinstance(app["permission"], bool):
            raise fail("permission", "true or false")
        settings["permission"] = app["permission"]
    for key in ("rate_limit", "latency_ms"):
        if key in app:
            value = app[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise fail(key, "an integer >= 0")
            settings[key] = value
    return settings


def _chat_from_mapping(raw: Mapping[str, Any], source: str, where: str) -> SimChat:
    missing = [key for key in _CHAT_REQUIRED if key not in raw]
    if missing:
        raise ValueError(f"{source}: {where}: missing {', '.join(missing)}")
    for key, value in raw.items():
        if key in _CHAT_STR_FIELDS:
            ok = isinstance(value, str)
        elif key in _CHAT_INT_FIELDS:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif key == "readable":
            ok = isinstance(value, bool)
        elif key == "useridlist":
            ok = isinstance(value, list) and all(isinstance(u, str) for u in value)
        else:  # raw_chat_info
            ok = isinstance(value, dict)
        if not ok:
            raise ValueError(f"{source}: {where}: bad value for {key!r}: {value!r}")
    fields = dict(raw)
    fields["useridlist"] = list(fields["useridlist"])
    return SimChat(**fields)


# --------------------------------------------------------------------------------------------
# HTTP server


@dataclass(frozen=True)
class _Reply:
    status: int
    content_type: str
    body: bytes


def _json_reply(payload: Mapping[str, Any], status: int = 200) -> _Reply:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return _Reply(status, _JSON_TYPE, body)


def _status_page(status: int) -> _Reply:
    try:
        title = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        title = f"{status} Error"
    # Shaped like nginx's default error page, which is what a proxy in front of DingTalk sends.
    page = (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    )
    return _Reply(status, _HTML_TYPE, page.encode("utf-8"))


_NONJSON_PAGE: Final = (
    '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>访问被拒绝</title></head>\n'
    "<body><h1>Access denied</h1><p>The request was blocked by the gateway.</p>"
    "<hr><center>Tengine</center></body></html>\n"
).encode()

# Bodies sent with GET are drained so keep-alive stays in sync; bigger ones close the connection.
_MAX_DRAIN_BYTES: Final = 1 << 20


class _SimHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], world: World) -> None:
        self.world = world
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host with getfqdn, which can stall for seconds on
        # machines without working reverse DNS; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        address = cast(tuple[Any, ...], self.server_address)
        self.server_name = str(address[0])
        self.server_port = int(address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients resetting or vanishing mid-response are expected (benchmarks, fault tests);
        # the default implementation would print a traceback to stderr.
        logger.debug("simulator: error while serving a connection", exc_info=True)

    def track(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(conn)

    def close_connections(self) -> None:
        # Idle keep-alive connections would otherwise keep their handler threads blocked in
        # readline after stop(); shutting the sockets down lets those threads finish.
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dingtalk-simulator"
    sys_version = ""
    # Headers and body go out in separate writes; without TCP_NODELAY the body can wait for a
    # delayed ACK (~40 ms), which would dominate every keep-alive request in benchmarks.
    disable_nagle_algorithm = True

    @property
    def _server(self) -> _SimHTTPServer:
        return cast(_SimHTTPServer, self.server)

    def setup(self) -> None:
        super().setup()
        self._server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines carry appsecret and access_token in the query string: never log them.
        return

    def do_GET(self) -> None:
        try:
            self._serve_get()
        except OSError:
            # The client went away mid-response; nothing left to answer.
            self.close_connection = True
            logger.debug("simulator: client connection lost", exc_info=True)
        except Exception:
            logger.exception("simulator: internal error")
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send(_status_page(500))

    def _method_not_allowed(self) -> None:
        self._drain_body()
        path = urlsplit(self.path).path
        self._server.world._admit(path, None, False, time.monotonic())
        known = path in (GETTOKEN_PATH, CHAT_GET_PATH)
        self._send(_status_page(405 if known else 404))

    do_POST = do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def _serve_get(self) -> None:
        arrived = time.monotonic()
        self._drain_body()
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)

        def param(name: str) -> str:
            values = query.get(name)
            return values[0] if values else ""

        world = self._server.world
        path = url.path
        api = path in (GETTOKEN_PATH, CHAT_GET_PATH)
        chatid = param("chatid") if path == CHAT_GET_PATH else None
        admission = world._admit(path, chatid, api, arrived)
        if admission.latency_s > 0:
            time.sleep(admission.latency_s)

        if admission.throttled:
            self._send(_json_reply(_error(88, THROTTLED_ERRMSG)))
            return

        fault = admission.fault
        if fault is not None:
            if fault.kind == "errcode":
                self._send(_json_reply(_error(int(fault.value))))
                return
            if fault.kind == "http":
                self._send(_status_page(int(fault.value)))
                return
            if fault.kind == "nonjson":
                self._send(_Reply(200, _HTML_TYPE, _NONJSON_PAGE))
                return
            if fault.kind == "block":
                self._send(
                    _json_reply({"status": 1111, "wait": int(fault.value), "punish": "deny"})
                )
                return
            if fault.kind == "reset":
                self._reset()
                return
            if fault.kind == "slow":
                time.sleep(fault.value)
            elif fault.kind == "expire_token":
                world.expire_token()

        if path == GETTOKEN_PATH:
            reply = _json_reply(world._gettoken(param("appkey"), param("appsecret")))
        elif path == CHAT_GET_PATH:
            reply = _json_reply(world._chat_get(param("access_token"), chatid or ""))
        else:
            reply = _status_page(404)

        if fault is not None and fault.kind == "truncate":
            self._send_truncated(reply)
        else:
            self._send(reply)

    def _drain_body(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            return
        if length > _MAX_DRAIN_BYTES:
            self.close_connection = True
        elif length > 0:
            self.rfile.read(length)

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)

    def _send_truncated(self, reply: _Reply) -> None:
        # Announce the full length, send half, then close: the client sees an incomplete read.
        self.close_connection = True
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body[: len(reply.body) // 2])

    def _reset(self) -> None:
        self.close_connection = True
        conn = self.connection
        # Linger 0 makes close() send RST instead of FIN: the client gets ECONNRESET.
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # rfile holds a reference to the socket; the descriptor only closes (and the RST only
        # goes out) once both are closed.
        self.rfile.close()
        conn.close()


class Simulator:
    """An HTTP server answering like DingTalk from a :class:`World`.

    The socket is bound on construction, so ``base_url`` is known before ``start()``.
    """

    def __init__(self, world: World, host: str = "127.0.0.1", port: int = 0) -> None:
        self.world = world
        self._server = _SimHTTPServer((host, port), world)
        self._thread: threading.Thread | None = None
        # Reentrant because stop() may run from a signal handler that interrupted start().
        self._state_lock = threading.RLock()
        self._closed = False
        self._stopping = False
        self._stopped = threading.Event()
        # Writing to this pair wakes the accept loop at once; polling would add up to a poll
        # interval to every stop(), which adds up over a test suite.
        self._wake_r, self._wake_w = socket.socketpair()

    @property
    def stats(self) -> SimStats:
        return self.world.stats

    @property
    def host(self) -> str:
        return str(cast(tuple[Any, ...], self._server.server_address)[0])

    @property
    def port(self) -> int:
        return int(cast(tuple[Any, ...], self._server.server_address)[1])

    @property
    def base_url(self) -> str:
        host = self.host
        # A wildcard bind is reachable through loopback; the wildcard itself is not a URL host.
        if host in ("", "0.0.0.0"):  # noqa: S104 - a comparison, not a bind
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> Simulator:
        with self._state_lock:
            if self._closed:
                raise RuntimeError("simulator was stopped; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._accept_loop,
                    name=f"dingtalk-simulator:{self.port}",
                    daemon=True,
                )
                self._thread.start()
        return self

    def stop(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            thread = self._thread
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if thread is not None:
            thread.join()
        self._server.close_connections()
        self._server.server_close()
        self._wake_r.close()
        self._wake_w.close()
        self._stopped.set()

    def _accept_loop(self) -> None:
        # handle_request() selects again before accepting; the timeout bounds that wait should
        # a ready connection vanish before accept(), so stop() can never hang on it.
        self._server.timeout = 0.5
        with selectors.DefaultSelector() as selector:
            selector.register(self._server, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _events in selector.select():
                    if key.fileobj is self._server and not self._stopping:
                        self._server.handle_request()

    def serve_forever(self) -> None:
        """Serve until :meth:`stop` (e.g. from a signal handler) or KeyboardInterrupt."""
        self.start()
        try:
            # Serving happens on the background thread; waiting here in short slices keeps the
            # main thread responsive to signals, and stop() from a handler cannot deadlock as
            # it would if the handler interrupted the server's own serve_forever loop.
            while not self._stopped.wait(0.5):
                pass
        finally:
            self.stop()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
