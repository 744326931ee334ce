"""The poll plan and the quota month, pure: which chats a run reads, and when the month ends."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from etl.config import parse_config
from etl.polling import (
    ChatPoll,
    NextPoll,
    PollPolicy,
    affordable_chats,
    lookahead,
    next_interval,
    reads_per_fire,
    select,
)
from etl.quota import project_by_pace, quota_month, remaining
from etl.triggers import build_trigger, fire_times, fires_between

NOW = dt.datetime(2026, 11, 30, 10, 10, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
EVERY_RUN = PollPolicy("every_run", 3600, 86400)
ADAPTIVE = PollPolicy("adaptive", 3600, 86400)


def chat(chatid: str, **fields: object) -> ChatPoll:
    return ChatPoll(chatid, **fields)  # type: ignore[arg-type]


def read(chatid: str, ago: dt.timedelta, due_in: dt.timedelta | None, status: int = 1) -> ChatPoll:
    """A chat read ``ago`` before NOW, due ``due_in`` after NOW (None: no plan yet)."""
    return ChatPoll(
        chatid,
        status=status,
        last_synced_at=NOW - ago,
        next_poll_at=None if due_in is None else NOW + due_in,
    )


@pytest.mark.parametrize(
    ("policy", "chats", "due", "skipped"),
    [
        (EVERY_RUN, [chat("new"), read("a", HOUR, 9 * HOUR)], ("new", "a"), ()),
        (EVERY_RUN, [read("gone", HOUR, None, status=2), read("a", HOUR, None)], ("a",), ("gone",)),
        (ADAPTIVE, [chat("new")], ("new",), ()),
        (ADAPTIVE, [read("gone", 48 * HOUR, -HOUR, status=2)], (), ("gone",)),
        (ADAPTIVE, [read("due", HOUR, -dt.timedelta(seconds=1))], ("due",), ()),
        (ADAPTIVE, [read("later", HOUR, 2 * HOUR)], (), ("later",)),
        # Cron fired 30 s early: a chat due within the run's span is read now.
        (ADAPTIVE, [read("soon", HOUR, dt.timedelta(seconds=30))], ("soon",), ()),
        (ADAPTIVE, [read("too-soon", HOUR, dt.timedelta(seconds=90))], (), ("too-soon",)),
        # Read before the plan existed (every_run, then adaptive): due.
        (ADAPTIVE, [read("unplanned", HOUR, None)], ("unplanned",), ()),
    ],
    ids=[
        "every-run-reads-all",
        "every-run-not-dismissed",
        "never-read-is-due",
        "dismissed-never-due",
        "interval-run-out",
        "interval-not-run-out",
        "due-within-lookahead",
        "beyond-lookahead",
        "no-plan-yet",
    ],
)
def test_select_reads_what_is_due(
    policy: PollPolicy, chats: list[ChatPoll], due: tuple[str, ...], skipped: tuple[str, ...]
) -> None:
    selection = select(chats, policy, NOW, affordable=None)
    assert (selection.due, selection.skipped, selection.deferred) == (due, skipped, ())


def test_listener_connected_makes_polls_a_safety_net_at_the_maximum() -> None:
    connected = PollPolicy("adaptive", 3600, 86400, listener_connected=True)
    chats = [read("day-old", 25 * HOUR, -20 * HOUR), read("hour-old", HOUR, -HOUR)]
    assert select(chats, connected, NOW, affordable=None).due == ("day-old",)
    assert select(chats, ADAPTIVE, NOW, affordable=None).due == ("day-old", "hour-old")


def test_chat_with_waiting_events_is_due_at_its_reconcile() -> None:
    connected = PollPolicy("adaptive", 3600, 86400, listener_connected=True)
    waiting = ChatPoll(
        "busy",
        status=1,
        last_synced_at=NOW - HOUR,
        next_poll_at=NOW + 20 * HOUR,
        events_waiting_since=NOW - dt.timedelta(minutes=5),
    )
    fresh = ChatPoll(
        "fresh",
        status=1,
        last_synced_at=NOW - HOUR,
        next_poll_at=NOW + 20 * HOUR,
        events_waiting_since=NOW + dt.timedelta(minutes=5),
    )
    assert select([waiting, fresh], connected, NOW, affordable=None).due == ("busy",)


@pytest.mark.parametrize(
    ("affordable", "due", "deferred"),
    [
        (None, ("a", "b", "c", "new"), ()),
        (2, ("b", "new"), ("c", "a")),
        (0, (), ("new", "b", "c", "a")),
    ],
    ids=["no-quota", "two-affordable", "none-affordable"],
)
def test_quota_keeps_the_most_overdue_in_the_sets_order(
    affordable: int | None, due: tuple[str, ...], deferred: tuple[str, ...]
) -> None:
    chats = [
        read("a", HOUR, -dt.timedelta(minutes=1)),
        read("b", 3 * HOUR, -2 * HOUR),
        read("c", 2 * HOUR, -dt.timedelta(minutes=30)),
        chat("new"),
    ]
    selection = select(chats, ADAPTIVE, NOW, affordable=affordable)
    assert selection.due == due
    assert selection.deferred == deferred
    assert set(selection.skipped) == set(deferred)


@pytest.mark.parametrize(
    ("left", "chats"), [(None, None), (0, 0), (1, 0), (2, 1), (100, 99)], ids=str
)
def test_a_run_pays_its_token_call(left: int | None, chats: int | None) -> None:
    assert affordable_chats(left) == chats


@pytest.mark.parametrize(
    ("previous", "changed", "interval"),
    [
        (None, False, 3600),
        (3600, False, 7200),
        (7200, True, 3600),
        (65536, False, 86400),
        (86400, False, 86400),
    ],
    ids=["first-read", "unchanged-doubles", "changed-resets", "capped", "stays-at-max"],
)
def test_next_interval(previous: int | None, changed: bool, interval: int) -> None:
    assert next_interval(previous, changed, 3600, 86400) == interval


def test_next_poll_counts_from_the_runs_start() -> None:
    started = NOW - dt.timedelta(minutes=3)
    assert NextPoll(started, 3600, 86400).after(3600, False) == (7200, started + 2 * HOUR)


@pytest.mark.parametrize(
    ("previous", "jitter", "expected"),
    [(None, 0, 60.0), (12.0, 0, 60.0), (300.0, 0, 300.0), (300.0, 30, 330.0)],
    ids=["no-run-yet", "short-run", "long-run", "plus-jitter"],
)
def test_lookahead_is_the_runs_span(previous: float | None, jitter: int, expected: float) -> None:
    assert lookahead(previous, jitter) == expected


def test_reads_per_fire_follows_each_chats_interval() -> None:
    fires = [NOW + i * HOUR for i in range(6)]
    chats = [
        chat("new"),  # never read: read at the first fire, then every base interval
        ChatPoll("two-hourly", 1, NOW - HOUR, NOW + HOUR, None, 7200),
        read("gone", HOUR, None, status=2),
    ]
    assert reads_per_fire(chats, ADAPTIVE, fires).per_fire() == [1, 2, 1, 2, 1, 2]
    assert reads_per_fire(chats, EVERY_RUN, fires).per_fire() == [2] * 6


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        # 00:30 on the 1st in Shanghai is still the 30th in UTC: the new month has begun.
        (
            dt.datetime(2026, 11, 30, 16, 30, tzinfo=dt.UTC),
            dt.datetime(2026, 11, 30, 16, 0, tzinfo=dt.UTC),
            dt.datetime(2026, 12, 31, 16, 0, tzinfo=dt.UTC),
        ),
        (
            dt.datetime(2026, 11, 30, 15, 59, tzinfo=dt.UTC),
            dt.datetime(2026, 10, 31, 16, 0, tzinfo=dt.UTC),
            dt.datetime(2026, 11, 30, 16, 0, tzinfo=dt.UTC),
        ),
        (
            dt.datetime(2026, 12, 31, 20, 0, tzinfo=dt.UTC),
            dt.datetime(2026, 12, 31, 16, 0, tzinfo=dt.UTC),
            dt.datetime(2027, 1, 31, 16, 0, tzinfo=dt.UTC),
        ),
    ],
    ids=["just-after-shanghai-midnight", "just-before", "year-end"],
)
def test_quota_month_is_shanghais_calendar_month(
    now: dt.datetime, start: dt.datetime, end: dt.datetime
) -> None:
    month = quota_month(now, "Asia/Shanghai")
    assert (month.start, month.end) == (start, end)


@pytest.mark.parametrize(
    ("quota", "used", "exhausted", "left"),
    [(None, 10, False, None), (5000, 4990, False, 10), (5000, 6000, False, 0), (5000, 10, True, 0)],
    ids=["no-quota", "some-left", "over", "said-90020"],
)
def test_remaining(quota: int | None, used: int, exhausted: bool, left: int | None) -> None:
    assert remaining(quota, used, exhausted) == left


def test_projection_by_pace_carries_the_month() -> None:
    month = quota_month(dt.datetime(2026, 11, 15, 16, 0, tzinfo=dt.UTC), "UTC")
    # Half of November gone, 1,000 calls: 2,000 at its end.
    assert project_by_pace(1000, month, dt.datetime(2026, 11, 16, tzinfo=dt.UTC)).calls == 2000


@pytest.mark.parametrize(
    ("next_run_in", "read"),
    [(None, False), (dt.timedelta(minutes=20), False), (HOUR, True)],
    ids=["no-schedule", "next-run-before-it-falls-due", "next-run-after-it-falls-due"],
)
def test_a_chat_due_before_the_next_run_is_read_now(
    next_run_in: dt.timedelta | None, read: bool
) -> None:
    policy = PollPolicy(
        "adaptive", 3600, 86400, next_run_at=None if next_run_in is None else NOW + next_run_in
    )
    chats = [read_chat := ChatPoll("c", 1, NOW - HOUR, NOW + dt.timedelta(minutes=30))]
    assert select(chats, policy, NOW, affordable=None).due == ((read_chat.chatid,) if read else ())


def test_reads_per_fire_reads_a_chat_at_the_last_fire_before_it_falls_due() -> None:
    fires = [NOW + i * HOUR for i in range(4)]
    # Due at NOW + 90 min: the fire at NOW + 1 h reads it, not the one at NOW + 2 h.
    chats = [ChatPoll("c", 1, NOW - HOUR, NOW + 90 * dt.timedelta(minutes=1), None, 7200)]
    assert reads_per_fire(chats, ADAPTIVE, fires).per_fire() == [0, 1, 0, 1]


@pytest.mark.parametrize(
    "schedule",
    [{"interval_seconds": 7}, {"interval_minutes": 60}, {"cron": "10 * * * *"}],
    ids=["7s", "hourly", "cron"],
)
def test_fire_times_are_the_triggers_fires(schedule: dict[str, object], tmp_path: Path) -> None:
    raw = {"dingtalk": {"app_key": "k", "app_secret": "s3cret"}, "sync": {"chatids": ["c"]}}
    config = parse_config({**raw, "schedule": schedule}, tmp_path / "c.toml", environ={})
    start, end = NOW, NOW + 3 * HOUR
    expected = list(fires_between(build_trigger(config), start, end))
    assert list(fire_times(config, start, end)) == expected


def test_reads_per_fire_is_what_select_would_read_at_each_fire(tmp_path: Path) -> None:
    """The projection, checked against the selection itself run at every fire of a day."""
    raw = {"dingtalk": {"app_key": "k", "app_secret": "s3cret"}, "sync": {"chatids": ["c"]}}
    config = parse_config(
        {**raw, "schedule": {"interval_seconds": 60}}, tmp_path / "c.toml", environ={}
    )
    fires = fire_times(config, NOW, NOW + dt.timedelta(days=1))
    plan = {
        "new": chat("new"),
        "due": ChatPoll("due", 1, NOW - HOUR, NOW + dt.timedelta(minutes=5), None, 7200),
        "gone": read("gone", HOUR, None, status=2),
    }
    initial = list(plan.values())
    expected = []
    for i, fire in enumerate(fires):
        following = fires[i + 1] if i + 1 < len(fires) else None
        policy = PollPolicy("adaptive", 3600, 86400, next_run_at=following)
        due = select(list(plan.values()), policy, fire, affordable=None).due
        expected.append(len(due))
        for chatid in due:
            # Nothing changes, and each chat keeps its interval: the projection's premise.
            interval = plan[chatid].interval_seconds or 3600
            next_at = fire + dt.timedelta(seconds=interval)
            plan[chatid] = ChatPoll(chatid, 1, fire, next_at, None, interval)

    assert reads_per_fire(initial, ADAPTIVE, fires).per_fire() == expected


def test_a_schedule_that_fires_every_second_is_projected_at_once(tmp_path: Path) -> None:
    raw = {"dingtalk": {"app_key": "k", "app_secret": "s3cret"}, "sync": {"chatids": ["c"]}}
    config = parse_config(
        {**raw, "schedule": {"interval_seconds": 1}}, tmp_path / "c.toml", environ={}
    )
    month = quota_month(NOW, "UTC")
    fires = fire_times(config, month.start, month.end)
    assert len(fires) == 30 * 24 * 3600
    reads = reads_per_fire([chat("new"), read("gone", HOUR, None, status=2)], EVERY_RUN, fires)
    assert (reads.chats, reads.runs_reading) == (len(fires), len(fires))
