"""Five-field crontab expressions, read the way cron reads them, for APScheduler 3.

Bottom layer: imports nothing from the package. APScheduler 3 numbers weekdays from Monday
(0 = Monday), while crontab numbers them from Sunday (0 and 7 = Sunday), so a day-of-week
field is rewritten into weekday names before APScheduler sees it. Cron fires when *either* a
restricted day-of-month or a restricted day-of-week matches, APScheduler only when both do:
restricting both is refused rather than silently meaning something else.
"""

from __future__ import annotations

import datetime as dt

from apscheduler.triggers.cron import CronTrigger

FIELDS = ("minute", "hour", "day", "month", "day_of_week")
# crontab's numbering: 0 and 7 are Sunday.
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# APScheduler's order, used to list the days it is given.
_APS_ORDER = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def crontab_fields(expression: str) -> dict[str, str]:
    """The ``CronTrigger`` keyword arguments for ``expression``; ``ValueError`` says what is wrong.

    >>> crontab_fields("10 8 * * 1-5")["day_of_week"]
    'mon,tue,wed,thu,fri'
    """
    values = expression.split()
    if len(values) != len(FIELDS):
        raise ValueError(
            f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(values)}"
        )
    fields = dict(zip(FIELDS, values, strict=True))
    if fields["day"] != "*" and fields["day_of_week"] != "*":
        raise ValueError(
            "restricting both day-of-month and day-of-week is not supported (cron would fire "
            "on either, this scheduler only on both); restrict one of them"
        )
    fields["day_of_week"] = _weekdays(fields["day_of_week"])
    return fields


def cron_trigger(
    expression: str, timezone: dt.tzinfo, jitter_seconds: int | None = None
) -> CronTrigger:
    """A validated ``CronTrigger`` for a crontab expression; ``ValueError`` when it is invalid."""
    fields = crontab_fields(expression)
    try:
        return CronTrigger(**fields, timezone=timezone, jitter=jitter_seconds or None)
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("Error validating expression ")) from None


def check_crontab(expression: str) -> None:
    """Raise ``ValueError`` with a reason unless ``expression`` is a usable crontab line."""
    cron_trigger(expression, dt.UTC)


def _weekdays(field: str) -> str:
    """A crontab day-of-week field as a list of names APScheduler reads the same way."""
    if field == "*":
        return "*"
    days: set[int] = set()
    for part in field.split(","):
        span, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"day-of-week {part!r}: the step must be a whole number >= 1")
            step = int(step_text)
        if span == "*":
            low, high = 0, 6
        elif "-" in span:
            first, last = span.split("-", 1)
            low, high = _day(first, part), _day(last, part)
            if low > high:
                raise ValueError(f"day-of-week {part!r}: the range runs backwards")
        else:
            low = _day(span, part)
            high = 7 if slash else low  # "1/2" is "1-7/2", as cronie reads it
        days.update(day % 7 for day in range(low, high + 1, step))
    if len(days) == len(_CRON_DAYS):
        return "*"
    names = {_CRON_DAYS[day] for day in days}
    return ",".join(name for name in _APS_ORDER if name in names)


def _day(text: str, part: str) -> int:
    if text.isdigit() and int(text) <= 7:
        return int(text)
    name = text.lower()
    if name in _CRON_DAYS:
        return _CRON_DAYS.index(name)
    raise ValueError(
        f"day-of-week {part!r}: {text!r} is not a day (0-7 with 0 and 7 = Sunday, or sun-sat)"
    )
