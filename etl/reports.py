"""Audit reports: the SQL that answers membership questions, and the shaping of its rows.

Boundary: reads the synced tables (never writes), returns ``Report`` and ``AuditReport``
objects whose times are shown in the report time zone, and raises domain errors. Knows SQL
(SQLAlchemy Core, portable across SQLite, PostgreSQL and MySQL/MariaDB) and time zones; knows
nothing of the command line (click, option names, exit codes) or of output formats
(``etl.output`` and ``etl.report_html`` render a ``Report``).

Every answer is reconstructed from ``chat_events``, the append-only log: the membership of a
chat at time T is the set of users whose latest member event by (``occurred_at``, ``id``) at
or before T is ``member_joined`` (baseline members included). ``occurred_at`` is the time of
a change: DingTalk's time for a row of a group event (``source = 'event'``, with the
``operator_userid`` who made it), the time of the read for a row a sync wrote (``source =
'poll'``: the change happened at or before that sync, after the sync before).

A question the data cannot answer (an unknown chat or user, a time before a chat's first
sync) raises ``etl.errors.NoAnswer``, which carries what was asked.

Scale: the reports bounded by the organisation (members of one chat, one user's chats, the
chat list, sync health) are read whole. The changes report grows with the history, so
``changes_stream`` hands its rows over as a server-side cursor reads them (``STREAM_ROWS`` per
round trip) inside one consistent snapshot, with the query they come from (``StreamSource``:
``etl.export`` writes their CSV and JSON fast), and ``audit`` lists at most
``AUDIT_LIST_LIMIT`` changes: above that it is a summary counted by the database (per chat,
per day, the chats that changed most), never a Python loop over every change.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Final
from zoneinfo import ZoneInfo

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    and_,
    case,
    cast,
    extract,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    union,
)
from sqlalchemy.sql.elements import ColumnElement

from etl.db import database_errors, utcnow
from etl.errors import NoAnswer
from etl.normalize import STATUS_DISMISSED, STATUS_NORMAL
from etl.schema import chat_events, chat_members, chats, sync_run_items, sync_runs

MEMBER_EVENTS: Final = ("member_joined", "member_left")
STATUS_NAMES: Final = {STATUS_NORMAL: "normal", STATUS_DISMISSED: "dismissed"}
STATUS_CODES: Final = {name: code for code, name in STATUS_NAMES.items()}
# Open settings an auditor wants to see, as (column, risky value, description).
RISKS: Final = (
    ("validation_type", 0, "no join verification"),
    ("searchable", 1, "searchable"),
    ("mention_all_authority", 0, "anyone may @all"),
    ("management_type", 0, "everyone may manage"),
)
# The kinds of change the ``changes`` report shows, by event type and field.
CHANGE_KINDS: Final = (
    "joined",
    "left",
    "dismissed",
    "restored",
    "owner_changed",
    "renamed",
    "setting_changed",
)
# The audit charts the first chats of its summary only; ``AuditReport.uncharted`` counts the rest.
MAX_CHARTS: Final = 50
_MAX_POINTS: Final = 400
# Rows a streamed report fetches per round trip to the database: its memory, whatever the
# number of rows.
STREAM_ROWS: Final = 1000
# How long MySQL/MariaDB waits for a slow reader of a streamed report (a pager) before it
# drops the stream.
STREAM_WAIT_SECONDS: Final = 3600
# The most changes an audit lists, about what a person reads through: above it the audit is a
# summary (per chat, per day, the ``TOP_CHATS`` that changed most, charted) that lists the
# first ``AUDIT_LIST_LIMIT`` changes and says how many more there are.
AUDIT_LIST_LIMIT: Final = 2000
TOP_CHATS: Final = 10

BASELINE_NOTE: Final = (
    "joined_at: when the membership began, DingTalk's time for a join received as an event, "
    "else when a sync first saw it; baseline members (present at the chat's first sync) may "
    "have joined earlier."
)
LEFT_NOTE: Final = (
    "left_at: when the membership ended, DingTalk's time for a leave received as an event, "
    "else when a sync first saw the member gone."
)
CHANGES_NOTE: Final = (
    "occurred_at: when the change happened. source 'event': DingTalk's time, and "
    "operator_userid is who made the change; source 'poll': when a sync saw it (it happened "
    "after the chat's previous sync; no operator is known). observed_at: when it was recorded "
    "(the sync's read, or the event's receipt); run_id: the sync that saw it (none for events)."
)
# The audit's chat summary: ``chat_list`` columns with the changes counted in the window.
SUMMARY_COLUMNS: Final = (
    "chatid",
    "name",
    "status",
    "owner_userid",
    "member_count",
    "joins",
    "leaves",
    "other_changes",
    "last_synced_at",
    "dismissed_at",
    "risks",
)


# -- timestamps ---------------------------------------------------------------------------------

_MONTH = re.compile(r"(\d{4})-(\d{2})")
_DATE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")
EXAMPLES: Final = (
    "e.g. 2026-06-30, 2026-06, 2026-06-30T18:00, 2026-06-30T10:00:00Z, 2026-06-30T18:00+08:00"
)


@dataclass(frozen=True)
class Timestamp:
    """A report time as given: a month, a day or an instant.

    A month or a day is a span: ``start`` is its first instant, ``end`` its last microsecond,
    in the report time zone. An instant without an offset is read in the report time zone.
    """

    text: str
    start_naive: dt.datetime
    end_naive: dt.datetime
    tzinfo: dt.tzinfo | None

    def start(self, tz: dt.tzinfo) -> dt.datetime:
        return self._utc(self.start_naive, tz)

    def end(self, tz: dt.tzinfo) -> dt.datetime:
        return self._utc(self.end_naive, tz)

    def _utc(self, naive: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
        try:
            return naive.replace(tzinfo=self.tzinfo or tz).astimezone(dt.UTC)
        except OverflowError:
            raise ValueError(f"{self.text!r} is out of range") from None


def parse_timestamp(text: str) -> Timestamp:
    """Parse an ISO 8601 month, date or date-time; raise ``ValueError`` with an example."""
    value = text.strip()
    try:
        if match := _MONTH.fullmatch(value):
            year, month = int(match[1]), int(match[2])
            start = dt.datetime(year, month, 1)
            last_month = (year, month) == (9999, 12)
            following = None if last_month else dt.datetime(year + month // 12, month % 12 + 1, 1)
            return Timestamp(text, start, _last_microsecond(start, following), None)
        if match := _DATE.fullmatch(value):
            start = dt.datetime(int(match[1]), int(match[2]), int(match[3]))
            following = start + dt.timedelta(days=1) if start.date() < dt.date.max else None
            return Timestamp(text, start, _last_microsecond(start, following), None)
        instant = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 date or time ({EXAMPLES})") from None
    naive = instant.replace(tzinfo=None)
    return Timestamp(text, naive, naive, instant.tzinfo)


def _last_microsecond(start: dt.datetime, following: dt.datetime | None) -> dt.datetime:
    """The last instant before ``following``; None: the span ends with the calendar."""
    return dt.datetime.max if following is None else following - dt.timedelta(microseconds=1)


def check_window(since: dt.datetime | None, until: dt.datetime | None) -> None:
    """A window that ends before it starts is the caller's mistake, not an empty answer."""
    if since is not None and until is not None and since > until:
        raise ValueError(f"the window starts at {since} after it ends at {until}")


