"""The simulated organisation and app: settings, chats, changes, and the services they own.

Boundary: state and its rules, behind one lock. The world holds the chats and the app's
settings, the fault queue, the token service, the rate limiter and the statistics, and tells
listeners about every change made through its methods. It knows no endpoint and no errcode:
the API facade (:mod:`etl.simulator.api`) reads and drives it for every front.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from etl.simulator.chat import CHAT_FIELDS, SimChat
from etl.simulator.faults import Fault, FaultQueue
from etl.simulator.ratelimit import RateLimiter
from etl.simulator.scenario import (
    ChatEdit,
    Scenario,
    generate_chats,
    load_scenario,
    parse_scenario,
    plan_mutation,
)
from etl.simulator.tokens import TokenService

__all__ = ["ChangeKind", "SimStats", "World", "WorldChange", "WorldListener"]


class SimStats:
    """Request counters and arrival times; every method takes the lock it is given."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self.requests_by_path: Counter[str] = Counter()
        self.requests_by_chat: Counter[str] = Counter()
        self.gettoken_calls = 0
        self.tokens_issued = 0
        self.throttled = 0
        self.throttled_by_path: Counter[str] = Counter()
        self.faults_fired: Counter[str] = Counter()
        self._arrivals: dict[str, list[float]] = {}

    @property
    def total_requests(self) -> int:
        with self._lock:
            return sum(self.requests_by_path.values())

    def arrivals(self, path: str) -> list[float]:
        """Monotonic arrival times of requests to ``path`` (e.g. ``"/chat/get"``), sorted."""
        with self._lock:
            return sorted(self._arrivals.get(_norm_path(path), ()))

    def max_requests_in_any_window(self, path: str, window: float = 1.0) -> int:
        """The most requests to ``path`` that arrived within any half-open ``window`` seconds."""
        times = self.arrivals(path)
        best = 0
        start = 0
        for end, t in enumerate(times):
            while t - times[start] >= window:
                start += 1
            best = max(best, end - start + 1)
        return best

    def reset(self) -> None:
        with self._lock:
            self.requests_by_path.clear()
            self.requests_by_chat.clear()
            self.gettoken_calls = 0
            self.tokens_issued = 0
            self.throttled = 0
            self.throttled_by_path.clear()
            self.faults_fired.clear()
            self._arrivals.clear()

    # -- recording, by the API facade --------------------------------------------------------

    def record_request(self, path: str, at: float) -> None:
        """A request to ``path`` arrived at ``at`` (monotonic), whatever it asked for."""
        with self._lock:
            self.requests_by_path[path] += 1
            self._arrivals.setdefault(path, []).append(at)

    def record_gettoken(self) -> None:
        with self._lock:
            self.gettoken_calls += 1

    def record_chat_request(self, chatid: str) -> None:
        with self._lock:
            self.requests_by_chat[chatid] += 1

    def record_throttled(self, path: str) -> None:
        with self._lock:
            self.throttled += 1
            self.throttled_by_path[path] += 1

    def record_fault(self, fault: Fault) -> None:
        with self._lock:
            self.faults_fired[fault.kind] += 1

    def record_token_issued(self) -> None:
        with self._lock:
            self.tokens_issued += 1


def _norm_path(path: str) -> str:
    return path if path.startswith("/") else "/" + path


ChangeKind = Literal[
    "members_added", "members_removed", "member_quit", "attribute_changed", "dismissed"
]


@dataclass(frozen=True)
class WorldChange:
    """One change to a chat, as listeners see it.

    ``userids`` are the members actually added or removed, in order; ``member_quit`` is a
    removal too, of the one member who left on their own. ``field``, ``old`` and ``new``
    describe an attribute change. ``at`` is the wall-clock time of the change; ``operator`` the
    userid who made it (the chat's owner unless the caller named someone else).
    """

    kind: ChangeKind
    chatid: str
    at: float
    userids: tuple[str, ...] = ()
    field: str = ""
    old: Any = None
    new: Any = None
    operator: str | None = None


WorldListener = Callable[[WorldChange], None]


