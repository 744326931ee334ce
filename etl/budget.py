"""The API budget, put together: which chats a run reads, and where the month is heading.

Orchestrates ``etl.polling`` and ``etl.quota`` (pure) over ``etl.budgetstore`` (SQL), the
listener's row (``etl.eventstore``) and the schedule's trigger (``etl.triggers``). Used by the
sync (``choose_chats``), the scheduler and the listener's reconciles (``exhausted``: whether
DingTalk said 90020 this month), ``status`` and the metrics file (``month_budget``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import structlog
from sqlalchemy import Engine

from etl.budgetstore import BudgetLog
from etl.config import Config, has_schedule
from etl.eventstore import ListenerLog
from etl.polling import (
    TOKEN_CALLS_PER_RUN,
    ChatPoll,
    PollPolicy,
    Selection,
    affordable_chats,
    lookahead,
    reads_per_fire,
    select,
)
from etl.quota import (
    Projection,
    QuotaMonth,
    project_by_pace,
    project_by_schedule,
    quota_month,
    remaining,
)

log = structlog.get_logger("etl.budget")

# A listener whose row was updated this recently counts as connected (it beats every 5 s).
LISTENER_FRESH_SECONDS: Final = 30.0


@dataclass(frozen=True)
class MonthBudget:
    """This quota month's calls: used so far, the quota, 90020, the projected total."""

    month: QuotaMonth
    used: int
    quota: int | None
    exhausted_at: dt.datetime | None
    projection: Projection

    @property
    def remaining(self) -> int | None:
        return remaining(self.quota, self.used, self.exhausted_at is not None)

    @property
    def projected_share(self) -> float | None:
        """The projection as a share of the quota (1.0 = all of it); None without a quota."""
        if self.quota is None:
            return None
        return self.projection.calls / self.quota

    @property
    def exceeds(self) -> bool:
        share = self.projected_share
        return share is not None and share > 1.0


def policy(config: Config, engine: Engine, now: dt.datetime) -> PollPolicy:
    """The poll policy a run starting ``now`` applies, from what the database says."""
    return make_policy(
        config,
        now,
        previous_run_seconds=BudgetLog(engine).last_run_seconds(),
        listener_connected=listener_connected(engine, now),
    )


def make_policy(
    config: Config,
    now: dt.datetime,
    *,
    previous_run_seconds: float | None,
    listener_connected: bool,
) -> PollPolicy:
    """The poll policy of ``config`` for a run starting ``now`` (pure)."""
    return PollPolicy(
        polling=config.sync.polling,
        base_seconds=config.sync.poll_interval_seconds,
        max_seconds=config.sync.max_poll_interval_seconds,
        lookahead_seconds=lookahead(previous_run_seconds, config.schedule.jitter_seconds),
        listener_connected=listener_connected,
        reconcile_delay_seconds=config.events.reconcile_delay_seconds,
        next_run_at=_next_fire(config, now),
    )


def _next_fire(config: Config, now: dt.datetime) -> dt.datetime | None:
    if not has_schedule(config):
        return None
    from etl.triggers import next_fire  # APScheduler: only with a schedule

    return next_fire(config, now)


def listener_connected(engine: Engine, now: dt.datetime) -> bool:
    """Whether a `listen` is connected to DingTalk now (its row says so, and is fresh)."""
    row = ListenerLog(engine).latest()
    if row is None or not row["connected"] or row["stopped_at"] is not None:
        return False
    age: float = (now - row["updated_at"]).total_seconds()
    return age <= LISTENER_FRESH_SECONDS


def exhausted(config: Config, engine: Engine, now: dt.datetime) -> dt.datetime | None:
    """When DingTalk said 90020 in the quota month of ``now``, if it did."""
    month = quota_month(now, config.dingtalk.quota_timezone)
    return BudgetLog(engine).exhausted_since(month.start)


def choose_chats(
    config: Config,
    engine: Engine,
    synced: Sequence[str],
    now: dt.datetime,
) -> Selection:
    """The chats of ``synced`` a run without chat arguments reads.

    The poll plan decides which are due; with ``[dingtalk] monthly_call_quota``, only as many
    as the month's calls left pay for (the rest are deferred, and logged).
    """
    budget = BudgetLog(engine)
    month = quota_month(now, config.dingtalk.quota_timezone)
    quota = config.dingtalk.monthly_call_quota
    exhausted_at = budget.exhausted_since(month.start)
    used = budget.used_since(month.start) if quota is not None else 0
    left = remaining(quota, used, exhausted_at is not None)
    selection = select(
        budget.poll_plan(synced),
        policy(config, engine, now),
        now,
        affordable=affordable_chats(left),
    )
    if selection.deferred:
        log.warning(
            "quota.chats_deferred",
            deferred=len(selection.deferred),
            reading=len(selection.due),
            calls_left=left,
            quota=quota,
            exhausted_at=exhausted_at.isoformat() if exhausted_at else None,
            month_resets_at=month.end.isoformat(),
        )
    return selection


def month_budget(
    config: Config,
    engine: Engine,
    synced: Sequence[str] | Callable[[], Sequence[str]],
    now: dt.datetime,
) -> MonthBudget:
    """This month's calls so far and the projected total at its end.

    ``synced``: the synced set, or how to get it (only a projection by schedule needs it).

    With a ``[schedule]``, the projection adds what each remaining fire reads by the poll
    plan (each chat keeping its current interval) and its token call, plus the calls made
    outside the schedule (reconciles, the listener, manual syncs) at this month's pace;
    without one, it carries this month's pace so far to the month's end.
    """
    budget = BudgetLog(engine)
    month = quota_month(now, config.dingtalk.quota_timezone)
    used = budget.used_since(month.start)
    exhausted_at = budget.exhausted_since(month.start)
    if has_schedule(config):
        from etl.triggers import fire_times  # APScheduler: only with a schedule

        fires = fire_times(config, now, month.end)
        chatids = synced() if callable(synced) else synced
        plan: list[ChatPoll] = budget.poll_plan(chatids)
        reads = reads_per_fire(plan, policy(config, engine, now), fires)
        by_schedule = project_by_schedule(
            used, reads.chats, reads.runs_reading, TOKEN_CALLS_PER_RUN
        )
        outside = budget.used_since(month.start, exclude_source="schedule")
        extra = project_by_pace(outside, month, now).calls - outside
        projection = Projection(by_schedule.calls + extra, "schedule")
    else:
        projection = project_by_pace(used, month, now)
    return MonthBudget(month, used, config.dingtalk.monthly_call_quota, exhausted_at, projection)


def warn_if_over(config: Config, engine: Engine, synced: Sequence[str], now: dt.datetime) -> None:
    """Log ``quota.projection_exceeds`` when the month's projection passes the quota."""
    if config.dingtalk.monthly_call_quota is None:
        return
    month = month_budget(config, engine, synced, now)
    if month.exceeds:
        log.warning(
            "quota.projection_exceeds",
            projected_calls=month.projection.calls,
            basis=month.projection.basis,
            quota=month.quota,
            calls_this_month=month.used,
            month_resets_at=month.month.end.isoformat(),
            hint='poll less often ([schedule], [sync] polling = "adaptive") or listen to '
            "group events ([events])",
        )
