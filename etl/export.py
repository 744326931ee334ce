"""A streamed report's CSV and JSON, written fast: the same text as ``etl.output`` writes.

Boundary: takes a ``etl.reports.ReportStream`` that has a ``source`` and yields the text
``etl.output.csv_lines`` and ``etl.output.json_array`` would write for its rows, byte for
byte (tests compare the two on every database and every kind of value). Knows SQL and those
two formats; nothing of the command line.

Why: the general writers spend about 20 µs a row in Python (a dict per row, times converted
to the report zone, every value checked and formatted). Here:

- On PostgreSQL the database writes the text where the rows are: CSV is ``COPY (query) TO
  STDOUT`` (the server quotes the fields), JSON one text per row built with ``to_json``
  (which escapes strings as Python's ``json`` does); times by ``to_char`` in the report
  zone, set for the snapshot's transaction only. Python only joins pieces.
- Elsewhere, and on a PostgreSQL server that does not know the report zone (its time zone
  data may be older than Python's), each time comes as the database's UTC text (from
  PostgreSQL, its driver's datetime) and is converted once per distinct value (a sync
  writes many changes at one time); the rows, plain text and numbers then, are written a
  thousand at a time: to CSV by joining their fields when none needs quoting, else by the
  csv module's ``writerows``; to JSON by the C encoder.

Differences from PostgreSQL's own CSV that are undone here: its line end is ``\\n``
(``\\r\\n`` here, as RFC 4180 and Python's csv module write; a newline inside a value stays
as it is), and it quotes an empty string to tell it from NULL (both are an empty field
here: the query gives NULL for either).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterator, Sequence
from itertools import chain, islice
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo

from sqlalchemy import DateTime, Integer, String, Text, case, cast, func, literal
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql.elements import ColumnElement

from etl.output import csv_lines, csv_value, json_framed, json_object
from etl.reports import STREAM_ROWS, ReportStream, StreamSource

FORMATS: Final = ("csv", "json")
# Rows joined into one piece of text: the writer's calls per row, not its memory, decide it.
PIECE_ROWS: Final = 1000
# Python's isoformat leaves out the fraction of a whole second.
_WHOLE_SECOND: Final = 'YYYY-MM-DD"T"HH24:MI:SSTZH:TZM'
_FRACTION: Final = 'YYYY-MM-DD"T"HH24:MI:SS.USTZH:TZM'
_ENCODE: Final = json.JSONEncoder(ensure_ascii=False).encode


def text_chunks(stream: ReportStream, fmt: str) -> Iterator[str] | None:
    """``stream`` as CSV or JSON, in pieces; None when the stream has no ``source``: render
    its rows."""
    if fmt not in FORMATS:
        raise ValueError(f"the export writes {' and '.join(FORMATS)}, not {fmt!r}")
    source = stream.source
    if source is None:
        return None
    columns = _kinds(source.query, stream.columns)
    if source.connection.dialect.name == "postgresql" and _set_zone(source):
        if fmt == "csv":
            return _pg_csv(source, stream.columns, columns)
        return _pg_json(source, stream.columns, columns)
    return _python_text(source, stream.columns, columns, fmt)


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


# What a column holds: text from the data (escaped in JSON), a time (written as text of
# digits and separators: nothing to escape), or a number.
_Kinds = dict[str, tuple[ColumnElement[Any], Literal["text", "time", "number"]]]


def _kinds(query: Any, names: tuple[str, ...]) -> _Kinds:
    """Each column of ``query`` by name, with what it holds. ``names`` must be its columns."""
    selected = {column.name: column for column in query.selected_columns}
    if tuple(selected) != names:
        raise ValueError(f"the query's columns {tuple(selected)} are not the report's {names}")
    kinds: _Kinds = {}
    for name, column in selected.items():
        kind = column.type
        if isinstance(kind, DateTime) or isinstance(getattr(kind, "impl", None), DateTime):
            kinds[name] = (column, "time")
        elif isinstance(kind, String | Text):
            kinds[name] = (column, "text")
        elif isinstance(kind, Integer):
            kinds[name] = (column, "number")
        else:
            raise TypeError(f"column {name!r}: no text rendering for {kind!r}")
    return kinds


def _pg_rendered(columns: _Kinds) -> _Kinds:
    """The columns with each time as ``isoformat`` text in the session's zone."""
    rendered: _Kinds = {}
    for name, (column, kind) in columns.items():
        if kind == "time":
            whole = func.date_trunc("second", column) == column
            pattern = case((whole, literal(_WHOLE_SECOND)), else_=literal(_FRACTION))
            column = func.to_char(column, pattern)
        rendered[name] = (column, kind)
    return rendered


