"""Command line: a click group over the library. The only module that imports click.

Exit codes (the contract): 0 ok, 1 partial, 2 usage, 3 run failed, 75 locked, 78 config.
"""

from __future__ import annotations

import datetime as dt
import gc
import importlib.util
import json
import math
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from itertools import chain
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from zoneinfo import ZoneInfo

import click

from etl import __version__
from etl.errors import EtlError, ExitCode
from etl.output import blocks, write_chunks_atomic

# Each command imports what it needs when it runs: `--help`, `--version` and `status` must
# not pay for Alembic, the simulator, the reports and every SQLAlchemy dialect.
if TYPE_CHECKING:
    from sqlalchemy import Engine

    from etl import report_html, reports
    from etl.config import Config
    from etl.simulator import Simulator, StreamGateway, World


def _lazy_module(name: str) -> ModuleType:
    """``name``, loaded when an attribute of it is first used (importlib's LazyLoader)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    assert spec is not None
    assert spec.loader is not None
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if not TYPE_CHECKING:
    reports = _lazy_module("etl.reports")
    report_html = _lazy_module("etl.report_html")

# etl.report_html.FORMATS, named here so that building the options imports no report code (a
# test keeps the two equal).
FORMATS = ("table", "csv", "json", "html")

# Allocations between two collections of the youngest generation in the console script (the
# interpreter's default is 700); see ``main``.
GC_FIRST_GENERATION = 200_000

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"dingtalk-etl: error: {message}", err=True)
    sys.exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Map our exceptions to the contract's exit codes with one clear line on stderr."""
    try:
        yield
    except EtlError as exc:
        _fail(exc.message, exc.exit_code)


