"""Fixtures of the fault-injection suite: real sync processes and configuration files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL

REPO = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    """This process's environment without any DINGTALK_* override."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DINGTALK")}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # A JSON string or list of strings is a valid TOML basic string or array.
    return json.dumps(value)


def write_config(
    path: Path,
    db: URL,
    base_url: str,
    chatids: list[str],
    *,
    app_key: str,
    app_secret: str,
    **sections: dict[str, Any],
) -> Path:
    """A config file as an operator writes it; ``sections`` add or override keys."""
    settings: dict[str, dict[str, Any]] = {
        "dingtalk": {
            "base_url": base_url,
            "app_key": app_key,
            "app_secret": app_secret,
            "max_requests_per_second": 1000,
            "max_attempts": 3,
            "timeout_seconds": 5,
        },
        "database": {"url": db.render_as_string(hide_password=False)},
        "sync": {"chatids": chatids, "concurrency": 4},
        "logging": {"level": "WARNING"},
    }
    for section, values in sections.items():
        settings.setdefault(section, {}).update(values)
    text = "\n".join(
        f"[{section}]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in values.items())
        for section, values in settings.items()
    )
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)  # it holds app_secret
    return path


class Launcher:
    """Real ``dingtalk-etl`` processes, forked from a pre-imported parent (see runner.py)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._serial = count(1)
        self.outputs: dict[int, tuple[Path, Path]] = {}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.runner"],
            cwd=REPO,
            env=clean_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        assert line, "the sync launcher died"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        n = next(self._serial)
        out, err = self.folder / f"run-{n}.out", self.folder / f"run-{n}.err"
        reply = self._ask(
            {
                "op": "start",
                "argv": argv,
                "env": clean_env() if env is None else env,
                "stdout": str(out),
                "stderr": str(err),
            }
        )
        pid = int(reply["pid"])
        self.outputs[pid] = (out, err)
        return pid

    def wait(self, pid: int) -> int:
        return int(self._ask({"op": "wait", "pid": pid})["exit"])

    def kill(self, pid: int) -> int:
        """SIGKILL ``pid`` (a no-op if it already exited); its exit status (-9 if killed)."""
        os.kill(pid, signal.SIGKILL)
        return self.wait(pid)

    def output(self, pid: int) -> tuple[str, str]:
        out, err = self.outputs[pid]
        return out.read_text(encoding="utf-8"), err.read_text(encoding="utf-8")

    def close(self) -> None:
        # End of input: the launcher kills and reaps whatever is left, then exits.
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    folder = tmp_path / "runs"
    folder.mkdir()
    started = Launcher(folder)
    try:
        yield started
    finally:
        started.close()
