"""``dingtalk-etl listen``: a Stream connection kept alive, each group event stored, then ACKed.

Orchestrates ``etl.stream`` (the connection), ``etl.events`` (what a frame says) and
``etl.eventstore`` (the rows), and hands chats with new events to a ``Reconciler`` that re-reads
them with chat/get ``[events] reconcile_delay_seconds`` after their last event.

One thread reads frames: the ones waiting on the socket together (at most ``BATCH_FRAMES``)
are answered together, their group events stored in one transaction. An event is ACKed
SUCCESS only after its rows are committed; a write that fails is ACKed LATER, so DingTalk
pushes it again. A frame
that cannot be read is logged and, when it can be, ACKed; an event of another type is ACKed
and counted. A dropped socket, a gateway that fails or ``silence_timeout_seconds`` without
any frame mean a new connection, after a backoff with full jitter; a ``disconnect`` frame
means a new connection first, then the old one is left. Bad credentials (exit 78) or a
gateway that refuses the app (exit 3) stop the listener. Stopping (``stop`` set by SIGTERM or
SIGINT) finishes the frame in hand and closes the socket.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import structlog
import tenacity
from sqlalchemy import Engine

from etl.budgetstore import BudgetLog
from etl.config import Config
from etl.db import open_database, require_schema, utcnow
from etl.errors import EtlError
from etl.events import (
    GROUP_EVENT_TYPES,
    INVALID,
    UNKNOWN_CHAT,
    Frame,
    FrameError,
    PushedEvent,
    ack,
    ack_later,
    ack_success,
    parse_event,
    parse_frame,
)
from etl.eventstore import EventStore, ListenerLog, Recorded
from etl.quota import EndpointCalls
from etl.reconcile_process import ReconcileProcess
from etl.reconciler import Reconciler
from etl.stream import StreamSocket, StreamUnavailable, open_connection
from etl.sync import RunResult

log = structlog.get_logger("etl.listener")

# How often the reading thread looks at the stop flag while no frame comes.
_POLL_SECONDS: Final = 0.2
# How often the listener's row (status) is brought up to date while nothing else changes it.
HEARTBEAT_SECONDS: Final = 5.0
# Event ids this listener stored (or found stored) lately. DingTalk pushes an event again when
# its ACK did not come in time, which is when the listener is behind: a redelivery of one of
# these is ACKed without a transaction to find out what this process already knows.
RECENT_EVENT_IDS: Final = 10_000
# Frames read off the socket together at most: their events share one transaction.
BATCH_FRAMES: Final = 200
# The request that opens a Stream connection, as counted in api_calls.
GATEWAY_ENDPOINT: Final = "gateway/connections/open"
_BACKOFF_BASE: Final = 0.5
_BACKOFF_MAX: Final = 30.0


@dataclasses.dataclass
class ListenerStats:
    """What ``status`` and the metrics file say about this listener."""

    connected: bool = False
    connected_since: Any = None
    last_frame_at: Any = None
    last_event_at: Any = None
    events_received: int = 0
    events_ignored: int = 0
    reconnects: int = 0


class Listener:
    """One ``listen``: reads until ``stop`` is set; raises ``GatewayRefused`` (exit 78) or
    ``GatewayForbidden`` (exit 3) when the gateway will not have this app."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        stop: threading.Event,
        *,
        on_event: Callable[[str], None] | None = None,
        on_stats: Callable[[ListenerStats], None] | None = None,
    ) -> None:
        self.config = config
        self.settings = config.events
        self.stop = stop
        self.store = EventStore(engine)
        self.log = ListenerLog(engine)
        self.budget = BudgetLog(engine)
        self.stats = ListenerStats()
        # Called with the chatid of each event of a synced chat, once its rows are committed.
        self._on_event = on_event or (lambda _chatid: None)
        self._on_stats = on_stats or (lambda _stats: None)
        self._synced = set(config.chatids)
        # Insertion-ordered, the oldest dropped first: at most RECENT_EVENT_IDS ids.
        self._recent: dict[str, None] = {}
        self._listener_id: int | None = None
        self._heartbeat = 0.0
        self._backoff = tenacity.wait_random_exponential(multiplier=_BACKOFF_BASE, max=_BACKOFF_MAX)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        self._synced |= self.store.discovered()
        self._listener_id = self.log.start(at=utcnow())
        failures = 0
        socket: StreamSocket | None = None
        try:
            while not self.stop.is_set():
                if socket is None:
                    try:
                        socket = self._connect()
                        failures = 0
                    except StreamUnavailable as exc:
                        failures += 1
                        self._pause(failures, exc)
                        continue
                socket = self._read(socket)
        finally:
            if socket is not None:
                socket.close()
            self._disconnected(reason="stopped")
            self._save(stopped_at=utcnow())

    def _connect(self) -> StreamSocket:
        try:
            ticket = open_connection(
                self.settings.gateway_url,
                self.config.app_key,
                self.config.app_secret,
                timeout=self.config.dingtalk.timeout_seconds,
            )
        finally:
            self._count_call(GATEWAY_ENDPOINT)
        socket = StreamSocket(ticket, open_timeout=self.config.dingtalk.timeout_seconds)
        now = utcnow()
        self.stats.connected, self.stats.connected_since = True, now
        self.stats.last_frame_at = now
        log.info("events.connected", gateway=self.settings.gateway_url)
        self._save()
        return socket

    def _count_call(self, endpoint: str) -> None:
        """Count a request to DingTalk against the monthly quota; a database that fails is
        only logged (the listener goes on)."""
        try:
            self.budget.count([EndpointCalls(endpoint, 1)], source="listen", at=utcnow())
        except EtlError as exc:
            log.warning("events.call_not_counted", endpoint=endpoint, error=exc.message)

    def _pause(self, failures: int, exc: EtlError) -> None:
        """Wait before the next connection attempt (exponential, full jitter)."""
        state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
        state.attempt_number = failures
        wait = float(self._backoff(state))
        log.warning(
            "events.reconnect_wait",
            attempt=failures,
            wait_seconds=round(wait, 3),
            error=exc.message,
        )
        self.stop.wait(wait)

    def _read(self, socket: StreamSocket) -> StreamSocket | None:
        """Read ``socket`` until it fails, falls silent or is replaced; return what to read next."""
        silence = self.settings.silence_timeout_seconds
        last_frame = time.monotonic()
        while not self.stop.is_set():
            try:
                text = socket.receive(timeout=_POLL_SECONDS)
            except StreamUnavailable as exc:
                self._lost(socket, exc.message)
                return None
            now = time.monotonic()
            if text is None:
                if now - last_frame > silence:
                    self._lost(socket, f"no frame for {silence:g} s")
                    return None
                self._beat()
                continue
            last_frame = now
            self.stats.last_frame_at = utcnow()
            replacement = self._handle(socket, [text, *_waiting(socket)])
            if replacement is not None:
                return replacement
            self._beat()
        return socket

    def _lost(self, socket: StreamSocket, reason: str) -> None:
        socket.close()
        self.stats.reconnects += 1
        self._disconnected(reason=reason)

    def _disconnected(self, *, reason: str) -> None:
        if self.stats.connected:
            log.warning("events.disconnected", reason=reason)
        self.stats.connected, self.stats.connected_since = False, None
        self._save()

    # -- one frame --------------------------------------------------------------------------

    def _handle(self, socket: StreamSocket, texts: Sequence[str]) -> StreamSocket | None:
        """Answer frames read together; return the new socket when the server asked us to move.

        Their group events are stored in one transaction and ACKed after its commit.
        """
        events: list[_Arrived] = []
        move: Frame | None = None
        for text in texts:
            try:
                frame = parse_frame(text)
            except FrameError as exc:
                self._ignored("events.frame_unreadable", error=str(exc))
                continue
            if frame.type == "SYSTEM" and frame.topic == "disconnect":
                move = frame  # after the frames in hand are answered on this socket
            elif frame.type == "SYSTEM":
                # Pings and whatever else: echo the data, as DingTalk's SDKs do.
                self._answer(socket, frame, _echo(frame))
            elif frame.type != "EVENT" or frame.event_type not in GROUP_EVENT_TYPES:
                self._ignored("events.ignored", type=frame.type, event_type=frame.event_type)
                self._answer(socket, frame, ack_success)
            else:
                received_at = utcnow()
                try:
                    events.append(_Arrived(frame, parse_event(frame, received_at), received_at))
                except FrameError as exc:
                    self._ignored("events.frame_unreadable", error=str(exc))
                    self._answer(socket, frame, ack_success)
        if events:
            self._events(socket, events)
        return None if move is None else self._move(socket, move)

    def _events(self, socket: StreamSocket, events: Sequence[_Arrived]) -> None:
        """Store group events in one transaction, then ACK each: SUCCESS once its rows are
        committed (or were before), LATER when the database refused them."""
        new = [i for i, arrived in enumerate(events) if arrived.event.event_id not in self._recent]
        results = self._store(events, new)
        for i, arrived in enumerate(events):
            refused = i in new and i not in results
            self._answer(socket, arrived.frame, ack_later if refused else ack_success)
        for i, arrived in enumerate(events):
            if i in results or i not in new:
                self._received(arrived, results.get(i))

    def _store(self, events: Sequence[_Arrived], new: Sequence[int]) -> dict[int, Recorded | None]:
        """What became of the events ``new`` indexes (None: stored before); an event the
        database refused has no entry.

        A batch the database refuses is tried again one event at a time, so that one event
        it cannot take does not hold back the others.
        """
        if not new:
            return {}
        results = self._store_batch(events, new)
        if results is None and len(new) > 1:
            results = {}
            for i in new:
                results.update(self._store_batch(events, [i]) or {})
        return results or {}

    def _store_batch(
        self, events: Sequence[_Arrived], batch: Sequence[int]
    ) -> dict[int, Recorded | None] | None:
        try:
            recorded = self.store.record_many(
                [(events[i].event, events[i].received_at) for i in batch],
                synced=self._synced,
                discover=self.settings.discover_chats,
            )
        except EtlError as exc:
            log.error(
                "events.store_failed",
                event_id=events[batch[0]].event.event_id,
                events=len(batch),
                error=exc.message,
            )
            return None
        for i in batch:
            self._remember(events[i].event.event_id)
        return dict(zip(batch, recorded, strict=True))

    def _received(self, arrived: _Arrived, recorded: Recorded | None) -> None:
        """Count and log an event whose rows are committed (None: its id was stored before)."""
        event = arrived.event
        self.stats.events_received += 1
        self.stats.last_event_at = arrived.received_at
        outcome = recorded.outcome if recorded is not None else "duplicate"
        log.info(
            "events.received",
            event_id=event.event_id,
            event_type=event.event_type,
            chatid=event.chatid,
            operator=event.operator_userid,
            occurred_at=event.occurred_at.isoformat(),
            outcome=outcome,
            rows=recorded.rows if recorded is not None else 0,
            invalid=event.invalid,
        )
        if recorded is not None and recorded.outcome in (INVALID, UNKNOWN_CHAT):
            self.stats.events_ignored += 1
        elif recorded is not None and event.chatid is not None:
            self._synced.add(event.chatid)
            self._on_event(event.chatid)

    def _remember(self, event_id: str) -> None:
        self._recent[event_id] = None
        if len(self._recent) > RECENT_EVENT_IDS:
            del self._recent[next(iter(self._recent))]

    def _answer(self, socket: StreamSocket, frame: Frame, answer: Callable[[str], str]) -> None:
        message_id = frame.message_id
        if message_id is None:
            return
        try:
            socket.send(answer(message_id))
        except StreamUnavailable as exc:
            # Not ACKed: DingTalk pushes it again, and the event id keeps it from counting twice.
            log.warning("events.ack_failed", message_id=message_id, error=exc.message)

    def _move(self, old: StreamSocket, frame: Frame) -> StreamSocket | None:
        """The server is closing ``old``: open the new connection before leaving the old one."""
        log.info("events.disconnect_requested")
        self._answer(old, frame, lambda mid: ack(mid, {}))
        try:
            new = self._connect()
        except StreamUnavailable as exc:
            old.close()
            self.stats.reconnects += 1
            self._disconnected(reason=f"disconnect requested; reconnect failed: {exc.message}")
            return None
        # What the old connection still has in hand is read before it is left.
        remaining = list(_waiting(old, limit=None))
        if remaining:
            self._handle(old, remaining)
        old.close()
        self.stats.reconnects += 1
        return new

    def _ignored(self, event: str, **fields: Any) -> None:
        self.stats.events_ignored += 1
        log.warning(event, **fields)

    # -- the listener's row -----------------------------------------------------------------

    def _beat(self) -> None:
        if time.monotonic() - self._heartbeat >= HEARTBEAT_SECONDS:
            self._save()

    def _save(self, **extra: Any) -> None:
        """Bring the listener's row up to date; a database that fails is only logged."""
        self._heartbeat = time.monotonic()
        self._on_stats(self.stats)
        if self._listener_id is None:
            return
        values = {**dataclasses.asdict(self.stats), "updated_at": utcnow(), **extra}
        try:
            self.log.update(self._listener_id, values)
        except EtlError as exc:
            log.warning("events.state_not_recorded", error=exc.message)


