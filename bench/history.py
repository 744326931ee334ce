"""History generator: a year of daily syncs of many chats, written straight into the tables.

Boundary: a command-line tool beside the product, like the other scripts in ``bench/``. It
creates a database with the product's own migrations (``etl.migrate.upgrade``, i.e.
``alembic upgrade head``), then writes the rows that a daily ``dingtalk-etl sync`` of a
changing organisation would have left there, without running the sync: ``chats``,
``chat_members``, ``chat_events``, ``sync_runs``, ``sync_run_items`` and ``api_calls``, as
the contract (``/work/shared/contract.md``, "Tables" and "Group events") describes them. From
the product it uses the migrations, the column types' own converters (to check its timestamp
text) and ``etl.normalize.fingerprint`` (so that a later sync of the same state would find
each chat unchanged); it shares no code with the sync's writer and measures nothing of it.

The model (every draw from one ``random.Random(--seed)``, in a fixed order: the same options
give the same rows):

- ``--users`` userids (16 digits), drawn with weight ``1 / (rank + 20) ** 0.9``: a few users
  (an HR account, the management) are in most chats (at the defaults the busiest has
  about 1,860 memberships of 2,000 chats).
- ``--chats`` chats (``chat`` + 32 hex digits), one daily run reads them in chatid order, one
  every 50 ms from 02:10 UTC (``[schedule] cron = "10 2 * * *"``). A share ``--new-share`` of
  them is created during the year (the run of that day discovers it), the others exist from
  the first run. A chat's size is drawn around ``--members`` (log-normal, 3 to 3,000).
- At a chat's first read: ``chat_discovered``, then a ``member_joined`` with ``is_baseline``
  true per member. At every later read: with probability ``--attr-rate`` one attribute
  change (rename, new owner, a setting flipped, a new icon); about ``--churn`` of its members
  leave (never the owner) and as many join back toward its size: new users, or with
  probability ``--rejoin`` one of its last 32 leavers (its ``chat_members`` row re-opened).
  Events are written in the writer's order: attribute changes, joins, leaves (by userid).
- ``--dismiss-share`` of the chats are dismissed on a random day (``status`` ``'1'`` to
  ``'2'``, membership kept as last observed); a dismissed chat is never due again
  (``sync_runs.chats_skipped``).
- A read fails with probability ``--fail-rate`` (5 attempts, ``errcode`` -1, the run
  ``partial``; the chat keeps its data, and the model makes no change to it that day); 0.2%
  of reads need a second attempt (``retries``). ``api_calls`` counts each run's gettoken
  and chat/get requests.

Every row is a ``poll`` row (``occurred_at`` = ``observed_at``, ``run_id`` the day's run,
``operator_userid`` and ``event_id`` NULL). ``chat_members`` is exactly what replaying the
member events gives, and ``chats.member_count`` its current members.

Fast: on PostgreSQL the tables' indexes, keys and foreign keys are dropped, the rows streamed
by ``COPY ... FROM STDIN`` (three connections at once: events, members, run items) while
they are generated, the keys and indexes rebuilt from their own definitions and the tables
vacuumed and analysed (what autovacuum would have done by now); the schema ends exactly as
migrated. On SQLite: the named indexes dropped, sqlite3's ``executemany`` of plain tuples in
one transaction without a journal, the indexes recreated, WAL mode set back; no
``ANALYZE`` (the product runs none there).

    .venv/bin/python bench/history.py --kind postgresql --keep      # full size, ~4.8M events
    .venv/bin/python bench/history.py --kind sqlite --chats 50 --members 40 --days 30 --keep
    .venv/bin/python bench/history.py --url sqlite:////tmp/h.db --chats 20 --days 10 --json h.json

Without ``--url`` the database is created here (PostgreSQL: ``dingtalk_etl_bench_<pid>_history``
on ``--pg-url``'s server; SQLite: a file in a temporary folder) and dropped at the end unless
``--keep``. With ``--url`` it is the caller's: created if missing (PostgreSQL), refused if it
already holds tables, never dropped. Exit 0 on success, 1 on an error, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime as dt
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from etl.bulk import EVENT_COLUMNS as WRITER_EVENT_COLUMNS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

# The tables the generator fills, in load order (small ones after the streamed ones).
STREAMED = ("chat_events", "chat_members", "sync_run_items")
# Bulk-loaded tables whose keys and indexes are dropped for the load and rebuilt after.
REBUILT = ("chat_events", "chat_members", "sync_run_items", "sync_runs")
FLAG_FIELDS = (
    "chat_banned_type",
    "searchable",
    "validation_type",
    "mention_all_authority",
    "management_type",
    "show_history_type",
)
# API key of each chats column in chat_info (etl.normalize's mapping, in the API's order).
API_KEYS = {
    "conversation_tag": "conversationTag",
    "chat_banned_type": "chatBannedType",
    "searchable": "searchable",
    "validation_type": "validationType",
    "mention_all_authority": "mentionAllAuthority",
    "management_type": "managementType",
    "show_history_type": "showHistoryType",
}
RUN_MINUTE = (2, 10)  # 02:10 UTC, the daily schedule
READ_SPACING = 0.05  # seconds between two chats' reads: 20 requests/s
READ_MICROS = 50_000
MAX_CHATS = 1_000_000  # a run (one read every 50 ms from 02:10) ends the same day
POOL_SIZE = 32  # a chat's recent leavers, the ones that may join again
MAX_SIZE = 3000
RETRY_RATE = 0.002
FAILED_ERROR = "chat/get: errcode -1: system busy (gave up after 5 attempts)"

DEPARTMENTS = (
    "Sales",
    "Finance",
    "Engineering",
    "Support",
    "Marketing",
    "Logistics",
    "HR",
    "Legal",
    "Procurement",
    "Operations",
)
TOPICS = ("project", "team", "customers", "on-call", "launch", "weekly", "region", "partners")
REGIONS = ("North", "South", "East", "West", "Central", "Shanghai", "Shenzhen", "Beijing")


class HistoryError(Exception):
    pass


@dataclass(frozen=True)
class Params:
    chats: int = 2000
    members: int = 520
    days: int = 365
    churn: float = 0.0054
    users: int = 40_000
    rejoin: float = 0.05
    attr_rate: float = 0.03
    new_share: float = 0.05
    dismiss_share: float = 0.01
    fail_rate: float = 0.0001
    seed: int = 1
    start: str = "2025-11-30"


# --------------------------------------------------------------------------------------------
# The model


class Chat:
    """One chat's state while the history is generated."""

    __slots__ = (
        "attrs",
        "chatid",
        "dismiss_day",
        "first_day",
        "first_ts",
        "index",
        "joined",
        "last_changed_ts",
        "last_synced_ts",
        "members",
        "pool",
        "pos",
        "seen",
        "status",
        "target",
    )

    def __init__(self, index: int, chatid: str, target: int, users: int) -> None:
        self.index = index
        self.chatid = chatid
        self.target = target
        self.attrs: dict[str, Any] = {}
        self.status = 1
        self.first_day = 0
        self.dismiss_day = -1
        # Current members (user indices), the day each joined, and each one's place in both.
        self.members: list[int] = []
        self.joined: list[int] = []
        self.pos: dict[int, int] = {}
        # Recent leavers: user -> (joined day, left day); their rows are not final yet.
        self.pool: dict[int, tuple[int, int]] = {}
        # Every user ever a member: one bit each.
        self.seen = bytearray(users // 8 + 1)
        self.first_ts = self.last_synced_ts = self.last_changed_ts = ""

    def add(self, user: int, day: int) -> None:
        self.pos[user] = len(self.members)
        self.members.append(user)
        self.joined.append(day)
        self.seen[user >> 3] |= 1 << (user & 7)

    def remove(self, user: int) -> int:
        """Remove a current member; the day it joined."""
        i = self.pos.pop(user)
        joined = self.joined[i]
        last_user, last_day = self.members.pop(), self.joined.pop()
        if last_user != user:
            self.members[i], self.joined[i] = last_user, last_day
            self.pos[last_user] = i
        return joined

    def was_seen(self, user: int) -> bool:
        return bool(self.seen[user >> 3] & (1 << (user & 7)))


class Sink:
    """Where the rows go: ``PgSink`` (COPY text) or ``SqliteSink`` (tuples).

    Times are given as ``YYYY-MM-DD HH:MM:SS.ffffff`` text in UTC; event ids are the sink's
    (ascending in the order the rows are written, as the database's sequence would give)."""

    next_event_id = 1

    def member_events(
        self, run_id: int, chatid: str, ts: str, event_type: str, userids: list[str], base: bool
    ) -> None:
        raise NotImplementedError

    def event(
        self,
        run_id: int,
        chatid: str,
        ts: str,
        event_type: str,
        field: str | None,
        old: str | None,
        new: str | None,
    ) -> None:
        raise NotImplementedError

    def member(self, chatid: str, userid: str, joined: str, left: str | None) -> None:
        raise NotImplementedError

    def item(self, row: tuple[Any, ...]) -> None:
        raise NotImplementedError


class Generator:
    """Generates the history day by day into a ``Sink``; keeps the small tables' rows."""

    def __init__(self, params: Params) -> None:
        self.p = params
        self.rng = random.Random(params.seed)
        self.start = dt.datetime.fromisoformat(params.start).replace(
            hour=RUN_MINUTE[0], minute=RUN_MINUTE[1], tzinfo=None
        )
        rng = self.rng
        ids: set[str] = set()
        while len(ids) < params.users:
            ids.add(f"{rng.getrandbits(53):016d}")
        self.userids = sorted(ids)
        rng.shuffle(self.userids)  # rank (weight) unrelated to the id's order
        self.cum_weights: list[float] = []
        total = 0.0
        for rank in range(params.users):
            total += 1.0 / (rank + 20) ** 0.9
            self.cum_weights.append(total)
        self.total_weight = total
        # Chats in chatid order: the order each run reads them in.
        sigma = 0.9
        mu = math.log(params.members) - sigma * sigma / 2
        chatids = sorted({f"chat{rng.getrandbits(128):032x}" for _ in range(params.chats)})
        while len(chatids) < params.chats:  # pragma: no cover - a 128-bit collision
            chatids = sorted({*chatids, f"chat{rng.getrandbits(128):032x}"})
        self.chats = []
        for index, chatid in enumerate(chatids):
            size = min(MAX_SIZE, max(3, round(rng.lognormvariate(mu, sigma))))
            chat = Chat(index, chatid, size, params.users)
            if params.days > 1 and rng.random() < params.new_share:
                chat.first_day = rng.randrange(1, params.days)
            if chat.first_day + 1 < params.days and rng.random() < params.dismiss_share:
                chat.dismiss_day = rng.randrange(chat.first_day + 1, params.days)
            self.chats.append(chat)
        # Per day: the run's date, and its first read's time of day in microseconds.
        self.dates = [
            (self.start + dt.timedelta(days=d)).date().isoformat() for d in range(params.days)
        ]
        self.run_micros = [
            ((RUN_MINUTE[0] * 60 + RUN_MINUTE[1]) * 60 + (d * 37) % 60 + 1) * 1_000_000
            for d in range(params.days)
        ]
        self.runs: list[tuple[Any, ...]] = []
        self.api_calls: list[tuple[Any, ...]] = []
        self.counts = {"events": 0, "members": 0, "items": 0}
        self.memberships = [0] * params.users

    # -- time ----------------------------------------------------------------------------------

    def run_start(self, day: int) -> dt.datetime:
        return self.start + dt.timedelta(days=day, seconds=(day * 37) % 60)

    def read_ts(self, index: int, day: int) -> str:
        """When run ``day`` reads the chat at ``index``: its slot (a second after the run's
        start, then one every ``READ_SPACING``), plus up to 40 ms of jitter. Integer
        arithmetic, since it is asked millions of times: equal to ``run_start(day) +
        timedelta(...)`` as ``isoformat(" ", "microseconds")`` gives it (the runs start at
        02:10 and end the same day)."""
        micros = (
            self.run_micros[day] + index * READ_MICROS + (index * 7919 + day * 104_729) % 40_000
        )
        seconds, micros = divmod(micros, 1_000_000)
        minutes, seconds = divmod(seconds, 60)
        hours, minutes = divmod(minutes, 60)
        return f"{self.dates[day]} {hours:02d}:{minutes:02d}:{seconds:02d}.{micros:06d}"

    # -- draws ---------------------------------------------------------------------------------

    def poisson(self, lam: float) -> int:
        if lam <= 0:
            return 0
        if lam > 30:
            return max(0, round(self.rng.gauss(lam, math.sqrt(lam))))
        limit, k, prod = math.exp(-lam), 0, self.rng.random()
        while prod > limit:
            k += 1
            prod *= self.rng.random()
        return k

    def draw_user(self) -> int:
        return bisect.bisect_right(self.cum_weights, self.rng.random() * self.total_weight)

    def new_user(self, chat: Chat) -> int | None:
        """A user never in ``chat`` before (None after many tries: the chat has them all)."""
        for _ in range(200):
            user = self.draw_user()
            if user < self.p.users and not chat.was_seen(user):
                return user
        return None

    def chat_name(self) -> str:
        rng = self.rng
        return (
            f"{rng.choice(DEPARTMENTS)} {rng.choice(REGIONS)} {rng.choice(TOPICS)} "
            f"{rng.randrange(1, 1000):03d}"
        )

    # -- the history ---------------------------------------------------------------------------

    def generate(self, sink: Sink, progress: Callable[[int], None] | None = None) -> None:
        p = self.p
        for day in range(p.days):
            run_id = day + 1
            read = failed = changed = skipped = attempts = 0
            for chat in self.chats:
                if chat.first_day > day:
                    continue  # not created yet: not in the synced set
                if chat.status == 2:
                    skipped += 1  # dismissed: never due
                    continue
                read += 1
                ts = self.read_ts(chat.index, day)
                tries = 1
                if day == chat.first_day:
                    self.discover(sink, chat, day, ts, run_id)
                    did_change = True
                elif self.rng.random() < p.fail_rate:
                    failed += 1
                    attempts += 5
                    duration = self.rng.randrange(3_000, 15_000)
                    sink.item((run_id, chat.chatid, "failed", False, 5, -1, FAILED_ERROR, duration))
                    continue
                else:
                    if self.rng.random() < RETRY_RATE:
                        tries = 2
                    did_change = self.evolve(sink, chat, day, ts, run_id)
                chat.last_synced_ts = ts
                if did_change:
                    chat.last_changed_ts = ts
                    changed += 1
                attempts += tries
                duration = self.rng.randrange(40, 260) + (tries - 1) * 1000
                sink.item((run_id, chat.chatid, "ok", did_change, tries, None, None, duration))
            started = self.run_start(day)
            finished = started + dt.timedelta(
                seconds=1.3 + len(self.chats) * READ_SPACING, microseconds=day * 1013 % 1000
            )
            started_ts = started.isoformat(" ", "microseconds")
            finished_ts = finished.isoformat(" ", "microseconds")
            self.runs.append(
                (
                    run_id,
                    started_ts,
                    finished_ts,
                    "partial" if failed else "succeeded",
                    "schedule",
                    read,
                    read - failed,
                    failed,
                    changed,
                    attempts + 1,
                    attempts - read,
                    None,
                    "etl-1",
                    10_000 + day * 7 % 20_000,
                    skipped,
                )
            )
            self.api_calls.append((2 * day + 1, finished_ts, "schedule", "gettoken", 1, 0, run_id))
            self.api_calls.append(
                (2 * day + 2, finished_ts, "schedule", "chat/get", attempts, 0, run_id)
            )
            self.counts["items"] += read
            if progress is not None:
                progress(day)
        # Every membership still open to a re-join is final now.
        for chat in self.chats:
            for i, user in enumerate(chat.members):
                joined = self.read_ts(chat.index, chat.joined[i])
                sink.member(chat.chatid, self.userids[user], joined, None)
            for user, (joined_day, left_day) in chat.pool.items():
                self.emit_left(sink, chat, user, joined_day, left_day)
            self.counts["members"] += len(chat.members)

    def emit_left(self, sink: Sink, chat: Chat, user: int, joined_day: int, left_day: int) -> None:
        joined, left = self.read_ts(chat.index, joined_day), self.read_ts(chat.index, left_day)
        sink.member(chat.chatid, self.userids[user], joined, left)
        self.counts["members"] += 1

    def discover(self, sink: Sink, chat: Chat, day: int, ts: str, run_id: int) -> None:
        rng = self.rng
        while len(chat.members) < chat.target:
            user = self.new_user(chat)
            if user is None:
                break
            chat.add(user, day)
            self.memberships[user] += 1
        chat.attrs = {
            "name": self.chat_name(),
            "owner_userid": chat.members[0],
            "conversation_tag": 2,
            "chat_banned_type": 0,
            "searchable": int(rng.random() < 0.1),
            "validation_type": int(rng.random() < 0.6),
            "mention_all_authority": int(rng.random() < 0.7),
            "management_type": int(rng.random() < 0.8),
            "show_history_type": int(rng.random() < 0.5),
            "icon": "",
        }
        chat.first_ts = ts
        sink.event(run_id, chat.chatid, ts, "chat_discovered", None, None, None)
        userids = sorted(self.userids[u] for u in chat.members)
        sink.member_events(run_id, chat.chatid, ts, "member_joined", userids, True)
        self.counts["events"] += 1 + len(userids)

    def evolve(self, sink: Sink, chat: Chat, day: int, ts: str, run_id: int) -> bool:
        """One read of a known chat: its changes since the last read; whether any."""
        p, rng = self.p, self.rng
        if 0 <= chat.dismiss_day <= day:  # that day, or the first read after it
            chat.status = 2
            sink.event(run_id, chat.chatid, ts, "attribute_changed", "status", "1", "2")
            self.counts["events"] += 1
            return True
        changes = [self.attribute_change(chat)] if rng.random() < p.attr_rate else []
        left: list[int] = []
        for _ in range(min(self.poisson(p.churn * len(chat.members)), len(chat.members) - 2)):
            user = chat.members[rng.randrange(len(chat.members))]
            if user == chat.attrs["owner_userid"] or user in left:
                continue
            left.append(user)
        joined: list[int] = []
        for _ in range(self.poisson(p.churn * chat.target)):
            eligible = []
            if chat.pool and rng.random() < p.rejoin:
                eligible = [u for u, (_, gone) in chat.pool.items() if gone < day]
            if eligible:
                user = rng.choice(eligible)
                del chat.pool[user]  # its row re-opens: joined_at now, left_at NULL
            else:
                found = self.new_user(chat)
                if found is None:
                    continue
                user = found
                self.memberships[user] += 1
            chat.add(user, day)
            joined.append(user)
        for user in left:
            joined_day = chat.remove(user)
            chat.pool[user] = (joined_day, day)
            if len(chat.pool) > POOL_SIZE:
                oldest = next(iter(chat.pool))
                self.emit_left(sink, chat, oldest, *chat.pool.pop(oldest))
        for field, old, new in changes:
            sink.event(run_id, chat.chatid, ts, "attribute_changed", field, old, new)
        ids = self.userids
        if joined:
            users = sorted(ids[u] for u in joined)
            sink.member_events(run_id, chat.chatid, ts, "member_joined", users, False)
        if left:
            users = sorted(ids[u] for u in left)
            sink.member_events(run_id, chat.chatid, ts, "member_left", users, False)
        self.counts["events"] += len(changes) + len(joined) + len(left)
        return bool(changes or joined or left)

    def attribute_change(self, chat: Chat) -> tuple[str, str, str]:
        rng, attrs = self.rng, chat.attrs
        pick = rng.random()
        if pick < 0.35:
            old, attrs["name"] = attrs["name"], self.chat_name()
            return "name", old, attrs["name"]
        if pick < 0.55 and len(chat.members) > 1:
            old_owner = attrs["owner_userid"]
            new_owner = old_owner
            while new_owner == old_owner:
                new_owner = chat.members[rng.randrange(len(chat.members))]
            attrs["owner_userid"] = new_owner
            return "owner_userid", self.userids[old_owner], self.userids[new_owner]
        if pick < 0.6:
            old, attrs["icon"] = attrs["icon"], f"@lADP{rng.getrandbits(64):016x}"
            return "icon", old, attrs["icon"]
        field = rng.choice(FLAG_FIELDS)
        old_value = attrs[field]
        attrs[field] = 1 - old_value if old_value in (0, 1) else 0
        return field, str(old_value), str(attrs[field])

    # -- the small tables ----------------------------------------------------------------------

    def chat_rows(self) -> list[dict[str, Any]]:
        from etl.normalize import fingerprint

        rows = []
        for chat in self.chats:
            attrs = chat.attrs
            members = sorted(self.userids[u] for u in chat.members)
            dismissed = chat.status == 2
            info: dict[str, Any] = {
                "name": attrs["name"],
                "owner": self.userids[attrs["owner_userid"]],
                # DingTalk lists no members for a dismissed chat.
                "useridlist": [] if dismissed else members,
                **{key: attrs[column] for column, key in API_KEYS.items()},
                "icon": attrs["icon"],
                "status": chat.status,
                "chatid": chat.chatid,
            }
            dismissed_at = None
            if dismissed:
                dismissed_at = self.read_ts(chat.index, chat.dismiss_day)
            rows.append(
                {
                    "chatid": chat.chatid,
                    "name": attrs["name"],
                    "owner_userid": info["owner"],
                    **{column: attrs[column] for column in API_KEYS},
                    "icon": attrs["icon"],
                    "status": chat.status,
                    "member_count": len(members),
                    "first_seen_at": chat.first_ts,
                    "last_synced_at": chat.last_synced_ts,
                    "last_changed_at": chat.last_changed_ts,
                    "dismissed_at": dismissed_at,
                    "raw": info,
                    "fingerprint": fingerprint(info, None if dismissed else frozenset(members)),
                }
            )
        return rows

    def summary(self) -> dict[str, Any]:
        busiest = max(range(self.p.users), key=lambda u: (self.memberships[u], -u))
        first = [c for c in self.chats if c.first_day == 0] or self.chats
        largest = max(first, key=lambda c: (len(c.members), c.chatid))
        return {
            "busiest_userid": self.userids[busiest],
            "busiest_memberships": self.memberships[busiest],
            "largest_chatid": largest.chatid,
            "largest_members": len(largest.members),
            "first_run": self.runs[0][1] if self.runs else None,
            "last_run": self.runs[-1][1] if self.runs else None,
        }


# --------------------------------------------------------------------------------------------
# Sinks


RUN_COLUMNS = (
    "id",
    "started_at",
    "finished_at",
    "status",
    "trigger",
    "chats_total",
    "chats_succeeded",
    "chats_failed",
    "chats_changed",
    "api_calls",
    "retries",
    "error",
    "hostname",
    "pid",
    "chats_skipped",
)
# The writer's event columns (etl.bulk), with the ids the history assigns itself.
EVENT_COLUMNS = ("id", *WRITER_EVENT_COLUMNS)
MEMBER_COLUMNS = ("chatid", "userid", "joined_at", "left_at")
ITEM_COLUMNS = (
    "run_id",
    "chatid",
    "status",
    "changed",
    "attempts",
    "errcode",
    "error",
    "duration_ms",
)
CALL_COLUMNS = ("id", "counted_at", "source", "endpoint", "calls", "throttled", "run_id")
CHAT_COLUMNS = (
    "chatid",
    "name",
    "owner_userid",
    *API_KEYS,
    "icon",
    "status",
    "member_count",
    "first_seen_at",
    "last_synced_at",
    "last_changed_at",
    "dismissed_at",
    "raw",
    "fingerprint",
)
FLUSH_LINES = 20_000


def _copy_text(value: Any) -> str:
    """A value in COPY's text format."""
    if value is None:
        return "\\N"
    if value is True or value is False:
        return "t" if value else "f"
    text = str(value)
    if any(c in text for c in "\\\t\n\r"):
        text = (
            text.replace("\\", "\\\\")
            .replace("\t", "\\t")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
        )
    return text


class PgSink(Sink):
    """COPY text lines, written to three COPY streams as they are generated."""

    def __init__(self, copies: dict[str, Any]) -> None:
        self.copies = copies
        self.buffers: dict[str, list[str]] = {name: [] for name in copies}

    def _add(self, table: str, lines: list[str]) -> None:
        buffer = self.buffers[table]
        buffer.extend(lines)
        if len(buffer) >= FLUSH_LINES:
            self.copies[table].write("".join(buffer))
            buffer.clear()

    def flush(self) -> None:
        for table, buffer in self.buffers.items():
            if buffer:
                self.copies[table].write("".join(buffer))
                buffer.clear()

    def member_events(
        self, run_id: int, chatid: str, ts: str, event_type: str, userids: list[str], base: bool
    ) -> None:
        head = f"\t{run_id}\t{chatid}\t{ts}+00\t{event_type}\t"
        tail = f"\t\\N\t\\N\t\\N\t{'t' if base else 'f'}\tpoll\t{ts}+00\n"
        first = self.next_event_id
        self.next_event_id += len(userids)
        self._add(
            "chat_events",
            [f"{first + i}{head}{userid}{tail}" for i, userid in enumerate(userids)],
        )

    def event(
        self,
        run_id: int,
        chatid: str,
        ts: str,
        event_type: str,
        field: str | None,
        old: str | None,
        new: str | None,
    ) -> None:
        values = (field, old, new)
        line = (
            f"{self.next_event_id}\t{run_id}\t{chatid}\t{ts}+00\t{event_type}\t\\N\t"
            + "\t".join(_copy_text(v) for v in values)
            + f"\tf\tpoll\t{ts}+00\n"
        )
        self.next_event_id += 1
        self._add("chat_events", [line])

    def member(self, chatid: str, userid: str, joined: str, left: str | None) -> None:
        left_text = "\\N" if left is None else f"{left}+00"
        self._add("chat_members", [f"{chatid}\t{userid}\t{joined}+00\t{left_text}\n"])

    def item(self, row: tuple[Any, ...]) -> None:
        self._add("sync_run_items", ["\t".join(_copy_text(v) for v in row) + "\n"])


class SqliteSink(Sink):
    """Tuples for sqlite3's executemany, sent in large batches."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.rows: dict[str, list[tuple[Any, ...]]] = {t: [] for t in STREAMED}
        self.sql = {
            "chat_events": _insert_sql("chat_events", EVENT_COLUMNS),
            "chat_members": _insert_sql("chat_members", MEMBER_COLUMNS),
            "sync_run_items": _insert_sql("sync_run_items", ITEM_COLUMNS),
        }

    def _add(self, table: str, rows: list[tuple[Any, ...]]) -> None:
        buffer = self.rows[table]
        buffer.extend(rows)
        if len(buffer) >= 10 * FLUSH_LINES:
            self.conn.executemany(self.sql[table], buffer)
            buffer.clear()

    def flush(self) -> None:
        for table, buffer in self.rows.items():
            if buffer:
                self.conn.executemany(self.sql[table], buffer)
                buffer.clear()

    def member_events(
        self, run_id: int, chatid: str, ts: str, event_type: str, userids: list[str], base: bool
    ) -> None:
        first = self.next_event_id
        self.next_event_id += len(userids)
        flag = int(base)
        self._add(
            "chat_events",
            [
                (
                    first + i,
                    run_id,
                    chatid,
                    ts,
                    event_type,
                    userid,
                    None,
                    None,
                    None,
                    flag,
                    "poll",
                    ts,
                )
                for i, userid in enumerate(userids)
            ],
        )

    def event(
        self,
        run_id: int,
        chatid: str,
        ts: str,
        event_type: str,
        field: str | None,
        old: str | None,
        new: str | None,
    ) -> None:
        row = (self.next_event_id, run_id, chatid, ts, event_type, None, field, old, new, 0)
        self.next_event_id += 1
        self._add("chat_events", [(*row, "poll", ts)])

    def member(self, chatid: str, userid: str, joined: str, left: str | None) -> None:
        self._add("chat_members", [(chatid, userid, joined, left)])

    def item(self, row: tuple[Any, ...]) -> None:
        self._add("sync_run_items", [(*row[:3], int(row[3]), *row[4:])])


def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    marks = ", ".join("?" for _ in columns)
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"


# --------------------------------------------------------------------------------------------
# Building a database


def _say(message: str) -> None:
    print(f"history: {message}", file=sys.stderr, flush=True)


def _progress(days: int) -> Callable[[int], None]:
    started = time.monotonic()
    step = max(1, days // 8)

    def report(day: int) -> None:
        if (day + 1) % step == 0 or day + 1 == days:
            elapsed = time.monotonic() - started
            _say(f"  day {day + 1}/{days} generated ({elapsed:.0f} s)")

    return report


def _check_timestamp_text(dialect_name: str) -> None:
    """The timestamp text written here is what the product's column type binds (SQLite)."""
    if dialect_name != "sqlite":
        return
    from sqlalchemy.dialects import sqlite

    from etl.schema import chat_events

    dialect = sqlite.dialect()  # type: ignore[no-untyped-call]
    bind = chat_events.c.observed_at.type.dialect_impl(dialect).bind_processor(dialect)
    sample = dt.datetime(2026, 5, 1, 2, 10, 3, 5, tzinfo=dt.UTC)
    expected = sample.replace(tzinfo=None).isoformat(" ", "microseconds")
    if bind is None or bind(sample) != expected:
        raise HistoryError(f"SQLite timestamps are not stored as {expected!r} any more")


def _with_driver(url: Any) -> Any:
    """``postgresql://`` as the product reads it: with psycopg (version 3)."""
    if url.drivername == "postgresql":
        return url.set(drivername="postgresql+psycopg")
    return url


def _pg_conninfo(url: Any) -> str:
    return str(url.set(drivername="postgresql").render_as_string(hide_password=False))


def create_database(url: Any) -> bool:
    """Create the PostgreSQL database of ``url`` if missing; whether it was created."""
    from sqlalchemy import create_engine, text

    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": url.database}
            ).first()
            if exists:
                return False
            conn.execute(text(f'CREATE DATABASE "{url.database}"'))
            return True
    finally:
        admin.dispose()


