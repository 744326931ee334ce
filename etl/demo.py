"""The demo: the simulator, two syncs into a fresh SQLite file, and what landed.

Sits on top like the CLI (it drives the simulator, the sync and reads the tables) but takes an
``echo`` callable instead of importing click.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select

from etl.config import Config, parse_config
from etl.db import open_database
from etl.listener import run_listen
from etl.logs import configure_logging
from etl.output import to_table
from etl.schema import chat_events, chat_members, chats, sync_run_items, sync_runs
from etl.simulator import SimChat, Simulator, StreamGateway, World
from etl.sync import RunResult, run_sync

DEMO_APP_KEY = "demo-key"
DEMO_APP_SECRET = "demo-secret"  # noqa: S105 - the simulator's fake app
UNREADABLE_CHAT = "chat-partner-acme"
DISMISSED_CHAT = "chat-project-phoenix"

_CHATS: list[tuple[str, str, int]] = [
    # chatid, name, members
    ("chat-all-staff", "All staff", 300),
    ("chat-finance", "Finance", 18),
    ("chat-engineering", "Engineering", 85),
    ("chat-sales-east", "Sales East", 40),
    ("chat-hr-announce", "HR Announcements", 120),
    ("chat-product", "Product", 25),
    ("chat-support-t2", "Support Tier 2", 30),
    ("chat-marketing", "Marketing", 22),
    ("chat-oncall", "Ops On-call", 12),
    ("chat-leadership", "Leadership", 9),
    (DISMISSED_CHAT, "Project Phoenix (closed)", 14),
    (UNREADABLE_CHAT, "Partner: ACME", 6),
]


def demo_world(seed: int = 7) -> World:
    """A dozen realistic chats over 300 users: one dismissed, one the app may not read."""
    rng = random.Random(seed)
    users = [f"user{n:04d}" for n in range(1, 301)]
    world = World(DEMO_APP_KEY, DEMO_APP_SECRET)
    for index, (chatid, name, size) in enumerate(_CHATS):
        members = users if size >= len(users) else sorted(rng.sample(users, size))
        world.add_chat(
            SimChat(
                chatid=chatid,
                name=name,
                owner=members[0],
                useridlist=list(members),
                searchable=int(index % 4 == 0),
                validationType=int(index % 3 != 0),
                mentionAllAuthority=int(index % 2 == 0),
                managementType=1,
                icon=f"@lADPDemoIcon{index:02d}",
                status=2 if chatid == DISMISSED_CHAT else 1,
                readable=chatid != UNREADABLE_CHAT,
            )
        )
    return world


def change_world(world: World) -> list[str]:
    """Joins, leaves, an owner change, a rename and a dismissal; returns what was done."""
    finance = world.chat("chat-finance")
    engineering = world.chat("chat-engineering")
    leavers = engineering.useridlist[-3:]
    world.add_members("chat-finance", ["user0290", "user0291"])
    world.remove_members("chat-engineering", leavers)
    new_owner = finance.useridlist[1]
    world.set_attr("chat-finance", owner=new_owner, name="Finance & Controlling")
    world.dismiss("chat-product")
    return [
        "chat-finance: user0290 and user0291 join; renamed; owner -> " + new_owner,
        "chat-engineering: " + ", ".join(leavers) + " leave",
        "chat-product: dismissed",
    ]


def run_demo(database: Path, *, echo: Callable[[str], Any]) -> None:
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    configure_logging("ERROR", "console")
    world = demo_world()
    with Simulator(world) as sim:
        config = parse_config(
            {
                "dingtalk": {
                    "base_url": sim.base_url,
                    "app_key": DEMO_APP_KEY,
                    "app_secret": DEMO_APP_SECRET,
                    "max_attempts": 3,
                },
                "database": {"url": f"sqlite:///{database.resolve()}"},
                "sync": {"chatids": sorted(world.chatids())},
                "logging": {"level": "ERROR", "format": "console"},
            },
            Path("demo"),
            environ={},
        )
        echo(f"DingTalk simulator on {sim.base_url}; database {database}")
        echo("")
        echo("== First sync (schema created with --migrate) ==")
        first = run_sync(config, migrate_schema=True)
        _report_run(first, echo)
        _show_tables(config, first, echo)

        echo("")
        echo("== The simulated world changes ==")
        for line in change_world(world):
            echo(f"  {line}")
        echo("")
        echo("== Second sync ==")
        second = run_sync(config)
        _report_run(second, echo)
        _show_events(config, second, echo)
        echo("")
        _demo_events(world, config, echo)
    echo("")
    echo(f"Explore it: sqlite3 {database} 'SELECT * FROM chat_events ORDER BY id DESC LIMIT 20'")
    echo("Next: cp config.example.toml config.toml, set your app and chatids, then")
    echo("      dingtalk-etl db upgrade && dingtalk-etl sync")


def _demo_events(world: World, config: Config, echo: Callable[[str], Any]) -> None:
    """`listen` against the simulator's Stream gateway: one event, then its reconcile."""
    echo("== Group events (Stream mode) ==")
    with StreamGateway(world) as gateway:
        settings = config.events.model_copy(
            update={"gateway_url": gateway.gateway_url, "reconcile_delay_seconds": 1.0}
        )
        config = dataclasses.replace(config, events=settings)
        stop = threading.Event()
        reconciled: list[RunResult] = []

        def confirm(_chatids: Sequence[str], result: RunResult) -> None:
            reconciled.append(result)

        listener = threading.Thread(
            target=run_listen,
            args=(config, stop),
            kwargs={"on_reconciled": confirm},
            daemon=True,
        )
        listener.start()
        try:
            _wait_for(lambda: gateway.connected, "the listener to connect")
            echo(f"  listening on {gateway.gateway_url} (no API call spent while events arrive)")
            calls = world.stats.total_requests
            finance = world.chat("chat-finance")
            removed, operator = finance.useridlist[-1], finance.owner
            world.remove_members("chat-finance", [removed], operator=operator)
            row = _wait_for(lambda: _event_row(config, removed), "the event's row")
            echo(
                f"  event: {operator} removed {removed} from chat-finance at "
                f"{row['occurred_at'].isoformat(timespec='milliseconds')} "
                f"({world.stats.total_requests - calls} API calls)"
            )
            result = _wait_for(lambda: reconciled[0] if reconciled else None, "the reconcile")
            delay = settings.reconcile_delay_seconds
            echo(f"  reconcile {delay:g} s after the event: {result.summary()}")
            rows, left_at = _change_rows(config, "chat-finance", removed)
            echo(
                f"  chat_events holds {rows} row for the change (the event's, source 'event'); "
                f"chat_members.left_at = {left_at.isoformat(timespec='milliseconds')}"
            )
        finally:
            stop.set()
            listener.join(timeout=10)


