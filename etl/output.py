"""Rendering rows for people and programs: aligned text tables, JSON and CSV.

Pure functions over rows (mappings), plus the atomic file helpers ``write_text_atomic`` and
``write_chunks_atomic`` (the only I/O here, for ``--output FILE`` and the metrics file).
Datetimes render as ISO 8601 with their offset (UTC unless a report converted them).

Each format has a streaming form (``table_lines``, ``csv_lines``, ``json_array``) that takes
any iterable of rows and yields text as the rows come, holding at most ``TABLE_SAMPLE_ROWS``
rows at a time; ``to_table`` and ``to_csv`` are the same text joined.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any, Final

# A streamed table takes its column widths from this many first rows; later rows are cut or
# padded to them, so that the table starts before the last row is read.
TABLE_SAMPLE_ROWS: Final = 1000
# Streamed text is handed to the output in blocks of about this many characters.
BLOCK_CHARS: Final = 64 * 1024


def plain(value: Any) -> Any:
    """A JSON-friendly form of a database value."""
    if value is None or type(value) is str:  # most cells of a long report: no isinstance chain
        return value
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def cell(value: Any, width: int = 40) -> str:
    if value is None:
        return ""
    if type(value) is str:  # most cells of a long report: no isinstance chain
        text = value
    elif isinstance(value, dt.datetime):
        text = value.strftime("%Y-%m-%d %H:%M:%S")
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, dict | list):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def to_table(
    rows: Sequence[Mapping[Any, Any]], columns: Sequence[str] | None = None, width: int = 40
) -> str:
    """Left-aligned columns separated by two spaces, with a header and a rule."""
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    return "\n".join(table_lines(rows, columns, width))


def table_lines(
    rows: Iterable[Mapping[Any, Any]],
    columns: Sequence[str],
    width: int = 40,
    sample: int = TABLE_SAMPLE_ROWS,
) -> Iterator[str]:
    """``to_table``'s lines (without line ends), as the rows come.

    The widths are those of the first ``sample`` rows (each cell at most ``width``); a later
    cell that is wider is cut to its column's width with "…". Up to ``sample`` rows, the
    text is exactly ``to_table``'s.
    """
    if not columns:
        yield "(no rows)"
        return
    remaining = iter(rows)
    first = [[cell(row.get(c), width) for c in columns] for row in islice(remaining, sample)]
    widths = [max([len(c)] + [len(line[i]) for line in first]) for i, c in enumerate(columns)]
    yield "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()
    yield "  ".join("-" * w for w in widths)
    for line in first:
        yield "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
    if not first:
        yield "(no rows)"
        return
    del first
    limits = [min(width, w) for w in widths]
    for row in remaining:
        cells = (cell(row.get(c), limit) for c, limit in zip(columns, limits, strict=True))
        yield "  ".join(v.ljust(w) for v, w in zip(cells, widths, strict=True)).rstrip()


def csv_value(value: Any) -> str:
    """One CSV field: ISO 8601 times, ``true``/``false``, lists joined with ``"; "``."""
    if value is None:
        return ""
    if type(value) is str:  # most cells of a long report: no isinstance chain
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "; ".join(str(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(plain(value))


def to_csv(rows: Iterable[Mapping[Any, Any]], columns: Sequence[str]) -> str:
    """RFC 4180 CSV with a header row (``\r\n`` line ends, fields quoted when needed)."""
    return "".join(csv_lines(rows, columns))


# Values the csv module writes as csv_value would: no call per cell for them.
_CSV_AS_IS: Final = frozenset({str, int, float, type(None)})
# Records written at a time: the csv module's writerows is C, a Python loop per row is not.
CSV_CHUNK_ROWS: Final = 1000


def csv_lines(rows: Iterable[Mapping[Any, Any]], columns: Sequence[str]) -> Iterator[str]:
    """``to_csv``'s records, the header first, in pieces of up to ``CSV_CHUNK_ROWS`` records
    (each with its line end)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    yield buffer.getvalue()
    as_is = _CSV_AS_IS
    cells = _cells(columns)
    rows = iter(rows)
    while chunk := list(islice(rows, CSV_CHUNK_ROWS)):
        buffer.seek(0)
        buffer.truncate()
        writer.writerows(
            [v if type(v) in as_is else csv_value(v) for v in cells(row)] for row in chunk
        )
        yield buffer.getvalue()