def _check_chatids(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    """``--chatid`` values, stripped; an empty or impossible id is a usage error (exit 2)."""
    from etl.config import check_chatid

    chatids: list[str] = []
    for value in values:
        reason = check_chatid(value.strip())
        if reason is not None:
            raise click.BadParameter(f"{value!r}: {reason}")
        chatids.append(value.strip())
    return tuple(chatids)


class _Ctx:
    def __init__(self, config_option: str | None) -> None:
        self.config_option = config_option

    def load(self, *, need_api: bool) -> Config:
        from etl.config import load_config, resolve_config_path
        from etl.logs import configure_logging

        config = load_config(resolve_config_path(self.config_option), need_api=need_api)
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
      dingtalk-etl report --help             who was in which group when, what changed

    Exit codes: 0 ok, 1 some chats failed, 2 usage error, 3 run failed,
    75 another sync holds the lock, 78 configuration error.
    """
    from etl.logs import configure_logging

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
    from etl import migrate
    from etl.db import database_errors, open_database
    from etl.lock import run_lock

    with _errors():
        config = obj.load(need_api=False)
        with (
            open_database(config) as engine,
            database_errors("migrating the schema"),
            run_lock(engine),
        ):
            before, after = migrate.upgrade(engine)
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
    help="Sync only this chat (repeatable), due or not, dismissed or not.",
)
@click.option(
    "--all",
    "all_chats",
    is_flag=True,
    help="Read every chat of the synced set, due or not, dismissed ones included.",
)
@click.option("--migrate", is_flag=True, help="Upgrade the schema first if it is behind.")
@click.pass_obj
def sync(obj: _Ctx, chatids: tuple[str, ...], all_chats: bool, migrate: bool) -> None:
    """Run one sync and print a one-line summary.

    Without --chatid or --all it reads the chats that are due: with [sync] polling =
    "every_run" (the default) every chat of the synced set but the dismissed ones; with
    "adaptive" those whose poll interval has run out. With [dingtalk] monthly_call_quota, a
    run reads only as many chats as the month's calls left pay for (the most overdue).

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
      dingtalk-etl sync --all
      dingtalk-etl --config /etc/dingtalk-etl/config.toml sync --chatid chat123
    """
    from etl.monitoring import monitored_sync

    if all_chats and chatids:
        raise click.UsageError("give --chatid or --all, not both")
    stop = threading.Event()
    with _errors(), _stop_on_signals(stop):
        config = obj.load(need_api=True)
        result = monitored_sync(
            config,
            chatids=chatids or None,
            all_chats=all_chats,
            migrate_schema=migrate,
            stop=stop,
        )
    click.echo(result.summary())
    if result.exit_code == ExitCode.FAILED:
        # cron mails stderr: the reason must be there, not only in the summary line.
        click.echo(f"dingtalk-etl: error: run failed: {result.error}", err=True)
    for line in result.failure_lines():
        click.echo(f"  {line}", err=True)
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
    from etl.db import open_database, require_schema
    from etl.output import plain, to_table
    from etl.runlog import RunLog

    with _errors():
        config = obj.load(need_api=False)
        with open_database(config, read_only=True) as engine:
            require_schema(engine, "reading runs")
            rows = RunLog(engine).recent_runs(limit)
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
        "chats_skipped",
        "api_calls",
        "retries",
        "error",
    ]
    click.echo(to_table(rows, columns, width=60))


@cli.command(context_settings=CONTEXT)
@click.pass_obj
def schedule(obj: _Ctx) -> None:
    """Run `sync` on the [schedule] trigger until SIGTERM or SIGINT (Ctrl-C).

    Needs [schedule] cron (or interval_minutes). Each fire is one sync run recorded with
    trigger 'schedule', watched like `sync` ([monitoring]). A run that fails, a database
    that is down and a lock held by another instance (several instances may share one
    database: one syncs, the others log schedule.skipped_locked) are logged; the next fire
    comes as planned. On SIGTERM/SIGINT the run in hand finishes its current chat, is marked
    interrupted, and the command exits 0.

    \b
    Exit codes:
      0   stopped by SIGTERM/SIGINT
      78  configuration error (no trigger), or the schema needs `dingtalk-etl db upgrade`

    \b
    Examples:
      dingtalk-etl --config /etc/dingtalk-etl/config.toml schedule
    """
    from etl.scheduler import run_schedule

    stop = threading.Event()
    with _errors(), _stop_on_signals(stop):
        config = obj.load(need_api=True)
        run_schedule(config, stop)


@cli.command(context_settings=CONTEXT)
@click.pass_obj
def listen(obj: _Ctx) -> None:
    """Record DingTalk's group events as they happen, until SIGTERM or SIGINT (Ctrl-C).

    Opens a Stream-mode connection to [events] gateway_url with [dingtalk] app_key and
    app_secret (no public address needed, no API call spent) and records the six group
    events (members added or removed, a member quitting, a new owner, a new name, a
    dismissal) in chat_events with DingTalk's time and who did it. Each event is ACKed only
    once its rows are committed. A chat with events is re-read with chat/get [events]
    reconcile_delay_seconds after its last event (a run with trigger 'event'), which
    confirms the events and records what none said. The connection is opened again after
    a drop, a `disconnect` or [events] silence_timeout_seconds without a frame. `listen`
    holds the sync lock only while a reconcile writes: `sync` and `schedule` run beside it.
    On SIGTERM/SIGINT the frame in hand is finished and the connection closed.

    \b
    Exit codes:
      0   stopped by SIGTERM/SIGINT
      3   the gateway refused the app (Stream mode or the event subscription missing), or
          the database failed
      78  configuration error, credentials refused by the gateway, or the schema needs
          `dingtalk-etl db upgrade`

    \b
    Examples:
      dingtalk-etl --config /etc/dingtalk-etl/config.toml listen
    """
    from etl.listener import run_listen
    from etl.monitoring import listener_metrics_writer

    stop = threading.Event()
    with _errors(), _stop_on_signals(stop):
        config = obj.load(need_api=True)
        run_listen(config, stop, on_stats=listener_metrics_writer(config))


def _check_duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """``90s``, ``30m``, ``2h``, ``1d`` or plain seconds, as whole seconds (else exit 2)."""
    from etl.monitoring import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _check_percent(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    """A percentage > 0 such as ``80``, ``100`` or ``12.5`` (a trailing ``%`` allowed)."""
    if value is None:
        return None
    try:
        percent = float(value.strip().removesuffix("%"))
    except ValueError:
        percent = math.nan
    if not (0 < percent < math.inf):
        raise click.BadParameter(
            f"{value!r} is not a percentage: use a number > 0, as in 80 or 100"
        )
    return percent


@cli.command(context_settings=CONTEXT)
@click.option(
    "--max-age",
    "max_age",
    default=None,
    metavar="DURATION",
    callback=_check_duration,
    help="Unhealthy when the last successful run finished longer ago than this: "
    "90s, 30m, 2h, 1d or plain seconds.",
)
@click.option(
    "--quota-warn",
    "quota_warn",
    default=None,
    metavar="PERCENT",
    callback=_check_percent,
    help="Unhealthy when the API calls projected for this quota month pass this share of "
    "[dingtalk] monthly_call_quota (e.g. 80), or DingTalk said 90020 this month. Without a "
    "quota set there is nothing to check (said on a line of its own).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the state as one JSON object.")
@click.pass_obj
def status(obj: _Ctx, max_age: int | None, quota_warn: float | None, as_json: bool) -> None:
    """Is the job healthy? The last run, time since the last success, failing chats, and the
    API calls of this quota month.

    A success is a run whose status is 'succeeded' (every chat synced); a partial run is
    not. Needs only the [database] setting. The first line is the verdict (OK, STALE or
    QUOTA; when both checks fail, the runs' verdict comes first).

    The API line counts the calls of every command on every machine since the quota month
    began ([dingtalk] quota_timezone), and projects the month's total: by the [schedule]
    trigger and the poll plan when a schedule is configured, else at this month's pace. It
    plans for the [sync] chatids of the file (with a chatids_file, or none: every chat in
    the database too), plus the discovered chats.

    \b
    Exit codes:
      0   healthy: a run succeeded (within --max-age, if given), and the projection is
          within --quota-warn, if given
      1   unhealthy: no successful run recorded, or the last is older than --max-age,
          or the projection passes --quota-warn of the quota, or DingTalk said 90020
          this month (with --quota-warn)
      2   usage error (e.g. a bad DURATION or PERCENT)
      3   the database cannot be read
      78  configuration error, or the schema needs `dingtalk-etl db upgrade`

    \b
    Examples:
      dingtalk-etl status --max-age 2h
      dingtalk-etl status --max-age 2h --quota-warn 90
      dingtalk-etl status --max-age 1d --json | jq .last_success_age_seconds
      dingtalk-etl status --json | jq '.api_calls_this_month, .projected_calls'
    """
    from etl.monitoring import read_health

    with _errors():
        config = obj.load(need_api=False)
        health = read_health(config, max_age_seconds=max_age, quota_warn_percent=quota_warn)
    if as_json:
        click.echo(json.dumps(health.as_json(), indent=2, ensure_ascii=False))
    else:
        for line in health.lines():
            click.echo(line)
    sys.exit(health.exit_code)


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
@click.option(
    "--generate",
    "generate",
    metavar="N",
    type=click.IntRange(min=1),
    help="Serve a generated world of N chats (gen-000001 ...) instead of the demo world.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of the generated world: the same seed gives the same chats.",
)
@click.option(
    "--max-members",
    default=10000,
    show_default=True,
    type=click.IntRange(min=10),
    help="Size of the largest generated chat; most stay far smaller.",
)
@click.option(
    "--mutate",
    "mutate_share",
    metavar="SHARE",
    type=click.FloatRange(0.0, 1.0),
    help="Change this share of the active chats (joins, leaves, renames) before serving.",
)
@click.option(
    "--mutate-seed",
    default=1,
    show_default=True,
    type=int,
    help="Seed of --mutate: the same seed changes the same chats the same way.",
)
@click.option(
    "--rate-limit",
    metavar="N",
    type=click.IntRange(min=0),
    help="Answer errcode 88 (subcode 90018) beyond N calls per second per API; 0: no limit.",
)
@click.option(
    "--latency-ms",
    metavar="MS",
    type=click.IntRange(min=0),
    help="Delay every answer by MS milliseconds.",
)
@click.option(
    "--stream-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the Stream-mode gateway and its websocket bind.",
)
@click.option(
    "--stream-port",
    type=click.IntRange(0, 65535),
    help="Port of the Stream-mode gateway (0 picks a free one). Default: 8766, or 0 when "
    "--port is 0.",
)
def simulate(
    host: str,
    port: int,
    scenario: Path | None,
    generate: int | None,
    seed: int,
    max_members: int,
    mutate_share: float | None,
    mutate_seed: int,
    rate_limit: int | None,
    latency_ms: int | None,
    stream_host: str,
    stream_port: int | None,
) -> None:
    """Serve a local DingTalk simulator (gettoken, chat/get) until Ctrl-C or SIGTERM.

    Point a config at it to try dingtalk-etl safely:

    \b
      [dingtalk]
      base_url = "http://127.0.0.1:8765"
      app_key = "demo-key"
      app_secret = "demo-secret"
      [events]
      gateway_url = "http://127.0.0.1:8766"

    The Stream-mode gateway pushes a group event for each change made to the world while it
    serves (none for --mutate, which changes the world before).

    A generated world (--generate) has chats from ten to --max-members members drawn from
    one pool of users, so users share chats; chatids are gen-000001, gen-000002 ... To see
    a sync pick up changes, serve the same world again with --mutate. On exit it prints how
    many requests it served and how many it throttled.

    \b
    Examples:
      dingtalk-etl simulate
      dingtalk-etl simulate --port 9000 --scenario tests/fixtures/scenario_small.toml
      dingtalk-etl simulate --generate 2000 --seed 2          # about 380k memberships
      dingtalk-etl simulate --generate 2000 --seed 2 --mutate 0.01 --mutate-seed 5
      dingtalk-etl simulate --generate 300 --rate-limit 20 --latency-ms 30
    """
    from etl.simulator import Simulator, StreamGateway

    if scenario is not None and generate is not None:
        raise click.UsageError("--scenario and --generate are alternatives; give one")
    world = _simulated_world(scenario, generate, seed, max_members)
    if rate_limit is not None:
        world.rate_limit = rate_limit
    if latency_ms is not None:
        world.latency_ms = latency_ms
    mutated = world.mutate(mutate_share, seed=mutate_seed) if mutate_share else 0
    if stream_port is None:
        # A free port for both when the caller asked for one: a fixed default would make
        # parallel simulators collide.
        stream_port = 0 if port == 0 else 8766
    sim = _serving(lambda: Simulator(world, host=host, port=port).start(), host, port)
    try:
        gateway = _serving(
            lambda: StreamGateway(world, host=stream_host, port=stream_port).start(),
            stream_host,
            stream_port,
        )
    except SystemExit:
        sim.stop()
        raise
    _announce(world, sim, gateway)
    if mutated:
        click.echo(f"  changed {mutated} chats (--mutate {mutate_share}, seed {mutate_seed})")
    if world.rate_limit or world.latency_ms:
        click.echo(
            f"  rate limit {world.rate_limit or 'none'} calls/s per API, "
            f"latency {world.latency_ms} ms"
        )
    click.echo(f"  Stream gateway on {gateway.gateway_url} ([events] gateway_url)")
    click.echo("Ctrl-C to stop.")
    done = threading.Event()
    with _stop_on_signals(done):
        done.wait()
    gateway.stop()
    sim.stop()
    stats = world.stats
    click.echo(f"served {stats.total_requests} requests, {stats.throttled} throttled")


def _simulated_world(
    scenario: Path | None, generate: int | None, seed: int, max_members: int
) -> World:
    """The world `simulate` serves: generated, from a scenario file, or the demo's."""
    from etl.demo import demo_world
    from etl.simulator import World

    try:
        if generate is not None:
            return World.generate(generate, seed=seed, max_members=max_members)
        return World.from_scenario(scenario) if scenario else demo_world()
    except (OSError, ValueError) as exc:
        _fail(str(exc), ExitCode.CONFIG)


_Server = TypeVar("_Server")


def _serving(start: Callable[[], _Server], host: str, port: int) -> _Server:
    """A started server, or exit 3 saying which address could not be listened on."""
    try:
        return start()
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", ExitCode.FAILED)


def _announce(world: World, sim: Simulator, gateway: StreamGateway) -> None:
    memberships = sum(len(chat.useridlist) for chat in world.chats.values())
    click.echo(
        f"DingTalk simulator on {sim.base_url} ({len(world.chats)} chats, "
        f"{memberships} memberships)"
    )
    click.echo(f"  app_key = {world.app_key!r}  app_secret = {world.app_secret!r}")
    click.echo(
        "  chatids: "
        + ", ".join(sorted(world.chats)[:8])
        + (" ..." if len(world.chats) > 8 else "")
    )


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
    from etl.demo import run_demo

    with _errors():
        run_demo(database, echo=click.echo)


# -- reports ----------------------------------------------------------------------------------


TIME_HELP = (
    "ISO 8601: 2026-06-30, 2026-06 (a month), 2026-06-30T18:00, 2026-06-30T10:00:00Z, "
    "2026-06-30T18:00+08:00; without an offset read in [report] timezone."
)


def _parse_time(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> reports.Timestamp | None:
    """A timestamp option, checked before anything else runs (a bad one is exit 2)."""
    if value is None:
        return None
    try:
        return reports.parse_timestamp(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _instant(
    value: reports.Timestamp | None, tz: ZoneInfo, *, end: bool, option: str
) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return value.end(tz) if end else value.start(tz)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=f"'{option}'") from None


def _report_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--output",
        metavar="FILE",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write the report to FILE (replaced atomically) instead of stdout.",
    )(command)
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help="table for people, csv and json (an array of objects) for programs, html for a "
        "self-contained page.",
    )(command)


def _report(
    obj: _Ctx, fmt: str, output: Path | None, build: Callable[[Engine, ZoneInfo], Iterable[str]]
) -> None:
    """Load the [database] and [report] settings, check the schema, build, print or write.

    ``build`` gives the text in pieces, written as they come: a streamed report reads its
    rows while they are written, so the database stays open until the last piece.
    """
    from etl.db import open_database, require_schema

    with _errors():
        config = obj.load(need_api=False)
        tz = ZoneInfo(config.report.timezone)
        with open_database(config) as engine:
            require_schema(engine, "reading the database")
            with closing(_pieces(build(engine, tz))) as pieces:
                # A report that fails before its first piece (an unknown chat) leaves stdout
                # empty and FILE untouched, as it did when reports were built whole.
                first = next(pieces, "")
                text = blocks(chain([first], pieces))
                if output is None:
                    _print(text)
                else:
                    _write(output, text)
    if output is not None:
        click.echo(f"wrote {output}", err=True)


def _pieces(chunks: Iterable[str]) -> Generator[str, None, None]:
    # A generator, so that closing it closes a report's stream (and its cursor) in time.
    yield from chunks


def _print(text: Iterable[str]) -> None:
    try:
        for block in text:
            click.echo(block, nl=False)
    except BrokenPipeError:
        # The reader went away (`| head`): no traceback, and no second error when Python
        # flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _fail("stdout was closed before the report was written whole", ExitCode.FAILED)


def _write(output: Path, text: Iterable[str]) -> None:
    try:
        write_chunks_atomic(output, text)
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror or exc}", ExitCode.FAILED)


