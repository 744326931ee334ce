"""Scale benchmark: the command line and the reports on a year of history of 2,000 chats.

Boundary: a command-line tool on top of the product, like ``bench/throughput.py`` (whose
database helpers it reuses). It builds the history with ``bench/history.py`` (or takes an
existing one, ``--url``), writes a config file pointing at it, and runs each measured command
as a child process of its own, as a person or a cron job runs it: ``.venv/bin/dingtalk-etl``
(the console script of this checkout) for the product, ``python -c`` for the interpreter
baselines, ``psql``'s ``\\copy`` (``sqlite3 -csv`` on SQLite) for the database's own export of
the same rows. Wall time is the child's whole life, from ``Popen`` to ``os.wait4`` (interpreter
start and imports included: that is what the cold-start targets are about); peak RSS is the
child's ``ru_maxrss``, CPU its user + system time. The database server's own time and memory
are in neither. This parent imports nothing but the standard library (and ``throughput``,
which does the same): a child's peak RSS starts from what the parent held when it forked.

Measured, per database, after the product's modules are byte-compiled (as an installed package's
are) and one unmeasured warm-up of the short commands:

- ``python -c pass`` and ``python -c "import sqlalchemy"`` (this interpreter, the baselines),
  ``dingtalk-etl --help``, ``--version``, ``status``, ``runs --limit 5``: ``--repeat`` times
  each, in rounds, the median counts;
- ``report members --chat <the largest chat> --as-of <the history's middle day>``;
- ``report user --userid <the user with the most memberships>``;
- ``report changes`` for the calendar month of the middle day as CSV, JSON and HTML
  (``--output`` files), and the same rows by the database's own export to CSV;
- ``report chats`` and ``report sync-health`` (no target; shown for the record);
- with ``--render``: the HTML file in headless Chromium (``--dump-dom``), if installed.

The targets are those of issue 13's "Done when"; the table prints each figure, its target and
PASS or FAIL (SKIP: not checked here).

    .venv/bin/python bench/scale.py                        # full size, PostgreSQL (~10 min)
    .venv/bin/python bench/scale.py --databases postgresql,sqlite --render
    .venv/bin/python bench/scale.py --quick                # a small history: a smoke run
    .venv/bin/python bench/scale.py --url postgresql+psycopg://postgres@127.0.0.1/h  # reuse

Exit status: 0 when every figure meets its target, 1 when one misses (or on an error), 2 on
a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from throughput import (
    DEFAULT_PG_URL,
    BenchError,
    _die_with_parent,
    probe_postgresql,
    run_databases,
)
from throughput import spawn_step as spawn_throughput_step

REPO = Path(__file__).resolve().parent.parent
HISTORY = REPO / "bench" / "history.py"
MB = 1024 * 1024
STEP_TIMEOUT = 1800.0
BUILD_TIMEOUT = 7200.0
RENDER_TIMEOUT = 120.0
# A larger file is not opened: Chromium then takes minutes and gigabytes (a 126 MB audit file
# held 8 GB in its renderer for three minutes without finishing), on a machine shared with
# others. It fails the render figure: such a file is no readable audit anyway.
RENDER_MAX_BYTES = 32 * MB
REPORT_TIMEZONE = "Asia/Shanghai"

# Issue 13, "Done when".
HELP_MAX_S = 0.3
STARTUP_FACTOR = 2.0  # status and runs: within 2x `python -c "import sqlalchemy"`
AUDIT_MAX_S = 2.0  # the as-of members and user reports
EXPORT_RSS_MAX_MB = 150.0  # one month of changes as CSV or JSON
EXPORT_COPY_FACTOR, EXPORT_COPY_PLUS_S = 3.0, 1.0  # ... within 3x the \copy baseline + 1 s
HTML_RSS_MAX_MB = 200.0
HTML_MAX_BYTES = 5 * MB

QUICK = {"chats": 60, "members": 40, "days": 45, "users": 2000}


# --------------------------------------------------------------------------------------------
# Child steps: each runs in its own process, prints one JSON object as its last stdout line.


def _month_query(kind: str, since: str, until: str) -> str:
    """``etl.reports``' ``changes`` query, as SQL for the database's own export: the same
    rows (``_changes_query`` with a window and no other filter) in the same order."""
    return (
        "SELECT e.occurred_at, e.observed_at, e.chatid, c.name AS chat_name, e.event_type, "
        "e.userid, e.field, e.old_value, e.new_value, e.run_id, e.source, e.operator_userid "
        "FROM chat_events e LEFT JOIN chats c ON c.chatid = e.chatid "
        "WHERE e.event_type IN ('member_joined', 'member_left', 'attribute_changed') "
        f"AND NOT e.is_baseline AND e.occurred_at >= '{since}' AND e.occurred_at <= '{until}' "
        "ORDER BY e.occurred_at, e.id"
    )


def step_inspect(spec: dict[str, Any]) -> dict[str, Any]:
    """What the benchmark asks of the history: its span, a middle day and its month (in the
    report time zone), the largest chat, the busiest user, the row counts; writes the
    chatids file of the config."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    from sqlalchemy import func, select

    from etl.db import create_db_engine
    from etl.schema import (
        api_calls,
        chat_events,
        chat_members,
        chats,
        sync_run_items,
        sync_runs,
    )

    tz = ZoneInfo(spec["timezone"])
    engine = create_db_engine(spec["url"])
    try:
        with engine.connect() as conn:
            first, last, runs = conn.execute(
                select(
                    func.min(sync_runs.c.started_at),
                    func.max(sync_runs.c.started_at),
                    func.count(),
                )
            ).one()
            if not runs:
                raise BenchError("the database holds no sync runs: not a history")
            rows = {
                t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                for t in (chats, chat_members, chat_events, sync_runs, sync_run_items, api_calls)
            }
            count = func.count().label("n")
            busiest = conn.execute(
                select(chat_members.c.userid, count)
                .group_by(chat_members.c.userid)
                .order_by(count.desc(), chat_members.c.userid)
                .limit(1)
            ).one()
            largest = conn.execute(
                select(chats.c.chatid, chats.c.member_count)
                .where(chats.c.first_seen_at < first + dt.timedelta(days=1), chats.c.status == 1)
                .order_by(chats.c.member_count.desc(), chats.c.chatid)
                .limit(1)
            ).one()
            chatids = conn.execute(select(chats.c.chatid).order_by(chats.c.chatid)).scalars()
            Path(spec["chatids_file"]).write_text("".join(f"{c}\n" for c in chatids))
    finally:
        engine.dispose()
    middle = (first + (last - first) / 2).astimezone(tz)
    month_start = middle.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (month_start + dt.timedelta(days=32)).replace(day=1)
    since_utc = month_start.astimezone(dt.UTC)
    until_utc = following.astimezone(dt.UTC) - dt.timedelta(microseconds=1)
    if spec["kind"] == "postgresql":
        since, until = (t.isoformat(" ") for t in (since_utc, until_utc))
    else:  # naive UTC text, as etl.schema.UTCDateTime stores it on SQLite
        since, until = (
            t.replace(tzinfo=None).isoformat(" ", "microseconds") for t in (since_utc, until_utc)
        )
    return {
        "first_run": first.isoformat(),
        "last_run": last.isoformat(),
        "rows": rows,
        "busiest_userid": busiest.userid,
        "busiest_memberships": busiest.n,
        "largest_chatid": largest.chatid,
        "largest_members": largest.member_count,
        "middle_day": middle.date().isoformat(),
        "month": month_start.strftime("%Y-%m"),
        "month_query": _month_query(spec["kind"], since, until),
    }


