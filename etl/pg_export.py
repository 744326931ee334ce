"""PostgreSQL writes a streamed report's CSV and JSON itself: the same text, several times faster.

Boundary: takes a ``etl.reports.ReportStream`` whose ``source`` is on PostgreSQL and yields
the text ``etl.output.csv_lines`` and ``etl.output.json_array`` would write for its rows,
byte for byte (tests compare the two on every kind of value). Knows SQL (PostgreSQL's
``COPY``, ``to_char``, ``to_json``) and those two formats; nothing of the command line.

Why: a long changes report spends most of its time in Python converting, formatting and
quoting each value (about 20 µs a row). Here the database does that work in C where the rows
are: CSV comes from ``COPY (query) TO STDOUT`` (the server quotes the fields), JSON from one
text per row built with ``to_json`` (which escapes strings as Python's ``json`` does), and
Python only joins pieces. Times are written by ``to_char`` in the report zone, set for the
snapshot's transaction only; a zone the server does not know (its time zone data may be older
than Python's) is left to Python: ``text_chunks`` then returns None.

Differences from PostgreSQL's own CSV that are undone here: its line end is ``\\n``
(``\\r\\n`` here, as RFC 4180 and Python's csv module write; a newline inside a value stays
as it is), and it quotes an empty string to tell it from NULL (both are an empty field
here: the query gives NULL for either).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from typing import Any, Final, Literal

from sqlalchemy import DateTime, Integer, String, Text, case, func, literal
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql.elements import ColumnElement

from etl.output import csv_lines
from etl.reports import STREAM_ROWS, ReportStream, StreamSource

FORMATS: Final = ("csv", "json")
# Rows joined into one piece of text: the writer's calls per row, not its memory, decide it.
PIECE_ROWS: Final = 1000
# Python's isoformat leaves out the fraction of a whole second.
_WHOLE_SECOND: Final = 'YYYY-MM-DD"T"HH24:MI:SSTZH:TZM'
_FRACTION: Final = 'YYYY-MM-DD"T"HH24:MI:SS.USTZH:TZM'
_ENCODE: Final = json.JSONEncoder(ensure_ascii=False).encode


def text_chunks(stream: ReportStream, fmt: str) -> Iterator[str] | None:
    """``stream`` as CSV or JSON written by PostgreSQL, in pieces; None when the stream is
    not on PostgreSQL (or the server does not know the report zone): render its rows."""
    if fmt not in FORMATS:
        raise ValueError(f"the database writes {' and '.join(FORMATS)}, not {fmt!r}")
    source = stream.source
    if source is None or source.connection.dialect.name != "postgresql":
        return None
    if not _set_zone(source):
        return None
    columns = _rendered(source.query, stream.columns)
    if fmt == "csv":
        return _csv(source, stream.columns, columns)
    return _json(source, stream.columns, columns)


def _set_zone(source: StreamSource) -> bool:
    """Show times in the report zone until the snapshot ends; False when the server does
    not know the zone."""
    savepoint = source.connection.begin_nested()
    try:
        source.connection.execute(func.set_config("TimeZone", source.tz.key, True).select())
    except sa_exc.DBAPIError:
        savepoint.rollback()
        return False
    savepoint.commit()
    return True


# How a rendered column is written: text from the data (escaped in JSON), text this module made
# of a time (digits and separators: nothing to escape), or a number.
_Rendered = dict[str, tuple[ColumnElement[Any], Literal["text", "time", "number"]]]


def _rendered(query: Any, names: tuple[str, ...]) -> _Rendered:
    """Each column of ``query``, by name, as what both formats write of it (NULL stays
    NULL). ``names`` must be its columns."""
    selected = {column.name: column for column in query.selected_columns}
    if tuple(selected) != names:
        raise ValueError(f"the query's columns {tuple(selected)} are not the report's {names}")
    rendered: _Rendered = {}
    for name, column in selected.items():
        kind = column.type
        if isinstance(kind, DateTime) or isinstance(getattr(kind, "impl", None), DateTime):
            whole = func.date_trunc("second", column) == column
            pattern = case((whole, literal(_WHOLE_SECOND)), else_=literal(_FRACTION))
            rendered[name] = (func.to_char(column, pattern), "time")
        elif isinstance(kind, String | Text):
            rendered[name] = (column, "text")
        elif isinstance(kind, Integer):
            rendered[name] = (column, "number")
        else:
            raise TypeError(f"column {name!r}: no text rendering for {kind!r}")
    return rendered


def _csv(
    source: StreamSource,
    names: tuple[str, ...],
    columns: _Rendered,
) -> Iterator[str]:
    yield from csv_lines((), names)
    fields = [
        (column if kind == "number" else func.nullif(column, literal(""))).label(name)
        for name, (column, kind) in columns.items()
    ]
    query = source.query.with_only_columns(*fields, maintain_column_froms=True)
    compiled = query.compile(
        dialect=source.connection.dialect, compile_kwargs={"render_postcompile": True}
    )
    # COPY takes no server-side parameters: psycopg merges these into the statement, quoting
    # each. They are the values as given, without SQLAlchemy's bind processing: strings and
    # aware datetimes, which psycopg adapts as SQLAlchemy's own binding would.
    statement = f"COPY ({compiled.string}) TO STDOUT WITH (FORMAT csv)"
    raw = source.connection.connection.driver_connection
    if raw is None:  # pragma: no cover - a live connection always has its driver's
        raise RuntimeError("the connection to PostgreSQL is closed")
    encoding = raw.info.encoding  # the client encoding, as Python names it
    dialect = source.connection.dialect
    try:
        with raw.cursor() as cursor, cursor.copy(statement, compiled.params) as copy:
            # PostgreSQL sends each row of a COPY TO in a message of its own, ending in "\n".
            records = (bytes(row[:-1]) + b"\r\n" for row in copy)
            while piece := list(islice(records, PIECE_ROWS)):
                yield b"".join(piece).decode(encoding)
    except dialect.loaded_dbapi.Error as exc:
        # The driver's error, met outside SQLAlchemy: made SQLAlchemy's, as its own calls
        # make it, and a lost connection is never handed out again.
        lost = dialect.is_disconnect(exc, raw, None)
        if lost:
            source.connection.invalidate(exc)
        raise sa_exc.DBAPIError.instance(
            statement,
            compiled.params,
            exc,
            dialect.loaded_dbapi.Error,
            connection_invalidated=lost,
            dialect=dialect,
        ) from exc


def _json(
    source: StreamSource,
    names: tuple[str, ...],
    columns: _Rendered,
) -> Iterator[str]:
    """``json_array``'s text: each object built by the database, then joined."""
    parts: list[Any] = []
    for index, (name, (column, kind)) in enumerate(columns.items()):
        key = ("{\n    " if index == 0 else ",\n    ") + _ENCODE(name) + ": "
        value: ColumnElement[Any]
        if kind == "text":
            value = func.to_json(column).cast(Text)
        elif kind == "time":  # to_json's escaping costs more than the whole row's rest
            value = literal('"') + column + literal('"')
        else:
            value = column.cast(Text)
        parts += [literal(key), func.coalesce(value, literal("null"))]
    parts.append(literal("\n  }"))
    query = source.query.with_only_columns(func.concat(*parts), maintain_column_froms=True)
    streaming = source.connection.execution_options(stream_results=True, yield_per=STREAM_ROWS)
    result = streaming.execute(query).scalars()
    try:
        opened = False
        for piece in result.partitions(PIECE_ROWS):
            yield ("[\n  " if not opened else ",\n  ") + ",\n  ".join(piece)
            opened = True
        yield "\n]\n" if opened else "[]\n"
    finally:
        if not source.connection.invalidated:
            result.close()
