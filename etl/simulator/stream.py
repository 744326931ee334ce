"""The Stream-mode front: DingTalk's event gateway and websocket, pushing the world's changes.

Boundary: the wire of Stream mode (see ``reference/dingtalk-events.md``). Over HTTP,
``POST /v1.0/gateway/connections/open`` checks the app's credentials and issues one-use tickets;
a websocket endpoint on its own port accepts one connection per ticket and pushes the six group
events as DingTalk frames, with pings, ACK bookkeeping, redelivery and scripted faults. Events
come from the world's change listeners, or from a test through :meth:`StreamGateway.push_event`
and :meth:`StreamGateway.push_raw`. The gateway never changes the world; it reads the app's
credentials and a chat's owner, always before taking its own lock, never inside it.

The websocket is served by the third-party ``websockets`` package (its sync API); everything
else is the standard library.

Threads: an accept loop for the HTTP gateway (one thread per request), the websockets server
(one thread per connection, which reads the client's ACKs) and one dispatcher, the only thread
that sends frames, so frames leave in the order the dispatcher decides them.
"""

from __future__ import annotations

import contextlib
import heapq
import inspect
import itertools
import json
import logging
import math
import selectors
import socket
import socketserver
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, Literal, cast
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

from etl.simulator.events import (
    DEFAULT_CORP_ID,
    AckRecord,
    Delivery,
    FaultTarget,
    StreamFault,
    StreamStats,
    event_data,
    event_for_change,
    union_id,
)
from etl.simulator.world import World, WorldChange

__all__ = ["CONNECT_PATH", "DISCONNECT_GRACE_SECONDS", "OPEN_CONNECTION_PATH", "StreamGateway"]

logger = logging.getLogger(__name__)
# Silent unless the embedding application configures logging (as in the HTTP front).
logger.addHandler(logging.NullHandler())

OPEN_CONNECTION_PATH: Final = "/v1.0/gateway/connections/open"
CONNECT_PATH: Final = "/connect"

# After a SYSTEM disconnect the old socket stays open this long, unless a new one opens first.
DISCONNECT_GRACE_SECONDS: Final = 5.0
# Bounds each closing handshake, so stop() and the disconnect fault never wait on a mute client.
_CLOSE_TIMEOUT: Final = 2.0
_MALFORMED_FRAME: Final = '{"specVersion": "1.0", "type": "EVENT", "headers": {'
_MAX_BODY_BYTES: Final = 1 << 20

_SERVE_OPTIONS: dict[str, Any] = {"compression": None, "close_timeout": _CLOSE_TIMEOUT}
if "ping_interval" in inspect.signature(serve).parameters:
    # websockets >= 15 sends protocol-level keepalive pings of its own. DingTalk's liveness
    # check is the SYSTEM ping frame; a socket that pings by itself would also break the
    # "silence" fault, which must send nothing at all.
    _SERVE_OPTIONS["ping_interval"] = None


_REFUSAL_CODES: Final[dict[int, str]] = {
    400: "InvalidParameter",
    401: "InvalidAuthentication",
    403: "Forbidden.AccessDenied",
    429: "Throttling",
    500: "InternalError",
    503: "ServiceUnavailable",
}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _json(payload: object) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


# -- internal state ----------------------------------------------------------------------------

_EventState = Literal["waiting", "in_flight", "delivered", "lost", "delayed", "held"]


@dataclass
class _Event:
    event_id: str
    event_type: str
    data: dict[str, Any]
    data_text: str
    born_ms: int
    state: _EventState = "waiting"
    # Bumped by each push, so a redelivery timer knows whether a later push superseded it.
    generation: int = 0
    # The next push is a redelivery (counted as such); set when a push went unacknowledged.
    redelivery: bool = False
    # Released from a delay or a hold: its next push takes no event fault.
    exempt: bool = False
    pushed_at: list[float] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    acks: list[AckRecord] = field(default_factory=list)
    acked_at: float | None = None
    latency: float | None = None

    def snapshot(self) -> Delivery:
        return Delivery(
            self.event_id,
            self.event_type,
            json.loads(self.data_text),
            tuple(self.pushed_at),
            tuple(self.message_ids),
            tuple(self.acks),
            self.acked_at,
            self.latency,
            self.state == "lost",
        )


