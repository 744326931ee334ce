"""Throughput benchmark: the sync against a generated DingTalk world, and its floors.

Boundary: a command-line tool on top of the product. It starts ``dingtalk-etl simulate`` as a
separate process (so the simulator's CPU and memory are not the sync's), and runs every
measured step in a child process of its own, so that each peak RSS (``ru_maxrss`` from
``os.wait4``) is that step's alone. This parent process imports nothing but the standard
library: a child's peak RSS starts from what the parent held when it forked.

Per database it measures: first sync, unchanged re-sync and 1%-changed re-sync of
``--chats`` chats with no rate limit; the fetch floor (the same HTTP calls at the same
concurrency, responses parsed, no database); the write floor (the database's fastest bulk
load of the first sync's rows into an empty database of the same kind: COPY on PostgreSQL);
a first sync of ``--small-chats`` chats (for memory); and a paced run at ``--rate`` calls/s
against a simulator that enforces it.

    .venv/bin/python bench/throughput.py                      # 2,000 chats, sqlite + postgresql
    .venv/bin/python bench/throughput.py --quick              # small sizes, a smoke run
    .venv/bin/python bench/throughput.py --databases sqlite --chats 5000

Exit status: 0 when every ratio meets its target, 1 when one misses, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import selectors
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import BenchError, run_databases

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
APP_KEY = "demo-key"
APP_SECRET = "demo-secret"
# With the default generator settings this seed gives ~383k memberships over 2,000 chats.
DEFAULT_SEED = 2
MUTATE_SHARE = 0.01
MUTATE_SEED = 5
# What "no rate limit" means for the client: far above anything one process can reach.
UNPACED_RATE = 100_000.0
SIMULATOR_START_TIMEOUT = 120.0

TARGETS: dict[str, tuple[str, float]] = {
    "paced": (">=", 0.95),
    "unchanged_vs_fetch": ("<=", 1.25),
    "first_vs_floors": ("<=", 1.2),
    "changed_vs_unchanged": ("<=", 1.3),
    "rss_growth": ("<=", 1.5),
}


# --------------------------------------------------------------------------------------------
# Child steps: each runs in its own process, prints one JSON object as its last stdout line.


def _chatids(count: int) -> list[str]:
    # The simulator's generated chats are gen-000001 ... in order.
    return [f"gen-{i:06d}" for i in range(1, count + 1)]


def _config(spec: dict[str, Any]) -> Any:
    from etl.config import parse_config

    raw = {
        "dingtalk": {
            "base_url": spec["base_url"],
            "app_key": APP_KEY,
            "app_secret": APP_SECRET,
            "timeout_seconds": 30,
            "max_requests_per_second": spec["rate"],
            "max_attempts": 5,
        },
        "database": {"url": spec["url"]},
        "sync": {"chatids": _chatids(spec["chats"]), "concurrency": spec["concurrency"]},
        "logging": {"level": "WARNING", "format": "json"},
    }
    return parse_config(raw, Path(spec["workdir"]) / "bench.toml", environ={})


def step_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Create (PostgreSQL) and migrate each database in ``spec["urls"]``."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from etl import migrate
    from etl.db import create_db_engine

    for url in spec["urls"]:
        parsed = make_url(url)
        if parsed.get_backend_name() == "postgresql":
            admin = create_engine(spec["admin_url"], isolation_level="AUTOCOMMIT")
            try:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}"'))
                    conn.execute(text(f'CREATE DATABASE "{parsed.database}"'))
            finally:
                admin.dispose()
        if spec.get("migrate", True):
            engine = create_db_engine(url)
            try:
                migrate.upgrade(engine)
            finally:
                engine.dispose()
    return {}


def step_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Whether the PostgreSQL server answers (the reason if not)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    engine = create_engine(spec["admin_url"])
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"error": None}
    except SQLAlchemyError as exc:
        reason = getattr(exc, "orig", None) or exc
        return {"error": (str(reason).strip().splitlines() or [type(reason).__name__])[0]}
    finally:
        engine.dispose()


def step_dropdb(spec: dict[str, Any]) -> dict[str, Any]:
    from sqlalchemy import create_engine, text

    admin = create_engine(spec["admin_url"], isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for name in spec["names"]:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :n AND pid <> pg_backend_pid()"
                    ),
                    {"n": name},
                )
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin.dispose()
    return {}


def step_sync(spec: dict[str, Any]) -> dict[str, Any]:
    from sqlalchemy import func, select

    from etl.db import create_db_engine
    from etl.logs import configure_logging
    from etl.schema import chat_events
    from etl.sync import run_sync

    configure_logging("WARNING", "json")
    config = _config(spec)
    # The database driver is imported before the clock starts, as SQLAlchemy and the product
    # are here and requests is in the fetch floor: what is timed is the run, not imports
    # (SQLAlchemy would import psycopg when the run makes its engine: 0.05-0.15 s).
    config.database_url.get_dialect().import_dbapi()
    started = time.perf_counter()
    result = run_sync(config)
    wall = time.perf_counter() - started

    engine = create_db_engine(spec["url"])
    try:
        with engine.connect() as conn:
            # Each membership event is one chat_members row inserted or updated.
            member_rows = conn.execute(
                select(func.count())
                .select_from(chat_events)
                .where(
                    (chat_events.c.run_id == result.run_id)
                    & chat_events.c.event_type.in_(["member_joined", "member_left"])
                )
            ).scalar_one()
            events = conn.execute(
                select(func.count())
                .select_from(chat_events)
                .where(chat_events.c.run_id == result.run_id)
            ).scalar_one()
    finally:
        engine.dispose()
    return {
        "wall": wall,
        "status": result.status,
        "chats": result.chats_total,
        "chats_ok": result.chats_succeeded,
        "chats_changed": result.chats_changed,
        "api_calls": result.api_calls,
        "retries": result.retries,
        "member_rows": int(member_rows),
        "events": int(events),
        "error": result.error,
    }


def step_fetch_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """The sync's fetch side alone: same client, pacer and concurrency, every answer parsed
    into the record the sync would write (JSON, then ``normalize_chat``); no database."""
    from concurrent.futures import ThreadPoolExecutor

    from etl.dingtalk import DingTalkClient, Pacer
    from etl.logs import configure_logging
    from etl.normalize import normalize_chat

    configure_logging("WARNING", "json")
    config = _config(spec)
    settings = config.dingtalk
    client = DingTalkClient(
        settings.base_url,
        config.app_key,
        config.app_secret,
        pacer=Pacer(settings.max_requests_per_second),
        timeout=settings.timeout_seconds,
        max_attempts=settings.max_attempts,
        max_response_bytes=settings.max_response_bytes,
    )

    def fetch(chatid: str) -> int:
        record = normalize_chat(chatid, client.get_chat(chatid))
        return len(record.members or ())

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(config.sync.concurrency) as pool:
            members = sum(pool.map(fetch, config.chatids))
    finally:
        client.close()
    wall = time.perf_counter() - started
    return {
        "wall": wall,
        "chats": len(config.chatids),
        "api_calls": client.api_calls,
        "retries": client.retries,
        "members_seen": members,
    }


def step_write_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """The database's fastest bulk load of the source's chats, members and events, in one
    transaction: ``COPY ... FROM STDIN`` on PostgreSQL, the driver's executemany of plain
    tuples on SQLite. The rows are read first, in the driver's own form, so the measured
    time is the load's alone; the schema (keys, indexes) is the sync's."""
    from sqlalchemy.engine import make_url

    from etl.db import create_db_engine
    from etl.schema import chat_events, chat_members, chats, sync_runs

    tables = (sync_runs, chats, chat_members, chat_events)
    # Event ids are the database's to assign, as in the sync.
    columns = {
        t.name: [c.name for c in t.c if t is not chat_events or c.name != "id"] for t in tables
    }
    postgres = make_url(spec["url"]).get_backend_name() == "postgresql"

    def selected(table: str) -> str:
        # COPY takes JSON as the text it is; psycopg would hand back parsed objects.
        return ", ".join(f"{c}::text" if postgres and c == "raw" else c for c in columns[table])

    source = create_db_engine(spec["source_url"])
    try:
        with source.connect() as conn:
            cursor = conn.connection.cursor()
            rows: dict[str, list[tuple[Any, ...]]] = {}
            for table in columns:
                cursor.execute(f"SELECT {selected(table)} FROM {table}")
                rows[table] = [tuple(row) for row in cursor.fetchall()]
            cursor.close()
    finally:
        source.dispose()

    target = create_db_engine(spec["url"])
    try:
        with target.connect() as conn:
            dbapi_conn = conn.connection
            cursor = dbapi_conn.cursor()
            started = time.perf_counter()
            if not postgres:
                cursor.execute("BEGIN")
            for table, names in columns.items():
                listed = ", ".join(names)
                if postgres:
                    with cursor.copy(f"COPY {table} ({listed}) FROM STDIN") as copy:
                        for row in rows[table]:
                            copy.write_row(row)
                else:
                    marks = ", ".join("?" for _ in names)
                    cursor.executemany(
                        f"INSERT INTO {table} ({listed}) VALUES ({marks})", rows[table]
                    )
            dbapi_conn.commit()
            wall = time.perf_counter() - started
            cursor.close()
    finally:
        target.dispose()
    return {
        "wall": wall,
        "chats": len(rows["chats"]),
        "member_rows": len(rows["chat_members"]),
        "events": len(rows["chat_events"]),
    }


STEPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "probe": step_probe,
    "prepare": step_prepare,
    "dropdb": step_dropdb,
    "sync": step_sync,
    "fetch_floor": step_fetch_floor,
    "write_floor": step_write_floor,
}


def run_child_step(name: str, spec_json: str) -> None:
    # The repository root, so that `python bench/throughput.py` finds `etl` without installing.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    result = STEPS[name](json.loads(spec_json))
    sys.stdout.write(json.dumps(result) + "\n")


# --------------------------------------------------------------------------------------------
# The parent: simulator processes, step processes, the report.


@dataclass
class Measured:
    """One step, measured once or more (then its wall time is the median of the runs)."""

    name: str
    walls: list[float]
    rss_mb: float
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def chats(self) -> int:
        return int(self.data.get("chats", 0))

    @property
    def member_rows(self) -> int:
        return int(self.data.get("member_rows", 0))

    def label(self) -> str:
        return self.name if len(self.walls) == 1 else f"{self.name} (median of {len(self.walls)})"


def spawn_step(name: str, spec: dict[str, Any]) -> Measured:
    """Run one step in a child process; its peak RSS comes from ``wait4``'s rusage."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        out = proc.stdout.read()
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    if proc.returncode != 0:
        raise BenchError(f"step {name} failed (exit {proc.returncode})")
    lines = out.strip().splitlines()
    if not lines:
        raise BenchError(f"step {name} printed no result")
    data = json.loads(lines[-1])
    # ru_maxrss is in KiB on Linux.
    return Measured(name, [float(data.get("wall", 0.0))], rusage.ru_maxrss / 1024, data)


