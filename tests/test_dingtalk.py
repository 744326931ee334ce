"""Tests for etl.dingtalk: ``classify`` over recorded answers, the client against the simulator
over real HTTP on 127.0.0.1, the process-wide ``Pacer``, and secrets in error messages.

Nothing of ``etl`` is patched. Where a test must not sleep, the ``Pacer`` gets a fake clock and a
stop event whose ``wait()`` records the pause instead of sleeping (both are constructor
parameters); the client's retry pauses go through that same event.
"""

from __future__ import annotations

import itertools
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from etl.dingtalk import (
    CHAT_GET,
    GETTOKEN,
    MAX_SERVER_WAIT_SECONDS,
    CallCounter,
    DingTalkClient,
    Pacer,
    classify,
)
from etl.errors import (
    ApiError,
    ChatError,
    EtlError,
    FatalApiError,
    RequestFailed,
    RunInterrupted,
    TokenError,
    TransientError,
)
from etl.redact import redact
from etl.simulator import SimChat, Simulator, World
from tests.conftest import APP_KEY, APP_SECRET

RESPONSES = Path(__file__).parent / "fixtures" / "responses"
BACKOFF_MAX = 0.05
FAST: dict[str, Any] = {
    "timeout": 2.0,
    "max_attempts": 4,
    "backoff_base": 0.01,
    "backoff_max": BACKOFF_MAX,
}
NO_LIMIT = 1000.0  # requests per second: pacing that never gets in the way


# --------------------------------------------------------------------------------------------
# Helpers and fixtures


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingStop(threading.Event):
    """A stop event whose ``wait`` never sleeps: it records the pause (and may advance time)."""

    def __init__(self, clock: FakeClock, *, advance: bool = False) -> None:
        super().__init__()
        self.clock = clock
        self.advance = advance
        self.waits: list[float] = []
        self._waits_lock = threading.Lock()

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            with self._waits_lock:
                self.waits.append(timeout)
                if self.advance:
                    self.clock.advance(timeout)
        return self.is_set()


@dataclass
class Virtual:
    """A pacer on virtual time: pauses are recorded in ``stop.waits``, nothing sleeps."""

    pacer: Pacer
    clock: FakeClock
    stop: RecordingStop


def virtual(rate: float = NO_LIMIT, *, advance: bool = False) -> Virtual:
    clock = FakeClock()
    stop = RecordingStop(clock, advance=advance)
    return Virtual(Pacer(rate, clock=clock, stop=stop), clock, stop)


Connect = Callable[..., DingTalkClient]
Serve = Callable[[World], Simulator]


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Build clients with fast retries; every session is closed at the end of the test."""
    clients: list[DingTalkClient] = []

    def make(
        base_url: str,
        *,
        secret: str = APP_SECRET,
        pacer: Pacer | None = None,
        **options: Any,
    ) -> DingTalkClient:
        client = DingTalkClient(
            base_url, APP_KEY, secret, pacer=pacer or Pacer(NO_LIMIT), **{**FAST, **options}
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start a simulator for a world built by the test; all are stopped at the end."""
    started: list[Simulator] = []

    def start(world: World) -> Simulator:
        sim = Simulator(world).start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


def many_chats(n: int, **world_options: Any) -> World:
    world = World(APP_KEY, APP_SECRET, **world_options)
    for i in range(n):
        world.add_chat(SimChat(f"chat-{i:02d}", f"Chat {i}", "u1", ["u1", f"u{i + 2}"]))
    return world


def assert_counted(client: DingTalkClient, world: World) -> None:
    """``api_calls`` is exactly the number of HTTP requests the server saw."""
    assert client.api_calls == world.stats.total_requests


def chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most of ``times`` inside any half-open window of ``window`` seconds."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


# --------------------------------------------------------------------------------------------
# 1. classify(): a pure function over recorded answers


@dataclass(frozen=True)
class Case:
    id: str
    file: str
    outcome: type[Exception] | None  # None: success
    endpoint: str = CHAT_GET
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    errcode: int | None = None
    http_status: int | None = None
    throttled: bool = False
    wait: float | None = None


