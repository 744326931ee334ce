"""The streaming forms of the output formats (etl/output.py): the same text as the whole-list
forms, produced row by row, and a file that is replaced whole or not at all."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.output import (
    CSV_CHUNK_ROWS,
    blocks,
    cell,
    csv_lines,
    json_array,
    plain,
    table_lines,
    to_csv,
    to_table,
    write_chunks_atomic,
)

COLUMNS = ("a", "b", "ç")
texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=60)
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    texts,
    st.datetimes(timezones=st.just(dt.UTC)),
    st.lists(texts, max_size=3),
    st.dictionaries(texts, texts, max_size=2),
)
rows = st.lists(st.fixed_dictionaries({c: values for c in COLUMNS}), max_size=8)


@settings(max_examples=300, deadline=None)
@given(rows)
def test_json_array_is_the_text_of_json_dumps(table: list[dict[str, Any]]) -> None:
    streamed = "".join(json_array(iter(table), COLUMNS))

    whole = [{c: plain(row[c]) for c in COLUMNS} for row in table]
    assert streamed == json.dumps(whole, indent=2, ensure_ascii=False) + "\n"
    assert json.loads(streamed) == json.loads(json.dumps(whole))


def test_json_array_of_no_columns_and_no_rows() -> None:
    assert "".join(json_array([], COLUMNS)) == "[]\n"
    assert "".join(json_array([{}, {}], ())) == json.dumps([{}, {}], indent=2) + "\n"


def reference_table(
    rows: Sequence[Mapping[Any, Any]], columns: Sequence[str], width: int = 40
) -> str:
    """``to_table`` as it was before it streamed: widths over every row."""
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


@settings(max_examples=200, deadline=None)
@given(rows, st.sampled_from([10, 40, 60]))
def test_a_table_within_its_sample_is_the_table_of_every_row(
    table: list[dict[str, Any]], width: int
) -> None:
    assert to_table(table, COLUMNS, width) == reference_table(table, COLUMNS, width)
    assert "\n".join(table_lines(iter(table), COLUMNS, width)) == reference_table(
        table, COLUMNS, width
    )


def test_rows_after_the_sample_keep_its_widths() -> None:
    first = [{"id": "1", "name": "short", "n": 7}, {"id": "2", "name": "tiny", "n": 12}]
    later = [{"id": "333", "name": "a much longer name", "n": 123456}]

    lines = list(table_lines(iter(first + later), ("id", "name", "n"), sample=2))

    assert lines == [
        "id  name   n",
        "--  -----  --",
        "1   short  7",
        "2   tiny   12",
        "3…  a mu…  1…",
    ]


def test_a_table_starts_before_its_last_row() -> None:
    """The header and the first rows come out while later rows are not read yet."""
    read: list[int] = []

    def source() -> Iterator[dict[str, int]]:
        for n in range(10_000):
            read.append(n)
            yield {"n": n}

    lines = table_lines(source(), ("n",), sample=100)
    assert [next(lines) for _ in range(3)] == ["n", "--", "0"]
    assert len(read) == 100


def test_csv_lines_are_to_csv_in_pieces_of_records() -> None:
    table = [{"a": 'x,"y"', "b": "line\nbreak", "ç": ["p", "q"]}, {"a": None, "b": True}]
    pieces = list(csv_lines(iter(table), COLUMNS))

    assert pieces == ["a,b,ç\r\n", '"x,""y""","line\nbreak",p; q\r\n,true,\r\n']
    assert "".join(pieces) == to_csv(table, COLUMNS)


def test_csv_lines_hold_at_most_a_chunk_of_records_each() -> None:
    table = [{"a": str(n)} for n in range(2 * CSV_CHUNK_ROWS + 1)]
    pieces = list(csv_lines(iter(table), ["a"]))

    assert [piece.count("\r\n") for piece in pieces] == [1, CSV_CHUNK_ROWS, CSV_CHUNK_ROWS, 1]
    assert "".join(pieces) == to_csv(table, ["a"])


def test_blocks_join_pieces_without_changing_them() -> None:
    pieces = [f"{n:05d}\n" for n in range(10_000)]
    joined = list(blocks(pieces, size=1000))

    assert "".join(joined) == "".join(pieces)
    assert all(1000 <= len(block) < 1006 for block in joined[:-1])


def test_chunks_are_written_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "report.csv"
    path.write_text("old report", encoding="utf-8")

    def failing() -> Iterator[str]:
        yield "x" * 100_000  # more than a write buffer: some of it reached the disk
        raise ConnectionError("database gone")

    with pytest.raises(ConnectionError):
        write_chunks_atomic(path, failing())
    assert path.read_text(encoding="utf-8") == "old report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.csv"]

    write_chunks_atomic(path, (f"{n}\n" for n in range(3)))
    assert path.read_text(encoding="utf-8") == "0\n1\n2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.csv"]
