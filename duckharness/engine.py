"""A metrics run: plan, map over file batches, merge partial stats, finalize, tidy.

The map phase runs one fused aggregate query per batch (see :mod:`duckharness.plan`); the reduce
phase merges the partial stats of each (experiment, pair) over the cells that belong to it and
evaluates each metric's final SQL on the merged rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import duckdb
import numpy as np
import polars as pl
from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.cache import StatsCache
from duckharness.chain import build_chain
from duckharness.connection import ConnectionConfig, fetch_all
from duckharness.errors import ExecutionError, InputError, UnknownColumnError
from duckharness.executor import Executor
from duckharness.experiments import Experiments, Inlined
from duckharness.metadata import SessionWindow
from duckharness.metricfile import Metric
from duckharness.plan import (
    DAY,
    MAX_VIEW_WINDOW_DAYS,
    PART,
    ROWS,
    FusedScan,
    Pair,
    Target,
    batch_relation,
    group_key,
    round_shift,
    window_and_day,
)
from duckharness.progress import Progress
from duckharness.source import Dataset, FileInfo
from duckharness.stats import reduce_runs

Tracer = Callable[[str], None]


@dataclass
class RunStats:
    """What a run did: phase timings in seconds, batches, files and queries."""

    timings: dict[str, float] = field(default_factory=dict)
    batches: int = 0
    files: int = 0
    cache_hits: int = 0
    queries: list[str] = field(default_factory=list)


def baseline_query(dataset: Dataset, window: SessionWindow | None) -> exp.Expr:
    """``SELECT * FROM read_parquet([...]) WHERE <window on every day>`` over the whole source."""
    where, _ = window_and_day(dataset, dataset.files, window, need_day=False, max_window_days=MAX_VIEW_WINDOW_DAYS)
    return sb.select([exp.Star()], sb.read_parquet(dataset.paths), where=where)


def make_batches(files: Sequence[FileInfo], batch_size: int) -> list[list[FileInfo]]:
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}.")
    return [list(files[i : i + batch_size]) for i in range(0, len(files), batch_size)]


def _frame(con: duckdb.DuckDBPyConnection, sql: str, tracer: Tracer | None) -> pl.DataFrame:
    if tracer is not None:
        tracer(sql)
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    rows = cur.fetchall()
    frame = pl.DataFrame(rows, schema=names, orient="row", infer_schema_length=None)
    # Give empty batches (no rows in the window) the same types as the others.
    fixed: dict[str, type[pl.DataType]] = {n: pl.Float64 for n in names if n.startswith("__s") or n == ROWS}
    fixed |= {n: pl.Boolean for n in names if n.startswith("__k")}
    if PART in names:
        fixed[PART] = pl.Int32
    if DAY in names:
        fixed[DAY] = pl.Date
    return frame.cast(fixed)  # type: ignore[arg-type,unused-ignore]


def run_metrics(
    dataset: Dataset,
    experiments: Experiments,
    names: Sequence[str],
    pairs: Sequence[Pair],
    metrics: Sequence[Metric],
    by: Sequence[str],
    window: SessionWindow | None,
    *,
    executor: Executor,
    batch_size: int = 1,
    tracer: Tracer | None = None,
    stats: RunStats | None = None,
    progress: bool | None = None,
    cache: StatsCache | None = None,
    control: duckdb.DuckDBPyConnection | None = None,
) -> pl.DataFrame:
    """Compute ``metrics`` for every experiment in ``names`` and pair, grouped by ``by``.

    ``control`` is a connection (configured as ``dataset.connection(1)``) for the run's small
    queries: the shifts and the final formulas; without one, the run opens its own."""
    stats = stats if stats is not None else RunStats()
    with _control(dataset, control) as con:
        results, out_keys = _map_partials(
            dataset,
            experiments,
            names,
            pairs,
            metrics,
            by,
            window,
            executor,
            batch_size,
            tracer,
            stats,
            progress,
            cache,
            con,
        )
        t3 = time.perf_counter()
        tidy = finalize(results, metrics, out_keys, names, pairs, tracer, con)
    stats.timings["reduce"] = time.perf_counter() - t3
    return tidy


def run_stats(
    dataset: Dataset,
    experiments: Experiments,
    names: Sequence[str],
    pairs: Sequence[Pair],
    metrics: Sequence[Metric],
    by: Sequence[str],
    window: SessionWindow | None,
    *,
    executor: Executor,
    batch_size: int = 1,
    tracer: Tracer | None = None,
    stats: RunStats | None = None,
    progress: bool | None = None,
    cache: StatsCache | None = None,
    control: duckdb.DuckDBPyConnection | None = None,
) -> dict[str, pl.DataFrame]:
    """The merged sufficient statistics of each metric (not finalized), from the same scan as
    :func:`run_metrics`: per metric a frame ``experiment, pred, target, [by...], <stat columns>``.
    Groups with no valid rows are absent."""
    stats = stats if stats is not None else RunStats()
    with _control(dataset, control) as con:
        results, out_keys = _map_partials(
            dataset,
            experiments,
            names,
            pairs,
            metrics,
            by,
            window,
            executor,
            batch_size,
            tracer,
            stats,
            progress,
            cache,
            con,
        )
    t3 = time.perf_counter()
    per_metric = merge_results(results, metrics, out_keys).per_metric()
    stats.timings["reduce"] = time.perf_counter() - t3
    return {name: frame.rename({DAY: "day"}) if DAY in frame.columns else frame for name, frame in per_metric.items()}


def _map_partials(
    dataset: Dataset,
    experiments: Experiments,
    names: Sequence[str],
    pairs: Sequence[Pair],
    metrics: Sequence[Metric],
    by: Sequence[str],
    window: SessionWindow | None,
    executor: Executor,
    batch_size: int,
    tracer: Tracer | None,
    stats: RunStats,
    progress: bool | None,
    cache: StatsCache | None,
    control: duckdb.DuckDBPyConnection,
) -> tuple[list[tuple[list[Target], pl.DataFrame]], list[str]]:
    """The map phase: partial stats of every batch, for each group of targets."""
    t0 = time.perf_counter()
    fused: dict[str, tuple[Inlined, Mapping[str, str]]] = {}
    whole: list[str] = []
    for n in names:
        inl = experiments.inline(n)
        if inl is None:
            whole.append(n)
        else:
            fused[n] = (inl, experiments.columns(n))
    out_keys = ([DAY] if "day" in by else []) + [group_key(b) for b in by if b != "day"]
    if "day" in by and dataset.time_column is None:
        raise InputError("Cannot group by day: the source has no time column (set 'time_column' in metadata.json).")
    results: list[tuple[list[Target], pl.DataFrame]] = []
    batches = make_batches(dataset.files, batch_size)
    stats.batches, stats.files = len(batches), len(dataset.files)
    stats.timings["plan"] = time.perf_counter() - t0

    executor.with_config(dataset.connection(1))
    bar = Progress(len(batches) * ((1 if fused else 0) + len(whole)), "metrics", enabled=progress)
    if fused:
        scan = FusedScan(dataset, fused, pairs, metrics, by)
        shifts, sampled_nan = _shifts(scan, batch_relation(dataset, batches[0]), tracer, control, cache, batches[0])
        targets = scan.build(shifts)
        sqls = [scan.batch_query(b, window) for b in batches]
        # Batches whose inputs the footers show NULL-free run without validity keys; their check
        # sums then prove there was no NaN or infinity, or the batch is run again with the keys.
        # (When the sampled first rows already hold a NaN, every batch carries its keys at once.)
        fast = [not sampled_nan and scan.fast_eligible(targets, b) for b in batches]
        stats.queries.extend(sqls[:1])
        t1 = time.perf_counter()
        stats.timings["plan"] = t1 - t0  # resolving the chain, the shifts query, building every query
        keys = [cache.key(sql, b) for sql, b in zip(sqls, batches, strict=True)] if cache is not None else []
        cached: list[pl.DataFrame | None] = cache.get_many(keys) if cache is not None else [None] * len(sqls)
        needed = {DAY, *(n for n, _ in scan.by), *scan.keys, *scan.aggregates}
        cached = [f if f is not None and needed <= set(f.columns) else None for f in cached]  # not ours: recompute
        todo = [i for i, c in enumerate(cached) if c is None]
        stats.cache_hits = len(sqls) - len(todo)
        if tracer is not None:
            for i, b in enumerate(batches):
                if cached[i] is not None:
                    tracer(f"-- from the cache: {', '.join(f.path for f in b)}")
        bar.advance(stats.cache_hits)

        def compute(chosen: Sequence[int], *, full: bool = False) -> list[pl.DataFrame]:
            """The partials of the chosen batches. With fewer batches than workers (say, the new
            day of an incremental run), a batch of several parts runs as one query per part, so
            idle workers help; the parts' rows are the same either way."""
            split = len(chosen) < executor.workers
            runs = []
            for i in chosen:
                b = batches[i]
                n = len(scan.parts(b)) if split else 1
                use_fast = fast[i] and not full
                queries = [scan.batch_query(b, window, fast=use_fast, part=j if n > 1 else None) for j in range(n)]
                runs.append(queries)
            flat = [q for qs in runs for q in qs]
            files_of = {q: [f.path for f in batches[i]] for i, qs in zip(chosen, runs, strict=True) for q in qs}
            if tracer is not None:
                for q in flat:
                    tracer(q)
            bar.total += len(flat) - len(chosen)
            done = iter(
                executor.map(_sql_task, flat, describe=lambda sql: files_of[sql], on_done=bar.advance, home=control)
            )
            return [pl.concat([next(done) for _ in qs], how="vertical_relaxed") for qs in runs]

        computed = compute(todo)
        checks = sorted({c for t in targets for c in t.checks})
        redo = [
            k
            for k, (i, frame) in enumerate(zip(todo, computed, strict=True))
            if fast[i]
            and frame.height
            and not frame.select(pl.all_horizontal([pl.col(c).is_finite() for c in checks]).all()).item()
        ]
        if redo:  # a NaN or infinity somewhere: those batches need their validity keys after all
            bar.total += len(redo)
            for k, frame in zip(redo, compute([todo[k] for k in redo], full=True), strict=True):
                computed[k] = frame
        redone = {todo[k] for k in redo}
        for i, frame in zip(todo, computed, strict=True):
            if fast[i] and i not in redone:
                frame = frame.with_columns([pl.lit(True).alias(v) for v in sorted(scan.valid_keys)])
            frame = canonical(frame, scan)
            cached[i] = frame
            if cache is not None:
                cache.put(keys[i], frame)
        # Entries are stored canonical; ones cached by a version without part keys get theirs here.
        frames = [f if PART in f.columns else canonical(f, scan) for f in cached if f is not None]
        stats.timings["map"] = time.perf_counter() - t1
        results.append((targets, pl.concat(frames, how="vertical_relaxed")))

    t2 = time.perf_counter()
    for n in whole:
        results.append(
            _run_chain(
                dataset, experiments, n, pairs, metrics, by, window, batches, executor, tracer, stats, batch_size
            )
        )
        bar.advance(len(batches))
    bar.close()
    if whole:
        stats.timings["whole"] = time.perf_counter() - t2
    return results, out_keys


