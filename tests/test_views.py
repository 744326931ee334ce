"""The views of migration 0002 on each database: the same answers as the reports, portable
types, and a downgrade that removes them."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import bindparam, inspect, text
from sqlalchemy.engine import URL, Engine

from etl import migrate, reports
from etl.db import create_db_engine
from etl.schema import UTCDateTime
from tests.report_scenario import MEMBERS, OWNERS, Scenario

UTC = ZoneInfo("UTC")
VIEWS = {"current_chat_members", "membership_changes"}


def as_utc(value: Any) -> dt.datetime:
    """A time read through plain SQL: text on SQLite, naive UTC on MySQL, aware on PostgreSQL."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime)
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def query(engine: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(text(sql), params).mappings()]


@pytest.mark.parametrize("chatid", sorted(MEMBERS), ids=sorted(MEMBERS))
def test_current_chat_members_matches_the_members_report(engine: Engine, chatid: str) -> None:
    rows = query(
        engine,
        "SELECT chatid, chat_name, userid, joined_at, is_owner, chat_status "
        "FROM current_chat_members WHERE chatid = :chatid ORDER BY userid",
        chatid=chatid,
    )
    report = reports.members(engine, chatid, as_of=None, tz=UTC)
    chat = reports.chat_list(engine, tz=UTC, chatids=[chatid]).rows[0]

    assert [(r["userid"], as_utc(r["joined_at"]), r["is_owner"]) for r in rows] == [
        (r["userid"], r["joined_at"], int(r["is_owner"])) for r in report.rows
    ]
    assert {r["chat_name"] for r in rows} == {chat["name"]}
    assert {r["chat_status"] for r in rows} == {1 if chat["status"] == "normal" else 2}


def test_current_chat_members_is_owner_is_an_integer_everywhere(engine: Engine) -> None:
    rows = query(
        engine,
        "SELECT chatid, userid, is_owner FROM current_chat_members WHERE is_owner = 1 "
        "ORDER BY chatid",
    )
    assert [(r["chatid"], r["userid"]) for r in rows] == sorted(OWNERS.items())
    every = query(engine, "SELECT is_owner FROM current_chat_members")
    assert {type(r["is_owner"]) for r in every} == {int}
    assert {r["is_owner"] for r in every} == {0, 1}


def test_membership_changes_matches_the_changes_report(scenario: Scenario, engine: Engine) -> None:
    rows = query(
        engine,
        "SELECT occurred_at, observed_at, chatid, chat_name, userid, change_type, run_id, "
        "source, operator_userid, event_id FROM membership_changes "
        "ORDER BY occurred_at, event_id",
    )
    report = reports.changes(engine, since=None, until=None, tz=UTC)

    def view(r: dict[str, Any], change: str) -> tuple[Any, ...]:
        return (
            as_utc(r["occurred_at"]),
            as_utc(r["observed_at"]),
            r["chatid"],
            r["chat_name"],
            r["userid"],
            r[change],
            r["run_id"],
            r["source"],
            r["operator_userid"],
        )

    assert [view(r, "change_type") for r in rows] == [
        view(r, "change") for r in report.rows if r["change"] in ("joined", "left")
    ]
    assert len(rows) == 9  # baseline members are not in the view
    assert [(r["userid"], r["operator_userid"]) for r in rows if r["source"] == "event"] == [
        ("dan", "alice"),
        ("dan", "alice"),
        ("frank", "bob"),
        ("frank", "frank"),  # quit
    ]


def test_membership_changes_in_a_window_with_bound_times(
    scenario: Scenario, engine: Engine
) -> None:
    since = scenario.at("chat-fin", 3)
    with engine.connect() as conn:
        statement = text(
            "SELECT chatid, userid, change_type, operator_userid FROM membership_changes "
            "WHERE occurred_at >= :since ORDER BY occurred_at, event_id"
        ).bindparams(_utc_param("since"))
        rows = conn.execute(statement, {"since": since}).all()
    assert [tuple(r) for r in rows] == [
        ("chat-fin", "carol", "joined", None),
        ("chat-fin", "bob", "left", None),
        ("chat-eng", "dave", "left", None),
        ("chat-fin", "dan", "left", "alice"),
        ("chat-fin", "dan", "joined", "alice"),
        ("chat-eng", "frank", "joined", "bob"),
        ("chat-eng", "frank", "left", "frank"),
    ]


def _utc_param(name: str) -> Any:
    return bindparam(name, type_=UTCDateTime())


def _downgrade(engine: Engine, revision: str) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrate.migrations_dir()))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def test_views_downgrade_and_upgrade_again(empty_db: URL) -> None:
    engine = create_db_engine(empty_db)
    try:
        migrate.upgrade(engine)
        assert set(inspect(engine).get_view_names()) >= VIEWS
        _downgrade(engine, "0001")
        assert migrate.current_revision(engine) == "0001"
        assert not set(inspect(engine).get_view_names()) & VIEWS
        assert {"chats", "chat_events"} <= set(inspect(engine).get_table_names())
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
        assert set(inspect(engine).get_view_names()) >= VIEWS
    finally:
        engine.dispose()
