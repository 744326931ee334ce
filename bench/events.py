"""Group-event benchmark: ``dingtalk-etl listen`` against the simulator's Stream gateway.

Boundary: a command-line tool on top of the product, like ``bench/throughput.py`` (whose
process helpers it reuses). Four kinds of process, so that each one's CPU and memory are its
own:

- the *world*: this script's ``--step world`` child, which serves a generated world over the
  simulator's HTTP front (gettoken, chat/get) and its Stream gateway on 127.0.0.1, and makes
  the changes the benchmark asks for (a paced loop, or a flood), each one a real world change
  with an operator that the gateway turns into a group event;
- ``dingtalk-etl listen`` (``python -m etl``, this checkout's code) with a config file written
  here: its own process, as deployed, so that its CPU time and RSS are its own;
- the *floor*: a minimal Stream client (``--step floor``) that reads each frame with the
  listener's own transport and frame parser and ACKs it at once, without storing anything;
- one-shot steps (first sync, database checks), each in a child process of its own.

This parent imports nothing but the standard library (and ``throughput``, which does the same).

Per database: a first sync of the world's chats; the floor's paced burst; the listener's paced
burst (the same changes at the same rate, on the same gateway), its chat/get calls per chat and
the events it lost; then (``--rss-databases``, every database by default) a new listener, a
flood of events, and its RSS after the first ``--rss-first`` events and after all of them.

    .venv/bin/python bench/events.py                          # sqlite + postgresql
    .venv/bin/python bench/events.py --quick                  # small sizes, a smoke run
    .venv/bin/python bench/events.py --databases sqlite --json results.json

Exit status: 0 when every figure meets its target, 1 when one misses, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from throughput import (
    APP_KEY,
    APP_SECRET,
    DEFAULT_PG_URL,
    DEFAULT_SEED,
    UNPACED_RATE,
    BenchError,
    _die_with_parent,
    databases,
    probe_postgresql,
    run_databases,
)
from throughput import spawn_step as spawn_throughput_step

REPO = Path(__file__).resolve().parent.parent
# Each chat's share of a burst: ten events (twelve changes), the chat as it was at the end.
EVENTS_PER_CHAT = 10
# Long enough that a flood never reaches a reconcile: its memory is the sync's, which
# bench/throughput.py measures, not something that grows with the number of events.
FLOOD_RECONCILE_DELAY = 86_400.0
# Un-ACKed events the flood lets the gateway hold: the listener never waits for work, and
# no event waits long enough to be pushed again.
FLOOD_WINDOW = 200
STARTUP_TIMEOUT = 120.0

TARGETS: dict[str, tuple[str, float]] = {
    "ack_p99_ms": ("<=", 100.0),
    "calls_per_chat": ("==", 1.0),
    "lost": ("==", 0.0),
    "rss_growth": ("<=", 1.2),
}


# --------------------------------------------------------------------------------------------
# The changes: the same for the floor, the listener's burst and the flood.

Change = tuple[str, str, tuple[str, ...], str]


def chat_changes(chatid: str, index: int, owner: str, other: str, name: str) -> list[Change]:
    """Ten changes to one chat, each one event, that leave it as it was.

    Members join (one, then two) and are removed, one quits on their own, the chat is renamed
    and back, the owner hands over to ``other`` and back; ``other`` operates some of them.
    Twelve ``chat_events`` rows in all. Since the chat ends as it began, the same list can be
    applied again, and a reconcile finds nothing the events did not say.
    """
    b1, b2, b3, b4 = (f"bench-{index:04d}-{k}" for k in range(1, 5))
    return [
        ("add", chatid, (b1,), owner),
        ("add", chatid, (b2, b3), other),
        ("name", chatid, (f"{name} (renamed)",), other),
        ("remove", chatid, (b1,), owner),
        ("quit", chatid, (b2,), b2),
        ("owner", chatid, (other,), owner),
        ("add", chatid, (b4,), other),
        ("owner", chatid, (owner,), other),
        ("remove", chatid, (b3, b4), owner),
        ("name", chatid, (name,), owner),
    ]


def expected_changes(event_type: str, data: dict[str, Any]) -> list[list[Any]]:
    """The changes an event of this world describes, as ``chat_events`` says them:
    ``[event_type, userid, field, new_value]``, one row each."""
    if event_type in ("chat_add_member", "chat_remove_member"):
        kind = "member_joined" if event_type == "chat_add_member" else "member_left"
        return [[kind, u, None, None] for u in data.get("userId") or ()]
    if event_type == "chat_quit":
        return [["member_left", data.get("operator"), None, None]]
    if event_type == "chat_update_title":
        return [["attribute_changed", None, "name", data.get("title")]]
    if event_type == "chat_update_owner":
        return [["attribute_changed", None, "owner_userid", data.get("owner")]]
    raise ValueError(f"the benchmark makes no {event_type} event")


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile: the smallest value with ``share`` of the values at or below."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


# --------------------------------------------------------------------------------------------
# Child: the world (simulator, gateway, the changes), driven by JSON lines on stdin.


class Driver:
    """Makes the world's changes on request; answers what the gateway saw of them."""

    def __init__(self, world: Any, gateway: Any) -> None:
        self.world = world
        self.gateway = gateway
        self.changes: list[Change] = []
        with world.lock:
            for index, chatid in enumerate(sorted(world.chats), start=1):
                chat = world.chats[chatid]
                other = next(u for u in chat.useridlist if u != chat.owner)
                self.changes += chat_changes(chatid, index, chat.owner, other, chat.name)
        self.flood_start: int | None = None
        self.flood_done = 0

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request["cmd"]
        if cmd == "connected":
            return self.connected(request["after"], request["timeout"])
        if cmd == "state":
            return self.state()
        if cmd == "paced":
            return self.paced(request["rate"], request["ids_file"], request["timeout"])
        if cmd == "flood":
            return self.flood(request["until"], request["window"], request["timeout"])
        if cmd == "flood_ids":
            assert self.flood_start is not None
            written = self._write_ids(self.flood_start, self.flood_done, request["ids_file"])
            return {"events": written}
        raise ValueError(f"unknown command {cmd!r}")

    def state(self) -> dict[str, Any]:
        with self.world.lock:
            requests = dict(self.world.stats.requests_by_chat)
        stats = self.gateway.stats.as_dict()
        stats.pop("ack_latencies")
        return {
            "connections_opened": self.gateway.connections_opened,
            "requests_by_chat": requests,
            "gateway": stats,
        }

    def connected(self, after: int, timeout: float) -> dict[str, Any]:
        """Wait for a connection opened after the ``after``-th, and current."""
        deadline = time.monotonic() + timeout
        while not (self.gateway.connections_opened > after and self.gateway.connected):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no new Stream connection within {timeout:g} s")
            time.sleep(0.05)
        return {"connections_opened": self.gateway.connections_opened}

    def _apply(self, change: Change) -> None:
        kind, chatid, users, operator = change
        world = self.world
        if kind == "add":
            world.add_members(chatid, users, operator=operator)
        elif kind == "remove":
            world.remove_members(chatid, users, operator=operator)
        elif kind == "quit":
            world.quit(chatid, users[0])
        elif kind == "name":
            world.set_attr(chatid, operator=operator, name=users[0])
        else:
            world.set_attr(chatid, operator=operator, owner=users[0])

    def _counts(self) -> tuple[int, int]:
        """Events created and ACKed so far (each read is atomic; created is read first)."""
        stats = self.gateway.stats
        return stats.events_created, stats.events_acked

    def _wait_acked(self, created: int, timeout: float) -> float:
        """Wait until every event created so far is ACKed; seconds waited."""
        started = time.monotonic()
        while self._counts()[1] < created:
            if time.monotonic() - started > timeout:
                raise TimeoutError(
                    f"{created - self._counts()[1]} events not ACKed within {timeout:g} s"
                )
            time.sleep(0.005)
        return time.monotonic() - started

    def paced(self, rate: float, ids_file: str, timeout: float) -> dict[str, Any]:
        """Every change once, one every ``1/rate`` s (a slot each: late ones catch up)."""
        first, _ = self._counts()
        interval = 1.0 / rate
        started = time.monotonic() + 0.05
        late = 0.0
        for i, change in enumerate(self.changes):
            slot = started + i * interval
            now = time.monotonic()
            if slot > now:
                time.sleep(slot - now)
            else:
                late = max(late, now - slot)
            self._apply(change)
        push_seconds = time.monotonic() - started
        created, _ = self._counts()
        drain = self._wait_acked(created, timeout)
        deliveries = self.gateway.deliveries()[first:created]
        self._write_deliveries(deliveries, ids_file)
        latencies = [d.latency * 1000 for d in deliveries if d.latency is not None]
        return {
            "changes": len(self.changes),
            "events": len(deliveries),
            "acked": sum(1 for d in deliveries if d.delivered),
            "pushed_again": sum(max(0, d.times_pushed - 1) for d in deliveries),
            "latencies_ms": latencies,
            "push_seconds": push_seconds,
            "max_late_ms": late * 1000,
            "drain_seconds": drain,
        }

    def flood(self, until: int, window: int, timeout: float) -> dict[str, Any]:
        """Changes as fast as the client takes them (at most ``window`` un-ACKed) until the
        flood has made ``until`` events, then every one ACKed."""
        if self.flood_start is None:
            self.flood_start = self._counts()[0]
        started = time.monotonic()
        while self.flood_done < until:
            created, acked = self._counts()
            if created - acked >= window:
                time.sleep(0.002)
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"flood: the client stopped ACKing at {acked} events")
                continue
            self._apply(self.changes[self.flood_done % len(self.changes)])
            self.flood_done += 1
        created, _ = self._counts()
        self._wait_acked(created, timeout)
        return {"events": self.flood_done, "seconds": time.monotonic() - started}

    def _write_ids(self, first: int, count: int, ids_file: str) -> int:
        deliveries = self.gateway.deliveries()[first : first + count]
        self._write_deliveries(deliveries, ids_file)
        return len(deliveries)

    @staticmethod
    def _write_deliveries(deliveries: list[Any], ids_file: str) -> None:
        entries = [
            [
                d.event_id,
                d.data.get("chatId"),
                d.data.get("timeStamp"),
                expected_changes(d.event_type, d.data),
            ]
            for d in deliveries
        ]
        Path(ids_file).write_text(json.dumps(entries))


