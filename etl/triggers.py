"""When `schedule` fires: the APScheduler trigger of ``[schedule]``, and the fires it makes.

Used by the scheduler (to fire) and by the API budget (to project a month's calls). Knows the
configuration and APScheduler's triggers only.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import zoneinfo
from collections.abc import Iterator, Sequence
from typing import Any, overload

from apscheduler.triggers.base import BaseTrigger

from etl.config import SCHEDULE_TRIGGERS, Config, has_schedule
from etl.crontab import cron_trigger
from etl.errors import ConfigError


def build_trigger(config: Config) -> Any:
    """The APScheduler trigger of ``[schedule]``; ``ConfigError`` when there is none."""
    settings = config.schedule
    timezone = zoneinfo.ZoneInfo(settings.timezone)
    jitter = settings.jitter_seconds or None
    if settings.cron is not None:
        try:
            return cron_trigger(settings.cron, timezone, jitter)
        except ValueError as exc:  # validated at load time; kept for direct callers
            raise ConfigError(f"{config.path}: [schedule] cron: {exc}") from None
    seconds = settings.interval_seconds
    if settings.interval_minutes is not None:
        seconds = settings.interval_minutes * 60
    if seconds is None:
        keys = ", ".join(SCHEDULE_TRIGGERS[:2])
        raise ConfigError(
            f"{config.path}: [schedule] {keys}: `dingtalk-etl schedule` needs one of them "
            '(e.g. cron = "10 * * * *")'
        )
    return AlignedInterval(seconds, timezone=timezone, jitter=jitter)


class AlignedInterval(BaseTrigger):  # type: ignore[misc]  # APScheduler has no type hints
    """Every ``seconds`` at multiples of ``seconds`` since the UTC epoch, plus 0..``jitter``.

    Unlike APScheduler's IntervalTrigger, the fires stay on the same slots whatever the start
    time (``run_on_start``, a restart) and the jitter does not accumulate, so instances on
    several machines fire together. ``jitter`` should stay below ``seconds``.
    """

    def __init__(
        self, seconds: int, *, timezone: dt.tzinfo = dt.UTC, jitter: int | None = None
    ) -> None:
        self.seconds = seconds
        self.timezone = timezone
        self.jitter = jitter

    def get_next_fire_time(
        self, previous_fire_time: dt.datetime | None, now: dt.datetime
    ) -> dt.datetime:
        slot = math.ceil(now.timestamp() / self.seconds) * self.seconds
        if previous_fire_time is not None:
            # A jittered fire lies less than `seconds` after its slot.
            previous_slot = math.floor(previous_fire_time.timestamp() / self.seconds)
            slot = max(slot, (previous_slot + 1) * self.seconds)
        when = float(slot) + (random.uniform(0, self.jitter) if self.jitter else 0.0)
        return dt.datetime.fromtimestamp(when, tz=self.timezone)

    def __str__(self) -> str:
        return f"every {self.seconds}s aligned to the epoch"


def describe_trigger(config: Config) -> str:
    settings = config.schedule
    if settings.cron is not None:
        return f"cron {settings.cron!r} in {settings.timezone}"
    if settings.interval_minutes is not None:
        return f"every {settings.interval_minutes} minutes"
    return f"every {settings.interval_seconds} seconds"


def fires_between(trigger: Any, start: dt.datetime, end: dt.datetime) -> Iterator[dt.datetime]:
    """The trigger's fire times from ``start`` until before ``end``."""
    previous: dt.datetime | None = None
    now = start
    while True:
        fire: dt.datetime | None = trigger.get_next_fire_time(previous, now)
        if fire is None or fire >= end:
            return
        yield fire
        previous, now = fire, fire + dt.timedelta(microseconds=1)


class _Slots(Sequence[dt.datetime]):
    """An interval's fire times as a sequence computed on demand (one every second is
    2.6 million a month: too many to list for a projection)."""

    def __init__(self, first: int, count: int, seconds: int, tz: dt.tzinfo) -> None:
        self._first, self._count, self._seconds, self._tz = first, count, seconds, tz

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> dt.datetime: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[dt.datetime]: ...
    def __getitem__(self, index: int | slice) -> dt.datetime | Sequence[dt.datetime]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(index)
        return dt.datetime.fromtimestamp((self._first + index) * self._seconds, tz=self._tz)


def fire_times(config: Config, start: dt.datetime, end: dt.datetime) -> Sequence[dt.datetime]:
    """When ``[schedule]`` fires from ``start`` until before ``end``, in order (an interval's
    jitter left out), as ``fires_between`` lists them."""
    trigger = build_trigger(config)
    if isinstance(trigger, AlignedInterval):
        seconds = trigger.seconds
        first = math.ceil(start.timestamp() / seconds)
        last = math.ceil(end.timestamp() / seconds) - 1
        return _Slots(first, max(0, last - first + 1), seconds, trigger.timezone)
    return list(fires_between(trigger, start, end))


def next_fire(config: Config, now: dt.datetime) -> dt.datetime | None:
    """When ``[schedule]`` fires next after ``now`` (None without a schedule)."""
    if not has_schedule(config):
        return None
    later = now + dt.timedelta(seconds=1)  # a run that starts at its fire: the one after
    fire: dt.datetime | None = build_trigger(config).get_next_fire_time(None, later)
    return fire