def _rendered(report: reports.Report, fmt: str) -> Iterable[str]:
    return (
        [report_html.render_html(report)]
        if fmt == "html"
        else report_html.render_chunks(report, fmt)
    )


@cli.group(context_settings=CONTEXT)
def report() -> None:
    """Audit reports: who was in which group when, what changed, risky settings, sync health.

    \b
    The questions they answer:
      Who was in the finance group on 30 June (at the end of that day)?
        dingtalk-etl report members --chat chat-finance --as-of 2026-06-30
      Who joined or left any group last month?
        dingtalk-etl report changes --since 2026-06 --until 2026-06
      Which groups did this person belong to, and when?
        dingtalk-etl report user --userid user0042
      Which groups were dismissed, and who owned them?
        dingtalk-etl report chats --status dismissed
      Which groups let anyone @all or join without verification?
        dingtalk-etl report chats --risky --status normal
      Is every chat syncing?
        dingtalk-etl report sync-health
      An audit file to attach to a ticket (summary, changes, membership chart):
        dingtalk-etl report changes --since 2026-06 --format html --output audit.html

    Every report takes --format table|csv|json|html and --output FILE. Times are shown in
    [report] timezone (default UTC); --as-of/--since/--until without an offset are read in it.
    The time of a change (occurred_at) is DingTalk's for a group event received over Stream
    mode (source event, with the operator who made it), else when a sync saw it (source
    poll: it happened after the sync before). Needs only the [database] setting and a
    migrated schema.

    \b
    Exit codes:
      0   the report was produced
      1   no answer: unknown chat or user, or --as-of before the chat's first sync
      2   usage error: bad option or timestamp
      3   database error, or --output not writable
      78  configuration error, or the schema needs `dingtalk-etl db upgrade`
    """


