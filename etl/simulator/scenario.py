"""Where worlds come from: scenario files, generated organisations, and planned mutations.

Boundary: this module turns TOML, a mapping or a seed into checked data (app settings, chats,
faults, edits) and never holds a world: :class:`~etl.simulator.world.World` builds itself from
what it returns and applies the edits, so every change still goes through the world's lock and
reaches its listeners.
"""

from __future__ import annotations

import os
import random
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from etl.simulator.chat import CHAT_FIELDS, SimChat
from etl.simulator.faults import Fault

__all__ = [
    "ChatEdit",
    "GeneratedChats",
    "Scenario",
    "generate_chats",
    "load_scenario",
    "parse_scenario",
    "plan_mutation",
]

_CHAT_REQUIRED: Final = ("chatid", "name", "owner", "useridlist")
_CHAT_STR_FIELDS: Final = frozenset({"chatid", "name", "owner", "icon"})
_CHAT_INT_FIELDS: Final = frozenset(
    {
        "conversationTag",
        "chatBannedType",
        "searchable",
        "validationType",
        "mentionAllAuthority",
        "managementType",
        "showHistoryType",
        "status",
    }
)
_APP_KEYS: Final = (
    "app_key",
    "app_secret",
    "token_ttl_seconds",
    "permission",
    "rate_limit",
    "latency_ms",
)
_TOP_KEYS: Final = ("app", "chats", "faults")

_DEPARTMENTS: Final = (
    "Finance",
    "Sales",
    "Engineering",
    "Support",
    "Marketing",
    "Legal",
    "People",
    "Ops",
    "Design",
    "Research",
)
_TOPICS: Final = ("Weekly", "Project", "Alerts", "Launch", "Planning", "Social", "Review", "All")
# Pareto shape for generated group sizes: about 84% of groups stay under 10x min_members and
# about 2.5% exceed 100x, which resembles an organisation's mix of team and all-hands groups.
_SIZE_ALPHA: Final = 0.8


# --------------------------------------------------------------------------------------------
# Scenario files