# -- reports ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesPoint:
    """Member count of a chat right after one successful sync (``run_id``), one group event
    (``run_id`` None, ``label`` "event ...") or at a window's start."""

    at: dt.datetime
    count: int
    run_id: int | None
    joined: int = 0
    left: int = 0
    label: str = ""


@dataclass(frozen=True)
class MembershipSeries:
    chatid: str
    chat_name: str | None
    points: tuple[SeriesPoint, ...]
    dismissed_at: dt.datetime | None = None


@dataclass(frozen=True)
class Report:
    """One answer: rows with named columns, times already in the report time zone."""

    name: str
    title: str
    columns: tuple[str, ...]
    rows: list[dict[str, Any]]
    timezone: str
    notes: list[str] = field(default_factory=list)
    series: list[MembershipSeries] = field(default_factory=list)


@dataclass(frozen=True)
class ReportStream:
    """A report whose rows come from an open cursor, one at a time: read them once, inside
    the ``with`` block that gave the stream."""

    name: str
    title: str
    columns: tuple[str, ...]
    rows: Iterator[dict[str, Any]]
    timezone: str
    notes: list[str] = field(default_factory=list)
    source: StreamSource | None = None


@dataclass(frozen=True)
class StreamSource:
    """Where a stream's rows come from, for a writer that reads them its own way
    (``etl.export``): the query (its columns named as the report's, times in UTC), read
    on ``connection`` inside the stream's snapshot, and the report time zone. Reading it
    instead of ``rows`` leaves ``rows`` unread: they are read only when iterated."""

    connection: Connection
    query: Any
    tz: ZoneInfo


@dataclass(frozen=True)
class AuditReport:
    """The HTML audit: chat summary, changes in the window, member count by sync per chat.

    ``series`` charts the first ``MAX_CHARTS`` chats of the summary; ``uncharted`` counts the
    chats left without a chart. ``total_changes`` counts the changes in the window; when they
    are more than ``AUDIT_LIST_LIMIT`` the audit is ``summarised``: ``changes`` holds the first
    of them only, ``top`` the chats with the most changes (the ones charted) and ``days`` the
    changes per day in the report time zone.
    """

    title: str
    window: str
    timezone: str
    generated_at: dt.datetime
    summary: Report
    changes: Report
    series: list[MembershipSeries]
    notes: list[str] = field(default_factory=list)
    uncharted: int = 0
    total_changes: int = 0
    summarised: bool = False
    top: Report | None = None
    days: Report | None = None


# A report's columns in order, each with how its cell is computed from a query row: the one
# place where a report names its columns.
_Cells = dict[str, Callable[[Any], Any]]


def _shape(rows: Sequence[Any], cells: _Cells) -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    """The columns of a report and its rows, one per query row."""
    return tuple(cells), [{column: cell(row) for column, cell in cells.items()} for row in rows]


class _Clock:
    """Shows UTC datetimes in the report zone."""

    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz

    def __call__(self, value: dt.datetime | None) -> dt.datetime | None:
        return None if value is None else value.astimezone(self.tz)

    def text(self, value: dt.datetime) -> str:
        local = value.astimezone(self.tz)
        shown = local.strftime("%Y-%m-%d %H:%M:%S")
        if local.microsecond:
            shown += f".{local.microsecond:06d}"
        return f"{shown} {self.tz.key}"


def members(
    engine: Engine,
    chat: str,
    *,
    as_of: dt.datetime | None,
    tz: ZoneInfo,
    with_series: bool = False,
) -> Report:
    """Who was in ``chat`` at ``as_of`` (UTC; None: now), with joined and left times."""
    clock = _Clock(tz)
    with database_errors("reading membership"), engine.connect() as conn:
        info = _resolve_chat(conn, chat)
        chatid = info["chatid"]
        at = as_of or utcnow()
        if at < info["first_seen_at"]:
            raise NoAnswer(
                f"chat {chatid!r} ({info['name']}) was first synced at "
                f"{clock.text(info['first_seen_at'])}: its membership at {clock.text(at)} is "
                "unknown (nothing is recorded before a chat's first sync)",
                chat=chatid,
                as_of=at,
                first_synced_at=info["first_seen_at"],
            )
        rows = conn.execute(members_at_query(chatid, at)).mappings().all()
        owner = _value_at(conn, chatid, "owner_userid", at, info["owner_userid"])
        status = _value_at(conn, chatid, "status", at, str(info["status"]))
        series = [_series(conn, info, None, at, clock)] if with_series else []
    columns, shaped = _shape(
        rows,
        {
            "userid": itemgetter("userid"),
            "joined_at": lambda row: clock(row["joined_at"]),
            "baseline": lambda row: bool(row["is_baseline"]),
            "left_at": lambda row: clock(row["left_at"]),
            "is_owner": lambda row: row["userid"] == owner,
        },
    )
    when = "now" if as_of is None else f"as of {clock.text(as_of)}"
    notes = [BASELINE_NOTE]
    if status == str(STATUS_DISMISSED):
        dismissed = info["dismissed_at"]
        since = f" (first seen dismissed at {clock.text(dismissed)})" if dismissed else ""
        notes.insert(0, f"the chat was dismissed at that time{since}: membership as last observed")
    if any(row["left_at"] is not None for row in shaped):
        notes.append(LEFT_NOTE)
    return Report(
        name="members",
        title=f"Members of {chatid} ({info['name']}) {when}: {len(shaped)}",
        columns=columns,
        rows=shaped,
        timezone=tz.key,
        notes=notes,
        series=series,
    )


