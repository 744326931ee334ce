"""`listen` over the simulator's Stream gateway, on every database: events stored then ACKed,
reconciled once, nothing lost and nothing twice, whatever the gateway does."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from sqlalchemy import select, text
from sqlalchemy.engine import URL

from etl.config import Config, parse_config
from etl.db import create_db_engine, writing
from etl.eventstore import EventStore
from etl.listener import run_listen
from etl.schema import chat_events, chat_members, chats, discovered_chats, pushed_events, sync_runs
from etl.simulator import Simulator, StreamGateway, World
from etl.sync import run_sync
from tests.conftest import APP_KEY, APP_SECRET, sample_world
from tests.helpers import table_rows as table
from tests.helpers import wait_for

CHATS = ["chat-a", "chat-b", "chat-c"]
# Short enough for tests, long enough that a burst of events on a chat shares one reconcile.
RECONCILE_DELAY = 0.3


def until(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """``wait_for`` with the predicate first, as these tests read best."""
    return wait_for(what, predicate, timeout)


def replay(url: URL) -> dict[str, set[str]]:
    """Membership of every chat by the log: the latest member row by (occurred_at, id)."""
    latest: dict[tuple[str, str], str] = {}
    for row in table(url, chat_events, chat_events.c.occurred_at, chat_events.c.id):
        if row["event_type"] in ("member_joined", "member_left"):
            latest[(row["chatid"], row["userid"])] = row["event_type"]
    members: dict[str, set[str]] = {}
    for (chatid, userid), kind in latest.items():
        if kind == "member_joined":
            members.setdefault(chatid, set()).add(userid)
    return members


def current_members(url: URL) -> dict[str, set[str]]:
    members: dict[str, set[str]] = {}
    for row in table(url, chat_members):
        if row["left_at"] is None:
            members.setdefault(row["chatid"], set()).add(row["userid"])
    return members


def world_members(world: World, chatids: list[str]) -> dict[str, set[str]]:
    return {c: set(m) for c, m in world.membership().items() if c in chatids and m}


class Setup:
    """A world served over HTTP and Stream mode, a migrated database, a configuration."""

    def __init__(self, world: World, sim: Simulator, gateway: StreamGateway, url: URL) -> None:
        self.world, self.sim, self.gateway, self.url = world, sim, gateway, url
        self.tmp: Path | None = None

    def config(self, tmp_path: Path, **events: Any) -> Config:
        raw: dict[str, Any] = {
            "dingtalk": {
                "base_url": self.sim.base_url,
                "app_key": APP_KEY,
                "app_secret": APP_SECRET,
                "timeout_seconds": 5,
                "max_requests_per_second": 1000,
                "max_attempts": 3,
            },
            "database": {"url": self.url.render_as_string(hide_password=False)},
            "sync": {"chatids": CHATS, "concurrency": 2},
            "events": {
                "gateway_url": self.gateway.gateway_url,
                "reconcile_delay_seconds": RECONCILE_DELAY,
                "silence_timeout_seconds": 2,
                **events,
            },
            "logging": {"level": "WARNING", "format": "json"},
        }
        return parse_config(raw, tmp_path / "config.toml", environ={})


@pytest.fixture
def setup(db_url: URL) -> Iterator[Setup]:
    world = sample_world()
    with (
        Simulator(world) as sim,
        StreamGateway(world, ping_interval=0.5, redeliver_after=0.5) as gateway,
    ):
        yield Setup(world, sim, gateway, db_url)


class Running:
    """``run_listen`` in a thread, as `dingtalk-etl listen` runs it."""

    def __init__(self, config: Config, on_stats: Any = None) -> None:
        self.stop = threading.Event()
        self._on_stats = on_stats
        self.error: BaseException | None = None
        self.reconciles: list[list[str]] = []
        self._thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self._thread.start()

    def _run(self, config: Config) -> None:
        def reconciled(chatids: Any, _result: Any) -> None:
            self.reconciles.append(list(chatids))

        try:
            run_listen(config, self.stop, on_reconciled=reconciled, on_stats=self._on_stats)
        except BaseException as exc:  # handed to the test
            self.error = exc

    def finish(self) -> BaseException | None:
        self.stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "listener did not stop"
        return self.error

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


@pytest.fixture
def listen(setup: Setup, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(**events: Any) -> Running:
        config = setup.config(tmp_path, **events)
        running = Running(config)
        started.append(running)
        until(lambda: setup.gateway.connected or running.error, "the listener to connect")
        if running.error is not None:
            raise running.error
        return running

    yield start
    for running in started:
        running.finish()


def first_sync(setup: Setup, tmp_path: Path) -> None:
    result = run_sync(setup.config(tmp_path))
    assert result.status == "succeeded", result.summary()


def event_rows(url: URL, **match: Any) -> list[dict[str, Any]]:
    rows = table(url, chat_events, chat_events.c.id)
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def settled(setup: Setup) -> None:
    """Wait until every event is reconciled and the log, the tables and the world agree."""
    expected = world_members(setup.world, CHATS)

    def agreed() -> bool:
        waiting = [
            r
            for r in table(setup.url, pushed_events)
            if r["outcome"] in ("recorded", "already_recorded", "discovered")
            and r["reconciled_at"] is None
        ]
        unacked = [d for d in setup.gateway.deliveries() if not d.delivered and not d.lost]
        return (
            not unacked
            and not waiting
            and replay(setup.url) == current_members(setup.url) == expected
        )

    until(agreed, "the log, the tables and the world to agree")


def test_event_is_recorded_with_time_and_actor_then_acked(
    setup: Setup, listen: Callable[..., Running], tmp_path: Path
) -> None:
    first_sync(setup, tmp_path)
    listen()

    setup.world.remove_members("chat-a", ["u2"], operator="u1")

    [row] = until(lambda: event_rows(setup.url, source="event"), "the event's row")
    [pushed] = table(setup.url, pushed_events)
    delivery = setup.gateway.delivery(pushed["event_id"])
    assert (row["event_type"], row["userid"], row["operator_userid"]) == ("member_left", "u2", "u1")
    assert row["run_id"] is None
    assert row["is_baseline"] is False
    assert row["event_id"] == pushed["event_id"]
    assert pushed["outcome"] == "recorded"
    assert abs(row["occurred_at"].timestamp() * 1000 - delivery.data["timeStamp"]) < 1
    until(lambda: setup.gateway.delivery(pushed["event_id"]).delivered, "the ACK")
    assert setup.gateway.delivery(pushed["event_id"]).ack_code == 200


def test_reconcile_confirms_the_event_and_writes_the_change_once(
    setup: Setup, listen: Callable[..., Running], tmp_path: Path
) -> None:
    first_sync(setup, tmp_path)
    running = listen()
    calls_before = setup.world.stats.requests_by_chat["chat-a"]

    # A burst on one chat: three events, one reconcile.
    setup.world.remove_members("chat-a", ["u2"], operator="u1")
    setup.world.add_members("chat-a", ["u9"], operator="u1")
    setup.world.set_attr("chat-a", name="Alpha 2", operator="u3")

    settled(setup)
    runs = until(
        lambda: [
            r for r in table(setup.url, sync_runs) if r["trigger"] == "event" and r["finished_at"]
        ],
        "the reconcile run to finish",
    )
    assert len(runs) == 1
    assert runs[0]["status"] == "succeeded"
    assert running.reconciles == [["chat-a"]]
    assert setup.world.stats.requests_by_chat["chat-a"] - calls_before == 1
    # Each change once, as the event recorded it: the reconcile added no row.
    later = [r for r in event_rows(setup.url) if r["run_id"] == runs[0]["id"]]
    assert later == []
    left = next(
        r for r in table(setup.url, chat_members) if (r["chatid"], r["userid"]) == ("chat-a", "u2")
    )
    [u2_event] = event_rows(setup.url, chatid="chat-a", userid="u2", event_type="member_left")
    assert left["left_at"] == u2_event["occurred_at"]
    [rename] = event_rows(setup.url, field="name")
    assert (rename["old_value"], rename["new_value"], rename["operator_userid"]) == (
        "Alpha",
        "Alpha 2",
        "u3",
    )


def test_missed_event_becomes_a_poll_row(
    setup: Setup, listen: Callable[..., Running], tmp_path: Path
) -> None:
    first_sync(setup, tmp_path)
    listen()
    setup.gateway.inject("lose")

    setup.world.add_members("chat-b", ["u7"], operator="u2")  # never delivered
    setup.world.add_members("chat-b", ["u8"], operator="u2")

    settled(setup)
    [u7] = event_rows(setup.url, chatid="chat-b", userid="u7")
    [u8] = event_rows(setup.url, chatid="chat-b", userid="u8")
    assert (u7["source"], u7["run_id"] is not None) == ("poll", True)
    assert u8["source"] == "event"


@pytest.mark.parametrize("fault", ["duplicate", "reorder", "delay:0.4"], ids=str)
def test_delivery_faults_write_each_change_once(
    setup: Setup, listen: Callable[..., Running], tmp_path: Path, fault: str
) -> None:
    first_sync(setup, tmp_path)
    listen()
    setup.gateway.inject(fault)

    setup.world.add_members("chat-c", ["u10"], operator="u5")
    setup.world.remove_members("chat-c", ["u10"], operator="u5")

    settled(setup)
    rows = event_rows(setup.url, userid="u10")
    assert sorted((r["event_type"], r["source"]) for r in rows) == [
        ("member_joined", "event"),
        ("member_left", "event"),
    ]
    assert len(table(setup.url, pushed_events)) == 2


@pytest.mark.parametrize(
    "fault",
    ["drop", "silence:3", "disconnect", "malformed"],
    ids=["drop", "silence", "disconnect", "malformed"],
)
def test_connection_faults_lose_nothing(
    setup: Setup, listen: Callable[..., Running], tmp_path: Path, fault: str
) -> None:
    first_sync(setup, tmp_path)
    running = listen()
    opened = setup.gateway.connections_opened
    setup.gateway.inject(fault)
    if fault != "malformed":
        until(lambda: setup.gateway.connections_opened > opened, "a new connection")

    setup.world.remove_members("chat-c", ["u6"], operator="u5")

    settled(setup)
    [row] = event_rows(setup.url, userid="u6", is_baseline=False)
    assert row["source"] == "event"
    assert running.alive


def test_redelivered_event_writes_nothing(
    setup: Setup, listen: Callable[..., Running], tmp_path: Path
) -> None:
    first_sync(setup, tmp_path)
    listen()
    # The same event id twice, as DingTalk pushes it when an ACK was lost.
    setup.gateway.inject("duplicate")

    event_id = setup.gateway.push_event("chat_quit", "chat-a", operator="u3")

    until(lambda: len(setup.gateway.delivery(event_id).acks) >= 2, "both ACKs")
    assert all(ack.success for ack in setup.gateway.delivery(event_id).acks)
    assert len(event_rows(setup.url, userid="u3", event_type="member_left")) == 1
    assert len(table(setup.url, pushed_events)) == 1


def test_redelivery_of_an_event_stored_here_takes_no_transaction_of_its_own(
    setup: Setup,
    listen: Callable[..., Running],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first_sync(setup, tmp_path)
    transactions: list[list[str]] = []
    record_many = EventStore.record_many

    def counted(self: EventStore, events: Any, **kwargs: Any) -> Any:
        transactions.append([event.event_id for event, _at in events])
        return record_many(self, events, **kwargs)

    monkeypatch.setattr(EventStore, "record_many", counted)
    listen()
    setup.gateway.inject("duplicate")

    event_id = setup.gateway.push_event("chat_quit", "chat-a", operator="u3")

    until(lambda: len(setup.gateway.delivery(event_id).acks) >= 2, "both ACKs")
    assert all(ack.success for ack in setup.gateway.delivery(event_id).acks)
    # The listener knew the id it had just stored: a second push read apart took no
    # transaction; two read together shared one.
    assert len(transactions) == 1
    assert set(transactions[0]) == {event_id}
    assert len(event_rows(setup.url, userid="u3", event_type="member_left")) == 1


def test_unknown_chat_is_kept_and_counted(
    setup: Setup, listen: Callable[..., Running], tmp_path: Path
) -> None:
    first_sync(setup, tmp_path)
    listen()

    event_id = setup.gateway.push_event("chat_add_member", "chat-zz", userId=["u1"])

    until(lambda: setup.gateway.delivery(event_id).delivered, "the ACK")
    [pushed] = table(setup.url, pushed_events)
    assert (pushed["outcome"], pushed["chatid"]) == ("unknown_chat", "chat-zz")
    assert event_rows(setup.url, chatid="chat-zz") == []


def test_discovered_chat_is_synced_from_its_first_reconcile(
    setup: Setup, listen: Callable[..., Running], tmp_path: Path
) -> None:
    from etl.simulator import SimChat

    first_sync(setup, tmp_path)
    setup.world.add_chat(SimChat("chat-new", "New", "u1", ["u1", "u2"]))
    listen(discover_chats=True)

    setup.world.add_members("chat-new", ["u3"], operator="u1")

    until(lambda: event_rows(setup.url, chatid="chat-new"), "the discovery")
    [found] = table(setup.url, discovered_chats)
    assert found["chatid"] == "chat-new"
    [pushed] = table(setup.url, pushed_events)
    assert pushed["outcome"] == "discovered"
    rows = until(
        lambda: event_rows(setup.url, chatid="chat-new", event_type="member_joined"),
        "the baseline",
    )
    assert {r["userid"] for r in rows} == {"u1", "u2", "u3"}
    assert all(r["is_baseline"] for r in rows)
    assert event_rows(setup.url, chatid="chat-new")[0]["event_type"] == "chat_discovered"


def test_database_outage_acks_nothing_it_did_not_store(
    setup: Setup, listen: Callable[..., Running], tmp_path: Path
) -> None:
    first_sync(setup, tmp_path)
    listen()
    engine = create_db_engine(setup.url)
    try:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE pushed_events RENAME TO pushed_events_away"))
        event_id = setup.gateway.push_event("chat_quit", "chat-b", operator="u4")
        until(lambda: setup.gateway.delivery(event_id).times_pushed >= 2, "a redelivery")
        assert not setup.gateway.delivery(event_id).delivered
        assert all(a.code != 200 for a in setup.gateway.delivery(event_id).acks)
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE pushed_events_away RENAME TO pushed_events"))
    finally:
        engine.dispose()

    until(lambda: setup.gateway.delivery(event_id).delivered, "the ACK after the outage")
    assert len(event_rows(setup.url, userid="u4", source="event")) == 1


def refuse_operator(url: URL, userid: str) -> Callable[[], None]:
    """Make the database refuse ``pushed_events`` rows of ``userid``'s events; the undo."""
    engine = create_db_engine(url)
    if url.get_backend_name() == "sqlite":
        add = (
            "CREATE TRIGGER refuse_operator BEFORE INSERT ON pushed_events "
            f"WHEN NEW.operator_userid = '{userid}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        drop = "DROP TRIGGER refuse_operator"
    else:
        add = (
            "ALTER TABLE pushed_events ADD CONSTRAINT refuse_operator "
            f"CHECK (operator_userid IS NULL OR operator_userid <> '{userid}')"
        )
        drop = "ALTER TABLE pushed_events DROP CONSTRAINT refuse_operator"
    with engine.begin() as conn:
        conn.execute(text(add))

    def undo() -> None:
        try:
            with engine.begin() as conn:
                conn.execute(text(drop))
        finally:
            engine.dispose()

    return undo


@contextlib.contextmanager
def chat_locked(url: URL, chatid: str) -> Iterator[None]:
    """Hold what an event's transaction on ``chatid`` must take first: the chat's row (the
    database's write lock on SQLite)."""
    engine = create_db_engine(url)
    try:
        with writing(engine) as conn:
            conn.execute(select(chats.c.chatid).where(chats.c.chatid == chatid).with_for_update())
            yield
    finally:
        engine.dispose()


def test_events_that_arrive_together_share_a_transaction_one_refused_alone(
    setup: Setup, listen: Callable[..., Running], tmp_path: Path
) -> None:
    first_sync(setup, tmp_path)
    listen()
    allow = refuse_operator(setup.url, "u4")
    try:
        with structlog.testing.capture_logs() as logs:
            # The first event's transaction waits for the chat; the next two arrive meanwhile
            # and are read off the socket together once it is done.
            with chat_locked(setup.url, "chat-a"):
                first = setup.gateway.push_event("chat_quit", "chat-a", operator="u3")
                refused = setup.gateway.push_event("chat_quit", "chat-b", operator="u4")
                other = setup.gateway.push_event("chat_quit", "chat-c", operator="u6")
                until(
                    lambda: setup.gateway.delivery(other).times_pushed > 0, "the pushes to be sent"
                )
            stored = [first, other]
            until(lambda: all(setup.gateway.delivery(e).delivered for e in stored), "their ACKs")
            until(lambda: setup.gateway.delivery(refused).acks, "the refused event's answer")
        failures = [
            (e["events"], e["event_id"]) for e in logs if e["event"] == "events.store_failed"
        ]
        # The batch with the refused event failed as one, then each of its events alone.
        assert failures[0][0] >= 2
        assert (1, refused) in failures
        assert [f for f in failures if f[0] == 1 and f[1] != refused] == []
        assert not setup.gateway.delivery(refused).delivered
        assert all(a.code != 200 for a in setup.gateway.delivery(refused).acks)
        assert {r["operator_userid"] for r in table(setup.url, pushed_events)} == {"u3", "u6"}
    finally:
        allow()

    until(lambda: setup.gateway.delivery(refused).delivered, "the ACK once it can be stored")
    assert len(event_rows(setup.url, userid="u4", source="event")) == 1


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (401, 78, "the Stream gateway refused the app's credentials (HTTP 401"),
        (403, 3, "the Stream gateway refused a connection for this app (HTTP 403"),
    ],
    ids=["bad-credentials", "no-subscription"],
)
def test_gateway_refusal_stops_the_listener(
    setup: Setup, tmp_path: Path, status: int, code: int, message: str
) -> None:
    setup.gateway.inject(f"refuse:{status}")
    running = Running(setup.config(tmp_path))

    error = until(lambda: running.error, "the listener to stop")

    running.finish()
    assert error.exit_code == code  # type: ignore[attr-defined]
    assert error.message.startswith(message)  # type: ignore[attr-defined]
    assert APP_SECRET not in error.message  # type: ignore[attr-defined]


