"""The changes report's CSV and JSON written by PostgreSQL (etl.pg_export) are the text that
etl.output writes for the same rows, byte for byte: on values that CSV must quote or JSON must
escape, in time zones with odd offsets and daylight saving time, for every filter."""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import TZPATH, ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from etl import pg_export, reports
from etl.db import create_db_engine
from etl.report_html import render_chunks
from etl.schema import chat_events, chats
from tests.helpers import fresh_database, migrated

UTC = dt.UTC
T0 = dt.datetime(2026, 3, 8, 6, 59, 59, tzinfo=UTC)  # New York's clocks go forward at 07:00
# Values CSV has to quote or JSON has to escape, and values neither has to touch.
HARD_TEXTS = [
    "plain",
    "comma, inside",
    'a "quoted" word',
    "line\nbreak",
    "carriage\rreturn",
    "crlf\r\nend",
    "tab\tinside",
    "back\\slash",
    "\\.",
    "  padded  ",
    "",
    "财务部 · 群",
    "emoji 🎉",
    "control \x01 and \x1f and \x7f",
    "line\u2028separator",
    '"',
    ",",
    "\n",
]
ZONES = ["UTC", "Asia/Shanghai", "America/New_York", "Asia/Kolkata", "Pacific/Chatham"]


def _events() -> Iterator[dict[str, Any]]:
    """Every kind of change, with each hard text in a name, a value and a userid; times whole
    and fractional (``_insert`` gives the times), on both sides of a daylight saving change."""
    for index, value in enumerate(HARD_TEXTS):
        chatid = f"chat-{index % 4}"
        yield {"chatid": chatid, "event_type": "member_joined", "userid": value or "u-empty"}
        yield {"chatid": chatid, "event_type": "member_left", "userid": f"u{index}"}
        yield {"chatid": chatid, "event_type": "attribute_changed", "field": "name"}
        yield {
            "chatid": "chat-unknown",  # no row in chats: its name is NULL
            "event_type": "attribute_changed",
            "field": "conversation_tag",
            "old_value": value,
            "new_value": None,
            "source": "event",
            "operator_userid": value or None,
        }
    for field, old, new in [
        ("status", "0", "2"),
        ("status", "2", "0"),
        ("status", "0", "1"),
        ("owner_userid", "alice", "bob"),
        ("searchable", "0", "1"),
    ]:
        yield {
            "chatid": "chat-0",
            "event_type": "attribute_changed",
            "field": field,
            "old_value": old,
            "new_value": new,
        }
    for value in HARD_TEXTS:
        yield {
            "chatid": "chat-1",
            "event_type": "attribute_changed",
            "field": "name",
            "old_value": value,
            "new_value": value + "!",
        }


def _insert(engine: Engine, rows: list[dict[str, Any]], names: dict[str, str]) -> None:
    complete = []
    for index, row in enumerate(rows):
        fraction = 0 if index % 3 == 0 else 1000 * index + 7
        occurred = T0 + dt.timedelta(seconds=index, microseconds=fraction)
        complete.append(
            {
                "userid": None,
                "field": None,
                "old_value": None,
                "new_value": None,
                "source": "poll",
                "operator_userid": None,
                "is_baseline": False,
                **row,
                "occurred_at": occurred,
                "observed_at": occurred + dt.timedelta(seconds=1),
            }
        )
    with engine.begin() as conn:
        if names:
            conn.execute(insert(chats), [_chat(chatid, name) for chatid, name in names.items()])
        conn.execute(insert(chat_events), complete)


def _chat(chatid: str, name: str) -> dict[str, Any]:
    return {
        "chatid": chatid,
        "name": name,
        "status": 0,
        "member_count": 0,
        "first_seen_at": T0,
        "last_synced_at": T0,
        "last_changed_at": T0,
        "raw": {},
        "fingerprint": "-",
    }


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    url = migrated(fresh_database("postgresql", tmp_path_factory.mktemp("pg"), "_pgx"))
    engine = create_db_engine(url)
    names = {f"chat-{i}": text for i, text in enumerate(["Finance, Beijing", 'The "A" team', ""])}
    names["chat-3"] = "多行\n名字"
    _insert(engine, list(_events()), names)
    try:
        yield engine
    finally:
        engine.dispose()


def both(engine: Engine, fmt: str, tz: ZoneInfo, **selection: Any) -> tuple[str, str]:
    """(the database's text, Python's text) of the same changes."""
    kwargs: dict[str, Any] = {"since": None, "until": None, **selection}
    with reports.changes_stream(engine, tz=tz, counted=False, **kwargs) as stream:
        written = pg_export.text_chunks(stream, fmt)
        assert written is not None
        database = "".join(written)
    with reports.changes_stream(engine, tz=tz, counted=False, **kwargs) as stream:
        python = "".join(render_chunks(stream, fmt))
    return database, python


SELECTIONS: list[tuple[str, dict[str, Any]]] = [
    ("everything", {}),
    ("window", {"since": T0 + dt.timedelta(seconds=5), "until": T0 + dt.timedelta(seconds=40)}),
    ("chats", {"chats_filter": ["chat-1", "chat-3"]}),
    ("user", {"userid": "comma, inside"}),
    ("operator", {"operator": 'a "quoted" word'}),
    ("nothing", {"since": T0 + dt.timedelta(days=400)}),
]


