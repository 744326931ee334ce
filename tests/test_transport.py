"""Corporate networks: the client reads the environment's proxy and CA settings (once per
run) and still honours them: ``HTTP(S)_PROXY``, ``NO_PROXY``, ``REQUESTS_CA_BUNDLE``.

The simulator plays DingTalk behind each: it answers absolute-form requests as a plain HTTP
proxy would forward them, and sits behind a TLS front with a certificate made for the test.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from etl.dingtalk import DingTalkClient, Pacer
from etl.errors import FatalApiError
from etl.simulator import Simulator
from tests.conftest import APP_KEY, APP_SECRET

# A name that never resolves (RFC 2606): reaching it at all takes the proxy.
UNRESOLVABLE = "oapi.dingtalk.invalid"
PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)


@pytest.fixture(autouse=True)
def _no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def client(base_url: str) -> DingTalkClient:
    return DingTalkClient(
        base_url, APP_KEY, APP_SECRET, pacer=Pacer(1000), timeout=5, max_attempts=1
    )


def read_chat(base_url: str) -> str:
    sync = client(base_url)
    try:
        return str(sync.get_chat("chat-a")["name"])
    finally:
        sync.close()


def test_http_proxy_is_used(simulator: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", simulator.base_url)

    assert read_chat(f"http://{UNRESOLVABLE}") == "Alpha"
    assert simulator.stats.requests_by_chat["chat-a"] == 1


def test_no_proxy_goes_direct(simulator: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", simulator.base_url)
    monkeypatch.setenv("NO_PROXY", UNRESOLVABLE)

    with pytest.raises(FatalApiError, match="gettoken: connection failed"):
        read_chat(f"http://{UNRESOLVABLE}")
    assert simulator.stats.total_requests == 0


class ConnectRecorder:
    """A proxy that records the request line it is sent and refuses the tunnel."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._server.accept()
                with conn:
                    request = conn.recv(4096).decode("latin-1")
                    self.lines.append(request.split("\r\n", 1)[0])
                    conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        # shutdown() wakes the accept() of the serving thread; close() alone would not.
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(timeout=5)


def test_https_proxy_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = ConnectRecorder()
    try:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        with pytest.raises(FatalApiError, match="gettoken"):
            read_chat(f"https://{UNRESOLVABLE}")
    finally:
        proxy.close()
    [line] = proxy.lines
    assert line.startswith(f"CONNECT {UNRESOLVABLE}:443 HTTP/")


class TlsFront:
    """TLS on loopback with a certificate for ``localhost``, forwarding to the simulator."""

    def __init__(self, folder: Path, target: tuple[str, int]) -> None:
        self.cert, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"),
                *("-keyout", str(key), "-out", str(self.cert)),
            ],
            check=True,
            capture_output=True,
        )
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(self.cert, key)
        self._target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self._server.getsockname()[1]}"

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._server.accept()
                threading.Thread(target=self._forward, args=(conn,), daemon=True).start()

    def _forward(self, conn: socket.socket) -> None:
        with (
            contextlib.suppress(OSError, ssl.SSLError),
            self._context.wrap_socket(conn, server_side=True) as tls,
            socket.create_connection(self._target) as upstream,
        ):
            upstream.settimeout(5)
            tls.settimeout(5)
            # One request per connection: the client's GET fits in one read.
            upstream.sendall(tls.recv(65536))
            upstream.shutdown(socket.SHUT_WR)
            while chunk := upstream.recv(65536):
                tls.sendall(chunk)

    def close(self) -> None:
        # shutdown() wakes the accept() of the serving thread; close() alone would not.
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(timeout=5)


@pytest.fixture
def tls_front(simulator: Simulator, tmp_path: Path) -> Iterator[TlsFront]:
    front = TlsFront(tmp_path, (simulator.host, simulator.port))
    yield front
    front.close()


def test_ca_bundle_from_the_environment_is_trusted(
    tls_front: TlsFront, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_front.cert))

    assert read_chat(tls_front.base_url) == "Alpha"


def test_without_the_ca_bundle_the_certificate_is_refused(tls_front: TlsFront) -> None:
    with pytest.raises(FatalApiError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        read_chat(tls_front.base_url)