def drop_database(url: Any) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": url.database},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}"'))
    finally:
        admin.dispose()


def migrate(url: Any) -> None:
    """The product's own schema: ``alembic upgrade head`` on an empty database."""
    from sqlalchemy import inspect

    from etl import migrate as product_migrate
    from etl.db import create_db_engine

    engine = create_db_engine(url)
    try:
        tables = inspect(engine).get_table_names()
        if tables:
            raise HistoryError(
                f"the database already holds tables ({', '.join(sorted(tables)[:5])}...): "
                "give an empty one"
            )
        product_migrate.upgrade(engine)
    finally:
        engine.dispose()


def build_postgresql(url: Any, gen: Generator) -> dict[str, float]:
    import psycopg

    timings: dict[str, float] = {}
    conninfo = _pg_conninfo(url)
    conns = [psycopg.connect(conninfo) for _ in STREAMED]
    try:
        for conn in conns:
            # The timestamps are UTC text without an offset; the load itself needs no
            # durability (a failed build is dropped).
            conn.execute("SET TIME ZONE 'UTC'")
            conn.execute("SET synchronous_commit = off")
        main = conns[0]
        with main.cursor() as cur:
            cur.execute(
                "SELECT c.relname, k.conname, pg_get_constraintdef(k.oid), k.contype "
                "FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema() AND c.relname = ANY(%s) "
                "AND k.contype IN ('p', 'u', 'f')",
                (list(REBUILT),),
            )
            constraints = cur.fetchall()
            cur.execute(
                "SELECT c.relname, i.relname, pg_get_indexdef(i.oid) "
                "FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
                "JOIN pg_class c ON c.oid = x.indrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema() AND c.relname = ANY(%s) "
                "AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.oid)",
                (list(REBUILT),),
            )
            indexes = cur.fetchall()
            # Foreign keys first, then keys and indexes; rebuilt in the opposite order.
            for table, name, _, _kind in sorted(constraints, key=lambda c: c[3] != "f"):
                cur.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
            for _, name, _ in indexes:
                cur.execute(f'DROP INDEX "{name}"')
        main.commit()

        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            copies = {}
            for conn, table in zip(conns, STREAMED, strict=True):
                cur = stack.enter_context(conn.cursor())
                columns = {
                    "chat_events": EVENT_COLUMNS,
                    "chat_members": MEMBER_COLUMNS,
                    "sync_run_items": ITEM_COLUMNS,
                }[table]
                copies[table] = stack.enter_context(
                    cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN")
                )
            sink = PgSink(copies)
            gen.generate(sink, _progress(gen.p.days))
            sink.flush()
        with main.cursor() as cur:
            for table, columns, rows in (
                ("sync_runs", RUN_COLUMNS, gen.runs),
                ("api_calls", CALL_COLUMNS, gen.api_calls),
            ):
                with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
            chat_rows = gen.chat_rows()
            with cur.copy(f"COPY chats ({', '.join(CHAT_COLUMNS)}) FROM STDIN") as copy:
                for chat in chat_rows:
                    copy.write_row(
                        [json.dumps(chat[c]) if c == "raw" else chat[c] for c in CHAT_COLUMNS]
                    )
        for conn in conns:
            conn.commit()
        timings["generate_and_load_s"] = time.perf_counter() - started

        started = time.perf_counter()
        main.autocommit = True
        with main.cursor() as cur:
            cur.execute("SET maintenance_work_mem = '512MB'")
            for table, name, definition, kind in sorted(constraints, key=lambda c: c[3] == "f"):
                if kind != "f":
                    cur.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
            for _, _, definition in indexes:
                cur.execute(definition)
            for table, name, definition, kind in constraints:
                if kind == "f":
                    cur.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
            for table, sequence_of in (
                ("sync_runs", "id"),
                ("chat_events", "id"),
                ("api_calls", "id"),
            ):
                cur.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', '{sequence_of}'), "
                    f"COALESCE((SELECT max({sequence_of}) FROM {table}), 0) + 1, false)"
                )
        timings["keys_and_indexes_s"] = time.perf_counter() - started
        started = time.perf_counter()
        with main.cursor() as cur:
            cur.execute("VACUUM (ANALYZE)")
        timings["vacuum_analyze_s"] = time.perf_counter() - started
    finally:
        for conn in conns:
            conn.close()
    return timings


