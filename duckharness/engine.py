"""A metrics run: plan, map over file batches, merge partial stats, finalize, tidy.

The map phase runs one fused aggregate query per batch (see :mod:`duckharness.plan`); the reduce
phase merges the partial stats of each (experiment, pair) over the cells that belong to it and
evaluates each metric's final SQL on the merged rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import duckdb
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
from duckharness.stats import merge_partials

Tracer = Callable[[str], None]
EXCLUDED = "__excluded"


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
) -> pl.DataFrame:
    """Compute ``metrics`` for every experiment in ``names`` and pair, grouped by ``by``."""
    stats = stats if stats is not None else RunStats()
    results, out_keys = _map_partials(
        dataset, experiments, names, pairs, metrics, by, window, executor, batch_size, tracer, stats, progress, cache
    )
    t3 = time.perf_counter()
    tidy = finalize(results, metrics, out_keys, names, pairs, tracer)
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
) -> dict[str, pl.DataFrame]:
    """The merged sufficient statistics of each metric (not finalized), from the same scan as
    :func:`run_metrics`: per metric a frame ``experiment, pred, target, [by...], <stat columns>``.
    Groups with no valid rows are absent."""
    stats = stats if stats is not None else RunStats()
    results, out_keys = _map_partials(
        dataset, experiments, names, pairs, metrics, by, window, executor, batch_size, tracer, stats, progress, cache
    )
    t3 = time.perf_counter()
    per_metric, _ = merge_results(results, metrics, out_keys)
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
        shifts = _shifts(scan, batch_relation(dataset, batches[0]), tracer)
        targets = scan.build(shifts)
        sqls = [scan.batch_query(b, window) for b in batches]
        # Batches whose inputs the footers show NULL-free run without validity keys; their check
        # sums then prove there was no NaN or infinity, or the batch is run again with the keys.
        fast = [scan.batch_query(b, window, fast=True) if scan.fast_eligible(targets, b) else None for b in batches]
        stats.queries.extend(sqls[:1])
        t1 = time.perf_counter()
        stats.timings["plan"] = t1 - t0  # resolving the chain, the shifts query, building every query
        files_of = {sql: [f.path for f in b] for sql, b in zip(sqls, batches, strict=True)}
        files_of |= {q: files_of[s] for q, s in zip(fast, sqls, strict=True) if q is not None}
        keys = [cache.key(sql, b) for sql, b in zip(sqls, batches, strict=True)] if cache is not None else []
        cached = [cache.get(k) for k in keys] if cache is not None else [None] * len(sqls)
        todo = [i for i, c in enumerate(cached) if c is None]
        stats.cache_hits = len(sqls) - len(todo)
        run = [fast[i] or sqls[i] for i in todo]
        if tracer is not None:
            for i, sql in enumerate(sqls):
                tracer((fast[i] or sql) if cached[i] is None else f"-- from the cache: {', '.join(files_of[sql])}")
        bar.advance(stats.cache_hits)
        computed = executor.map(_sql_task, run, describe=lambda sql: files_of[sql], on_done=bar.advance)
        checks = sorted({c for t in targets for c in t.checks})
        redo = [
            k
            for k, (i, frame) in enumerate(zip(todo, computed, strict=True))
            if fast[i] is not None
            and frame.height
            and not frame.select(pl.all_horizontal([pl.col(c).is_finite() for c in checks]).all()).item()
        ]
        if redo:  # a NaN or infinity somewhere: those batches need their validity keys after all
            if tracer is not None:
                for k in redo:
                    tracer(sqls[todo[k]])
            again = executor.map(_sql_task, [sqls[todo[k]] for k in redo], describe=lambda sql: files_of[sql])
            for k, frame in zip(redo, again, strict=True):
                computed[k] = frame
        redone = {todo[k] for k in redo}
        for i, frame in zip(todo, computed, strict=True):
            if fast[i] is not None and i not in redone:
                frame = frame.with_columns([pl.lit(True).alias(v) for v in sorted(scan.valid_keys)])
            cached[i] = frame
            if cache is not None:
                cache.put(keys[i], frame)
        frames = [f.select(cached_columns(f, scan)) for f in cached if f is not None]
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
        shifts = _shifts(scan, rel, tracer, con=first)
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


def cached_columns(frame: pl.DataFrame, scan: FusedScan) -> list[str]:
    """The partial frame's columns in one order (fast and full batches order keys differently)."""
    names = [DAY, *[n for n, _ in scan.by], *scan.keys, *scan.aggregates]
    return [n for n in names if n in frame.columns]


def run_chain_task(con: duckdb.DuckDBPyConnection, task: ChainTask) -> pl.DataFrame:
    build_chain(con, task.dataset, task.experiments, task.name, task.files, task.window, None, task.batch_size)
    return _frame(con, task.sql, None)


def _sql_task(con: duckdb.DuckDBPyConnection, sql: str) -> pl.DataFrame:
    return _frame(con, sql, None)