def _run_chain(
    dataset: Dataset,
    experiments: Experiments,
    name: str,
    pairs: Sequence[Pair],
    metrics: Sequence[Metric],
    by: Sequence[str],
    window: SessionWindow | None,
    batches: list[list[FileInfo]],
    executor: Executor,
    tracer: Tracer | None,
    stats: RunStats,
    batch_size: int,
) -> tuple[list[Target], pl.DataFrame]:
    """Metrics of an experiment that the fused scan cannot answer: its chain is built as views
    (and Python steps) on a connection, per batch when that gives the same rows as running it on
    all data (:meth:`Experiments.batchable`), else once over all files."""
    cols = experiments.columns(name)
    scan = FusedScan(
        dataset, {name: (Inlined((), {c: sb.column(c) for c in cols}), cols)}, pairs, metrics, by, columns=cols
    )
    tcol = dataset.time_column
    if "day" in by and (tcol is None or tcol not in cols):
        raise UnknownColumnError(
            f"Cannot group experiment {name!r} by day: it has no time column {tcol!r}.",
            column=str(tcol),
            experiment=name,
        )
    rel = exp.Table(this=sb.ident(name))

    def aggregate(files: Sequence[FileInfo]) -> str:
        _, day = window_and_day(dataset, files, window, need_day="day" in by)
        sql = sb.render(scan.whole_query(rel, day))
        if not stats.queries or stats.queries[-1] != sql:
            stats.queries.append(sql)
        return sql

    per_batch = experiments.batchable(name)
    groups = batches if per_batch else [list(dataset.files)]
    first = dataset.connection(1 if per_batch else executor.workers).open()
    try:
        build_chain(first, dataset, experiments, name, groups[0], window, tracer, batch_size)
        shifts, _ = _shifts(scan, rel, tracer, con=first)
        targets = scan.build(shifts)
        try:
            frames = [_frame(first, aggregate(groups[0]), tracer)]
        except duckdb.Error as e:
            raise ExecutionError(
                f"Experiment {name!r} failed: {str(e).strip().splitlines()[0]}", files=[f.path for f in groups[0]]
            ) from e
    finally:
        first.close()

    tasks = [ChainTask(dataset, experiments, name, list(g), window, batch_size, aggregate(g)) for g in groups[1:]]
    frames += executor.map(run_chain_task, tasks, describe=lambda t: [f.path for f in t.files])
    return targets, pl.concat(frames, how="vertical_relaxed")