def build_sqlite(url: Any, gen: Generator) -> dict[str, float]:
    import sqlite3

    from sqlalchemy.dialects import sqlite

    from etl.schema import chats

    timings: dict[str, float] = {}
    conn = sqlite3.connect(url.database, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
            f"AND tbl_name IN ({', '.join('?' for _ in REBUILT)})",
            REBUILT,
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')

        started = time.perf_counter()
        conn.execute("BEGIN")
        sink = SqliteSink(conn)
        gen.generate(sink, _progress(gen.p.days))
        sink.flush()
        conn.executemany(_insert_sql("sync_runs", RUN_COLUMNS), gen.runs)
        conn.executemany(_insert_sql("api_calls", CALL_COLUMNS), gen.api_calls)
        dialect = sqlite.dialect()  # type: ignore[no-untyped-call]
        to_json = chats.c.raw.type.dialect_impl(dialect).bind_processor(dialect)
        assert to_json is not None
        conn.executemany(
            _insert_sql("chats", CHAT_COLUMNS),
            [
                tuple(to_json(row[c]) if c == "raw" else row[c] for c in CHAT_COLUMNS)
                for row in gen.chat_rows()
            ],
        )
        conn.execute("COMMIT")
        timings["generate_and_load_s"] = time.perf_counter() - started

        started = time.perf_counter()
        for _, sql in indexes:
            conn.execute(sql)
        conn.execute("PRAGMA journal_mode=WAL")
        timings["keys_and_indexes_s"] = time.perf_counter() - started
    finally:
        conn.close()
    return timings


def count_rows(url: Any) -> dict[str, int]:
    from sqlalchemy import text

    from etl.db import create_db_engine

    engine = create_db_engine(url)
    counts = {}
    try:
        with engine.connect() as conn:
            for table in ("chats", "chat_members", "chat_events", "sync_runs", "sync_run_items"):
                counts[table] = int(
                    conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                )
            counts["api_calls"] = int(
                conn.execute(text("SELECT count(*) FROM api_calls")).scalar_one()
            )
    finally:
        engine.dispose()
    return counts


def build(url_text: str, params: Params) -> dict[str, Any]:
    """Migrate the (empty) database at ``url_text`` and fill it; what was built, and how fast."""
    sys.path.insert(0, str(REPO))
    from sqlalchemy.engine import make_url

    url = _with_driver(make_url(url_text))
    backend = url.get_backend_name()
    if backend not in ("postgresql", "sqlite"):
        raise HistoryError(f"{backend}: only PostgreSQL and SQLite are supported")
    _check_timestamp_text(backend)
    started = time.perf_counter()
    migrate(url)
    timings = {"migrate_s": time.perf_counter() - started}
    gen = Generator(params)
    _say(
        f"{params.chats:,} chats x ~{params.members:,} members x {params.days} days, churn "
        f"{params.churn:g}/day, seed {params.seed}, into {backend}"
    )
    builder = build_postgresql if backend == "postgresql" else build_sqlite
    timings.update(builder(url, gen))
    timings["total_s"] = time.perf_counter() - started
    counts = count_rows(url)
    expected = {"chat_events": gen.counts["events"], "chat_members": gen.counts["members"]}
    for table, n in expected.items():
        if counts[table] != n:
            raise HistoryError(f"{table}: {counts[table]:,} rows stored, {n:,} generated")
    return {
        "url": url.render_as_string(hide_password=True),
        "kind": backend,
        "params": asdict(params),
        "rows": counts,
        "timings": timings,
        **gen.summary(),
    }


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    d = Params()
    parser = argparse.ArgumentParser(
        description="Build a database holding a generated history of daily syncs (see the "
        "module docstring and bench/README.md).",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="build into this database (the caller's; never dropped)")
    where.add_argument(
        "--kind",
        choices=("sqlite", "postgresql"),
        default="postgresql",
        help="without --url: a new database of this kind (default %(default)s)",
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("DINGTALK_ETL_BENCH_PG", DEFAULT_PG_URL),
        help="PostgreSQL server for --kind postgresql (default $DINGTALK_ETL_BENCH_PG or "
        "%(default)s)",
    )
    parser.add_argument("--chats", type=int, default=d.chats, help="chats (%(default)s)")
    parser.add_argument(
        "--members", type=int, default=d.members, help="mean members per chat (%(default)s)"
    )
    parser.add_argument("--days", type=int, default=d.days, help="days, one run each (%(default)s)")
    parser.add_argument(
        "--churn",
        type=float,
        default=d.churn,
        help="share of a chat's members leaving per day, about as many joining (%(default)s)",
    )
    parser.add_argument("--users", type=int, default=d.users, help="users (%(default)s)")
    parser.add_argument(
        "--rejoin", type=float, default=d.rejoin, help="share of joins that are re-joins"
    )
    parser.add_argument(
        "--attr-rate",
        type=float,
        default=d.attr_rate,
        help="probability of an attribute change per chat and day (%(default)s)",
    )
    parser.add_argument(
        "--new-share",
        type=float,
        default=d.new_share,
        help="share of chats created during the year (%(default)s)",
    )
    parser.add_argument(
        "--dismiss-share",
        type=float,
        default=d.dismiss_share,
        help="share of chats dismissed during the year (%(default)s)",
    )
    parser.add_argument(
        "--fail-rate",
        type=float,
        default=d.fail_rate,
        help="probability that a read fails (%(default)s)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (%(default)s)")
    parser.add_argument("--start", default=d.start, help="date of the first run, UTC (%(default)s)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the database built here and print its URL"
    )
    parser.add_argument("--json", type=Path, help="also write the summary to this file")
    args = parser.parse_args(argv)
    if not 1 <= args.chats <= MAX_CHATS or args.members < 3 or args.days < 1 or args.users < 10:
        parser.error(f"--chats 1 to {MAX_CHATS:,}; --days >= 1; --members >= 3; --users >= 10")
    if args.members * 2 > args.users:
        parser.error("--users must be at least twice --members")
    for name in ("churn", "rejoin", "attr_rate", "new_share", "dismiss_share", "fail_rate"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    try:
        dt.date.fromisoformat(args.start)
    except ValueError:
        parser.error(f"--start: not a date: {args.start!r}")
    return args


@contextlib.contextmanager
def own_database(args: argparse.Namespace) -> Iterator[str]:
    """The URL to build into: the caller's (--url), or one made here and dropped after."""
    sys.path.insert(0, str(REPO))
    from sqlalchemy.engine import make_url

    if args.url:
        url = _with_driver(make_url(args.url))
        if url.get_backend_name() == "postgresql":
            create_database(url)
        elif url.database and Path(url.database).exists() and Path(url.database).stat().st_size:
            raise HistoryError(f"{url.database} exists and is not empty")
        yield args.url
        return
    if args.kind == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="dingtalk-etl-history-"))
        try:
            yield f"sqlite:///{folder / 'history.db'}"
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        return
    url = _with_driver(make_url(args.pg_url)).set(
        database=f"dingtalk_etl_bench_{os.getpid()}_history"
    )
    if not create_database(url):
        raise HistoryError(f"database {url.database} exists already")
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        if not args.keep:
            drop_database(url)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    params = Params(
        chats=args.chats,
        members=args.members,
        days=args.days,
        churn=args.churn,
        users=args.users,
        rejoin=args.rejoin,
        attr_rate=args.attr_rate,
        new_share=args.new_share,
        dismiss_share=args.dismiss_share,
        fail_rate=args.fail_rate,
        seed=args.seed,
        start=args.start,
    )

    def terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # through the finally blocks that drop the database

    signal.signal(signal.SIGTERM, terminate)
    try:
        with own_database(args) as url:
            summary = build(url, params)
            if args.keep and not args.url:
                summary["url"] = url
                _say(f"kept: {url}")
    except HistoryError as exc:
        print(f"history: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("history: interrupted", file=sys.stderr)
        return 130
    rows, timings = summary["rows"], summary["timings"]
    print(f"{'table':<16}{'rows':>12}")
    for table, n in rows.items():
        print(f"{table:<16}{n:>12,}")
    print(
        "build: "
        + ", ".join(
            f"{name[:-2].replace('_', ' ')} {seconds:.1f} s" for name, seconds in timings.items()
        )
    )
    print(
        f"busiest user {summary['busiest_userid']} ({summary['busiest_memberships']:,} "
        f"memberships); largest chat {summary['largest_chatid']} "
        f"({summary['largest_members']:,} members); runs {summary['first_run']} .. "
        f"{summary['last_run']} UTC"
    )
    print(f"database: {summary['url']}" + ("" if args.keep or args.url else " (dropped)"))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