def step_world(spec: dict[str, Any]) -> None:
    from etl.simulator import Simulator, StreamGateway, World

    world = World.generate(spec["chats"], seed=spec["seed"])
    world.app_key, world.app_secret = APP_KEY, APP_SECRET
    sim = Simulator(world).start()
    gateway = StreamGateway(world).start()
    try:
        driver = Driver(world, gateway)
        memberships = sum(len(chat.useridlist) for chat in world.chats.values())
        _reply(
            {
                "base_url": sim.base_url,
                "gateway_url": gateway.gateway_url,
                "chats": len(world.chats),
                "memberships": memberships,
                "changes": len(driver.changes),
            }
        )
        for line in sys.stdin:
            request = json.loads(line)
            if request["cmd"] == "quit":
                break
            try:
                answer = driver.handle(request)
            except Exception as exc:  # noqa: BLE001 - the parent reports it and stops
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            _reply(answer)
    finally:
        gateway.stop()
        sim.stop()


def _reply(answer: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# Child: the floor, a Stream client that ACKs each frame as soon as it has read it.


def step_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """The listener's transport (``StreamSocket``) and frame parser, nothing stored: each
    event ACKed SUCCESS as soon as it is read, each ping echoed. Runs until SIGTERM."""
    from etl.events import FrameError, ack, ack_success, parse_frame
    from etl.stream import StreamSocket, StreamUnavailable, open_connection

    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    socket = StreamSocket(open_connection(spec["gateway_url"], APP_KEY, APP_SECRET))
    answered = 0
    try:
        while not stopping:
            try:
                text = socket.receive(timeout=0.2)
            except StreamUnavailable:
                break
            if text is None:
                continue
            try:
                frame = parse_frame(text)
            except FrameError:
                continue
            message_id = frame.message_id
            if message_id is None:
                continue
            if frame.type == "SYSTEM":
                socket.send(ack(message_id, json.loads(frame.data or "{}")))
            else:
                socket.send(ack_success(message_id))
                answered += 1
    finally:
        socket.close()
    return {"answered": answered}


# --------------------------------------------------------------------------------------------
# Child: what the database holds of the events.


def step_check(spec: dict[str, Any]) -> dict[str, Any]:
    """Events with no ``pushed_events`` row, changes in no ``chat_events`` row; with
    ``wait_reconciled``, first wait until every event's chat was reconciled after it.

    A change is recorded when a row of its event says it, or (outcome ``already_recorded``)
    when a poll row at or after the event's time does: a reconcile read it first."""
    import datetime as dt

    from sqlalchemy import and_, func, select

    from etl.db import create_db_engine
    from etl.eventstore import RECONCILED_OUTCOMES
    from etl.schema import chat_events, pushed_events, sync_runs

    entries = json.loads(Path(spec["ids_file"]).read_text())
    ids = [entry[0] for entry in entries]
    chunks = [ids[i : i + 500] for i in range(0, len(ids), 500)]
    engine = create_db_engine(spec["url"])
    started = time.monotonic()
    try:
        while True:
            stored: dict[str, tuple[str, Any]] = {}
            with engine.connect() as conn:
                for chunk in chunks:
                    query = select(
                        pushed_events.c.event_id,
                        pushed_events.c.outcome,
                        pushed_events.c.reconciled_at,
                    ).where(pushed_events.c.event_id.in_(chunk))
                    for event_id, outcome, reconciled_at in conn.execute(query):
                        stored[event_id] = (outcome, reconciled_at)
            waiting = sum(
                1
                for outcome, at in stored.values()
                if at is None and outcome in RECONCILED_OUTCOMES
            )
            done = not spec["wait_reconciled"] or (len(stored) == len(ids) and waiting == 0)
            if done or time.monotonic() - started > spec["timeout"]:
                break
            time.sleep(0.2)
        waited = time.monotonic() - started
        rows: Counter[tuple[Any, ...]] = Counter()
        with engine.connect() as conn:
            for chunk in chunks:
                query = select(
                    chat_events.c.event_id,
                    chat_events.c.event_type,
                    chat_events.c.userid,
                    chat_events.c.field,
                    chat_events.c.new_value,
                ).where(chat_events.c.event_id.in_(chunk), chat_events.c.source == "event")
                rows.update(tuple(row) for row in conn.execute(query))
            as_event = by_poll = missing = 0
            for event_id, chatid, stamp, changes in entries:
                for event_type, userid, field_name, new_value in changes:
                    key = (event_id, event_type, userid, field_name, new_value)
                    if rows[key] > 0:
                        rows[key] -= 1
                        as_event += 1
                        continue
                    about = (
                        chat_events.c.userid == userid
                        if field_name is None
                        else and_(
                            chat_events.c.field == field_name,
                            chat_events.c.new_value == new_value,
                        )
                    )
                    poll = conn.execute(
                        select(func.count()).where(
                            chat_events.c.chatid == chatid,
                            chat_events.c.source == "poll",
                            chat_events.c.event_type == event_type,
                            about,
                            chat_events.c.occurred_at
                            >= dt.datetime.fromtimestamp(stamp / 1000, dt.UTC),
                        )
                    ).scalar_one()
                    if poll:
                        by_poll += 1
                    else:
                        missing += 1
            runs = Counter(
                {
                    status: int(count)
                    for status, count in conn.execute(
                        select(sync_runs.c.status, func.count())
                        .where(sync_runs.c.trigger == "event")
                        .group_by(sync_runs.c.status)
                    )
                }
            )
            # Rows the reconciles wrote: none when the events said everything first.
            poll_rows = conn.execute(
                select(func.count())
                .select_from(chat_events.join(sync_runs, chat_events.c.run_id == sync_runs.c.id))
                .where(sync_runs.c.trigger == "event")
            ).scalar_one()
    finally:
        engine.dispose()
    return {
        "events": len(ids),
        "stored": len(stored),
        "lost": len(ids) - len(stored),
        "outcomes": dict(Counter(outcome for outcome, _ in stored.values())),
        "unreconciled": waiting,
        "waited_seconds": waited,
        "changes_expected": as_event + by_poll + missing,
        "changes_as_event": as_event,
        "changes_by_poll": by_poll,
        "changes_missing": missing,
        # Event rows that no change of their event accounts for (a change written twice).
        "changes_extra": sum(rows.values()),
        "reconcile_runs": dict(runs),
        "reconcile_rows": int(poll_rows),
    }


STEPS = {"floor": step_floor, "check": step_check}


# --------------------------------------------------------------------------------------------
# The parent: processes, the sequence, the report.


def spawn_step(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one of this script's steps in a child; the spec goes on stdin (it may be long)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name]
    proc = subprocess.run(cmd, input=json.dumps(spec), stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise BenchError(f"step {name} failed (exit {proc.returncode})")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise BenchError(f"step {name} printed no result")
    return dict(json.loads(lines[-1]))


class Lines:
    """Lines from a child's stdout, each within a timeout (no buffered line is ever missed)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buffer = b""

    def next(self, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{what}: no answer within {timeout:.0f} s")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    raise BenchError(f"{what}: the world process ended")
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


@dataclass
class WorldProcess:
    proc: subprocess.Popen[bytes]
    lines: Lines
    info: dict[str, Any]

    def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """Send a command; its answer, within its ``timeout`` (10 s if none) and a margin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
        self.proc.stdin.flush()
        wait = float(fields.get("timeout", 10)) + 30
        answer = dict(json.loads(self.lines.next(wait, f"world: {cmd}")))
        if "error" in answer:
            raise BenchError(f"world: {cmd}: {answer['error']}")
        return answer


@contextlib.contextmanager
def world_process(chats: int, seed: int) -> Iterator[WorldProcess]:
    """The simulator and the changes, in a process of their own; always stopped on the way out."""
    spec = json.dumps({"chats": chats, "seed": seed})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", "world", spec]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=_die_with_parent
    )
    try:
        lines = Lines(proc)
        info = json.loads(lines.next(STARTUP_TIMEOUT, "world: start"))
        world = WorldProcess(proc, lines, info)
        yield world
        assert proc.stdin is not None
        proc.stdin.write(b'{"cmd": "quit"}\n')
        proc.stdin.close()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def write_config(path: Path, *, url: str, world: WorldProcess, chats: int, delay: float) -> Path:
    """The listener's config: the world's chats synced, defaults elsewhere (INFO logs, 20
    calls/s for the reconciles, concurrency 4)."""
    chatids = ", ".join(json.dumps(f"gen-{i:06d}") for i in range(1, chats + 1))
    path.write_text(
        "\n".join(
            [
                "[dingtalk]",
                f"base_url = {json.dumps(world.info['base_url'])}",
                f"app_key = {json.dumps(APP_KEY)}",
                f"app_secret = {json.dumps(APP_SECRET)}",
                "[database]",
                f"url = {json.dumps(url)}",
                "[sync]",
                f"chatids = [{chatids}]",
                "[events]",
                f"gateway_url = {json.dumps(world.info['gateway_url'])}",
                f"reconcile_delay_seconds = {delay}",
                "[logging]",
                'level = "INFO"',
                'format = "json"',
                "",
            ]
        )
    )
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def listener_process(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``dingtalk-etl listen`` in a process of its own, logging to ``log``; SIGTERM at the
    end, and it must exit 0."""
    # This checkout's code, whatever an installed ``dingtalk-etl`` script would import.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "etl", "--config", str(config), "listen"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            preexec_fn=_die_with_parent,
        )
    try:
        yield proc
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        if code != 0:
            raise BenchError(f"listen exited {code}; see {log}:\n{_tail(log)}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def floor_process(gateway_url: str) -> Iterator[subprocess.Popen[str]]:
    spec = json.dumps({"gateway_url": gateway_url})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", "floor", spec]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_die_with_parent,
    )
    try:
        yield proc
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        if proc.returncode != 0:
            raise BenchError(f"floor client exited {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # utime and stime are the 14th and 15th fields; the first two precede the split.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (the listener's fork server and reconcile process)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
    found: list[int] = []
    level = [pid]
    while level:
        level = [child for child, parent in parents.items() if parent in level]
        found.extend(level)
    return found


def helpers_cpu_seconds(pid: int) -> float:
    """CPU time of the processes below ``pid`` so far (those that still run)."""
    total = 0.0
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(child)
    return total


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB (Linux)."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


@dataclass
class DatabaseRun:
    kind: str
    memberships: int = 0
    sync: dict[str, Any] = field(default_factory=dict)
    floor: dict[str, Any] = field(default_factory=dict)
    burst: dict[str, Any] = field(default_factory=dict)
    burst_check: dict[str, Any] = field(default_factory=dict)
    calls: dict[str, float] = field(default_factory=dict)
    gateway: dict[str, Any] = field(default_factory=dict)
    flood: dict[str, Any] = field(default_factory=dict)
    flood_check: dict[str, Any] = field(default_factory=dict)
    rss_kb: dict[int, int] = field(default_factory=dict)
    hwm_kb: int = 0
    # Listener CPU seconds: the burst (events and their reconciles), the flood after its
    # first RSS sample (events alone).
    burst_cpu: float = 0.0
    # ... and of its reconcile process (and the fork server it comes from).
    burst_helpers_cpu: float = 0.0
    helpers_rss_kb: int = 0
    floor_cpu: float = 0.0
    flood_cpu: float = 0.0
    load: list[float] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)


def latency_summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies, default=math.nan),
    }


def bench_database(kind: str, args: argparse.Namespace, workdir: Path) -> DatabaseRun:
    run = DatabaseRun(kind)
    run.load.append(os.getloadavg()[0])
    # A listener far behind still has to answer every event: give it ten minutes after the push.
    burst_timeout = 600.0 + args.chats * EVENTS_PER_CHAT / args.rate

    def say(text: str) -> None:
        print(f"  {kind}: {text} ...", file=sys.stderr, flush=True)

    with (
        databases(kind, ["events"], args.pg_url, workdir) as (url,),
        world_process(args.chats, args.seed) as world,
    ):
        spawn_throughput_step("prepare", {"urls": [url], "admin_url": args.pg_url})
        run.memberships = int(world.info["memberships"])
        say(f"first sync of {args.chats} chats")
        run.sync = spawn_throughput_step(
            "sync",
            {
                "workdir": str(workdir),
                "concurrency": 8,
                "url": url,
                "chats": args.chats,
                "rate": UNPACED_RATE,
                "base_url": world.info["base_url"],
            },
        ).data
        if run.sync["status"] != "succeeded":
            raise BenchError(f"first sync: {run.sync}")

        say(f"floor: {world.info['changes']} events at {args.rate:g}/s, nothing stored")
        opened = world.call("state")["connections_opened"]
        with floor_process(world.info["gateway_url"]) as proc:
            world.call("connected", after=opened, timeout=60)
            cpu = cpu_seconds(proc.pid)
            run.floor = world.call(
                "paced",
                rate=args.rate,
                ids_file=str(workdir / "floor.json"),
                timeout=burst_timeout,
            )
            run.floor_cpu = cpu_seconds(proc.pid) - cpu

        say(f"listener: the same events, reconcile delay {args.reconcile_delay:g} s")
        config = write_config(
            workdir / f"{kind}-burst.toml",
            url=url,
            world=world,
            chats=args.chats,
            delay=args.reconcile_delay,
        )
        before = world.call("state")
        with listener_process(config, workdir / f"{kind}-burst.log") as proc:
            world.call("connected", after=before["connections_opened"], timeout=60)
            cpu, helpers_cpu = cpu_seconds(proc.pid), helpers_cpu_seconds(proc.pid)
            ids_file = str(workdir / f"{kind}-burst.json")
            run.burst = world.call(
                "paced", rate=args.rate, ids_file=ids_file, timeout=burst_timeout
            )
            run.burst_check = spawn_step(
                "check",
                {"url": url, "ids_file": ids_file, "wait_reconciled": True, "timeout": 300},
            )
            after = world.call("state")
            run.burst_cpu = cpu_seconds(proc.pid) - cpu
            run.burst_helpers_cpu = helpers_cpu_seconds(proc.pid) - helpers_cpu
        touched = {entry[1] for entry in json.loads(Path(ids_file).read_text())}
        calls = [
            after["requests_by_chat"].get(c, 0) - before["requests_by_chat"].get(c, 0)
            for c in touched
        ]
        run.calls = {
            "chats": len(touched),
            "mean": sum(calls) / len(calls),
            "min": min(calls),
            "max": max(calls),
        }
        run.gateway = after["gateway"]

        if kind in args.rss_kinds:
            say(f"memory: {args.flood:,} events to a new listener, as fast as it takes them")
            config = write_config(
                workdir / f"{kind}-flood.toml",
                url=url,
                world=world,
                chats=args.chats,
                delay=FLOOD_RECONCILE_DELAY,
            )
            opened = world.call("state")["connections_opened"]
            checkpoints = sorted({args.rss_first, *args.rss_points, args.flood})
            flood_timeout = 60.0 + args.flood / 20
            with listener_process(config, workdir / f"{kind}-flood.log") as proc:
                world.call("connected", after=opened, timeout=60)
                seconds = 0.0
                for point in checkpoints:
                    done = world.call(
                        "flood",
                        until=point,
                        window=FLOOD_WINDOW,
                        timeout=flood_timeout,
                    )
                    seconds += done["seconds"]
                    run.rss_kb[point] = memory_kb(proc.pid)["VmRSS"]
                    if point == args.rss_first:
                        cpu = cpu_seconds(proc.pid)
                    say(f"  {point:,} events, RSS {run.rss_kb[point] / 1024:.1f} MB")
                run.hwm_kb = memory_kb(proc.pid)["VmHWM"]
                run.helpers_rss_kb = sum(
                    memory_kb(child).get("VmRSS", 0) for child in descendants(proc.pid)
                )
                run.flood_cpu = cpu_seconds(proc.pid) - cpu
            ids_file = str(workdir / f"{kind}-flood.json")
            world.call("flood_ids", ids_file=ids_file, timeout=120)
            run.flood = {"events": args.flood, "seconds": seconds}
            run.flood_check = spawn_step(
                "check",
                {"url": url, "ids_file": ids_file, "wait_reconciled": False, "timeout": 0},
            )

    run.load.append(os.getloadavg()[0])
    burst_lat = latency_summary(run.burst["latencies_ms"])
    lost = run.burst_check["lost"] + run.burst_check["changes_missing"]
    lost += run.burst["changes"] - run.burst["events"]
    if run.flood_check:
        lost += run.flood_check["lost"] + run.flood_check["changes_missing"]
    run.figures = {
        "ack_p99_ms": burst_lat["p99"],
        "calls_per_chat": run.calls["mean"],
        "lost": float(lost),
    }
    if run.rss_kb:
        run.figures["rss_growth"] = run.rss_kb[args.flood] / run.rss_kb[args.rss_first]
    return run


def meets(name: str, value: float, run: DatabaseRun) -> bool:
    op, target = TARGETS[name]
    if name == "calls_per_chat":
        # Every chat exactly once: one chat read twice and one never do not make 1.00.
        return run.calls["min"] == run.calls["max"] == target
    if op == "<=":
        return value <= target
    return value == target


def report(run: DatabaseRun, args: argparse.Namespace) -> bool:
    burst, floor, check = run.burst, run.floor, run.burst_check
    lat = latency_summary(burst["latencies_ms"])
    flat = latency_summary(floor["latencies_ms"])
    events = burst["events"]
    print(
        f"\n== {run.kind}: {args.chats} chats ({run.memberships:,} memberships) synced first; "
        f"{events:,} events at {args.rate:g}/s =="
    )
    print(
        f"machine load (1-min average) {run.load[0]:.1f} at the start, {run.load[-1]:.1f} at "
        f"the end, {os.cpu_count()} CPUs"
    )
    print(
        f"paced pushes: {events / burst['push_seconds']:.1f} events/s achieved (floor run "
        f"{floor['events'] / floor['push_seconds']:.1f}/s); latest slot missed by "
        f"{burst['max_late_ms']:.1f} ms (floor {floor['max_late_ms']:.1f} ms)"
    )
    print(
        "ACK latency = the gateway's push -> ACK arrival for each event: both directions over "
        "loopback, plus the listener's work in between"
    )
    print(f"{'':<34}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'ACKed':>9}{'pushed again':>14}")
    for label, summary, data in (
        ("listen (stores, then ACKs)", lat, burst),
        ("floor (ACKs at once, no store)", flat, floor),
    ):
        print(
            f"{label:<34}{summary['p50']:>9.1f}{summary['p99']:>9.1f}{summary['max']:>9.1f}"
            f"{data['acked']:>9,}{data['pushed_again']:>14}"
        )
    fifths = [burst["latencies_ms"][i * events // 5 : (i + 1) * events // 5] for i in range(5)]
    print(
        "listen p50/p99 ms by fifth of the burst: "
        + ", ".join(f"{percentile(part, 0.5):.0f}/{percentile(part, 0.99):.0f}" for part in fifths)
    )
    print(
        f"listener: last ACK {burst['drain_seconds'] * 1000:.0f} ms after the last push; CPU "
        f"{run.burst_cpu / events * 1000:.2f} ms per event, and "
        f"{run.burst_helpers_cpu / events * 1000:.2f} in its reconcile process; "
        f"floor CPU {run.floor_cpu / floor['events'] * 1000:.2f} ms per event"
    )
    runs = ", ".join(f"{n} {status}" for status, n in sorted(check["reconcile_runs"].items()))
    print(
        f"reconciles: {run.calls['chats']} chats touched, chat/get per chat "
        f"mean {run.calls['mean']:.2f} (min {run.calls['min']}, max {run.calls['max']}); "
        f"runs: {runs or 'none'}; rows they wrote {check['reconcile_rows']}; "
        f"all reconciled {check['waited_seconds']:.1f} s after the last ACK"
        + (f"; {check['unreconciled']} NOT reconciled" if check["unreconciled"] else "")
    )
    print(
        f"burst: {burst['changes']:,} changes made, {events:,} events created, "
        f"{check['stored']:,} stored ({_outcomes(check)}); {_changes(check)}"
    )
    if run.flood_check:
        fc = run.flood_check
        rate = run.flood["events"] / run.flood["seconds"]
        points = ", ".join(f"{n:,}: {kb / 1024:.1f}" for n, kb in sorted(run.rss_kb.items()))
        print(
            f"flood: {run.flood['events']:,} events in {run.flood['seconds']:.0f} s "
            f"({rate:.0f}/s, reconciles held off); {fc['stored']:,} stored ({_outcomes(fc)}); "
            f"{_changes(fc)}"
        )
        per_event = run.flood_cpu / (args.flood - args.rss_first) * 1000
        print(f"listener CPU {per_event:.2f} ms per event after the first {args.rss_first:,}")
        print(
            f"listener RSS MB after N events: {points}; peak (VmHWM) {run.hwm_kb / 1024:.1f}; "
            f"its reconcile process and fork server {run.helpers_rss_kb / 1024:.1f} at the end"
        )
    else:
        print("flood: not run on this database (--rss-databases)")

    labels = {
        "ack_p99_ms": "ACK latency p99, ms",
        "calls_per_chat": "chat/get calls per chat touched",
        "lost": "events lost + changes missing",
        "rss_growth": f"RSS after {args.flood:,} / after {args.rss_first:,} events",
    }
    all_ok = True
    print(f"{'figure':<44}{'value':>10}   {'target':<10}")
    for name, value in run.figures.items():
        op, target = TARGETS[name]
        ok = meets(name, value, run)
        all_ok &= ok
        shown = f"{value:.2f}" if name != "lost" else f"{value:.0f}"
        print(f"  {labels[name]:<42}{shown:>10}   {op} {target:<7g} {'PASS' if ok else 'FAIL'}")
    return all_ok


def _changes(check: dict[str, Any]) -> str:
    return (
        f"changes {check['changes_expected']:,}: {check['changes_as_event']:,} in event rows, "
        f"{check['changes_by_poll']:,} in a reconcile's poll rows (it read them first), "
        f"{check['changes_missing']} missing, {check['changes_extra']} written twice"
    )


def _outcomes(check: dict[str, Any]) -> str:
    return ", ".join(f"{n:,} {o}" for o, n in sorted(check["outcomes"].items())) or "none"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure `dingtalk-etl listen` against the bundled simulator (see README).",
    )
    parser.add_argument(
        "--chats", type=int, default=None, help=f"chats, {EVENTS_PER_CHAT} events each (200)"
    )
    parser.add_argument("--rate", type=float, default=200.0, help="paced events/s (200)")
    parser.add_argument(
        "--reconcile-delay",
        type=float,
        default=2.0,
        help="[events] reconcile_delay_seconds of the burst's listener (2)",
    )
    parser.add_argument(
        "--flood", type=int, default=None, help="events of the memory flood (100000)"
    )
    parser.add_argument(
        "--rss-first", type=int, default=1000, help="the flood's first RSS sample (1000)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="world seed (2)")
    parser.add_argument(
        "--databases",
        default="sqlite,postgresql",
        help="comma-separated: sqlite, postgresql (default both)",
    )
    parser.add_argument(
        "--rss-databases",
        default=None,
        help="databases that also run the memory flood, or none (default: those of --databases)",
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("DINGTALK_ETL_BENCH_PG", DEFAULT_PG_URL),
        help="PostgreSQL admin URL; a dedicated database is created and dropped "
        "(default $DINGTALK_ETL_BENCH_PG or %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.chats = args.chats or (20 if args.quick else 200)
    args.flood = args.flood or (5_000 if args.quick else 100_000)
    if args.flood <= args.rss_first:
        parser.error("--flood must be more than --rss-first")
    args.rss_points = [p for p in (10_000, 50_000) if args.rss_first < p < args.flood]

    def kinds(text: str, option: str) -> list[str]:
        listed = [k.strip() for k in text.split(",") if k.strip()]
        unknown = set(listed) - {"sqlite", "postgresql"}
        if unknown or not listed:
            parser.error(f"{option}: unknown {', '.join(sorted(unknown)) or 'empty list'}")
        return listed

    args.kinds = kinds(args.databases, "--databases")
    # One transaction per event: on PostgreSQL (a WAL flush each) the flood takes half an hour.
    rss = args.rss_databases or ",".join(args.kinds)
    args.rss_kinds = [] if rss == "none" else kinds(rss, "--rss-databases")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["--step"] and len(argv) >= 2:
        sys.path.insert(0, str(REPO))
        spec = json.loads(argv[2] if len(argv) > 2 else sys.stdin.read())
        if argv[1] == "world":
            step_world(spec)
            return 0
        result = STEPS[argv[1]](spec)
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    args = parse_args(argv)
    return run_databases(
        args.kinds,
        prefix="dingtalk-etl-bench-events-",
        probe=(lambda: probe_postgresql(args.pg_url)) if "postgresql" in args.kinds else None,
        bench=lambda kind, workdir: bench_database(kind, args, workdir),
        report=lambda run: report(run, args),
        as_json=lambda run: {
            "database": run.kind,
            "figures": run.figures,
            "floor_latency_ms": latency_summary(run.floor["latencies_ms"]),
            "listen_latency_ms": latency_summary(run.burst["latencies_ms"]),
            "calls": run.calls,
            "burst_check": run.burst_check,
            "flood": run.flood,
            "flood_check": run.flood_check,
            "rss_kb": run.rss_kb,
            "hwm_kb": run.hwm_kb,
            "gateway": run.gateway,
        },
        json_path=args.json,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
