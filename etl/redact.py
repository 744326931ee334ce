"""Keeps secrets out of every string that leaves the process.

Bottom layer: no imports from the package. Secrets are registered as soon as they are known
(app_secret and database password at config load, each access_token when it is issued) and
``redact`` replaces them, and any ``access_token``/``appsecret``/``ticket`` query value, with
``***``.
"""

from __future__ import annotations

import re
import threading

_MASK = "***"
# Query parameters that carry credentials in DingTalk URLs, whatever their value.
_QUERY_SECRET = re.compile(r"(?i)\b(access_token|appsecret|app_secret|ticket)=([^&\s'\"]+)")
_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()


def register_secret(value: str | None) -> None:
    """Remember ``value`` so that ``redact`` masks it from now on (short values are ignored)."""
    global _secrets
    if value is None or len(value) < 4:
        # A 1-3 character "secret" would mask ordinary words everywhere.
        return
    with _lock:
        _secrets = _secrets | {value}


def redact(text: str) -> str:
    """Return ``text`` with every registered secret and credential query value masked."""
    text = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}={_MASK}", text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def forget_secrets() -> None:
    """Drop every registered secret (tests use it between cases)."""
    global _secrets
    with _lock:
        _secrets = frozenset()
