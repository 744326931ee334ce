"""The monthly API-call quota: its month, what is left, and where the month is heading. Pure.

DingTalk counts an organisation's calls per calendar month in China's time
(``[dingtalk] quota_timezone``); calls refused by throttling do not count. Error 90020 means the
month's quota is used up: nothing more until the next month begins.

The projection of the month's total: the calls made so far, plus what the schedule will spend
until the month ends (its fires times what each fire reads, from the poll plan) when a
schedule is configured, else this month's pace so far carried to the month's end.
Knows no database and no clock: ``now`` is given.
"""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from dataclasses import dataclass
from typing import Final

# errcode: the organisation's monthly call quota is used up.
QUOTA_EXHAUSTED: Final = 90020


@dataclass(frozen=True, slots=True)
class EndpointCalls:
    """Requests sent to one endpoint, and how many of them DingTalk refused as throttled
    (which it does not count against the quota)."""

    endpoint: str
    calls: int
    throttled: int = 0


@dataclass(frozen=True, slots=True)
class QuotaMonth:
    """The quota month that contains a moment, as UTC instants."""

    start: dt.datetime
    end: dt.datetime

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


def quota_month(now: dt.datetime, timezone: str) -> QuotaMonth:
    """The calendar month of ``now`` in ``timezone``."""
    zone = zoneinfo.ZoneInfo(timezone)
    local = now.astimezone(zone)
    start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (start + dt.timedelta(days=32)).replace(day=1)
    return QuotaMonth(start.astimezone(dt.UTC), following.astimezone(dt.UTC))


def remaining(quota: int | None, used: int, exhausted: bool) -> int | None:
    """Calls left this month (None: no quota known); 0 once DingTalk said 90020."""
    if exhausted:
        return 0
    if quota is None:
        return None
    return max(0, quota - used)


@dataclass(frozen=True, slots=True)
class Projection:
    """The month's expected total and how it was reckoned."""

    calls: int
    basis: str  # "schedule" or "pace"


def project_by_pace(used: int, month: QuotaMonth, now: dt.datetime) -> Projection:
    """This month's pace so far, carried to the month's end."""
    elapsed = max(1.0, (now - month.start).total_seconds())
    return Projection(math.ceil(used * month.seconds / elapsed), "pace")


def project_by_schedule(
    used: int, chats_read: int, runs_reading: int, calls_per_run: int
) -> Projection:
    """``used`` plus what the schedule's remaining fires read: ``chats_read`` chats over
    ``runs_reading`` runs, each run paying ``calls_per_run`` (its token); a fire that reads
    no chat makes no call at all."""
    return Projection(used + chats_read + runs_reading * calls_per_run, "schedule")