CLASSIFY_CASES = [
    Case("ok", "ok.json", None),
    Case("gettoken-ok", "gettoken_ok.json", None, endpoint=GETTOKEN),
    Case("busy", "errcode_-1.json", TransientError, errcode=-1),
    Case("gettoken-busy", "errcode_-1.json", TransientError, endpoint=GETTOKEN, errcode=-1),
    Case("88-qps", "errcode_88_90018.json", TransientError, errcode=88, throttled=True),
    Case(
        "gettoken-88-qps",
        "errcode_88_90018.json",
        TransientError,
        endpoint=GETTOKEN,
        errcode=88,
        throttled=True,
    ),
    Case("90018", "errcode_90018.json", TransientError, errcode=90018, throttled=True),
    Case("90002-api-limit", "errcode_90002.json", TransientError, errcode=90002, throttled=True),
    Case("88-no-subcode", "errcode_88_no_subcode.json", RequestFailed, errcode=88),
    Case("40001", "errcode_40001.json", TokenError, errcode=40001),
    Case("40014", "errcode_40014.json", TokenError, errcode=40014),
    Case("42001", "errcode_42001.json", TokenError, errcode=42001),
    Case("40016", "errcode_40016.json", RequestFailed, errcode=40016),
    Case("49000", "errcode_49000.json", RequestFailed, errcode=49000),
    Case("43007", "errcode_43007.json", FatalApiError, errcode=43007),
    Case("70001", "errcode_70001.json", FatalApiError, errcode=70001),
    Case("90020", "errcode_90020.json", FatalApiError, errcode=90020),
    Case("unknown-12345", "errcode_12345.json", RequestFailed, errcode=12345),
    Case("gettoken-90002", "gettoken_90002.json", FatalApiError, endpoint=GETTOKEN, errcode=90002),
    Case("gettoken-90003", "gettoken_90003.json", FatalApiError, endpoint=GETTOKEN, errcode=90003),
    Case("gettoken-40089", "errcode_40089.json", FatalApiError, endpoint=GETTOKEN, errcode=40089),
    Case("gettoken-40001", "errcode_40001.json", FatalApiError, endpoint=GETTOKEN, errcode=40001),
    Case("gettoken-42001", "errcode_42001.json", FatalApiError, endpoint=GETTOKEN, errcode=42001),
    Case("gettoken-unknown", "errcode_12345.json", FatalApiError, endpoint=GETTOKEN, errcode=12345),
    Case("block-1111", "block_1111.json", TransientError, throttled=True, wait=5.0),
    Case(
        "block-wait-1e400",
        "block_wait_huge.json",
        TransientError,
        throttled=True,
        wait=MAX_SERVER_WAIT_SECONDS,
    ),
    Case("no-errcode", "no_errcode.json", TransientError, http_status=200),
    Case("json-array", "json_array.json", TransientError, http_status=200),
    Case("nonjson-200", "nonjson_200.html", TransientError, http_status=200),
    Case("truncated-200", "truncated_ok.json.part", TransientError, http_status=200),
    Case("errcode-string", "errcode_string.json", RequestFailed),
    Case("nginx-502", "nginx_502.html", TransientError, status=502, http_status=502),
    Case(
        "429-retry-after",
        "nginx_429.html",
        TransientError,
        status=429,
        headers={"Retry-After": "3"},
        http_status=429,
        throttled=True,
        wait=3.0,
    ),
    Case(
        "503-retry-after",
        "nginx_503.html",
        TransientError,
        status=503,
        headers={"Retry-After": "7"},
        http_status=503,
        wait=7.0,
    ),
    Case(
        "503-retry-after-inf",
        "nginx_503.html",
        TransientError,
        status=503,
        headers={"Retry-After": "inf"},
        http_status=503,
        wait=MAX_SERVER_WAIT_SECONDS,
    ),
    Case(
        "503-retry-after-date",
        "nginx_503.html",
        TransientError,
        status=503,
        headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"},
        http_status=503,
    ),
    Case("404", "nginx_404.html", RequestFailed, status=404, http_status=404),
    Case("403", "nginx_403.html", RequestFailed, status=403, http_status=403),
    Case(
        "gettoken-404",
        "nginx_404.html",
        RequestFailed,
        endpoint=GETTOKEN,
        status=404,
        http_status=404,
    ),
    Case(
        "gettoken-403",
        "nginx_403.html",
        RequestFailed,
        endpoint=GETTOKEN,
        status=403,
        http_status=403,
    ),
]


