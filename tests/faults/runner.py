"""Starts real ``dingtalk-etl`` processes quickly: forks them from a parent that imported etl.

A cold ``python -m etl`` spends over a second importing before it does anything, which would
make a loop of a hundred SIGKILLs mostly a loop of imports. This process imports ``etl.cli``
once, then for each request forks a child that runs exactly what the console script runs
(``etl.cli.main`` with the given argv, environment and output files) and is killed or exits
like any other process. Single-threaded, so forking is safe.

Protocol, one JSON object per line on stdin, one reply per line on stdout:
``{"op": "start", "argv": [...], "env": {...}, "stdout": path, "stderr": path}`` -> ``{"pid": N}``;
``{"op": "wait", "pid": N}`` -> ``{"pid": N, "exit": code}`` (a negative code is the signal).
At end of input, children not yet waited for are killed and reaped, then the process exits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any


def _child(request: dict[str, Any]) -> None:
    code = 70
    try:
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(out, fd)
            os.close(out)
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["dingtalk-etl", *request["argv"]]
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        import etl.cli

        try:
            etl.cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    # The point of this process: imports paid once, inherited by every child. The database
    # drivers are imported lazily by SQLAlchemy, so they are named here too.
    import psycopg  # noqa: F401
    import pymysql  # noqa: F401

    import etl.cli  # noqa: F401

    children: set[int] = set()
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            pid = os.fork()
            if pid == 0:
                _child(request)
            children.add(pid)
            reply: dict[str, Any] = {"pid": pid}
        else:
            pid = int(request["pid"])
            _, status = os.waitpid(pid, 0)
            children.discard(pid)
            reply = {"pid": pid, "exit": os.waitstatus_to_exitcode(status)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
