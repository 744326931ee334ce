"""Rendering rows for people and programs: aligned text tables, JSON and CSV.

Pure functions over lists of dicts, plus ``write_text_atomic`` (the one I/O helper, for
``--output FILE`` and the metrics file). Datetimes render as ISO 8601 with their offset (UTC
unless a report converted them).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plain(value: Any) -> Any:
    """A JSON-friendly form of a database value."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def cell(value: Any, width: int = 40) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
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
    if not columns:
        return "(no rows)"
    body = [[cell(row.get(c), width) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(line[i]) for line in body]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in body
    )
    if not rows:
        lines.append("(no rows)")
    return "\n".join(lines)


def csv_value(value: Any) -> str:
    """One CSV field: ISO 8601 times, ``true``/``false``, lists joined with ``"; "``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "; ".join(str(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(plain(value))


def to_csv(rows: Sequence[Mapping[Any, Any]], columns: Sequence[str]) -> str:
    """RFC 4180 CSV with a header row (``\r\n`` line ends, fields quoted when needed)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_value(row.get(c)) for c in columns])
    return buffer.getvalue()


def write_text_atomic(path: Path, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old file or the whole new one.

    A temporary file in the same folder is written, flushed to disk, then renamed over
    ``path``; on failure it is removed and ``path`` is untouched. The temporary name starts
    with a dot and ends in ``.tmp``, so collectors that read ``*.prom`` never see it. New
    files get ``mode`` if given, else the usual permissions (0666 less the umask).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