@pytest.mark.parametrize("case", CLASSIFY_CASES, ids=[c.id for c in CLASSIFY_CASES])
def test_classify_recorded_answer(case: Case) -> None:
    body = (RESPONSES / case.file).read_bytes()

    if case.outcome is None:
        data = classify(case.endpoint, case.status, body, case.headers)
        assert data["errcode"] == 0
        assert ("chat_info" in data) == (case.endpoint == CHAT_GET)
        return

    with pytest.raises(EtlError) as info:
        classify(case.endpoint, case.status, body, case.headers)
    exc = info.value
    assert type(exc) is case.outcome, exc
    assert isinstance(exc, ApiError)
    assert (exc.errcode, exc.http_status) == (case.errcode, case.http_status)
    assert exc.message.startswith(f"{case.endpoint}: ")
    if isinstance(exc, TransientError):
        assert exc.throttled is case.throttled
        assert exc.wait == case.wait
    else:
        assert not case.throttled
        assert case.wait is None


def test_every_recorded_answer_is_classified() -> None:
    used = {c.file for c in CLASSIFY_CASES}
    assert {p.name for p in RESPONSES.iterdir()} == used


# --------------------------------------------------------------------------------------------
# 2. The client against the simulator


def test_busy_twice_then_success_counts_every_request(
    simulator: Simulator, world: World, connect: Connect
) -> None:
    client = connect(simulator.base_url)
    world.inject("chat-a", "errcode:-1", "errcode:-1")
    counter = CallCounter()

    info = client.get_chat("chat-a", counter)

    assert info["name"] == "Alpha"
    assert info["useridlist"] == ["u1", "u2", "u3"]
    assert counter.attempts == 3
    assert client.retries == 2
    assert client.api_calls == 4  # one gettoken + three chat/get
    assert world.stats.gettoken_calls == 1
    assert world.stats.requests_by_chat["chat-a"] == 3
    assert_counted(client, world)


TRANSIENT_FAULTS = [
    # (target, faults, least pause before the retry, in seconds)
    ("chat-a", ["http:502"], 0.0),
    ("chat-a", ["http:503"], 0.0),
    ("chat-a", ["http:429"], 1.0),
    ("chat-a", ["nonjson"], 0.0),
    ("chat-a", ["truncate"], 0.0),
    ("chat-a", ["reset"], 0.0),
    ("chat-a", ["block:0"], 1.0),
    ("chat-a", ["block:3"], 3.0),
    ("chat-a", ["errcode:88"], 1.0),
    ("chat-a", ["errcode:90018"], 1.0),
    ("chat-a", ["errcode:-1"], 0.0),
    ("chat-a", ["slow:0.6"], 0.0),
    ("@gettoken", ["errcode:-1"], 0.0),
    ("@gettoken", ["http:502"], 0.0),
    ("@gettoken", ["reset"], 0.0),
    ("@gettoken", ["nonjson"], 0.0),
    ("@gettoken", ["errcode:88"], 1.0),
]


@pytest.mark.parametrize(
    ("target", "faults", "least_pause"),
    TRANSIENT_FAULTS,
    ids=[f"{t.strip('@')}-{f[0]}" for t, f, _ in TRANSIENT_FAULTS],
)
def test_transient_fault_is_retried_then_succeeds(
    simulator: Simulator,
    world: World,
    connect: Connect,
    target: str,
    faults: list[str],
    least_pause: float,
) -> None:
    vt = virtual()
    # The slow fault answers after 0.6 s: beyond this timeout.
    client = connect(simulator.base_url, pacer=vt.pacer, timeout=0.25)
    world.inject(target, *faults)
    counter = CallCounter()

    assert client.get_chat("chat-a", counter)["name"] == "Alpha"

    assert world.pending_faults(target) == []
    assert counter.attempts == (2 if target == "chat-a" else 1)
    assert client.retries == 1
    assert client.api_calls == 3
    assert_counted(client, world)
    if least_pause:
        # Throttled or told to wait: the pause before the retry honours it.
        assert max(vt.stop.waits) >= least_pause
    else:
        # Plain backoff: full jitter, capped by backoff_max, no pacer pause.
        assert vt.stop.waits
        assert all(w <= BACKOFF_MAX for w in vt.stop.waits)