@report.command("members", context_settings=CONTEXT)
@click.option("--chat", required=True, metavar="ID", help="Chatid (or the exact chat name).")
@click.option(
    "--as-of",
    "as_of",
    metavar="TIMESTAMP",
    callback=_parse_time,
    help=f"Membership at this time; a date means the end of that day. Default: now. {TIME_HELP}",
)
@_report_options
@click.pass_obj
def report_members(
    obj: _Ctx, chat: str, as_of: reports.Timestamp | None, fmt: str, output: Path | None
) -> None:
    """Who was in a chat at a point in time, with joined and left times.

    Reconstructed from chat_events: a member is a user whose latest member event, by the
    time it occurred, at or before --as-of is a join. Members present at the chat's first
    sync are a baseline (they may have joined earlier). --as-of before the first sync is an
    error (exit 1), not an empty list.

    \b
    Examples:
      dingtalk-etl report members --chat chat-finance
      dingtalk-etl report members --chat chat-finance --as-of 2026-06-30
      dingtalk-etl report members --chat chat-finance --as-of 2026-06-30T18:00+08:00 --format csv
    """

    def build(engine: Engine, tz: ZoneInfo) -> Iterable[str]:
        at = _instant(as_of, tz, end=True, option="--as-of")
        result = reports.members(engine, chat, as_of=at, tz=tz, with_series=fmt == "html")
        return _rendered(result, fmt)

    _report(obj, fmt, output, build)


