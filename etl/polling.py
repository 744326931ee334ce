"""Which chats a run reads: the poll plan, pure (plain data in, decisions out).

``[sync] polling = "every_run"`` reads every chat of the synced set but the dismissed ones;
``"adaptive"`` reads the chats that are due:

- a chat never read is due; a dismissed chat (status 2) never is (its state is final);
- a chat read before is due at its ``next_poll_at``: the start of the run that last read it
  plus its interval, which starts at ``poll_interval_seconds``, doubles each time the chat is
  read unchanged, up to ``max_poll_interval_seconds``, and goes back to the start when it
  changed (``next_interval``);
- while an event listener is connected, changes arrive as events and polls are a safety net:
  a chat is due ``max_poll_interval_seconds`` after its last read;
- a chat with events that wait for a reconcile is due at its reconcile
  (``reconcile_delay_seconds`` after the arrival of the last one).

"Due" looks ``lookahead`` seconds past the run's start: a run that starts a little early (cron
drift, jitter, a long previous run) reads the chats that fall due while it runs instead of
leaving them to the next run, an interval later. With a ``[schedule]``, a chat that falls due
before the schedule's next run is read now: polls happen only at the runs, and waiting for
the next one would take the chat past its interval (past ``max_poll_interval_seconds``, for
the safety net) by up to the schedule's period.

With a monthly quota, ``afford`` keeps the most overdue chats a run can pay for.
Knows no database, no HTTP, no clock: ``now`` is given.
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

DISMISSED: Final = 2
# A run looks at least this far ahead (cron and the scheduler fire within seconds of the slot).
MIN_LOOKAHEAD_SECONDS: Final = 60.0
# Calls a run makes besides one chat/get per chat: its access token.
TOKEN_CALLS_PER_RUN: Final = 1

Polling = Literal["every_run", "adaptive"]


@dataclass(frozen=True, slots=True)
class ChatPoll:
    """What the plan knows of one chat of the synced set (``status`` None: never read)."""

    chatid: str
    status: int | None = None
    last_synced_at: dt.datetime | None = None
    next_poll_at: dt.datetime | None = None
    # When the last event that waits for this chat's reconcile arrived.
    events_waiting_since: dt.datetime | None = None
    interval_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class PollPolicy:
    polling: Polling
    base_seconds: int
    max_seconds: int
    lookahead_seconds: float = MIN_LOOKAHEAD_SECONDS
    listener_connected: bool = False
    reconcile_delay_seconds: float = 30.0
    # When the schedule runs next, if one is configured: a chat due before then is read now,
    # or it would wait until then (past its interval by up to the schedule's period).
    next_run_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Selection:
    """A run's chats: ``due`` (in the synced set's order), ``skipped`` (in the set, not read)."""

    due: tuple[str, ...]
    skipped: tuple[str, ...]
    # Of ``skipped``, due but beyond what the quota left allows.
    deferred: tuple[str, ...] = ()


def due_at(chat: ChatPoll, policy: PollPolicy) -> dt.datetime | None:
    """When ``chat`` is due next (None: now, it was never read); ``datetime.max`` for never."""
    if chat.status is None or chat.last_synced_at is None:
        return None
    if chat.status == DISMISSED:
        return _NEVER
    if policy.polling == "every_run":
        return chat.last_synced_at  # due at every run
    if policy.listener_connected:
        due = chat.last_synced_at + dt.timedelta(seconds=policy.max_seconds)
    elif chat.next_poll_at is None:
        return chat.last_synced_at  # read before the plan existed
    else:
        due = chat.next_poll_at
    if chat.events_waiting_since is not None:
        reconcile = chat.events_waiting_since + dt.timedelta(seconds=policy.reconcile_delay_seconds)
        due = min(due, reconcile)
    return due


def select(
    chats: Sequence[ChatPoll], policy: PollPolicy, now: dt.datetime, *, affordable: int | None
) -> Selection:
    """The chats due at ``now``, at most ``affordable`` of them (the most overdue)."""
    horizon = now + dt.timedelta(seconds=policy.lookahead_seconds)
    ranked: list[tuple[dt.datetime, int, str]] = []
    skipped: list[str] = []
    for order, chat in enumerate(chats):
        when = due_at(chat, policy)
        if when is None:
            ranked.append((_NEVER_READ, order, chat.chatid))
        elif when <= horizon or (policy.next_run_at is not None and when < policy.next_run_at):
            ranked.append((when, order, chat.chatid))
        else:
            skipped.append(chat.chatid)
    deferred: list[str] = []
    if affordable is not None and len(ranked) > affordable:
        # The quota pays for some: the most overdue (never read first), in the set's order.
        ranked.sort()
        cut = max(0, affordable)
        deferred = [chatid for _when, _order, chatid in ranked[cut:]]
        ranked = sorted(ranked[:cut], key=lambda item: item[1])
    due = [chatid for _when, _order, chatid in ranked]
    return Selection(tuple(due), tuple(skipped + deferred), tuple(deferred))


def affordable_chats(remaining_calls: int | None) -> int | None:
    """How many chats a run can read with ``remaining_calls`` left this month (None: no quota)."""
    if remaining_calls is None:
        return None
    return max(0, remaining_calls - TOKEN_CALLS_PER_RUN)


def next_interval(previous: int | None, changed: bool, base: int, maximum: int) -> int:
    """A chat's interval after a read: back to ``base`` when it changed, else doubled."""
    if changed or previous is None:
        return base
    return min(maximum, max(base, previous * 2))