@dataclass(frozen=True)
class Scenario:
    """A checked scenario: the world's keyword ``settings``, its chats, and faults per key."""

    settings: dict[str, Any]
    chats: list[SimChat]
    faults: dict[str, list[Fault]]


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read a TOML scenario (``[app]``, ``[[chats]]``, ``[faults]``)."""
    source = os.fspath(path)
    try:
        with Path(source).open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: invalid TOML: {exc}") from exc
    return parse_scenario(data, source=source)


def parse_scenario(data: Mapping[str, Any], *, source: str = "<dict>") -> Scenario:
    """Check a scenario mapping; the first problem raises ``ValueError`` naming ``source``."""
    _check_mapping(data, _TOP_KEYS, source, "the top level")
    app = data.get("app", {})
    _check_mapping(app, _APP_KEYS, source, "[app]")
    settings = _app_settings(app, source)

    raw_chats = data.get("chats", [])
    if not isinstance(raw_chats, list):
        raise ValueError(f"{source}: 'chats' must be an array of tables ([[chats]])")
    chats: list[SimChat] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_chats, start=1):
        where = f"[[chats]] #{index}"
        _check_mapping(raw, CHAT_FIELDS, source, where)
        chat = _chat_from_mapping(raw, source, where)
        if chat.chatid in seen:
            raise ValueError(f"{source}: {where}: duplicate chatid {chat.chatid!r}")
        seen.add(chat.chatid)
        chats.append(chat)

    raw_faults = data.get("faults", {})
    if not isinstance(raw_faults, Mapping):
        raise ValueError(f"{source}: 'faults' must be a table")
    faults: dict[str, list[Fault]] = {}
    for key, specs in raw_faults.items():
        if not isinstance(specs, list):
            raise ValueError(f"{source}: [faults] {key!r} must be a list of strings")
        try:
            faults[key] = [Fault.parse(spec) for spec in specs]
        except ValueError as exc:
            raise ValueError(f"{source}: [faults] {key!r}: {exc}") from exc
    return Scenario(settings, chats, faults)


def _check_mapping(value: Any, allowed: Iterable[str], source: str, where: str) -> None:
    if not isinstance(value, Mapping):
        raise ValueError(f"{source}: {where} must be a table")
    allowed_set = set(allowed)
    for key in value:
        if key not in allowed_set:
            raise ValueError(
                f"{source}: unknown key {key!r} in {where} (allowed: {', '.join(allowed)})"
            )


def _app_settings(app: Mapping[str, Any], source: str) -> dict[str, Any]:
    def fail(key: str, expected: str) -> ValueError:
        return ValueError(f"{source}: [app] {key} must be {expected}, got {app[key]!r}")

    settings: dict[str, Any] = {}
    for key in ("app_key", "app_secret"):
        if key in app:
            if not isinstance(app[key], str):
                raise fail(key, "a string")
            settings[key] = app[key]
    if "token_ttl_seconds" in app:
        ttl = app["token_ttl_seconds"]
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0:
            raise fail("token_ttl_seconds", "a positive number")
        settings["token_ttl_seconds"] = ttl
    if "permission" in app:
        if not isinstance(app["permission"], bool):
            raise fail("permission", "true or false")
        settings["permission"] = app["permission"]
    for key in ("rate_limit", "latency_ms"):
        if key in app:
            value = app[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise fail(key, "an integer >= 0")
            settings[key] = value
    return settings


def _chat_from_mapping(raw: Mapping[str, Any], source: str, where: str) -> SimChat:
    missing = [key for key in _CHAT_REQUIRED if key not in raw]
    if missing:
        raise ValueError(f"{source}: {where}: missing {', '.join(missing)}")
    for key, value in raw.items():
        if key in _CHAT_STR_FIELDS:
            ok = isinstance(value, str)
        elif key in _CHAT_INT_FIELDS:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif key == "readable":
            ok = isinstance(value, bool)
        elif key == "useridlist":
            ok = isinstance(value, list) and all(isinstance(u, str) for u in value)
        else:  # raw_chat_info
            ok = isinstance(value, dict)
        if not ok:
            raise ValueError(f"{source}: {where}: bad value for {key!r}: {value!r}")
    fields = dict(raw)
    fields["useridlist"] = list(fields["useridlist"])
    return SimChat(**fields)


# --------------------------------------------------------------------------------------------
# Generated organisations


@dataclass(frozen=True)
class GeneratedChats:
    """Generated chats, and the pool of users their members were drawn from."""

    chats: list[SimChat]
    user_pool: list[str]


def generate_chats(
    n_chats: int,
    *,
    seed: int = 0,
    users: int = 5000,
    min_members: int = 10,
    max_members: int = 10000,
    dismissed: int = 0,
) -> GeneratedChats:
    """``n_chats`` deterministic chats (``gen-000001``...); see :meth:`World.generate`."""
    if n_chats < 0:
        raise ValueError("n_chats must be >= 0")
    if min_members < 1 or max_members < min_members:
        raise ValueError("need 1 <= min_members <= max_members")
    if users < 1:
        raise ValueError("users must be >= 1")
    if not 0 <= dismissed <= n_chats:
        raise ValueError("dismissed must be between 0 and n_chats")
    rng = random.Random(seed)
    pool = [f"user-{i:06d}" for i in range(1, max(users, max_members) + 1)]
    chats: list[SimChat] = []
    for index in range(1, n_chats + 1):
        if index == 1:
            size = max_members
        else:
            # Inverse-CDF sampling of a Pareto tail starting at min_members.
            size = int(min_members / (1.0 - rng.random()) ** (1.0 / _SIZE_ALPHA))
            size = min(size, max_members)
        members = sorted(rng.sample(pool, size))
        chats.append(
            SimChat(
                chatid=f"gen-{index:06d}",
                name=f"{rng.choice(_DEPARTMENTS)} {rng.choice(_TOPICS)} {index}",
                owner=rng.choice(members),
                useridlist=members,
                searchable=int(rng.random() < 0.2),
                validationType=int(rng.random() < 0.1),
                icon=f"@lADP{rng.getrandbits(64):016x}",
            )
        )
    for index in rng.sample(range(1, n_chats + 1), dismissed):
        chat = chats[index - 1]
        chat.status = 2
        chat.useridlist = []
    return GeneratedChats(chats, pool)


# --------------------------------------------------------------------------------------------
# Mutations


@dataclass(frozen=True)
class ChatEdit:
    """Planned changes to one chat; None and empty mean "unchanged"."""

    chatid: str
    name: str | None = None
    owner: str | None = None
    leaving: tuple[str, ...] = ()
    joining: tuple[str, ...] = ()


def plan_mutation(
    chats: Mapping[str, SimChat], share: float, *, seed: int, pool: list[str]
) -> list[ChatEdit]:
    """Edits for ``round(share * active chats)`` chats, each a real change; see
    :meth:`World.mutate`. ``pool`` holds the users that may join."""
    if not 0.0 <= share <= 1.0:
        raise ValueError("share must be between 0 and 1")
    rng = random.Random(seed)
    eligible = sorted(
        cid for cid, chat in chats.items() if chat.status == 1 and chat.raw_chat_info is None
    )
    chosen = sorted(rng.sample(eligible, round(share * len(eligible))))
    return [_plan_chat_edit(chats[chatid], rng, pool) for chatid in chosen]


def _plan_chat_edit(chat: SimChat, rng: random.Random, pool: list[str]) -> ChatEdit:
    members = chat.useridlist
    present = set(members)
    step = max(1, len(members) // 20)
    n_join = rng.randint(0, step)
    n_leave = rng.randint(0, step)
    name = chat.name
    owner = chat.owner

    roll = rng.random()
    if roll < 0.05:
        # A chat renamed before may draw the same name again, which would be no change.
        name = f"{rng.choice(_DEPARTMENTS)} {rng.choice(_TOPICS)} ({chat.chatid} renamed)"
    elif roll < 0.10 and len(members) > 1:
        owner = rng.choice([m for m in members if m != owner])

    can_leave = [m for m in members if m != owner]
    leaving = set(rng.sample(can_leave, min(n_leave, len(can_leave))))

    joining: list[str] = []
    # Rejection sampling keeps this cheap for big pools; the attempt cap keeps it bounded when
    # nearly everyone is already a member.
    for _ in range(n_join * 20):
        if len(joining) >= n_join:
            break
        candidate = rng.choice(pool) if pool else ""
        if candidate and candidate not in present and candidate not in joining:
            joining.append(candidate)

    if (name, owner) == (chat.name, chat.owner) and not (leaving or joining):
        outsiders = [u for u in pool if u not in present]
        if outsiders:
            joining.append(rng.choice(outsiders))
        elif can_leave:
            leaving.add(rng.choice(can_leave))
        else:
            name = f"{name} (renamed)"

    return ChatEdit(
        chatid=chat.chatid,
        name=name if name != chat.name else None,
        owner=owner if owner != chat.owner else None,
        # In member order, so the edit (and the changes it causes) do not depend on set order.
        leaving=tuple(m for m in members if m in leaving),
        joining=tuple(joining),
    )
