"""DingTalk HTTP client: ``gettoken`` and ``chat/get``, paced, retried, classified.

Knows HTTP and DingTalk's answer shapes only; returns plain data (the ``chat_info`` dict) and
raises the errors of ``etl.errors``. ``classify`` is the one place that turns an HTTP answer
into success or an error class; ``DingTalkClient._call`` is the one place that retries.
Every request passes the process-wide ``Pacer`` first and is counted. Tokens never leave this
module in a URL: messages name the path only and are redacted.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import requests
import structlog
import tenacity

from etl import __version__
from etl.errors import (
    ChatError,
    FatalApiError,
    FatalError,
    PayloadError,
    RequestFailed,
    RunInterrupted,
    TokenError,
    TransientError,
)
from etl.quota import EndpointCalls
from etl.redact import redact, register_secret

log = structlog.get_logger("etl.dingtalk")

GETTOKEN: Final = "gettoken"
CHAT_GET: Final = "chat/get"
TOKEN_ERRCODES: Final = frozenset({40001, 40014, 42001})
CHAT_ERRCODES: Final = frozenset({40016, 49000})
FATAL_ERRCODES: Final = frozenset({43007, 70001, 40089, 90020})
THROTTLE_ERRCODES: Final = frozenset({90018, 90002, 90005, 90006, 90001, 90003, 90004})
# On gettoken these mean empty appkey / appsecret, not a rate limit.
GETTOKEN_FATAL: Final = frozenset({90002, 90003, 40001, 40014})
_SUBCODE = re.compile(r"subcode=(\d+)")
# A URL's query string (requests puts the whole URL into its exception messages).
_URL_QUERY = re.compile(r"\?[^\s'\"()<>]*")
# Longest server-requested pause honoured (Retry-After, the IP limiter's "wait"): DingTalk's IP
# block lasts 5 minutes; absurd or infinite values must not overflow or hang the worker.
MAX_SERVER_WAIT_SECONDS: Final = 600.0
_ERRMSG_MAX = 200
# Throttled: pause everyone at least this long (DingTalk's QPS window is one second).
THROTTLE_PAUSE_SECONDS: Final = 1.0


def classify(endpoint: str, status: int, body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
    """Return the JSON object of a successful answer, or raise what the caller must do.

    Follows the error table of the DingTalk API notes: HTTP status first, then the body's
    shape (non-JSON, the IP limiter's ``{"status": 1111, "wait": N}``), then ``errcode``.
    """
    if status == 429 or status >= 500:
        raise TransientError(
            f"{endpoint}: HTTP {status}",
            http_status=status,
            wait=_retry_after(headers),
            throttled=status == 429,
        )
    if status >= 400:
        raise RequestFailed(f"{endpoint}: HTTP {status}", http_status=status)
    data = _json_object(endpoint, status, body)
    _check_errcode(endpoint, data)
    return data


def _json_object(endpoint: str, status: int, body: bytes) -> dict[str, Any]:
    """The body as a JSON object with an integer ``errcode``, or what to do instead."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise TransientError(
            f"{endpoint}: answer is not JSON (HTTP {status}, {len(body)} bytes)",
            http_status=status,
        ) from None
    except RecursionError:
        # Deeper than the parser's stack. No proxy page looks like that and the next answer
        # would be the same: this request fails, instead of the error escaping the worker.
        raise RequestFailed(
            f"{endpoint}: answer is JSON nested too deeply to read", http_status=status
        ) from None
    if not isinstance(data, dict):
        raise TransientError(f"{endpoint}: answer is JSON but not an object", http_status=status)
    if "errcode" not in data:
        if data.get("status") == 1111 or "wait" in data:
            wait = data.get("wait")
            seconds = _server_wait(wait) if isinstance(wait, int | float) else None
            raise TransientError(
                f"{endpoint}: blocked by the IP rate limiter (wait {wait!r})",
                wait=seconds,
                throttled=True,
            )
        raise TransientError(f"{endpoint}: answer has no errcode", http_status=status)
    errcode = data["errcode"]
    if type(errcode) is not int:
        raise RequestFailed(f"{endpoint}: errcode is not an integer: {errcode!r}"[:200])
    return data


