"""Reports on a large history (tests/history.py: 46,080 changes of 200 chats over 24 days), on
each database: `report changes` streams its rows with memory that does not grow with their
number, fails cleanly when the database goes away mid-stream, and as HTML summarises instead
of listing every change."""

from __future__ import annotations

import csv
import datetime as dt
import html
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from etl import reports
from etl.cli import cli
from etl.db import create_db_engine
from tests.conftest import DATABASES
from tests.helpers import ADMIN_URLS, clean_env, fresh_database, migrated, wait_for
from tests.history import BUSY_FACTOR, History, build_history, chatid
from tests.test_report_html import console_messages, figures, headless

HISTORY = {"chats": 200, "days": 25, "per_day": 8, "busy": 20}
# Runs are at 18:15 UTC: day N's run is on 2026-01-(N+1) in UTC.
SMALL = ("--since", "2026-01-02", "--until", "2026-01-04")  # days 1-3: 5,760 changes
LARGE = ("--since", "2026-01-02")  # days 1-24: 46,080 changes, 8 times as many
# Peak memory may grow this much from the small window to the large one. Collecting the rows
# first, as `report changes` did before it streamed, costs about 1.4 KB per row: some 55 MB
# more for the large window (measured on this history: +72 MB for 52,000 more rows).
GROWTH_MB = 10
# The bounds for a month of 360,000 changes, which this smaller history must meet too.
PEAK_MB = {"csv": 150, "json": 150, "table": 150, "html": 200}
HTML_MAX_BYTES = 5_000_000


@dataclass(frozen=True)
class Big:
    kind: str
    history: History
    config: Path