@dataclass
class ChainTask:
    """One batch of an experiment run through its chain on a worker: build, then aggregate."""

    dataset: Dataset
    experiments: Experiments
    name: str
    files: list[FileInfo]
    window: SessionWindow | None
    batch_size: int
    sql: str


def canonical(frame: pl.DataFrame, scan: FusedScan) -> pl.DataFrame:
    """A batch's partials in one order, sorted by their group and cell keys (a part column for
    batches without parts), however their queries were split and whatever order DuckDB gave."""
    if PART not in frame.columns:
        frame = frame.with_columns(pl.lit(0, dtype=pl.Int32).alias(PART))
    frame = frame.select(cached_columns(frame, scan))
    keys = [c for c in frame.columns if c not in scan.aggregates]
    return frame.sort(keys, nulls_last=True) if frame.height > 1 else frame


def cached_columns(frame: pl.DataFrame, scan: FusedScan) -> list[str]:
    """The partial frame's columns in one order (fast and full batches order keys differently)."""
    names = [DAY, *[n for n, _ in scan.by], PART, *scan.keys, *scan.aggregates]
    return [n for n in names if n in frame.columns]


def run_chain_task(con: duckdb.DuckDBPyConnection, task: ChainTask) -> pl.DataFrame:
    build_chain(con, task.dataset, task.experiments, task.name, task.files, task.window, None, task.batch_size)
    return _frame(con, task.sql, None)


