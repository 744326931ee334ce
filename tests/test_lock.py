"""One sync per database, across processes; a killed run is marked abandoned by the next."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy.engine import URL

from etl.simulator import Simulator, World
from etl.sync import run_sync
from tests.conftest import MakeConfig
from tests.helpers import clean_env, rows, write_config

CLI = [sys.executable, "-m", "etl"]


def wait_for_running_row(db: URL, timeout: float = 20.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [r for r in rows(db, "sync_runs") if r["status"] == "running"]
        if running:
            return running[0]
        time.sleep(0.05)
    raise AssertionError("the first sync never started its run")


def test_second_sync_exits_75_at_once_and_leaves_no_row(
    db_url: URL, simulator: Simulator, world: World, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path, db_url, simulator.base_url, ["chat-a", "chat-b"], sync={"concurrency": 1}
    )
    # Keeps the first run, and its lock, busy far longer than the second needs to start,
    # however loaded the machine is; the first is killed once the second has answered.
    world.inject("chat-a", "slow:30")
    first = subprocess.Popen(
        [*CLI, "--config", str(config), "sync"],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        holder = wait_for_running_row(db_url)
        started = time.monotonic()
        second = subprocess.run(
            [*CLI, "--config", str(config), "sync"],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        elapsed = time.monotonic() - started
        still_running = first.poll() is None
    finally:
        first.kill()
        first.wait()

    assert still_running  # the lock really was held while the second tried
    assert second.returncode == 75, second.stderr
    assert second.stderr.startswith(
        "dingtalk-etl: error: another dingtalk-etl sync holds the lock on this database"
    )
    assert second.stderr.rstrip().endswith("; nothing was done")
    assert second.stdout == ""
    assert elapsed < 15  # "at once": it does not wait for the lock (startup included)
    assert [(r["id"], r["status"]) for r in rows(db_url, "sync_runs")] == [
        (holder["id"], "running")
    ]


def test_killed_run_is_marked_abandoned_by_the_next(
    db_url: URL, simulator: Simulator, world: World, tmp_path: Path, make_config: MakeConfig
) -> None:
    config = write_config(
        tmp_path, db_url, simulator.base_url, ["chat-a", "chat-b"], sync={"concurrency": 1}
    )
    world.inject("chat-b", "slow:5")
    victim = subprocess.Popen(
        [*CLI, "--config", str(config), "sync"],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        row = wait_for_running_row(db_url)
        # Let it write chat-a, then kill it while it waits on chat-b.
        deadline = time.monotonic() + 10
        while not rows(db_url, "sync_run_items") and time.monotonic() < deadline:
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    world.clear_faults()

    result = run_sync(make_config(db_url, simulator.base_url, ["chat-a", "chat-b"]))

    runs = rows(db_url, "sync_runs")
    assert [(r["id"], r["status"]) for r in runs] == [(row["id"], "abandoned"), (2, "succeeded")]
    assert runs[0]["finished_at"] is not None
    assert "died" in runs[0]["error"]
    assert result.status == "succeeded"
    # chat-a was committed whole by the dead run; the next run found it unchanged.
    items = [(i["run_id"], i["chatid"], i["changed"]) for i in rows(db_url, "sync_run_items")]
    assert items == [(1, "chat-a", True), (2, "chat-a", False), (2, "chat-b", True)]
