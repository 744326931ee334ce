"""Rendering reports: text table, CSV, JSON and self-contained HTML pages with SVG charts.

Boundary: turns ``etl.reports`` objects into text; no SQL, no I/O, nothing of the command
line (click, option names, exit codes). The HTML is one file with no external assets (inline
CSS, inline SVG, no script; a Content-Security-Policy forbids loading anything), and every
piece of data in it is escaped, so that a userid or a chat name such as ``<script>`` is shown
as text.

``render_chunks`` yields the table, CSV and JSON of a report as its rows come (a
``ReportStream`` is read once, row by row); ``render`` is the same text joined. An audit
above ``etl.reports.AUDIT_LIST_LIMIT`` changes is rendered as its summary, with the command
that exports every change if the caller gives one.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

from etl import __version__
from etl.output import cell, csv_lines, json_array, table_lines
from etl.reports import AuditReport, MembershipSeries, Report, ReportStream, SeriesPoint

FORMATS: Final = ("table", "csv", "json", "html")


def render(report: Report, fmt: str) -> str:
    """``report`` in one of ``FORMATS``; JSON is an array of row objects keyed by column."""
    if fmt == "html":
        return render_html(report)
    return "".join(render_chunks(report, fmt))


def render_chunks(report: Report | ReportStream, fmt: str) -> Iterator[str]:
    """``report`` as table, CSV or JSON, in pieces as its rows come (one per row, about)."""
    if fmt == "json":
        return json_array(report.rows, report.columns)
    if fmt == "csv":
        return csv_lines(report.rows, report.columns)
    if fmt == "table":
        return _table_chunks(report)
    raise ValueError(f"cannot stream format {fmt!r}")


def render_table(report: Report) -> str:
    return "".join(_table_chunks(report))


def _table_chunks(report: Report | ReportStream) -> Iterator[str]:
    yield f"{report.title}\n(times in {report.timezone})\n\n"
    rows = ({c: _listed(row.get(c)) for c in report.columns} for row in report.rows)
    for line in table_lines(rows, report.columns, width=60):
        yield line + "\n"
    for note in report.notes:
        yield f"note: {note}\n"


def _listed(value: Any) -> Any:
    return "; ".join(str(v) for v in value) if isinstance(value, list | tuple) else value


# -- HTML ---------------------------------------------------------------------------------------

CSS: Final = """
:root { color-scheme: light; --ink: #1f2933; --muted: #616e7c; --line: #d9dee4;
  --accent: #1c64b8; --good: #1e7b34; --bad: #b42318; --warn: #a15c07; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans",
  "PingFang SC", "Microsoft YaHei", sans-serif; color: var(--ink); margin: 0 auto;
  max-width: 1180px; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid var(--line);
  padding-bottom: 4px; }
