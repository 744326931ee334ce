"""The listener's reconcile runs, in a process of their own.

A reconcile is a sync run over a few chats: fetching, normalizing, planning and writing them
takes tens of milliseconds of CPU. In the listener's process that CPU is taken from the thread
that stores and ACKs events (Python runs one thread at a time), and events waited for their
ACK while a reconcile ran. ``ReconcileProcess`` runs them in a child process instead, one run
at a time, over a pipe: chatids in, the ``RunResult`` (or the exception) out. The child keeps
one engine and one client (``ReconcileRuns``) for all its runs.

The child is forked from multiprocessing's fork server, which has ``etl.sync`` imported
already: starting it costs milliseconds, not an interpreter's start. It stops on SIGTERM or
SIGINT (the run in hand ends interrupted and is recorded as such) and when the listener's end
of the pipe closes, so it never outlives the listener by more than the run in hand. A child
that died is started again at the next run.

Sits beside ``etl.listener``, on top of ``etl.sync``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
import signal
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any, Final

from etl.config import Config
from etl.db import open_database
from etl.errors import EtlError, RunInterrupted, describe_exception
from etl.logs import configure_logging
from etl.redact import register_secret
from etl.sync import ReconcileRuns, RunResult

# How long close() waits for the run in hand to end before the child is killed.
STOP_TIMEOUT_SECONDS: Final = 30.0
_CONTEXT: Final = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["etl.sync"])


class ReconcileProcess:
    """``reconcile(chatids)`` run in a child process; one call at a time."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._process: Any = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> ReconcileProcess:
        """Start the child now (it opens the database while the listener connects)."""
        with self._lock:
            self._ensure()
        return self

    def __call__(self, chatids: Sequence[str]) -> RunResult:
        with self._lock:
            if self._closed:
                raise RunInterrupted("the listener is stopping")
            conn = self._ensure()
            try:
                conn.send(tuple(chatids))
                kind, value = conn.recv()
            except (EOFError, OSError) as exc:
                self._reap()
                raise EtlError("the reconcile process ended before its run did") from exc
        if kind == "error":
            raise value
        assert isinstance(value, RunResult)
        return value

    def close(self) -> None:
        """Stop the child: the run in hand ends interrupted; killed after STOP_TIMEOUT_SECONDS."""
        self._closed = True
        process = self._process
        if process is not None and process.is_alive():
            process.terminate()  # SIGTERM: a run in hand stops as the sync's would
        # Taken once the caller's run has its answer (the child answers before it exits).
        with self._lock:
            if process is not None:
                process.join(STOP_TIMEOUT_SECONDS)
                if process.is_alive():
                    process.kill()
                    process.join()
            self._reap()

    def _ensure(self) -> Connection:
        if self._process is not None and self._process.is_alive() and self._conn is not None:
            return self._conn
        self._reap()
        parent, child = _CONTEXT.Pipe()
        process = _CONTEXT.Process(
            target=_serve, args=(self._config, child), name="dingtalk-etl-reconcile", daemon=True
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent
        return parent

    def _reap(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._process is not None and not self._process.is_alive():
            self._process.join()
            self._process.close()
            self._process = None


def _serve(config: Config, conn: Connection) -> None:
    """The child: run each request until SIGTERM/SIGINT or the listener's end closes."""
    stop = threading.Event()

    def stopping(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    configure_logging(config.logging.level, config.logging.format)
    # Secrets the parent registered when it read the configuration; the client adds its own.
    password = config.database_url.password
    register_secret(password if isinstance(password, str) else None)
    register_secret(config.app_secret)
    with (
        contextlib.closing(conn),
        open_database(config) as engine,
        contextlib.closing(ReconcileRuns(config, engine, stop)) as runs,
    ):
        while not stop.is_set():
            try:
                if not conn.poll(0.2):
                    continue
                chatids = conn.recv()
            except (EOFError, OSError):
                return  # the listener is gone
            conn.send(_answer(runs, chatids))


def _answer(runs: ReconcileRuns, chatids: Sequence[str]) -> tuple[str, Any]:
    try:
        return "ok", runs(chatids)
    except Exception as exc:  # noqa: BLE001 - handed to the listener, which logs it
        try:
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an exception that cannot cross the pipe
            exc = EtlError(describe_exception(exc))
        return "error", exc