def _sql_task(con: duckdb.DuckDBPyConnection, sql: str) -> pl.DataFrame:
    return _frame(con, sql, None)


def _shifts(
    scan: FusedScan,
    relation: exp.Expr,
    tracer: Tracer | None,
    con: duckdb.DuckDBPyConnection,
    cache: StatsCache | None = None,
    files: Sequence[FileInfo] = (),
) -> tuple[dict[str, float], bool]:
    """The shift of each pred/target expression (the median of its first rows, rounded) and
    whether those rows hold a NaN or an infinity. With a cache, the values are kept under the
    shift query and the identities of the files it reads, so a re-run writes the same batch
    queries (whose cached partials it can then reuse)."""
    q = scan.shift_query(relation)
    if q is None:
        return {}, False
    sql = sb.render(q)
    key = cache.key(sql, files) if cache is not None and files else None
    row: list[float | None] | None = cache.get_values(key) if cache is not None and key is not None else None
    exprs = scan.shift_expressions()
    if row is None or len(row) != 2 * len(exprs):
        try:
            row = [None if v is None else float(v) for v in fetch_all(con, sql, tracer)[0]]
        except duckdb.Error as e:
            paths = [f.path for f in files]
            where = f" ({', '.join(paths)})" if paths else ""
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExecutionError(f"The query of the first rows{where} failed: {first}", files=paths, sql=sql) from e
        if cache is not None and key is not None:
            cache.put_values(key, row)
    elif tracer is not None:
        tracer(f"-- shifts from the cache: {', '.join(f.path for f in files)}")
    medians, bad = row[: len(exprs)], row[len(exprs) :]
    shifts = {sb.render(e): round_shift(v) for e, v in zip(exprs, medians, strict=True)}
    return shifts, any(b for b in bad)