def _after(row: Any, other: Any) -> ColumnElement[bool]:
    """``row`` comes after ``other`` in the log's order: by (``occurred_at``, ``id``)."""
    return or_(
        row.c.occurred_at > other.c.occurred_at,
        and_(row.c.occurred_at == other.c.occurred_at, row.c.id > other.c.id),
    )


def _left_after(joined: Any) -> Any:
    """When the membership that the ``member_joined`` row ``joined`` began ended: the
    ``occurred_at`` of the first later ``member_left`` of that chat and user (NULL: not yet)."""
    later = chat_events.alias("later")
    return (
        select(func.min(later.c.occurred_at))
        .where(
            later.c.chatid == joined.c.chatid,
            later.c.userid == joined.c.userid,
            later.c.event_type == "member_left",
            _after(later, joined),
        )
        .scalar_subquery()
    )


def members_at_query(chatid: str, at: dt.datetime) -> Any:
    """Members of ``chatid`` at ``at``: each user whose latest member event by
    (``occurred_at``, ``id``) at or before ``at`` is a join. ``joined_at`` is that join's
    ``occurred_at``; ``left_at`` when that membership ended later (NULL: not yet)."""
    joined = chat_events.alias("j")
    newer = chat_events.alias("newer")
    superseded = (
        select(newer.c.id)
        .where(
            newer.c.chatid == joined.c.chatid,
            newer.c.userid == joined.c.userid,
            newer.c.event_type.in_(MEMBER_EVENTS),
            newer.c.occurred_at <= at,
            _after(newer, joined),
        )
        .exists()
    )
    left_at = _left_after(joined)
    return (
        select(
            joined.c.userid,
            joined.c.occurred_at.label("joined_at"),
            joined.c.is_baseline,
            left_at.label("left_at"),
        )
        .where(
            joined.c.chatid == chatid,
            joined.c.event_type == "member_joined",
            joined.c.occurred_at <= at,
            not_(superseded),
        )
        .order_by(joined.c.userid)
    )


def changes(
    engine: Engine,
    *,
    since: dt.datetime | None,
    until: dt.datetime | None,
    chats_filter: Sequence[str] = (),
    userid: str | None = None,
    operator: str | None = None,
    tz: ZoneInfo,
) -> Report:
    """Joins, leaves and attribute changes that occurred in [since, until] (both inclusive),
    in the order they occurred; ``operator``: only the changes that user made."""
    check_window(since, until)
    clock = _Clock(tz)
    with database_errors("reading changes"), engine.connect() as conn:
        plan = _plan_changes(conn, since, until, chats_filter, userid, operator, clock)
        rows = conn.execute(plan.query).all()
    shape = _change_row(tz)
    shaped = [shape(row) for row in rows]
    return Report(
        name="changes",
        title=f"{plan.title}: {len(shaped)}",
        columns=CHANGE_COLUMNS,
        rows=shaped,
        timezone=tz.key,
        notes=plan.notes,
    )


@contextmanager
def changes_stream(
    engine: Engine,
    *,
    since: dt.datetime | None,
    until: dt.datetime | None,
    chats_filter: Sequence[str] = (),
    userid: str | None = None,
    operator: str | None = None,
    tz: ZoneInfo,
    counted: bool = True,
) -> Iterator[ReportStream]:
    """``changes`` as a stream: its rows are read from a server-side cursor as they are
    consumed, so memory does not grow with their number. ``counted``: the title ends with the
    number of rows, as ``changes``'s does (one more query; a format without a title needs
    none).

    Everything is read in one snapshot (the count agrees with the rows). A database error
    while the rows are read, in the caller's block, leaves it as ``DatabaseFailure``.
    """
    check_window(since, until)
    clock = _Clock(tz)
    with database_errors("reading changes"), _snapshot(engine) as conn:
        plan = _plan_changes(conn, since, until, chats_filter, userid, operator, clock)
        title = plan.title
        if counted:
            title += f": {_count(conn, plan)}"
        rows = _streamed(conn, plan.query, _change_row(tz))
        try:
            yield ReportStream(
                name="changes",
                title=title,
                columns=CHANGE_COLUMNS,
                rows=rows,
                timezone=tz.key,
                notes=plan.notes,
                source=StreamSource(conn, plan.query, tz),
            )
        finally:
            rows.close()


def _streamed(
    conn: Connection, query: Any, shape: Callable[[Any], dict[str, Any]]
) -> Generator[dict[str, Any], None, None]:
    """The rows of ``query`` through ``shape``, from a server-side cursor opened when the
    first row is asked for (a stream written by its database never opens it)."""
    if conn.dialect.name in {"mysql", "mariadb"}:
        # The server drops a streamed result that its reader leaves waiting longer than
        # this (60 s by default): a person paging through the report is such a reader.
        conn.exec_driver_sql(f"SET SESSION net_write_timeout = {STREAM_WAIT_SECONDS}")
    streaming = conn.execution_options(stream_results=True, yield_per=STREAM_ROWS)
    result = streaming.execute(query)
    try:
        yield from map(shape, result)
    finally:
        # A lost connection is closed already (SQLAlchemy invalidated it); else the
        # cursor of a stream left early (`| head`) is released here, not at exit.
        if not conn.invalidated:
            result.close()