@report.command("changes", context_settings=CONTEXT)
@click.option(
    "--since",
    metavar="TIMESTAMP",
    callback=_parse_time,
    help=f"From this time (inclusive). {TIME_HELP}",
)
@click.option(
    "--until",
    metavar="TIMESTAMP",
    callback=_parse_time,
    help="Up to this time (inclusive; a date or month means its end).",
)
@click.option("--chat", "chats", multiple=True, metavar="ID", help="Only this chat (repeatable).")
@click.option(
    "--user", "userid", metavar="ID", help="Only this user's joins, leaves and owner changes."
)
@click.option(
    "--operator",
    metavar="ID",
    help="Only the changes this user made (known for changes received as group events).",
)
@_report_options
@click.pass_obj
def report_changes(
    obj: _Ctx,
    since: reports.Timestamp | None,
    until: reports.Timestamp | None,
    chats: tuple[str, ...],
    userid: str | None,
    operator: str | None,
    fmt: str,
    output: Path | None,
) -> None:
    """Joins, leaves and attribute changes (dismissals, owner, name, settings) in a window.

    One row per change, in the order the changes occurred, with occurred_at (when it
    happened), observed_at (when it was recorded), source (event: pushed by DingTalk, with
    operator_userid, who made it; poll: seen by a sync) and run_id (the sync that saw it).
    --since/--until select by occurred_at. Baseline members at a chat's first sync are not
    joins. With --format html: the audit file (summary of the chats, member count by sync
    and event per chat, the changes), one self-contained page that works offline.

    \b
    Examples:
      dingtalk-etl report changes --since 2026-06 --until 2026-06
      dingtalk-etl report changes --since 2026-06-01 --chat chat-finance --format json
      dingtalk-etl report changes --user user0042
      dingtalk-etl report changes --operator user0007 --since 2026-06
      dingtalk-etl report changes --since 2026-06 --format html --output audit-june.html
    """

    def build(engine: Engine, tz: ZoneInfo) -> Iterator[str]:
        start = _instant(since, tz, end=False, option="--since")
        end = _instant(until, tz, end=True, option="--until")
        if start is not None and end is not None and start > end:
            raise click.UsageError("--since is after --until")
        selection: dict[str, Any] = {
            "since": start,
            "until": end,
            "chats_filter": chats,
            "userid": userid,
            "operator": operator,
            "tz": tz,
        }
        if fmt == "html":
            audit = reports.audit(engine, **selection)
            command = _export_command(obj, since, until, chats, userid, operator)
            yield report_html.render_audit(_with_chart_hint(audit), command)
            return
        with reports.changes_stream(engine, counted=fmt == "table", **selection) as found:
            written = None
            if fmt in ("csv", "json"):
                from etl.export import text_chunks

                written = text_chunks(found, fmt)
            yield from written if written is not None else report_html.render_chunks(found, fmt)

    _report(obj, fmt, output, build)