h3 { font-size: 14px; margin: 16px 0 4px; }
.meta { color: var(--muted); margin: 0; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
.scroll { overflow-x: auto; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; overflow-wrap: break-word; }
td.wide { min-width: 11em; }
th { background: #f3f5f7; font-weight: 600; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
time { white-space: nowrap; font-variant-numeric: tabular-nums; }
.empty { color: var(--muted); font-style: italic; }
.tag { display: inline-block; padding: 0 6px; border-radius: 9px; font-size: 12px;
  background: #eef2f6; margin: 1px 2px 1px 0; white-space: nowrap; }
.risk { background: #fdecea; color: var(--bad); }
.change-joined td.change { color: var(--good); font-weight: 600; }
.change-left td.change { color: var(--bad); font-weight: 600; }
.change-dismissed td.change, .change-owner_changed td.change { color: var(--warn);
  font-weight: 600; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr));
  gap: 12px 20px; }
figure { margin: 0; }
figcaption { font-weight: 600; margin-bottom: 2px; overflow-wrap: anywhere; }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart text { font: 11px system-ui, sans-serif; fill: var(--muted); }
svg.chart .axis { stroke: #9aa5b1; stroke-width: 1; }
svg.chart .grid { stroke: var(--line); stroke-width: 1; }
svg.chart .line { fill: none; stroke: var(--accent); stroke-width: 2; }
svg.chart .dot { fill: var(--accent); }
svg.chart .dot.changed { fill: #fff; stroke: var(--accent); stroke-width: 2; }
svg.chart .dismissed { stroke: var(--bad); stroke-dasharray: 4 3; }
svg.chart text.dismissed { fill: var(--bad); stroke: none; }
ul.notes { color: var(--muted); padding-left: 18px; }
footer { color: var(--muted); font-size: 12px; margin-top: 32px; }
@media print { body { max-width: none; padding: 0; } th { position: static; }
  .charts { grid-template-columns: 1fr 1fr; } }
"""

TIMES_NOTE: Final = (
    "The time of a change is DingTalk's for a change received as a group event (source event, "
    "with the operator who made it), else when a sync saw it (source poll: it happened after "
    "the sync before)."
)

# No script, no fetch of any kind: the file works offline and cannot run injected code.
CSP: Final = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
NUMERIC: Final = frozenset(
    {
        "member_count",
        "joins",
        "leaves",
        "other_changes",
        "run_id",
        "last_ok_run_id",
        "last_run_id",
        "failures_since_ok",
        "latest_error_run_id",
        "latest_errcode",
        "changes",
    }
)


WIDE: Final = frozenset({"latest_error", "risks"})
NUM: Final = ' class="num"'


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, subtitle: str, sections: Iterable[str]) -> str:
    body = "\n".join(sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="dingtalk-etl {esc(__version__)}">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f'<header><h1>{esc(title)}</h1>\n<p class="meta">{subtitle}</p></header>\n'
        f"{body}\n"
        f"<footer>dingtalk-etl {esc(__version__)}. {esc(TIMES_NOTE)}</footer>\n"
        "</body>\n</html>\n"
    )


def _meta(*parts: str) -> str:
    return " · ".join(esc(part) for part in parts if part)


def _time(value: dt.datetime) -> str:
    shown = value.strftime("%Y-%m-%d %H:%M:%S")
    return f'<time datetime="{esc(value.isoformat())}">{esc(shown)}</time>'


def html_cell(column: str, value: Any) -> str:
    """One ``<td>``: times as ``<time>``, risks as tags, everything escaped."""
    classes = []
    if column in NUMERIC:
        classes.append("num")
    if column == "change":
        classes.append("change")
    if column in WIDE:
        classes.append("wide")
    attr = f' class="{" ".join(classes)}"' if classes else ""
    if value is None or value == "" or value == []:
        content = ""
    elif isinstance(value, dt.datetime):
        content = _time(value)
    elif isinstance(value, list | tuple):
        kind = "tag risk" if column == "risks" else "tag"
        content = "".join(f'<span class="{kind}">{esc(item)}</span>' for item in value)
    else:
        content = esc(cell(value, width=10_000))
    return f"<td{attr}>{content}</td>"


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{esc(empty)}</p>'
    head = "".join(
        f'<th{NUM if c in NUMERIC else ""} scope="col" title="{esc(c)}">'
        f"{esc(c.replace('_', ' '))}</th>"
        for c in columns
    )
    body = []
    for row in rows:
        change = row.get("change")
        attr = f' class="change-{esc(change)}"' if isinstance(change, str) else ""
        cells = "".join(html_cell(c, row.get(c)) for c in columns)
        body.append(f"<tr{attr}>{cells}</tr>")
    return (
        f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(body)
        + "\n</tbody>\n</table></div>"
    )


def _notes(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{esc(note)}</li>" for note in notes)
    return f'<section id="notes"><h2>Notes</h2><ul class="notes">{items}</ul></section>'


def _charts(series: Sequence[MembershipSeries]) -> str:
    if not series:
        return ""
    figures = "\n".join(
        f"<figure><figcaption>{esc(s.chat_name or s.chatid)} "
        f'<span class="meta">({esc(s.chatid)})</span></figcaption>{svg_chart(s)}</figure>'
        for s in series
    )
    return (
        '<section id="charts"><h2>Membership over time</h2>'
        '<p class="meta">Member count after each successful sync and each group event; open '
        f'dots mark joins or leaves.</p>\n<div class="charts">\n{figures}\n</div></section>'
    )


def render_html(report: Report) -> str:
    """A page for any report: its title, the table, charts (if any) and notes."""
    sections = [
        f'<section id="report"><h2>{esc(report.name)}</h2>'
        f"{html_table(report.rows, report.columns, 'No rows.')}</section>",
        _charts(report.series),
        _notes(report.notes),
    ]
    return _page(report.title, _meta(f"Times in {report.timezone}"), sections)


def render_audit(audit: AuditReport, export_command: str | None = None) -> str:
    """The audit file: chat summary, membership charts, changes in the window, notes.

    A ``summarised`` audit adds the chats with the most changes and the changes per day, and
    says how many changes it does not list; ``export_command``, if given, is the command
    that writes them all (shown as given, escaped).
    """
    generated = audit.generated_at.strftime("%Y-%m-%d %H:%M:%S")
    subtitle = _meta(
        f"Changes {audit.window}",
        f"times in {audit.timezone}",
        f"generated {generated}",
    )
    changes, summary = audit.changes, audit.summary
    no_chats = "No chat changed in this window."
    more = _more_changes(audit, export_command) if audit.summarised else ""
    sections = [
        f'<section id="summary"><h2>{esc(summary.title)}</h2>'
        f"{html_table(summary.rows, summary.columns, no_chats)}</section>",
        _charts(audit.series),
        f'<section id="changes"><h2>{esc(changes.title)}</h2>{more}'
        f"{html_table(changes.rows, changes.columns, 'No changes in this window.')}</section>",
        _notes(audit.notes),
    ]
    if audit.summarised:
        sections[1:1] = [
            _report_section("top-chats", audit.top),
            _report_section("days", audit.days),
        ]
        sections.insert(0, _overview(audit, more))
    return _page(audit.title, subtitle, sections)


def _overview(audit: AuditReport, more: str) -> str:
    top = audit.top.rows if audit.top is not None else []
    text = (
        f"{audit.total_changes:,} changes in this window, more than a page can list: this "
        f"file counts them per chat ({len(audit.summary.rows):,} chats), shows the "
        f"{len(top)} chats with the most changes and their member count, counts the changes "
        f"per day, and lists the first {len(audit.changes.rows):,}."
    )
    return f'<section id="overview"><p>{esc(text)}</p>{more}</section>'


def _more_changes(audit: AuditReport, export_command: str | None) -> str:
    listed = len(audit.changes.rows)
    more = audit.total_changes - listed
    text = (
        f"Listed: the first {listed:,} of {audit.total_changes:,} changes, in the order they "
        f"occurred; {more:,} more {'is' if more == 1 else 'are'} not listed here."
    )
    if export_command is None:
        return f'<p class="more">{esc(text)}</p>'
    return f'<p class="more">{esc(text)} All of them as CSV: <code>{esc(export_command)}</code></p>'


def _report_section(anchor: str, report: Report | None) -> str:
    if report is None:
        return ""
    return (
        f'<section id="{anchor}"><h2>{esc(report.title)}</h2>'
        f"{html_table(report.rows, report.columns, 'None.')}</section>"
    )


# -- SVG ----------------------------------------------------------------------------------------

WIDTH, HEIGHT = 560, 210
LEFT, RIGHT, TOP, BOTTOM = 44, 14, 14, 34


def svg_chart(series: MembershipSeries) -> str:
    """A step chart of member count by sync; each point has a tooltip (``<title>``)."""
    label = f"Member count of {series.chat_name or series.chatid} by sync and event"
    open_tag = (
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{esc(label)}"><title>{esc(label)}</title>'
    )
    points = series.points
    if not points:
        return (
            f'{open_tag}<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">'
            "no successful sync in this window</text></svg>"
        )
    first, last = points[0].at, points[-1].at
    span = (last - first).total_seconds()
    y_min, y_max, ticks = _y_range(min(p.count for p in points), max(p.count for p in points))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    stamp = "%Y-%m-%d %H:%M" if span >= 86400 else "%Y-%m-%d %H:%M:%S"

    def x(at: dt.datetime) -> float:
        if span <= 0:
            return LEFT + plot_w / 2
        return LEFT + (at - first).total_seconds() / span * plot_w

    def y(count: int) -> float:
        return TOP + plot_h - (count - y_min) / (y_max - y_min) * plot_h

    parts = [open_tag]
    for tick in ticks:
        ty = y(tick)
        parts.append(
            f'<line class="grid" x1="{LEFT}" y1="{ty:.1f}" x2="{WIDTH - RIGHT}" y2="{ty:.1f}"/>'
            f'<text x="{LEFT - 6}" y="{ty + 4:.1f}" text-anchor="end">{tick}</text>'
        )
    base = TOP + plot_h
    parts.append(f'<line class="axis" x1="{LEFT}" y1="{base}" x2="{WIDTH - RIGHT}" y2="{base}"/>')
    parts.append(f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base}"/>')
    labels = [(first, "middle")] if span <= 0 else [(first, "start"), (last, "end")]
    for at, anchor in labels:
        parts.append(
            f'<text x="{x(at):.1f}" y="{HEIGHT - 12}" text-anchor="{anchor}">'
            f"{esc(at.strftime(stamp))}</text>"
        )
    path = [f"M{x(points[0].at):.1f},{y(points[0].count):.1f}"]
    for point in points[1:]:
        path.append(f"H{x(point.at):.1f}V{y(point.count):.1f}")
    parts.append(f'<path class="line" d="{"".join(path)}"/>')
    for point in points:
        if "dismissed" in point.label:
            px = x(point.at)
            parts.append(
                f'<line class="dismissed" x1="{px:.1f}" y1="{TOP}" x2="{px:.1f}" y2="{base}"/>'
                f'<text class="dismissed" x="{px - 4:.1f}" y="{TOP + 10}" text-anchor="end">'
                "dismissed</text>"
            )
    for point in points:
        kind = "dot changed" if point.joined or point.left else "dot"
        parts.append(
            f'<circle class="{kind}" cx="{x(point.at):.1f}" cy="{y(point.count):.1f}" r="3.5">'
            f"<title>{esc(_point_text(point))}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _point_text(point: SeriesPoint) -> str:
    text = f"{point.at.strftime('%Y-%m-%d %H:%M:%S')}: {point.count} members"
    if point.joined or point.left:
        text += f" (+{point.joined} / -{point.left})"
    if point.run_id is not None:
        text += f", run {point.run_id}"
    if point.label:
        text += f", {point.label}"
    return text


def _y_range(low: int, high: int) -> tuple[int, int, list[int]]:
    """Axis bounds and ticks: from 0 when that keeps changes visible, else around the data."""
    step = _nice(max(high, 1) / 4)
    if low > 0 and high - low < high / 4:
        step = _nice(max(high - low, 1) / 2)
    bottom = 0 if low - step < 0 or step >= high / 4 else (low - 1) // step * step
    top = (high // step + 1) * step
    return bottom, top, list(range(bottom, top + 1, step))


def _nice(raw: float) -> int:
    """1, 2, 5, 10, 20, 50 ... at or above ``raw``."""
    magnitude = 1
    while True:
        for factor in (1, 2, 5):
            if factor * magnitude >= raw:
                return factor * magnitude
        magnitude *= 10
