"""structlog set-up: JSON or console lines on stderr, secrets masked in every value.

Bottom layer: imports only ``etl.redact``. Event names are stable (README lists them);
``run_id`` is bound in context by the sync so every event of a run carries it.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from etl.redact import redact

_WRITE_LOCK = threading.Lock()


def _redact_values(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = redact(value)
        elif value is not None and not isinstance(value, int | float | bool):
            event_dict[key] = redact(str(value))
    return event_dict


class _StderrLogger(structlog.PrintLogger):
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._fixed = stream
        super().__init__(stream or sys.stderr)

    def msg(self, message: str) -> None:
        stream = self._fixed or sys.stderr
        # One write per line under a lock: print() writes the text and the newline separately,
        # and lines from two threads (a run's stop relay, the scheduler) would interleave.
        with _WRITE_LOCK:
            stream.write(message + "\n")
            stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def configure_logging(level: str = "INFO", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure structlog for the process (idempotent)."""
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            # Last before rendering, so tracebacks and bound values are masked too.
            _redact_values,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *_args: _StderrLogger(stream),
        cache_logger_on_first_use=False,
    )
