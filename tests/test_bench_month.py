"""Smoke test of ``bench/month.py``, the month simulation, at small sizes (about a second).

It runs the script as the Makefile does (a subprocess) and checks the machinery, not the
targets: the table is printed, and the numbers agree with what can be counted independently.
With no dismissal, ``every_run`` on an hourly cron reads every chat at every fire, plus one
token call per run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "month.py"
CHATS = 30


def _run(tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    out = tmp_path / "month.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--chats", str(CHATS), "--json", str(out), *options],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr
    assert "| every_run |" in proc.stdout
    assert "| adaptive + events |" in proc.stdout
    data = json.loads(out.read_text(encoding="utf-8"))
    assert (proc.returncode == 0) == data["ok"]
    return proc, {setup["setup"]: setup for setup in data["setups"]} | {"_": data}


def test_every_run_reads_every_chat_at_every_fire(tmp_path: Path) -> None:
    days = 3
    _proc, setups = _run(tmp_path, "--days", str(days), "--dismissals-per-week", "0")
    fires = days * 24  # "10 * * * *" from the month's start (a whole hour in UTC)
    every_run = setups["every_run"]
    assert every_run["fires"] == fires
    assert every_run["calls_by_endpoint"] == {"chat/get": fires * CHATS, "gettoken": fires}
    assert every_run["calls"] == fires * (CHATS + 1)
    assert every_run["deferred"] == 0
    # Same world for every setup; every change recorded when nothing limits the calls.
    changes = {s["changes"] for name, s in setups.items() if name != "_"}
    assert len(changes) == 1
    assert changes.pop() > 0
    for name in ("every_run", "adaptive", "adaptive + events"):
        assert setups[name]["recorded"] == setups[name]["changes"], name
        assert setups[name]["calls"] <= every_run["calls"], name
    # every_run reads each chat hourly: no change waits much more than an hour.
    assert every_run["event_delay"]["n"] == 0
    assert every_run["other_delay"]["p95_seconds"] <= 3600 + 60
    # With events, those that came as events are written after the modelled latency.
    events = setups["adaptive + events"]
    assert events["event_delay"]["n"] > 0
    assert events["event_delay"]["p95_seconds"] == 0.05
    assert events["calls_by_endpoint"]["gateway/connections/open"] == days


def test_dismissed_chats_and_the_quota(tmp_path: Path) -> None:
    days, quota = 7, 2000
    proc, setups = _run(tmp_path, "--days", str(days), "--quota", str(quota))
    dismissed = setups["_"]["dismissed"]
    assert dismissed == 3
    fires = days * 24
    every_run = setups["every_run"]
    # Runs stop reading at the quota: the rest of the month's reads are deferred.
    assert every_run["calls"] == quota
    assert every_run["deferred"] > 0
    reads = every_run["calls_by_endpoint"]["chat/get"]
    runs = every_run["calls_by_endpoint"]["gettoken"]
    assert reads == quota - runs
    # Full runs read every chat not known to be dismissed; only the last one is cut short.
    assert (runs - 1) * (CHATS - dismissed) <= reads <= runs * CHATS
    assert runs < fires
    for name in ("adaptive", "adaptive + events"):
        assert setups[name]["calls"] <= quota, name
    assert "deferred" in proc.stdout
