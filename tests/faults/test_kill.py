"""SIGKILL at random points of many runs, then one normal run: nothing lost, nothing doubled.

Each iteration changes the simulated world (members join and leave, a rename or an owner change
now and then, sometimes a dismissal), starts a real ``dingtalk-etl sync`` process and kills it
after a random delay: before it took the lock, while it fetched, in the middle of writing a
chat, or after it finished. Then a normal run (a cold ``python -m etl``) must bring the database
to exactly the world, with an audit log that replays to it and every dead run ``abandoned``.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from etl.simulator import Simulator, World
from tests.faults.checks import audit_problems, world_problems, world_state
from tests.faults.conftest import REPO, Launcher
from tests.helpers import clean_env, rows, write_config

# A run of this world takes 0.3-1.2 s (30 chats, ~1,500 memberships, 20 ms per answer, two
# fetchers). A quarter of the kills come at a random time after the process starts (often
# before it has a run row); the rest at a random time within a typical run's duration after
# its run row appears.
MAX_KILL_DELAY = 1.3
LOCKED = 75


def _typical_run_seconds(db: URL) -> float:
    """The median duration of the runs that finished so far (0.6 s before there is one)."""
    durations = sorted(
        (r["finished_at"] - r["started_at"]).total_seconds()
        for r in rows(db, "sync_runs")
        if r["status"] == "succeeded"
    )
    return durations[len(durations) // 2] if durations else 0.6


def _wait_for_run(db: URL, after: int, timeout: float = 10.0) -> int:
    """The id of the first run row newer than ``after`` (or ``after`` if none came)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        newest = rows(db, "sync_runs")[-1:]
        if newest and newest[0]["id"] > after:
            return int(newest[0]["id"])
        time.sleep(0.02)
    return after


def _final_sync(config: Path) -> subprocess.CompletedProcess[str]:
    """A normal cold run; a killed run's database session may take a moment to go away."""
    deadline = time.monotonic() + 30
    while True:
        done = subprocess.run(
            [sys.executable, "-m", "etl", "--config", str(config), "sync"],
            cwd=REPO,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != LOCKED or time.monotonic() > deadline:
            return done
        time.sleep(0.2)


@pytest.mark.parametrize(
    "kills",
    [
        # Minutes rather than seconds when the machine is busy: past the default timeout.
        pytest.param(6, id="6-kills", marks=pytest.mark.timeout(600)),
        pytest.param(30, id="30-kills", marks=[pytest.mark.slow, pytest.mark.timeout(600)]),
    ],
)
def test_killed_runs_lose_nothing(
    db_url: URL, db_kind: str, tmp_path: Path, launcher: Launcher, kills: int
) -> None:
    rng = random.Random(f"{db_kind}-{kills}")
    world = World.generate(30, seed=7, users=3000, min_members=5, max_members=800)
    world.latency_ms = 20
    outcomes: Counter[int] = Counter()
    killed_running: set[int] = set()
    with Simulator(world) as sim:
        config = write_config(
            tmp_path,
            db_url,
            sim.base_url,
            world.chatids(),
            app_key=world.app_key,
            app_secret=world.app_secret,
            sync={"concurrency": 2},
        )
        for iteration in range(kills):
            if iteration:
                world.mutate(0.3, seed=iteration)
                if rng.random() < 0.1:
                    active = [c for c in world.chatids() if world.chat(c).status == 1]
                    world.dismiss(rng.choice(active), keep_members=True)
            last_run = max((r["id"] for r in rows(db_url, "sync_runs")), default=0)
            pid = launcher.start(["--config", str(config), "sync"])
            if rng.random() < 0.25:
                time.sleep(rng.uniform(0, MAX_KILL_DELAY))
            else:
                _wait_for_run(db_url, last_run)
                time.sleep(rng.uniform(0, _typical_run_seconds(db_url)))
            outcomes[launcher.kill(pid)] += 1
            newest = rows(db_url, "sync_runs")[-1:]
            if newest and newest[0]["status"] == "running":
                killed_running.add(newest[0]["id"])
            # Between kills the database may hold a dead run's half: still no contradiction.
            assert audit_problems(db_url, finished=False) == []

        final = _final_sync(config)
        expected = world_state(world)

    assert final.returncode == 0, final.stderr
    assert set(outcomes) <= {-9, 0, LOCKED}, outcomes
    assert outcomes[-9] >= kills // 2, outcomes  # most kills hit a live process
    runs = rows(db_url, "sync_runs")
    assert runs[-1]["status"] == "succeeded"
    abandoned = {r["id"] for r in runs if r["status"] == "abandoned"}
    assert abandoned == killed_running
    assert all("died" in r["error"] and r["finished_at"] for r in runs if r["id"] in abandoned)
    # A run that was not killed mid-way finished normally: nothing else happened to them.
    assert {r["status"] for r in runs[:-1] if r["id"] not in abandoned} <= {"succeeded"}
    assert world_problems(db_url, expected) == []
    assert audit_problems(db_url) == []
    committed = [i for i in rows(db_url, "sync_run_items") if i["run_id"] in abandoned]
    print(
        f"\n{db_kind}: {kills} kills ({outcomes[-9]} mid-process, {len(abandoned)} runs "
        f"abandoned having committed {len(committed)} chats between them, {outcomes[0]} "
        f"finished first, {outcomes[LOCKED]} refused by the lock); {len(runs)} runs, "
        f"{len(rows(db_url, 'chat_events'))} events"
    )