@contextmanager
def _control(dataset: Dataset, con: duckdb.DuckDBPyConnection | None) -> Iterator[duckdb.DuckDBPyConnection]:
    """The given control connection, or one opened (and closed) for this run."""
    if con is not None:
        yield con
        return
    own = dataset.connection(1).open()
    try:
        yield own
    finally:
        own.close()


def finalize(
    results: Sequence[tuple[list[Target], pl.DataFrame]],
    metrics: Sequence[Metric],
    out_keys: Sequence[str],
    names: Sequence[str],
    pairs: Sequence[Pair],
    tracer: Tracer | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> pl.DataFrame:
    """Merge each target's cells and evaluate every metric's final query; tidy output."""
    merged = merge_results(results, metrics, out_keys)
    values = evaluate_finals(metrics, merged.stats, con, tracer)
    label_cols = ["experiment", "pred", "target", *out_keys]
    frames = [
        merged.labels.with_columns(pl.lit(m.name).alias("metric"), pl.Series("value", v, dtype=pl.Float64))
        for m, v in zip(metrics, values, strict=True)
    ]
    frames.append(merged.labels.with_columns(pl.lit("n_excluded").alias("metric"), pl.Series("value", merged.excluded)))
    out = pl.concat([f.select(*label_cols, "metric", "value") for f in frames], how="vertical_relaxed")
    # NaN from 0/0 in a final formula means "undefined": report it as null.
    out = out.with_columns(pl.when(pl.col("value").is_nan()).then(None).otherwise(pl.col("value")).alias("value"))
    order = {
        "experiment": {n: i for i, n in enumerate(names)},
        "pred": {p.pred: i for i, p in enumerate(pairs)},
        "metric": {m.name: i for i, m in enumerate(metrics)} | {"n_excluded": len(metrics)},
    }
    out = out.with_columns(
        *[
            pl.col(c).replace_strict(o, default=len(o), return_dtype=pl.Int64).alias(f"__o_{c}")
            for c, o in order.items()
        ]
    )
    out = out.sort(["__o_experiment", "__o_pred", "target", *out_keys, "__o_metric"]).drop([f"__o_{c}" for c in order])
    return out.rename({DAY: "day"}) if DAY in out_keys else out


@dataclass
class Merged:
    """The merged cells of every target: one row per (experiment, pair, group) in ``labels``
    (``experiment, pred, target, <group keys>``), the same rows of each metric's stats in
    ``stats[metric]`` (one column per stat), and the rows excluded as invalid."""

    labels: pl.DataFrame
    stats: dict[str, pl.DataFrame]
    excluded: np.ndarray

    def per_metric(self) -> dict[str, pl.DataFrame]:
        return {name: pl.concat([self.labels, frame], how="horizontal") for name, frame in self.stats.items()}


def merge_results(
    results: Sequence[tuple[list[Target], pl.DataFrame]], metrics: Sequence[Metric], out_keys: Sequence[str]
) -> Merged:
    """Merge each target's cells: the stats of its valid cells, per group, and the count of the
    rows in its invalid cells (``n_excluded``).

    Every group where a target's conditions select a cell gets a row (with no group keys: one
    row per target), so each group that has rows gets every metric and ``n_excluded``. Cells
    merge in a fixed order, by group and then by position (:func:`duckharness.stats.reduce_runs`),
    so the same partials give the same bits. Each partials frame is turned into one matrix, and
    each target is a row selection and a column selection of it.
    """
    out_keys = list(out_keys)
    label_parts: list[pl.DataFrame] = []
    stat_parts: dict[str, list[np.ndarray]] = {m.name: [] for m in metrics}
    seen_parts: dict[str, list[np.ndarray]] = {m.name: [] for m in metrics}
    excluded_parts: list[np.ndarray] = []
    for targets, partials in results:
        n = partials.height
        if out_keys:
            ordered = partials.select(out_keys).with_row_index("__pos").sort([*out_keys, "__pos"], nulls_last=True)
            order = ordered["__pos"].to_numpy()
            group = ordered.select(pl.struct(out_keys).rle_id()).to_series().to_numpy() if n else np.zeros(0, np.int64)
            sorted_keys = ordered.select(out_keys)
        else:
            order, group, sorted_keys = np.arange(n), np.zeros(n, dtype=np.int64), None
        stat_cols = sorted({ROWS} | {c for t in targets for m in metrics for c in t.stats[m.name].values()})
        merge_of = {t.stats[m.name][s]: m.merge[s] for t in targets for m in metrics for s in m.stat_names}
        key_cols = sorted({k for t in targets for k in (*t.conds, t.valid)})
        col = {c: j for j, c in enumerate(stat_cols)}
        flag = {k: j for j, k in enumerate(key_cols)}
        values = _matrix(partials, [pl.col(c).cast(pl.Float64) for c in stat_cols], np.float64)[order]
        missing = _matrix(partials, [pl.col(c).is_null() for c in stat_cols], bool)[order]
        flags = _matrix(partials, [pl.col(k).fill_null(False) for k in key_cols], bool)[order]  # NULL selects nothing
        for t in targets:
            selected = np.ones(n, dtype=bool)
            for k in t.conds:
                selected &= flags[:, flag[k]]
            rows = np.flatnonzero(selected)
            if out_keys:
                starts = np.flatnonzero(np.diff(group[rows], prepend=-1)) if len(rows) else np.zeros(0, np.int64)
                keys = sorted_keys[rows[starts].tolist()] if sorted_keys is not None else None
            else:
                starts, keys = np.zeros(1, dtype=np.int64), None
            valid = flags[rows, flag[t.valid]]
            # Every stat column of the target and the excluded rows, merged in one pass.
            used = list(dict.fromkeys(t.stats[m.name][s] for m in metrics for s in m.stat_names))
            how = [merge_of[c] for c in used]
            block = values[rows][:, [col[c] for c in [*used, ROWS]]]
            skip = missing[rows][:, [col[c] for c in used]] | ~valid[:, None]  # stats: valid cells only
            invalid = np.where(valid, 0.0, block[:, -1])[:, None]
            merged, seen = reduce_runs(
                np.hstack([block[:, :-1], invalid]),
                np.hstack([skip, np.zeros(invalid.shape, dtype=bool)]),
                starts,
                [*how, "sum"],
            )
            excluded_parts.append(merged[:, -1])
            groups = len(starts)
            label = pl.DataFrame(
                {
                    "experiment": [t.experiment] * groups,
                    "pred": [t.pair.pred] * groups,
                    "target": [t.pair.target] * groups,
                },
                schema={"experiment": pl.String, "pred": pl.String, "target": pl.String},
            )
            label_parts.append(pl.concat([label, keys], how="horizontal") if keys is not None else label)
            where = {c: j for j, c in enumerate(used)}
            for m in metrics:
                idx = [where[t.stats[m.name][s]] for s in m.stat_names]
                stat_parts[m.name].append(merged[:, idx])
                seen_parts[m.name].append(seen[:, idx])
    labels = (
        pl.concat(label_parts, how="vertical_relaxed")
        if label_parts
        else pl.DataFrame(schema={"experiment": pl.String, "pred": pl.String, "target": pl.String})
    )
    stats: dict[str, pl.DataFrame] = {}
    for m in metrics:
        width = len(m.stat_names)
        matrix = np.vstack(stat_parts[m.name]) if stat_parts[m.name] else np.zeros((0, width))
        seen = np.vstack(seen_parts[m.name]) if seen_parts[m.name] else np.zeros((0, width), dtype=bool)
        columns = []
        for j, s in enumerate(m.stat_names):
            series = pl.Series(s, matrix[:, j], dtype=pl.Float64)
            if m.merge[s] != "sum":  # a min/max over no values is null (a NaN in the data stays NaN)
                series = series.scatter(np.flatnonzero(~seen[:, j]), None)
            columns.append(series)
        stats[m.name] = pl.DataFrame(columns)
    excluded = np.concatenate(excluded_parts) if excluded_parts else np.zeros(0)
    return Merged(labels, stats, excluded)


def _matrix(frame: pl.DataFrame, exprs: Sequence[pl.Expr], dtype: type) -> np.ndarray:
    """``exprs`` over ``frame`` as one ``(rows, len(exprs))`` numpy matrix."""
    if not exprs:
        return np.zeros((frame.height, 0), dtype=dtype)
    return frame.select(exprs).to_numpy().astype(dtype, copy=False).reshape(frame.height, len(exprs))


def evaluate_finals(
    metrics: Sequence[Metric],
    stats: Mapping[str, pl.DataFrame],
    con: duckdb.DuckDBPyConnection | None = None,
    tracer: Tracer | None = None,
) -> list[list[float | None]]:
    """Every metric's final formula on its merged stats, in one query: the stats of metric ``m``
    are columns ``"m.stat"`` of one table ``merged``, and its formula reads them under those
    names. Returns, per metric, the values in row order."""
    if not metrics:
        return []
    columns = {f"{m.name}.{s}": stats[m.name].get_column(s).cast(pl.Float64) for m in metrics for s in m.stat_names}
    height = stats[metrics[0].name].height
    finals = [
        sb.alias(sb.substitute_columns(m.final, {s: sb.column(f"{m.name}.{s}") for s in m.stat_names}), m.name)
        for m in metrics
    ]
    sql = sb.render(sb.select([sb.column("__i"), *finals], "merged").order_by("__i", copy=False), copy=False)
    if tracer is not None:
        tracer(sql)
    # NULL-free stats go in as numpy arrays (no Arrow conversion); a NULL (a min or max over no
    # rows) needs the frame.
    table: dict[str, np.ndarray] | pl.DataFrame
    if any(c.null_count() for c in columns.values()):
        table = pl.DataFrame([c.alias(n) for n, c in columns.items()]).with_row_index("__i")
    else:
        table = {"__i": np.arange(height, dtype=np.int64)} | {n: c.to_numpy() for n, c in columns.items()}
    own = con is None
    con = con or ConnectionConfig(threads=1).open()
    try:
        con.register("merged", table)
        try:
            rows = con.execute(sql).fetchall()
        finally:
            con.unregister("merged")
    finally:
        if own:
            con.close()
    return [[None if r[j + 1] is None else float(r[j + 1]) for r in rows] for j in range(len(metrics))]


def evaluate_final(
    metric: Metric, merged: pl.DataFrame, con: duckdb.DuckDBPyConnection | None = None, tracer: Tracer | None = None
) -> list[float | None]:
    """The metric's final query on each row of ``merged`` (its stat columns), in row order."""
    return evaluate_finals([metric], {metric.name: merged}, con, tracer)[0]