def _simulator_command() -> list[str]:
    script = Path(sys.executable).parent / "dingtalk-etl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "etl"]


@dataclass
class SimulatorProcess:
    base_url: str
    proc: subprocess.Popen[str]
    memberships: int
    served: int | None = None
    throttled: int | None = None


_SERVING = re.compile(r"DingTalk simulator on (\S+) \((\d+) chats, (\d+) memberships\)")
_SERVED = re.compile(r"served (\d+) requests, (\d+) throttled")


@contextlib.contextmanager
def simulator(
    chats: int, seed: int, *, mutate: float = 0.0, rate_limit: int = 0
) -> Iterator[SimulatorProcess]:
    """``dingtalk-etl simulate --generate`` on loopback; always stopped on the way out."""
    cmd = [
        *_simulator_command(),
        "simulate",
        "--host",
        "127.0.0.1",
        # Port 0: the kernel picks a free port, the simulator prints it; no race with others.
        "--port",
        "0",
        "--generate",
        str(chats),
        "--seed",
        str(seed),
        "--rate-limit",
        str(rate_limit),
    ]
    if mutate:
        cmd += ["--mutate", str(mutate), "--mutate-seed", str(MUTATE_SEED)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
    try:
        assert proc.stdout is not None
        line = _read_line(proc, SIMULATOR_START_TIMEOUT)
        match = _SERVING.search(line)
        if match is None:
            raise BenchError(f"simulator did not start: {line.strip() or 'no output'}")
        sim = SimulatorProcess(match.group(1), proc, int(match.group(3)))
        yield sim
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        # Through the same reader as the first line: it may already hold the next ones.
        rest = proc.stdout.read()
        served = _SERVED.search(rest)
        if served is not None:
            sim.served, sim.throttled = int(served.group(1)), int(served.group(2))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _die_with_parent() -> None:
    """In the simulator's process: get SIGTERM when the benchmark dies, even by SIGKILL."""
    # Linux only (PR_SET_PDEATHSIG = 1); elsewhere the finally blocks are all there is.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(1, signal.SIGTERM)


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                return proc.stdout.readline()
            if proc.poll() is not None:
                return ""
    raise BenchError(f"simulator printed nothing within {timeout:.0f}s")


@dataclass
class DatabaseRun:
    kind: str
    steps: dict[str, Measured] = field(default_factory=dict)
    memberships: int = 0
    paced_throttled: int | None = None
    ratios: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def databases(kind: str, names: list[str], pg_url: str, workdir: Path) -> Iterator[list[str]]:
    """Database URLs named ``names`` of ``kind``, created fresh and migrated; dropped after."""
    if kind == "sqlite":
        yield [f"sqlite:///{workdir / (name + '.db')}" for name in names]
        return
    base = pg_url.rsplit("/", 1)[0]
    tag = f"dingtalk_etl_bench_{os.getpid()}"
    db_names = [f"{tag}_{name}" for name in names]
    try:
        yield [f"{base}/{db}" for db in db_names]
    finally:
        spawn_step("dropdb", {"admin_url": pg_url, "names": db_names})


def bench_database(kind: str, args: argparse.Namespace, workdir: Path) -> DatabaseRun:
    run = DatabaseRun(kind)
    names = ["main", "floor", "small", "paced"]
    with databases(kind, names, args.pg_url, workdir) as urls:
        main_url, floor_url, small_url, paced_url = urls
        spawn_step("prepare", {"urls": urls, "admin_url": args.pg_url})
        common = {"workdir": str(workdir), "concurrency": args.concurrency}

        def measure(label: str, step: str, **spec: Any) -> Measured:
            print(f"  {kind}: {label} ...", file=sys.stderr, flush=True)
            measured = spawn_step(step, {**common, **spec})
            measured.name = label
            if measured.data.get("status") not in (None, "succeeded"):
                raise BenchError(f"{label}: run {measured.data['status']}: {measured.data}")
            earlier = run.steps.get(label)
            if earlier is not None:
                measured.walls = earlier.walls + measured.walls
                measured.rss_mb = max(earlier.rss_mb, measured.rss_mb)
            run.steps[label] = measured
            return measured

        unpaced = {"url": main_url, "chats": args.chats, "rate": UNPACED_RATE}
        with simulator(args.chats, args.seed) as sim:
            run.memberships = sim.memberships
            measure("first sync", "sync", **unpaced, base_url=sim.base_url)
            measure("write floor", "write_floor", url=floor_url, source_url=main_url)
        # The changed re-sync and the steps it is compared with run against one simulator;
        # after the changed re-sync the database holds that world, so re-syncs are unchanged.
        with simulator(args.chats, args.seed, mutate=MUTATE_SHARE) as sim:
            measure("1%-changed re-sync", "sync", **unpaced, base_url=sim.base_url)
            for _ in range(args.repeat):
                # Alternating spreads the machine's other load over both alike.
                measure("unchanged re-sync", "sync", **unpaced, base_url=sim.base_url)
                measure("fetch floor", "fetch_floor", **unpaced, base_url=sim.base_url)
        small = f"first sync, {args.small_chats} chats"
        with simulator(args.small_chats, args.seed) as sim:
            measure(
                small,
                "sync",
                url=small_url,
                chats=args.small_chats,
                rate=UNPACED_RATE,
                base_url=sim.base_url,
            )
        paced_label = f"paced run, {args.paced_chats} chats"
        with simulator(args.paced_chats, args.seed, rate_limit=args.rate) as sim:
            measure(
                paced_label,
                "sync",
                url=paced_url,
                chats=args.paced_chats,
                rate=args.rate,
                base_url=sim.base_url,
            )
        run.paced_throttled = sim.throttled
    steps = run.steps
    paced = steps[paced_label]
    fetch_floor = steps["fetch floor"].wall
    unchanged = steps["unchanged re-sync"].wall
    run.ratios = {
        "paced": paced.data["api_calls"] / paced.wall / args.rate,
        "unchanged_vs_fetch": unchanged / fetch_floor,
        "first_vs_floors": steps["first sync"].wall / (fetch_floor + steps["write floor"].wall),
        "changed_vs_unchanged": steps["1%-changed re-sync"].wall / unchanged,
        "rss_growth": steps["first sync"].rss_mb / steps[small].rss_mb,
    }
    return run


def meets(name: str, value: float, run: DatabaseRun) -> bool:
    op, target = TARGETS[name]
    ok = value >= target if op == ">=" else value <= target
    if name == "paced":
        paced = next(m for label, m in run.steps.items() if label.startswith("paced"))
        ok = ok and paced.data["retries"] == 0 and run.paced_throttled == 0
    return ok


def report(run: DatabaseRun, args: argparse.Namespace) -> bool:
    print(
        f"\n== {run.kind}: {args.chats} chats, {run.memberships:,} memberships, "
        f"concurrency {args.concurrency} =="
    )
    print(f"{'step':<38}{'wall s':>9}{'chats/s':>10}{'member rows/s':>15}{'peak RSS MB':>13}")
    for m in run.steps.values():
        rows_per_s = m.member_rows / m.wall if m.wall else 0.0
        chats_per_s = m.chats / m.wall if m.wall else 0.0
        print(
            f"{m.label():<38}{m.wall:>9.2f}{chats_per_s:>10.1f}{rows_per_s:>15,.0f}{m.rss_mb:>13.1f}"
        )
    paced = next(m for label, m in run.steps.items() if label.startswith("paced"))
    print(
        f"paced run: {paced.data['api_calls']} calls in {paced.wall:.2f}s = "
        f"{paced.data['api_calls'] / paced.wall:.2f} calls/s at a limit of {args.rate:g}; "
        f"client retries {paced.data['retries']}, simulator throttled {run.paced_throttled}"
    )
    labels = {
        "paced": "paced calls/s / limit",
        "unchanged_vs_fetch": "unchanged re-sync / fetch floor",
        "first_vs_floors": "first sync / (fetch + write floor)",
        "changed_vs_unchanged": "1%-changed / unchanged re-sync",
        "rss_growth": f"peak RSS {args.chats} / {args.small_chats} chats",
    }
    all_ok = True
    for name, value in run.ratios.items():
        op, target = TARGETS[name]
        ok = meets(name, value, run)
        all_ok &= ok
        verdict = "ok" if ok else "MISSED"
        print(f"  {labels[name]:<40}{value:>6.2f}   target {op} {target:<5} {verdict}")
    return all_ok


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure sync throughput against the bundled simulator (see README).",
    )
    parser.add_argument("--chats", type=int, default=None, help="chats in the big world (2000)")
    parser.add_argument(
        "--small-chats", type=int, default=None, help="chats in the world compared for RSS (200)"
    )
    parser.add_argument(
        "--paced-chats", type=int, default=None, help="chats in the paced run (300)"
    )
    parser.add_argument("--rate", type=int, default=20, help="paced calls/s (default 20)")
    parser.add_argument("--concurrency", type=int, default=8, help="[sync] concurrency (8)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="world seed (2)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="runs of the unchanged re-sync and of the fetch floor, median taken (5)",
    )
    parser.add_argument(
        "--databases",
        default="sqlite,postgresql",
        help="comma-separated: sqlite, postgresql (default both)",
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
    sizes = (200, 40, 60) if args.quick else (2000, 200, 300)
    args.chats = args.chats or sizes[0]
    args.small_chats = args.small_chats or sizes[1]
    args.paced_chats = args.paced_chats or sizes[2]
    kinds = [k.strip() for k in args.databases.split(",") if k.strip()]
    unknown = set(kinds) - {"sqlite", "postgresql"}
    if unknown or not kinds:
        parser.error(f"--databases: unknown {', '.join(sorted(unknown)) or 'empty list'}")
    args.kinds = kinds
    return args


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--step":
        run_child_step(argv[1], argv[2])
        return 0
    args = parse_args(argv)
    return run_databases(
        args.kinds,
        prefix="dingtalk-etl-bench-",
        probe=(lambda: probe_postgresql(args.pg_url)) if "postgresql" in args.kinds else None,
        bench=lambda kind, workdir: bench_database(kind, args, workdir),
        report=lambda run: report(run, args),
        as_json=lambda run: {
            "database": run.kind,
            "memberships": run.memberships,
            "steps": {
                label: {**m.data, "wall": m.wall, "walls": m.walls, "rss_mb": m.rss_mb}
                for label, m in run.steps.items()
            },
            "ratios": run.ratios,
        },
        json_path=args.json,
    )


def probe_postgresql(admin_url: str) -> None:
    """``BenchError`` unless the PostgreSQL server at ``admin_url`` answers."""
    probe = spawn_step("probe", {"admin_url": admin_url})
    if probe.data["error"]:
        raise BenchError(
            f"PostgreSQL does not answer at {admin_url}: {probe.data['error']} "
            "(give --pg-url, or --databases sqlite)"
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
