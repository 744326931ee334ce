"""The run log: ``sync_runs`` and ``sync_run_items`` as the sync starts, ends and reports runs.

SQL only, on its own pooled connections: the sync records a run's start and end here, and
``runs`` and ``status`` read them back. A run's items are written with its chats (the store's
batches); this module only reads them. SQLAlchemy errors become ``DatabaseFailure``.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Engine, insert, select, update

from etl.budgetstore import record_calls, record_exhaustion
from etl.db import database_errors
from etl.quota import EndpointCalls
from etl.schema import sync_run_items, sync_runs


class RunLog:
    """The ``sync_runs`` rows (and a run's items) of one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def start_run(
        self, trigger: str, chats_total: int, *, now: dt.datetime, chats_skipped: int = 0
    ) -> tuple[int, int]:
        """Mark runs left ``running`` by dead processes ``abandoned``; insert this run's row.

        Only called while holding the sync lock, so any ``running`` row is a dead run's.
        Returns (run id, number of runs marked abandoned).
        """
        with database_errors("starting the run"), self.engine.begin() as conn:
            abandoned = conn.execute(
                update(sync_runs)
                .where(sync_runs.c.status == "running")
                .values(
                    status="abandoned",
                    finished_at=now,
                    # Or it lived but its database was gone when it tried to record the end.
                    error="the run never recorded its end: its process died, or lost the database",
                )
            ).rowcount
            result = conn.execute(
                insert(sync_runs).values(
                    started_at=now,
                    status="running",
                    trigger=trigger,
                    chats_total=chats_total,
                    chats_succeeded=0,
                    chats_failed=0,
                    chats_changed=0,
                    api_calls=0,
                    retries=0,
                    chats_skipped=chats_skipped,
                    hostname=socket.gethostname()[:255],
                    pid=os.getpid(),
                )
            )
            run_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
            assert isinstance(run_id, int)
            return run_id, abandoned

    def finish_run(
        self,
        run_id: int,
        values: Mapping[str, Any],
        *,
        calls: Sequence[EndpointCalls] = (),
        source: str = "manual",
        quota_exhausted: str | None = None,
    ) -> None:
        """Record the run's outcome, with the calls no writer batch counted yet and, when
        DingTalk answered 90020, that the month's quota is used up (``quota_exhausted``: why)."""
        at = values.get("finished_at") or dt.datetime.now(dt.UTC)
        with database_errors("finishing the run"), self.engine.begin() as conn:
            conn.execute(update(sync_runs).where(sync_runs.c.id == run_id).values(**values))
            record_calls(conn, calls, source=source, at=at, run_id=run_id)
            if quota_exhausted is not None:
                record_exhaustion(conn, at=at, source=source, run_id=run_id, error=quota_exhausted)

    def recent_runs(self, limit: int) -> list[dict[str, Any]]:
        with database_errors("reading runs"), self.engine.connect() as conn:
            rows = conn.execute(
                select(sync_runs).order_by(sync_runs.c.id.desc()).limit(limit)
            ).mappings()
            return [dict(row) for row in rows]

    def latest_run(
        self, *, status: str | None = None, finished: bool = False
    ) -> dict[str, Any] | None:
        """The newest run, or the newest with ``status``, or (``finished``) not ``running``."""
        query = select(sync_runs).order_by(sync_runs.c.id.desc()).limit(1)
        if status is not None:
            query = query.where(sync_runs.c.status == status)
        if finished:
            query = query.where(sync_runs.c.status != "running")
        with database_errors("reading runs"), self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
            return dict(row) if row is not None else None

    def run_items(self, run_id: int, *, status: str | None = None) -> list[dict[str, Any]]:
        """The items of run ``run_id`` (only those with ``status``), by chatid."""
        query = (
            select(sync_run_items)
            .where(sync_run_items.c.run_id == run_id)
            .order_by(sync_run_items.c.chatid)
        )
        if status is not None:
            query = query.where(sync_run_items.c.status == status)
        with database_errors("reading run items"), self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]
