"""Per-API rate limiting: a sliding one-second window of admitted calls for each API.

Boundary: admission only. The limit is passed on every call (it may change while serving) and
the caller decides what a refused call answers and how it is counted.
"""

from __future__ import annotations

import threading
from collections import deque

__all__ = ["RateLimiter"]


class RateLimiter:
    """Admits a call while fewer than ``limit`` calls to the same API were admitted within
    the last ``window_seconds``."""

    def __init__(self, lock: threading.RLock | None = None, window_seconds: float = 1.0) -> None:
        self._lock = lock if lock is not None else threading.RLock()
        self._window_seconds = window_seconds
        self._windows: dict[str, deque[float]] = {}

    def admit(self, api: str, at: float, limit: int) -> bool:
        """Whether a call to ``api`` arriving at ``at`` (monotonic) may go on; a ``limit`` of 0
        admits everything."""
        if limit <= 0:
            return True
        with self._lock:
            window = self._windows.setdefault(api, deque())
            while window and window[0] <= at - self._window_seconds:
                window.popleft()
            # Only admitted calls fill the window, so a client that backs off recovers one
            # window after its last successful call.
            if len(window) >= limit:
                return False
            window.append(at)
            return True
