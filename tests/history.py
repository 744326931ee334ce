"""A large history, written straight into a migrated database by bulk inserts: what weeks of
daily syncs of many chats leave in the tables, in seconds instead of simulated syncs.

One sync run per day reads every chat. At the first, each chat is discovered with a baseline
of ``BASELINE`` members; on every later day, each chat changes ``per_day`` times (the last
``busy`` chats ``BUSY_FACTOR`` times as often): users join and leave (a user leaves the day
after joining), and every tenth change is a rename. Every change is a ``poll`` row at its
run's time, as a sync writes it. The runs start at 18:15 UTC, midnight in Kathmandu
(UTC+05:45): a day in a zone whose offset is not whole hours starts with them. Rows go in
through the product's table definitions (``etl.schema``), so the reports read them as they
would read a real history.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import URL

from etl.db import create_db_engine
from etl.schema import chat_events, sync_run_items, sync_runs
from etl.schema import chats as chats_table

START = dt.datetime(2026, 1, 1, 18, 15, tzinfo=dt.UTC)
BASELINE = 5
BUSY_FACTOR = 3
BATCH = 5000
# Every key of a chat_events row: one executemany takes rows of the same keys.
EVENT: dict[str, Any] = {
    "userid": None,
    "field": None,
    "old_value": None,
    "new_value": None,
    "is_baseline": False,
}


@dataclass(frozen=True)
class History:
    url: URL
    chats: int
    days: int
    per_day: int
    busy: int

    @property
    def daily(self) -> int:
        """Changes of every chat on one day after the first."""
        return (self.chats + (BUSY_FACTOR - 1) * self.busy) * self.per_day

    @property
    def changes(self) -> int:
        """Changes (not baseline rows) in the whole history."""
        return self.changes_between(1, self.days - 1)

    def changes_between(self, first_day: int, last_day: int) -> int:
        """Changes of the runs of days ``first_day`` to ``last_day`` (both included, >= 1)."""
        return (last_day - first_day + 1) * self.daily

    def changes_of(self, number: int) -> int:
        """Changes of chat ``number`` in the whole history."""
        return (self.days - 1) * self.per_day * (BUSY_FACTOR if self.is_busy(number) else 1)

    def is_busy(self, number: int) -> bool:
        return number >= self.chats - self.busy

    @staticmethod
    def at(day: int) -> dt.datetime:
        """When the run of day ``day`` (0: the first) read the chats."""
        return _at(day)


def chatid(number: int) -> str:
    return f"chat-{number:05d}"


def build_history(url: URL, *, chats: int, days: int, per_day: int, busy: int = 0) -> History:
    """Write the history into the migrated, empty database at ``url``."""
    history = History(url, chats, days, per_day, busy)
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(sync_runs), list(_runs(days, chats)))
            conn.execute(insert(chats_table), [_chat(n, days) for n in range(chats)])
            for batch in _batched(_items(chats, days)):
                conn.execute(insert(sync_run_items), batch)
            for batch in _batched({**EVENT, **row} for row in _events(history)):
                conn.execute(insert(chat_events), batch)
    finally:
        engine.dispose()
    return history


def _at(day: int) -> dt.datetime:
    return START + dt.timedelta(days=day)


def _runs(days: int, chats: int) -> Iterator[dict[str, Any]]:
    for day in range(days):
        yield {
            "id": day + 1,
            "started_at": _at(day),
            "finished_at": _at(day) + dt.timedelta(minutes=5),
            "status": "ok",
            "trigger": "schedule",
            "chats_total": chats,
            "chats_succeeded": chats,
        }


def _chat(number: int, days: int) -> dict[str, Any]:
    return {
        "chatid": chatid(number),
        "name": f"Project team {number} (renamed {days - 1} times)",
        "owner_userid": f"owner{number:05d}",
        "searchable": 0,
        "validation_type": 1,
        "mention_all_authority": 1,
        "management_type": 1,
        "status": 1,
        "member_count": BASELINE,
        "first_seen_at": _at(0),
        "last_synced_at": _at(days - 1),
        "last_changed_at": _at(days - 1),
        "raw": {},
        "fingerprint": "0" * 64,
    }


def _items(chats: int, days: int) -> Iterator[dict[str, Any]]:
    for day in range(days):
        for number in range(chats):
            yield {"run_id": day + 1, "chatid": chatid(number), "status": "ok", "changed": True}


def _events(history: History) -> Iterator[dict[str, Any]]:
    for number in range(history.chats):
        chat = chatid(number)
        poll = {"chatid": chat, "source": "poll", "run_id": 1}
        yield {**poll, "event_type": "chat_discovered", **_times(0, 0)}
        for member in range(BASELINE):
            user = f"user{number:05d}-{member}"
            yield {
                **poll,
                "event_type": "member_joined",
                "userid": user,
                "is_baseline": True,
                **_times(0, member + 1),
            }
    for day in range(1, history.days):
        for number in range(history.chats):
            poll = {"chatid": chatid(number), "source": "poll", "run_id": day + 1}
            count = history.per_day * (BUSY_FACTOR if history.is_busy(number) else 1)
            for change in range(count):
                yield {**poll, **_change(number, day, change), **_times(day, change)}


def _change(number: int, day: int, change: int) -> dict[str, Any]:
    if change % 10 == 9:
        return {
            "event_type": "attribute_changed",
            "field": "name",
            "old_value": f"Project team {number} (renamed {day - 1} times)",
            "new_value": f"Project team {number} (renamed {day} times)",
        }
    # Joins on odd days, the same users leave on the even day after.
    user = f"guest{number:05d}-{change}"
    kind = "member_joined" if day % 2 else "member_left"
    return {"event_type": kind, "userid": user}


def _times(day: int, offset: int) -> dict[str, dt.datetime]:
    # The rows of one chat's read share its time in a real sync; a microsecond apart here
    # keeps their order plain to the eye as well.
    at = _at(day) + dt.timedelta(microseconds=offset)
    return {"observed_at": at, "occurred_at": at}


def _batched(rows: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