GIVE_UP = [
    # (faults, max_attempts, the last error's text, errcode, http_status)
    (["http:502", "nonjson", "errcode:-1"], 3, "errcode -1", -1, None),
    (["errcode:-1", "errcode:-1", "http:503"], 3, "HTTP 503", None, 503),
    (["reset", "reset"], 2, "connection failed", None, None),
    (["errcode:-1"] * 5, 5, "errcode -1", -1, None),
]


@pytest.mark.parametrize(
    ("faults", "max_attempts", "last_error", "errcode", "http_status"),
    GIVE_UP,
    ids=["mixed-ending-busy", "ending-503", "resets", "busy-x5"],
)
def test_transient_beyond_max_attempts_fails_the_chat(
    simulator: Simulator,
    world: World,
    connect: Connect,
    faults: list[str],
    max_attempts: int,
    last_error: str,
    errcode: int | None,
    http_status: int | None,
) -> None:
    client = connect(simulator.base_url, max_attempts=max_attempts)
    world.inject("chat-a", *faults)
    counter = CallCounter()

    with pytest.raises(ChatError) as info:
        client.get_chat("chat-a", counter)

    exc = info.value
    assert type(exc) is ChatError
    assert last_error in exc.message
    assert f"gave up after {max_attempts} attempts" in exc.message
    assert (exc.errcode, exc.http_status) == (errcode, http_status)
    assert isinstance(exc.__cause__, TransientError)
    assert counter.attempts == max_attempts
    assert client.retries == max_attempts - 1
    assert_counted(client, world)


CHAT_FAILURES = [
    # (chatid, faults, errcode, http_status)
    ("chat-x", [], 40016, None),
    ("", [], 49000, None),
    ("chat-a", ["errcode:12345"], 12345, None),
    ("chat-a", ["http:404"], None, 404),
    ("chat-a", ["http:403"], None, 403),
]


@pytest.mark.parametrize(
    ("chatid", "faults", "errcode", "http_status"),
    CHAT_FAILURES,
    ids=["40016-unreadable", "49000-empty-chatid", "unknown-errcode", "http-404", "http-403"],
)
def test_chat_error_fails_the_chat_without_retry(
    simulator: Simulator,
    world: World,
    connect: Connect,
    chatid: str,
    faults: list[str],
    errcode: int | None,
    http_status: int | None,
) -> None:
    client = connect(simulator.base_url)
    if faults:
        world.inject(chatid, *faults)
    counter = CallCounter()

    with pytest.raises(ChatError) as info:
        client.get_chat(chatid, counter)

    assert type(info.value) is ChatError
    assert (info.value.errcode, info.value.http_status) == (errcode, http_status)
    assert counter.attempts == 1
    assert client.retries == 0
    assert_counted(client, world)
    # The run goes on: the next chat reads fine with the same client and token.
    assert client.get_chat("chat-b")["name"] == "Beta"
    assert world.stats.gettoken_calls == 1


FATAL = [
    # (world options, app_secret the client uses, faults by key, errcode, chat/get requests)
    ({"permission": False}, APP_SECRET, {}, 43007, 1),
    ({}, "wrong-secret-0123456789", {}, 40089, 0),
    ({}, APP_SECRET, {"chat-a": ["errcode:70001"]}, 70001, 1),
    ({}, APP_SECRET, {"chat-a": ["errcode:90020"]}, 90020, 1),
    ({}, APP_SECRET, {"@gettoken": ["errcode:90002"]}, 90002, 0),
    ({}, APP_SECRET, {"@gettoken": ["http:403"]}, None, 0),
]


