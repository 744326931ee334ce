"""Rendering rows for people and programs: aligned text tables and JSON.

Pure functions over lists of dicts; no I/O. Datetimes render as ISO 8601 UTC.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any


def plain(value: Any) -> Any:
    """A JSON-friendly form of a database value."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def to_json(rows: Sequence[Mapping[Any, Any]]) -> str:
    return json.dumps(
        [{k: plain(v) for k, v in row.items()} for row in rows], indent=2, ensure_ascii=False
    )


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