@pytest.mark.parametrize("fmt", pg_export.FORMATS)
@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("selection", [s[1] for s in SELECTIONS], ids=[s[0] for s in SELECTIONS])
def test_the_database_writes_the_text_python_writes(
    engine: Engine, fmt: str, zone: str, selection: dict[str, Any]
) -> None:
    database, python = both(engine, fmt, ZoneInfo(zone), **selection)
    assert database == python


BASE_CHATS = ["chat-0", "chat-1", "chat-2", "chat-3", "chat-unknown"]


def test_the_text_holds_every_change_once_as_it_was_stored(engine: Engine) -> None:
    # Other tests add chats of their own to this database.
    database, _ = both(engine, "csv", ZoneInfo("America/New_York"))
    records = list(csv.reader(io.StringIO(database, newline="")))
    assert records[0] == list(reports.CHANGE_COLUMNS)
    every = [dict(zip(records[0], record, strict=True)) for record in records[1:]]
    changes = [change for change in every if change["chatid"] in BASE_CHATS]
    assert len(changes) == len(list(_events()))
    # Both sides of the clock change, the fraction of a second kept or left out as it is.
    stamps = {c["occurred_at"][19:] for c in changes}
    assert {"-05:00", "-04:00"} <= {stamp[-6:] for stamp in stamps}
    assert any(stamp.startswith(".") for stamp in stamps)
    assert any(not stamp.startswith(".") for stamp in stamps)
    values = {c["old_value"] for c in changes}
    assert set(HARD_TEXTS) <= values
    kinds = {c["change"] for c in changes}
    assert kinds == set(reports.CHANGE_KINDS)

    text, _ = both(engine, "json", ZoneInfo("UTC"))
    objects = [o for o in json.loads(text) if o["chatid"] in BASE_CHATS]
    assert [o["occurred_at"] for o in objects] == [
        dt.datetime.fromisoformat(c["occurred_at"]).astimezone(UTC).isoformat() for c in changes
    ]
    assert {o["old_value"] for o in objects} >= set(HARD_TEXTS)


def test_a_long_report_comes_in_pieces(engine: Engine) -> None:
    rows = [
        {"chatid": "chat-many", "event_type": "member_joined", "userid": f"user{n:05d}"}
        for n in range(2 * pg_export.PIECE_ROWS + 10)
    ]
    _insert(engine, rows, {"chat-many": "Many"})
    for fmt in pg_export.FORMATS:
        kwargs: dict[str, Any] = {"since": None, "until": None, "chats_filter": ["chat-many"]}
        with reports.changes_stream(engine, tz=ZoneInfo("UTC"), counted=False, **kwargs) as s:
            written = pg_export.text_chunks(s, fmt)
            assert written is not None
            pieces = list(written)
        assert len(pieces) >= 3, fmt
        database, python = both(engine, fmt, ZoneInfo("UTC"), chats_filter=["chat-many"])
        assert "".join(pieces) == database == python


def test_a_zone_the_server_does_not_know_is_left_to_python(engine: Engine) -> None:
    # Shanghai's rules under a name no time zone database has.
    found = next(
        Path(d, "Asia", "Shanghai") for d in TZPATH if Path(d, "Asia", "Shanghai").is_file()
    )
    with found.open("rb") as data:
        unknown = ZoneInfo.from_file(data, key="Mars/Olympus_Mons")
    kwargs: dict[str, Any] = {"since": None, "until": None, "chats_filter": ["chat-1"]}
    with reports.changes_stream(engine, tz=unknown, counted=False, **kwargs) as stream:
        assert pg_export.text_chunks(stream, "csv") is None
        # The snapshot goes on: the rows are still there to be rendered.
        rows = list(stream.rows)
    assert len(rows) == sum(event["chatid"] == "chat-1" for event in _events())
    assert rows[0]["occurred_at"].utcoffset() == dt.timedelta(hours=8)


def test_other_databases_are_left_to_python(tmp_path: Path) -> None:
    engine = create_db_engine(migrated(fresh_database("sqlite", tmp_path)))
    try:
        kwargs: dict[str, Any] = {"since": None, "until": None}
        with reports.changes_stream(engine, tz=ZoneInfo("UTC"), **kwargs) as stream:
            assert pg_export.text_chunks(stream, "json") is None
            assert list(stream.rows) == []
    finally:
        engine.dispose()


def test_only_csv_and_json(engine: Engine) -> None:
    kwargs: dict[str, Any] = {"since": None, "until": None}
    refused = pytest.raises(ValueError, match="the database writes csv and json, not 'table'")
    with reports.changes_stream(engine, tz=ZoneInfo("UTC"), **kwargs) as stream, refused:
        pg_export.text_chunks(stream, "table")


_chat_numbers = itertools.count()
# Any text PostgreSQL stores: no NUL, no lone surrogate.
_texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.tuples(_texts, _texts, _texts), min_size=1, max_size=4))
def test_any_text_is_written_as_python_writes_it(
    engine: Engine, values: list[tuple[str, str, str]]
) -> None:
    chatid = f"chat-h{next(_chat_numbers)}"
    rows = [
        {
            "chatid": chatid,
            "event_type": "attribute_changed",
            "field": "name",
            "old_value": old,
            "new_value": new,
            "operator_userid": operator or None,
            "source": "event",
        }
        for old, new, operator in values
    ]
    _insert(engine, rows, {chatid: values[0][0]})
    for fmt in pg_export.FORMATS:
        database, python = both(engine, fmt, ZoneInfo("Asia/Kolkata"), chats_filter=[chatid])
        assert database == python