STEPS = {"inspect": step_inspect}


# --------------------------------------------------------------------------------------------
# Processes


@dataclass
class Run:
    """One child process: its exit status, wall time, peak RSS and CPU time."""

    exit: int
    wall: float
    rss_mb: float
    cpu: float
    timed_out: bool = False


def run_process(
    cmd: list[str],
    *,
    stdout: Path,
    stderr: Path | None,
    timeout: float = STEP_TIMEOUT,
    env: dict[str, str] | None = None,
    die_with_parent: bool = False,
    own_group: bool = False,
) -> Run:
    """Run ``cmd`` to its end; wall from ``Popen`` to ``wait4``, killed after ``timeout``
    (with ``own_group``: in a process group of its own, killed as a group, helpers and
    all)."""
    timed_out = threading.Event()
    with contextlib.ExitStack() as files:
        out = files.enter_context(stdout.open("wb"))
        err = files.enter_context(stderr.open("ab")) if stderr is not None else None
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            preexec_fn=_die_with_parent if die_with_parent else None,
            start_new_session=own_group,
        )

    def kill() -> None:
        timed_out.set()
        if own_group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        timer.cancel()
        if own_group:  # whatever it left behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux.
    return Run(
        exit=proc.returncode,
        wall=wall,
        rss_mb=rusage.ru_maxrss / 1024,
        cpu=rusage.ru_utime + rusage.ru_stime,
        timed_out=timed_out.is_set(),
    )


