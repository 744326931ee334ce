"""The access-token service: issue, reuse, extend and expire tokens as DingTalk does.

Boundary: tokens only. It does not check app credentials nor answer errcodes; the API facade
does, and asks this service whether a token is valid, expired or unknown.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Literal

__all__ = ["Issued", "TokenService", "TokenState"]

TokenState = Literal["valid", "expired", "unknown"]


@dataclass(frozen=True)
class Issued:
    token: str
    new: bool


class TokenService:
    """One live token at a time; every token ever issued is remembered with its expiry.

    Remembering old tokens lets a stale one answer "expired" rather than "unknown", which is
    what a client that kept a token too long sees from DingTalk.
    """

    def __init__(self, lock: threading.RLock | None = None) -> None:
        self._lock = lock if lock is not None else threading.RLock()
        self._expiry: dict[str, float] = {}
        self._current: str | None = None

    @property
    def current(self) -> str | None:
        with self._lock:
            return self._current

    def issue(self, ttl_seconds: float) -> Issued:
        """The live token, or a new one if it expired; valid ``ttl_seconds`` from now."""
        with self._lock:
            now = time.monotonic()
            token = self._current
            new = token is None or self._expiry[token] <= now
            if token is None or new:
                token = self._current = secrets.token_hex(16)
            # DingTalk extends a live token's lifetime when it is fetched again.
            self._expiry[token] = now + ttl_seconds
            return Issued(token, new)

    def state(self, token: str) -> TokenState:
        with self._lock:
            expires_at = self._expiry.get(token) if token else None
            if expires_at is None:
                return "unknown"
            return "valid" if time.monotonic() < expires_at else "expired"

    def expire(self) -> None:
        """Make the current token expired as of now."""
        with self._lock:
            if self._current is not None:
                self._expiry[self._current] = time.monotonic()
