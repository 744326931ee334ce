"""What every benchmark's ``main`` does around its measurements, written once.

Boundary: the standard library only (a parent process that imports more starts its children
bigger: their peak RSS counts what it held when it forked). ``run_databases`` makes a work
folder, benchmarks each database in it, reports, writes the results as JSON if asked, and
removes the folder whatever happens; SIGTERM unwinds like Ctrl-C, through the callers'
``finally`` blocks that stop their servers and drop their databases.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

Run = TypeVar("Run")


class BenchError(Exception):
    """A benchmark cannot go on (a database that does not answer, a step that failed)."""


def run_databases(
    kinds: Sequence[str],
    *,
    prefix: str,
    bench: Callable[[str, Path], Run],
    report: Callable[[Run], bool],
    as_json: Callable[[Run], dict[str, Any]],
    json_path: Path | None,
    probe: Callable[[], None] | None = None,
) -> int:
    """Benchmark each of ``kinds`` with ``bench(kind, workdir)``, print each with
    ``report`` (True: every target met) and write ``as_json`` of each to ``json_path``.
    ``probe`` raises ``BenchError`` when a server the run needs does not answer.

    Returns the exit status: 0 when every target is met, 1 when one is missed or on a
    ``BenchError``, 130 when interrupted (SIGINT or SIGTERM)."""

    def terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    runs: list[Run] = []
    try:
        if probe is not None:
            probe()
        for kind in kinds:
            runs.append(bench(kind, workdir))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    all_ok = all([report(run) for run in runs])
    if json_path is not None:
        json_path.write_text(json.dumps([as_json(run) for run in runs], indent=2) + "\n")
    print("\nall targets met" if all_ok else "\nsome targets MISSED")
    return 0 if all_ok else 1
