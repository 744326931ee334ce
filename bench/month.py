"""A month in a minute: the product's real scheduling decisions over a simulated month.

Boundary: a model of the world and of event delivery around the product's real scheduling
code, *not* a run of the sync. No HTTP, no database, no threads, no wall clock: pure Python
with an injected clock, one event queue per setup. What is real and what is modelled:

Real (imported from ``etl``, called as the product calls them, ``now`` given by the clock):

- the configuration: ``parse_config`` builds each setup's ``Config`` (``[schedule] cron``,
  ``[sync] polling``, ``poll_interval_seconds``, ``max_poll_interval_seconds``,
  ``[events] reconcile_delay_seconds``, ``[dingtalk] monthly_call_quota`` and
  ``quota_timezone``);
- when runs fire: ``build_trigger(config)`` (APScheduler's cron trigger) and ``fires_between``;
- which chats a run reads: ``polling.select`` with a ``PollPolicy`` built from that config,
  its ``lookahead`` from the previous run's span, ``listener_connected`` for the event setup,
  the chats' ``events_waiting_since``; with ``--quota``, ``affordable_chats(remaining(...))``
  from the calls this quota month (``quota_month``) has spent, as ``budget.choose_chats`` does;
- what a read does to the plan: ``NextPoll.after(previous interval, changed)`` from the run's
  (or reconcile's) start, as ``store.py`` applies it (adaptive polling only);
- the listener's access token: ``dingtalk.TokenCache`` (refreshed 300 s before its 7,200 s
  lifetime ends), one for all reconciles, as ``sync.ReconcileRuns`` keeps one client.

Modelled (stated, not measured):

- the world: ``--chats`` chats; each day ``--change-rate`` of the chats not dismissed change
  once at a random time of day (a member added or removed), and with probability
  ``--follow-ups`` a change is followed 1-60 s later by another of the same chat (several
  members added one after another), repeatedly; ``--dismissals-per-week`` chats are dismissed
  at random times in each week (a dismissal is a change too, the chat's last);
- a read: one chat/get at ``fire + k / max_requests_per_second`` (the run's token first);
  the read writes a row for every change of the chat since its previous read, at the read's
  time; ``changed`` = the world changed since the chat's previous read;
- a run: one gettoken call (a new client per run) when it reads at least one chat;
- events (setup "adaptive + events"): the listener is connected all month; each change's
  event is written to ``chat_events`` ``--latency`` seconds after the change (a constant:
  ``bench/events.py`` measures the real listener's ACK latency, p99 44-74 ms); ``--lost-events``
  of the changes send no event and wait for the chat's next read; the reconciler reads a chat
  ``reconcile_delay_seconds`` after its last event's arrival (one chat/get per burst, as
  ``etl.reconciler`` does it: a later event moves the reconcile); the gateway's
  ``connections/open`` is counted ``--reconnects-per-day`` times a day;
- the quota: a call with the month's quota spent gets 90020 (not counted, the caller stops):
  the scheduler then reads nothing more this month (``remaining`` is 0), reconciles are
  refused, events are still written on arrival.

The month is November 2026 in the quota's time zone (30 days), after ``--warmup-days`` of
the same world (changes, no dismissals, calls not counted) so that the poll plan starts the
month in its steady state; it runs on past the month's end (at most a day plus
``max_poll_interval_seconds``, calls not counted) until the month's last changes are recorded.

    .venv/bin/python bench/month.py                      # 300 chats, 30 days
    .venv/bin/python bench/month.py --quota 5000         # with DingTalk's standard quota
    .venv/bin/python bench/month.py --chats 60 --json month.json

Exit status: 0 when "adaptive + events" spends at most 10% of "every_run"'s calls with every
change recorded, its p95 delay under 1 s for changes that came as events and under
``max_poll_interval_seconds`` for the others; 1 otherwise; 2 on a usage error.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from etl.budget import make_policy
from etl.config import Config, parse_config
from etl.dingtalk import TokenCache
from etl.polling import (
    ChatPoll,
    NextPoll,
    affordable_chats,
    select,
)
from etl.quota import quota_month, remaining
from etl.triggers import build_trigger, fires_between

# A day of the month that fixes which month is simulated (November: 30 days).
MONTH_OF: dt.datetime = dt.datetime(2026, 11, 15, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
WEEK = dt.timedelta(days=7)
# A follow-up change of the same chat comes this many seconds after the previous one.
FOLLOW_UP_GAP = (1.0, 60.0)
MAX_SHARE_OF_EVERY_RUN = 0.10
MAX_EVENT_P95_SECONDS = 1.0
GETTOKEN, CHAT_GET, GATEWAY = "gettoken", "chat/get", "gateway/connections/open"

# Event queue kinds, in the order they run when they fall on the same instant.
_ARRIVAL, _RECONCILE, _GATEWAY, _FIRE, _READ = range(5)


@dataclass(frozen=True, slots=True)
class Change:
    chat: int
    at: dt.datetime
    lost: bool  # its event never arrives
    dismissal: bool = False


@dataclass(frozen=True)
class World:
    """The chats and every change of the simulated span (warm-up and tail included)."""

    chatids: tuple[str, ...]
    changes: tuple[Change, ...]  # by time
    by_chat: tuple[tuple[int, ...], ...]  # indices into ``changes``, by time
    times_by_chat: tuple[tuple[dt.datetime, ...], ...]
    dismissed_at: dict[int, dt.datetime]


def generate_world(args: argparse.Namespace, start: dt.datetime, end: dt.datetime) -> World:
    """The same world and change sequence for every setup (one seeded generator)."""
    rng = random.Random(args.seed)
    n = args.chats
    never = dt.datetime.max.replace(tzinfo=dt.UTC)
    dismissed_at: dict[int, dt.datetime] = {}
    week_start = start
    while week_start < end:
        span = min(WEEK, end - week_start)
        count = round(args.dismissals_per_week * (span / WEEK))
        alive = [c for c in range(n) if c not in dismissed_at]
        for chat in rng.sample(alive, min(count, len(alive))):
            dismissed_at[chat] = week_start + span * rng.random()
        week_start += WEEK
    changes: list[Change] = []
    day = start - args.warmup_days * DAY
    while day < end:
        live = [c for c in range(n) if dismissed_at.get(c, never) > day]
        for chat in rng.sample(live, round(args.change_rate * len(live))):
            at = day + dt.timedelta(seconds=rng.uniform(0, 86_400))
            while at < min(end, dismissed_at.get(chat, never)):
                changes.append(Change(chat, at, rng.random() < args.lost_events))
                if rng.random() >= args.follow_ups:
                    break
                at += dt.timedelta(seconds=rng.uniform(*FOLLOW_UP_GAP))
        day += DAY
    for chat, at in sorted(dismissed_at.items()):
        changes.append(Change(chat, at, rng.random() < args.lost_events, dismissal=True))
    changes.sort(key=lambda c: (c.at, c.chat))
    by_chat: list[list[int]] = [[] for _ in range(n)]
    for index, change in enumerate(changes):
        by_chat[change.chat].append(index)
    return World(
        chatids=tuple(f"chat{i:05d}" for i in range(n)),
        changes=tuple(changes),
        by_chat=tuple(tuple(ids) for ids in by_chat),
        times_by_chat=tuple(tuple(changes[i].at for i in ids) for ids in by_chat),
        dismissed_at=dismissed_at,
    )


@dataclass(frozen=True)
class Setup:
    name: str
    polling: str
    events: bool


SETUPS = (
    Setup("every_run", "every_run", events=False),
    Setup("adaptive", "adaptive", events=False),
    Setup("adaptive + events", "adaptive", events=True),
)


def setup_config(setup: Setup, args: argparse.Namespace) -> Config:
    """The setup's configuration, through the product's own validation."""
    dingtalk: dict[str, Any] = {"quota_timezone": args.quota_timezone}
    if args.quota is not None:
        dingtalk["monthly_call_quota"] = args.quota
    raw: dict[str, Any] = {
        "dingtalk": dingtalk,
        "sync": {
            "polling": setup.polling,
            "poll_interval_seconds": args.poll_interval,
            "max_poll_interval_seconds": args.max_poll_interval,
        },
        "schedule": {"cron": args.cron},
        "events": {"enabled": setup.events, "reconcile_delay_seconds": args.reconcile_delay},
    }
    return parse_config(raw, Path("bench-month.toml"), need_api=False, environ={})


@dataclass
class Result:
    setup: str
    fires: int = 0  # in the month
    runs: int = 0  # scheduled runs that read at least one chat
    reconciles: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    refused: int = 0  # calls answered 90020
    quota_spent_at: dt.datetime | None = None  # when the month's last allowed call was made
    deferred: int = 0  # chats a run did not read for want of quota (summed over runs)
    changes: int = 0
    recorded: int = 0
    recorded_late: int = 0  # of ``recorded``, after the month's end
    event_delays: list[float] = field(default_factory=list)
    poll_delays: list[float] = field(default_factory=list)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


class Simulation:
    """One setup over the world: a time-ordered queue of fires, reads, events, reconciles."""

    def __init__(
        self,
        world: World,
        config: Config,
        setup: Setup,
        fires: Sequence[dt.datetime],
        args: argparse.Namespace,
        span: tuple[dt.datetime, dt.datetime, dt.datetime, dt.datetime],
    ) -> None:
        self.world, self.config, self.setup, self.args = world, config, setup, args
        self.warm_start, self.start, self.end, self.tail_end = span
        sync = config.sync
        self.base, self.max = sync.poll_interval_seconds, sync.max_poll_interval_seconds
        self.delay = dt.timedelta(seconds=config.events.reconcile_delay_seconds)
        self.latency = dt.timedelta(seconds=args.latency)
        self.call_gap = 1.0 / config.dingtalk.max_requests_per_second
        self.quota = config.dingtalk.monthly_call_quota
        self.plan = [ChatPoll(chatid) for chatid in world.chatids]
        self.index_of = {chatid: i for i, chatid in enumerate(world.chatids)}
        self.seen = [0] * len(world.chatids)  # changes of each chat its reads have seen
        self.recorded_at: list[dt.datetime | None] = [None] * len(world.changes)
        self.via_event = [False] * len(world.changes)
        self.reconcile_due: dict[int, dt.datetime] = {}
        # Calls DingTalk counted and its 90020, per quota month: "month" and the tail's "next".
        self.used = {"month": 0, "next": 0}
        self.exhausted = {"month": False, "next": False}
        self.last_run_seconds: float | None = None
        self.clock = self.warm_start
        self.tokens = TokenCache(self._fetch_token, lambda: self.clock.timestamp())
        self.result = Result(setup.name)
        self.queue: list[tuple[dt.datetime, int, int, Any]] = []
        self.seq = 0
        for fire in fires:
            self._push(fire, _FIRE, None)
        if setup.events:
            for index, change in enumerate(world.changes):
                if not change.lost:
                    self._push(change.at + self.latency, _ARRIVAL, index)
            every = DAY / args.reconnects_per_day if args.reconnects_per_day > 0 else None
            at = self.warm_start
            while every is not None and at < self.tail_end:
                self._push(at, _GATEWAY, None)
                at += every

    def _push(self, at: dt.datetime, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (at, kind, self.seq, payload))

    # -- calls and the quota -------------------------------------------------------------

    def _period(self, at: dt.datetime) -> str | None:
        if at < self.start:
            return None  # warm-up: the month before, not counted
        return "month" if at < self.end else "next"

    def _spend(self, at: dt.datetime, endpoint: str) -> bool:
        """One call at ``at``: False when DingTalk answers 90020 (the quota is spent)."""
        period = self._period(at)
        if period is None:
            return True
        if self.exhausted[period] or (self.quota is not None and self.used[period] >= self.quota):
            self.exhausted[period] = True
            if period == "month":
                self.result.refused += 1
            return False
        self.used[period] += 1
        if period == "month":
            self.result.calls[endpoint] += 1
            if self.used[period] == self.quota:
                self.result.quota_spent_at = at
        return True

    def _fetch_token(self) -> tuple[str, float]:
        if not self._spend(self.clock, GETTOKEN):
            raise _QuotaRefused
        return "token", 7200.0

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> Result:
        handlers: dict[int, Callable[[dt.datetime, Any], None]] = {
            _ARRIVAL: self._arrive,
            _RECONCILE: self._reconcile,
            _GATEWAY: self._gateway,
            _FIRE: self._fire,
            _READ: self._read_event,
        }
        month_changes = [
            i for i, c in enumerate(self.world.changes) if self.start <= c.at < self.end
        ]
        pending = set(month_changes)
        while self.queue:
            at, kind, _seq, payload = heapq.heappop(self.queue)
            if at >= self.tail_end:
                break
            if at >= self.end:
                # Past the month: only until its last changes are recorded.
                pending = {i for i in pending if self.recorded_at[i] is None}
                if not pending:
                    break
            self.clock = at
            handlers[kind](at, payload)
        self._tally(month_changes)
        return self.result

    def _tally(self, month_changes: Sequence[int]) -> None:
        result = self.result
        result.changes = len(month_changes)
        for index in month_changes:
            recorded = self.recorded_at[index]
            if recorded is None:
                continue
            result.recorded += 1
            result.recorded_late += recorded >= self.end
            delay = (recorded - self.world.changes[index].at).total_seconds()
            (result.event_delays if self.via_event[index] else result.poll_delays).append(delay)

    # -- what happens ----------------------------------------------------------------------

    def _fire(self, at: dt.datetime, _payload: None) -> None:
        """A scheduled run: the chats ``select`` picks, each read in turn at the paced rate."""
        config = self.config
        policy = make_policy(
            config,
            at,
            previous_run_seconds=self.last_run_seconds,
            listener_connected=self.setup.events,
        )
        period = self._period(at)
        affordable = None
        if self.quota is not None and period is not None:
            left = remaining(self.quota, self.used[period], self.exhausted[period])
            affordable = affordable_chats(left)
        selection = select(self.plan, policy, at, affordable=affordable)
        if period == "month":
            self.result.fires += 1
            self.result.deferred += len(selection.deferred)
        if not selection.due:
            self.last_run_seconds = 0.0  # nothing due: no token, no call
            return
        if not self._spend(at, GETTOKEN):
            self.last_run_seconds = 0.0
            return
        if period == "month":
            self.result.runs += 1
        next_poll = None
        if config.sync.polling == "adaptive":
            next_poll = NextPoll(at, self.base, self.max)
        for k, chatid in enumerate(selection.due, start=1):
            read_at = at + dt.timedelta(seconds=k * self.call_gap)
            self._push(read_at, _READ, (self.index_of[chatid], next_poll))
        self.last_run_seconds = (len(selection.due) + 1) * self.call_gap

    def _read_event(self, at: dt.datetime, payload: tuple[int, NextPoll | None]) -> None:
        chat, next_poll = payload
        period = self._period(at)
        if period is not None and self.exhausted[period]:
            return  # the run stopped at its 90020
        self._read(chat, at, next_poll)

    def _read(self, chat: int, at: dt.datetime, next_poll: NextPoll | None) -> bool:
        """One chat/get: rows for every change since the chat's last read; the plan updated."""
        if not self._spend(at, CHAT_GET):
            return False
        world = self.world
        seen, upto = self.seen[chat], bisect.bisect_right(world.times_by_chat[chat], at)
        changed = upto > seen
        for index in world.by_chat[chat][seen:upto]:
            if self.recorded_at[index] is None:
                self.recorded_at[index] = at
        self.seen[chat] = upto
        dismissed = world.dismissed_at.get(chat)
        status = 2 if dismissed is not None and dismissed <= at else 1
        before = self.plan[chat]
        interval, next_at = before.interval_seconds, before.next_poll_at
        if next_poll is not None:
            interval, next_at = next_poll.after(before.interval_seconds, changed)
        # A read marks the chat's waiting events reconciled.
        self.plan[chat] = ChatPoll(before.chatid, status, at, next_at, None, interval)
        return True

    def _arrive(self, at: dt.datetime, index: int) -> None:
        """A change's event: its chat_events row now; the chat's reconcile moves to later."""
        if self.recorded_at[index] is None:
            self.recorded_at[index] = at
            self.via_event[index] = True
        chat = self.world.changes[index].chat
        self.plan[chat] = replace(self.plan[chat], events_waiting_since=at)
        due = at + self.delay
        self.reconcile_due[chat] = due
        self._push(due, _RECONCILE, chat)

    def _reconcile(self, at: dt.datetime, chat: int) -> None:
        if self.reconcile_due.get(chat) != at:
            return  # a later event moved it
        del self.reconcile_due[chat]
        period = self._period(at)
        if period is not None and self.exhausted[period]:
            return  # refused until the next quota month (the month ends the simulation)
        try:
            self.tokens.get()
        except _QuotaRefused:
            return
        if period == "month":
            self.result.reconciles += 1
        self._read(chat, at, NextPoll(at, self.base, self.max))

    def _gateway(self, at: dt.datetime, _payload: None) -> None:
        self._spend(at, GATEWAY)  # refused or not, the model keeps the listener connected


