"""The HTTP front: DingTalk's ``oapi`` endpoints served over real HTTP from a world.

Boundary: the wire only. Requests are parsed here and handed to :class:`DingTalkApi`, whose
:class:`Answer` is written back as DingTalk would (JSON with HTTP 200, also for errcodes); the
faults that belong to the transport or to a proxy (HTML pages, the IP limiter's JSON, resets,
truncated bodies) are acted out here. The handler reaches the world only through the facade.
"""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, cast
from urllib.parse import parse_qs, urlsplit

from etl.simulator.api import CHAT_GET_PATH, GETTOKEN_PATH, Answer, DingTalkApi
from etl.simulator.world import SimStats, World

__all__ = ["Simulator"]

logger = logging.getLogger(__name__)
# Without a handler, logging's last-resort handler would write warnings to stderr; the server
# must stay silent unless the embedding application configures logging.
logger.addHandler(logging.NullHandler())

_JSON_TYPE: Final = "application/json;charset=utf-8"
_HTML_TYPE: Final = "text/html;charset=utf-8"


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

    def __init__(self, address: tuple[str, int], api: DingTalkApi) -> None:
        self.api = api
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
        self._server.api.not_an_api(path, arrived=time.monotonic())
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

        api = self._server.api
        if url.path == GETTOKEN_PATH:
            answer = api.gettoken(param("appkey"), param("appsecret"), arrived=arrived)
        elif url.path == CHAT_GET_PATH:
            answer = api.chat_get(param("access_token"), param("chatid"), arrived=arrived)
        else:
            api.not_an_api(url.path, arrived=arrived)
            # Unknown paths wait like any answer, as they would behind the same gateway.
            api.delay()
            self._send(_status_page(404))
            return
        self._send_answer(answer)

    def _send_answer(self, answer: Answer) -> None:
        fault = answer.fault
        if answer.body is not None:
            reply = _json_reply(answer.body)
            if fault is not None and fault.kind == "truncate":
                self._send_truncated(reply)
            else:
                self._send(reply)
        elif fault is None:
            raise ValueError("an answer without a body must carry a fault")
        elif fault.kind == "http":
            self._send(_status_page(int(fault.value)))
        elif fault.kind == "nonjson":
            self._send(_Reply(200, _HTML_TYPE, _NONJSON_PAGE))
        elif fault.kind == "block":
            # What DingTalk's IP limiter in front of the API answers, not an errcode body.
            self._send(_json_reply({"status": 1111, "wait": int(fault.value), "punish": "deny"}))
        elif fault.kind == "reset":
            self._reset()
        else:
            raise ValueError(f"fault {fault.kind!r} has no HTTP form")

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
        self._server = _SimHTTPServer((host, port), DingTalkApi(world))
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