@dataclasses.dataclass(frozen=True)
class _Arrived:
    """A group event read off the socket, with its frame (to ACK) and its time of arrival."""

    frame: Frame
    event: PushedEvent
    received_at: dt.datetime


def _waiting(socket: StreamSocket, limit: int | None = BATCH_FRAMES - 1) -> Iterator[str]:
    """The frames already waiting on ``socket``, without waiting for more (at most ``limit``)."""
    count = 0
    while limit is None or count < limit:
        try:
            text = socket.receive(timeout=0)
        except StreamUnavailable:
            return  # the next receive says so, after what came is answered
        if text is None:
            return
        count += 1
        yield text


def _echo(frame: Frame) -> Callable[[str], str]:
    return lambda message_id: ack(message_id, _json_object(frame.data))


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {"data": value}


def run_listen(
    config: Config,
    stop: threading.Event,
    reconcile: Callable[[Sequence[str]], object] | None = None,
    *,
    on_reconciled: Callable[[Sequence[str], RunResult], None] | None = None,
    on_stats: Callable[[ListenerStats], None] | None = None,
) -> None:
    """``dingtalk-etl listen``: listen and reconcile until ``stop`` is set.

    Chats that received events are re-read by the sync's reconcile runs, in a process of
    their own (``ReconcileProcess``), each reported to ``on_reconciled``;
    ``reconcile(chatids)`` replaces them (a test that wants none). Raises
    ``SchemaNotMigrated`` and ``DatabaseFailure`` before listening, and the gateway's
    refusals (``GatewayRefused``, ``GatewayForbidden``) when they come.
    """
    with open_database(config) as engine:
        require_schema(engine, "checking the schema")
        runs = ReconcileProcess(config)
        if reconcile is None:
            runs.start()

        def run(chatids: Sequence[str]) -> object:
            if reconcile is not None:
                return reconcile(chatids)
            result = runs(chatids)
            if on_reconciled is not None:
                on_reconciled(chatids, result)
            return result

        reconciler = Reconciler(run, delay=config.events.reconcile_delay_seconds, stop=stop)
        reconciler.start()
        try:
            reconciler.resume(EventStore(engine).waiting_chats())
            Listener(config, engine, stop, on_event=reconciler.touch, on_stats=on_stats).run()
        finally:
            stop.set()
            runs.close()
            reconciler.join()