def _shifts(
    scan: FusedScan, relation: exp.Expr, tracer: Tracer | None, con: duckdb.DuckDBPyConnection | None = None
) -> dict[str, float]:
    q = scan.shift_query(relation)
    if q is None:
        return {}
    own = con is None
    con = con or scan.dataset.connection(1).open()
    try:
        row = fetch_all(con, sb.render(q), tracer)[0]
    finally:
        if own:
            con.close()
    return {sb.render(e): round_shift(v) for e, v in zip(scan.shift_expressions(), row, strict=True)}


def finalize(
    results: Sequence[tuple[list[Target], pl.DataFrame]],
    metrics: Sequence[Metric],
    out_keys: Sequence[str],
    names: Sequence[str],
    pairs: Sequence[Pair],
    tracer: Tracer | None = None,
) -> pl.DataFrame:
    """Merge each target's cells and evaluate every metric's final query; tidy output."""
    merged_stats, excluded = merge_results(results, metrics, out_keys)
    frames: list[pl.DataFrame] = []
    con = ConnectionConfig(threads=1).open()
    try:
        for m in metrics:
            merged = merged_stats[m.name]
            values = evaluate_final(m, merged.select(m.stat_names), con, tracer)
            frames.append(
                merged.select("experiment", "pred", "target", *out_keys).with_columns(
                    pl.lit(m.name).alias("metric"), pl.Series("value", values, dtype=pl.Float64)
                )
            )
    finally:
        con.close()
    frames.extend(excluded)
    out = pl.concat(
        [f.select("experiment", "pred", "target", *out_keys, "metric", "value") for f in frames], how="vertical_relaxed"
    )
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


def merge_results(
    results: Sequence[tuple[list[Target], pl.DataFrame]], metrics: Sequence[Metric], out_keys: Sequence[str]
) -> tuple[dict[str, pl.DataFrame], list[pl.DataFrame]]:
    """Merge each target's cells: per metric, a frame of labels, group keys and merged stats;
    and the tidy ``n_excluded`` rows."""
    per_metric: dict[str, list[pl.DataFrame]] = {m.name: [] for m in metrics}
    excluded: list[pl.DataFrame] = []
    plans: list[tuple[Target, pl.DataFrame]] = []
    for targets, partials in results:
        lazy = partials.lazy()
        selections: list[pl.LazyFrame] = []
        merges: list[tuple[Target, dict[str, str]]] = []
        for t in targets:
            selected = pl.lit(True)
            for k in t.conds:
                selected = selected & pl.col(k).fill_null(False)  # a NULL condition does not select
            valid = pl.col(t.valid).fill_null(False)
            # One merge per target over all its cells, so every group that has rows gets every
            # metric and n_excluded: stats come from valid cells only, n_excluded from the rest.
            how: dict[str, str] = {EXCLUDED: "sum"}
            for m in metrics:
                for s, col in t.stats[m.name].items():
                    how[f"{col}|{m.merge[s]}"] = m.merge[s]
            cells = lazy.filter(selected).select(
                *out_keys,
                pl.when(valid).then(0.0).otherwise(pl.col(ROWS)).alias(EXCLUDED),
                *[pl.when(valid).then(pl.col(c.split("|")[0])).alias(c) for c in how if c != EXCLUDED],
            )
            selections.append(cells)
            merges.append((t, how))
        # The cell selections in one Polars call; the merges themselves in a fixed order (stats.py).
        for (t, how), cells_df in zip(merges, pl.collect_all(selections), strict=True):
            plans.append((t, merge_partials(cells_df, out_keys, how)))
    for t, merged in plans:
        label = [
            pl.lit(t.experiment).alias("experiment"),
            pl.lit(t.pair.pred).alias("pred"),
            pl.lit(t.pair.target).alias("target"),
        ]
        excluded.append(
            merged.select(
                *label,
                *out_keys,
                pl.lit("n_excluded").alias("metric"),
                pl.col(EXCLUDED).alias("value"),
            )
        )
        for m in metrics:
            cols = t.stats[m.name]
            per_metric[m.name].append(
                merged.select(*label, *out_keys, *[pl.col(f"{cols[s]}|{m.merge[s]}").alias(s) for s in m.stat_names])
            )
    frames = {m.name: pl.concat(per_metric[m.name], how="vertical_relaxed") for m in metrics}
    return frames, excluded


def evaluate_final(
    metric: Metric, merged: pl.DataFrame, con: duckdb.DuckDBPyConnection | None = None, tracer: Tracer | None = None
) -> list[float | None]:
    """The metric's final query on each row of ``merged`` (its stat columns), in row order."""
    own = con is None
    con = con or ConnectionConfig(threads=1).open()
    try:
        stat_only = merged.select([pl.col(s).cast(pl.Float64) for s in metric.stat_names]).with_row_index("__i")
        con.register("merged", stat_only)
        q = sb.select([sb.column("__i"), sb.alias(metric.final.copy(), "value")], "merged")
        sql = sb.render(q)
        if tracer is not None:
            tracer(sql)
        values = con.sql(sql).pl().sort("__i")
        con.unregister("merged")
    finally:
        if own:
            con.close()
    return [None if v is None else float(v) for v in values["value"].to_list()]