def test_events_during_a_sync_are_stored_and_reconciled_after_it(
    setup: Setup, listen: Callable[..., Running], tmp_path: Path
) -> None:
    from etl.lock import run_lock

    first_sync(setup, tmp_path)
    listen()
    engine = create_db_engine(setup.url)
    try:
        # A sync holds the lock: events are still stored and ACKed at once; only the
        # reconcile's writes wait for the lock.
        with run_lock(engine):
            event_id = setup.gateway.push_event("chat_quit", "chat-c", operator="u7")
            setup.world.remove_members("chat-c", ["u7"], operator="u7")
            until(lambda: setup.gateway.delivery(event_id).delivered, "the ACK during the sync")
            assert event_rows(setup.url, userid="u7", source="event")
            assert not [r for r in table(setup.url, sync_runs) if r["trigger"] == "event"]
    finally:
        engine.dispose()

    settled(setup)
    [run] = until(
        lambda: [
            r for r in table(setup.url, sync_runs) if r["trigger"] == "event" and r["finished_at"]
        ],
        "the reconcile after the sync",
    )
    assert run["status"] == "succeeded"


def test_status_shows_the_listener_and_its_silence(
    setup: Setup, listen: Callable[..., Running], tmp_path: Path
) -> None:
    import datetime as dt

    from etl.monitoring import read_health

    first_sync(setup, tmp_path)
    running = listen()
    setup.gateway.push_event("chat_add_member", "chat-zz", userId=["u1"])  # ignored: unknown
    until(lambda: table(setup.url, pushed_events), "the event")
    running.finish()
    config = setup.config(tmp_path)

    health = read_health(config, max_age_seconds=3600)
    later = read_health(
        config,
        max_age_seconds=3600,
        now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=2),
    )

    listener_lines = [
        line for line in health.lines() if line.startswith(("event listener", "events:"))
    ]
    assert listener_lines[0].startswith("event listener: stopped ")
    assert listener_lines[1].startswith(
        "events: 1 received, 1 ignored, 0 waiting for their reconcile;"
    )
    assert health.exit_code == 0
    assert later.exit_code == 1
    assert later.verdict().startswith("STALE: last success 2h")