class World:
    """The simulated organisation and app: credentials, chats, faults, tokens and statistics.

    Every method takes ``lock``; to change a :class:`SimChat` in place, hold ``world.lock``
    (changes made that way reach no listener). The app settings are plain attributes that may
    change while a front serves the world.
    """

    def __init__(
        self,
        app_key: str = "demo-key",
        app_secret: str = "demo-secret",  # noqa: S107 - credentials of the fake app
        *,
        token_ttl_seconds: float = 7200,
        permission: bool = True,
        rate_limit: int = 0,
        latency_ms: int = 0,
    ) -> None:
        self.lock = threading.RLock()
        self.app_key = app_key
        self.app_secret = app_secret
        self.token_ttl_seconds = token_ttl_seconds
        self.permission = permission
        self.rate_limit = rate_limit
        self.latency_ms = latency_ms
        self.chats: dict[str, SimChat] = {}
        # The services share the world's lock, so one request's admission is one atomic step.
        self.stats = SimStats(self.lock)
        self.faults = FaultQueue(self.lock)
        self.tokens = TokenService(self.lock)
        self.limiter = RateLimiter(self.lock)
        self._listeners: list[WorldListener] = []
        self._last_change_at = 0.0
        # Users that mutate() may add to chats; None means "everyone already in some chat".
        self._user_pool: list[str] | None = None

    def credentials_match(self, app_key: str, app_secret: str) -> bool:
        with self.lock:
            return (app_key, app_secret) == (self.app_key, self.app_secret)

    # -- listeners ----------------------------------------------------------------------------

    def subscribe(self, listener: WorldListener) -> Callable[[], None]:
        """Call ``listener`` with every later change; returns a function that unsubscribes.

        Listeners run on the changing thread while it holds ``world.lock``, so they see changes
        in the order they happened; they must return quickly and never wait for another thread
        that uses the world (hand the change to a queue instead).
        """
        with self.lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self.lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def _notify(self, kind: ChangeKind, chatid: str, operator: str, **details: Any) -> None:
        if self._listeners:
            # A millisecond apart at least: DingTalk's event times are milliseconds, and two
            # changes with one time could not be told apart in order.
            at = max(time.time(), self._last_change_at + 0.001)
            self._last_change_at = at
            change = WorldChange(kind, chatid, at, operator=operator, **details)
            for listener in list(self._listeners):
                listener(change)

    # -- chats --------------------------------------------------------------------------------

    def add_chat(self, chat: SimChat) -> None:
        with self.lock:
            if chat.chatid in self.chats:
                raise ValueError(f"chat {chat.chatid!r} already exists")
            self.chats[chat.chatid] = chat

    def chat(self, chatid: str) -> SimChat:
        """The live chat object; mutate it only while holding ``world.lock``."""
        with self.lock:
            try:
                return self.chats[chatid]
            except KeyError:
                raise KeyError(f"no chat {chatid!r} in the simulated world") from None

    def chatids(self) -> list[str]:
        with self.lock:
            return sorted(self.chats)

    def add_members(
        self, chatid: str, userids: Iterable[str], *, operator: str | None = None
    ) -> None:
        """Add the userids not yet members; ``operator`` (default: the owner) added them."""
        with self.lock:
            chat = self.chat(chatid)
            operator = chat.owner if operator is None else operator
            present = set(chat.useridlist)
            added: list[str] = []
            for userid in userids:
                if userid not in present:
                    chat.useridlist.append(userid)
                    present.add(userid)
                    added.append(userid)
            if added:
                self._notify("members_added", chatid, operator, userids=tuple(added))

    def remove_members(
        self, chatid: str, userids: Iterable[str], *, operator: str | None = None
    ) -> None:
        """Remove the userids that are members; ``operator`` (default: the owner) removed them."""
        with self.lock:
            chat = self.chat(chatid)
            operator = chat.owner if operator is None else operator
            leaving = set(userids)
            removed = tuple(u for u in chat.useridlist if u in leaving)
            chat.useridlist = [u for u in chat.useridlist if u not in leaving]
            if removed:
                self._notify("members_removed", chatid, operator, userids=removed)

    def quit(self, chatid: str, userid: str) -> None:
        """``userid`` leaves the chat on their own: a ``member_quit`` change they operated.

        The owner field is left as it is: a test that wants the owner to leave changes the
        owner first, as DingTalk requires."""
        with self.lock:
            chat = self.chat(chatid)
            if userid in chat.useridlist:
                chat.useridlist = [u for u in chat.useridlist if u != userid]
                self._notify("member_quit", chatid, userid, userids=(userid,))

    def dismiss(
        self, chatid: str, keep_members: bool = False, *, operator: str | None = None
    ) -> None:
        """Set status 2 and, unless ``keep_members``, empty the member list; listeners get one
        ``dismissed`` change (by ``operator``, default the owner) and no member changes, as
        DingTalk reports a disbanded group."""
        with self.lock:
            chat = self.chat(chatid)
            operator = chat.owner if operator is None else operator
            was_active = chat.status != 2
            chat.status = 2
            if not keep_members:
                chat.useridlist = []
            if was_active:
                self._notify("dismissed", chatid, operator)

    def set_attr(self, chatid: str, *, operator: str | None = None, **changes: Any) -> None:
        """Set attributes; each that differs is one change by ``operator`` (default: the owner
        before this call, so an owner change is made by the previous owner)."""
        with self.lock:
            chat = self.chat(chatid)
            operator = chat.owner if operator is None else operator
            for key in changes:
                if key not in CHAT_FIELDS or key == "chatid":
                    raise AttributeError(f"SimChat has no settable attribute {key!r}")
            for key, value in changes.items():
                old = getattr(chat, key)
                setattr(chat, key, value)
                if old != value:
                    self._notify(
                        "attribute_changed", chatid, operator, field=key, old=old, new=value
                    )

    def membership(self) -> dict[str, frozenset[str]]:
        """Snapshot of every chat's members, dismissed and unreadable chats included."""
        with self.lock:
            return {cid: frozenset(chat.useridlist) for cid, chat in self.chats.items()}

    # -- faults and tokens --------------------------------------------------------------------

    def inject(self, key: str, *faults: str | Fault) -> None:
        """Queue faults for a chatid, or for ``"@gettoken"``; each hits exactly one request."""
        self.faults.inject(key, *faults)

    def pending_faults(self, key: str) -> list[str]:
        return self.faults.pending(key)

    def clear_faults(self, key: str | None = None) -> None:
        self.faults.clear(key)

    @property
    def current_token(self) -> str | None:
        return self.tokens.current

    def expire_token(self) -> None:
        """Make the current token expired as of now (it then answers 42001, not 40014)."""
        self.tokens.expire()

    # -- where worlds come from ---------------------------------------------------------------

    @classmethod
    def from_scenario(cls, path: str | os.PathLike[str]) -> World:
        """Load a TOML scenario (``[app]``, ``[[chats]]``, ``[faults]``)."""
        return cls._from(load_scenario(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> World:
        """Build a world from a scenario mapping; unknown keys raise ``ValueError``."""
        return cls._from(parse_scenario(data, source=source))

    @classmethod
    def _from(cls, scenario: Scenario) -> World:
        world = cls(**scenario.settings)
        for chat in scenario.chats:
            world.add_chat(chat)
        for key, faults in scenario.faults.items():
            world.inject(key, *faults)
        return world

    @classmethod
    def generate(
        cls,
        n_chats: int,
        *,
        seed: int = 0,
        users: int = 5000,
        min_members: int = 10,
        max_members: int = 10000,
        dismissed: int = 0,
    ) -> World:
        """A deterministic world of ``n_chats`` chats (``gen-000001``...) for benchmarks.

        Sizes follow a heavy-tailed distribution between ``min_members`` and ``max_members``
        (most groups small); the first chat always has exactly ``max_members`` so every
        generated world contains the largest group. Members come from one shared pool of
        ``max(users, max_members)`` users (``user-000001``...), so users belong to many chats.
        ``dismissed`` randomly chosen chats get status 2 and an empty member list.
        """
        generated = generate_chats(
            n_chats,
            seed=seed,
            users=users,
            min_members=min_members,
            max_members=max_members,
            dismissed=dismissed,
        )
        world = cls()
        world._user_pool = generated.user_pool
        for chat in generated.chats:
            world.add_chat(chat)
        return world

    def mutate(self, share: float, *, seed: int) -> int:
        """Change ``round(share * active chats)`` chats; return how many changed.

        Active means status 1 without ``raw_chat_info``. Each chosen chat changes for sure:
        a few members join (from the user pool) and/or leave (never the owner, never the last
        member), and about one in ten also gets a new name or owner. Listeners see every change.
        """
        with self.lock:
            pool = self._user_pool
            if pool is None:
                pool = sorted({u for chat in self.chats.values() for u in chat.useridlist})
            edits = plan_mutation(self.chats, share, seed=seed, pool=pool)
            for edit in edits:
                self._apply(edit)
            return len(edits)

    def _apply(self, edit: ChatEdit) -> None:
        attributes = {"name": edit.name, "owner": edit.owner}
        self.set_attr(edit.chatid, **{k: v for k, v in attributes.items() if v is not None})
        self.remove_members(edit.chatid, edit.leaving)
        self.add_members(edit.chatid, edit.joining)
