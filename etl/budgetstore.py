"""The SQL of the API budget: calls counted, 90020s remembered, the poll plan read.

Knows SQL only. ``api_calls`` holds every HTTP request to DingTalk, counted by whoever sent it
(a run per writer batch and at its end, ``listen`` per gateway call), so that the calls of a
month are one sum, whatever process or machine made them. ``quota_exhaustions`` holds each
90020. ``poll_plan`` reads what ``etl.polling`` decides on for the synced set.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from sqlalchemy import Connection, Engine, bindparam, func, insert, select

from etl.db import database_errors
from etl.eventstore import RECONCILED_OUTCOMES
from etl.polling import ChatPoll
from etl.quota import EndpointCalls
from etl.schema import api_calls, chats, pushed_events, quota_exhaustions, sync_runs

_INSERT_CALLS = insert(api_calls)
_USED_SINCE = select(func.coalesce(func.sum(api_calls.c.calls - api_calls.c.throttled), 0)).where(
    api_calls.c.counted_at >= bindparam("since")
)
_EXHAUSTED_SINCE = select(func.max(quota_exhaustions.c.occurred_at)).where(
    quota_exhaustions.c.occurred_at >= bindparam("since")
)
# The whole table, not an IN list of the synced set: a list of thousands of chatids costs more
# to send and to plan than the rows of the chats that are not in it.
_PLAN = select(
    chats.c.chatid,
    chats.c.status,
    chats.c.last_synced_at,
    chats.c.next_poll_at,
    chats.c.poll_interval_seconds,
)
_WAITING = (
    select(pushed_events.c.chatid, func.max(pushed_events.c.received_at))
    .where(
        pushed_events.c.reconciled_at.is_(None),
        pushed_events.c.outcome.in_(RECONCILED_OUTCOMES),
        pushed_events.c.chatid.is_not(None),
    )
    .group_by(pushed_events.c.chatid)
)
_LAST_RUN_SECONDS = (
    select(sync_runs.c.started_at, sync_runs.c.finished_at)
    .where(sync_runs.c.finished_at.is_not(None), sync_runs.c.trigger != "event")
    .order_by(sync_runs.c.id.desc())
    .limit(1)
)


def record_calls(
    conn: Connection,
    calls: Iterable[EndpointCalls],
    *,
    source: str,
    at: dt.datetime,
    run_id: int | None = None,
) -> None:
    """Count ``calls`` in the caller's transaction (nothing when there are none)."""
    rows = [
        {
            "counted_at": at,
            "source": source,
            "endpoint": c.endpoint[:64],
            "calls": c.calls,
            "throttled": c.throttled,
            "run_id": run_id,
        }
        for c in calls
        if c.calls
    ]
    if rows:
        conn.execute(_INSERT_CALLS, rows)


def record_exhaustion(
    conn: Connection, *, at: dt.datetime, source: str, run_id: int | None, error: str
) -> None:
    conn.execute(
        insert(quota_exhaustions).values(
            occurred_at=at, source=source, run_id=run_id, error=error[:2000]
        )
    )


class BudgetLog:
    """What the database says of this month's calls and of the poll plan."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def count(self, calls: Iterable[EndpointCalls], *, source: str, at: dt.datetime) -> None:
        """Count calls made outside a run (the listener's gateway calls), in a transaction."""
        with database_errors("counting API calls"), self.engine.begin() as conn:
            record_calls(conn, calls, source=source, at=at)

    def used_since(self, since: dt.datetime, *, exclude_source: str | None = None) -> int:
        """Calls DingTalk counts (throttled ones excluded) since ``since``; without those of
        ``exclude_source``."""
        query = _USED_SINCE
        if exclude_source is not None:
            query = query.where(api_calls.c.source != exclude_source)
        with database_errors("counting this month's API calls"), self.engine.connect() as conn:
            return int(conn.execute(query, {"since": since}).scalar_one())

    def exhausted_since(self, since: dt.datetime) -> dt.datetime | None:
        """When DingTalk last answered 90020 since ``since``, if it did."""
        with database_errors("reading the quota's state"), self.engine.connect() as conn:
            at: dt.datetime | None = conn.execute(_EXHAUSTED_SINCE, {"since": since}).scalar()
            return at

    def last_run_seconds(self) -> float | None:
        """How long the last finished run (not a reconcile) took."""
        with database_errors("reading the last run"), self.engine.connect() as conn:
            row = conn.execute(_LAST_RUN_SECONDS).first()
        if row is None:
            return None
        seconds: float = (row.finished_at - row.started_at).total_seconds()
        return max(0.0, seconds)

    def poll_plan(self, chatids: Sequence[str]) -> list[ChatPoll]:
        """The plan's view of ``chatids``, in their order."""
        known: dict[str, tuple[int, dt.datetime, dt.datetime | None, int | None]] = {}
        with database_errors("reading the poll plan"), self.engine.connect() as conn:
            for chatid, status, synced_at, next_at, interval in conn.execute(_PLAN):
                known[chatid] = (status, synced_at, next_at, interval)
            waiting = {chatid: at for chatid, at in conn.execute(_WAITING)}
        plan = []
        for chatid in chatids:
            status, synced_at, next_at, interval = known.get(chatid, (None, None, None, None))
            plan.append(ChatPoll(chatid, status, synced_at, next_at, waiting.get(chatid), interval))
        return plan