@pytest.fixture(scope="module", params=DATABASES, ids=DATABASES)
def big(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Big:
    """The large history, built once per module and database."""
    kind = str(request.param)
    folder = tmp_path_factory.mktemp(f"history-{kind}")
    url = migrated(fresh_database(kind, folder, suffix="_history"))
    history = build_history(url, **HISTORY)
    config = folder / "config.toml"
    config.write_text(
        f'[database]\nurl = "{url.render_as_string(hide_password=False)}"\n'
        '[logging]\nlevel = "ERROR"\n',
        encoding="utf-8",
    )
    return Big(kind, history, config)


@dataclass(frozen=True)
class Run:
    code: int
    stderr: str
    peak_mb: float


def command(big: Big, *args: str) -> list[str]:
    return [sys.executable, "-m", "etl", "--config", str(big.config), *args]


# Starts the command given as its arguments and prints the exit code and peak RSS (KB) of
# that command only. The peak RSS of a process counts what it held before exec, and a
# child forked from this test process starts as big as it: a small launcher forks instead.
LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
child.returncode = os.waitstatus_to_exitcode(status)
print(child.returncode, usage.ru_maxrss)
"""


def run_measured(big: Big, *args: str, cwd: Path) -> Run:
    """Run the command line in a child and return its exit code, stderr and peak memory."""
    errors = cwd / "stderr.txt"
    with errors.open("wb") as stderr:
        launched = subprocess.run(
            [sys.executable, "-c", LAUNCHER, *command(big, *args)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=clean_env(),
            cwd=cwd,
            check=True,
            timeout=110,
        )
    code, peak_kb = launched.stdout.split()[-2:]
    return Run(int(code), errors.read_text(encoding="utf-8"), int(peak_kb) / 1024)


def rows_written(path: Path, fmt: str) -> int:
    """The number of changes in a report file."""
    with path.open(encoding="utf-8", newline="") as handle:
        if fmt == "csv":
            return sum(1 for _ in csv.reader(handle)) - 1
        if fmt == "json":
            parsed = json.load(handle)
            assert isinstance(parsed, list)
            return len(parsed)
        if fmt == "table":
            lines = handle.read().splitlines()
            rule = next(i for i, line in enumerate(lines) if line.startswith("----"))
            return sum(1 for line in lines[rule + 1 :] if not line.startswith("note: "))
    page = path.read_text(encoding="utf-8")
    found = re.search(r"([\d,]+) changes in this window", page)
    assert found is not None
    return int(found[1].replace(",", ""))


@pytest.mark.parametrize("fmt", ["csv", "json", "table", "html"])
def test_memory_does_not_grow_with_the_rows_of_a_report(big: Big, fmt: str, tmp_path: Path) -> None:
    """Streaming, shown by memory: the same command on the same database, for a window with
    8 times as many changes, must not take more than ``GROWTH_MB`` more peak memory.

    Measured on the real command in a child process (peak RSS from ``wait4``, see
    ``LAUNCHER``), so that the driver's buffers count too (a driver that buffered the whole
    result would show here, and tracemalloc does not see memory allocated by C code such as
    psycopg's). Both windows read the same database, so they differ only in the rows written.
    The HTML audit of either window is a summary (both hold more than ``AUDIT_LIST_LIMIT``
    changes): its memory does not grow either.
    """
    few = run_measured(
        big, "report", "changes", *SMALL, "--format", fmt, "--output", f"few.{fmt}", cwd=tmp_path
    )
    many = run_measured(
        big, "report", "changes", *LARGE, "--format", fmt, "--output", f"many.{fmt}", cwd=tmp_path
    )

    assert (few.code, many.code) == (0, 0), few.stderr + many.stderr
    assert rows_written(tmp_path / f"few.{fmt}", fmt) == big.history.changes_between(1, 3)
    assert rows_written(tmp_path / f"many.{fmt}", fmt) == big.history.changes
    growth = many.peak_mb - few.peak_mb
    assert growth < GROWTH_MB, f"{few.peak_mb:.1f} MB -> {many.peak_mb:.1f} MB"
    assert many.peak_mb < PEAK_MB[fmt]
    if fmt == "html":
        assert (tmp_path / "many.html").stat().st_size < HTML_MAX_BYTES


# -- a database lost mid-stream ------------------------------------------------------------------

SERVERS = ["postgresql", "mariadb"]  # SQLite has no server to lose


def cut_off(big: Big) -> int:
    """End every session on the history's database, as a server restart would; how many."""
    database = big.history.url.database
    admin = create_engine(ADMIN_URLS[big.kind], isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if big.kind == "postgresql":
                ended = conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :n AND pid <> pg_backend_pid()"
                    ),
                    {"n": database},
                ).scalars()
                return sum(1 for done in ended if done)
            sessions = conn.execute(
                text(
                    "SELECT id FROM information_schema.processlist "
                    "WHERE db = :n AND id <> CONNECTION_ID()"
                ),
                {"n": database},
            ).scalars()
            killed = 0
            for session in sessions.all():
                conn.execute(text(f"KILL {int(session)}"))
                killed += 1
            return killed
    finally:
        admin.dispose()


# How each driver words a session ended by the server (PostgreSQL's notice may or may not
# arrive before the socket closes).
LOST = {
    "postgresql": ("terminating connection", "server closed the connection"),
    "mariadb": ("Lost connection to MySQL server during query",),
}


def started_file(folder: Path) -> bool:
    """A temporary report file holds its first rows."""
    for candidate in folder.glob(".changes.csv.*.tmp"):
        try:
            if candidate.stat().st_size > 0:
                return True
        except FileNotFoundError:  # renamed or removed meanwhile
            pass
    return False