def _change_rows(config: Config, chatid: str, userid: str) -> tuple[int, Any]:
    """How many member_left rows the log has for ``userid``, and its member row's left_at."""
    with open_database(config) as engine, engine.connect() as conn:
        rows = conn.execute(
            select(chat_events.c.id).where(
                chat_events.c.chatid == chatid,
                chat_events.c.userid == userid,
                chat_events.c.event_type == "member_left",
            )
        ).all()
        left_at = conn.execute(
            select(chat_members.c.left_at).where(
                chat_members.c.chatid == chatid, chat_members.c.userid == userid
            )
        ).scalar_one()
        return len(rows), left_at


def _event_row(config: Config, userid: str) -> dict[str, Any] | None:
    with open_database(config) as engine, engine.connect() as conn:
        row = (
            conn.execute(
                select(chat_events)
                .where(chat_events.c.userid == userid, chat_events.c.source == "event")
                .limit(1)
            )
            .mappings()
            .first()
        )
        return dict(row) if row is not None else None


def _wait_for(probe: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while (value := probe()) is None or value is False:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo timed out waiting for {what}")
        time.sleep(0.05)
    return value


def _report_run(result: RunResult, echo: Callable[[str], Any]) -> None:
    echo(result.summary())
    for failure in result.failures:
        echo(f"  failed {failure.chatid}: {failure.error}")


def _show_tables(config: Config, result: RunResult, echo: Callable[[str], Any]) -> None:
    with open_database(config) as engine, engine.connect() as conn:
        rows = conn.execute(
            select(
                chats.c.chatid,
                chats.c.name,
                chats.c.owner_userid,
                chats.c.status,
                chats.c.member_count,
                chats.c.validation_type,
                chats.c.dismissed_at,
            ).order_by(chats.c.chatid)
        ).mappings()
        echo("\nchats:")
        echo(to_table(list(rows)))
        rows = conn.execute(
            select(chat_members).order_by(chat_members.c.chatid, chat_members.c.userid).limit(5)
        ).mappings()
        echo("\nchat_members (first 5 of many):")
        echo(to_table(list(rows)))
        rows = conn.execute(select(chat_events).order_by(chat_events.c.id).limit(5)).mappings()
        echo("\nchat_events (first 5; every member at discovery is a baseline member_joined):")
        echo(to_table(list(rows)))
        rows = conn.execute(
            select(sync_run_items)
            .where(sync_run_items.c.run_id == result.run_id)
            .order_by(sync_run_items.c.status, sync_run_items.c.chatid)
            .limit(4)
        ).mappings()
        echo("\nsync_run_items (failures first):")
        echo(to_table(list(rows), width=50))


def _show_events(config: Config, result: RunResult, echo: Callable[[str], Any]) -> None:
    with open_database(config) as engine, engine.connect() as conn:
        rows = conn.execute(
            select(
                chat_events.c.chatid,
                chat_events.c.event_type,
                chat_events.c.userid,
                chat_events.c.field,
                chat_events.c.old_value,
                chat_events.c.new_value,
            )
            .where(chat_events.c.run_id == result.run_id)
            .order_by(chat_events.c.id)
        ).mappings()
        echo("\nchat_events written by this run:")
        echo(to_table(list(rows)))
        runs = conn.execute(
            select(
                sync_runs.c.id,
                sync_runs.c.status,
                sync_runs.c.chats_total,
                sync_runs.c.chats_succeeded,
                sync_runs.c.chats_failed,
                sync_runs.c.chats_changed,
                sync_runs.c.api_calls,
                sync_runs.c.retries,
            ).order_by(sync_runs.c.id)
        ).mappings()
        echo("\nsync_runs:")
        echo(to_table(list(runs)))
