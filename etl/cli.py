"""Command line: a click group over the library. The only module that imports click.

Exit codes (the contract): 0 ok, 1 partial, 2 usage, 3 run failed, 75 locked, 78 config.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

from etl import __version__, migrate
from etl.config import Config, check_chatid, load_config, resolve_config_path
from etl.demo import demo_world, run_demo
from etl.errors import ConfigError, EtlError, FatalError, LockHeld
from etl.lock import run_lock
from etl.logs import configure_logging
from etl.output import plain, to_table
from etl.simulator import Simulator, World
from etl.store import Store, create_db_engine, database_errors
from etl.sync import EXIT_CONFIG, EXIT_FAILED, EXIT_LOCKED, run_sync

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"dingtalk-etl: error: {message}", err=True)
    sys.exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Map our exceptions to the contract's exit codes with one clear line on stderr."""
    try:
        yield
    except ConfigError as exc:
        _fail(exc.message, EXIT_CONFIG)
    except LockHeld as exc:
        _fail(f"{exc.message}; nothing was done", EXIT_LOCKED)
    except FatalError as exc:
        _fail(exc.message, EXIT_FAILED)
    except EtlError as exc:
        _fail(exc.message, EXIT_FAILED)


def _check_chatids(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    """``--chatid`` values, stripped; an empty or impossible id is a usage error (exit 2)."""
    chatids: list[str] = []
    for value in values:
        reason = check_chatid(value.strip())
        if reason is not None:
            raise click.BadParameter(f"{value!r}: {reason}")
        chatids.append(value.strip())
    return tuple(chatids)


class _Ctx:
    def __init__(self, config_option: str | None) -> None:
        self.config_path = resolve_config_path(config_option)

    def load(self, *, need_api: bool) -> Config:
        config = load_config(self.config_path, need_api=need_api)
        configure_logging(config.logging.level, config.logging.format)
        return config


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="dingtalk-etl")
@click.option(
    "--config",
    "config_option",
    metavar="PATH",
    default=None,
    help="Configuration file. Default: $DINGTALK_ETL_CONFIG, else ./config.toml.",
)
@click.pass_context
def cli(ctx: click.Context, config_option: str | None) -> None:
    """Sync DingTalk group chats (chat/get) into SQLite, PostgreSQL or MySQL.

    \b
    First steps:
      dingtalk-etl demo                      try it against the bundled simulator
      cp config.example.toml config.toml     then set app_key, app_secret, chatids
      dingtalk-etl db upgrade                create or migrate the tables
      dingtalk-etl sync                      one run; exit 0 ok, 1 partial, 3 failed
      dingtalk-etl runs                      what recent runs did

    Exit codes: 0 ok, 1 some chats failed, 2 usage error, 3 run failed,
    75 another sync holds the lock, 78 configuration error.
    """
    configure_logging()
    ctx.obj = _Ctx(config_option)


@cli.group(context_settings=CONTEXT)
def db() -> None:
    """Manage the database schema."""


@db.command("upgrade", context_settings=CONTEXT)
@click.pass_obj
def db_upgrade(obj: _Ctx) -> None:
    """Apply schema migrations up to the latest revision (safe to run again).

    Needs only the [database] setting.

    \b
    Example:
      DINGTALK_ETL_DATABASE_URL=postgresql://etl@db/etl dingtalk-etl db upgrade
    """
    with _errors():
        config = obj.load(need_api=False)
        engine = create_db_engine(config.database_url)
        try:
            with database_errors("migrating the schema"), run_lock(engine):
                before, after = migrate.upgrade(engine)
        finally:
            engine.dispose()
    if before == after:
        click.echo(f"{config.database_display}: schema already at revision {after}")
    else:
        click.echo(
            f"{config.database_display}: schema upgraded from {before or 'empty'} to {after}"
        )


