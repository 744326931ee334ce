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
from tests.helpers import clean_env, rows, wait_for, write_config

CLI = [sys.executable, "-m", "etl"]


def first_running_run(db: URL) -> dict[str, object]:
    running = wait_for(
        "the first sync to start its run",
        lambda: [r for r in rows(db, "sync_runs") if r["status"] == "running"],
    )
    return running[0]


def test_second_sync_exits_75_at_once_and_leaves_no_row(
    db_url: URL, simulator: Simulator, world: World, tmp_path: Path
) -> None:
    # The first run waits on a 60 s answer (its timeout is longer), which keeps it and its
    # lock busy far longer than the second needs to start, however loaded the machine is;
    # the first is killed once the second has answered.
    config = write_config(
        tmp_path,
        db_url,
        simulator.base_url,
        ["chat-a", "chat-b"],
        dingtalk={"timeout_seconds": 90},
        sync={"concurrency": 1},
    )
    world.inject("chat-a", "slow:60")
    first = subprocess.Popen(
        [*CLI, "--config", str(config), "sync"],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        holder = first_running_run(db_url)
        started = time.monotonic()
        second = subprocess.run(
            [*CLI, "--config", str(config), "sync"],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
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
    # "At once": it does not wait for the lock. Startup is included, which takes seconds on a
    # loaded machine; a wait would last until the first is killed.
    assert elapsed < 30
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
        row = first_running_run(db_url)
        # Let it write chat-a, then kill it while it waits on chat-b.
        wait_for("chat-a to be written", lambda: rows(db_url, "sync_run_items"))
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
