"""The HTML audit report: one self-contained file (summary, charts, changes), every piece of
data escaped, and rendered by headless Chromium without a console message."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from sqlalchemy.engine import URL

from etl import reports
from etl.cli import cli
from etl.db import create_db_engine
from etl.report_html import render, render_audit
from etl.simulator import SimChat, Simulator, World
from etl.sync import run_sync
from tests.conftest import APP_KEY, APP_SECRET, MakeConfig
from tests.helpers import IN_CI
from tests.report_scenario import Scenario, build_scenario

UTC = ZoneInfo("UTC")
EVIL_NAME = '<script>document.title="pwned"</script> & "Co"'
EVIL_USER = "<img src=x onerror=alert(1)>"


def audit_html(
    url: URL,
    since: dt.datetime | None = None,
    chats_filter: Sequence[str] = (),
) -> str:
    engine = create_db_engine(url)
    try:
        audit = reports.audit(engine, since=since, until=None, chats_filter=chats_filter, tz=UTC)
    finally:
        engine.dispose()
    return render_audit(audit)


def figures(page: str) -> dict[str, str]:
    """chatid -> the SVG of its chart."""
    found = re.findall(
        r'<figure><figcaption>.*?<span class="meta">\(([^<]*)\)</span></figcaption>(<svg.*?</svg>)',
        page,
    )
    return dict(found)


def test_audit_has_summary_charts_and_changes(scenario: Scenario) -> None:
    page = audit_html(scenario.url)

    assert page.startswith("<!DOCTYPE html>")
    for section in ('id="summary"', 'id="charts"', 'id="changes"', 'id="notes"'):
        assert section in page
    charts = figures(page)
    assert sorted(charts) == ["chat-eng", "chat-fin", "chat-old"]
    # One point per successful sync (chat-eng failed in run 4, chat-old in run 5; run 6, the
    # reconcile, read chat-fin and chat-eng) and one per group event (two in each).
    points = {chatid: svg.count("<circle") for chatid, svg in charts.items()}
    assert points == {"chat-fin": 8, "chat-eng": 7, "chat-old": 4}
    assert "dismissed</text>" in charts["chat-old"]
    assert "3 members (+1 / -1), run" in charts["chat-fin"]  # run 2: dan in, carol out
    assert "2 members (+0 / -1), event by alice" in charts["chat-fin"]  # dan removed
    assert "2 members (+1 / -0), event by bob" in charts["chat-eng"]  # frank, no poll saw
    assert page.count('<tr class="change-') == 13
    assert "Chats in this report: 3" in page


def test_audit_changes_show_time_operator_and_source(scenario: Scenario) -> None:
    page = audit_html(scenario.url)

    changes = page.split('<section id="changes">', 1)[1].split("</section>", 1)[0]
    head = re.findall(r'<th[^>]* title="(\w+)">', changes)
    assert head[:2] == ["occurred_at", "observed_at"]
    assert head[-2:] == ["source", "operator_userid"]
    rows = re.findall(r'<tr class="change-(\w+)">(.*?)</tr>', changes)
    cells = [(kind, re.findall(r"<td[^>]*>(.*?)</td>", row)) for kind, row in rows]
    removed = [c for kind, c in cells if kind == "left" and c[5] == "dan"]
    assert len(removed) == 1
    assert removed[0][-2:] == ["event", "alice"]
    occurred = scenario.occurred(0).strftime("%Y-%m-%d %H:%M:%S")
    assert f"{occurred}</time>" in removed[0][0]
    polled = [c for kind, c in cells if kind == "left" and c[5] == "carol"]
    assert [c[-2:] for c in polled] == [["poll", ""]]
    assert "DingTalk&#x27;s for a change received as a group event" in page


def test_audit_window_and_chat_selection(scenario: Scenario) -> None:
    since = scenario.between("chat-fin", 3, 4)
    page = audit_html(scenario.url, since=since, chats_filter=["chat-fin"])

    charts = figures(page)
    assert list(charts) == ["chat-fin"]
    # The count at the window's start, runs 4, 5 and 6, and alice's two events.
    assert charts["chat-fin"].count("<circle") == 6
    assert "window start" in charts["chat-fin"]
    # The rename, the searchable change, dan removed and added back.
    assert page.count('<tr class="change-') == 4


def test_an_audit_lists_every_change_up_to_its_limit_and_summarises_above(
    scenario: Scenario,
) -> None:
    engine = create_db_engine(scenario.url)
    try:
        whole = reports.audit(engine, since=None, until=None, tz=UTC)
        at_limit = reports.audit(engine, since=None, until=None, tz=UTC, limit=13)
        above = reports.audit(engine, since=None, until=None, tz=UTC, limit=12)
    finally:
        engine.dispose()

    assert (whole.total_changes, whole.summarised, at_limit.summarised) == (13, False, False)
    same_time = replace(at_limit, generated_at=whole.generated_at)
    assert render_audit(same_time) == render_audit(whole)
    # Above: the same chats, counted by the database, and the first changes only.
    assert above.summarised
    assert above.total_changes == 13
    assert above.summary.rows == whole.summary.rows
    assert above.changes.rows == whole.changes.rows[:12]
    assert above.changes.title == whole.changes.title
    assert above.top is not None
    assert [(r["chatid"], r["changes"]) for r in above.top.rows] == [
        ("chat-fin", 8),
        ("chat-eng", 4),
        ("chat-old", 1),
    ]
    assert [s.chatid for s in above.series] == ["chat-fin", "chat-eng", "chat-old"]
    # The same charts, the chats that changed most first.
    assert sorted(above.series, key=lambda s: s.chatid) == whole.series
    page = render_audit(above, "dingtalk-etl report changes --format csv --output changes.csv")
    assert (
        "Listed: the first 12 of 13 changes, in the order they occurred; 1 more is not listed "
        "here. All of them as CSV: <code>dingtalk-etl report changes --format csv --output "
        "changes.csv</code>"
    ) in page
    assert page.count('<tr class="change-') == 12


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("members", {"chat": "chat-fin", "as_of": None, "with_series": True}),
        ("chat_list", {"risky": True}),
        ("sync_health", {}),
    ],
    ids=["members", "chats", "sync-health"],
)
def test_every_report_renders_as_a_page(
    scenario: Scenario, name: str, args: dict[str, object]
) -> None:
    engine = scenario.engine()
    try:
        report = getattr(reports, name)(engine, tz=UTC, **args)
    finally:
        engine.dispose()
    page = render(report, "html")
    assert page.startswith("<!DOCTYPE html>")
    assert "<table>" in page
    assert page.count("<svg") == (1 if name == "members" else 0)


MANY = [f"chat-{n:02d}" for n in range(reports.MAX_CHARTS + 1)]


@pytest.fixture
def many_chats_db(sqlite_url: URL, make_config: MakeConfig) -> URL:
    """One chat more than the audit charts, each synced once."""
    world = World(APP_KEY, APP_SECRET)
    for chatid in MANY:
        world.add_chat(SimChat(chatid, f"Chat {chatid}", "u1", ["u1", "u2"]))
    with Simulator(world) as sim:
        run_sync(make_config(sqlite_url, sim.base_url, MANY))
    return sqlite_url


def test_audit_charts_the_first_chats_and_the_cli_says_how_to_select(
    many_chats_db: URL, tmp_path: Path
) -> None:
    engine = create_db_engine(many_chats_db)
    try:
        audit = reports.audit(engine, since=None, until=None, chats_filter=MANY, tz=UTC)
    finally:
        engine.dispose()
    config = tmp_path / "report.toml"
    url = many_chats_db.render_as_string(hide_password=False)
    config.write_text(f'[database]\nurl = "{url}"\n', encoding="utf-8")
    selected = [arg for chatid in MANY for arg in ("--chat", chatid)]
    result = CliRunner().invoke(
        cli,
        ["--config", str(config), "report", "changes", *selected, "--format", "html"],
        env={"DINGTALK_ETL_CONFIG": None, "DINGTALK_ETL_DATABASE_URL": None},
    )

    assert (len(audit.series), audit.uncharted) == (reports.MAX_CHARTS, 1)
    assert not any("--chat" in note for note in audit.notes)
    assert result.exit_code == 0, result.stderr
    hint = "charts for the first 50 chats only; select chats with --chat"
    assert f'<ul class="notes"><li>{hint}</li>' in result.stdout
    assert result.stdout.count("<figure>") == reports.MAX_CHARTS


# -- hostile data -----------------------------------------------------------------------------


@pytest.fixture
def hostile_db(sqlite_url: URL, make_config: MakeConfig) -> URL:
    """A chat whose name, owner and members are markup, synced twice with changes."""
    world = World(APP_KEY, APP_SECRET)
    world.add_chat(SimChat("chat-<b>", EVIL_NAME, EVIL_USER, [EVIL_USER, "u1"]))
    with Simulator(world) as sim:
        config = make_config(sqlite_url, sim.base_url, ["chat-<b>"])
        run_sync(config)
        world.add_members("chat-<b>", ["</td></tr></table><h1>x</h1>"])
        world.set_attr("chat-<b>", name=EVIL_NAME + " 2")
        run_sync(config)
    return sqlite_url


def test_audit_escapes_every_piece_of_data(hostile_db: URL) -> None:
    page = audit_html(hostile_db)

    assert "<script" not in page
    assert "<img" not in page
    assert "<h1>x</h1>" not in page
    assert "<b>" not in page
    assert (
        "&lt;script&gt;document.title=&quot;pwned&quot;&lt;/script&gt; &amp; &quot;Co&quot;" in page
    )
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "chat-&lt;b&gt;" in page
    assert page.count("<table>") == 2
    assert page.count("<svg") == 1


# -- headless Chromium --------------------------------------------------------------------------


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if IN_CI:
        pytest.fail("CI=true and headless Chromium is not installed (make deps-system)")
    pytest.skip("headless Chromium not installed: `apt-get install chromium` to run this test")


def headless(page: Path) -> tuple[str, str]:
    """The DOM after load, and the browser's log (console messages appear as ':CONSOLE')."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
            env={**os.environ, "HOME": profile},
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stderr


def console_messages(log: str) -> list[str]:
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_chromium_reports_console_errors_of_a_broken_page(tmp_path: Path) -> None:
    """The harness itself: a page with a failing script is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><p>x</p><script>throw new Error('boom')</script>", "utf-8")
    _, log = headless(page)
    assert any("Uncaught Error: boom" in line for line in console_messages(log))


@pytest.fixture(params=["scenario", "hostile-data"])
def audit_page(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "scenario":
        url = build_scenario("sqlite", tmp_path).url
    else:
        url = request.getfixturevalue("hostile_db")
    page = tmp_path / "audit.html"
    page.write_text(audit_html(url), encoding="utf-8")
    return page


def test_chromium_renders_the_audit_without_errors(audit_page: Path) -> None:
    dom, log = headless(audit_page)

    assert console_messages(log) == []
    assert "<svg" in dom
    assert "<table>" in dom
    assert "<title>DingTalk group audit</title>" in dom
    assert "<script" not in dom
    assert "<img" not in dom