@cli.command(context_settings=CONTEXT)
@click.option(
    "--chatid",
    "chatids",
    multiple=True,
    metavar="ID",
    callback=_check_chatids,
    help="Sync only this chat (repeatable). Default: every configured chatid.",
)
@click.option("--migrate", is_flag=True, help="Upgrade the schema first if it is behind.")
@click.pass_obj
def sync(obj: _Ctx, chatids: tuple[str, ...], migrate: bool) -> None:
    """Run one sync over the configured chatids and print a one-line summary.

    \b
    Exit codes:
      0   every requested chat synced
      1   partial: some chats failed (see `dingtalk-etl runs` and sync_run_items)
      3   the run failed as a whole (credentials, permission, quota, database)
      75  another sync holds the lock on this database; nothing was done
      78  configuration error, or the schema needs `dingtalk-etl db upgrade`

    \b
    Examples:
      dingtalk-etl sync
      dingtalk-etl --config /etc/dingtalk-etl/config.toml sync --chatid chat123
    """
    stop = threading.Event()
    with _errors(), _stop_on_signals(stop):
        config = obj.load(need_api=True)
        result = run_sync(config, chatids=chatids or None, migrate_schema=migrate, stop=stop)
    click.echo(result.summary())
    for failure in result.failures[:20]:
        click.echo(f"  failed {failure.chatid}: {failure.error}", err=True)
    if len(result.failures) > 20:
        click.echo(f"  ... and {len(result.failures) - 20} more failed chats", err=True)
    sys.exit(result.exit_code)


@cli.command(context_settings=CONTEXT)
@click.option(
    "--limit",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many runs, newest first.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a JSON array of sync_runs rows (keys are the column names).",
)
@click.pass_obj
def runs(obj: _Ctx, limit: int, as_json: bool) -> None:
    """Show recent sync runs with their counts and status.

    \b
    Examples:
      dingtalk-etl runs --limit 5
      dingtalk-etl runs --json | jq '.[0].status'
    """
    with _errors():
        config = obj.load(need_api=False)
        engine = create_db_engine(config.database_url)
        try:
            with database_errors("reading runs"):
                migrate.check_schema(engine)
            rows = Store(engine).recent_runs(limit)
        finally:
            engine.dispose()
    if as_json:
        click.echo(json.dumps([{k: plain(v) for k, v in row.items()} for row in rows], indent=2))
        return
    columns = [
        "id",
        "started_at",
        "finished_at",
        "status",
        "trigger",
        "chats_total",
        "chats_succeeded",
        "chats_failed",
        "chats_changed",
        "api_calls",
        "retries",
        "error",
    ]
    click.echo(to_table(rows, columns, width=60))


@cli.command(context_settings=CONTEXT)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind. Loopback by default; anything else is reachable by others.",
)
@click.option(
    "--port",
    default=8765,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to bind (0 picks a free one).",
)
@click.option(
    "--scenario",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Scenario TOML (chats, credentials, faults). Default: the demo world.",
)
def simulate(host: str, port: int, scenario: Path | None) -> None:
    """Serve a local DingTalk simulator (gettoken, chat/get) until Ctrl-C.

    Point a config at it to try dingtalk-etl safely:

    \b
      [dingtalk]
      base_url = "http://127.0.0.1:8765"
      app_key = "demo-key"
      app_secret = "demo-secret"

    \b
    Examples:
      dingtalk-etl simulate
      dingtalk-etl simulate --port 9000 --scenario tests/fixtures/scenario_small.toml
    """
    try:
        world = World.from_scenario(scenario) if scenario else demo_world()
    except (OSError, ValueError) as exc:
        _fail(str(exc), EXIT_CONFIG)
    sim = Simulator(world, host=host, port=port)
    try:
        sim.start()
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", EXIT_FAILED)
    click.echo(f"DingTalk simulator on {sim.base_url} ({len(world.chats)} chats)")
    click.echo(f"  app_key = {world.app_key!r}  app_secret = {world.app_secret!r}")
    click.echo(
        "  chatids: "
        + ", ".join(sorted(world.chats)[:8])
        + (" ..." if len(world.chats) > 8 else "")
    )
    click.echo("Ctrl-C to stop.")
    done = threading.Event()
    with _stop_on_signals(done):
        done.wait()
    sim.stop()


@cli.command(context_settings=CONTEXT)
@click.option(
    "--database",
    "database",
    default="demo.db",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="SQLite file to (re)create for the demo.",
)
def demo(database: Path) -> None:
    """Try everything with no configuration: simulator, two syncs, the tables.

    Starts the bundled DingTalk simulator on loopback, syncs a dozen sample chats into a
    fresh SQLite file, prints the summary and some rows, changes the simulated world
    (joins, leaves, an owner change, a dismissal) and syncs again to show the events.
    """
    with _errors():
        run_demo(database, echo=click.echo)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop``; the run finishes the chat in hand and marks itself."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def main() -> None:
    cli(prog_name="dingtalk-etl")