@pytest.mark.parametrize(
    ("world_options", "secret", "faults", "errcode", "chat_requests"),
    FATAL,
    ids=[
        "43007-no-permission",
        "40089-bad-credentials",
        "70001",
        "90020-quota",
        "gettoken-90002",
        "gettoken-http-403",
    ],
)
def test_fatal_api_error_stops_at_once(
    serve: Serve,
    connect: Connect,
    world_options: dict[str, Any],
    secret: str,
    faults: dict[str, list[str]],
    errcode: int | None,
    chat_requests: int,
) -> None:
    world = World(APP_KEY, APP_SECRET, **world_options)
    world.add_chat(SimChat("chat-a", "Alpha", "u1", ["u1"]))
    for key, specs in faults.items():
        world.inject(key, *specs)
    client = connect(serve(world).base_url, secret=secret)

    with pytest.raises(FatalApiError) as info:
        client.get_chat("chat-a")

    assert info.value.errcode == errcode
    assert world.stats.gettoken_calls == 1  # no retry of a fatal answer
    assert world.stats.requests_by_chat["chat-a"] == chat_requests
    assert client.retries == 0
    assert_counted(client, world)


def test_gettoken_retries_exhausted_is_fatal(
    simulator: Simulator, world: World, connect: Connect
) -> None:
    client = connect(simulator.base_url, max_attempts=2)
    world.inject("@gettoken", "errcode:-1", "http:502")

    with pytest.raises(FatalApiError) as info:
        client.get_chat("chat-a")

    assert "cannot get an access token" in info.value.message
    assert "gave up after 2 attempts" in info.value.message
    assert world.stats.gettoken_calls == 2
    assert world.stats.requests_by_chat["chat-a"] == 0
    assert_counted(client, world)


def _expire_between_calls(world: World) -> None:
    world.expire_token()


def _expire_on_next_request(world: World) -> None:
    world.inject("chat-b", "expire_token")


@pytest.mark.parametrize(
    "expire",
    [_expire_between_calls, _expire_on_next_request],
    ids=["world.expire_token", "expire_token-fault"],
)
def test_expired_token_is_refreshed_once(
    simulator: Simulator, world: World, connect: Connect, expire: Callable[[World], None]
) -> None:
    client = connect(simulator.base_url)
    client.get_chat("chat-a")
    first_token = world.current_token
    expire(world)
    counter = CallCounter()

    assert client.get_chat("chat-b", counter)["name"] == "Beta"

    assert counter.attempts == 2  # 42001, then the same request with the new token
    assert world.stats.gettoken_calls == 2
    assert world.stats.tokens_issued == 2
    assert world.current_token != first_token
    assert client.retries == 1
    assert client.api_calls == 5
    assert_counted(client, world)


TOKEN_REFUSALS = [
    # (faults on chat-a, raises, chat/get requests, gettoken requests)
    (["errcode:40001"], None, 2, 2),
    (["errcode:40014"], None, 2, 2),
    (["errcode:42001"], None, 2, 2),
    (["errcode:40001", "errcode:40001"], FatalApiError, 2, 2),
    (["errcode:42001", "errcode:40014"], FatalApiError, 2, 2),
    (["errcode:40001", "errcode:-1", "errcode:40001"], FatalApiError, 3, 2),
]


@pytest.mark.parametrize(
    ("faults", "raises", "chat_requests", "gettoken_requests"),
    TOKEN_REFUSALS,
    ids=[
        "40001-once",
        "40014-once",
        "42001-once",
        "40001-twice",
        "42001-then-40014",
        "40001-busy-40001",
    ],
)
def test_token_refused_refreshes_once_then_is_fatal(
    simulator: Simulator,
    world: World,
    connect: Connect,
    faults: list[str],
    raises: type[Exception] | None,
    chat_requests: int,
    gettoken_requests: int,
) -> None:
    client = connect(simulator.base_url)
    world.inject("chat-a", *faults)
    counter = CallCounter()

    if raises is None:
        assert client.get_chat("chat-a", counter)["name"] == "Alpha"
    else:
        with pytest.raises(raises) as info:
            client.get_chat("chat-a", counter)
        assert type(info.value) is raises
        assert "freshly issued token" in str(info.value)
        assert isinstance(info.value.__cause__, TokenError)

    assert counter.attempts == chat_requests
    assert world.stats.gettoken_calls == gettoken_requests
    assert_counted(client, world)


def test_token_is_cached_across_calls(simulator: Simulator, world: World, connect: Connect) -> None:
    client = connect(simulator.base_url)

    for _ in range(3):
        for chatid in ("chat-a", "chat-b", "chat-c"):
            client.get_chat(chatid)

    assert world.stats.gettoken_calls == 1
    assert client.api_calls == 10
    assert client.retries == 0
    assert_counted(client, world)


