"""The days a source holds rows of, as ``by="day"`` labels them, read as little as the data allows.

A file holds a day when one of its rows lies inside that day's ranges of
:func:`~duckharness.engine.plan.day_intervals` (the session window on that day, or the whole local
day without one): the ranges :func:`~duckharness.engine.plan.window_and_day` tests to window and
label rows. Most of it is settled from the Parquet footers: each row group's smallest and
largest time are times of rows, so a day whose ranges hold one of them is held, and a day whose
ranges no row group's time span reaches is not. What the footers leave open (a file of a week in
one row group: does it hold the Saturday?) is settled by reading the time column of those files,
within the open days' ranges only: first the smallest and largest time of each hour (the same test
at a finer grain, from one grouped scan), then, for a day an hour still leaves open (a window
shorter than an hour), each row's own label (:func:`~duckharness.engine.plan.per_row_window`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import duckdb
from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.data.metadata import SessionWindow
from duckharness.data.source import Dataset, FileInfo
from duckharness.engine.plan import MAX_WINDOW_DAYS, batch_relation, day_intervals, per_row_window, range_days
from duckharness.execution.connection import fetch_all

Tracer = Callable[[str], None]
Range = tuple[str, dt.datetime, dt.datetime]  # a file's path and the times of two of its rows
DaySets = dict[dt.date, set[str]]  # day -> paths of files
FILE = "__dh_file"
# Times of a nanosecond column are read truncated to the microsecond (statistics, and epoch_ns
# here): such a time at an interval's end may stand for a row just past it.
_TICK = dt.timedelta(microseconds=1)
_HOUR_NS = 3_600 * 10**9


@dataclass(frozen=True)
class DayIndex:
    """What is known of a source's days: the files holding rows of each held day (paths, in no
    order), the files that may hold rows of a day and are not settled yet, the files without
    time statistics, whose days are not known until they are read, and the time ranges read of
    such files once placed."""

    held: Mapping[dt.date, frozenset[str]]
    open: Mapping[dt.date, frozenset[str]]
    unplaced: frozenset[str] = frozenset()
    placed: Mapping[str, tuple[dt.datetime, dt.datetime]] = field(default_factory=dict)

    @property
    def settled(self) -> bool:
        return not self.open and not self.unplaced

    @property
    def days(self) -> list[dt.date]:
        """The held days, in order (all the source's days once :attr:`settled`)."""
        return sorted(self.held)


def index_days(dataset: Dataset, window: SessionWindow | None) -> DayIndex:
    """The days the footers settle, and those they leave open (no data read)."""
    tcol = dataset.time_column
    if tcol is None:
        return DayIndex({}, {})
    tz = _zone(dataset, window)
    ranges: list[Range] = []
    unplaced = set()
    for f in dataset.files:
        if not f.rows or tcol not in f.columns:
            continue  # no rows, or no times: no day (by="day" gives NULL times none either)
        if f.time_min is None or f.time_max is None:
            unplaced.add(f.path)
            continue
        ranges += [(f.path, lo, hi) for lo, hi in f.time_groups or ((f.time_min, f.time_max),)]
    held, maybe = _classify(ranges, tz, window, _slack(dataset))
    return DayIndex(_frozen(held), _frozen(_without(maybe, held)), frozenset(unplaced))


def settle_days(
    index: DayIndex,
    dataset: Dataset,
    window: SessionWindow | None,
    con: duckdb.DuckDBPyConnection,
    *,
    days: Iterable[dt.date] | None = None,
    tracer: Tracer | None = None,
) -> DayIndex:
    """``index`` with the files without statistics placed and the open days among ``days`` (all
    when None) settled, by reading their files' time column inside those days' ranges.

    Example:
        >>> index = settle_days(index_days(dataset, window), dataset, window, con)   # doctest: +SKIP
        >>> index.settled, len(index.days)                                           # doctest: +SKIP
        (True, 60)
    """
    tz = _zone(dataset, window)
    by_path = {f.path: f for f in dataset.files}
    held = {d: set(p) for d, p in index.held.items()}
    opened = {d: set(p) for d, p in index.open.items()}
    placed = dict(index.placed)
    if index.unplaced:
        hours = _hour_ranges(dataset, files_of(dataset, index.unplaced), None, con, tracer)
        for path, lo, hi in hours:
            first, last = placed.get(path, (lo, hi))
            placed[path] = (min(first, lo), max(last, hi))
        found, maybe = _classify(hours, tz, window, _slack(dataset))
        _merge(held, found)
        _merge(opened, maybe)
        opened = _without(opened, held)
    wanted = sorted(opened if days is None else set(days) & set(opened))
    if wanted:
        asked = {d: opened.pop(d) for d in wanted}
        files = _files(by_path, asked)
        hours = _hour_ranges(dataset, files, _spans(wanted, tz, window), con, tracer)
        found, maybe = _classify(hours, tz, window, _slack(dataset))
        _merge(held, _within(found, asked))
        still = _without(_within(maybe, asked), held)
        if still:  # rare: a window shorter than an hour, or an hour around a clock change
            rows = _row_days(dataset, _files(by_path, still), _spans(sorted(still), tz, window), window, con, tracer)
            _merge(held, _within(rows, still))
    return DayIndex(_frozen(held), _frozen(opened), placed=placed)


def candidate_days(dataset: Dataset, window: SessionWindow | None, index: DayIndex) -> list[dt.date]:
    """The days the files' time ranges span (their first and last rows, from the footers or, for a
    file without statistics, as read when it was placed): a superset of the held days that depends
    on the rows only (not on the row groups, nor on what is settled yet), so that a seeded draw
    from it is reproducible.

    Example:
        >>> candidate_days(dataset, None, index)[:3]                                 # doctest: +SKIP
        [datetime.date(2026, 1, 5), datetime.date(2026, 1, 6), datetime.date(2026, 1, 7)]
    """
    tz = _zone(dataset, window)
    out: set[dt.date] = set()
    for f in dataset.files:
        span = (
            (f.time_min, f.time_max) if f.time_min is not None and f.time_max is not None else index.placed.get(f.path)
        )
        if f.rows and span is not None:
            out.update(range_days(*span, tz, window))
    return sorted(out)


def files_of(dataset: Dataset, paths: Iterable[str]) -> list[FileInfo]:
    """The files of ``paths``, in the source's order."""
    wanted = set(paths)
    return [f for f in dataset.files if f.path in wanted]


# -- the test: which days a range of row times shows, and which it may hold ------------------------


def _classify(
    ranges: Iterable[Range], tz: str, window: SessionWindow | None, slack: dt.timedelta
) -> tuple[DaySets, DaySets]:
    """Per day, the files one of whose ranges has an end inside that day's ranges (held), and the
    files whose ranges only reach into it (may hold rows of it). ``slack``: how much later than
    its reading a row's time may be (see ``_TICK``)."""
    held: DaySets = {}
    maybe: DaySets = {}
    for path, a, b in ranges:
        lo, hi = _utc(a), _utc(b)
        for d in range_days(lo, hi, tz, window):
            parts = day_intervals(d, tz, window)
            if any(_inside(t, part, slack) for t in (lo, hi) for part in parts):
                held.setdefault(d, set()).add(path)
            elif any(_meets(lo, hi, part) for part in parts):
                maybe.setdefault(d, set()).add(path)
    return held, maybe


def _inside(t: dt.datetime, part: tuple[dt.datetime, dt.datetime, bool], slack: dt.timedelta) -> bool:
    """Whether a row timed ``t`` (read up to ``slack`` early) lies inside ``part``."""
    lo, hi, inclusive = part
    if slack:
        return lo <= t and t + slack <= hi
    return lo <= t and (t < hi or (inclusive and t == hi))


def _meets(lo: dt.datetime, hi: dt.datetime, part: tuple[dt.datetime, dt.datetime, bool]) -> bool:
    """Whether rows timed from ``lo`` to ``hi`` can lie inside ``part``."""
    a, b, inclusive = part
    return a <= hi and (lo < b or (inclusive and lo == b))


def _slack(dataset: Dataset) -> dt.timedelta:
    assert dataset.time_column is not None
    return _TICK if "_NS" in dataset.columns[dataset.time_column].upper() else dt.timedelta(0)


def _utc(t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC) if t.tzinfo else t.replace(tzinfo=dt.UTC)  # naive times are UTC


def _zone(dataset: Dataset, window: SessionWindow | None) -> str:
    return window.timezone if window is not None else dataset.metadata.timezone


# -- reading what the footers leave open ---------------------------------------------------------------


def _spans(days: Sequence[dt.date], tz: str, window: SessionWindow | None) -> list[tuple[dt.datetime, dt.datetime]]:
    """Time spans covering ``days``' ranges (sorted days), consecutive days joined, so that row-group
    statistics skip the rest; one span when they would be many."""
    spans: list[tuple[dt.datetime, dt.datetime]] = []
    last: dt.date | None = None
    for d in days:
        parts = day_intervals(d, tz, window)
        if not parts:  # a window inside a clock change's gap: no instant of that day
            continue
        lo, hi = parts[0][0], parts[-1][1]
        if spans and last is not None and (d - last).days == 1:
            spans[-1] = (spans[-1][0], hi)
        else:
            spans.append((lo, hi))
        last = d
    return [(spans[0][0], spans[-1][1])] if len(spans) > MAX_WINDOW_DAYS else spans


def _span_filter(ts: exp.Expr, spans: Sequence[tuple[dt.datetime, dt.datetime]] | None, aware: bool) -> exp.Expr | None:
    if not spans:
        return None
    return sb.or_all(
        sb.between(ts, sb.timestamp(lo, with_tz=aware), sb.timestamp(hi, with_tz=aware), hi_inclusive=True)
        for lo, hi in spans
    )


def _hour_ranges(
    dataset: Dataset,
    files: Sequence[FileInfo],
    spans: Sequence[tuple[dt.datetime, dt.datetime]] | None,
    con: duckdb.DuckDBPyConnection,
    tracer: Tracer | None,
) -> list[Range]:
    """The smallest and largest time of each file's rows in each UTC hour (within ``spans``)."""
    if not files:
        return []
    assert dataset.time_column is not None
    ts = sb.column(dataset.time_column)
    ns = sb.func("epoch_ns", ts)
    where = sb.and_all(
        c for c in (_span_filter(ts, spans, dataset.time_is_aware), exp.Not(this=sb.is_null(ts.copy()))) if c
    )
    q = sb.select(
        [
            sb.column(FILE),
            sb.alias(exp.IntDiv(this=ns.copy(), expression=exp.Literal.number(_HOUR_NS)), "hour"),
            sb.alias(sb.func("min", ns.copy()), "lo"),
            sb.alias(sb.func("max", ns.copy()), "hi"),
        ],
        batch_relation(dataset, files, filename=FILE),
        where=where,
        group_by_all=True,
    )
    rows = fetch_all(con, sb.render(q), tracer)
    assert {path for path, *_ in rows} <= {f.path for f in files}, "DuckDB named a file by another path"
    return [(path, _from_ns(lo), _from_ns(hi)) for path, _, lo, hi in rows]


def _from_ns(ns: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ns // 1000)


def _row_days(
    dataset: Dataset,
    files: Sequence[FileInfo],
    spans: Sequence[tuple[dt.datetime, dt.datetime]],
    window: SessionWindow | None,
    con: duckdb.DuckDBPyConnection,
    tracer: Tracer | None,
) -> DaySets:
    """The days of the rows inside ``spans``, each row windowed and labelled as ``by="day"`` does."""
    assert dataset.time_column is not None
    ts = sb.column(dataset.time_column)
    inside, day = per_row_window(ts, dataset.time_is_aware, _zone(dataset, window), window)
    where = sb.and_all(
        c for c in (_span_filter(ts, spans, dataset.time_is_aware), inside, exp.Not(this=sb.is_null(day.copy()))) if c
    )
    relation = batch_relation(dataset, files, filename=FILE)
    q = sb.select([sb.column(FILE), sb.alias(day, "day")], relation, where=where, group_by_all=True)
    out: DaySets = {}
    for path, d in fetch_all(con, sb.render(q), tracer):
        out.setdefault(d, set()).add(path)
    return out


# -- bookkeeping ---------------------------------------------------------------------------------------


def _files(by_path: Mapping[str, FileInfo], days: Mapping[dt.date, set[str]]) -> list[FileInfo]:
    paths = {p for ps in days.values() for p in ps}
    return [f for p, f in by_path.items() if p in paths]


def _merge(into: DaySets, more: Mapping[dt.date, set[str]]) -> None:
    for d, paths in more.items():
        into.setdefault(d, set()).update(paths)


def _within(found: Mapping[dt.date, set[str]], asked: Mapping[dt.date, set[str]]) -> DaySets:
    """``found`` restricted to the (day, file) pairs of ``asked``."""
    out = {d: paths & asked[d] for d, paths in found.items() if d in asked}
    return {d: p for d, p in out.items() if p}


def _without(maybe: Mapping[dt.date, set[str]], held: Mapping[dt.date, set[str]]) -> DaySets:
    """``maybe`` without the (day, file) pairs already held."""
    out = {d: paths - held.get(d, set()) for d, paths in maybe.items()}
    return {d: p for d, p in out.items() if p}


def _frozen(days: Mapping[dt.date, set[str]]) -> dict[dt.date, frozenset[str]]:
    return {d: frozenset(p) for d, p in sorted(days.items())}
