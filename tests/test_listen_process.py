"""`dingtalk-etl listen` and `schedule` with events, as processes: exit codes, SIGTERM, a kill -9
between storing an event and its ACK reaching DingTalk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from etl.schema import chat_events, event_listeners, pushed_events
from etl.simulator import Simulator, StreamGateway, World
from tests.conftest import APP_KEY, APP_SECRET, sample_world
from tests.helpers import table_rows as rows
from tests.test_listen import until

BIN = Path(sys.executable).parent


def config_file(
    folder: Path, url: URL, sim: Simulator, gateway: StreamGateway, *, extra: str = ""
) -> Path:
    path = folder / "config.toml"
    path.write_text(
        f"""
[dingtalk]
base_url = "{sim.base_url}"
app_key = "{APP_KEY}"
app_secret = "{APP_SECRET}"
max_attempts = 2

[database]
url = "{url.render_as_string(hide_password=False)}"

[sync]
chatids = ["chat-a", "chat-b", "chat-c"]

[events]
gateway_url = "{gateway.gateway_url}"
reconcile_delay_seconds = 0.3
{extra}
[logging]
level = "INFO"
""",
        encoding="utf-8",
    )
    path.chmod(0o600)
    return path


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from /proc), children first."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        parents[int(stat.parent.name)] = int(fields[1])
    found: list[int] = []
    level = [pid]
    while level:
        level = [child for child, parent in parents.items() if parent in level]
        found.extend(level)
    return found


class Served:
    def __init__(self, world: World, sim: Simulator, gateway: StreamGateway) -> None:
        self.world, self.sim, self.gateway = world, sim, gateway


@pytest.fixture
def redeliver_after() -> float:
    return 0.5


@pytest.fixture
def served(redeliver_after: float) -> Iterator[Served]:
    world = sample_world()
    with (
        Simulator(world) as sim,
        StreamGateway(world, ping_interval=0.5, redeliver_after=redeliver_after) as gateway,
    ):
        yield Served(world, sim, gateway)


class Children:
    """The processes a test started, and the temporary folder they are given: Python's
    multiprocessing keeps its fork server's socket in a folder of its own under it, which a
    process killed with SIGKILL cannot remove."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[subprocess.Popen[str]] = []


@pytest.fixture
def processes() -> Iterator[Children]:
    # Not under tmp_path: a Unix socket's path is limited to about 100 characters.
    children = Children(Path(tempfile.mkdtemp(prefix="etl-")))
    try:
        yield children
    finally:
        for process in children.started:
            if process.poll() is None:
                process.terminate()  # as a service manager stops it: it cleans up
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate(timeout=30)
        shutil.rmtree(children.tmp, ignore_errors=True)


def start(children: Children, config: Path, command: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [str(BIN / "dingtalk-etl"), "--config", str(config), command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(children.tmp)},
    )
    children.started.append(process)
    return process


# Long enough that the listener is killed before the event is pushed again.
@pytest.mark.parametrize("redeliver_after", [3.0], ids=["redeliver-3s"])
def test_kill_between_storing_and_the_ack_writes_nothing_twice(
    served: Served,
    db_url: URL,
    tmp_path: Path,
    processes: Children,
) -> None:
    config = config_file(tmp_path, db_url, served.sim, served.gateway)
    first = start(processes, config, "listen")
    until(lambda: served.gateway.connected, "the listener to connect")
    # Stored and ACKed, but the ACK never reaches the gateway: as if the process died in
    # between, DingTalk pushes the event again.
    served.gateway.inject("lose_ack")

    served.world.remove_members("chat-a", ["u3"], operator="u1")
    [stored] = until(lambda: rows(db_url, pushed_events), "the event to be stored")
    # The reconcile process (and the fork server it came from) end with the listener.
    helpers = until(lambda: descendants(first.pid), "the reconcile process to start")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in helpers), "its helpers to end")
    assert not served.gateway.delivery(stored["event_id"]).delivered

    start(processes, config, "listen")

    until(lambda: served.gateway.delivery(stored["event_id"]).delivered, "the redelivery's ACK")
    assert served.gateway.delivery(stored["event_id"]).times_pushed >= 2
    assert len(rows(db_url, pushed_events)) == 1
    left = [r for r in rows(db_url, chat_events) if r["userid"] == "u3" and not r["is_baseline"]]
    assert [(r["event_type"], r["source"]) for r in left] == [("member_left", "event")]
    # The restarted listener found the event still waiting, and reconciled its chat.
    until(lambda: rows(db_url, pushed_events)[0]["reconciled_at"], "the reconcile")


def test_sigterm_stops_listen_with_exit_0(
    served: Served, db_url: URL, tmp_path: Path, processes: Children
) -> None:
    config = config_file(tmp_path, db_url, served.sim, served.gateway)
    process = start(processes, config, "listen")
    until(lambda: served.gateway.connected, "the listener to connect")

    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=30)

    assert process.returncode == 0, err
    [listener] = rows(db_url, event_listeners)
    assert listener["stopped_at"] is not None
    assert listener["connected"] is False
    assert APP_SECRET not in err


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (
            401,
            78,
            "dingtalk-etl: error: the Stream gateway refused the app's credentials (HTTP 401, "
            "InvalidAuthentication: simulated refusal (refuse:401)): check [dingtalk] app_key and "
            "app_secret\n",
        ),
        (
            403,
            3,
            "dingtalk-etl: error: the Stream gateway refused a connection for this app (HTTP "
            "403, Forbidden.AccessDenied: simulated refusal (refuse:403)): enable Stream mode and "
            "subscribe to the group events in DingTalk's developer console\n",
        ),
    ],
    ids=["bad-credentials", "no-subscription"],
)
def test_gateway_refusal_exit_code_and_message(
    served: Served,
    db_url: URL,
    tmp_path: Path,
    processes: Children,
    status: int,
    code: int,
    message: str,
) -> None:
    config = config_file(tmp_path, db_url, served.sim, served.gateway)
    served.gateway.inject(f"refuse:{status}")

    process = start(processes, config, "listen")
    _out, err = process.communicate(timeout=60)

    assert process.returncode == code
    assert err.splitlines(keepends=True)[-1] == message


def test_schedule_runs_the_listener_beside_its_syncs(
    served: Served, db_url: URL, tmp_path: Path, processes: Children
) -> None:
    extra = "enabled = true\n[schedule]\ninterval_minutes = 60\nrun_on_start = true\n"
    config = config_file(tmp_path, db_url, served.sim, served.gateway, extra=extra)
    process = start(processes, config, "schedule")
    until(lambda: served.gateway.connected, "the scheduler's listener to connect")

    served.world.add_members("chat-b", ["u9"], operator="u2")

    until(
        lambda: [r for r in rows(db_url, chat_events) if r["source"] == "event"],
        "the event's row",
    )
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    until(lambda: not served.gateway.connected, "the listener to leave")
    [listener] = rows(db_url, event_listeners)
    assert listener["stopped_at"] is not None