@dataclass(frozen=True)
class FireReads:
    """How many chats each of ``fires`` fires would read: ``every_fire`` at each, plus
    ``extra[i]`` at fire ``i`` (kept sparse: a schedule may fire every second)."""

    fires: int
    every_fire: int = 0
    extra: Counter[int] = field(default_factory=Counter)

    @property
    def chats(self) -> int:
        return self.every_fire * self.fires + sum(self.extra.values())

    @property
    def runs_reading(self) -> int:
        """Fires that read at least one chat (each pays a token call)."""
        return self.fires if self.every_fire else len(self.extra)

    def per_fire(self) -> list[int]:
        return [self.every_fire + self.extra.get(i, 0) for i in range(self.fires)]


def reads_per_fire(
    chats: Sequence[ChatPoll], policy: PollPolicy, fires: Sequence[dt.datetime]
) -> FireReads:
    """How many chats each of ``fires`` would read if nothing changed from now on.

    Each chat keeps its current interval (a projection cannot know which chats will change:
    a change shortens an interval, quiet lengthens it); a chat never read is read at the
    first fire, a dismissed one at none.
    """
    reads = FireReads(len(fires))
    if not fires:
        return reads
    read = [chat for chat in chats if due_at(chat, policy) != _NEVER]
    if policy.polling == "every_run":
        return FireReads(len(fires), every_fire=len(read))
    ahead = dt.timedelta(seconds=policy.lookahead_seconds)
    for chat in read:
        when = due_at(chat, policy)
        step = dt.timedelta(
            seconds=policy.max_seconds
            if policy.listener_connected
            else (chat.interval_seconds or policy.base_seconds)
        )
        index = 0 if when is None else _first_reading(fires, when, ahead)
        while index < len(fires):
            reads.extra[index] += 1
            index = max(index + 1, _first_reading(fires, fires[index] + step, ahead))
    return reads


def _first_reading(fires: Sequence[dt.datetime], when: dt.datetime, ahead: dt.timedelta) -> int:
    """The first of ``fires`` that reads a chat due ``when``, as ``select`` decides at each:
    the chat falls due within its look-ahead, or before the fire that follows it."""
    within = bisect.bisect_left(fires, when - ahead)
    following = bisect.bisect_right(fires, when)  # the first fire after ``when``
    if following < len(fires):
        return min(within, max(0, following - 1))
    return within  # after the last fire listed: its next run is not known here


@dataclass(frozen=True, slots=True)
class NextPoll:
    """Sets the poll plan of the chats a run reads (adaptive polling): the interval after the
    read, and the due time counted from the run's start (so that the next run, on the same
    schedule, finds the chat due however far into this run it was read)."""

    run_started_at: dt.datetime
    base_seconds: int
    max_seconds: int

    def after(self, previous: int | None, changed: bool) -> tuple[int, dt.datetime]:
        interval = next_interval(previous, changed, self.base_seconds, self.max_seconds)
        return interval, self.run_started_at + dt.timedelta(seconds=interval)


def lookahead(previous_run_seconds: float | None, jitter_seconds: float = 0.0) -> float:
    """How far past its start a run looks for due chats: its own span (the previous run's
    duration, at least ``MIN_LOOKAHEAD_SECONDS``) plus the schedule's jitter."""
    return max(MIN_LOOKAHEAD_SECONDS, previous_run_seconds or 0.0) + jitter_seconds


_NEVER: Final = dt.datetime.max.replace(tzinfo=dt.UTC)
_NEVER_READ: Final = dt.datetime.min.replace(tzinfo=dt.UTC)
