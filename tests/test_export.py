"""The changes report's CSV and JSON written by etl.export (by PostgreSQL itself, or from text
rows elsewhere) are the text that etl.output writes for the same rows, byte for byte, on each
database: on values that CSV must quote or JSON must escape, in time zones with odd offsets
and daylight saving time, for every filter."""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from zoneinfo import TZPATH, ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, update
from sqlalchemy.engine import Engine

from etl import export, reports
from etl.db import create_db_engine
from etl.report_html import render_chunks
from etl.schema import chat_events, chats
from tests.conftest import DATABASES
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
    """Every kind of change, with each hard text as a userid, an operator and an old and new
    value (the chats' names hold more)."""
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
    """Store ``rows`` as changes a second apart from ``T0``, across New York's change of
    clocks (every third at a whole second: isoformat leaves out its fraction), and the chats
    ``names`` names."""
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


@pytest.fixture(scope="module", params=DATABASES)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """A database of each kind holding ``_events``; other tests add chats of their own."""
    kind = str(request.param)
    url = migrated(fresh_database(kind, tmp_path_factory.mktemp(kind), "_export"))
    engine = create_db_engine(url)
    names = {f"chat-{i}": text for i, text in enumerate(["Finance, Beijing", 'The "A" team', ""])}
    names["chat-3"] = "多行\n名字"
    _insert(engine, list(_events()), names)
    try:
        yield engine
    finally:
        engine.dispose()


def both(engine: Engine, fmt: str, tz: ZoneInfo, **selection: Any) -> tuple[str, str]:
    """(etl.export's text, etl.output's text) of the same changes."""
    kwargs: dict[str, Any] = {"since": None, "until": None, **selection}
    with reports.changes_stream(engine, tz=tz, counted=False, **kwargs) as stream:
        written = export.text_chunks(stream, fmt)
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


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("selection", [s[1] for s in SELECTIONS], ids=[s[0] for s in SELECTIONS])
def test_the_export_writes_the_text_the_general_writers_write(
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
        for n in range(2 * export.PIECE_ROWS + 10)
    ]
    # The last piece needs quoting, the others none: both ways of writing CSV meet.
    rows[-1]["userid"] = "user, last"
    _insert(engine, rows, {"chat-many": "Many"})
    for fmt in export.FORMATS:
        kwargs: dict[str, Any] = {"since": None, "until": None, "chats_filter": ["chat-many"]}
        with reports.changes_stream(engine, tz=ZoneInfo("UTC"), counted=False, **kwargs) as s:
            written = export.text_chunks(s, fmt)
            assert written is not None
            pieces = list(written)
        assert len(pieces) >= 3, fmt
        database, python = both(engine, fmt, ZoneInfo("UTC"), chats_filter=["chat-many"])
        assert "".join(pieces) == database == python


JOINED = [
    ("text", ["a", "b c", "", "名字", "x\x00y", "\u2028", "tab\there"], True),
    ("numbers", [0, -7, 2**63, 2.5, 1e-300], True),
    ("nulls", [None, None, None], True),
    ("comma", ["a", "b,c"], False),
    ("quote", ['say "hi"', "b"], False),
    ("cr", ["a\rb", "b"], False),
    ("lf", ["a\nb", "b"], False),
]


@pytest.mark.parametrize(("values", "joined"), [j[1:] for j in JOINED], ids=[j[0] for j in JOINED])
def test_fields_that_need_no_quoting_are_joined_as_the_csv_module_writes_them(
    values: list[Any], joined: bool
) -> None:
    piece = [(value, "same", n, None) for n, value in enumerate(values)]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(piece)
    assert export._csv_joined(piece) == (buffer.getvalue() if joined else None)


def test_a_zone_postgresql_does_not_know_is_shown_by_python(engine: Engine) -> None:
    # Shanghai's rules under a name no time zone database has.
    found = (Path(folder, "Asia", "Shanghai") for folder in TZPATH)
    with next(path for path in found if path.is_file()).open("rb") as data:
        unknown = ZoneInfo.from_file(data, key="Mars/Olympus_Mons")
    for fmt in export.FORMATS:
        database, python = both(engine, fmt, unknown, chats_filter=["chat-1"])
        assert database == python
        assert "+08:00" in database


def test_a_stream_without_its_query_is_left_to_the_general_writers(engine: Engine) -> None:
    kwargs: dict[str, Any] = {"since": None, "until": None}
    with reports.changes_stream(engine, tz=ZoneInfo("UTC"), **kwargs) as stream:
        assert export.text_chunks(replace(stream, source=None), "csv") is None


def test_a_value_of_another_type_is_written_as_the_general_writer_does(tmp_path: Path) -> None:
    # SQLite lets a column hold any type: a BLOB in a text column, written by another tool.
    engine = create_db_engine(migrated(fresh_database("sqlite", tmp_path)))
    try:
        _insert(engine, [{"chatid": "chat-b", "event_type": "attribute_changed"}], {})
        with engine.begin() as conn:
            conn.execute(update(chat_events).values(old_value=b"\x00\xff", new_value=2.5))
        database, python = both(engine, "csv", ZoneInfo("UTC"))
        assert database == python
        assert "b'\\x00\\xff',2.5," in database
        # JSON has no text for bytes: both writers refuse it alike.
        for write in (export.text_chunks, render_chunks):
            kwargs: dict[str, Any] = {"since": None, "until": None}
            with (
                reports.changes_stream(engine, tz=ZoneInfo("UTC"), **kwargs) as stream,
                pytest.raises(TypeError, match="Object of type bytes is not JSON serializable"),
            ):
                "".join(write(stream, "json") or ())
    finally:
        engine.dispose()


def test_each_distinct_time_is_shown_once_and_forgotten_past_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shown = export._Shown(ZoneInfo("Asia/Kolkata"))
    assert shown.column(["2026-03-08 06:59:59", None, "2026-03-08 06:59:59.000100"]) == [
        "2026-03-08T12:29:59+05:30",
        None,
        "2026-03-08T12:29:59.000100+05:30",
    ]
    assert len(shown.cache) == 3  # None and the two times
    monkeypatch.setattr(export._Shown, "LIMIT", 3)
    later = [dt.datetime(2026, 3, 9, tzinfo=UTC), dt.datetime(2026, 3, 9, 1)]  # aware, naive
    assert shown.column(later) == ["2026-03-09T05:30:00+05:30", "2026-03-09T06:30:00+05:30"]
    assert set(shown.cache) == {None, *later}


def test_only_csv_and_json(engine: Engine) -> None:
    kwargs: dict[str, Any] = {"since": None, "until": None}
    refused = pytest.raises(ValueError, match="the export writes csv and json, not 'table'")
    with reports.changes_stream(engine, tz=ZoneInfo("UTC"), **kwargs) as stream, refused:
        export.text_chunks(stream, "table")


_chat_numbers = itertools.count()
# Any text PostgreSQL stores: no NUL, no lone surrogate.
_texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
    for fmt in export.FORMATS:
        database, python = both(engine, fmt, ZoneInfo("Asia/Kolkata"), chats_filter=[chatid])
        assert database == python