@contextmanager
def _snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection whose statements all read the same state of the database, however long
    a stream takes: one REPEATABLE READ transaction (SQLite's transactions always are)."""
    with engine.connect() as conn:
        if conn.dialect.name != "sqlite":
            conn.execution_options(isolation_level="REPEATABLE READ")
        yield conn


@dataclass(frozen=True)
class _ChangesPlan:
    """The changes a report selects: its filter, its query, title (without the count) and
    notes."""

    chatids: list[str]
    where: list[ColumnElement[bool]]
    query: Any
    title: str
    notes: list[str]


def _plan_changes(
    conn: Connection,
    since: dt.datetime | None,
    until: dt.datetime | None,
    chats_filter: Sequence[str],
    userid: str | None,
    operator: str | None,
    clock: _Clock,
) -> _ChangesPlan:
    """Resolve the chats and users asked about (``NoAnswer`` for an unknown one) and plan
    the changes query."""
    chatids = [_resolve_chat(conn, chat)["chatid"] for chat in chats_filter]
    for someone in (userid, operator):
        if someone is not None:
            _require_user(conn, someone)
    where = _changes_where(since, until, chatids, userid, operator)
    discovered = conn.execute(_discovered_query(since, until, chatids)).scalars().all()
    notes = [CHANGES_NOTE]
    if discovered and userid is None and operator is None:
        listed = ", ".join(discovered[:10]) + (" ..." if len(discovered) > 10 else "")
        notes.append(
            f"{len(discovered)} chat(s) first synced in this window ({listed}): their members "
            "at that sync are a baseline, not joins (see `report members`)."
        )
    scope = []
    if chatids:
        scope.append("chat " + ", ".join(chatids))
    if userid is not None:
        scope.append(f"user {userid}")
    title = f"Changes {_window_text(since, until, clock)}"
    if scope:
        title += " for " + "; ".join(scope)
    if operator is not None:
        title += f" made by {operator}"
    return _ChangesPlan(chatids, where, _changes_query(where), title, notes)


def _count(conn: Connection, plan: _ChangesPlan) -> int:
    query = select(func.count()).select_from(chat_events).where(*plan.where)
    return int(conn.execute(query).scalar_one())


CHANGE_COLUMNS: Final = (
    "occurred_at",
    "observed_at",
    "chatid",
    "chat_name",
    "change",
    "userid",
    "field",
    "old_value",
    "new_value",
    "run_id",
    "source",
    "operator_userid",
)


def _change_row(tz: ZoneInfo) -> Callable[[Any], dict[str, Any]]:
    """The ``changes`` row of a row of ``_changes_query`` (whose columns are
    ``CHANGE_COLUMNS``): its times in the report zone. One function rather than a cell
    function per column, as it runs for every row of a long report."""
    columns = CHANGE_COLUMNS

    def shape(row: Any) -> dict[str, Any]:
        occurred, observed, *rest = row
        values = (occurred.astimezone(tz), observed.astimezone(tz), *rest)
        return dict(zip(columns, values, strict=True))

    return shape


def _change_kind(e: Any) -> ColumnElement[str]:
    """The kind of change (``CHANGE_KINDS``) of a row of ``chat_events``, computed by the
    database: a status that becomes dismissed is a dismissal, one that stops being dismissed
    a restoration, any other status or setting a setting change."""
    dismissed = str(STATUS_DISMISSED)
    return case(
        (e.c.event_type == "member_joined", literal("joined")),
        (e.c.event_type == "member_left", literal("left")),
        (and_(e.c.field == "status", e.c.new_value == dismissed), literal("dismissed")),
        (and_(e.c.field == "status", e.c.old_value == dismissed), literal("restored")),
        (e.c.field == "owner_userid", literal("owner_changed")),
        (e.c.field == "name", literal("renamed")),
        else_=literal("setting_changed"),
    )


def _changes_where(
    since: dt.datetime | None,
    until: dt.datetime | None,
    chatids: Sequence[str],
    userid: str | None,
    operator: str | None = None,
) -> list[ColumnElement[bool]]:
    e = chat_events
    where: list[ColumnElement[bool]] = [
        e.c.event_type.in_((*MEMBER_EVENTS, "attribute_changed")),
        not_(e.c.is_baseline),
        *_window(e.c.occurred_at, since, until),
    ]
    if operator is not None:
        where.append(e.c.operator_userid == operator)
    if chatids:
        where.append(e.c.chatid.in_(chatids))
    if userid is not None:
        where.append(
            or_(
                e.c.userid == userid,
                and_(
                    e.c.field == "owner_userid",
                    or_(e.c.old_value == userid, e.c.new_value == userid),
                ),
            )
        )
    return where


def _changes_query(where: Sequence[ColumnElement[bool]]) -> Any:
    """The changes selected by ``where``, with the columns ``CHANGE_COLUMNS`` (times in UTC),
    in the order they occurred."""
    e = chat_events
    columns = (
        e.c.occurred_at,
        e.c.observed_at,
        e.c.chatid,
        chats.c.name.label("chat_name"),
        _change_kind(e).label("change"),
        e.c.userid,
        e.c.field,
        e.c.old_value,
        e.c.new_value,
        e.c.run_id,
        e.c.source,
        e.c.operator_userid,
    )
    return (
        select(*columns)
        .select_from(e.outerjoin(chats, chats.c.chatid == e.c.chatid))
        .where(*where)
        .order_by(e.c.occurred_at, e.c.id)
    )


def _discovered_query(
    since: dt.datetime | None, until: dt.datetime | None, chatids: Sequence[str]
) -> Any:
    e = chat_events
    query = select(e.c.chatid).where(
        e.c.event_type == "chat_discovered", *_window(e.c.occurred_at, since, until)
    )
    if chatids:
        query = query.where(e.c.chatid.in_(chatids))
    return query.order_by(e.c.occurred_at, e.c.chatid)


def user(engine: Engine, userid: str, *, tz: ZoneInfo) -> Report:
    """Every chat ``userid`` is or was in, one row per membership interval."""
    clock = _Clock(tz)
    with database_errors("reading memberships"), engine.connect() as conn:
        rows = conn.execute(user_intervals_query(userid)).mappings().all()
        if not rows:
            _require_user(conn, userid)
    columns, shaped = _shape(
        rows,
        {
            "chatid": itemgetter("chatid"),
            "chat_name": itemgetter("chat_name"),
            "joined_at": lambda row: clock(row["joined_at"]),
            "baseline": lambda row: bool(row["is_baseline"]),
            "left_at": lambda row: clock(row["left_at"]),
            "is_owner": lambda row: row["owner_userid"] == userid,
            "chat_status": lambda row: STATUS_NAMES.get(row["chat_status"], row["chat_status"]),
            "dismissed_at": lambda row: clock(row["dismissed_at"]),
        },
    )
    current = sum(
        1 for row in shaped if row["left_at"] is None and row["chat_status"] != "dismissed"
    )
    notes = [
        BASELINE_NOTE,
        LEFT_NOTE,
        "left_at empty: still a member at the chat's latest sync or event.",
    ]
    if not shaped:
        notes.insert(0, f"{userid} owns chats but was never seen as a member of one.")
    return Report(
        name="user",
        title=(
            f"Chats of {userid}: {len({r['chatid'] for r in shaped})} chat(s), "
            f"{current} current (not dismissed)"
        ),
        columns=columns,
        rows=shaped,
        timezone=tz.key,
        notes=notes,
    )


def user_intervals_query(userid: str) -> Any:
    """One row per ``member_joined`` of the user, with the first leave after it; times are
    ``occurred_at``, in the log's order (``occurred_at``, ``id``) per chat."""
    joined = chat_events.alias("j")
    left_at = _left_after(joined)
    return (
        select(
            joined.c.chatid,
            chats.c.name.label("chat_name"),
            joined.c.occurred_at.label("joined_at"),
            joined.c.is_baseline,
            left_at.label("left_at"),
            chats.c.owner_userid,
            chats.c.status.label("chat_status"),
            chats.c.dismissed_at,
        )
        .select_from(joined.outerjoin(chats, chats.c.chatid == joined.c.chatid))
        .where(joined.c.userid == userid, joined.c.event_type == "member_joined")
        .order_by(joined.c.chatid, joined.c.occurred_at, joined.c.id)
    )


def chat_list(
    engine: Engine,
    *,
    status: str | None = None,
    risky: bool = False,
    tz: ZoneInfo,
    chatids: Sequence[str] = (),
) -> Report:
    """Chats with owner, member count, dismissal time and open settings (``risks``)."""
    clock = _Clock(tz)
    query = select(chats).order_by(chats.c.chatid)
    if status is not None:
        query = query.where(chats.c.status == STATUS_CODES[status])
    if risky:
        query = query.where(or_(*(chats.c[column] == value for column, value, _ in RISKS)))
    if chatids:
        query = query.where(chats.c.chatid.in_(chatids))
    with database_errors("reading chats"), engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    columns, shaped = _shape(rows, _chat_cells(clock))
    what = "Risky chats" if risky else "Chats"
    if status is not None:
        what += f" ({status})"
    notes = [
        "risks: " + "; ".join(f"{label} ({column} = {value})" for column, value, label in RISKS)
    ]
    return Report(
        name="chats",
        title=f"{what}: {len(shaped)}",
        columns=columns,
        rows=shaped,
        timezone=tz.key,
        notes=notes,
    )


def _chat_cells(clock: _Clock) -> _Cells:
    return {
        "chatid": itemgetter("chatid"),
        "name": itemgetter("name"),
        "status": lambda row: STATUS_NAMES.get(row["status"], row["status"]),
        "owner_userid": itemgetter("owner_userid"),
        "member_count": itemgetter("member_count"),
        "first_seen_at": lambda row: clock(row["first_seen_at"]),
        "last_synced_at": lambda row: clock(row["last_synced_at"]),
        "dismissed_at": lambda row: clock(row["dismissed_at"]),
        **{column: itemgetter(column) for column, _, _ in RISKS},
        "risks": chat_risks,
    }


def chat_risks(row: Any) -> list[str]:
    """The open settings of a ``chats`` row; an unknown (NULL) setting is no risk."""
    return [label for column, value, label in RISKS if row[column] == value]


def sync_health(engine: Engine, *, tz: ZoneInfo) -> Report:
    """Per chat ever attempted: last successful sync, last attempt, the latest error."""
    clock = _Clock(tz)
    i = sync_run_items
    ok = i.alias("ok")
    last_ok = (
        select(func.max(ok.c.run_id))
        .where(ok.c.chatid == i.c.chatid, ok.c.status == "ok")
        .scalar_subquery()
    )
    per_chat = (
        select(
            i.c.chatid,
            func.max(i.c.run_id).label("last_run_id"),
            func.max(case((i.c.status == "ok", i.c.run_id))).label("last_ok_run_id"),
            func.max(case((i.c.status == "failed", i.c.run_id))).label("last_failed_run_id"),
            func.sum(
                case(
                    (and_(i.c.status == "failed", i.c.run_id > func.coalesce(last_ok, 0)), 1),
                    else_=0,
                )
            ).label("failures_since_ok"),
        )
        .group_by(i.c.chatid)
        .subquery("per_chat")
    )
    failed = i.alias("failed")
    every = union(select(chats.c.chatid), select(i.c.chatid.label("chatid"))).subquery("every")
    query = (
        select(
            every.c.chatid,
            chats.c.name,
            chats.c.last_synced_at,
            per_chat.c.last_run_id,
            per_chat.c.last_ok_run_id,
            per_chat.c.failures_since_ok,
            per_chat.c.last_failed_run_id,
            sync_runs.c.started_at.label("error_run_started_at"),
            failed.c.errcode,
            failed.c.error,
        )
        .select_from(
            every.outerjoin(chats, chats.c.chatid == every.c.chatid)
            .outerjoin(per_chat, per_chat.c.chatid == every.c.chatid)
            .outerjoin(
                failed,
                and_(
                    failed.c.chatid == every.c.chatid,
                    failed.c.run_id == per_chat.c.last_failed_run_id,
                ),
            )
            .outerjoin(sync_runs, sync_runs.c.id == failed.c.run_id)
        )
        .order_by(every.c.chatid)
    )
    with database_errors("reading sync health"), engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    columns, shaped = _shape(
        rows,
        {
            "chatid": itemgetter("chatid"),
            "chat_name": itemgetter("name"),
            "state": _health_state,
            "last_synced_at": lambda row: clock(row["last_synced_at"]),
            "last_ok_run_id": itemgetter("last_ok_run_id"),
            "last_run_id": itemgetter("last_run_id"),
            "failures_since_ok": lambda row: int(row["failures_since_ok"] or 0),
            "latest_error_at": lambda row: clock(row["error_run_started_at"]),
            "latest_error_run_id": itemgetter("last_failed_run_id"),
            "latest_errcode": itemgetter("errcode"),
            "latest_error": itemgetter("error"),
        },
    )
    failing = sum(1 for row in shaped if row["state"] != "ok")
    return Report(
        name="sync-health",
        title=f"Sync health: {len(shaped)} chat(s), {failing} failing or never synced",
        columns=columns,
        rows=shaped,
        timezone=tz.key,
        notes=[
            "last_synced_at: last successful fetch; latest_error_at: start of the run that "
            "recorded the latest error."
        ],
    )


def _health_state(row: Any) -> str:
    """``never synced``, ``failing`` (the latest attempt failed) or ``ok``."""
    last_run, last_ok = row["last_run_id"], row["last_ok_run_id"]
    if last_ok is None and row["last_synced_at"] is None:
        return "never synced"
    if last_run is not None and last_run != last_ok:
        return "failing"
    return "ok"


def audit(
    engine: Engine,
    *,
    since: dt.datetime | None,
    until: dt.datetime | None,
    chats_filter: Sequence[str] = (),
    userid: str | None = None,
    operator: str | None = None,
    tz: ZoneInfo,
    limit: int = AUDIT_LIST_LIMIT,
) -> AuditReport:
    """The changes report plus, for the selected chats (else every chat changed in the
    window), a summary and the member count after each sync in the window.

    Above ``limit`` changes, the summary of ``_summarised_audit`` instead: counted by the
    database, listing the first ``limit`` changes only.
    """
    check_window(since, until)
    clock = _Clock(tz)
    with database_errors("reading changes"), engine.connect() as conn:
        plan = _plan_changes(conn, since, until, chats_filter, userid, operator, clock)
        total = _count(conn, plan)
    if total > limit:
        return _summarised_audit(engine, since, until, chats_filter, userid, operator, tz, limit)
    changed = changes(
        engine,
        since=since,
        until=until,
        chats_filter=chats_filter,
        userid=userid,
        operator=operator,
        tz=tz,
    )
    with database_errors("reading chats"), engine.connect() as conn:
        chatids = [_resolve_chat(conn, chat)["chatid"] for chat in chats_filter]
    if not chatids:
        chatids = sorted({row["chatid"] for row in changed.rows})
    listed = chat_list(engine, tz=tz, chatids=chatids).rows if chatids else []
    counts = _change_counts(changed.rows)
    summary = Report(
        name="chats",
        title=f"Chats in this report: {len(listed)}",
        columns=SUMMARY_COLUMNS,
        rows=[{**row, **counts.get(row["chatid"], _NO_CHANGES)} for row in listed],
        timezone=tz.key,
    )
    charted = [row["chatid"] for row in listed][:MAX_CHARTS]
    with database_errors("reading membership history"), engine.connect() as conn:
        series = [_series(conn, _chat_row(conn, chatid), since, until, clock) for chatid in charted]
    return AuditReport(
        title="DingTalk group audit",
        window=_window_text(since, until, clock),
        timezone=tz.key,
        generated_at=utcnow().astimezone(tz),
        summary=summary,
        changes=changed,
        series=series,
        notes=list(changed.notes),
        uncharted=len(listed) - len(charted),
        total_changes=len(changed.rows),
    )


def _summarised_audit(
    engine: Engine,
    since: dt.datetime | None,
    until: dt.datetime | None,
    chats_filter: Sequence[str],
    userid: str | None,
    operator: str | None,
    tz: ZoneInfo,
    limit: int,
) -> AuditReport:
    """The audit of more changes than a person reads: every count comes from a GROUP BY, and
    only the first ``limit`` changes and the ``TOP_CHATS`` charts are read as rows."""
    clock = _Clock(tz)
    e = chat_events
    with database_errors("reading changes"), _snapshot(engine) as conn:
        plan = _plan_changes(conn, since, until, chats_filter, userid, operator, clock)
        total = _count(conn, plan)
        joins = func.sum(case((e.c.event_type == "member_joined", 1), else_=0))
        leaves = func.sum(case((e.c.event_type == "member_left", 1), else_=0))
        per_chat = conn.execute(
            select(e.c.chatid, joins, leaves, func.count()).where(*plan.where).group_by(e.c.chatid)
        ).all()
        days = _per_day(conn, plan, clock)
        first = conn.execute(plan.query.limit(limit)).all()
        selected = (
            chats.c.chatid.in_(plan.chatids)
            if plan.chatids
            else chats.c.chatid.in_(select(e.c.chatid).where(*plan.where))
        )
        listed = _shape(
            conn.execute(select(chats).where(selected).order_by(chats.c.chatid)).mappings().all(),
            _chat_cells(clock),
        )[1]
        counts = {
            chatid: _tally(int(joined), int(left), int(every))
            for chatid, joined, left, every in per_chat
        }
        names = {row["chatid"]: row["name"] for row in listed}
        ranked = sorted(counts, key=lambda chatid: (-sum(counts[chatid].values()), chatid))
        charted = [chatid for chatid in ranked if chatid in names][:TOP_CHATS]
        series = [_series(conn, _chat_row(conn, chatid), since, until, clock) for chatid in charted]
    changed = Report(
        name="changes",
        title=f"{plan.title}: {total}",
        columns=CHANGE_COLUMNS,
        rows=[_change_row(tz)(row) for row in first],
        timezone=tz.key,
        notes=plan.notes,
    )
    top = Report(
        name="top",
        title=f"The {len(charted)} chats with the most changes",
        columns=TOP_COLUMNS,
        rows=[
            {
                "chatid": chatid,
                "name": names.get(chatid),
                **counts[chatid],
                "changes": sum(counts[chatid].values()),
            }
            for chatid in ranked[:TOP_CHATS]
        ],
        timezone=tz.key,
    )
    summary = Report(
        name="chats",
        title=f"Chats in this report: {len(listed)}",
        columns=SUMMARY_COLUMNS,
        rows=[{**row, **counts.get(row["chatid"], _NO_CHANGES)} for row in listed],
        timezone=tz.key,
    )
    return AuditReport(
        title="DingTalk group audit",
        window=_window_text(since, until, clock),
        timezone=tz.key,
        generated_at=utcnow().astimezone(tz),
        summary=summary,
        changes=changed,
        series=series,
        notes=list(plan.notes),
        uncharted=len(listed) - len(charted),
        total_changes=total,
        summarised=True,
        top=top,
        days=days,
    )


# The summarised audit's tables: the chats with the most changes, and the changes per day.
TOP_COLUMNS: Final = ("chatid", "name", "joins", "leaves", "other_changes", "changes")
DAY_COLUMNS: Final = ("day", "joins", "leaves", "other_changes", "changes")
# Every time zone's offset is a multiple of 15 minutes: changes counted per quarter hour (UTC)
# add up to days in any zone, DST included, without the database knowing the zone.
_SLOT_SECONDS: Final = 900


def _tally(joins: int, leaves: int, every: int) -> dict[str, int]:
    return {"joins": joins, "leaves": leaves, "other_changes": every - joins - leaves}


def _per_day(conn: Connection, plan: _ChangesPlan, clock: _Clock) -> Report:
    """The changes counted per day in the report time zone (days without any left out)."""
    e = chat_events
    slots = (
        select(_slot(conn.dialect.name, e.c.occurred_at).label("slot"), e.c.event_type)
        .where(*plan.where)
        .subquery("slots")
    )
    counted = conn.execute(
        select(
            slots.c.slot,
            func.sum(case((slots.c.event_type == "member_joined", 1), else_=0)),
            func.sum(case((slots.c.event_type == "member_left", 1), else_=0)),
            func.count(),
        ).group_by(slots.c.slot)
    ).all()
    days: dict[dt.date, list[int]] = {}
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    for slot, joined, left, every in counted:
        start = epoch + dt.timedelta(seconds=int(slot) * _SLOT_SECONDS)
        day = (clock(start) or start).date()
        tally = days.setdefault(day, [0, 0, 0])
        tally[0] += int(joined)
        tally[1] += int(left)
        tally[2] += int(every)
    rows = [
        {"day": day, **_tally(*tally), "changes": tally[2]} for day, tally in sorted(days.items())
    ]
    return Report(
        name="days",
        title=f"Changes per day ({clock.tz.key})",
        columns=DAY_COLUMNS,
        rows=rows,
        timezone=clock.tz.key,
    )


def _slot(dialect: str, column: Any) -> Any:
    """The quarter hour (UTC, counted from 1970) of a time column, on each database."""
    seconds: Any = literal_column(str(_SLOT_SECONDS))
    if dialect == "postgresql":
        return func.floor(extract("epoch", column) / seconds)
    if dialect in {"mysql", "mariadb"}:
        # TIMESTAMPDIFF, not UNIX_TIMESTAMP: the column holds UTC whatever the session's zone.
        since_epoch = func.timestampdiff(
            literal_column("SECOND"), literal_column("'1970-01-01 00:00:00'"), column
        )
        return func.floor(since_epoch / seconds)
    return cast(func.strftime("%s", column), Integer) / seconds


_NO_CHANGES: Final = {"joins": 0, "leaves": 0, "other_changes": 0}


def _change_counts(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per chatid, the ``changes`` rows counted as joins, leaves and other changes."""
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        tally = counts.setdefault(row["chatid"], dict(_NO_CHANGES))
        key = {"joined": "joins", "left": "leaves"}.get(row["change"], "other_changes")
        tally[key] += 1
    return counts


# -- helpers ------------------------------------------------------------------------------------


def _window(
    column: Any, since: dt.datetime | None, until: dt.datetime | None
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if since is not None:
        where.append(column >= since)
    if until is not None:
        where.append(column <= until)
    return where


def _window_text(since: dt.datetime | None, until: dt.datetime | None, clock: _Clock) -> str:
    if since is None and until is None:
        return "since the first sync"
    if until is None:
        assert since is not None
        return f"from {clock.text(since)}"
    if since is None:
        return f"until {clock.text(until)}"
    return f"from {clock.text(since)} to {clock.text(until)}"


def _chat_row(conn: Connection, chatid: str) -> Any:
    return conn.execute(select(chats).where(chats.c.chatid == chatid)).mappings().one()


def _resolve_chat(conn: Connection, chat: str) -> Any:
    """The ``chats`` row of a chatid, else of the one chat with that exact name."""
    row = conn.execute(select(chats).where(chats.c.chatid == chat)).mappings().first()
    if row is not None:
        return row
    named = conn.execute(select(chats).where(chats.c.name == chat)).mappings().all()
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        ids = sorted(r["chatid"] for r in named)
        raise NoAnswer(
            f"{len(named)} chats are named {chat!r} ({', '.join(ids)}): give a chatid",
            chat=chat,
            chatids=ids,
        )
    attempt = conn.execute(
        select(sync_run_items.c.errcode, sync_run_items.c.error)
        .where(sync_run_items.c.chatid == chat)
        .order_by(sync_run_items.c.run_id.desc())
        .limit(1)
    ).first()
    if attempt is not None:
        raise NoAnswer(
            f"chat {chat!r} was never synced successfully (latest error: {attempt.error}); "
            "see `dingtalk-etl report sync-health`",
            chat=chat,
        )
    raise NoAnswer(
        f"no chat {chat!r} in the database (neither a synced chatid nor a chat name); "
        "`dingtalk-etl report chats` lists them",
        chat=chat,
    )


def _require_user(conn: Connection, userid: str) -> None:
    seen = conn.execute(
        select(literal(1))
        .where(
            or_(
                select(chat_members.c.userid).where(chat_members.c.userid == userid).exists(),
                select(chats.c.chatid).where(chats.c.owner_userid == userid).exists(),
                select(chat_events.c.id)
                .where(
                    chat_events.c.field == "owner_userid",
                    or_(chat_events.c.old_value == userid, chat_events.c.new_value == userid),
                )
                .exists(),
                select(chat_events.c.id).where(chat_events.c.operator_userid == userid).exists(),
            )
        )
        .limit(1)
    ).first()
    if seen is None:
        raise NoAnswer(f"userid {userid!r} was never seen in any synced chat", userid=userid)


def _value_at(conn: Connection, chatid: str, column: str, at: dt.datetime, now: Any) -> Any:
    """An attribute's value (as text) at ``at``, from its ``attribute_changed`` events."""
    e = chat_events
    changes_of = (e.c.chatid == chatid) & (e.c.event_type == "attribute_changed")
    changes_of &= e.c.field == column
    before = conn.execute(
        select(e.c.new_value)
        .where(changes_of, e.c.occurred_at <= at)
        .order_by(e.c.occurred_at.desc(), e.c.id.desc())
        .limit(1)
    ).first()
    if before is not None:
        return before.new_value
    after = conn.execute(
        select(e.c.old_value)
        .where(changes_of, e.c.occurred_at > at)
        .order_by(e.c.occurred_at, e.c.id)
        .limit(1)
    ).first()
    return after.old_value if after is not None else now


def _series(
    conn: Connection,
    info: Any,
    since: dt.datetime | None,
    until: dt.datetime | None,
    clock: _Clock,
) -> MembershipSeries:
    """Member count of a chat right after each successful sync and each group event, within
    [since, until]: the log replayed by (``occurred_at``, ``id``) up to each of them."""
    chatid = info["chatid"]
    runs = conn.execute(
        select(sync_run_items.c.run_id, sync_runs.c.started_at)
        .join(sync_runs, sync_runs.c.id == sync_run_items.c.run_id)
        .where(sync_run_items.c.chatid == chatid, sync_run_items.c.status == "ok")
        .order_by(sync_run_items.c.run_id)
    ).all()
    log = conn.execute(
        select(
            chat_events.c.run_id,
            chat_events.c.occurred_at,
            chat_events.c.source,
            chat_events.c.event_id,
            chat_events.c.operator_userid,
            chat_events.c.event_type,
            chat_events.c.userid,
            chat_events.c.field,
            chat_events.c.new_value,
            chat_events.c.is_baseline,
        )
        .where(chat_events.c.chatid == chatid)
        .order_by(chat_events.c.occurred_at, chat_events.c.id)
    ).all()
    by_run: dict[int, list[Any]] = {}
    by_event: dict[str, list[Any]] = {}
    for row in log:
        if row.source == "event":
            by_event.setdefault(row.event_id, []).append(row)
        elif row.run_id is not None:
            by_run.setdefault(row.run_id, []).append(row)
    # (time, run id, the rows written then, label): a sync is charted at the time of its read
    # (its rows' time; the run's start when it wrote none), an event at DingTalk's time.
    moments: list[tuple[dt.datetime, int | None, list[Any], str]] = []
    for run_id, started_at in runs:
        batch = by_run.get(run_id, [])
        at = max((row.occurred_at for row in batch), default=started_at)
        moments.append((at, run_id, batch, ""))
    for batch in by_event.values():
        operator = batch[0].operator_userid
        label = f"event by {operator}" if operator else "event"
        moments.append((batch[0].occurred_at, None, batch, label))
    moments.sort(key=itemgetter(0))
    present: set[str] = set()
    replayed = 0
    points: list[SeriesPoint] = []
    for at, run_id, batch, label in moments:
        while replayed < len(log) and log[replayed].occurred_at <= at:
            row = log[replayed]
            if row.event_type == "member_joined":
                present.add(row.userid)
            elif row.event_type == "member_left":
                present.discard(row.userid)
            replayed += 1
        labels = [label] if label else []
        if any(row.event_type == "chat_discovered" for row in batch):
            labels.append("first sync")
        if any(row.field == "status" and row.new_value == str(STATUS_DISMISSED) for row in batch):
            labels.append("dismissed")
        # The baseline at a chat's first sync is no join.
        joined = sum(row.event_type == "member_joined" and not row.is_baseline for row in batch)
        left = sum(row.event_type == "member_left" for row in batch)
        points.append(SeriesPoint(at, len(present), run_id, joined, left, ", ".join(labels)))
    windowed = [
        p for p in points if (since is None or p.at >= since) and (until is None or p.at <= until)
    ]
    if since is not None:
        earlier = [p for p in points if p.at < since]
        if earlier:
            windowed.insert(0, SeriesPoint(since, earlier[-1].count, None, label="window start"))
    if len(windowed) > _MAX_POINTS:
        windowed = _thin(windowed)
    local = tuple(
        SeriesPoint(clock(p.at) or p.at, p.count, p.run_id, p.joined, p.left, p.label)
        for p in windowed
    )
    return MembershipSeries(chatid, info["name"], local, clock(info["dismissed_at"]))


def _thin(points: list[SeriesPoint]) -> list[SeriesPoint]:
    """Only the points where something happened, plus the first and the last."""
    last = len(points) - 1
    return [
        p
        for index, p in enumerate(points)
        if index in (0, last) or p.joined or p.left or p.label or p.count != points[index - 1].count
    ]