def test_threads_hitting_an_expired_token_share_one_refresh(serve: Serve, connect: Connect) -> None:
    # Latency keeps the eight requests in flight together, so all eight see 42001.
    world = many_chats(8, latency_ms=30)
    chatids = world.chatids()
    client = connect(serve(world).base_url)
    client.get_chat(chatids[0])

    with ThreadPoolExecutor(max_workers=8) as pool:
        for round_ in range(3):
            before = world.stats.gettoken_calls
            world.expire_token()
            infos = list(pool.map(client.get_chat, chatids))
            assert [i["name"] for i in infos] == [f"Chat {i}" for i in range(8)], round_
            assert world.stats.gettoken_calls == before + 1, round_

    assert world.stats.tokens_issued == 4
    assert_counted(client, world)


def test_server_given_wait_is_honoured_in_real_time(
    simulator: Simulator, world: World, connect: Connect
) -> None:
    client = connect(simulator.base_url)
    client.get_chat("chat-b")  # token first: time only the blocked call
    world.inject("chat-a", "block:1")

    started = time.monotonic()
    assert client.get_chat("chat-a")["name"] == "Alpha"
    elapsed = time.monotonic() - started

    assert 0.95 <= elapsed < 5.0
    assert world.stats.requests_by_chat["chat-a"] == 2


THROTTLES = [
    # (faults on chat-a, pause every other request must observe afterwards)
    (["errcode:88"], 1.0),
    (["errcode:90018"], 1.0),
    (["http:429"], 1.0),
    (["block:0"], 1.0),
    (["block:2"], 2.0),
    (["errcode:-1"], 0.0),  # busy is not throttling: nobody else pauses
    (["http:502"], 0.0),
]


@pytest.mark.parametrize(
    ("faults", "shared_pause"),
    THROTTLES,
    ids=["88-90018", "90018", "http-429", "block-0", "block-2", "busy-no-pause", "502-no-pause"],
)
def test_throttling_pauses_the_shared_pacer(
    simulator: Simulator,
    world: World,
    connect: Connect,
    faults: list[str],
    shared_pause: float,
) -> None:
    # Frozen virtual time: a pause set on the pacer stays visible to whoever acquires next.
    vt = virtual()
    worker_1 = connect(simulator.base_url, pacer=vt.pacer)
    worker_2 = connect(simulator.base_url, pacer=vt.pacer)
    worker_1.get_chat("chat-b")
    world.inject("chat-a", *faults)

    worker_1.get_chat("chat-a")
    seen = len(vt.stop.waits)
    worker_2.get_chat("chat-c")  # another worker, same process-wide pacer

    others = vt.stop.waits[seen:]
    if shared_pause:
        assert others
        assert others[0] == pytest.approx(shared_pause, abs=0.01)
    else:
        assert others == []


# --------------------------------------------------------------------------------------------
# 3. Pacer


def test_pacer_keeps_the_server_window_under_the_rate(serve: Serve, connect: Connect) -> None:
    rate = 20
    world = many_chats(12, rate_limit=rate)
    sim = serve(world)
    client = connect(sim.base_url, pacer=Pacer(rate))
    chatids = [world.chatids()[i % 12] for i in range(59)]  # + 1 gettoken = 60 requests

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as pool:
        infos = list(pool.map(client.get_chat, chatids))
    elapsed = time.monotonic() - started

    assert len(infos) == 59
    assert client.api_calls == 60
    assert client.retries == 0
    assert_counted(client, world)
    assert world.stats.throttled == 0
    assert world.stats.max_requests_in_any_window("/chat/get") <= rate
    # The limit is process-wide over all requests, token calls included.
    every = world.stats.arrivals("/chat/get") + world.stats.arrivals("/gettoken")
    assert max_in_window(every) <= rate
    assert elapsed >= 2.0  # 60 starts at <= 20 per second need more than two seconds


def test_pacer_acquire_raises_once_stopped() -> None:
    stop = threading.Event()
    pacer = Pacer(1, stop=stop)
    pacer.acquire()  # the first slot is free
    threading.Timer(0.1, stop.set).start()

    started = time.monotonic()
    with pytest.raises(RunInterrupted):
        pacer.acquire()  # would wait ~1 s for its slot
    assert time.monotonic() - started < 0.8

    with pytest.raises(RunInterrupted):
        pacer.acquire()  # and at once from now on