def _check_errcode(endpoint: str, data: Mapping[str, Any]) -> None:
    """Return if ``errcode`` is 0, else raise the class its code calls for."""
    errcode: int = data["errcode"]
    if errcode == 0:
        return
    errmsg = str(data.get("errmsg", ""))[:_ERRMSG_MAX]
    code = errcode
    if errcode == 88:
        # Gateway errors carry the real reason as "subcode=NNNNN" in errmsg.
        match = _SUBCODE.search(errmsg)
        code = int(match.group(1)) if match else errcode
    message = f"{endpoint}: errcode {errcode}: {errmsg}"
    if errcode == -1:
        raise TransientError(message, errcode=errcode)
    # The gettoken meanings of 90002/90003 (empty appkey/appsecret) belong to the plain
    # errcode; as a gateway subcode of 88 they are rate limits like everywhere else.
    if endpoint == GETTOKEN and errcode in GETTOKEN_FATAL:
        raise FatalApiError(message, errcode=errcode)
    if code in THROTTLE_ERRCODES:
        raise TransientError(message, errcode=errcode, throttled=True)
    if endpoint == GETTOKEN:
        # Without a token nothing can be read; a token error here is no reason to "refresh".
        raise FatalApiError(message, errcode=errcode)
    if code in TOKEN_ERRCODES:
        raise TokenError(message, errcode=errcode)
    if code in FATAL_ERRCODES:
        raise FatalApiError(message, errcode=errcode)
    raise RequestFailed(message, errcode=errcode)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return _server_wait(float(value))
    except ValueError:
        return None


def _server_wait(seconds: float) -> float | None:
    """A server-requested pause made safe to sleep on: >= 0, finite, capped; NaN is none."""
    if math.isnan(seconds):
        return None
    return min(max(0.0, float(seconds)), MAX_SERVER_WAIT_SECONDS)


class _Ticket:
    """One request's place in the window.

    The request ``n`` places later may start ``window`` after ``anchor``: first the start of
    this request, then, once it is over, the time its answer arrived. The server saw the
    request somewhere in between, so counting from the answer keeps the server's window
    (counted on arrival) under the rate however late the request reached it: under load a
    request can sit tens of milliseconds between our start and the server's clock.
    """

    __slots__ = ("anchor", "over")

    def __init__(self) -> None:
        self.anchor = 0.0
        self.over = threading.Event()


