"""Scripted faults: what a fault spec means, and the per-key queues that hold them.

Boundary: this module only parses and queues. It does not know the keys (a chatid,
``"@gettoken"``, whatever a front names its calls) nor how a fault is acted out: the API facade
and the fronts decide that when they take one.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, cast

__all__ = ["Fault", "FaultKind", "FaultQueue"]

FaultKind = Literal[
    "errcode", "http", "nonjson", "block", "slow", "truncate", "reset", "expire_token"
]


def _integer(name: str, arg: str) -> float:
    try:
        return float(int(arg))
    except ValueError:
        raise ValueError(f"expected {name}:<integer>") from None


def _http_status(name: str, arg: str) -> float:
    status = _integer(name, arg)
    if not 200 <= status <= 599:
        raise ValueError("HTTP status must be 200..599")
    return status


def _wait(name: str, arg: str) -> float:
    wait = _integer(name, arg)
    if wait < 0:
        raise ValueError("wait must be >= 0")
    return wait


def _seconds(name: str, arg: str) -> float:
    try:
        seconds = float(arg)
    except ValueError:
        raise ValueError(f"expected {name}:<seconds>") from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError("seconds must be finite and >= 0")
    return seconds


# Each kind's argument parser; None for kinds that take no argument. A new kind is one row.
_ARGUMENTS: Final[dict[str, Callable[[str, str], float] | None]] = {
    "errcode": _integer,
    "http": _http_status,
    "nonjson": None,
    "block": _wait,
    "slow": _seconds,
    "truncate": None,
    "reset": None,
    "expire_token": None,
}


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, consumed by exactly one request."""

    kind: FaultKind
    value: float = 0.0
    spec: str = ""

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """Parse ``"errcode:N"``, ``"http:N"``, ``"nonjson"``, ``"block:N"``, ``"slow:S"``,
        ``"truncate"``, ``"reset"`` or ``"expire_token"``; ``ValueError`` otherwise."""
        if not isinstance(spec, str):
            raise ValueError(f"fault spec must be a string, got {spec!r}")
        name, sep, arg = spec.strip().partition(":")
        if name not in _ARGUMENTS:
            raise ValueError(f"unknown fault {spec!r}")
        parse_argument = _ARGUMENTS[name]
        if parse_argument is None:
            if sep:
                raise ValueError(f"fault {spec!r}: {name!r} takes no argument")
            return cls(cast(FaultKind, name), 0.0, spec)
        try:
            value = parse_argument(name, arg)
        except ValueError as exc:
            raise ValueError(f"fault {spec!r}: {exc}") from None
        return cls(cast(FaultKind, name), value, spec)


class FaultQueue:
    """Faults waiting per key, each taken by exactly one request, first in first out."""

    def __init__(self, lock: threading.RLock | None = None) -> None:
        # The world passes its own lock, so taking a fault is atomic with the rest of admission.
        self._lock = lock if lock is not None else threading.RLock()
        self._queues: dict[str, deque[Fault]] = {}

    def inject(self, key: str, *faults: str | Fault) -> None:
        """Queue faults for ``key``; specs are parsed first, so a bad one queues nothing."""
        parsed = [f if isinstance(f, Fault) else Fault.parse(f) for f in faults]
        with self._lock:
            self._queues.setdefault(key, deque()).extend(parsed)

    def take(self, key: str) -> Fault | None:
        """The next fault queued for ``key``, now consumed; None when there is none."""
        with self._lock:
            queue = self._queues.get(key)
            return queue.popleft() if queue else None

    def pending(self, key: str) -> list[str]:
        with self._lock:
            return [f.spec or f.kind for f in self._queues.get(key, ())]

    def clear(self, key: str | None = None) -> None:
        with self._lock:
            if key is None:
                self._queues.clear()
            else:
                self._queues.pop(key, None)