def _export_command(
    obj: _Ctx,
    since: reports.Timestamp | None,
    until: reports.Timestamp | None,
    chats: tuple[str, ...],
    userid: str | None,
    operator: str | None,
) -> str:
    """The command that writes every change of this audit as CSV, for a summarised audit."""
    args = ["dingtalk-etl"]
    if obj.config_option is not None:
        args += ["--config", obj.config_option]
    args += ["report", "changes"]
    for option, value in (("--since", since), ("--until", until)):
        if value is not None:
            args += [option, value.text]
    for chat in chats:
        args += ["--chat", chat]
    for option, someone in (("--user", userid), ("--operator", operator)):
        if someone is not None:
            args += [option, someone]
    return shlex.join([*args, "--format", "csv", "--output", "changes.csv"])


def _with_chart_hint(audit: reports.AuditReport) -> reports.AuditReport:
    """The audit, with a first note on how to chart the chats beyond its limit."""
    if not audit.uncharted:
        return audit
    if audit.summarised:
        charted = f"the {len(audit.series)} chats with the most changes"
    else:
        charted = f"the first {reports.MAX_CHARTS} chats"
    hint = f"charts for {charted} only; select chats with --chat"
    return replace(audit, notes=[hint, *audit.notes])


@report.command("user", context_settings=CONTEXT)
@click.option("--userid", required=True, metavar="ID", help="The DingTalk userid.")
@_report_options
@click.pass_obj
def report_user(obj: _Ctx, userid: str, fmt: str, output: Path | None) -> None:
    """Every chat a user is or was in, one row per membership interval.

    \b
    Examples:
      dingtalk-etl report user --userid user0042
      dingtalk-etl report user --userid user0042 --format csv --output user0042.csv
    """
    _report(
        obj, fmt, output, lambda engine, tz: _rendered(reports.user(engine, userid, tz=tz), fmt)
    )