@pytest.mark.parametrize("big", SERVERS, indirect=True)
def test_a_database_lost_mid_stream_leaves_the_output_file_as_it_was(
    big: Big, tmp_path: Path
) -> None:
    target = tmp_path / "changes.csv"
    target.write_text("the previous report\n", encoding="utf-8")
    with subprocess.Popen(
        command(big, "report", "changes", "--format", "csv", "--output", str(target)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    ) as child:
        try:
            wait_for(
                "the report's first rows in its temporary file", lambda: started_file(tmp_path)
            )
            # Held still while its session is ended: the stream is cut halfway for certain.
            os.kill(child.pid, signal.SIGSTOP)
            try:
                assert cut_off(big) >= 1
            finally:
                os.kill(child.pid, signal.SIGCONT)
            stdout, stderr = child.communicate(timeout=60)
        finally:
            child.kill()

    assert child.returncode == 3, stderr
    message = stderr.decode()
    assert message.startswith("dingtalk-etl: error: database error while reading changes: ")
    assert any(reason in message for reason in LOST[big.kind]), message
    assert message.count("\n") == 1  # one line, no traceback
    assert stdout == b""
    assert target.read_text(encoding="utf-8") == "the previous report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changes.csv"]


@pytest.mark.parametrize("big", SERVERS, indirect=True)
def test_a_report_on_stdout_starts_at_once_and_a_lost_database_ends_it_with_exit_3(
    big: Big,
) -> None:
    with subprocess.Popen(
        command(big, "report", "changes", "--format", "csv"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    ) as child:
        try:
            assert child.stdout is not None
            # The first rows arrive while the child, its pipe full, waits for this reader.
            first = child.stdout.read(64 * 1024)
            assert first.startswith(b"occurred_at,observed_at,chatid,chat_name,change,")
            assert cut_off(big) >= 1
            rest, stderr = child.communicate(timeout=60)
        finally:
            child.kill()

    assert child.returncode == 3, stderr
    message = stderr.decode()
    assert message.startswith("dingtalk-etl: error: database error while reading changes: ")
    assert any(reason in message for reason in LOST[big.kind]), message
    assert message.count("\n") == 1  # one line, no traceback
    written = (first + rest).decode().count("\r\n") - 1
    assert 0 < written < big.history.changes


@pytest.mark.parametrize("big", ["sqlite"], indirect=True)
def test_a_reader_that_stops_early_ends_the_report_without_a_traceback(big: Big) -> None:
    with subprocess.Popen(
        command(big, "report", "changes", "--format", "csv"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    ) as child:
        assert child.stdout is not None
        assert child.stderr is not None
        assert child.stdout.read(100).startswith(b"occurred_at,")
        child.stdout.close()  # as `| head` does
        stderr = child.stderr.read()
        child.wait(timeout=60)

    assert child.returncode == 3
    assert stderr.decode() == (
        "dingtalk-etl: error: stdout was closed before the report was written whole\n"
    )


# -- the HTML audit above its limit ----------------------------------------------------------------


def section(page: str, anchor: str) -> str:
    return page.split(f'<section id="{anchor}">', 1)[1].split("</section>", 1)[0]


def body_rows(part: str) -> list[str]:
    """The rows of a table, without its header row."""
    return re.findall(r"<tr[^>]*>(<td.*?)</tr>", part)


def cells(row: str) -> list[str]:
    return [
        html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)
    ]


@pytest.fixture(scope="module")
def audit_page(big: Big, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    """`report changes --format html` of 23 days (44,160 changes), and its run."""
    folder = tmp_path_factory.mktemp(f"audit-{big.kind}")
    run = run_measured(
        big,
        "report",
        "changes",
        "--since",
        "2026-01-02",
        "--until",
        "2026-01-24",
        "--format",
        "html",
        "--output",
        "audit.html",
        cwd=folder,
    )
    assert run.code == 0, run.stderr
    return folder / "audit.html", run


def test_a_large_audit_summarises_and_says_how_to_export_the_rest(
    big: Big, audit_page: tuple[Path, Run], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, run = audit_page
    page = path.read_text(encoding="utf-8")
    history, limit = big.history, reports.AUDIT_LIST_LIMIT
    total = history.changes_between(1, 23)

    assert re.findall(r'<section id="([\w-]+)">', page) == [
        "overview",
        "summary",
        "top-chats",
        "days",
        "charts",
        "changes",
        "notes",
    ]
    assert path.stat().st_size < HTML_MAX_BYTES
    assert run.peak_mb < 200
    export = shlex.join(
        [
            "dingtalk-etl",
            "--config",
            str(big.config),
            "report",
            "changes",
            "--since",
            "2026-01-02",
            "--until",
            "2026-01-24",
            "--format",
            "csv",
            "--output",
            "changes.csv",
        ]
    )
    more = (
        f"Listed: the first {limit:,} of {total:,} changes, in the order they occurred; "
        f"{total - limit:,} more are not listed here. All of them as CSV: "
        f"<code>{html.escape(export)}</code>"
    )
    assert more in section(page, "changes")
    assert more in section(page, "overview")
    listed = re.findall(r'<tr class="change-\w+">(.*?)</tr>', section(page, "changes"))
    assert len(listed) == limit

    # The chats that changed most (the busy ones, ties by chatid) are the ones charted.
    busy = [chatid(n) for n in range(HISTORY["chats"]) if history.is_busy(n)]
    top = [cells(row) for row in body_rows(section(page, "top-chats"))]
    assert [row[0] for row in top] == busy[: reports.TOP_CHATS]
    assert {row[-1] for row in top} == {str(23 * HISTORY["per_day"] * BUSY_FACTOR)}
    assert list(figures(page)) == busy[: reports.TOP_CHATS]
    hint = "charts for the 10 chats with the most changes only; select chats with --chat"
    assert f'<ul class="notes"><li>{hint}</li>' in page
    summary = body_rows(section(page, "summary"))
    assert len(summary) == HISTORY["chats"]
    days = [cells(row) for row in body_rows(section(page, "days"))]
    assert [row[0] for row in days] == [f"2026-01-{d:02d}" for d in range(2, 25)]
    assert {row[-1] for row in days} == {str(history.daily)}

    # The command shown exports every change, the listed ones first.
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, shlex.split(export)[1:], env=clean_env())
    assert result.exit_code == 0, result.output
    with (tmp_path / "changes.csv").open(encoding="utf-8", newline="") as handle:
        exported = list(csv.DictReader(handle))
    assert len(exported) == total
    assert [(c[2], c[4], c[5]) for c in map(cells, listed)] == [
        (row["chatid"], row["change"], row["userid"]) for row in exported[:limit]
    ]


@pytest.mark.parametrize("big", ["sqlite"], indirect=True)
def test_chromium_renders_the_summary_of_a_large_audit(audit_page: tuple[Path, Run]) -> None:
    dom, log = headless(audit_page[0])

    assert console_messages(log) == []
    assert '<section id="top-chats">' in dom
    assert dom.count("<figure>") == reports.TOP_CHATS
    assert "<script" not in dom


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kathmandu", "America/Los_Angeles"])
def test_changes_per_day_are_days_of_the_report_time_zone(big: Big, zone: str) -> None:
    """Counted by the database in quarter hours, added up to days of the zone: the runs, at
    18:15 UTC, are at midnight in Kathmandu (UTC+05:45), on the next day there."""
    tz = ZoneInfo(zone)
    history = big.history
    engine = create_db_engine(history.url)
    try:
        audit = reports.audit(engine, since=None, until=None, tz=tz)
    finally:
        engine.dispose()

    per_chat = [
        history.per_day * (BUSY_FACTOR if history.is_busy(n) else 1) for n in range(history.chats)
    ]
    renames = sum(count // 10 for count in per_chat)  # every tenth change of a chat
    expected = []
    for day in range(1, history.days):
        moves = history.daily - renames
        joins, leaves = (moves, 0) if day % 2 else (0, moves)
        local = history.at(day).astimezone(tz).date()
        expected.append(
            {
                "day": local,
                "joins": joins,
                "leaves": leaves,
                "other_changes": renames,
                "changes": history.daily,
            }
        )
    assert audit.summarised
    assert audit.days is not None
    assert audit.days.rows == expected
    if zone == "Asia/Kathmandu":
        assert expected[0]["day"] == dt.date(2026, 1, 3)  # 2026-01-02 18:15 UTC
