"""Subsamples for interactive research, each taken through the experiment's logic.

``random_days`` picks whole days (the preferred strategy: it keeps the intraday structure of
high-frequency data) and reads only the files of those days; ``head`` takes the first rows in
time order and stops reading once it has them; ``gather_every`` keeps every N-th row in time
order. ``random_rows`` is refused: picking rows at random breaks the time series.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import polars as pl
from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.data.metadata import SessionWindow
from duckharness.data.source import FileInfo
from duckharness.engine.days import DayIndex, candidate_days, files_of
from duckharness.engine.plan import aware_in, day_groups, moves_time, window_and_day
from duckharness.errors import InputError, warn
from duckharness.execution.connection import interruptible
from duckharness.experiments.chain import build_chain
from duckharness.outputs.paths import write_error, written_atomically

if TYPE_CHECKING:
    from duckharness.harness import Harness

STRATEGIES = ("random_days", "head", "gather_every")


def choose_days(
    h: Harness, window: SessionWindow | None, n_days: int, seed: int | None
) -> tuple[list[dt.date], DayIndex]:
    """``n_days`` days that hold rows (inside ``window``), drawn with ``seed``, and what is known of
    the source's days.

    The draw is a seeded shuffle of the days the files' time ranges span (weekends and holidays
    of a file of several days included), from which the first ``n_days`` that hold rows are kept.
    Only the drawn days the footers leave open are read (their files' time column), so the
    result depends on the rows and the seed only, and a day that holds rows is never skipped.
    Fewer days than asked warn, naming how many there are.
    """
    index = h._day_index(window, days=())  # places files without time statistics, if any
    order = random.Random(seed).sample(candidates := candidate_days(h.dataset, window, index), len(candidates))
    chosen: list[dt.date] = []
    at = 0
    while len(chosen) < n_days and at < len(order):
        batch = order[at : at + 2 * (n_days - len(chosen))]  # a few spare for days without rows
        at += len(batch)
        if any(d in index.open for d in batch):
            index = h._day_index(window, days=batch)
        chosen += [d for d in batch if d in index.held][: n_days - len(chosen)]
    if len(chosen) < n_days:
        inside = f" inside the session window {window.describe()}" if window is not None else ""
        days = f"{len(chosen):,} day{'' if len(chosen) == 1 else 's'}"
        warn(
            f"Asked for {n_days:,} random days but the source has only {days} with rows{inside}; "
            f"the sample holds every row of {'it' if len(chosen) == 1 else 'them'}."
        )
    return sorted(chosen), index


def take_sample(
    h: Harness,
    name: str,
    strategy: str,
    *,
    n: int,
    n_days: int,
    step: int,
    seed: int | None,
    window: SessionWindow | None,
) -> pl.DataFrame:
    if strategy == "random_rows":
        raise InputError(
            "Strategy 'random_rows' is refused: rows picked at random break the time series (lags, "
            "intraday patterns, autocorrelation). Use 'random_days' (whole days), 'head' or 'gather_every'."
        )
    if strategy not in STRATEGIES:
        raise InputError(f"Unknown sampling strategy {strategy!r}. Options: {', '.join(STRATEGIES)}.")
    if n < 1 or n_days < 1 or step < 1:
        raise InputError("n, n_days and step must be at least 1.")
    h.experiments.columns(name)  # unknown names raise here
    files = sorted(h.dataset.files, key=lambda f: (f.time_min is None, f.time_min or dt.datetime.min, f.path))
    tcol = h.dataset.time_column
    ordered = tcol is not None and tcol in h.experiments.columns(name)
    if strategy == "random_days":
        if tcol is None:
            raise InputError(
                "Strategy 'random_days' needs a time column to tell the days apart, and the source has none: "
                "set 'time_column' in metadata.json, or use 'head' or 'gather_every'."
            )
        chosen, index = choose_days(h, window, n_days, seed)
        needed = files_of(h.dataset, (p for d in chosen for p in index.held[d]))
        read_paths = {f.path for f in needed}  # the days those files hold, or may hold (not settled)
        spans = [*index.held.items(), *index.open.items()]
        others = sorted({d for d, paths in spans if d not in chosen and paths & read_paths})
        if not ordered and others:
            raise InputError(
                f"Strategy 'random_days' keeps the drawn days' rows by their time column, which experiment "
                f"{name!r} does not have, and the files of the drawn days hold other days too (e.g. "
                f"{others[0].isoformat()}). Keep {tcol!r} in {name!r}, or sample the experiment it is built on."
            )
        # A chain that needs all rows (a whole-data step) must see every file; its rows of the
        # chosen days are then kept. Otherwise only the chosen days' files are read, and of a file
        # that holds other days too, only the chosen days' rows.
        whole = not h.experiments.batchable(name) and ordered
        read = files if whole else needed
        frames = list(_frames(h, name, read, window, order=False, days=chosen if ordered else None))
        return pl.concat(frames, how="diagonal_relaxed") if frames else _empty(h, name)
    if strategy == "head":
        parts, remaining = [], n
        for df in _frames(h, name, files, window, order=ordered, limit_each=n):
            parts.append(df.head(remaining))
            remaining -= parts[-1].height
            if remaining <= 0:
                break
        return pl.concat(parts, how="diagonal_relaxed") if parts else _empty(h, name)
    parts, seen = [], 0
    for df in _frames(h, name, files, window, order=ordered):
        parts.append(df.gather_every(step, offset=(-seen) % step) if (-seen) % step < df.height else df.head(0))
        seen += df.height
    return pl.concat(parts, how="diagonal_relaxed") if parts else _empty(h, name)


def _empty(h: Harness, name: str) -> pl.DataFrame:
    return pl.DataFrame(schema=h.relation_schema(name))


def _frames(
    h: Harness,
    name: str,
    files: Sequence[FileInfo],
    window: SessionWindow | None,
    *,
    order: bool,
    limit_each: int | None = None,
    days: Sequence[dt.date] | None = None,
) -> Iterator[pl.DataFrame]:
    """The experiment's rows over ``files`` (of ``days`` only, labelled as ``by="day"`` labels
    them): one file batch at a time when the chain allows it (so ``head`` stops reading early),
    else from one query over those files only."""
    if not files:
        return
    dataset = dataclasses.replace(h.dataset, files=list(files))
    batchable = h.experiments.batchable(name)
    if not batchable:
        groups = [list(files)]
    elif h.experiments.has_python(name):  # a per-batch Python step sees whole days
        groups = day_groups(dataset, window)
    else:
        groups = [[f] for f in files]
    per_row = moves_time(dataset, h.experiments, name)
    rows_aware = aware_in(dataset, h.experiments.columns(name))
    con = dataset.connection(1 if batchable else h.workers).open()
    try:
        for group in groups:
            rel = build_chain(con, dataset, h.experiments, name, group, window, h.tracer, h.batch_size)
            where = None
            if days is not None:
                _, day = window_and_day(dataset, group, window, day_per_row=per_row, rows_aware=rows_aware)
                where = exp.In(this=day, expressions=[sb.date(d) for d in days])
            q = sb.select([exp.Star()], exp.Table(this=sb.ident(rel)), where=where)
            if order and h.dataset.time_column is not None:
                q = q.order_by(sb.column(h.dataset.time_column))
            if limit_each is not None:
                q = q.limit(limit_each)
            sql = sb.render(q)
            if h.tracer is not None:
                h.tracer(sql)
            yield interruptible(con, lambda sql=sql: con.sql(sql).pl())  # type: ignore[misc]
    finally:
        con.close()


SAMPLE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


def sample_format(target: str) -> str:
    """The format a sample is written in, from the output's extension (``.parquet``, ``.pq`` or
    ``.csv``); any other is refused before any work, rather than written as something else.

    Example:
        >>> sample_format("out/s.CSV"), sample_format("s.parquet")
        ('csv', 'parquet')
    """
    ext = os.path.splitext(target)[1].lower()
    if ext not in SAMPLE_FORMATS:
        raise InputError(
            f"Cannot write {target}: a sample is written as Parquet (.parquet, .pq) or CSV (.csv), chosen by "
            f"the extension; give one of those."
        )
    return SAMPLE_FORMATS[ext]


def write_sample(df: pl.DataFrame, target: str, *, overwrite: bool) -> None:
    """Write a sample to ``target`` (a path from :func:`duckharness.outputs.paths.check_output`), as
    Parquet or CSV by its extension (:func:`sample_format`), under a temporary name, then move it
    into place: a failure leaves nothing, and names ``target``."""
    fmt = sample_format(target)
    with written_atomically(target, overwrite=overwrite) as tmp:
        try:
            if fmt == "csv":
                df.write_csv(tmp)
            else:
                df.write_parquet(tmp)
        except pl.exceptions.PolarsError as e:
            raise write_error(e, target, tmp) from e