def spawn_step(name: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One of this script's child steps; its result."""
    out = workdir / f"step-{name}.out"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, json.dumps(spec)]
    run = run_process(cmd, stdout=out, stderr=None)
    lines = out.read_text().strip().splitlines()
    if run.exit != 0 or not lines:
        raise BenchError(f"step {name} failed (exit {run.exit})")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "dingtalk-etl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "etl"]


def clean_environ() -> dict[str, str]:
    """The environment without the product's overrides (``DINGTALK_ETL_DATABASE_URL`` would
    win over the config file)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DINGTALK_")}


def compile_product() -> None:
    """Byte-compile the product's modules, as ``pip install`` does for an installed package.
    This checkout's editable install compiles them when first imported, but not when
    ``PYTHONDONTWRITEBYTECODE`` is set: each command would then compile them again (40 ms of
    a 0.3 s ``status``), and SQLAlchemy, which the baseline imports, is compiled already."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "etl")], check=True)


def checkout_state() -> str:
    """The commit measured, and whether files were changed since (others may be editing)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return f"{head}" + (f" + {len(changed)} changed file(s)" if changed else "")


def find_chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


# --------------------------------------------------------------------------------------------
# Outputs: rows counted as they are read (constant memory in this parent)


def csv_rows(path: Path) -> int:
    with path.open(newline="", encoding="utf-8") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def json_array_rows(path: Path) -> int | None:
    """Elements of the JSON array in ``path``, decoded one at a time from a window of the
    file (memory does not grow with its size); None if it is not one valid array."""
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"[ \t\n\r]*")
    chunk = 1 << 20
    with path.open(encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def fill(force: bool = False) -> None:
            nonlocal buf, pos, eof
            while not eof and (force or len(buf) - pos < chunk // 2):
                more = f.read(chunk)
                eof, buf, pos, force = not more, buf[pos:] + more, 0, False

        def skip() -> None:
            nonlocal pos
            while True:
                match = whitespace.match(buf, pos)
                pos = match.end() if match else pos
                if pos < len(buf) or eof:
                    return
                fill(force=True)

        fill()
        skip()
        if buf[pos : pos + 1] != "[":
            return None
        pos += 1
        count = 0
        while True:
            fill()
            skip()
            if pos >= len(buf):
                return None
            if buf[pos] == "]":
                pos += 1
                skip()
                return count if pos >= len(buf) else None
            if count:
                if buf[pos] != ",":
                    return None
                pos += 1
                fill()
                skip()
            while True:
                try:
                    _, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError:
                    if eof:
                        return None
                    fill(force=True)
            count += 1
            pos = end


def count_in_file(path: Path, needle: bytes) -> int:
    total, tail = 0, b""
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            data = tail + block
            total += data.count(needle)
            tail = data[-(len(needle) - 1) :] if len(needle) > 1 else b""
            total -= tail.count(needle)
    return total


# --------------------------------------------------------------------------------------------
# Figures


@dataclass
class Figure:
    name: str
    label: str
    value: str
    target: str
    ok: bool | None  # None: not checked (SKIP)


def figures(steps: dict[str, dict[str, Any]], render: dict[str, Any] | None) -> list[Figure]:
    """Each figure of the issue's "Done when" list, from the steps' measurements."""
    out: list[Figure] = []

    def failed(name: str) -> str | None:
        step = steps.get(name)
        if step is None:
            return "not run"
        if step.get("timed_out"):
            return "timed out"
        return f"exit {step['exit']}" if step["exit"] != 0 else None

    def limit(name: str, label: str, metric: str, bound: float, target: str) -> None:
        problem = failed(name)
        if problem is not None:
            out.append(Figure(name, label, problem, target, False))
            return
        value = steps[name][metric]
        unit = " s" if metric == "wall" else " MB"
        out.append(Figure(name, label, f"{value:.2f}{unit}", target, value <= bound))

    for name, label in (("help", "--help"), ("version", "--version")):
        limit(name, f"{label} wall", "wall", HELP_MAX_S, f"<= {HELP_MAX_S:g} s")
    base = steps["import_sqlalchemy"]["wall"]
    for name, label in (("status", "status"), ("runs", "runs --limit 5")):
        bound = STARTUP_FACTOR * base
        limit(name, f"{label} wall", "wall", bound, f"<= 2 x import sqlalchemy = {bound:.2f} s")
    limit("members_as_of", "report members --as-of wall", "wall", AUDIT_MAX_S, "<= 2 s")
    limit("user", "report user wall", "wall", AUDIT_MAX_S, "<= 2 s")
    copy_wall = steps["copy_baseline"]["wall"]
    export_bound = EXPORT_COPY_FACTOR * copy_wall + EXPORT_COPY_PLUS_S
    for fmt in ("csv", "json"):
        name = f"changes_{fmt}"
        before = len(out)
        limit(name, f"month of changes, {fmt.upper()}: peak RSS", "rss_mb", 150.0, "<= 150 MB")
        limit(
            name,
            f"month of changes, {fmt.upper()}: wall",
            "wall",
            export_bound,
            f"<= 3 x copy + 1 s = {export_bound:.2f} s",
        )
        out[before].name, out[before + 1].name = f"{name}_rss", f"{name}_wall"
    before = len(out)
    limit(
        "changes_html", "month of changes, HTML: peak RSS", "rss_mb", HTML_RSS_MAX_MB, "<= 200 MB"
    )
    out[before].name = "changes_html_rss"
    html = steps.get("changes_html", {})
    size = html.get("bytes")
    if failed("changes_html") is None and size is not None:
        out.append(
            Figure(
                "changes_html_size",
                "month of changes, HTML: file size",
                f"{size / MB:.2f} MB",
                "<= 5 MB",
                size <= HTML_MAX_BYTES,
            )
        )
    else:
        out.append(
            Figure(
                "changes_html_size",
                "month of changes, HTML: file size",
                failed("changes_html") or "no file",
                "<= 5 MB",
                False,
            )
        )
    if render is not None:
        if render.get("skipped"):
            out.append(
                Figure(
                    "changes_html_renders",
                    "HTML renders in headless Chromium",
                    "not checked",
                    f"renders ({render['skipped']})",
                    None,
                )
            )
        else:
            out.append(
                Figure(
                    "changes_html_renders",
                    "HTML renders in headless Chromium",
                    f"{'yes' if render['ok'] else 'NO'} ({render['detail']})",
                    "renders",
                    bool(render["ok"]),
                )
            )
    counts = [
        steps.get(n, {}).get("rows") for n in ("changes_csv", "changes_json", "copy_baseline")
    ]
    shown = " / ".join("?" if c is None else f"{c:,}" for c in counts)
    same = None not in counts and len(set(counts)) == 1 and bool(counts[0])
    out.append(Figure("rows_match", "rows: CSV / JSON / copy", shown, "equal, > 0", same))
    return out


# --------------------------------------------------------------------------------------------
# One database


@dataclass
class DatabaseRun:
    kind: str
    url: str
    history: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    render: dict[str, Any] | None = None
    figures: list[Figure] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    checkout: str = ""


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def write_config(folder: Path, url: str, timezone: str) -> Path:
    """A deployed job's config: credentials (never used here: no command measured calls
    DingTalk), the chatids in a file, the daily schedule the history was made with."""
    config = folder / "config.toml"
    config.write_text(
        "[dingtalk]\n"
        'base_url = "http://127.0.0.1:9"\n'
        'app_key = "bench-key"\n'
        'app_secret = "bench-secret"\n\n'
        "[database]\n"
        f"url = {json.dumps(url)}\n\n"
        "[sync]\n"
        'chatids_file = "chatids.txt"\n\n'
        "[schedule]\n"
        'cron = "10 2 * * *"\n\n'
        "[report]\n"
        f"timezone = {json.dumps(timezone)}\n"
    )
    return config


def copy_command(kind: str, url: str, query: str, target: Path) -> tuple[list[str], Path, str]:
    """The database's own export of the month's rows to a CSV file: (command, its stdout
    file, label)."""
    if kind == "postgresql":
        parts = urlsplit(url)
        cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        cmd += ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432)]
        cmd += ["-U", unquote(parts.username or "postgres"), "-d", parts.path.lstrip("/")]
        cmd += ["-c", f"\\copy ({query}) TO '{target}' WITH (FORMAT csv, HEADER)"]
        return cmd, target.with_suffix(".psql.out"), "psql \\copy (the same query) to CSV"
    database = url.split("///", 1)[1]
    if shutil.which("sqlite3"):
        return (
            ["sqlite3", "-bail", "-readonly", "-csv", "-header", database, query],
            target,
            "sqlite3 -csv (the same query) to a file",
        )
    script = (
        "import csv, sqlite3, sys\n"
        f"c = sqlite3.connect({database!r})\n"
        f"cur = c.execute({query!r})\n"
        "w = csv.writer(sys.stdout)\n"
        "w.writerow([d[0] for d in cur.description])\n"
        "w.writerows(cur)\n"
    )
    return [sys.executable, "-c", script], target, "python sqlite3 + csv (the same query)"


def bench_database(kind: str, url: str, args: argparse.Namespace, workdir: Path) -> DatabaseRun:
    run = DatabaseRun(kind, url, checkout=checkout_state())
    run.load.append(os.getloadavg()[0])
    folder = workdir / kind
    folder.mkdir()
    log = folder / "stderr.log"
    if not args.url:
        sizes = ", ".join(
            f"--{option} {getattr(args, option)}"
            for option in ("chats", "members", "days", "churn", "users", "seed")
            if getattr(args, option) is not None
        )
        say(f"{kind}: building the history ({sizes or 'full size'}) ...")
        summary = folder / "history.json"
        cmd = [sys.executable, str(HISTORY), "--url", url, "--json", str(summary)]
        for option in ("chats", "members", "days", "churn", "users", "seed"):
            value = getattr(args, option)
            if value is not None:
                cmd += [f"--{option}", str(value)]
        built = run_process(
            cmd,
            stdout=folder / "history.out",
            stderr=None,
            timeout=BUILD_TIMEOUT,
            die_with_parent=True,
        )
        if built.exit != 0:
            raise BenchError(f"bench/history.py failed (exit {built.exit})")
        run.history = json.loads(summary.read_text())
        run.build = {"wall": built.wall, "rss_mb": built.rss_mb, "cpu": built.cpu}
    say(f"{kind}: inspecting the history ...")
    run.info = spawn_step(
        "inspect",
        {
            "url": url,
            "kind": kind,
            "timezone": args.timezone,
            "chatids_file": str(folder / "chatids.txt"),
        },
        workdir,
    )
    info = run.info
    config = write_config(folder, url, args.timezone)
    cli = [*cli_command(), "--config", str(config)]
    env = clean_environ()
    month = info["month"]
    out = folder / "out"
    out.mkdir()

    def measure(name: str, label: str, cmd: list[str], *, output: Path | None = None) -> Run:
        stdout = out / f"{name}.stdout"
        result = run_process(cmd, stdout=stdout, stderr=log, env=env)
        step = run.steps.setdefault(name, {"walls": [], "rss": [], "cpus": []})
        step["walls"].append(result.wall)
        step["rss"].append(result.rss_mb)
        step["cpus"].append(result.cpu)
        step.update(
            wall=statistics.median(step["walls"]),
            rss_mb=statistics.median(step["rss"]),
            cpu=statistics.median(step["cpus"]),
            exit=result.exit if step.get("exit", 0) == 0 else step["exit"],
            timed_out=result.timed_out or step.get("timed_out", False),
        )
        produced = output if output is not None else stdout
        if produced.exists():
            step["bytes"] = produced.stat().st_size
        run.labels[name] = label
        if result.exit != 0:
            say(f"  {label}: exit {result.exit} (see the end of {log.name} below)")
            say("  " + " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:]))
        return result

    quick_steps = [
        ("python_pass", "python -c pass", [sys.executable, "-c", "pass"]),
        (
            "import_sqlalchemy",
            'python -c "import sqlalchemy"',
            [sys.executable, "-c", "import sqlalchemy"],
        ),
        ("help", "dingtalk-etl --help", [*cli_command(), "--help"]),
        ("version", "dingtalk-etl --version", [*cli_command(), "--version"]),
        ("status", "dingtalk-etl status", [*cli, "status"]),
        ("runs", "dingtalk-etl runs --limit 5", [*cli, "runs", "--limit", "5"]),
    ]
    say(f"{kind}: short commands, {args.repeat} rounds after a warm-up ...")
    compile_product()
    for _, _, cmd in quick_steps:
        run_process(cmd, stdout=out / "warmup.stdout", stderr=log, env=env)
    for _ in range(args.repeat):
        for name, label, cmd in quick_steps:
            measure(name, label, cmd)

    reports: list[tuple[str, str, list[str], Path | None]] = []
    members_file = out / "members.txt"
    reports.append(
        (
            "members_as_of",
            f"report members --chat <largest> --as-of {info['middle_day']}",
            [
                *cli,
                "report",
                "members",
                "--chat",
                info["largest_chatid"],
                "--as-of",
                info["middle_day"],
                "--output",
                str(members_file),
            ],
            members_file,
        )
    )
    user_file = out / "user.txt"
    reports.append(
        (
            "user",
            "report user --userid <busiest>",
            [
                *cli,
                "report",
                "user",
                "--userid",
                info["busiest_userid"],
                "--output",
                str(user_file),
            ],
            user_file,
        )
    )
    copy_file = out / "copy.csv"
    copy_cmd, copy_stdout, copy_label = copy_command(kind, url, info["month_query"], copy_file)
    window = ["--since", month, "--until", month]
    for fmt in ("csv", "json", "html"):
        target = out / f"changes.{fmt}"
        reports.append(
            (
                f"changes_{fmt}",
                f"report changes --since {month} --until {month} --format {fmt}",
                [*cli, "report", "changes", *window, "--format", fmt, "--output", str(target)],
                target,
            )
        )
    for name, what in (("chats", "chats"), ("sync_health", "sync-health")):
        target = out / f"{name}.txt"
        reports.append(
            (name, f"report {what}", [*cli, "report", what, "--output", str(target)], target)
        )
    for name, label, cmd, output in reports:
        if name == "changes_csv":
            say(f"{kind}: {copy_label} ...")
            result = run_process(copy_cmd, stdout=copy_stdout, stderr=log, env=env)
            run.steps["copy_baseline"] = {
                "wall": result.wall,
                "rss_mb": result.rss_mb,
                "cpu": result.cpu,
                "exit": result.exit,
                "timed_out": result.timed_out,
            }
            run.labels["copy_baseline"] = copy_label
            if result.exit == 0:
                run.steps["copy_baseline"]["bytes"] = copy_file.stat().st_size
                run.steps["copy_baseline"]["rows"] = csv_rows(copy_file)
        say(f"{kind}: {label} ...")
        measure(name, label, cmd, output=output)

    for fmt, count in (("csv", csv_rows), ("json", json_array_rows)):
        step, target = run.steps[f"changes_{fmt}"], out / f"changes.{fmt}"
        if step["exit"] == 0 and target.exists():
            step["rows"] = count(target)
    html = out / "changes.html"
    if run.steps["changes_html"]["exit"] == 0 and html.exists():
        run.steps["changes_html"]["table_rows"] = count_in_file(html, b"<tr")
    if args.render:
        run.render = render_html(html, folder)
    run.load.append(os.getloadavg()[0])
    run.figures = figures(run.steps, run.render)
    return run


def render_html(html: Path, folder: Path) -> dict[str, Any]:
    browser = find_chromium()
    if browser is None:
        return {"skipped": "no chromium installed"}
    if not html.exists():
        return {"ok": False, "detail": "no HTML file", "wall": 0.0}
    size = html.stat().st_size
    if size > RENDER_MAX_BYTES:
        return {"ok": False, "detail": f"not opened: over {RENDER_MAX_BYTES // MB} MB", "wall": 0.0}
    dom = folder / "dom.html"
    # Its profile, caches and crash reports in the benchmark's folder, removed with it.
    home = folder / "chromium-home"
    home.mkdir()
    env = {**clean_environ(), "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    cmd += [f"--user-data-dir={home / 'profile'}", "--disable-crash-reporter", "--no-first-run"]
    cmd += ["--virtual-time-budget=10000", "--dump-dom", html.resolve().as_uri()]
    result = run_process(
        cmd,
        stdout=dom,
        stderr=folder / "chromium.log",
        timeout=RENDER_TIMEOUT,
        env=env,
        own_group=True,
    )
    size = dom.stat().st_size if dom.exists() else 0
    text = dom.read_bytes()[:200_000] if size else b""
    ok = result.exit == 0 and not result.timed_out and b"<body" in text and size > 1000
    detail = "timed out" if result.timed_out else f"exit {result.exit}, DOM {size / MB:.1f} MB"
    return {"ok": ok, "detail": detail, "wall": result.wall, "rss_mb": result.rss_mb}


# --------------------------------------------------------------------------------------------
# The report


def report(run: DatabaseRun, args: argparse.Namespace) -> bool:
    info, rows = run.info, run.info["rows"]
    print(
        f"\n== {run.kind}: {rows['chats']:,} chats, {rows['sync_runs']:,} daily runs "
        f"({info['first_run'][:10]} .. {info['last_run'][:10]}): {rows['chat_events']:,} "
        f"chat_events, {rows['chat_members']:,} chat_members, {rows['sync_run_items']:,} "
        "sync_run_items =="
    )
    if run.build:
        timings = ", ".join(
            f"{k[:-2].replace('_', ' ')} {v:.0f} s" for k, v in run.history["timings"].items()
        )
        print(
            f"history built by bench/history.py in {run.build['wall']:.0f} s ({timings}), "
            f"peak RSS {run.build['rss_mb']:.0f} MB"
        )
    else:
        print(f"history: {args.url} (given, not built here)")
    print(
        f"largest chat {info['largest_chatid']} ({info['largest_members']:,} members); busiest "
        f"user {info['busiest_userid']} ({info['busiest_memberships']:,} memberships); month "
        f"{info['month']}, as-of day {info['middle_day']} ({args.timezone})"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, load average (1 min) {run.load[0]:.2f} at the start, "
        f"{run.load[-1]:.2f} at the end; checkout {run.checkout}"
    )
    print(f"\n{'step':<62}{'wall s':>8}{'CPU s':>8}{'peak RSS MB':>13}{'exit':>6}  output")
    for name, step in run.steps.items():
        label = run.labels.get(name, name)
        if len(step.get("walls", [])) > 1:
            label += f" (median of {len(step['walls'])})"
        output = []
        if "rows" in step:
            output.append("?" if step["rows"] is None else f"{step['rows']:,} rows")
        if step.get("bytes") and name not in ("python_pass", "import_sqlalchemy"):
            size = step["bytes"]
            output.append(f"{size / MB:.2f} MB" if size >= MB // 10 else f"{size / 1024:.1f} KiB")
        if "table_rows" in step:
            output.append(f"{step['table_rows']:,} <tr>")
        exit_text = "kill" if step.get("timed_out") else str(step["exit"])
        print(
            f"{label[:61]:<62}{step['wall']:>8.2f}{step['cpu']:>8.2f}{step['rss_mb']:>13.1f}"
            f"{exit_text:>6}  {', '.join(output)}"
        )
    print(f"\n{'figure':<42}{'value':>28}   {'target':<38}")
    all_ok = True
    for figure in run.figures:
        verdict = "SKIP" if figure.ok is None else ("PASS" if figure.ok else "FAIL")
        all_ok &= figure.ok is not False
        print(f"  {figure.label:<40}{figure.value:>28}   {figure.target:<38}{verdict}")
    return all_ok


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the CLI and the reports on a large history (see bench/README.md).",
    )
    parser.add_argument(
        "--databases",
        default="postgresql",
        help="comma-separated: postgresql, sqlite (default postgresql)",
    )
    parser.add_argument(
        "--url",
        help="measure this existing history (not built, not dropped) instead of building one",
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("DINGTALK_ETL_BENCH_PG", DEFAULT_PG_URL),
        help="PostgreSQL admin URL; a dedicated database is created and dropped "
        "(default $DINGTALK_ETL_BENCH_PG or %(default)s)",
    )
    for option, what in (
        ("chats", "chats"),
        ("members", "mean members per chat"),
        ("days", "days of history"),
        ("users", "users"),
        ("seed", "seed"),
    ):
        parser.add_argument(f"--{option}", type=int, help=f"history: {what} (history.py's default)")
    parser.add_argument("--churn", type=float, help="history: daily churn (history.py's default)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each short command (%(default)s)"
    )
    parser.add_argument(
        "--timezone",
        default=REPORT_TIMEZONE,
        help="[report] timezone of the config (%(default)s): the month's bounds",
    )
    parser.add_argument(
        "--render", action="store_true", help="also render the HTML in headless Chromium"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the databases built here (print their URLs)"
    )
    parser.add_argument("--quick", action="store_true", help="a small history: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        for option, value in QUICK.items():
            if getattr(args, option) is None:
                setattr(args, option, value)
    if args.url:
        scheme = args.url.split(":", 1)[0].split("+", 1)[0]
        if scheme not in ("postgresql", "sqlite"):
            parser.error("--url: a postgresql:// or sqlite:/// URL")
        args.kinds = [scheme]
    else:
        args.kinds = [k.strip() for k in args.databases.split(",") if k.strip()]
        unknown = set(args.kinds) - {"sqlite", "postgresql"}
        if unknown or not args.kinds:
            parser.error(f"--databases: unknown {', '.join(sorted(unknown)) or 'empty list'}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


@contextlib.contextmanager
def database_url(kind: str, args: argparse.Namespace, workdir: Path) -> Iterator[str]:
    """Where the history is: ``--url``, or a database made here (dropped after)."""
    if args.url:
        yield args.url
        return
    if kind == "sqlite":
        folder = workdir if not args.keep else Path(tempfile.mkdtemp(prefix="dingtalk-etl-scale-"))
        url = f"sqlite:///{folder / 'history.db'}"
        yield url
        if args.keep:
            say(f"kept: {url}")
        return
    name = f"dingtalk_etl_bench_{os.getpid()}_scale"
    url = f"{args.pg_url.rsplit('/', 1)[0]}/{name}"
    try:
        yield url
    finally:
        if args.keep:
            say(f"kept: {url}")
        else:
            spawn_throughput_step("dropdb", {"admin_url": args.pg_url, "names": [name]})


def main(argv: list[str]) -> int:
    if argv[:1] == ["--step"] and len(argv) >= 3:
        sys.path.insert(0, str(REPO))
        result = STEPS[argv[1]](json.loads(argv[2]))
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    args = parse_args(argv)

    def bench(kind: str, workdir: Path) -> DatabaseRun:
        with database_url(kind, args, workdir) as url:
            return bench_database(kind, url, args, workdir)

    needs_server = "postgresql" in args.kinds and not args.url
    return run_databases(
        args.kinds,
        prefix="dingtalk-etl-bench-scale-",
        probe=(lambda: probe_postgresql(args.pg_url)) if needs_server else None,
        bench=bench,
        report=lambda run: report(run, args),
        as_json=lambda run: {
            "database": run.kind,
            "history": run.history,
            "build": run.build,
            "info": {k: v for k, v in run.info.items() if k != "month_query"},
            "month_query": run.info["month_query"],
            "steps": {
                name: {**step, "label": run.labels.get(name, name)}
                for name, step in run.steps.items()
            },
            "render": run.render,
            "figures": [vars(f) for f in run.figures],
            "load": run.load,
            "checkout": run.checkout,
        },
        json_path=args.json,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
