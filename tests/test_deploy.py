"""deploy/: the systemd units pass `systemd-analyze verify` and carry the options operators rely
on; the crontab line stays silent on success and on a held lock, and speaks on failures.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from etl.db import create_db_engine
from etl.lock import run_lock
from etl.simulator import Simulator
from tests.conftest import APP_KEY, APP_SECRET
from tests.helpers import IN_CI, clean_env, write_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = [
    "dingtalk-etl.service",
    "dingtalk-etl.timer",
    "dingtalk-etl-schedule.service",
    "dingtalk-etl-listen.service",
]
INSTALLED_BINARY = "/usr/local/bin/dingtalk-etl"
BINARY = Path(sys.executable).parent / "dingtalk-etl"


def unit_settings(name: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (systemd keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in (DEPLOY / name).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if IN_CI:
            pytest.fail("CI=true and systemd-analyze is not installed (Debian package systemd)")
        pytest.skip("systemd-analyze is not installed: the units are not verified here")
    assert BINARY.is_file()
    # verify checks that ExecStart exists: point it at this environment's dingtalk-etl.
    for name in UNITS:
        text = (DEPLOY / name).read_text(encoding="utf-8")
        (tmp_path / name).write_text(text.replace(INSTALLED_BINARY, str(BINARY)), encoding="utf-8")

    result = subprocess.run(
        [tool, "verify", *UNITS],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    # Unknown or misspelt keys are only warnings: there must be none.
    assert result.stderr == ""


EXPECTED: list[tuple[str, str, list[str]]] = [
    ("dingtalk-etl.timer", "Timer.Persistent", ["true"]),
    ("dingtalk-etl.timer", "Timer.RandomizedDelaySec", ["120"]),
    ("dingtalk-etl.timer", "Timer.Unit", ["dingtalk-etl.service"]),
    ("dingtalk-etl.timer", "Install.WantedBy", ["timers.target"]),
    ("dingtalk-etl.service", "Service.Type", ["oneshot"]),
    ("dingtalk-etl.service", "Service.SuccessExitStatus", ["75"]),
    ("dingtalk-etl.service", "Service.EnvironmentFile", ["/etc/dingtalk-etl/env"]),
    ("dingtalk-etl.service", "Service.NoNewPrivileges", ["yes"]),
    ("dingtalk-etl.service", "Service.ProtectSystem", ["strict"]),
    (
        "dingtalk-etl.service",
        "Service.ReadWritePaths",
        ["/var/lib/dingtalk-etl", "-/var/lib/node_exporter/textfile_collector"],
    ),
    ("dingtalk-etl.service", "Service.KillSignal", ["SIGTERM"]),
    ("dingtalk-etl-listen.service", "Service.Type", ["simple"]),
    ("dingtalk-etl-listen.service", "Service.Restart", ["on-failure"]),
    ("dingtalk-etl-listen.service", "Service.RestartPreventExitStatus", ["2 78"]),
    ("dingtalk-etl-listen.service", "Service.KillSignal", ["SIGTERM"]),
    ("dingtalk-etl-listen.service", "Service.EnvironmentFile", ["/etc/dingtalk-etl/env"]),
    ("dingtalk-etl-listen.service", "Service.NoNewPrivileges", ["yes"]),
    ("dingtalk-etl-schedule.service", "Service.Type", ["simple"]),
    ("dingtalk-etl-schedule.service", "Service.Restart", ["on-failure"]),
    ("dingtalk-etl-schedule.service", "Service.RestartPreventExitStatus", ["2 78"]),
    ("dingtalk-etl-schedule.service", "Service.KillSignal", ["SIGTERM"]),
    ("dingtalk-etl-schedule.service", "Service.TimeoutStopSec", ["90"]),
    ("dingtalk-etl-schedule.service", "Service.EnvironmentFile", ["/etc/dingtalk-etl/env"]),
    ("dingtalk-etl-schedule.service", "Service.NoNewPrivileges", ["yes"]),
    ("dingtalk-etl-schedule.service", "Service.ProtectSystem", ["strict"]),
]


@pytest.mark.parametrize(
    ("unit", "key", "values"), EXPECTED, ids=[f"{e[0]}:{e[1]}" for e in EXPECTED]
)
def test_unit_settings(unit: str, key: str, values: list[str]) -> None:
    assert unit_settings(unit)[key] == values


@pytest.mark.parametrize(
    ("unit", "command"),
    [
        ("dingtalk-etl.service", "sync"),
        ("dingtalk-etl-schedule.service", "schedule"),
        ("dingtalk-etl-listen.service", "listen"),
    ],
    ids=["timer-service", "schedule-service", "listen-service"],
)
def test_units_run_the_command_with_the_config(unit: str, command: str) -> None:
    assert unit_settings(unit)["Service.ExecStart"] == [
        f"{INSTALLED_BINARY} --config /etc/dingtalk-etl/config.toml {command}"
    ]


def test_environment_file_example_is_for_mode_0600() -> None:
    text = (DEPLOY / "dingtalk-etl.env.example").read_text(encoding="utf-8")
    assert "install -m 0600" in text
    keys = [line.split("=", 1)[0] for line in text.splitlines() if line and line[0] != "#"]
    assert keys == ["DINGTALK_APP_KEY", "DINGTALK_APP_SECRET", "DINGTALK_ETL_DATABASE_URL"]


# -- the crontab line --------------------------------------------------------------------------


def cron_command(tmp_path: Path, config: Path) -> str:
    """The command of the crontab's job line, with this test's paths."""
    [line] = [
        line
        for line in (DEPLOY / "crontab").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#") and "=" not in line.split()[0]
    ]
    minute, hour, day, month, weekday, user, command = line.split(maxsplit=6)
    assert (minute, hour, day, month, weekday, user) == ("10", "*", "*", "*", "*", "dingtalk-etl")
    assert "%" not in command  # cron would turn it into a newline
    replacements = {
        "/etc/dingtalk-etl/env": str(tmp_path / "env"),
        "/etc/dingtalk-etl/config.toml": str(config),
        "/var/log/dingtalk-etl/sync.log": str(tmp_path / "sync.log"),
        INSTALLED_BINARY: str(BINARY),
    }
    for old, new in replacements.items():
        assert old in command
        command = command.replace(old, new)
    return command


CRON_CASES: list[tuple[str, str, str]] = [
    # id, situation, what cron would mail
    ("ok", "ok", ""),
    ("lock-held", "locked", ""),
    ("partial", "partial", "dingtalk-etl sync: partial, some chats failed (exit 1): "),
    ("failed", "failed", "dingtalk-etl sync: the run failed (exit 3): see "),
    ("config-error", "config", "dingtalk-etl sync: configuration error (exit 78): see "),
]


@pytest.mark.parametrize(
    ("situation", "mail"), [c[1:] for c in CRON_CASES], ids=[c[0] for c in CRON_CASES]
)
def test_crontab_line_mails_only_failures(
    sqlite_url: URL, simulator: Simulator, tmp_path: Path, situation: str, mail: str
) -> None:
    chatids = ["chat-a", "chat-x"] if situation == "partial" else ["chat-a"]
    config = write_config(tmp_path, sqlite_url, simulator.base_url, chatids)
    text = config.read_text(encoding="utf-8")
    # Credentials come from the environment file, as the crontab says.
    text = text.replace(f'app_key = "{APP_KEY}"\n', "").replace(
        f'app_secret = "{APP_SECRET}"\n', ""
    )
    if situation == "config":
        text = text.replace("[sync]\n", "[sync]\nconcurrency_typo = 3\n")
    config.write_text(text, encoding="utf-8")
    secret = "wrong-secret-0123456789" if situation == "failed" else APP_SECRET
    env_file = tmp_path / "env"
    env_file.write_text(
        f"DINGTALK_APP_KEY={APP_KEY}\nDINGTALK_APP_SECRET={secret}\n", encoding="utf-8"
    )
    env_file.chmod(0o600)
    command = cron_command(tmp_path, config)

    engine = create_db_engine(sqlite_url)
    try:
        with run_lock(engine) if situation == "locked" else contextlib.nullcontext():
            result = subprocess.run(
                ["/bin/sh", "-c", command],
                env=clean_env(),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
    finally:
        engine.dispose()

    assert result.stderr == ""
    if mail:
        assert result.stdout.startswith(mail)
        assert result.stdout.count("\n") == 1
    else:
        assert result.stdout == ""
    assert (tmp_path / "sync.log").read_text(encoding="utf-8")  # the job's own output