def _cells(columns: Sequence[str]) -> Callable[[Mapping[Any, Any]], Sequence[Any]]:
    """A row's values in ``columns`` order (None for a missing key), taken in one C call
    when the row has them all."""
    if not columns:
        return lambda _row: ()
    take = itemgetter(*columns)
    if len(columns) == 1:
        return lambda row: (row.get(columns[0]),)

    def cells(row: Mapping[Any, Any]) -> Sequence[Any]:
        try:
            values: Sequence[Any] = take(row)
        except KeyError:
            return [row.get(c) for c in columns]
        return values

    return cells


def json_array(rows: Iterable[Mapping[Any, Any]], columns: Sequence[str]) -> Iterator[str]:
    """One JSON array of row objects keyed by ``columns``, as the rows come: the text of
    ``json.dumps(list_of_rows, indent=2, ensure_ascii=False)`` and a final newline."""
    write = json_object(columns)
    return json_framed(write(map(row.get, columns)) for row in rows)


def json_object(columns: Sequence[str]) -> Callable[[Iterable[Any]], str]:
    """A row's values, in ``columns`` order, as the object ``json_array`` writes.

    Each object is written key by key: ``indent`` turns ``json`` to its pure-Python encoder,
    several times slower than encoding each value on its own.
    """
    if not columns:
        return lambda _values: "{}"
    keys = [f"{_ENCODE(column)}: " for column in columns]

    def write(values: Iterable[Any]) -> str:
        items = ",\n    ".join([key + _json_value(v) for key, v in zip(keys, values, strict=True)])
        return "{\n    " + items + "\n  }"

    return write


def json_framed(objects: Iterable[str]) -> Iterator[str]:
    """The JSON array around ``objects``: pieces of text of one or more of its objects each
    (joined by ``",\\n  "``), as ``json_object`` writes them."""
    opened = False
    for text in objects:
        yield ("[\n  " if not opened else ",\n  ") + text
        opened = True
    yield "\n]\n" if opened else "[]\n"


_ENCODE: Final = json.JSONEncoder(ensure_ascii=False).encode


def _json_value(value: Any) -> str:
    """``value`` as ``json.dumps(plain(value), indent=2, ensure_ascii=False)`` writes it inside
    an object inside an array; the common types first, without ``plain``'s checks."""
    kind = type(value)
    if kind is str:
        return _ENCODE(value)
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    if kind is dt.datetime:
        return _ENCODE(value.isoformat())
    value = plain(value)
    if isinstance(value, list | tuple | dict):
        # json.dumps escapes newlines inside strings: every newline here is indentation.
        return json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n    ")
    return _ENCODE(value)


def blocks(chunks: Iterable[str], size: int = BLOCK_CHARS) -> Iterator[str]:
    """``chunks`` joined into pieces of about ``size`` characters: fewer, larger writes."""
    pending: list[str] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        if held >= size:
            yield "".join(pending)
            pending.clear()
            held = 0
    if pending:
        yield "".join(pending)


def write_text_atomic(path: Path, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old file or the whole new one.

    A temporary file in the same folder is written, flushed to disk, then renamed over
    ``path``; on failure it is removed and ``path`` is untouched. The temporary name starts
    with a dot and ends in ``.tmp``, so collectors that read ``*.prom`` never see it. New
    files get ``mode`` if given, else the usual permissions (0666 less the umask).
    """
    write_chunks_atomic(path, (text,), mode=mode)


def write_chunks_atomic(path: Path, chunks: Iterable[str], *, mode: int | None = None) -> None:
    """``write_text_atomic`` for text that comes in pieces: each is written as it comes.

    An exception raised while ``chunks`` is being read (a database gone mid-report) removes
    the temporary file and leaves ``path`` as it was, as a failed write does.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
