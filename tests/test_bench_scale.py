"""Smoke test of ``bench/history.py`` (and the figures of ``bench/scale.py``), in seconds.

A tiny history is built on SQLite by the generator as a subprocess, as ``bench/scale.py``
runs it, and checked against what the generator promises: the rows are the ones a daily
sync would have written (every chat discovered once with its baseline, ``chat_members``
equal to the replay of the member events, ``member_count`` the current members, one run item
per chat read, the runs' counts adding up), and the product's own commands (`status`,
`runs`, `report changes`, `report members`, `report user`) answer on it with exit 0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
HISTORY = REPO / "bench" / "history.py"
SIZES = ["--chats", "12", "--members", "25", "--days", "20", "--users", "300"]
# Rates far above the defaults, so that 20 days of 12 chats hold every kind of row.
RATES = ["--churn", "0.05", "--attr-rate", "0.3", "--new-share", "0.2"]
RATES += ["--dismiss-share", "0.2", "--fail-rate", "0.03", "--rejoin", "0.3"]


def _build(tmp_path: Path, name: str, *extra: str) -> tuple[Path, dict[str, Any]]:
    db, summary = tmp_path / f"{name}.db", tmp_path / f"{name}.json"
    cmd = [sys.executable, str(HISTORY), f"--url=sqlite:///{db}", f"--json={summary}"]
    done = subprocess.run(
        [*cmd, *SIZES, *RATES, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return db, json.loads(summary.read_text())


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return _build(tmp_path_factory.mktemp("history"), "h")


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_the_history_is_what_a_daily_sync_writes(history: tuple[Path, dict[str, Any]]) -> None:
    db, summary = history
    rows = summary["rows"]
    assert rows["chats"] == 12
    assert rows["sync_runs"] == 20
    assert rows["api_calls"] == 40
    assert rows["chat_events"] > rows["chat_members"] > 12 * 3

    # Every chat discovered exactly once, by a run, before any other event of its own.
    discovered = _rows(
        db,
        "SELECT e.chatid, e.observed_at, c.first_seen_at, e.run_id FROM chat_events e "
        "JOIN chats c ON c.chatid = e.chatid WHERE e.event_type = 'chat_discovered'",
    )
    assert len(discovered) == 12
    assert len({chatid for chatid, *_ in discovered}) == 12
    assert all(seen == first for _, seen, first, _ in discovered)
    assert _rows(
        db,
        "SELECT count(*) FROM chat_events e JOIN chats c ON c.chatid = e.chatid "
        "WHERE e.occurred_at < c.first_seen_at",
    ) == [(0,)]
    # Baseline rows are the members at discovery, and nothing else.
    assert _rows(
        db,
        "SELECT count(*) FROM chat_events e JOIN chats c ON c.chatid = e.chatid "
        "WHERE e.is_baseline AND (e.event_type != 'member_joined' "
        "OR e.observed_at != c.first_seen_at)",
    ) == [(0,)]
    # Poll rows only: occurred_at = observed_at, a run, no operator or event id.
    assert _rows(
        db,
        "SELECT count(*) FROM chat_events WHERE source != 'poll' OR occurred_at != observed_at "
        "OR run_id IS NULL OR operator_userid IS NOT NULL OR event_id IS NOT NULL "
        "OR run_id NOT IN (SELECT id FROM sync_runs)",
    ) == [(0,)]
    kinds = dict(_rows(db, "SELECT event_type, count(*) FROM chat_events GROUP BY 1"))
    assert set(kinds) == {"chat_discovered", "member_joined", "member_left", "attribute_changed"}
    fields = {
        f for (f,) in _rows(db, "SELECT DISTINCT field FROM chat_events WHERE field IS NOT NULL")
    }
    assert {"name", "owner_userid", "status"} <= fields

    # chat_members is the replay of the member events, in the log's order.
    replay: dict[tuple[str, str], list[Any]] = {}
    for chatid, userid, kind, at in _rows(
        db,
        "SELECT chatid, userid, event_type, occurred_at FROM chat_events "
        "WHERE event_type IN ('member_joined', 'member_left') ORDER BY occurred_at, id",
    ):
        state = replay.setdefault((chatid, userid), [None, None])
        if kind == "member_joined":
            assert state[0] is None or state[1] is not None, "joined twice"
            replay[(chatid, userid)] = [at, None]
        else:
            assert state[0] is not None, "left without being a member"
            assert state[1] is None, "left twice"
            state[1] = at
    stored = {
        (chatid, userid): [joined, left]
        for chatid, userid, joined, left in _rows(db, "SELECT * FROM chat_members")
    }
    assert stored == replay
    current: Counter[str] = Counter(chatid for (chatid, _), (_, left) in stored.items() if not left)
    counts = dict(_rows(db, "SELECT chatid, member_count FROM chats"))
    assert counts == {chatid: current[chatid] for chatid in counts}
    # The owner is a current member; a re-join re-opened a row (more joins than rows).
    assert _rows(
        db,
        "SELECT count(*) FROM chats c WHERE NOT EXISTS (SELECT 1 FROM chat_members m WHERE "
        "m.chatid = c.chatid AND m.userid = c.owner_userid AND m.left_at IS NULL)",
    ) == [(0,)]
    assert kinds["member_joined"] > rows["chat_members"]

    # Dismissed chats: one status event, read no more, counted as skipped.
    dismissed = _rows(db, "SELECT chatid, dismissed_at FROM chats WHERE status = 2")
    assert dismissed
    for chatid, dismissed_at in dismissed:
        assert _rows(
            db,
            "SELECT observed_at, old_value, new_value FROM chat_events "
            f"WHERE chatid = '{chatid}' AND field = 'status'",
        ) == [(dismissed_at, "1", "2")]
        assert _rows(
            db,
            "SELECT count(*) FROM sync_run_items i JOIN sync_runs r ON r.id = i.run_id "
            f"WHERE i.chatid = '{chatid}' AND r.started_at > '{dismissed_at}'",
        ) == [(0,)]

    # Runs: their counts are their items'; a failed read wrote nothing and made it partial.
    items: dict[int, Counter[str]] = defaultdict(Counter)
    for run_id, status, changed, attempts in _rows(
        db, "SELECT run_id, status, changed, attempts FROM sync_run_items"
    ):
        items[run_id][status] += 1
        items[run_id]["changed"] += changed
        items[run_id]["attempts"] += attempts
    for run in _rows(
        db,
        "SELECT id, status, chats_total, chats_succeeded, chats_failed, chats_changed, "
        "api_calls, retries FROM sync_runs",
    ):
        run_id, status, total, ok, failed, changed, calls, retries = run
        got = items[run_id]
        assert (ok, failed, changed) == (got["ok"], got["failed"], got["changed"])
        assert total == ok + failed
        assert calls == got["attempts"] + 1
        assert retries == got["attempts"] - total
        assert status == ("partial" if failed else "succeeded")
    assert any(c["failed"] for c in items.values())
    changed_items = {
        (run_id, chatid)
        for run_id, chatid in _rows(db, "SELECT run_id, chatid FROM sync_run_items WHERE changed")
    }
    with_events = set(_rows(db, "SELECT DISTINCT run_id, chatid FROM chat_events"))
    assert changed_items == with_events
    assert _rows(
        db,
        "SELECT count(*) FROM sync_run_items i JOIN chat_events e "
        "ON e.run_id = i.run_id AND e.chatid = i.chatid WHERE i.status = 'failed'",
    ) == [(0,)]


def test_the_same_seed_gives_the_same_rows(
    tmp_path: Path, history: tuple[Path, dict[str, Any]]
) -> None:
    db, _ = history
    again, _ = _build(tmp_path, "again")
    query = "SELECT * FROM chat_events ORDER BY id"
    assert _rows(again, query) == _rows(db, query)
    other, _ = _build(tmp_path, "other", "--seed", "7")
    assert _rows(other, query) != _rows(db, query)


def test_the_product_reads_the_history(
    tmp_path: Path, history: tuple[Path, dict[str, Any]]
) -> None:
    db, summary = history
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{db}"\n\n[report]\ntimezone = "UTC"\n')
    cli = Path(sys.executable).parent / "dingtalk-etl"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DINGTALK_")}
    day = summary["first_run"][:10]
    last = summary["last_run"][:10]

    def run(*args: str) -> str:
        done = subprocess.run(
            [str(cli), "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=environ,
            check=False,
        )
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    assert run("status").startswith("OK")
    assert run("runs", "--limit", "5", "--json").count('"id"') == 5
    csv = run("report", "changes", "--since", day, "--until", last, "--format", "csv")
    expected = _rows(
        db,
        "SELECT count(*) FROM chat_events WHERE NOT is_baseline AND event_type != "
        "'chat_discovered'",
    )[0][0]
    assert len(csv.splitlines()) == expected + 1
    run("report", "members", "--chat", summary["largest_chatid"], "--as-of", day)
    run("report", "user", "--userid", summary["busiest_userid"])


@pytest.fixture
def scale(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``bench/scale.py`` as a module (it is a script, beside ``throughput.py``)."""
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "bench" / "scale.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # scale.py imports throughput.py
    monkeypatch.setitem(sys.modules, "bench_scale", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("text", "rows"),
    [
        ("[]", 0),
        (' [ {"a": 1} ,\n {"b": [1, "]"]} ]\n', 2),
        ('[{"a": 1},]', None),
        ('[{"a": 1}', None),
        ('[{"a": 1}] [', None),
        ("{}", None),
        ("", None),
    ],
)
def test_scale_counts_the_rows_of_one_json_array(
    scale: Any, tmp_path: Path, text: str, rows: int | None
) -> None:
    path = tmp_path / "report.json"
    path.write_text(text)
    assert scale.json_array_rows(path) == rows