def _pg_csv(source: StreamSource, names: tuple[str, ...], columns: _Kinds) -> Iterator[str]:
    yield from csv_lines((), names)
    fields = [
        (column if kind == "number" else func.nullif(column, literal(""))).label(name)
        for name, (column, kind) in _pg_rendered(columns).items()
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


def _pg_json(source: StreamSource, names: tuple[str, ...], columns: _Kinds) -> Iterator[str]:
    """``json_array``'s text: each object built by the database, then joined."""
    parts: list[Any] = []
    for index, (name, (column, kind)) in enumerate(_pg_rendered(columns).items()):
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
    pieces = _pieces(source, query, scalars=True)
    return json_framed(",\n  ".join(piece) for piece in pieces)


def _pieces(source: StreamSource, query: Any, *, scalars: bool = False) -> Iterator[Sequence[Any]]:
    """The rows of ``query`` (``scalars``: the first value of each), ``PIECE_ROWS`` at a
    time, from a server-side cursor closed when they end or are left."""
    streaming = source.connection.execution_options(stream_results=True, yield_per=STREAM_ROWS)
    result = streaming.execute(query)
    try:
        rows = result.scalars() if scalars else result
        yield from rows.partitions(PIECE_ROWS)
    finally:
        if not source.connection.invalidated:
            result.close()


def _python_text(
    source: StreamSource, names: tuple[str, ...], columns: _Kinds, fmt: str
) -> Iterator[str]:
    """The text in Python, from rows the database gives as text and numbers only."""
    # A time as the database's text: parsed once per distinct value here, not once per row by
    # SQLAlchemy or the driver. PostgreSQL's text of a time would be in the session's zone:
    # its driver's datetimes are as cheap.
    as_text = source.connection.dialect.name != "postgresql"
    fields = [
        (cast(column, String) if kind == "time" and as_text else column).label(name)
        for name, (column, kind) in columns.items()
    ]
    query = source.query.with_only_columns(*fields, maintain_column_froms=True)
    times = [index for index, (_column, kind) in enumerate(columns.values()) if kind == "time"]
    shown = _Shown(source.tz)

    def plain(piece: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
        """The rows with their times shown: column by column, in C loops."""
        if not times:
            return list(piece)
        values: list[Sequence[Any]] = list(zip(*piece, strict=True))
        for index in times:
            values[index] = shown.column(values[index])
        return list(zip(*values, strict=True))

    pieces = map(plain, _pieces(source, query))
    if fmt == "csv":
        return _csv_pieces(pieces, names)
    return _json_pieces(pieces, names)


class _Shown:
    """The ``isoformat`` in a zone of UTC times as the database gives them, as text (or as
    datetimes, naive or aware), computed once for each distinct value."""

    # Distinct times remembered: many pages of a long report (a sync writes its changes at
    # a handful of times).
    LIMIT: Final = 65536

    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz
        self.cache: dict[Any, str | None] = {None: None}

    def column(self, values: Sequence[Any]) -> list[str | None]:
        cache = self.cache
        new = set(values).difference(cache)
        if len(cache) + len(new) > self.LIMIT:
            cache.clear()
            cache[None] = None
            new = set(values)
            new.discard(None)
        for value in new:
            moment = dt.datetime.fromisoformat(value) if type(value) is str else value
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=dt.UTC)
            cache[value] = moment.astimezone(self.tz).isoformat()
        return list(map(cache.__getitem__, values))


# The values the csv module and the C JSON encoder write as etl.output does. Anything else
# (a BLOB in SQLite, which lets a column hold any type) goes through etl.output's own way.
_PLAIN: Final = frozenset({str, int, float, type(None)})


def _plain(piece: list[Sequence[Any]]) -> bool:
    return set(map(type, chain.from_iterable(piece))) <= _PLAIN


def _csv_pieces(pieces: Iterator[list[Sequence[Any]]], names: tuple[str, ...]) -> Iterator[str]:
    yield from csv_lines((), names)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for piece in pieces:
        plain = _plain(piece)
        joined = _csv_joined(piece) if plain and len(names) > 1 else None
        if joined is not None:
            yield joined
            continue
        buffer.seek(0)
        buffer.truncate()
        if plain:
            writer.writerows(piece)
        else:
            writer.writerows([csv_value(value) for value in row] for row in piece)
        yield buffer.getvalue()


# What makes the csv module quote a field (its delimiter, quote and line-end characters).
_QUOTED: Final = (",", '"', "\r", "\n")


def _csv_joined(piece: list[Sequence[Any]]) -> str | None:
    """The CSV of rows of plain values when no field needs quoting, else None.

    Such a field is written as it is: the csv module would only join the fields, but it
    looks at them a character at a time: a third of a month of changes on SQLite. A field
    alone on its line is not taken here: the module quotes it when it is empty.
    """
    columns = [
        ["" if value is None else str(value) for value in column]
        for column in zip(*piece, strict=True)
    ]
    for column in columns:
        text = "\0".join(column)
        if any(char in text for char in _QUOTED):
            return None
    return "".join([line + "\r\n" for line in map(",".join, zip(*columns, strict=True))])


# The C encoder writes the values of a piece in one call, one per line: a newline is never
# inside an encoded value. (``json_array``'s indent=2 would turn ``json`` to its pure-Python
# encoder.)
_VALUES: Final = json.JSONEncoder(ensure_ascii=False, separators=("\n", ": ")).encode


def _json_pieces(pieces: Iterator[list[Sequence[Any]]], names: tuple[str, ...]) -> Iterator[str]:
    return json_framed(_json_objects(pieces, names))


def _json_objects(pieces: Iterator[list[Sequence[Any]]], names: tuple[str, ...]) -> Iterator[str]:
    # json_object's text, with a placeholder for each value.
    keys = [json.dumps(name, ensure_ascii=False).replace("%", "%%") for name in names]
    template = "{\n    " + ",\n    ".join(f"{key}: %s" for key in keys) + "\n  }"
    templates: dict[int, str] = {}
    write = json_object(names)
    for piece in pieces:
        if _plain(piece):
            if len(piece) not in templates:
                templates[len(piece)] = ",\n  ".join([template] * len(piece))
            values = _VALUES(list(chain.from_iterable(piece)))[1:-1].split("\n")
            yield templates[len(piece)] % tuple(values)
        else:
            yield ",\n  ".join(map(write, piece))
