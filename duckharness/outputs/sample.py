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
from duckharness.engine.plan import file_days, local_dates
from duckharness.errors import InputError
from duckharness.execution.connection import interruptible
from duckharness.experiments.chain import build_chain
from duckharness.outputs.paths import write_error, written_atomically

if TYPE_CHECKING:
    from duckharness.harness import Harness

STRATEGIES = ("random_days", "head", "gather_every")


def days_of_files(files: Sequence[FileInfo], tz: str, window: SessionWindow | None) -> dict[dt.date, list[FileInfo]]:
    """Local days and the files that may hold rows of each inside the window (a file's time range
    must reach into that day's window); files without statistics count as one 'day' each, keyed
    by their position."""
    out: dict[dt.date, list[FileInfo]] = {}
    for i, f in enumerate(files):
        if not f.rows:
            continue  # an empty file holds no day
        if f.time_min is None or f.time_max is None:
            out.setdefault(dt.date.min + dt.timedelta(days=i), []).append(f)
            continue
        lo, hi = _utc(f.time_min), _utc(f.time_max)
        for d in file_days(f, tz, window):
            if window is not None:
                start, end, _ = window.bounds(d)
                if hi < start or lo > end:
                    continue
            out.setdefault(d, []).append(f)
    return out


def _utc(x: dt.datetime) -> dt.datetime:
    return x.astimezone(dt.UTC) if x.tzinfo else x.replace(tzinfo=dt.UTC)  # naive times are UTC


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
    tz = window.timezone if window is not None else h.dataset.metadata.timezone
    files = sorted(h.dataset.files, key=lambda f: (f.time_min is None, f.time_min or dt.datetime.min, f.path))
    tcol = h.dataset.time_column
    ordered = tcol is not None and tcol in h.experiments.columns(name)
    if strategy == "random_days":
        by_day = days_of_files(files, tz, window)
        chosen = sorted(random.Random(seed).sample(sorted(by_day), min(n_days, len(by_day))))
        needed = list({f.path: f for d in chosen for f in by_day[d]}.values())
        # A chain that needs all rows (a whole-data step) must see every file; its rows of the
        # chosen days are then kept. Otherwise only the chosen days' files are read.
        whole = not h.experiments.batchable(name) and ordered
        frames = list(_frames(h, name, files if whole else needed, window, order=False))
        out = pl.concat(frames, how="diagonal_relaxed") if frames else _empty(h, name)
        spans_more = any(len(local_dates(f.time_min, f.time_max, tz)) > 1 for f in needed if f.time_min and f.time_max)
        if ordered and (spans_more or whole) and out.height:
            assert tcol is not None
            instant = pl.col(tcol)
            if getattr(out.schema[tcol], "time_zone", None) is None:  # naive times are UTC
                instant = instant.dt.replace_time_zone("UTC")
            out = out.filter(instant.dt.convert_time_zone(tz).dt.date().is_in(chosen))
        return out
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
) -> Iterator[pl.DataFrame]:
    """The experiment's rows over ``files``: one file batch at a time when the chain allows it
    (so ``head`` stops reading early), else from one query over those files only."""
    if not files:
        return
    dataset = dataclasses.replace(h.dataset, files=list(files))
    batchable = h.experiments.batchable(name)
    groups = [[f] for f in files] if batchable else [list(files)]
    con = dataset.connection(1 if batchable else h.workers).open()
    try:
        for group in groups:
            rel = build_chain(con, dataset, h.experiments, name, group, window, h.tracer, h.batch_size)
            q = sb.select([exp.Star()], exp.Table(this=sb.ident(rel)))
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