def _stop_before_start(world: World, stop: threading.Event) -> None:
    stop.set()


def _stop_during_retry_pause(world: World, stop: threading.Event) -> None:
    world.inject("chat-a", "block:30")
    threading.Timer(0.2, stop.set).start()


@pytest.mark.parametrize(
    "arrange",
    [_stop_before_start, _stop_during_retry_pause],
    ids=["before-any-request", "during-a-30s-retry-pause"],
)
def test_stopped_client_raises_run_interrupted(
    simulator: Simulator,
    world: World,
    connect: Connect,
    arrange: Callable[[World, threading.Event], None],
) -> None:
    stop = threading.Event()
    client = connect(simulator.base_url, pacer=Pacer(NO_LIMIT, stop=stop))
    arrange(world, stop)

    started = time.monotonic()
    with pytest.raises(RunInterrupted):
        client.get_chat("chat-a")

    assert time.monotonic() - started < 2.0
    assert_counted(client, world)


def _burst(total: int) -> list[tuple[str, float]]:
    return [("acquire", 1.0)] * total


def _random_arrivals(seed: int, total: int) -> list[tuple[str, float]]:
    rng = random.Random(seed)
    ops: list[tuple[str, float]] = []
    while len(ops) < total:
        ops.append(("tick", rng.choice([0.0, 0.01, 0.05, 0.3, 1.1])))
        ops.extend([("acquire", 1.0)] * rng.randint(1, 8))
    return ops


PACER_SCHEDULES = [
    # (rate, advance the clock while waiting, operations, longest allowed span of the starts)
    (20.0, False, _burst(60), 2.05),
    (20.0, True, _burst(100), 4.1),
    (20.0, False, _random_arrivals(1, 200), None),
    (20.0, False, _random_arrivals(2, 200), None),
    (20.0, True, _random_arrivals(3, 200), None),
    (2.5, False, _burst(10), None),
    (0.5, True, _burst(5), None),
    (
        20.0,
        False,
        [*_burst(5), ("pause", 1.5), *_burst(30), ("tick", 0.7), ("pause", 0.2), *_burst(30)],
        None,
    ),
]


@pytest.mark.parametrize(
    ("rate", "advance", "ops", "max_span"),
    PACER_SCHEDULES,
    ids=[
        "burst-60",
        "one-worker-100",
        "random-1",
        "random-2",
        "random-advancing-3",
        "fractional-rate-2.5",
        "slow-rate-0.5",
        "pauses",
    ],
)
def test_pacer_slots_never_put_n_plus_1_starts_in_a_window(
    rate: float, advance: bool, ops: list[tuple[str, float]], max_span: float | None
) -> None:
    vt = virtual(rate, advance=advance)
    starts: list[float] = []
    pauses: list[tuple[float, float]] = []
    for op, value in ops:
        if op == "tick":
            vt.clock.advance(value)
        elif op == "pause":
            vt.pacer.pause(value)
            pauses.append((vt.clock.now, vt.clock.now + value))
        else:
            seen = len(vt.stop.waits)
            now = vt.clock.now
            vt.pacer.acquire()
            # Frozen time: the start is "now" plus the pause the pacer asked for.
            starts.append(vt.clock.now if advance else now + sum(vt.stop.waits[seen:]))

    n = max(1, int(rate))
    assert max_in_window(starts) <= n
    assert all(b - a >= 1.0 for a, b in zip(starts, starts[n:], strict=False))
    if rate < 1:
        assert all(b - a >= 1 / rate for a, b in itertools.pairwise(starts))
    for begin, end in pauses:
        assert not any(begin < s < end for s in starts), (begin, end)
    if max_span is not None:
        # ... and the pacer does not hold requests back much beyond what the rate demands.
        assert starts[-1] - starts[0] <= max_span


# --------------------------------------------------------------------------------------------
# 4. Secrets stay out of errors