def test_scale_figures_pass_and_fail_on_their_targets(scale: Any) -> None:
    steps = {
        "help": {"wall": 0.25, "rss_mb": 20.0, "exit": 0},
        "version": {"wall": 0.35, "rss_mb": 20.0, "exit": 0},
        "import_sqlalchemy": {"wall": 0.5, "rss_mb": 30.0, "exit": 0},
        "status": {"wall": 0.9, "rss_mb": 60.0, "exit": 0},
        "runs": {"wall": 1.1, "rss_mb": 60.0, "exit": 0},
        "members_as_of": {"wall": 1.0, "rss_mb": 60.0, "exit": 0},
        "user": {"wall": 2.5, "rss_mb": 60.0, "exit": 0},
        "copy_baseline": {"wall": 2.0, "rss_mb": 10.0, "exit": 0, "rows": 100},
        "changes_csv": {"wall": 6.9, "rss_mb": 149.0, "exit": 0, "rows": 100},
        "changes_json": {"wall": 7.1, "rss_mb": 151.0, "exit": 0, "rows": 100},
        "changes_html": {"wall": 9.0, "rss_mb": 199.0, "exit": 0, "bytes": 6_000_000},
    }
    verdicts = {f.name: f.ok for f in scale.figures(steps, render=None)}
    assert verdicts == {
        "help": True,
        "version": False,
        "status": True,
        "runs": False,
        "members_as_of": True,
        "user": False,
        "changes_csv_rss": True,
        "changes_csv_wall": True,
        "changes_json_rss": False,
        "changes_json_wall": False,
        "changes_html_rss": True,
        "changes_html_size": False,
        "rows_match": True,
    }
