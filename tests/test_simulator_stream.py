"""Tests for the simulator's Stream-mode gateway, over real HTTP and real websockets.

The client here is a plain websockets client written for these tests (:class:`StreamClient`),
so the gateway is checked against the protocol as documented, not against the product's
listener.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from etl.simulator import (
    GROUP_EVENT_TYPES,
    OPEN_CONNECTION_PATH,
    SimChat,
    StreamFault,
    StreamGateway,
    World,
    WorldChange,
    open_conversation_id,
    union_id,
)

REPO = Path(__file__).resolve().parent.parent
KEY = "k-stream"
SECRET = "s-stream"
EVENT_SUBSCRIPTION = [{"type": "EVENT", "topic": "*"}]
EVENT_HEADERS = {
    "messageId",
    "topic",
    "contentType",
    "time",
    "appId",
    "connectionId",
    "eventId",
    "eventType",
    "eventBornTime",
    "eventCorpId",
    "eventUnifiedAppId",
}
COMMON_DATA = {
    "eventType",
    "timeStamp",
    "chatId",
    "corpId",
    "openConversationId",
    "operator",
    "operatorUnionId",
}

Frame = dict[str, Any]
# What the client answers to a frame: (code, data) or None for no ACK. ``nth`` counts the
# pushes of the same eventId this client has seen, from 1 (always 1 for SYSTEM frames).
Policy = Callable[[Frame, int], tuple[int, dict[str, Any]] | None]


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.01)


def succeed(frame: Frame, nth: int) -> tuple[int, dict[str, Any]] | None:
    """As the official Go SDK answers: SUCCESS for events, the data echoed for SYSTEM."""
    if frame["type"] == "SYSTEM":
        echoed: dict[str, Any] = json.loads(frame["data"])
        return 200, echoed
    return 200, {"status": "SUCCESS", "message": "success"}


def first_push(answer: tuple[int, dict[str, Any]] | None) -> Policy:
    """Answer ``answer`` to the first push of each event, SUCCESS to every later one."""

    def policy(frame: Frame, nth: int) -> tuple[int, dict[str, Any]] | None:
        if frame["type"] == "EVENT" and nth == 1:
            return answer
        return succeed(frame, nth)

    return policy


def ack_text(frame: Frame, code: int, data: dict[str, Any]) -> str:
    return json.dumps(
        {
            "code": code,
            "headers": {
                "messageId": frame["headers"]["messageId"],
                "contentType": "application/json",
            },
            "message": "OK" if code == 200 else "error",
            "data": json.dumps(data),
        }
    )


def open_connection(gateway: StreamGateway, **body: Any) -> requests.Response:
    payload = {
        "clientId": KEY,
        "clientSecret": SECRET,
        "subscriptions": EVENT_SUBSCRIPTION,
        "ua": "tests/1.0",
        "localIp": "127.0.0.1",
    }
    payload.update(body)
    return requests.post(f"{gateway.gateway_url}{OPEN_CONNECTION_PATH}", json=payload, timeout=5)


def connect_url(gateway: StreamGateway) -> str:
    answer = open_connection(gateway)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return f"{body['endpoint']}?ticket={quote(body['ticket'])}"


class StreamClient:
    """A plain Stream-mode client: opens a connection, records every frame, ACKs by policy."""

    def __init__(self, gateway: StreamGateway, policy: Policy = succeed) -> None:
        self.gateway = gateway
        self.policy = policy
        self.received: list[tuple[float, str]] = []
        self.closed_by: ConnectionClosed | None = None
        self.ended = threading.Event()
        self._pushes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._ws: ClientConnection | None = None
        self._thread: threading.Thread | None = None
        self._stack = contextlib.ExitStack()

    def connect(self) -> StreamClient:
        # Entered as a context manager: websockets 17.1 deprecates a bare connect().
        url = connect_url(self.gateway)
        self._ws = self._stack.enter_context(connect(url, open_timeout=5, close_timeout=2))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stack.close()
        if self._thread is not None:
            self._thread.join()

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code if self._ws is not None else None

    def _read(self) -> None:
        assert self._ws is not None
        try:
            for message in self._ws:
                text = message if isinstance(message, str) else message.decode()
                with self._lock:
                    self.received.append((time.monotonic(), text))
                frame = parse(text)
                if frame is None:
                    continue
                nth = 1
                if frame["type"] == "EVENT":
                    self._pushes[frame["headers"]["eventId"]] += 1
                    nth = self._pushes[frame["headers"]["eventId"]]
                answer = self.policy(frame, nth)
                if answer is not None:
                    self._ws.send(ack_text(frame, *answer))
        except ConnectionClosed as exc:
            self.closed_by = exc
        finally:
            self.ended.set()

    def arrivals(self) -> list[float]:
        with self._lock:
            return [at for at, _ in self.received]

    def texts(self) -> list[str]:
        with self._lock:
            return [text for _, text in self.received]

    def frames(self, kind: str | None = None) -> list[Frame]:
        with self._lock:
            timed = list(self.received)
        parsed = (parse(text) for _, text in timed)
        return [f for f in parsed if f is not None and (kind is None or f["type"] == kind)]

    def events(self) -> list[Frame]:
        return self.frames("EVENT")

    def event_ids(self) -> list[str]:
        return [f["headers"]["eventId"] for f in self.events()]

    def arrival(self, event_id: str) -> float:
        with self._lock:
            timed = list(self.received)
        for at, text in timed:
            frame = parse(text)
            if frame is not None and frame.get("headers", {}).get("eventId") == event_id:
                return at
        raise AssertionError(f"event {event_id} never arrived")

    def wait_events(self, count: int) -> list[Frame]:
        wait_until(lambda: len(self.events()) >= count, what=f"{count} events")
        return self.events()


def parse(text: str) -> Frame | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def make_world() -> World:
    world = World(KEY, SECRET)
    world.add_chat(SimChat("c1", "Team", "own", ["own", "u1", "u2"]))
    return world


@pytest.fixture
def world() -> World:
    return make_world()


@pytest.fixture
def gateway(world: World) -> Iterator[StreamGateway]:
    with StreamGateway(world, ping_interval=0, redeliver_after=1.0) as gw:
        yield gw


@pytest.fixture
def clients() -> Iterator[Callable[..., StreamClient]]:
    """Connect clients; every one is closed at the end of the test."""
    opened: list[StreamClient] = []

    def open_client(gateway: StreamGateway, policy: Policy = succeed) -> StreamClient:
        client = StreamClient(gateway, policy)
        opened.append(client)
        return client.connect()

    yield open_client
    for client in opened:
        client.close()


def rename(world: World, n: int) -> None:
    world.set_attr("c1", name=f"Team {n}")


# -- connections/open --------------------------------------------------------------------------

OPEN_CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("accepted", {}, 200, ""),
    ("wrong-secret", {"clientSecret": "nope"}, 401, "InvalidAuthentication"),
    ("unknown-client", {"clientId": "other"}, 401, "InvalidAuthentication"),
    (
        "callback-only",
        {"subscriptions": [{"type": "CALLBACK", "topic": "/x"}]},
        403,
        "Forbidden.NoSubscription",
    ),
    ("no-subscription", {"subscriptions": []}, 403, "Forbidden.NoSubscription"),
    ("no-client-id", {"clientId": None}, 400, "InvalidParameter"),
]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [case[1:] for case in OPEN_CASES],
    ids=[case[0] for case in OPEN_CASES],
)
def test_connections_open_checks_credentials_and_subscription(
    body: dict[str, Any], status: int, code: str, gateway: StreamGateway
) -> None:
    answer = open_connection(gateway, **body)
    assert answer.status_code == status
    payload = answer.json()
    if status == 200:
        assert set(payload) == {"endpoint", "ticket"}
        assert re.fullmatch(r"ws://127\.0\.0\.1:\d+/connect", payload["endpoint"])
        assert payload["endpoint"] == gateway.endpoint
        assert len(payload["ticket"]) >= 16
    else:
        assert set(payload) == {"code", "message"}
        assert payload["code"] == code
    assert gateway.stats.gateway_requests == 1
    assert gateway.stats.tickets_issued == (1 if status == 200 else 0)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", OPEN_CONNECTION_PATH, 405), ("POST", "/v1.0/gateway/other", 404)],
    ids=["get", "unknown-path"],
)
def test_gateway_answers_json_to_other_requests(
    method: str, path: str, status: int, gateway: StreamGateway
) -> None:
    answer = requests.request(method, f"{gateway.gateway_url}{path}", timeout=5)
    assert answer.status_code == status
    assert set(answer.json()) == {"code", "message"}


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, "InvalidAuthentication"),
        (403, "Forbidden.AccessDenied"),
        (500, "InternalError"),
        (503, "ServiceUnavailable"),
    ],
    ids=["401", "403", "500", "503"],
)
def test_refuse_fault_answers_the_next_open_only(
    status: int, code: str, gateway: StreamGateway
) -> None:
    gateway.inject(f"refuse:{status}")
    refused = open_connection(gateway)
    assert refused.status_code == status
    assert refused.json()["code"] == code
    assert open_connection(gateway).status_code == 200
    assert gateway.stats.faults_fired == {"refuse": 1}
    assert gateway.pending_faults() == []


# -- the websocket handshake -------------------------------------------------------------------


def test_a_ticket_serves_one_connection(gateway: StreamGateway) -> None:
    url = connect_url(gateway)
    with connect(url, open_timeout=5):
        wait_until(lambda: gateway.connected, what="the connection")
        with pytest.raises(InvalidStatus) as refused:
            connect(url, open_timeout=5)
    assert refused.value.response.status_code == 401
    assert gateway.stats.connections_opened == 1
    assert gateway.stats.handshakes_refused == 1


@pytest.mark.parametrize(
    ("suffix", "status"),
    [("?ticket=made-up", 401), ("", 401), ("?ticket=a&ticket=b", 401)],
    ids=["unknown-ticket", "no-ticket", "two-tickets"],
)
def test_connect_without_a_valid_ticket_is_refused(
    suffix: str, status: int, gateway: StreamGateway
) -> None:
    connect_url(gateway)  # a ticket exists, but is not the one presented
    endpoint = gateway.endpoint
    assert endpoint is not None
    with pytest.raises(InvalidStatus) as refused:
        connect(endpoint + suffix, open_timeout=5)
    assert refused.value.response.status_code == status
    assert gateway.stats.connections_opened == 0


# -- world changes become events ---------------------------------------------------------------

# (id, change, eventType, operator, extra data fields)
EVENT_CASES: list[tuple[str, Callable[[World], object], str, str, dict[str, Any]]] = [
    (
        "add",
        lambda w: w.add_members("c1", ["u3", "own", "u4"], operator="u1"),
        "chat_add_member",
        "u1",
        {"userId": ["u3", "u4"], "unionId": [union_id("u3"), union_id("u4")]},
    ),
    (
        "remove",
        lambda w: w.remove_members("c1", ["u2"]),
        "chat_remove_member",
        "own",
        {"userId": ["u2"], "unionId": [union_id("u2")]},
    ),
    ("quit", lambda w: w.quit("c1", "u2"), "chat_quit", "u2", {}),
    (
        "owner",
        lambda w: w.set_attr("c1", owner="u1"),
        "chat_update_owner",
        "own",
        {"owner": "u1"},
    ),
    (
        "title",
        lambda w: w.set_attr("c1", name="Renamed", operator="u2"),
        "chat_update_title",
        "u2",
        {"title": "Renamed"},
    ),
    ("disband", lambda w: w.dismiss("c1"), "chat_disband", "own", {}),
]


@pytest.mark.parametrize(
    ("change", "event_type", "operator", "extra"),
    [case[1:] for case in EVENT_CASES],
    ids=[case[0] for case in EVENT_CASES],
)
def test_each_world_change_pushes_its_event(
    change: Callable[[World], object],
    event_type: str,
    operator: str,
    extra: dict[str, Any],
    world: World,
    gateway: StreamGateway,
    clients: Callable[..., StreamClient],
) -> None:
    client = clients(gateway)
    before = int(time.time() * 1000)
    change(world)
    after = int(time.time() * 1000)
    [frame] = client.wait_events(1)

    assert (frame["specVersion"], frame["type"]) == ("1.0", "EVENT")
    headers = frame["headers"]
    assert set(headers) == EVENT_HEADERS
    assert (headers["topic"], headers["contentType"]) == ("*", "application/json")
    assert headers["eventType"] == event_type
    assert headers["eventCorpId"] == gateway.corp_id
    assert headers["appId"] == headers["eventUnifiedAppId"] == gateway.app_id
    assert before <= int(headers["eventBornTime"]) <= int(headers["time"])

    data = json.loads(frame["data"])
    assert set(data) == COMMON_DATA | set(extra)
    assert before <= data["timeStamp"] <= after
    assert data == {
        "eventType": event_type,
        "timeStamp": data["timeStamp"],
        "chatId": "c1",
        "corpId": gateway.corp_id,
        "openConversationId": open_conversation_id("c1"),
        "operator": operator,
        "operatorUnionId": union_id(operator),
        **extra,
    }
    wait_until(lambda: gateway.delivery(headers["eventId"]).delivered, what="the ACK")


def test_changes_with_no_dingtalk_event_push_nothing(
    world: World, gateway: StreamGateway, clients: Callable[..., StreamClient]
) -> None:
    client = clients(gateway)
    world.set_attr("c1", icon="@new", searchable=1, validationType=1)
    world.add_members("c1", ["own"])  # already a member: no change at all
    rename(world, 1)
    [frame] = client.wait_events(1)
    assert frame["headers"]["eventType"] == "chat_update_title"
    assert len(gateway.deliveries()) == 1


def test_mutate_pushes_an_event_per_change(clients: Callable[..., StreamClient]) -> None:
    world = World.generate(30, seed=4, max_members=60)
    world.app_key, world.app_secret = KEY, SECRET
    changes: list[WorldChange] = []
    world.subscribe(changes.append)
    kinds = {
        "members_added": "chat_add_member",
        "members_removed": "chat_remove_member",
        "owner": "chat_update_owner",
        "name": "chat_update_title",
    }
    with StreamGateway(world, ping_interval=0, redeliver_after=5) as gateway:
        client = clients(gateway)
        assert world.mutate(0.5, seed=8) == 15
        expected = [(kinds.get(c.kind) or kinds[c.field], c.chatid) for c in changes]
        frames = client.wait_events(len(expected))
        received = [(f["headers"]["eventType"], json.loads(f["data"])["chatId"]) for f in frames]
        assert received == expected
        wait_until(lambda: gateway.stats.events_acked == len(expected), what="every ACK")


def test_push_event_and_push_raw_for_tests(
    gateway: StreamGateway, clients: Callable[..., StreamClient]
) -> None:
    client = clients(gateway)
    unknown = gateway.push_event("chat_add_member", "c-unknown", userId=["x1"], extra=[1])
    ownerless = gateway.push_event("chat_update_owner", "c1", owner="u1", omit=("chatId",))
    gateway.push_raw("not even JSON")
    other = gateway.push_event("user_add_org", None, userId=["x2"], unionId=["given"])
    client.wait_events(3)
    wait_until(lambda: "not even JSON" in client.texts(), what="the raw frame")

    datas = {f["headers"]["eventId"]: json.loads(f["data"]) for f in client.events()}
    assert datas[unknown]["chatId"] == "c-unknown"
    assert datas[unknown]["operator"] is None
    assert datas[unknown]["unionId"] == [union_id("x1")]
    assert datas[unknown]["extra"] == [1]
    assert "chatId" not in datas[ownerless]
    assert datas[ownerless]["operator"] == "own"
    assert datas[ownerless]["owner"] == "u1"
    assert "chatId" not in datas[other]
    assert datas[other]["unionId"] == ["given"]
    assert client.texts().index("not even JSON") == 2
    assert gateway.stats.raw_frames_sent == 1


# -- ACKs and redelivery -----------------------------------------------------------------------

ACK_CASES: list[tuple[str, tuple[int, dict[str, Any]] | None, bool]] = [
    ("success", (200, {"status": "SUCCESS", "message": "success"}), True),
    ("echo-data", (200, {"chatId": "c1", "eventType": "chat_update_title"}), True),
    ("later-500", (500, {"status": "LATER", "message": "later"}), False),
    ("later-200", (200, {"status": "LATER", "message": "later"}), False),
    ("code-500", (500, {"status": "SUCCESS"}), False),
    ("no-ack", None, False),
]


@pytest.mark.parametrize(
    ("answer", "delivered_first"),
    [case[1:] for case in ACK_CASES],
    ids=[case[0] for case in ACK_CASES],
)
def test_ack_decides_redelivery(
    answer: tuple[int, dict[str, Any]] | None,
    delivered_first: bool,
    world: World,
    clients: Callable[..., StreamClient],
) -> None:
    with StreamGateway(world, ping_interval=0, redeliver_after=0.3) as gateway:
        client = clients(gateway, first_push(answer))
        rename(world, 1)
        [first] = client.wait_events(1)
        event_id = first["headers"]["eventId"]
        if not delivered_first:
            [_, again] = client.wait_events(2)
            assert again["headers"]["eventId"] == event_id
            assert again["headers"]["messageId"] != first["headers"]["messageId"]
            assert again["data"] == first["data"]
        wait_until(lambda: gateway.delivery(event_id).delivered, what="delivery")
        # Another event left unanswered once: once it is pushed again, more than
        # redeliver_after has passed since the first event's last push.
        client.policy = first_push(None)
        marker = gateway.push_event("chat_update_title", "c1", title="marker")
        wait_until(lambda: gateway.delivery(marker).times_pushed == 2, what="the marker")

        delivery = gateway.delivery(event_id)
        assert delivery.times_pushed == (1 if delivered_first else 2)
        assert delivery.latency is not None
        assert delivery.latency == gateway.stats.ack_latencies[event_id] > 0
        if answer is None:
            assert [a.code for a in delivery.acks] == [200]
        else:
            first_ack = delivery.acks[0]
            assert (first_ack.code, first_ack.success) == (answer[0], delivered_first)
            assert delivery.acks[0].message_id == first["headers"]["messageId"]
        stats = gateway.stats
        assert stats.events_redelivered == (0 if delivered_first else 1) + 1
        assert stats.acks_negative == (1 if answer is not None and not delivered_first else 0)


def test_events_wait_while_no_client_is_connected(
    world: World, gateway: StreamGateway, clients: Callable[..., StreamClient]
) -> None:
    world.add_members("c1", ["u3"])
    world.quit("c1", "u1")
    assert not gateway.connected
    assert [d.times_pushed for d in gateway.deliveries()] == [0, 0]
    client = clients(gateway)
    frames = client.wait_events(2)
    assert [f["headers"]["eventType"] for f in frames] == ["chat_add_member", "chat_quit"]
    wait_until(lambda: gateway.stats.events_acked == 2, what="both ACKs")
    assert gateway.connected
    assert gateway.connections_opened == 1


def test_unanswered_events_go_to_the_next_connection(
    world: World, clients: Callable[..., StreamClient]
) -> None:
    with StreamGateway(world, ping_interval=0, redeliver_after=0.3) as gateway:
        mute = clients(gateway, lambda frame, nth: None)
        rename(world, 1)
        mute.wait_events(1)
        mute.close()
        wait_until(lambda: not gateway.connected, what="the disconnect")
        client = clients(gateway)
        [frame] = client.wait_events(1)
        assert frame["headers"]["eventId"] == mute.events()[0]["headers"]["eventId"]
        assert frame["headers"]["connectionId"] != mute.events()[0]["headers"]["connectionId"]
        wait_until(lambda: gateway.stats.events_acked == 1, what="the ACK")


@pytest.mark.parametrize(
    ("client_frame", "counter"),
    [
        ("{not json", "bad_frames"),
        (json.dumps({"code": 200, "headers": {"messageId": "never-sent"}}), "acks_unmatched"),
    ],
    ids=["not-json", "unknown-message"],
)
def test_odd_client_frames_are_counted_and_ignored(
    client_frame: str, counter: str, gateway: StreamGateway, world: World
) -> None:
    with connect(connect_url(gateway), open_timeout=5) as ws:
        ws.send(client_frame)
        wait_until(lambda: getattr(gateway.stats, counter) == 1, what=counter)
        rename(world, 1)
        frame = json.loads(ws.recv(timeout=5))
        ws.send(ack_text(frame, 200, {"status": "SUCCESS"}))
        wait_until(lambda: gateway.stats.events_acked == 1, what="the ACK")


# -- pings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [0.1, 0], ids=["every-0.1s", "disabled"])
def test_pings_and_their_acks(
    interval: float, world: World, clients: Callable[..., StreamClient]
) -> None:
    with StreamGateway(world, ping_interval=interval, redeliver_after=0.3) as gateway:
        client = clients(gateway, first_push(None))
        if not interval:
            # An event pushed twice: at least redeliver_after has passed, with no ping.
            rename(world, 1)
            client.wait_events(2)
            assert client.frames("SYSTEM") == []
            assert gateway.stats.pings_sent == 0
            return
        wait_until(lambda: len(client.frames("SYSTEM")) >= 3, what="three pings")
        pings = client.frames("SYSTEM")
        for ping in pings:
            assert ping["specVersion"] == "1.0"
            assert set(ping["headers"]) == {"messageId", "topic", "contentType", "time"}
            assert ping["headers"]["topic"] == "ping"
            assert set(json.loads(ping["data"])) == {"opaque"}
        assert len({json.loads(p["data"])["opaque"] for p in pings}) == len(pings)
        wait_until(lambda: gateway.stats.pings_acked >= len(pings), what="the ping ACKs")
        assert gateway.stats.pings_echoed == gateway.stats.pings_acked


# -- connection faults -------------------------------------------------------------------------


def test_drop_closes_without_a_close_frame(
    world: World, gateway: StreamGateway, clients: Callable[..., StreamClient]
) -> None:
    first = clients(gateway)
    wait_until(lambda: gateway.connected, what="the connection")
    gateway.inject("drop")
    wait_until(first.ended.is_set, what="the drop")
    assert isinstance(first.closed_by, ConnectionClosedError)
    assert first.closed_by.rcvd is None
    wait_until(lambda: not gateway.connected, what="the gateway to notice")
    rename(world, 1)
    second = clients(gateway)
    [frame] = second.wait_events(1)
    assert frame["headers"]["eventType"] == "chat_update_title"
    assert first.events() == []
    assert gateway.stats.faults_fired == {"drop": 1}


def test_drop_queued_before_a_client_hits_the_first_connection(
    gateway: StreamGateway, world: World, clients: Callable[..., StreamClient]
) -> None:
    gateway.inject("drop")
    rename(world, 1)
    first = clients(gateway)
    wait_until(first.ended.is_set, what="the drop")
    assert first.events() == []
    second = clients(gateway)
    second.wait_events(1)
    assert gateway.connections_opened == 2


def test_silence_sends_nothing_for_a_while_and_keeps_the_socket(
    world: World, clients: Callable[..., StreamClient]
) -> None:
    with StreamGateway(world, ping_interval=0.05, redeliver_after=5) as gateway:
        client = clients(gateway)
        wait_until(lambda: len(client.frames("SYSTEM")) >= 1, what="a first ping")
        injected = time.monotonic()
        gateway.inject("silence:0.6")
        rename(world, 1)
        [frame] = client.wait_events(1)
        arrived = client.arrival(frame["headers"]["eventId"])
        assert arrived - injected >= 0.6
        # Nothing at all arrived during the silence (a ping may have been on its way when it
        # began; when it ends, a ping that fell due goes out with the event).
        during = [at for at in client.arrivals() if injected + 0.2 < at < injected + 0.6]
        assert during == []
        assert not client.ended.is_set()
        assert gateway.stats.faults_fired == {"silence": 1}


def test_disconnect_moves_to_a_new_connection(
    world: World, gateway: StreamGateway, clients: Callable[..., StreamClient]
) -> None:
    old = clients(gateway)
    wait_until(lambda: gateway.connected, what="the connection")
    gateway.inject("disconnect")
    wait_until(lambda: old.frames("SYSTEM"), what="the disconnect frame")
    [notice] = old.frames("SYSTEM")
    assert notice["headers"]["topic"] == "disconnect"
    assert not gateway.connected
    rename(world, 1)
    new = clients(gateway)
    [frame] = new.wait_events(1)
    assert frame["headers"]["eventType"] == "chat_update_title"
    wait_until(old.ended.is_set, what="the old socket to close")
    assert old.close_code == 1000
    assert old.events() == []


def test_disconnect_closes_the_old_socket_after_the_grace_period(
    gateway: StreamGateway, clients: Callable[..., StreamClient]
) -> None:
    old = clients(gateway)
    wait_until(lambda: gateway.connected, what="the connection")
    gateway.inject("disconnect")
    wait_until(lambda: old.frames("SYSTEM"), what="the disconnect frame")
    told = time.monotonic()
    wait_until(old.ended.is_set, what="the old socket to close")
    assert time.monotonic() - told >= 4.9
    assert old.close_code == 1000


# -- event faults ------------------------------------------------------------------------------


def test_duplicate_pushes_the_same_event_twice(
    world: World, gateway: StreamGateway, clients: Callable[..., StreamClient]
) -> None:
    client = clients(gateway)
    gateway.inject("duplicate")
    rename(world, 1)
    rename(world, 2)
    frames = client.wait_events(3)
    ids = [f["headers"]["eventId"] for f in frames]
    assert ids[0] == ids[1] != ids[2]
    assert frames[0]["headers"]["messageId"] != frames[1]["headers"]["messageId"]
    wait_until(lambda: gateway.stats.events_acked == 2, what="the ACKs")
    assert gateway.stats.events_redelivered == 0
    assert gateway.stats.events_pushed == 3


@pytest.mark.parametrize(
    ("fault", "gap"),
    [("reorder", 0.0), ("delay:0.5", 0.5)],
    ids=["reorder", "delay"],
)
def test_reorder_and_delay_push_the_next_event_after_the_following_one(
    fault: str, gap: float, world: World, clients: Callable[..., StreamClient]
) -> None:
    with StreamGateway(world, ping_interval=0, redeliver_after=5) as gateway:
        client = clients(gateway)
        wait_until(lambda: gateway.connected, what="the connection")
        gateway.inject(fault)
        changed = time.monotonic()
        rename(world, 1)
        rename(world, 2)
        frames = client.wait_events(2)
        titles = [json.loads(f["data"])["title"] for f in frames]
        assert titles == ["Team 2", "Team 1"]
        held = gateway.delivery(frames[1]["headers"]["eventId"])
        assert held.pushed_at[0] - changed >= gap
        wait_until(lambda: gateway.stats.events_acked == 2, what="the ACKs")


def test_lose_never_delivers_the_next_event(
    world: World, clients: Callable[..., StreamClient]
) -> None:
    with StreamGateway(world, ping_interval=0, redeliver_after=0.3) as gateway:
        client = clients(gateway, first_push(None))
        wait_until(lambda: gateway.connected, what="the connection")
        gateway.inject("lose")
        rename(world, 1)
        rename(world, 2)
        # The second event's redelivery comes after the first's would have.
        frames = client.wait_events(2)
        lost, kept = gateway.deliveries()
        assert [f["headers"]["eventId"] for f in frames] == [kept.event_id] * 2
        assert lost.lost
        assert lost.times_pushed == 0
        assert gateway.stats.events_lost == 1


def test_lose_ack_pushes_the_event_again_though_it_was_acked(
    world: World, clients: Callable[..., StreamClient]
) -> None:
    with StreamGateway(world, ping_interval=0, redeliver_after=0.3) as gateway:
        client = clients(gateway)
        wait_until(lambda: gateway.connected, what="the connection")
        gateway.inject("lose_ack")
        rename(world, 1)
        frames = client.wait_events(2)
        [delivery] = gateway.deliveries()
        assert [f["headers"]["eventId"] for f in frames] == [delivery.event_id] * 2
        wait_until(lambda: gateway.delivery(delivery.event_id).delivered, what="the ACK")
        assert gateway.delivery(delivery.event_id).times_pushed == 2
        assert gateway.stats.acks_unmatched == 1


def test_malformed_frame_comes_before_the_next_event(
    world: World, gateway: StreamGateway, clients: Callable[..., StreamClient]
) -> None:
    client = clients(gateway)
    wait_until(lambda: gateway.connected, what="the connection")
    gateway.inject("malformed")
    rename(world, 1)
    [frame] = client.wait_events(1)
    texts = client.texts()
    assert len(texts) == 2
    assert parse(texts[0]) is None
    assert parse(texts[1]) == frame
    wait_until(lambda: gateway.stats.events_acked == 1, what="the ACK")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("explode", "unknown stream fault"),
        ("silence", "seconds"),
        ("delay:-1", ">= 0"),
        ("drop:1", "takes no argument"),
        ("refuse:200", "400..599"),
        ("refuse:x", "HTTP status"),
    ],
    ids=["unknown", "no-seconds", "negative", "extra-argument", "not-a-refusal", "not-a-status"],
)
def test_bad_fault_specs_queue_nothing(spec: str, message: str, gateway: StreamGateway) -> None:
    with pytest.raises(ValueError, match=message):
        StreamFault.parse(spec)
    with pytest.raises(ValueError, match=message):
        gateway.inject("drop", spec)
    assert gateway.pending_faults() == []


def test_pending_faults_keep_the_order_they_were_queued(gateway: StreamGateway) -> None:
    gateway.inject("duplicate", "refuse:503", "silence:1", StreamFault.parse("lose"))
    assert gateway.pending_faults() == ["duplicate", "refuse:503", "silence:1", "lose"]


# -- life cycle --------------------------------------------------------------------------------


def test_stop_closes_connections_and_cannot_restart(world: World) -> None:
    gateway = StreamGateway(world, ping_interval=0)
    assert gateway.endpoint is None
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", gateway.gateway_url)
    gateway.start()
    client = StreamClient(gateway).connect()
    try:
        wait_until(lambda: gateway.connected, what="the connection")
        gateway.stop()
        gateway.stop()
        wait_until(client.ended.is_set, what="the close")
        assert client.close_code == 1001
        with pytest.raises(RuntimeError, match="stopped"):
            gateway.start()
        with pytest.raises(requests.ConnectionError):
            open_connection(gateway)
    finally:
        client.close()


def test_a_gateway_never_started_stops_cleanly(world: World) -> None:
    StreamGateway(world).stop()


@pytest.mark.parametrize(
    ("ping_interval", "redeliver_after"),
    [(-1, 10), (20, 0), (float("nan"), 10)],
    ids=["negative-ping", "zero-redelivery", "nan-ping"],
)
def test_bad_timings_are_refused(
    ping_interval: float, redeliver_after: float, world: World
) -> None:
    with pytest.raises(ValueError, match="must be"):
        StreamGateway(world, ping_interval=ping_interval, redeliver_after=redeliver_after)


def test_the_six_group_event_types() -> None:
    assert [case[2] for case in EVENT_CASES] == list(GROUP_EVENT_TYPES)


# -- the command line --------------------------------------------------------------------------


def test_simulate_serves_the_stream_gateway() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl", "simulate", "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        while not lines or lines[-1] != "Ctrl-C to stop.":
            line = proc.stdout.readline()
            assert line, lines
            lines.append(line.rstrip("\n"))
        [gateway_line] = [line for line in lines if "Stream gateway" in line]
        found = re.fullmatch(
            r"  Stream gateway on (http://127\.0\.0\.1:\d+) \(\[events\] gateway_url\)",
            gateway_line,
        )
        assert found is not None, gateway_line
        assert lines.index(gateway_line) == len(lines) - 2
        answer = requests.post(
            f"{found.group(1)}{OPEN_CONNECTION_PATH}",
            json={
                "clientId": "demo-key",
                "clientSecret": "demo-secret",
                "subscriptions": EVENT_SUBSCRIPTION,
            },
            timeout=5,
        )
        assert answer.status_code == 200
        assert answer.json()["endpoint"].startswith("ws://127.0.0.1:")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0
    assert rest.splitlines()[-1] == "served 0 requests, 0 throttled"