@dataclass
class Env:
    world: World
    sim: Simulator
    connect: Connect
    tokens: set[str] = field(default_factory=set)

    def client(self, **options: Any) -> DingTalkClient:
        client = self.connect(self.sim.base_url, **options)
        client.get_chat("chat-b")  # a token is issued and in use
        self.note_token()
        return client

    def note_token(self) -> None:
        if self.world.current_token:
            self.tokens.add(self.world.current_token)


def _fail_resets(env: Env) -> None:
    client = env.client(max_attempts=2)
    env.world.inject("chat-a", "reset", "reset")
    client.get_chat("chat-a")


def _fail_timeouts(env: Env) -> None:
    client = env.client(max_attempts=2, timeout=0.2)
    env.world.inject("chat-a", "slow:0.5", "slow:0.5")
    client.get_chat("chat-a")


def _fail_token_refused_twice(env: Env) -> None:
    client = env.client()
    env.world.inject("chat-a", "errcode:40001", "errcode:40001")
    client.get_chat("chat-a")


def _fail_refresh_resets(env: Env) -> None:
    client = env.client(max_attempts=2)
    env.world.expire_token()
    env.world.inject("@gettoken", "reset", "truncate")
    client.get_chat("chat-a")


def _fail_bad_secret(env: Env) -> None:
    env.connect(env.sim.base_url, secret="wrong-secret-0123456789").get_chat("chat-a")


def _fail_connection_refused(env: Env) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env.connect(f"http://127.0.0.1:{port}", max_attempts=2).get_chat("chat-a")


SECRET_FAILURES = {
    "resets": (_fail_resets, ChatError),
    "timeouts": (_fail_timeouts, ChatError),
    "40001-twice": (_fail_token_refused_twice, FatalApiError),
    "gettoken-reset-truncate": (_fail_refresh_resets, FatalApiError),
    "bad-secret": (_fail_bad_secret, FatalApiError),
    "connection-refused": (_fail_connection_refused, FatalApiError),
}


@pytest.mark.parametrize(
    ("fail", "raises"), list(SECRET_FAILURES.values()), ids=list(SECRET_FAILURES)
)
def test_failures_never_reveal_secrets(
    simulator: Simulator,
    world: World,
    connect: Connect,
    capsys: pytest.CaptureFixture[str],
    fail: Callable[[Env], None],
    raises: type[Exception],
) -> None:
    env = Env(world, simulator, connect)

    with pytest.raises(raises) as info:
        fail(env)
    env.note_token()

    secrets = {APP_SECRET, "wrong-secret-0123456789", *env.tokens}
    assert env.tokens or raises is FatalApiError
    exc = info.value
    ours = [e for e in chain(exc) if isinstance(e, EtlError)]
    texts = [str(exc), repr(exc), repr(exc.args)]
    for link in chain(exc):
        # Our errors are masked when built; anything else once passed through redact().
        shown = (lambda s: s) if isinstance(link, EtlError) else redact
        texts += [shown(str(link)), shown(repr(link.args))]
    for text in texts:
        for secret in secrets:
            assert secret not in text
    for error in ours:
        # URLs in our messages name the path only: no query string, no credentials in it.
        assert re.search(r"(gettoken|chat/get)\?", error.message) is None, error.message
        assert "appsecret=" not in error.message
        assert "appkey=" not in error.message
    logged = capsys.readouterr().err
    for secret in secrets:
        assert secret not in logged


# --------------------------------------------------------------------------------------------
# 5. Oversized answers


def test_oversized_answer_fails_the_chat_without_retry(serve: Serve, connect: Connect) -> None:
    world = World(APP_KEY, APP_SECRET)
    world.add_chat(SimChat("big", "Big", "user-0001", [f"user-{i:04d}" for i in range(1, 501)]))
    world.add_chat(SimChat("small", "Small", "u1", ["u1"]))
    client = connect(serve(world).base_url, max_response_bytes=2048)
    counter = CallCounter()

    with pytest.raises(ChatError) as info:
        client.get_chat("big", counter)

    assert type(info.value) is ChatError
    assert "max_response_bytes" in info.value.message
    assert "2048" in info.value.message
    assert counter.attempts == 1
    assert world.stats.requests_by_chat["big"] == 1
    assert client.get_chat("small")["name"] == "Small"  # the run goes on
    assert_counted(client, world)