@report.command("chats", context_settings=CONTEXT)
@click.option(
    "--status",
    type=click.Choice(["normal", "dismissed"]),
    help="Only normal or only dismissed chats.",
)
@click.option(
    "--risky",
    is_flag=True,
    help="Only chats with an open setting: no join verification (validation_type 0), "
    "searchable (1), anyone may @all (mention_all_authority 0), everyone may manage "
    "(management_type 0).",
)
@_report_options
@click.pass_obj
def report_chats(obj: _Ctx, status: str | None, risky: bool, fmt: str, output: Path | None) -> None:
    """Chats with owner, member count, dismissal time and open settings (risks).

    \b
    Examples:
      dingtalk-etl report chats
      dingtalk-etl report chats --status dismissed
      dingtalk-etl report chats --risky --status normal --format csv
    """

    def build(engine: Engine, tz: ZoneInfo) -> Iterable[str]:
        return _rendered(reports.chat_list(engine, status=status, risky=risky, tz=tz), fmt)

    _report(obj, fmt, output, build)


@report.command("sync-health", context_settings=CONTEXT)
@_report_options
@click.pass_obj
def report_sync_health(obj: _Ctx, fmt: str, output: Path | None) -> None:
    """Per chat: last successful sync, last attempt, failures since, the latest error.

    \b
    Examples:
      dingtalk-etl report sync-health
      dingtalk-etl report sync-health --format json
    """
    _report(obj, fmt, output, lambda engine, tz: _rendered(reports.sync_health(engine, tz=tz), fmt))


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
    """The ``dingtalk-etl`` console script: ``cli`` in a process tuned for its own life."""
    # A command loads SQLAlchemy, a driver and pydantic: several hundred thousand objects that
    # live until the process ends. At the default threshold (700 allocations) the cyclic
    # collector walks them again and again while they load, and once more at exit; together
    # that was a third of `status`. At 200,000 it does not run while `status` loads (its
    # count reaches about 120,000); at 50,000 it still cost 20 ms. A sync of 2,000 chats
    # peaks 2 MB higher than at 50,000. A long-running command (`schedule`, `listen`) still
    # has its cycles collected, and freezing at the end spares the exit's walk over every
    # object: the process's memory is returned as a whole.
    gc.set_threshold(GC_FIRST_GENERATION, *gc.get_threshold()[1:])
    try:
        cli(prog_name="dingtalk-etl")
    finally:
        gc.freeze()
