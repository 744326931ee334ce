"""DingTalk's API as the simulated world answers it, whatever front carries the request.

Boundary: one call in, one :class:`Answer` out. :class:`DingTalkApi` does what DingTalk does
for a call (counting, rate limiting, latency, taking a scripted fault, checking credentials and
tokens, reading the chat) and leaves to the front only what belongs to the wire: turning the
answer into bytes, and acting out the faults of a broken transport or of a box in front of
DingTalk (an HTML error page, the IP limiter's JSON, a reset or a truncated body).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from etl.simulator.faults import Fault
from etl.simulator.world import World

__all__ = [
    "CHAT_GET_PATH",
    "GETTOKEN_FAULT_KEY",
    "GETTOKEN_PATH",
    "THROTTLED_ERRMSG",
    "Admission",
    "Answer",
    "DingTalkApi",
    "errmsg_for",
]

GETTOKEN_PATH: Final = "/gettoken"
CHAT_GET_PATH: Final = "/chat/get"
GETTOKEN_FAULT_KEY: Final = "@gettoken"

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

# Faults that stand for the transport or a proxy rather than DingTalk: no body is produced and
# the front acts them out. "truncate" is the front's too, but it cuts a real body short.
_FRONT_FAULTS: Final = frozenset({"http", "nonjson", "block", "reset"})


def errmsg_for(errcode: int) -> str:
    """The simulator's errmsg for ``errcode`` (a generic text for codes it does not know)."""
    return _ERRMSG.get(errcode, f"simulated error {errcode}")


def _error(errcode: int, errmsg: str | None = None) -> dict[str, Any]:
    return {"errcode": errcode, "errmsg": errmsg if errmsg is not None else errmsg_for(errcode)}


@dataclass(frozen=True)
class Admission:
    """What happens to a call, decided atomically when it arrives."""

    throttled: bool
    fault: Fault | None
    latency_s: float


@dataclass(frozen=True)
class Answer:
    """What one API call answers.

    ``body`` is DingTalk's JSON answer (throttling and errcode faults included). When ``body``
    is None, ``fault`` replaces the answer (``http``, ``nonjson``, ``block``, ``reset``); with a
    ``truncate`` fault the front sends ``body`` cut short.
    """

    body: dict[str, Any] | None
    fault: Fault | None = None


class DingTalkApi:
    """DingTalk's ``gettoken`` and ``chat/get`` over a :class:`World`.

    Each call is two steps: :meth:`admit` (counted, rate limited, given its fault, all under the
    world's lock) and :meth:`respond` (wait, act on the fault, answer). A front for another API
    uses the same two steps, so the world's settings and faults apply to it alike.
    """

    def __init__(self, world: World) -> None:
        self.world = world

    def gettoken(self, appkey: str, appsecret: str, *, arrived: float | None = None) -> Answer:
        """``GET /gettoken``: issue or reuse the app's access token."""
        with self.world.lock:
            self.world.stats.record_gettoken()
            admission = self.admit(GETTOKEN_PATH, GETTOKEN_FAULT_KEY, arrived=arrived)
        return self.respond(admission, lambda: self._gettoken(appkey, appsecret))

    def chat_get(self, access_token: str, chatid: str, *, arrived: float | None = None) -> Answer:
        """``GET /chat/get``: one chat's ``chat_info``; faults are queued by chatid."""
        with self.world.lock:
            if chatid:
                self.world.stats.record_chat_request(chatid)
            admission = self.admit(CHAT_GET_PATH, chatid or None, arrived=arrived)
        return self.respond(admission, lambda: self._chat_get(access_token, chatid))

    def admit(self, api: str, fault_key: str | None, *, arrived: float | None = None) -> Admission:
        """Count a call to ``api`` arriving at ``arrived`` (monotonic, default now), apply the
        rate limit, and take the next fault queued for ``fault_key`` unless throttled."""
        world = self.world
        at = time.monotonic() if arrived is None else arrived
        with world.lock:
            world.stats.record_request(api, at)
            latency_s = self.latency_s
            if not world.limiter.admit(api, at, world.rate_limit):
                world.stats.record_throttled(api)
                return Admission(True, None, latency_s)
            fault = world.faults.take(fault_key) if fault_key else None
            if fault is not None:
                world.stats.record_fault(fault)
            return Admission(False, fault, latency_s)

    def respond(self, admission: Admission, answer: Callable[[], dict[str, Any]]) -> Answer:
        """Wait the latency, then answer: errcode 88 when throttled, else as the fault says,
        else ``answer()``. Slow and token-expiring faults take effect before ``answer()``."""
        if admission.latency_s > 0:
            time.sleep(admission.latency_s)
        if admission.throttled:
            return Answer(_error(88, THROTTLED_ERRMSG))
        fault = admission.fault
        if fault is None:
            return Answer(answer())
        if fault.kind == "errcode":
            return Answer(_error(int(fault.value)))
        if fault.kind in _FRONT_FAULTS:
            return Answer(None, fault)
        if fault.kind == "slow":
            time.sleep(fault.value)
        elif fault.kind == "expire_token":
            self.world.expire_token()
        return Answer(answer(), fault if fault.kind == "truncate" else None)

    def not_an_api(self, path: str, *, arrived: float | None = None) -> None:
        """Count a request for a path DingTalk has no API at; it is never limited or faulted."""
        self.world.stats.record_request(path, time.monotonic() if arrived is None else arrived)

    @property
    def latency_s(self) -> float:
        """The world's latency, which every answer waits before it is given."""
        return max(self.world.latency_ms, 0) / 1000.0

    def delay(self) -> None:
        """Wait the world's latency, for an answer that did not go through :meth:`respond`."""
        latency_s = self.latency_s
        if latency_s > 0:
            time.sleep(latency_s)

    def _gettoken(self, appkey: str, appsecret: str) -> dict[str, Any]:
        if not appkey:
            return _error(90002, _GETTOKEN_ERRMSG[90002])
        if not appsecret:
            return _error(90003, _GETTOKEN_ERRMSG[90003])
        world = self.world
        with world.lock:
            if not world.credentials_match(appkey, appsecret):
                return _error(40089)
            ttl = world.token_ttl_seconds
            issued = world.tokens.issue(ttl)
            if issued.new:
                world.stats.record_token_issued()
        return {
            "errcode": 0,
            "errmsg": "ok",
            "access_token": issued.token,
            # From the TTL itself: (now + ttl) - now is not always ttl in floating point.
            "expires_in": math.ceil(ttl),
        }

    def _chat_get(self, access_token: str, chatid: str) -> dict[str, Any]:
        world = self.world
        with world.lock:
            state = world.tokens.state(access_token)
            if state == "unknown":
                return _error(40014)
            if state == "expired":
                return _error(42001)
            if not world.permission:
                return _error(43007)
            if not chatid:
                return _error(49000)
            chat = world.chats.get(chatid)
            if chat is None or not chat.readable:
                return _error(40016)
            info = chat.chat_info()
        return {"errcode": 0, "errmsg": "ok", "chat_info": info}
