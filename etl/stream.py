"""DingTalk's Stream mode, client side: open a connection, read frames, send answers.

Knows HTTP (requests) and websockets only, and returns plain data: ``open_connection`` POSTs
the app's credentials to ``{gateway_url}/v1.0/gateway/connections/open`` and gets an endpoint
and a one-use ticket; ``StreamSocket`` is the websocket to ``{endpoint}?ticket=...``, whose
``receive`` returns the text of the next frame or None when none came in time. What the
frames mean is ``etl.events``'; what to do with them is ``etl.listener``'s.

Foreign exceptions become ours here (``raise ... from``), without the ticket or the secret:

- ``GatewayRefused`` (``ConfigError``, exit 78): the gateway refused the credentials (HTTP 401);
- ``GatewayForbidden`` (``FatalError``, exit 3): the app may not open a Stream connection or
  has no event subscription (HTTP 403);
- ``StreamUnavailable`` (``TransientError``): anything worth trying again after a pause (a
  connection refused or reset, a timeout, HTTP 5xx or 429, an answer without an endpoint,
  a socket that closed).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import socket
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote_plus, urlsplit

import requests
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from etl import __version__
from etl.errors import ConfigError, FatalError, TransientError
from etl.redact import redact, register_secret

OPEN_CONNECTION_PATH: Final = "/v1.0/gateway/connections/open"
# Every event type, as the official SDKs subscribe: the listener picks the group events.
SUBSCRIPTIONS: Final = ({"type": "EVENT", "topic": "*"},)
_MAX_FRAME_BYTES = 4 * 1024 * 1024
# websockets 17.1 wants connect() as a context manager unless told the connection is held
# directly, as this one is (it lives across calls); earlier releases know no such option.
_CONNECT_OPTIONS: dict[str, Any] = (
    {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}
)


class GatewayRefused(ConfigError):
    """The Stream gateway refused the app's credentials ([dingtalk] app_key/app_secret)."""


class GatewayForbidden(FatalError):
    """The gateway will not let this app open a Stream connection (no subscription)."""


class StreamUnavailable(TransientError):
    """The gateway or the socket failed in a way worth trying again after a pause."""


@dataclass(frozen=True)
class Ticket:
    """Where to connect, and the one-use credential that opens the socket there."""

    endpoint: str
    ticket: str = ""

    @property
    def uri(self) -> str:
        return f"{self.endpoint}?ticket={quote_plus(self.ticket)}"


def open_connection(
    gateway_url: str,
    app_key: str,
    app_secret: str,
    *,
    timeout: float = 10.0,
    session: requests.Session | None = None,
) -> Ticket:
    """Ask the gateway for a connection; raise ``GatewayRefused``, ``GatewayForbidden`` or
    ``StreamUnavailable``. The secret travels in the body and is never part of a message."""
    register_secret(app_secret)
    url = gateway_url.rstrip("/") + OPEN_CONNECTION_PATH
    body = {
        "clientId": app_key,
        "clientSecret": app_secret,
        "subscriptions": list(SUBSCRIPTIONS),
        "ua": f"dingtalk-etl/{__version__}",
        "localIp": _local_ip(),
    }
    sender = session if session is not None else requests
    try:
        response = sender.post(
            url,
            data=json.dumps(body),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            timeout=timeout,
        )
    except requests.RequestException as exc:
        raise StreamUnavailable(f"gateway: {type(exc).__name__}: {_short(exc)}") from exc
    with contextlib.closing(response):
        return _ticket(response)


def _ticket(response: requests.Response) -> Ticket:
    status = response.status_code
    detail = _error_detail(response)
    if status == 401:
        raise GatewayRefused(
            f"the Stream gateway refused the app's credentials (HTTP 401{detail}): check "
            "[dingtalk] app_key and app_secret"
        )
    if status == 403:
        raise GatewayForbidden(
            f"the Stream gateway refused a connection for this app (HTTP 403{detail}): enable "
            "Stream mode and subscribe to the group events in DingTalk's developer console"
        )
    if status == 429 or status >= 500:
        raise StreamUnavailable(f"gateway: HTTP {status}{detail}", http_status=status)
    if status >= 400:
        raise GatewayForbidden(f"the Stream gateway answered HTTP {status}{detail}")
    try:
        data = response.json()
    except ValueError:
        raise StreamUnavailable("gateway: answer is not JSON", http_status=status) from None
    endpoint = data.get("endpoint") if isinstance(data, dict) else None
    ticket = data.get("ticket") if isinstance(data, dict) else None
    if not isinstance(endpoint, str) or urlsplit(endpoint).scheme not in {"ws", "wss"}:
        raise StreamUnavailable("gateway: answer has no ws(s):// endpoint", http_status=status)
    if not isinstance(ticket, str) or not ticket:
        raise StreamUnavailable("gateway: answer has no ticket", http_status=status)
    register_secret(ticket)
    return Ticket(endpoint, ticket)


def _error_detail(response: requests.Response) -> str:
    """``, code X: message`` from a v1.0 API error body, when there is one."""
    if response.status_code < 400:
        return ""
    try:
        data = response.json()
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    code, message = data.get("code"), data.get("message")
    parts = [str(part)[:200] for part in (code, message) if part]
    return f", {': '.join(parts)}" if parts else ""


class StreamSocket:
    """One Stream connection; not thread-safe (the listener reads and answers from one thread)."""

    def __init__(self, ticket: Ticket, *, open_timeout: float = 10.0) -> None:
        try:
            self._ws: ClientConnection = connect(
                ticket.uri,
                open_timeout=open_timeout,
                close_timeout=2,
                max_size=_MAX_FRAME_BYTES,
                user_agent_header=f"dingtalk-etl/{__version__}",
                **_CONNECT_OPTIONS,
            )
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            raise StreamUnavailable(f"stream: cannot connect: {_describe(exc)}") from exc

    def receive(self, timeout: float) -> str | None:
        """The next frame's text, or None when none came within ``timeout`` seconds."""
        try:
            message = self._ws.recv(timeout=timeout)
        except TimeoutError:
            return None
        except ConnectionClosed as exc:
            raise StreamUnavailable(f"stream: connection closed ({_close_reason(exc)})") from exc
        except OSError as exc:
            raise StreamUnavailable(f"stream: {_describe(exc)}") from exc
        if isinstance(message, bytes):
            return message.decode("utf-8", errors="replace")
        return message

    def send(self, text: str) -> None:
        try:
            self._ws.send(text)
        except ConnectionClosed as exc:
            raise StreamUnavailable(f"stream: connection closed ({_close_reason(exc)})") from exc
        except OSError as exc:
            raise StreamUnavailable(f"stream: {_describe(exc)}") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ws.close()


def _close_reason(exc: ConnectionClosed) -> str:
    frame = exc.rcvd or exc.sent
    if frame is None:
        return "no close frame"
    return f"code {frame.code}" + (f": {frame.reason[:100]}" if frame.reason else "")


def _describe(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    # Exception texts may carry the URL, and the ticket in its query: keep neither.
    text = str(exc).split("?ticket=")[0]
    return redact(text)[:300]


def _local_ip() -> str:
    """This host's address, as the gateway asks; no packet is sent to find it."""
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return ""
