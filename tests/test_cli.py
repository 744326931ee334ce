"""The command line: options, exit codes and the exact messages users and cron jobs see."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import inspect
from sqlalchemy.engine import URL

from etl import __version__, migrate
from etl.cli import cli
from etl.db import create_db_engine
from etl.lock import run_lock
from etl.schema import sync_run_items, sync_runs
from etl.simulator import Simulator, errmsg_for
from tests.conftest import APP_KEY, APP_SECRET
from tests.helpers import table_rows, write_config

BIN = Path(sys.executable).parent
# The CLI reads the process environment: every test starts without these.
CLEAN_ENV: dict[str, str | None] = {
    "DINGTALK_APP_KEY": None,
    "DINGTALK_APP_SECRET": None,
    "DINGTALK_ETL_CONFIG": None,
    "DINGTALK_ETL_DATABASE_URL": None,
}
NOT_FOUND = (
    "configuration file not found (use --config PATH or set DINGTALK_ETL_CONFIG; "
    "config.example.toml documents every key)"
)
DURATION = r"\d+\.\ds"


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(
        cli, args, env={**CLEAN_ENV, **(env or {})}, prog_name="dingtalk-etl"
    )
    # Only SystemExit is an expected way out; anything else is a crash with a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def table_names(url: URL) -> set[str]:
    engine = create_db_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def assert_no_secret(result: Result) -> None:
    assert APP_SECRET not in result.stdout
    assert APP_SECRET not in result.stderr


# -- help and version ----------------------------------------------------------------------------

HELP: list[tuple[list[str], list[str]]] = [
    (
        [],
        [
            "Usage: dingtalk-etl [OPTIONS] COMMAND [ARGS]...",
            "--config PATH",
            "DINGTALK_ETL_CONFIG",
            "--version",
            "-h, --help",
            "dingtalk-etl db upgrade",
            "78 configuration error",
        ],
    ),
    (["db"], ["Usage: dingtalk-etl db [OPTIONS] COMMAND [ARGS]...", "upgrade"]),
    (
        ["db", "upgrade"],
        ["Usage: dingtalk-etl db upgrade [OPTIONS]", "safe to run again", "[database]"],
    ),
    (
        ["sync"],
        [
            "Usage: dingtalk-etl sync [OPTIONS]",
            "--chatid ID",
            "--migrate",
            "75  another sync holds the lock",
            "78  configuration error",
        ],
    ),
    (["runs"], ["Usage: dingtalk-etl runs [OPTIONS]", "--limit", "default: 10", "--json"]),
    (["simulate"], ["Usage: dingtalk-etl simulate [OPTIONS]", "--host", "--port", "--scenario"]),
    (["demo"], ["Usage: dingtalk-etl demo [OPTIONS]", "--database", "simulator"]),
]


@pytest.mark.parametrize("flag", ["--help", "-h"], ids=["long", "short"])
@pytest.mark.parametrize(
    ("command", "texts"), HELP, ids=[" ".join(case[0]) or "group" for case in HELP]
)
def test_help(command: list[str], texts: list[str], flag: str) -> None:
    result = invoke([*command, flag])

    assert result.exit_code == 0
    assert result.stderr == ""
    for text in texts:
        assert text in result.stdout


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for name, command in group.commands.items():
        found.append((*prefix, name))
        if isinstance(command, click.Group):
            found.extend(_all_commands(command, (*prefix, name)))
    return found


def test_every_command_has_help() -> None:
    commands = _all_commands(cli)
    assert {("db",), ("db", "upgrade"), ("sync",), ("runs",), ("simulate",), ("demo",)} <= set(
        commands
    )
    for command in commands:
        result = invoke([*command, "-h"])
        assert result.exit_code == 0, command
        assert f"Usage: dingtalk-etl {' '.join(command)} [OPTIONS]" in result.stdout


def test_version() -> None:
    result = invoke(["--version"])
    assert (result.exit_code, result.stdout, result.stderr) == (
        0,
        "dingtalk-etl, version 0.1.0\n",
        "",
    )
    assert __version__ == "0.1.0"


# -- usage errors: exit 2 ------------------------------------------------------------------------

USAGE: list[tuple[list[str], str]] = [
    (["--bogus"], "--bogus"),
    (["sync", "--bogus"], "--bogus"),
    (["nosuchcommand"], "nosuchcommand"),
    (["db", "downgrade"], "downgrade"),
    (["runs", "--limit", "0"], "--limit"),
    (["runs", "--limit", "many"], "--limit"),
    (["sync", "--chatid"], "--chatid"),
    (["sync", "--chatid", ""], "'': empty chatid"),
    (["sync", "--chatid", "c" * 129], "chatid longer than 128 characters"),
    (["sync", "--chatid", "chat\n1"], "chatid contains a control character"),
    (["simulate", "--port", "70000"], "--port"),
]


@pytest.mark.parametrize(
    ("args", "mention"),
    USAGE,
    ids=[
        "unknown-global-option",
        "unknown-command-option",
        "unknown-command",
        "unknown-subcommand",
        "limit-zero",
        "limit-not-a-number",
        "chatid-without-value",
        "chatid-empty",
        "chatid-too-long",
        "chatid-control-character",
        "port-out-of-range",
    ],
)
def test_usage_error_exits_2(tmp_path: Path, args: list[str], mention: str) -> None:
    # A valid configuration: the usage error alone decides the outcome.
    config = write_config(tmp_path, chatids=["chat-a"])

    result = invoke(["--config", str(config), *args])

    assert result.exit_code == 2
    assert result.stdout == ""
    error_line = result.stderr.rstrip("\n").splitlines()[-1]
    assert error_line.startswith("Error: ")
    assert mention in error_line


# -- configuration errors: exit 78 -------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["sync"], ["db", "upgrade"], ["runs"]], ids=["sync", "db-upgrade", "runs"]
)
@pytest.mark.parametrize("how", ["option", "environment", "default"])
def test_missing_config_file_exits_78(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str], how: str
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "etc" / "dingtalk-etl.toml"
    if how == "option":
        result, shown = invoke(["--config", str(missing), *command]), str(missing)
    elif how == "environment":
        result = invoke(command, env={"DINGTALK_ETL_CONFIG": str(missing)})
        shown = str(missing)
    else:
        result, shown = invoke(command), "config.toml"

    assert result.exit_code == 78
    assert result.stdout == ""
    assert result.stderr == f"dingtalk-etl: error: {shown}: {NOT_FOUND}\n"


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("colour = 'blue'\n", "[logging] colour: unknown key"),
        ("[alerts]\n", "[alerts]: unknown section"),
        ("[broken\n", None),
    ],
    ids=["unknown-key", "unknown-section", "bad-toml"],
)
@pytest.mark.parametrize(
    "command", [["sync"], ["db", "upgrade"], ["runs"]], ids=["sync", "db-upgrade", "runs"]
)
def test_invalid_config_exits_78_naming_the_problem(
    tmp_path: Path, sqlite_url: URL, extra: str, problem: str | None, command: list[str]
) -> None:
    config = write_config(tmp_path, db=sqlite_url, chatids=["chat-a"], extra=extra)
    if problem is None:
        with pytest.raises(tomllib.TOMLDecodeError) as parse_error:
            tomllib.loads(config.read_text(encoding="utf-8"))
        problem = f"invalid TOML: {parse_error.value}"

    result = invoke(["--config", str(config), *command])

    assert result.exit_code == 78
    assert result.stdout == ""
    assert result.stderr == f"dingtalk-etl: error: {config}: {problem}\n"


def test_config_error_lists_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[dingtalk]\napp_kee = "x"\n[sync]\nchatids = []\n', encoding="utf-8")

    result = invoke(["--config", str(config), "sync"])

    assert result.exit_code == 78
    assert result.stderr == (
        f"dingtalk-etl: error: {config}: 4 configuration problems:\n"
        "  - [dingtalk] app_kee: unknown key\n"
        "  - [dingtalk] app_key: missing (set it in the file or $DINGTALK_APP_KEY)\n"
        "  - [dingtalk] app_secret: missing (set it in the file or $DINGTALK_APP_SECRET)\n"
        "  - [sync] chatids: no chatids configured (set chatids or chatids_file)\n"
    )


@pytest.mark.parametrize("command", [["sync"], ["runs"]], ids=["sync", "runs"])
def test_unmigrated_database_exits_78_and_says_to_upgrade(
    tmp_path: Path, empty_db: URL, simulator: Simulator, command: list[str]
) -> None:
    config = write_config(tmp_path, db=empty_db, base_url=simulator.base_url, chatids=["chat-a"])

    result = invoke(["--config", str(config), *command])

    assert result.exit_code == 78
    assert result.stdout == ""
    assert result.stderr == (
        "dingtalk-etl: error: the database has no dingtalk-etl schema, this version needs "
        f"{migrate.head_revision()}: run `dingtalk-etl db upgrade` (or pass --migrate)\n"
    )
    assert simulator.stats.total_requests == 0
    assert "sync_runs" not in table_names(empty_db)


def test_sync_migrate_upgrades_first(tmp_path: Path, empty_db: URL, simulator: Simulator) -> None:
    config = write_config(tmp_path, db=empty_db, base_url=simulator.base_url, chatids=["chat-a"])

    result = invoke(["--config", str(config), "sync", "--migrate"])

    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        rf"run 1 succeeded: 1 ok, 0 failed, 1 changed of 1 chats; 2 api calls, 0 retries; "
        rf"{DURATION}\n",
        result.stdout,
    )


# -- db upgrade and runs need only [database] ----------------------------------------------------


def test_db_upgrade_is_idempotent_and_needs_no_credentials(tmp_path: Path, empty_db: URL) -> None:
    config = write_config(tmp_path, db=empty_db, app_key=None, app_secret=None)
    shown = empty_db.render_as_string(hide_password=True)
    head = migrate.head_revision()

    first = invoke(["--config", str(config), "db", "upgrade"])
    second = invoke(["--config", str(config), "db", "upgrade"])
    runs_json = invoke(["--config", str(config), "runs", "--json"])
    runs_table = invoke(["--config", str(config), "runs"])

    assert (first.exit_code, first.stdout, first.stderr) == (
        0,
        f"{shown}: schema upgraded from empty to {head}\n",
        "",
    )
    assert (second.exit_code, second.stdout, second.stderr) == (
        0,
        f"{shown}: schema already at revision {head}\n",
        "",
    )
    assert (runs_json.exit_code, runs_json.stdout) == (0, "[]\n")
    assert runs_table.exit_code == 0
    assert runs_table.stdout.splitlines()[-1] == "(no rows)"
    assert {"sync_runs", "chats", "chat_members", "chat_events", "sync_run_items"} <= table_names(
        empty_db
    )


def test_db_upgrade_relative_sqlite_path_is_next_to_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    config = write_config(folder, db="sqlite:///etl.db", app_key=None, app_secret=None)
    monkeypatch.chdir(tmp_path)

    result = invoke(["--config", "etc/config.toml", "db", "upgrade"])

    assert result.exit_code == 0
    assert result.stdout == (
        f"sqlite:///{folder / 'etl.db'}: schema upgraded from empty to {migrate.head_revision()}\n"
    )
    assert (folder / "etl.db").is_file()
    assert not (tmp_path / "etl.db").exists()
    assert config.is_file()


def test_db_upgrade_hides_the_database_password(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, db="postgresql://etl:pw-0123456789@127.0.0.1:1/etl", app_key=None
    )

    result = invoke(["--config", str(config), "db", "upgrade"])

    assert result.exit_code == 3
    assert result.stderr.startswith("dingtalk-etl: error: database error while migrating")
    assert "pw-0123456789" not in result.output


# -- sync against the simulator ------------------------------------------------------------------


def test_sync_all_ok_exits_0(tmp_path: Path, sqlite_url: URL, simulator: Simulator) -> None:
    config = write_config(
        tmp_path,
        db=sqlite_url,
        base_url=simulator.base_url,
        chatids=["chat-a", "chat-b", "chat-c"],
    )

    result = invoke(["--config", str(config), "sync"])

    assert result.exit_code == 0
    assert re.fullmatch(
        rf"run 1 succeeded: 3 ok, 0 failed, 3 changed of 3 chats; 4 api calls, 0 retries; "
        rf"{DURATION}\n",
        result.stdout,
    ), result.stdout
    assert result.stderr == ""
    assert_no_secret(result)
    [run] = table_rows(sqlite_url, sync_runs)
    assert (run["status"], run["trigger"], run["chats_succeeded"]) == ("succeeded", "manual", 3)


def test_sync_partial_exits_1(tmp_path: Path, sqlite_url: URL, simulator: Simulator) -> None:
    config = write_config(
        tmp_path,
        db=sqlite_url,
        base_url=simulator.base_url,
        chatids=["chat-a", "chat-b", "chat-x", "chat-c"],
    )

    result = invoke(["--config", str(config), "sync"])

    assert result.exit_code == 1
    assert re.fullmatch(
        rf"run 1 partial: 3 ok, 1 failed, 3 changed of 4 chats; 5 api calls, 0 retries; "
        rf"{DURATION}\n",
        result.stdout,
    ), result.stdout
    assert result.stderr == f"  failed chat-x: chat/get: errcode 40016: {errmsg_for(40016)}\n"
    assert_no_secret(result)
    items = {item["chatid"]: item for item in table_rows(sqlite_url, sync_run_items)}
    assert {chatid: item["status"] for chatid, item in items.items()} == {
        "chat-a": "ok",
        "chat-b": "ok",
        "chat-c": "ok",
        "chat-x": "failed",
    }
    assert items["chat-x"]["errcode"] == 40016


def test_sync_chatid_restricts_the_run(
    tmp_path: Path, sqlite_url: URL, simulator: Simulator
) -> None:
    config = write_config(
        tmp_path,
        db=sqlite_url,
        base_url=simulator.base_url,
        chatids=["chat-a", "chat-b", "chat-c", "chat-x"],
    )

    result = invoke(
        [
            "--config",
            str(config),
            "sync",
            "--chatid",
            "chat-b",
            "--chatid",
            " chat-c",
            "--chatid",
            "chat-b",
        ]
    )

    assert result.exit_code == 0
    assert re.fullmatch(
        rf"run 1 succeeded: 2 ok, 0 failed, 2 changed of 2 chats; 3 api calls, 0 retries; "
        rf"{DURATION}\n",
        result.stdout,
    ), result.stdout
    assert dict(simulator.stats.requests_by_chat) == {"chat-b": 1, "chat-c": 1}
    assert sorted(item["chatid"] for item in table_rows(sqlite_url, sync_run_items)) == [
        "chat-b",
        "chat-c",
    ]


def test_sync_chatid_may_name_an_unconfigured_chat(
    tmp_path: Path, sqlite_url: URL, simulator: Simulator
) -> None:
    config = write_config(tmp_path, db=sqlite_url, base_url=simulator.base_url, chatids=["chat-a"])

    result = invoke(["--config", str(config), "sync", "--chatid", "chat-x"])

    assert result.exit_code == 1
    assert result.stdout.startswith("run 1 partial: 0 ok, 1 failed, 0 changed of 1 chats; ")
    assert dict(simulator.stats.requests_by_chat) == {"chat-x": 1}


@pytest.mark.parametrize(
    ("app_key", "app_secret"),
    [(APP_KEY, "wrong-secret-0123456789"), ("wrong-key", APP_SECRET)],
    ids=["wrong-secret", "wrong-key"],
)
def test_sync_bad_credentials_exits_3_and_records_the_failed_run(
    tmp_path: Path, sqlite_url: URL, simulator: Simulator, app_key: str, app_secret: str
) -> None:
    config = write_config(
        tmp_path,
        db=sqlite_url,
        base_url=simulator.base_url,
        chatids=["chat-a", "chat-b", "chat-c"],
        app_key=app_key,
        app_secret=app_secret,
    )

    result = invoke(["--config", str(config), "sync"])

    reason = f"gettoken: errcode 40089: {errmsg_for(40089)}"
    assert result.exit_code == 3
    assert re.fullmatch(
        rf"run 1 failed: 0 ok, 0 failed, 0 changed of 3 chats; 1 api calls, 0 retries; "
        rf"{DURATION}; error: {re.escape(reason)}\n",
        result.stdout,
    ), result.stdout
    assert result.stderr.endswith(f"dingtalk-etl: error: run failed: {reason}\n")
    assert app_secret not in result.output
    [run] = table_rows(sqlite_url, sync_runs)
    assert (run["status"], run["error"], run["api_calls"]) == ("failed", reason, 1)
    assert run["finished_at"] is not None
    assert table_rows(sqlite_url, sync_run_items) == []
    assert simulator.stats.requests_by_path["/chat/get"] == 0


def test_sync_takes_credentials_from_the_environment(
    tmp_path: Path, sqlite_url: URL, simulator: Simulator
) -> None:
    config = write_config(
        tmp_path,
        db=sqlite_url,
        base_url=simulator.base_url,
        chatids=["chat-a"],
        app_key=None,
        app_secret="wrong-secret-in-the-file",
    )
    env = {"DINGTALK_APP_KEY": APP_KEY, "DINGTALK_APP_SECRET": APP_SECRET}

    result = invoke(["--config", str(config), "sync"], env=env)

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("run 1 succeeded: 1 ok, ")


def test_sync_refused_while_another_holds_the_lock_exits_75(
    tmp_path: Path, sqlite_url: URL, simulator: Simulator
) -> None:
    config = write_config(tmp_path, db=sqlite_url, base_url=simulator.base_url, chatids=["chat-a"])
    engine = create_db_engine(sqlite_url)
    try:
        with run_lock(engine):
            result = invoke(["--config", str(config), "sync"])
    finally:
        engine.dispose()

    assert result.exit_code == 75
    assert result.stdout == ""
    assert result.stderr == (
        "dingtalk-etl: error: another dingtalk-etl sync holds the lock on this database "
        f"(file lock {sqlite_url.database}.lock); nothing was done\n"
    )
    assert table_rows(sqlite_url, sync_runs) == []
    assert simulator.stats.total_requests == 0


# -- runs ------------------------------------------------------------------------------------------


@pytest.fixture
def three_runs(tmp_path: Path, sqlite_url: URL, simulator: Simulator) -> Path:
    """A database with a succeeded, a partial and a failed run (ids 1, 2, 3)."""
    ok = write_config(
        tmp_path,
        db=sqlite_url,
        base_url=simulator.base_url,
        chatids=["chat-a"],
        name="ok.toml",
    )
    partial = write_config(
        tmp_path,
        db=sqlite_url,
        base_url=simulator.base_url,
        chatids=["chat-a", "chat-x"],
        name="partial.toml",
    )
    failed = write_config(
        tmp_path,
        db=sqlite_url,
        base_url=simulator.base_url,
        chatids=["chat-a"],
        app_secret="wrong-secret-0123456789",
        name="failed.toml",
    )
    codes = [invoke(["--config", str(path), "sync"]).exit_code for path in (ok, partial, failed)]
    assert codes == [0, 1, 3]
    return write_config(tmp_path, db=sqlite_url, app_key=None, app_secret=None)


def test_runs_json_keys_are_the_sync_runs_columns(three_runs: Path, sqlite_url: URL) -> None:
    result = invoke(["--config", str(three_runs), "runs", "--json"])

    assert result.exit_code == 0
    runs = json.loads(result.stdout)
    assert isinstance(runs, list)
    engine = create_db_engine(sqlite_url)
    try:
        columns = [column["name"] for column in inspect(engine).get_columns("sync_runs")]
    finally:
        engine.dispose()
    for run in runs:
        assert sorted(run) == sorted(columns)
    assert [(run["id"], run["status"]) for run in runs] == [
        (3, "failed"),
        (2, "partial"),
        (1, "succeeded"),
    ]
    assert runs[0]["error"] == f"gettoken: errcode 40089: {errmsg_for(40089)}"
    assert runs[1]["chats_failed"] == 1
    assert [run["chats_skipped"] for run in runs] == [0, 0, 0]
    assert runs[2]["started_at"].endswith("+00:00")


def test_runs_limit(three_runs: Path) -> None:
    result = invoke(["--config", str(three_runs), "runs", "--json", "--limit", "2"])
    assert result.exit_code == 0
    assert [run["id"] for run in json.loads(result.stdout)] == [3, 2]


def test_runs_table(three_runs: Path) -> None:
    result = invoke(["--config", str(three_runs), "runs"])

    assert result.exit_code == 0
    assert result.stderr == ""
    header, rule, *lines = result.stdout.splitlines()
    assert header.split() == [
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
    assert set(rule) == {"-", " "}
    assert [line.split()[0] for line in lines] == ["3", "2", "1"]
    assert [line.split()[5] for line in lines] == ["failed", "partial", "succeeded"]
    # chats_skipped: each run read the chats it was given (every_run, none dismissed).
    assert [line.split()[11] for line in lines] == ["0", "0", "0"]
    assert lines[0].endswith(f"gettoken: errcode 40089: {errmsg_for(40089)}")


# -- where the configuration comes from ----------------------------------------------------------


def _two_configs(tmp_path: Path) -> tuple[Path, Path]:
    first = tmp_path / "first"
    second = tmp_path / "second"
    first.mkdir()
    second.mkdir()
    return (
        write_config(first, db="sqlite:///one.db", app_key=None, app_secret=None),
        write_config(second, db="sqlite:///two.db", app_key=None, app_secret=None),
    )


Choose = Callable[[Path, Path], tuple[list[str], dict[str, str]]]


@pytest.mark.parametrize(
    ("choose", "chosen"),
    [
        (lambda one, two: (["--config", str(two)], {"DINGTALK_ETL_CONFIG": str(one)}), "two"),
        (lambda one, two: ([], {"DINGTALK_ETL_CONFIG": str(one)}), "one"),
        (lambda one, two: (["--config", str(one)], {}), "one"),
    ],
    ids=["option-wins-over-environment", "environment", "option"],
)
def test_config_option_and_environment(tmp_path: Path, choose: Choose, chosen: str) -> None:
    one, two = _two_configs(tmp_path)
    args, env = choose(one, two)

    result = invoke([*args, "db", "upgrade"], env=env)

    assert result.exit_code == 0, result.output
    folder = "first" if chosen == "one" else "second"
    assert result.stdout.startswith(f"sqlite:///{tmp_path / folder / chosen}.db: schema upgraded")


def test_default_config_is_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, db="sqlite:///here.db", app_key=None, app_secret=None)
    monkeypatch.chdir(tmp_path)

    result = invoke(["db", "upgrade"])

    assert result.exit_code == 0
    assert result.stdout.startswith(f"sqlite:///{tmp_path / 'here.db'}: schema upgraded")


def test_database_url_from_the_environment_wins(tmp_path: Path) -> None:
    config = write_config(tmp_path, db="sqlite:///file.db", app_key=None, app_secret=None)
    env_db = tmp_path / "env.db"

    result = invoke(
        ["--config", str(config), "db", "upgrade"],
        env={"DINGTALK_ETL_DATABASE_URL": f"sqlite:///{env_db}"},
    )

    assert result.exit_code == 0
    assert result.stdout.startswith(f"sqlite:///{env_db}: schema upgraded")
    assert env_db.is_file()
    assert not (tmp_path / "file.db").exists()


# -- the installed entry points --------------------------------------------------------------------


def _clean_process_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("DINGTALK_")}


@pytest.mark.parametrize(
    ("command", "code", "stdout", "stderr"),
    [
        (
            [str(BIN / "dingtalk-etl"), "--version"],
            0,
            "dingtalk-etl, version 0.1.0\n",
            "",
        ),
        (
            [sys.executable, "-m", "etl", "sync"],
            78,
            "",
            f"dingtalk-etl: error: config.toml: {NOT_FOUND}\n",
        ),
    ],
    ids=["console-script-version", "python-m-etl-missing-config"],
)
def test_entry_points(
    tmp_path: Path, command: list[str], code: int, stdout: str, stderr: str
) -> None:
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=_clean_process_env(),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (code, stdout, stderr)
