"""A command imports what it needs and nothing more: `--help` answers at once, and `status` (a
monitoring check may run it every minute) does not pay for Alembic, HTTP, the simulator or
the sync. Checked by what a fresh interpreter has imported after the command, not by time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from tests.helpers import clean_env, write_config

# Runs the command in-process, then prints the top-level modules it imported, with ours and
# SQLAlchemy's dialects.
SCRIPT = """
import json, sys
from etl.cli import cli
try:
    cli.main(args=sys.argv[1:], prog_name="dingtalk-etl", standalone_mode=False)
except SystemExit:
    pass
dialects = {
    ".".join(m.split(".")[:3]) for m in sys.modules if m.startswith("sqlalchemy.dialects.")
} - {"sqlalchemy.dialects._typing"}
names = {m.split(".")[0] for m in sys.modules} | {m for m in sys.modules if m.startswith("etl.")}
names |= dialects
print(json.dumps(sorted(names)), file=sys.stderr)
"""
HEAVY = {"alembic", "apscheduler", "requests", "websockets", "etl.simulator", "etl.sync"}


def imported(*args: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        check=True,
    )
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["report", "--help"]], ids=str)
def test_help_and_version_import_no_library(args: list[str]) -> None:
    modules = imported(*args)
    assert not modules & {"sqlalchemy", "pydantic", *HEAVY}


def test_status_and_runs_import_only_what_they_read(sqlite_url: URL, tmp_path: Path) -> None:
    config = str(write_config(tmp_path, sqlite_url, "http://127.0.0.1:9", ["chat-a"]))
    for command in (["status"], ["runs", "--limit", "5"]):
        modules = imported("--config", config, *command)
        assert "sqlalchemy" in modules  # it did read the database
        assert not modules & HEAVY, command
        # Only the dialect of the database read: table options name no other.
        loaded = {m for m in modules if m.startswith("sqlalchemy.dialects.")}
        assert loaded == {"sqlalchemy.dialects.sqlite"}, command


# The console script's entry point, then what the collector looks like once it has returned.
MAIN = """
import atexit, gc, json, sys
from etl.cli import main
atexit.register(lambda: print(json.dumps([gc.get_threshold()[0], gc.get_freeze_count()])))
sys.argv = ["dingtalk-etl", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(
    ("args", "code"), [(["--version"], 0), (["no-such-command"], 2)], ids=["ok", "usage-error"]
)
def test_the_console_script_collects_rarely_and_leaves_its_objects_to_the_exit(
    args: list[str], code: int
) -> None:
    from etl.cli import GC_FIRST_GENERATION

    done = subprocess.run(
        [sys.executable, "-c", MAIN, *args], capture_output=True, text=True, env=clean_env()
    )
    assert done.returncode == code, done.stderr
    threshold, frozen = json.loads(done.stdout.strip().splitlines()[-1])
    assert threshold == GC_FIRST_GENERATION
    assert frozen > 10_000  # every object the command loaded, also when it failed


def test_the_report_formats_named_by_the_command_line_are_the_renderers() -> None:
    from etl import cli, report_html

    assert cli.FORMATS == report_html.FORMATS