class _QuotaRefused(Exception):
    pass


def percentile(values: Sequence[float], share: float) -> float | None:
    """Nearest-rank percentile (None without values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def human(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def simulate(args: argparse.Namespace) -> tuple[list[Result], dict[str, Any]]:
    configs = [setup_config(setup, args) for setup in SETUPS]
    month = quota_month(MONTH_OF, configs[0].dingtalk.quota_timezone)
    start = month.start
    end = start + args.days * DAY
    warm_start = start - args.warmup_days * DAY
    tail_end = end + DAY + dt.timedelta(seconds=args.max_poll_interval)
    world = generate_world(args, start, end)
    # Every setup has the same [schedule]: its fires, computed once.
    trigger = build_trigger(configs[0])
    fires = list(fires_between(trigger, warm_start - dt.timedelta(microseconds=1), tail_end))
    results = [
        Simulation(world, config, setup, fires, args, (warm_start, start, end, tail_end)).run()
        for setup, config in zip(SETUPS, configs, strict=True)
    ]
    info = {
        "month_start": start.isoformat(),
        "month_end": end.isoformat(),
        "dismissed": sum(1 for at in world.dismissed_at.values() if start <= at < end),
    }
    return results, info


def verdict(results: Sequence[Result], args: argparse.Namespace) -> list[tuple[str, bool]]:
    every_run, events = results[0], results[-1]
    share = events.total_calls / every_run.total_calls if every_run.total_calls else math.inf
    event_p95 = percentile(events.event_delays, 0.95)
    poll_p95 = percentile(events.poll_delays, 0.95)
    return [
        (
            f"adaptive + events spends {share:.1%} of every_run's calls (at most "
            f"{MAX_SHARE_OF_EVERY_RUN:.0%})",
            share <= MAX_SHARE_OF_EVERY_RUN,
        ),
        (
            f"adaptive + events records {events.recorded:,} of {events.changes:,} changes",
            events.recorded == events.changes,
        ),
        (
            f"adaptive + events p95 delay of changes that came as events: {human(event_p95)} "
            f"(under {human(MAX_EVENT_P95_SECONDS)})",
            event_p95 is None or event_p95 < MAX_EVENT_P95_SECONDS,
        ),
        (
            f"adaptive + events p95 delay of the other changes: {human(poll_p95)} (under "
            f"max_poll_interval, {human(args.max_poll_interval)})",
            poll_p95 is None or poll_p95 < args.max_poll_interval,
        ),
    ]


def table(results: Sequence[Result]) -> list[str]:
    base = results[0].total_calls
    header = (
        "| setup | calls | chat/get | gettoken | gateway | vs every_run | deferred | changes "
        "| recorded | events: n, median, p95 | not events: n, median, p95 |"
    )
    lines = [header, "|" + " --- |" * 11]
    for r in results:
        share = f"{r.total_calls / base:.1%}" if base else "-"
        late = f" ({r.recorded_late:,} after the month)" if r.recorded_late else ""
        lines.append(
            f"| {r.setup} | {r.total_calls:,} | {r.calls[CHAT_GET]:,} | {r.calls[GETTOKEN]:,} "
            f"| {r.calls[GATEWAY]:,} | {share} | {r.deferred:,} | {r.changes:,} "
            f"| {r.recorded:,}{late} "
            f"| {len(r.event_delays):,}, {human(median(r.event_delays))}, "
            f"{human(percentile(r.event_delays, 0.95))} "
            f"| {len(r.poll_delays):,}, {human(median(r.poll_delays))}, "
            f"{human(percentile(r.poll_delays, 0.95))} |"
        )
    return lines


def to_json(
    results: Sequence[Result],
    info: dict[str, Any],
    checks: Sequence[tuple[str, bool]],
    args: argparse.Namespace,
    seconds: float,
) -> dict[str, Any]:
    def delays(values: Sequence[float]) -> dict[str, Any]:
        return {
            "n": len(values),
            "median_seconds": median(values),
            "p95_seconds": percentile(values, 0.95),
        }

    return {
        "parameters": {k: v for k, v in vars(args).items() if k != "json"},
        **info,
        "seconds": round(seconds, 3),
        "setups": [
            {
                "setup": r.setup,
                "fires": r.fires,
                "runs": r.runs,
                "reconciles": r.reconciles,
                "calls": r.total_calls,
                "calls_by_endpoint": dict(r.calls),
                "refused_90020": r.refused,
                "quota_spent_at": r.quota_spent_at.isoformat() if r.quota_spent_at else None,
                "deferred": r.deferred,
                "changes": r.changes,
                "recorded": r.recorded,
                "recorded_after_the_month": r.recorded_late,
                "event_delay": delays(r.event_delays),
                "other_delay": delays(r.poll_delays),
            }
            for r in results
        ],
        "checks": [{"check": text, "ok": ok} for text, ok in checks],
        "ok": all(ok for _text, ok in checks),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A simulated month of the product's scheduling decisions (no HTTP, no "
        "database): API calls and change-to-row delays per setup."
    )
    add = parser.add_argument
    add("--chats", type=int, default=300, help="chats in the world (300)")
    add("--days", type=int, default=30, help="days simulated, from the month's start (30)")
    add("--change-rate", type=float, default=0.05, help="share of chats changing a day (0.05)")
    add("--seed", type=int, default=1, help="world seed (1)")
    add("--lost-events", type=float, default=0.02, help="share of changes with no event (0.02)")
    add("--quota", type=int, help="[dingtalk] monthly_call_quota (none)")
    add("--json", type=Path, help="also write the results to this file")
    add("--dismissals-per-week", type=int, default=3, help="chats dismissed a week (3)")
    add("--follow-ups", type=float, default=0.25, help="chance a change has a follow-up (0.25)")
    add("--warmup-days", type=int, default=7, help="days simulated before the month (7)")
    add("--latency", type=float, default=0.05, help="event delivery latency, s (0.05)")
    add("--reconnects-per-day", type=int, default=1, help="gateway opens a day (1)")
    add("--cron", default="10 * * * *", help="[schedule] cron (10 * * * *)")
    add("--poll-interval", type=int, default=3600, help="poll_interval_seconds (3600)")
    add("--max-poll-interval", type=int, default=86400, help="max_poll_interval_seconds")
    add("--reconcile-delay", type=float, default=30.0, help="reconcile_delay_seconds (30)")
    add("--quota-timezone", default="Asia/Shanghai", help="quota_timezone (Asia/Shanghai)")
    args = parser.parse_args(argv)
    if args.chats < 1 or not 1 <= args.days <= 30 or args.warmup_days < 0:
        parser.error("--chats must be at least 1, --days 1-30, --warmup-days at least 0")
    for name in ("change_rate", "lost_events", "follow_ups"):
        if not 0.0 <= getattr(args, name) <= (0.95 if name == "follow_ups" else 1.0):
            parser.error(f"--{name.replace('_', '-')} out of range")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    began = time.perf_counter()
    results, info = simulate(args)
    seconds = time.perf_counter() - began
    checks = verdict(results, args)
    quota = f", quota {args.quota:,} calls" if args.quota is not None else ", no quota"
    print(
        f"Month simulation: {args.chats} chats, {args.days} days from {info['month_start']} "
        f"(+{args.warmup_days} days warm-up), {args.change_rate:.0%} of chats change a day, "
        f"{info['dismissed']} dismissed, {args.lost_events:.0%} of events lost, "
        f"cron {args.cron!r}{quota}; seed {args.seed}; {seconds:.1f} s"
    )
    print(
        f"Model: events written {args.latency} s after their change (a constant); calls "
        "counted in the month only; no HTTP, no database."
    )
    print()
    for line in table(results):
        print(line)
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    if args.json is not None:
        payload = to_json(results, info, checks, args, seconds)
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return 0 if all(ok for _text, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