def test_the_secret_and_the_tickets_appear_nowhere(
    setup: Setup, listen: Callable[..., Running], tmp_path: Path
) -> None:
    import io

    from etl.logs import configure_logging

    log = io.StringIO()
    configure_logging("DEBUG", "json", stream=log)
    first_sync(setup, tmp_path)
    # Refused, dropped and told to move: every path that opens a connection again.
    setup.gateway.inject("refuse:500", "drop", "disconnect", "malformed")
    running = listen()
    until(lambda: setup.gateway.connections_opened >= 3, "the reconnections")
    setup.world.remove_members("chat-a", ["u2"], operator="u1")
    settled(setup)
    running.finish()

    tickets = setup.gateway.tickets_issued
    assert len(tickets) >= 3
    assert '"events.received"' in log.getvalue()
    produced = log.getvalue() + repr(
        [table(setup.url, t) for t in (pushed_events, chat_events, sync_runs, discovered_chats)]
    )
    from etl.schema import event_listeners

    produced += repr(table(setup.url, event_listeners))
    for secret in (APP_SECRET, *tickets):
        assert secret not in produced


def test_listener_metrics_file(setup: Setup, tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from etl.monitoring import listener_metrics_path, listener_metrics_writer

    metrics = tmp_path / "dingtalk_etl.prom"
    config = dataclasses.replace(setup.config(tmp_path), metrics_path=metrics)
    path = listener_metrics_path(metrics)
    running = Running(config, on_stats=listener_metrics_writer(config))
    until(lambda: setup.gateway.connected, "the listener to connect")
    setup.gateway.push_event("chat_add_member", "chat-zz", userId=["u1"])  # unknown: ignored
    setup.gateway.inject("drop")
    until(lambda: setup.gateway.connections_opened >= 2, "a reconnection")
    until(lambda: setup.gateway.connected, "the listener to connect again")

    def samples() -> dict[str, float]:
        if not path.exists():
            return {}
        text = path.read_text(encoding="utf-8")
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    found = until(
        lambda: (
            (s := samples()).get("dingtalk_etl_events_reconnects_total", 0) >= 1
            and s.get("dingtalk_etl_events_received_total") == 1
            and s.get("dingtalk_etl_events_connected") == 1
            and s
        ),
        "the metrics after the reconnection",
    )
    running.finish()
    assert found["dingtalk_etl_events_received_total"] == 1
    assert found["dingtalk_etl_events_ignored_total"] == 1
    assert found["dingtalk_etl_events_last_event_timestamp_seconds"] > 0
    assert not metrics.exists()  # the runs' file is the sync's, not the listener's
    assert samples()["dingtalk_etl_events_connected"] == 0