class Pacer:
    """Process-wide limit: at most ``rate`` request starts in any one-second window.

    A sliding log of the last ``n`` requests (not a token bucket, which would allow a 2n
    burst across a window boundary): request ``j`` starts no earlier than ``window`` after
    request ``j - n`` (see ``_Ticket``), which puts at most ``n`` starts, and at most ``n``
    arrivals at the server, into any one-second window. Callers reserve their place under
    the lock and wait outside it, so workers start in order without busy-waiting.
    """

    # Leeway for clock resolution on either side. Delays on the way need none: the window
    # counts from the answer, which comes after the server saw the request.
    SAFETY_SECONDS: Final = 0.005
    # How often a worker waiting for an earlier request to finish looks at the stop event.
    _STOP_POLL_SECONDS: Final = 0.1

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        stop: threading.Event | None = None,
    ) -> None:
        self._n = max(1, int(rate))
        self._window = max(1.0, self._n / rate) + self.SAFETY_SECONDS
        self._recent: deque[_Ticket] = deque(maxlen=self._n)
        self._not_before = 0.0
        self._clock = clock
        self._stop = stop or threading.Event()
        self._lock = threading.Lock()

    @property
    def stop_event(self) -> threading.Event:
        return self._stop

    def acquire(self) -> None:
        """Wait for a slot; raise ``RunInterrupted`` if the run is being stopped.

        The slot counts from its start only; :meth:`slot` also counts the request's duration.
        """
        ticket = _Ticket()
        try:
            self._start(ticket)
        finally:
            ticket.over.set()

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Wait for a slot, then hold it for the request made in the block."""
        ticket = _Ticket()
        try:
            self._start(ticket)
            yield
        finally:
            # Also when the request failed or never started: later requests wait for this.
            ticket.anchor = max(ticket.anchor, self._clock())
            ticket.over.set()

    def pause(self, seconds: float) -> None:
        """Throttled: nobody starts a request for ``seconds`` from now."""
        with self._lock:
            self._not_before = max(self._not_before, self._clock() + seconds)

    def _start(self, ticket: _Ticket) -> _Ticket:
        with self._lock:
            earlier = self._recent[0] if len(self._recent) == self._n else None
            self._recent.append(ticket)
        if earlier is not None:
            while not earlier.over.wait(self._STOP_POLL_SECONDS):
                if self._stop.is_set():
                    raise RunInterrupted("run stopped while waiting to call the API")
        with self._lock:
            slot = max(self._clock(), self._not_before)
            if earlier is not None:
                slot = max(slot, earlier.anchor + self._window)
            ticket.anchor = slot
        delay = slot - self._clock()
        if delay > 0 and self._stop.wait(delay):
            raise RunInterrupted("run stopped while waiting to call the API")
        if self._stop.is_set():
            raise RunInterrupted("run stopped before calling the API")
        return ticket


@dataclass
class CallCounter:
    """Requests made for one chat (or one token fetch)."""

    attempts: int = 0


@dataclass
class _Counts:
    api_calls: int = 0
    retries: int = 0
    # Since the last ``take_calls``: requests per endpoint, and of them refused by throttling.
    by_endpoint: dict[str, int] = field(default_factory=dict)
    throttled: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Transport:
    """The proxy and CA settings of the environment for one base URL, as requests reads them.

    requests looks them up on every request when a session trusts the environment (a
    ``.netrc`` file, ``*_PROXY``/``NO_PROXY``, ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``):
    about a tenth of a fetch worker's time. A run's client reads them once. A ``.netrc``
    entry is not used: DingTalk's API takes no HTTP authentication.
    """

    proxies: dict[str, str]
    verify: bool | str

    @classmethod
    def from_environment(cls, base_url: str) -> Transport:
        # get_environ_proxies applies NO_PROXY to this URL, as requests does per request.
        proxies = dict(requests.utils.get_environ_proxies(base_url))
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        return cls(proxies, bundle or True)


class TokenCache:
    """One access token for all workers; refreshed early and at most once per bad token."""

    def __init__(self, fetch: Callable[[], tuple[str, float]], clock: Callable[[], float]) -> None:
        self._fetch = fetch
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._failure: FatalError | None = None
        self._lock = threading.Lock()

    def get(self) -> str:
        with self._lock:
            if self._failure is not None:
                # Workers queued behind a refused gettoken must not each ask again: one
                # refusal is the run's answer, and api_calls stays exact.
                raise FatalApiError(self._failure.message) from self._failure
            if self._token is None or self._clock() >= self._refresh_at:
                try:
                    token, expires_in = self._fetch()
                except FatalError as exc:
                    # A stop (RunInterrupted) is no answer about the app: it is not kept.
                    self._failure = exc
                    raise
                # Refresh a little early (DingTalk asks for it): 10% of the lifetime, <= 5 min.
                self._refresh_at = self._clock() + expires_in - min(300.0, expires_in * 0.1)
                self._token = token
            return self._token

    def invalidate(self, token: str) -> None:
        """Drop ``token`` unless another worker already replaced it: one refresh for all."""
        with self._lock:
            if self._token == token:
                self._token = None


class DingTalkClient:
    """Calls DingTalk for one run. Thread-safe: one ``requests.Session`` per thread."""

    def __init__(
        self,
        base_url: str,
        app_key: str,
        app_secret: str,
        *,
        pacer: Pacer,
        timeout: float = 10.0,
        max_attempts: int = 5,
        max_response_bytes: int = 8 * 1024 * 1024,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._app_key = app_key
        self._app_secret = app_secret
        register_secret(app_secret)
        self._pacer = pacer
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._max_bytes = max_response_bytes
        self._jitter = tenacity.wait_random_exponential(multiplier=backoff_base, max=backoff_max)
        self._counts = _Counts()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self.tokens = TokenCache(self._fetch_token, clock)
        self._transport = Transport.from_environment(self._base)

    @property
    def api_calls(self) -> int:
        return self._counts.api_calls

    @property
    def retries(self) -> int:
        return self._counts.retries

    def take_calls(self) -> list[EndpointCalls]:
        """The requests sent since the last call, per endpoint (to be counted against the
        monthly quota), and start counting again."""
        counts = self._counts
        with counts.lock:
            taken = [
                EndpointCalls(endpoint, calls, counts.throttled.get(endpoint, 0))
                for endpoint, calls in sorted(counts.by_endpoint.items())
            ]
            counts.by_endpoint.clear()
            counts.throttled.clear()
        return taken

    def get_chat(self, chatid: str, counter: CallCounter | None = None) -> dict[str, Any]:
        """Return ``chat_info`` for ``chatid`` (as received) or raise.

        Raises ``ChatError`` (this chat fails; transient failures past ``max_attempts`` too),
        ``FatalApiError`` or ``RunInterrupted``. ``counter.attempts`` counts chat/get requests.
        """
        counter = counter if counter is not None else CallCounter()
        refreshed = False

        def attempt() -> dict[str, Any]:
            nonlocal refreshed
            while True:
                token = self.tokens.get()
                try:
                    return self._request(
                        CHAT_GET, {"access_token": token, "chatid": chatid}, counter
                    )
                except TokenError as exc:
                    if refreshed:
                        raise FatalApiError(
                            f"{exc.message} (again with a freshly issued token)",
                            errcode=exc.errcode,
                        ) from exc
                    refreshed = True
                    self.tokens.invalidate(token)
                    log.info("api.token_refresh", chatid=chatid, errcode=exc.errcode)

        try:
            body = self._call(CHAT_GET, attempt, chatid=chatid)
        except RequestFailed as exc:
            # Chained to the root cause (the last transient failure, when retries ran out).
            cause = exc.__cause__ or exc
            errcode, http_status = exc.errcode, exc.http_status
            raise ChatError(exc.message, errcode=errcode, http_status=http_status) from cause
        chat_info = body.get("chat_info")
        if chat_info is None:
            raise PayloadError("chat/get: answer has errcode 0 but no chat_info")
        if not isinstance(chat_info, dict):
            raise PayloadError("chat_info: expected an object")
        return chat_info

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def _fetch_token(self) -> tuple[str, float]:
        counter = CallCounter()

        def attempt() -> dict[str, Any]:
            params = {"appkey": self._app_key, "appsecret": self._app_secret}
            return self._request(GETTOKEN, params, counter)

        try:
            body = self._call(GETTOKEN, attempt, chatid=None)
        except RequestFailed as exc:
            # Without a token no chat can be read: that is the run's end, not one chat's.
            raise FatalApiError(
                f"cannot get an access token: {exc.message}",
                errcode=exc.errcode,
                http_status=exc.http_status,
            ) from exc
        token = body.get("access_token")
        expires_in = body.get("expires_in", 7200)
        if not isinstance(token, str) or not token:
            raise FatalApiError("gettoken: answer has no access_token")
        if type(expires_in) is not int or expires_in <= 0:
            expires_in = 7200
        register_secret(token)
        log.debug("api.token_issued", expires_in=expires_in)
        return token, float(expires_in)

    def _call(
        self, endpoint: str, attempt: Callable[[], dict[str, Any]], *, chatid: str | None
    ) -> dict[str, Any]:
        """Run ``attempt`` until it succeeds, retrying transient failures only."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientError),
            stop=tenacity.stop_after_attempt(self._max_attempts),
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=lambda state: self._log_backoff(state, endpoint, chatid),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except TransientError as exc:
            raise RequestFailed(
                f"{exc.message} (gave up after {self._max_attempts} attempts)",
                errcode=exc.errcode,
                http_status=exc.http_status,
            ) from exc

    def _wait(self, state: tenacity.RetryCallState) -> float:
        jitter = float(self._jitter(state))
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, TransientError):
            floor = exc.wait or 0.0
            if exc.throttled:
                floor = max(floor, THROTTLE_PAUSE_SECONDS)
                # Everyone slows down, not just this worker: the limit is per app.
                self._pacer.pause(floor)
            return max(floor, jitter)
        return jitter

    def _sleep(self, seconds: float) -> None:
        if self._pacer.stop_event.wait(seconds):
            raise RunInterrupted("run stopped during a retry pause")

    def _log_backoff(
        self, state: tenacity.RetryCallState, endpoint: str, chatid: str | None
    ) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "api.backoff",
            endpoint=endpoint,
            chatid=chatid,
            attempt=state.attempt_number,
            max_attempts=self._max_attempts,
            wait_seconds=round(state.upcoming_sleep, 3),
            errcode=getattr(exc, "errcode", None),
            http_status=getattr(exc, "http_status", None),
            error=str(exc),
        )

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = f"dingtalk-etl/{__version__}"
            # What requests would look up in the environment on every request (proxies,
            # NO_PROXY, the CA bundle, a .netrc file), looked up once for the run.
            session.trust_env = False
            session.proxies.update(self._transport.proxies)
            session.verify = self._transport.verify
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _request(
        self, endpoint: str, params: dict[str, str], counter: CallCounter
    ) -> dict[str, Any]:
        url = f"{self._base}/{endpoint}"
        try:
            with self._pacer.slot():
                counts = self._counts
                with counts.lock:
                    counts.api_calls += 1
                    counts.by_endpoint[endpoint] = counts.by_endpoint.get(endpoint, 0) + 1
                    if counter.attempts > 0:
                        counts.retries += 1
                counter.attempts += 1
                with self._session().get(
                    url, params=params, timeout=self._timeout, stream=True
                ) as response:
                    body = self._read_limited(response, endpoint)
                    status, headers = response.status_code, response.headers
        except requests.Timeout as exc:
            raise TransientError(f"{endpoint}: timed out after {self._timeout}s") from exc
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise TransientError(f"{endpoint}: connection failed: {_short(exc)}") from exc
        except requests.RequestException as exc:
            raise TransientError(f"{endpoint}: request failed: {_short(exc)}") from exc
        try:
            return classify(endpoint, status, body, headers)
        except TransientError as exc:
            if exc.throttled:
                with self._counts.lock:
                    throttled = self._counts.throttled
                    throttled[endpoint] = throttled.get(endpoint, 0) + 1
            raise

    def _read_limited(self, response: requests.Response, endpoint: str) -> bytes:
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(chunk_size=64 * 1024):
            size += len(chunk)
            if size > self._max_bytes:
                raise RequestFailed(
                    f"{endpoint}: answer larger than max_response_bytes ({self._max_bytes})",
                    http_status=response.status_code,
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _short(exc: BaseException) -> str:
    # requests names the whole URL ("... with url: /gettoken?appkey=...&appsecret=..."):
    # keep the path only, then mask whatever secret is left.
    return redact(_URL_QUERY.sub("", str(exc)))[:300]