@dataclass(frozen=True)
class _RawFrame:
    text: str


class _Conn:
    """One open websocket, as the dispatcher sees it."""

    def __init__(self, ws: ServerConnection, seq: int, now: float, ping_interval: float) -> None:
        self.ws = ws
        self.seq = seq
        self.connection_id = uuid.uuid4().hex
        self.next_ping = now + ping_interval if ping_interval > 0 else math.inf
        self.silent_until = 0.0
        self.retiring_until: float | None = None
        # Set once the dispatcher closed or dropped it, or its client went away: nothing more
        # is sent on it.
        self.closed = False


@dataclass(frozen=True)
class _Send:
    conn: _Conn
    text: str


@dataclass(frozen=True)
class _Drop:
    conn: _Conn


@dataclass(frozen=True)
class _Close:
    conn: _Conn


_Action = _Send | _Drop | _Close


# -- the HTTP gateway --------------------------------------------------------------------------


class _GatewayHTTPServer(ThreadingHTTPServer):
    # Handler threads are joined by server_close(); their sockets are shut down first.
    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], gateway: StreamGateway) -> None:
        self.gateway = gateway
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _GatewayHandler)

    def server_bind(self) -> None:
        # As in the HTTP front: skip getfqdn, which can stall without reverse DNS.
        socketserver.TCPServer.server_bind(self)
        address = cast(tuple[Any, ...], self.server_address)
        self.server_name = str(address[0])
        self.server_port = int(address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("stream gateway: error while serving a connection", exc_info=True)

    def track(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(conn)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _GatewayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dingtalk-simulator"
    sys_version = ""
    disable_nagle_algorithm = True
    # A client that connects and sends nothing cannot hold a handler thread forever.
    timeout = 30

    @property
    def _server(self) -> _GatewayHTTPServer:
        return cast(_GatewayHTTPServer, self.server)

    def setup(self) -> None:
        super().setup()
        self._server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        # The body carries clientSecret; nothing about a request is logged.
        return

    def _serve(self) -> None:
        try:
            body = self._read_body()
            status, payload = self._server.gateway._answer_http(
                self.command, urlsplit(self.path).path, body
            )
            self._send_json(status, payload)
        except OSError:
            self.close_connection = True
            logger.debug("stream gateway: client connection lost", exc_info=True)
        except Exception:
            logger.exception("stream gateway: internal error")
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send_json(500, {"code": "InternalError", "message": "simulator error"})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            return None
        if length > _MAX_BODY_BYTES:
            self.close_connection = True
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _send_json(self, status: int, payload: Mapping[str, Any]) -> None:
        body = _json(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


# -- the gateway -------------------------------------------------------------------------------


class StreamGateway:
    """DingTalk's Stream-mode gateway over a :class:`World`: tickets, a websocket, events.

    The HTTP socket is bound on construction, so ``gateway_url`` is known before ``start()``;
    the websocket is bound by ``start()``, which also subscribes to the world: changes made
    from then on become events. Events wait while no client is connected; each is pushed until
    a successful ACK (code 200, data status not ``LATER``) arrives, again ``redeliver_after``
    seconds after each push that got none, with the same eventId and a new messageId.
    """

    def __init__(
        self,
        world: World,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ping_interval: float = 20,
        redeliver_after: float = 10,
        ws_port: int = 0,
        corp_id: str = DEFAULT_CORP_ID,
    ) -> None:
        if not (math.isfinite(ping_interval) and ping_interval >= 0):
            raise ValueError("ping_interval must be >= 0 (0 disables pings)")
        if not (math.isfinite(redeliver_after) and redeliver_after > 0):
            raise ValueError("redeliver_after must be > 0")
        self.world = world
        self.ping_interval = float(ping_interval)
        self.redeliver_after = float(redeliver_after)
        self.corp_id = corp_id
        self.app_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"dingtalk-simulator:{world.app_key}"))
        self._ws_port = ws_port
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self.stats = StreamStats(self._lock)
        self._events: dict[str, _Event] = {}
        self._ready: deque[str | _RawFrame] = deque()
        self._held: deque[str] = deque()
        self._timers: list[tuple[float, int, Literal["redeliver", "release"], str, int]] = []
        self._timer_seq = itertools.count()
        self._messages: dict[str, tuple[Literal["event", "ping", "system"], str, float]] = {}
        self._conns: list[_Conn] = []
        self._conn_seq = itertools.count(1)
        self._tickets: set[str] = set()
        # Every ticket ever issued, so that tests can look for one where it must not be.
        self.tickets_issued: list[str] = []
        self._faults: dict[FaultTarget, deque[tuple[int, StreamFault]]] = {
            "open": deque(),
            "connection": deque(),
            "event": deque(),
        }
        self._fault_seq = itertools.count()
        self._stopping = False
        self._http = _GatewayHTTPServer((host, port), self)
        self._wake_r, self._wake_w = socket.socketpair()
        self._ws_server: Server | None = None
        self._threads: list[threading.Thread] = []
        self._ws_thread: threading.Thread | None = None
        self._closers: list[threading.Thread] = []
        self._unsubscribe: Callable[[], None] | None = None
        # Reentrant because stop() may run from a signal handler that interrupted start().
        self._state_lock = threading.RLock()
        self._started = False
        self._closed = False

    # -- addresses -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return str(cast(tuple[Any, ...], self._http.server_address)[0])

    @property
    def port(self) -> int:
        return int(cast(tuple[Any, ...], self._http.server_address)[1])

    @property
    def gateway_url(self) -> str:
        """``http://host:port``: what ``[events] gateway_url`` points at."""
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def endpoint(self) -> str | None:
        """The websocket URL that connections/open hands out; None before ``start()``."""
        server = self._ws_server
        if server is None:
            return None
        ws_port = int(server.socket.getsockname()[1])
        return f"ws://{_url_host(self.host)}:{ws_port}{CONNECT_PATH}"

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> StreamGateway:
        with self._state_lock:
            if self._closed:
                raise RuntimeError("stream gateway was stopped; create a new one")
            if self._started:
                return self
            self._ws_server = serve(
                self._serve_connection,
                self.host,
                self._ws_port,
                process_request=self._check_ticket,
                logger=logger,
                **_SERVE_OPTIONS,
            )
            self._started = True
            self._unsubscribe = self.world.subscribe(self._on_change)
            self._ws_thread = self._thread(self._ws_server.serve_forever, "websocket")
            self._threads = [
                self._thread(self._accept_loop, "http"),
                self._thread(self._dispatch_loop, "dispatcher"),
            ]
        return self

    def _thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(
            target=target, name=f"stream-gateway-{name}:{self.port}", daemon=True
        )
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop serving: close every connection and socket, join every thread."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        # The dispatcher first, so nothing is sent while the connections close.
        for thread in self._threads:
            thread.join()
        self._http.close_connections()
        self._http.server_close()
        if self._ws_server is not None:
            # Closes open connections (1001 going away) and joins their handler threads.
            self._ws_server.shutdown()
        if self._ws_thread is not None:
            self._ws_thread.join()
        for thread in self._closers:
            thread.join()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> StreamGateway:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what tests see ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a connection would receive an event pushed now (open, not retiring)."""
        with self._lock:
            return self._current() is not None

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for conn in self._conns if not conn.closed)

    @property
    def connections_opened(self) -> int:
        with self._lock:
            return self.stats.connections_opened

    def deliveries(self) -> list[Delivery]:
        """Every event so far, in the order they were created."""
        with self._lock:
            return [event.snapshot() for event in self._events.values()]

    def delivery(self, event_id: str) -> Delivery:
        with self._lock:
            return self._events[event_id].snapshot()

    def inject(self, *specs: str | StreamFault) -> None:
        """Queue faults; all are parsed first, so a bad spec queues nothing.

        ``refuse:STATUS`` answers the next connections/open with that status; ``drop``,
        ``silence:S`` and ``disconnect`` hit the current connection as soon as there is one;
        ``duplicate``, ``reorder``, ``delay:S``, ``lose``, ``lose_ack`` (its ACK never
        arrives) and ``malformed`` apply to the next event push (a redelivery included).
        Each target consumes its faults in order.
        """
        parsed = [s if isinstance(s, StreamFault) else StreamFault.parse(s) for s in specs]
        with self._lock:
            for fault in parsed:
                self._faults[fault.target].append((next(self._fault_seq), fault))
            self._wake.notify_all()

    def pending_faults(self) -> list[str]:
        with self._lock:
            queued = sorted(item for queue in self._faults.values() for item in queue)
            return [fault.spec or fault.kind for _, fault in queued]

    def push_event(
        self,
        event_type: str,
        chatid: str | None,
        *,
        omit: Iterable[str] = (),
        **fields: Any,
    ) -> str:
        """Push an event of any type, for any chat (known to the world or not); its eventId.

        The data holds the common fields (operator: the chat's owner when the world knows the
        chat, else null; ``chatid=None`` leaves ``chatId`` out), then ``fields`` over them
        (``unionId`` follows a given ``userId`` unless given too), less the keys in ``omit``.
        """
        owner: str | None = None
        if chatid is not None:
            # The world's lock first and alone: the gateway never holds its lock inside it.
            with self.world.lock:
                chat = self.world.chats.get(chatid)
                owner = chat.owner if chat is not None else None
        operator = fields.get("operator", owner)
        data = event_data(event_type, chatid, operator, time.time(), self.corp_id)
        userids = fields.get("userId")
        if isinstance(userids, list) and "unionId" not in fields:
            data["unionId"] = [union_id(str(u)) for u in userids]
        data.update(fields)
        if chatid is None:
            data.pop("chatId", None)
        for key in omit:
            data.pop(key, None)
        return self._enqueue(event_type, data)

    def push_raw(self, text: str) -> None:
        """Send ``text`` as one websocket text frame, in turn with the events."""
        with self._lock:
            self._ready.append(_RawFrame(text))
            self._wake.notify_all()

    # -- world changes -> events ----------------------------------------------------------------

    def _on_change(self, change: WorldChange) -> None:
        # Runs on the changing thread under the world's lock: build, queue, return.
        mapped = event_for_change(change)
        if mapped is not None:
            event_type, extra = mapped
            data = event_data(event_type, change.chatid, change.operator, change.at, self.corp_id)
            data.update(extra)
            self._enqueue(event_type, data)

    def _enqueue(self, event_type: str, data: dict[str, Any]) -> str:
        event = _Event(uuid.uuid4().hex, event_type, data, _json(data), _now_ms())
        with self._lock:
            self._events[event.event_id] = event
            self._ready.append(event.event_id)
            self.stats.events_created += 1
            self._wake.notify_all()
        return event.event_id

    # -- HTTP: connections/open ----------------------------------------------------------------

    def _answer_http(self, method: str, path: str, body: bytes | None) -> tuple[int, Any]:
        with self._lock:
            self.stats.gateway_requests += 1
        status, payload = self._open_connection(method, path, body)
        if status != 200:
            with self._lock:
                self.stats.gateway_refused += 1
        return status, payload

    def _open_connection(self, method: str, path: str, body: bytes | None) -> tuple[int, Any]:
        if path != OPEN_CONNECTION_PATH:
            return 404, _error("NotFound", f"no API at {path}")
        if method != "POST":
            return 405, _error("MethodNotAllowed", "use POST")
        with self._lock:
            fault = self._take("open")
        if fault is not None:
            status = int(fault.value)
            code = _REFUSAL_CODES.get(status, "Error")
            return status, _error(code, f"simulated refusal ({fault.spec})")
        request = _parse_object(body)
        if request is None:
            return 400, _error("InvalidParameter", "the body must be a JSON object")
        client_id, client_secret = request.get("clientId"), request.get("clientSecret")
        if not (isinstance(client_id, str) and isinstance(client_secret, str)):
            return 400, _error("InvalidParameter", "clientId and clientSecret are required")
        if not self.world.credentials_match(client_id, client_secret):
            return 401, _error("InvalidAuthentication", "clientId or clientSecret is wrong")
        subscriptions = request.get("subscriptions")
        if not (
            isinstance(subscriptions, list)
            and any(isinstance(s, dict) and s.get("type") == "EVENT" for s in subscriptions)
        ):
            return 403, _error("Forbidden.NoSubscription", "no EVENT subscription requested")
        ticket = str(uuid.uuid4())
        with self._lock:
            self._tickets.add(ticket)
            self.tickets_issued.append(ticket)
            self.stats.tickets_issued += 1
        return 200, {"endpoint": self.endpoint, "ticket": ticket}

    def _accept_loop(self) -> None:
        # As in the HTTP front: a wake-up socket lets stop() end the loop at once.
        self._http.timeout = 0.5
        with selectors.DefaultSelector() as selector:
            selector.register(self._http, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _events in selector.select():
                    if key.fileobj is self._http and not self._stopping:
                        self._http.handle_request()

    # -- websocket: handshake and the client's frames -------------------------------------------

    def _check_ticket(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        tickets = parse_qs(url.query).get("ticket", [])
        with self._lock:
            if url.path != CONNECT_PATH:
                self.stats.handshakes_refused += 1
                return connection.respond(HTTPStatus.NOT_FOUND, "no such endpoint\n")
            ticket = tickets[0] if len(tickets) == 1 else None
            if ticket is None or ticket not in self._tickets or self._stopping:
                self.stats.handshakes_refused += 1
                return connection.respond(HTTPStatus.UNAUTHORIZED, "unknown or used ticket\n")
            # One ticket, one connection.
            self._tickets.discard(ticket)
        return None

    def _serve_connection(self, ws: ServerConnection) -> None:
        with self._lock:
            if self._stopping:
                return
            conn = _Conn(ws, next(self._conn_seq), time.monotonic(), self.ping_interval)
            self._conns.append(conn)
            self.stats.connections_opened += 1
            self._wake.notify_all()
        try:
            for message in ws:
                self._on_client_frame(message)
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                conn.closed = True
                self._conns.remove(conn)
                self._wake.notify_all()

    def _on_client_frame(self, message: str | bytes) -> None:
        arrived = time.monotonic()
        frame = _parse_object(message) if isinstance(message, str) else None
        headers = frame.get("headers") if frame is not None else None
        message_id = headers.get("messageId") if isinstance(headers, dict) else None
        with self._lock:
            if frame is None:
                self.stats.bad_frames += 1
                return
            self.stats.acks_received += 1
            sent = self._messages.get(message_id) if isinstance(message_id, str) else None
            if sent is None:
                self.stats.acks_unmatched += 1
                return
            kind, ref, pushed = sent
            data = frame.get("data")
            answer = _parse_object(data) if isinstance(data, str) else None
            if kind == "event":
                status = answer.get("status") if answer is not None else None
                ack = AckRecord(
                    cast(str, message_id),
                    frame.get("code"),
                    status if isinstance(status, str) else None,
                    arrived,
                )
                self._record_ack(self._events[ref], ack, pushed)
            elif kind == "ping" and frame.get("code") == 200:
                self.stats.pings_acked += 1
                if answer is not None and answer.get("opaque") == ref:
                    self.stats.pings_echoed += 1

    def _record_ack(self, event: _Event, ack: AckRecord, pushed: float) -> None:
        event.acks.append(ack)
        if not ack.success:
            # The redelivery timer of the push pushes it again; nothing more to do here.
            self.stats.acks_negative += 1
            return
        if event.acked_at is None:
            event.acked_at = ack.at
            event.latency = ack.at - pushed
            event.state = "delivered"
            self.stats.events_acked += 1
            self.stats.ack_latencies[event.event_id] = event.latency

    # -- the dispatcher --------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    actions = self._plan(now)
                    if actions:
                        break
                    self._wake.wait(self._next_due(now))
            # Sent outside the lock: a slow socket must not hold up ACKs or new events. The
            # pushes were recorded first, so an ACK can never arrive before its push is known.
            for action in actions:
                self._perform(action)

    def _plan(self, now: float) -> list[_Action]:
        """Decide what to send now; every decision is recorded before anything is sent."""
        actions: list[_Action] = []
        self._fire_timers(now)
        self._retire_connections(now, actions)
        current = self._take_connection_faults(now, actions)
        for conn in self._conns:
            live = not conn.closed and conn.retiring_until is None
            if live and now >= conn.silent_until and now >= conn.next_ping:
                actions.append(_Send(conn, self._ping_frame(now)))
                conn.next_ping = now + self.ping_interval
        if current is not None and now >= current.silent_until:
            self._push_ready(current, now, actions)
        return actions

    def _current(self) -> _Conn | None:
        """The connection events go to: the newest that is open and not told to go."""
        for conn in reversed(self._conns):
            if not conn.closed and conn.retiring_until is None:
                return conn
        return None

    def _fire_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _due, _seq, what, event_id, generation = heapq.heappop(self._timers)
            event = self._events[event_id]
            if what == "redeliver":
                if event.state == "in_flight" and event.generation == generation:
                    event.state = "waiting"
                    event.redelivery = True
                    self._ready.append(event_id)
            elif event.state == "delayed":
                event.state = "waiting"
                event.exempt = True
                self._ready.appendleft(event_id)

    def _retire_connections(self, now: float, actions: list[_Action]) -> None:
        for conn in self._conns:
            if conn.closed or conn.retiring_until is None:
                continue
            succeeded = any(other.seq > conn.seq and not other.closed for other in self._conns)
            if succeeded or now >= conn.retiring_until:
                conn.closed = True
                actions.append(_Close(conn))

    def _take_connection_faults(self, now: float, actions: list[_Action]) -> _Conn | None:
        current = self._current()
        # A fault queued behind a silence waits for the silence to end.
        while current is not None and now >= current.silent_until:
            fault = self._take("connection")
            if fault is None:
                break
            if fault.kind == "drop":
                current.closed = True
                actions.append(_Drop(current))
            elif fault.kind == "silence":
                current.silent_until = now + fault.value
            else:
                actions.append(_Send(current, self._system_frame("disconnect", now)))
                current.retiring_until = now + DISCONNECT_GRACE_SECONDS
            current = self._current()
        return current

    def _push_ready(self, conn: _Conn, now: float, actions: list[_Action]) -> None:
        while self._ready:
            item = self._ready.popleft()
            if isinstance(item, _RawFrame):
                self.stats.raw_frames_sent += 1
                actions.append(_Send(conn, item.text))
                continue
            event = self._events[item]
            if event.state != "waiting":
                # Acknowledged (late) after it was queued again.
                continue
            fault = None if event.exempt else self._take("event")
            event.exempt = False
            kind = fault.kind if fault is not None else None
            if kind == "lose":
                event.state = "lost"
                self.stats.events_lost += 1
                continue
            if kind == "delay":
                assert fault is not None
                event.state = "delayed"
                self._timer(now + fault.value, "release", event)
                continue
            if kind == "reorder":
                event.state = "held"
                self._held.append(event.event_id)
                continue
            if kind == "malformed":
                actions.append(_Send(conn, _MALFORMED_FRAME))
            self._push(event, conn, now, actions)
            if kind == "lose_ack":
                # The client's answer to this push is lost on the way: it is pushed again.
                self._messages.pop(event.message_ids[-1], None)
            if kind == "duplicate":
                self._push(event, conn, now, actions)
            # A held event goes right after the one that followed it.
            while self._held:
                held = self._events[self._held.popleft()]
                if held.state == "held":
                    self._push(held, conn, now, actions)

    def _push(self, event: _Event, conn: _Conn, now: float, actions: list[_Action]) -> None:
        message_id = uuid.uuid4().hex
        event.generation += 1
        if event.redelivery:
            event.redelivery = False
            self.stats.events_redelivered += 1
        event.state = "in_flight"
        event.pushed_at.append(now)
        event.message_ids.append(message_id)
        self._messages[message_id] = ("event", event.event_id, now)
        self._timer(now + self.redeliver_after, "redeliver", event)
        self.stats.events_pushed += 1
        actions.append(_Send(conn, self._event_frame(event, message_id, conn)))

    def _timer(self, due: float, what: Literal["redeliver", "release"], event: _Event) -> None:
        entry = (due, next(self._timer_seq), what, event.event_id, event.generation)
        heapq.heappush(self._timers, entry)

    def _take(self, target: FaultTarget) -> StreamFault | None:
        queue = self._faults[target]
        if not queue:
            return None
        _seq, fault = queue.popleft()
        self.stats.faults_fired[fault.kind] += 1
        return fault

    def _next_due(self, now: float) -> float | None:
        """Seconds until the dispatcher has something to do unprompted; None: nothing."""
        due = [self._timers[0][0]] if self._timers else []
        for conn in self._conns:
            if conn.closed:
                continue
            if conn.retiring_until is not None:
                due.append(conn.retiring_until)
                continue
            if conn.silent_until > now:
                due.append(conn.silent_until)
            elif conn.next_ping < math.inf:
                due.append(conn.next_ping)
        return max(min(due) - now, 0.0) if due else None

    def _perform(self, action: _Action) -> None:
        if isinstance(action, _Send):
            # A connection that went away meanwhile: its pushes are redelivered by their timers.
            with contextlib.suppress(ConnectionClosed, OSError):
                action.conn.ws.send(action.text)
        elif isinstance(action, _Drop):
            # Shut the TCP stream down under the websocket: the client gets no close frame.
            with contextlib.suppress(OSError):
                action.conn.ws.socket.shutdown(socket.SHUT_RDWR)
        else:
            # A closing handshake waits for the client; it must not hold up the dispatcher.
            closer = threading.Thread(
                target=action.conn.ws.close,
                name=f"stream-gateway-closer:{self.port}",
                daemon=True,
            )
            with self._lock:
                self._closers.append(closer)
            closer.start()

    # -- frames ----------------------------------------------------------------------------------

    def _event_frame(self, event: _Event, message_id: str, conn: _Conn) -> str:
        # Header values are strings, as DingTalk sends them (the SDKs parse times with int()).
        headers = {
            "appId": self.app_id,
            "connectionId": conn.connection_id,
            "contentType": "application/json",
            "eventBornTime": str(event.born_ms),
            "eventCorpId": self.corp_id,
            "eventId": event.event_id,
            "eventType": event.event_type,
            "eventUnifiedAppId": self.app_id,
            "messageId": message_id,
            "time": str(_now_ms()),
            "topic": "*",
        }
        frame = {"specVersion": "1.0", "type": "EVENT", "headers": headers}
        frame["data"] = event.data_text
        return _json(frame)

    def _ping_frame(self, now: float) -> str:
        opaque = uuid.uuid4().hex
        self.stats.pings_sent += 1
        return self._system_frame("ping", now, {"opaque": opaque}, ref=opaque)

    def _system_frame(
        self,
        topic: str,
        now: float,
        data: Mapping[str, Any] | None = None,
        *,
        ref: str = "",
    ) -> str:
        message_id = uuid.uuid4().hex
        self._messages[message_id] = ("ping" if topic == "ping" else "system", ref, now)
        headers = {
            "contentType": "application/json",
            "messageId": message_id,
            "time": str(_now_ms()),
            "topic": topic,
        }
        payload = dict(data) if data is not None else {"reason": "the server is going away"}
        frame = {"specVersion": "1.0", "type": "SYSTEM", "headers": headers}
        frame["data"] = _json(payload)
        return _json(frame)


def _parse_object(text: str | bytes | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _url_host(host: str) -> str:
    # A wildcard bind is reachable through loopback; the wildcard itself is not a URL host.
    if host in ("", "0.0.0.0"):  # noqa: S104 - a comparison, not a bind
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
