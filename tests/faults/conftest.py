"""Fixtures of the fault-injection suite: real sync processes."""

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

from tests.helpers import clean_env

REPO = Path(__file__).resolve().parents[2]


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
