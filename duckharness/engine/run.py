"""A metrics run: plan, map over file batches, merge partial stats, finalize, tidy.

The map phase runs one fused aggregate query per batch (see :mod:`duckharness.engine.plan`); the reduce
phase merges the partial stats of each (experiment, pair) over the cells that belong to it and
evaluates each metric's final SQL on the merged rows.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import duckdb
import numpy as np
import polars as pl
from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.data.metadata import SessionWindow
from duckharness.data.source import Dataset, FileInfo, date_columns_hint
from duckharness.engine.cache import StatsCache
from duckharness.engine.plan import (
    DAY,
    MAX_VIEW_WINDOW_DAYS,
    OUTPUT_COLUMNS,
    PART,
    ROWS,
    TOD,
    FusedScan,
    Pair,
    ShiftTable,
    Target,
    aware_in,
    batch_relation,
    day_groups,
    file_days,
    group_key,
    moves_time,
    round_shift,
    shift_role,
    split_groupings,
    window_and_day,
)
from duckharness.errors import (
    ExecutionError,
    InputError,
    MetricError,
    UnknownColumnError,
    UnpicklableTaskError,
    warn,
)
from duckharness.execution.connection import ConnectionConfig, fetch_all, interruptible
from duckharness.execution.executor import Executor, OnDone, brief, retryable
from duckharness.execution.progress import Progress
from duckharness.experiments.chain import build_chain, unpicklable_step_error
from duckharness.experiments.steps import BASELINE, Experiments, Inlined
from duckharness.metrics.library import Metric
from duckharness.metrics.merge import reduce_runs

Tracer = Callable[[str], None]


@dataclass
class RunStats:
    """What a run did: phase timings in seconds, batches, files and queries."""

    timings: dict[str, float] = field(default_factory=dict)
    batches: int = 0
    files: int = 0
    cache_hits: int = 0
    recentred: int = 0  # passes run again around groups' own means (see recentre)
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

    def fetch() -> tuple[list[str], list[tuple]]:
        cur = con.execute(sql)
        return [d[0] for d in cur.description], cur.fetchall()

    names, rows = interruptible(con, fetch)
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
    source_days: Sequence[dt.date] = (),
) -> pl.DataFrame:
    """Compute ``metrics`` for every experiment in ``names`` and pair, grouped by ``by``.

    ``control`` is a connection (configured as ``dataset.connection(1)``) for the run's small
    queries: the shifts and the final formulas; without one, the run opens its own.
    ``source_days`` are the days holding source rows in the window (see ``engine/days.py``):
    grouped by day alone, every experiment and pair gets a row for each of them."""
    stats = stats if stats is not None else RunStats()
    with _control(dataset, control) as con:
        refined, out_keys = _map_partials(
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
            modes=(True,),
        )
        t3 = time.perf_counter()
        days = listed_days(dataset, window, source_days) if out_keys == [DAY] else []
        tidy = finalize(refined[True], metrics, out_keys, names, pairs, tracer, con, days=days)
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
) -> tuple[dict[str, pl.DataFrame], dict[str, pl.DataFrame]]:
    """The merged sufficient statistics of each metric (not finalized), from the same scan as
    :func:`run_metrics`, twice: ``(mergeable, per_group)``, per metric a frame ``experiment, pred,
    target, [by...], <stat columns>``. Groups with no valid rows are absent.

    In ``mergeable`` all groups of an experiment share its shifts, so they can be merged further
    (pooled over days, resampled): an experiment far from the run's shift is re-centred as a
    whole. In ``per_group`` each group far from its experiment's level is re-centred on its own
    (what :func:`run_metrics` finalizes): exact per group, not to be merged across groups. A
    group whose level is a day's, say, far from the other days' (a price series), has exact
    values only in ``per_group``. Both come from one first pass; each re-centring pass runs only
    where its check asks for it."""
    stats = stats if stats is not None else RunStats()
    with _control(dataset, control) as con:
        refined, out_keys = _map_partials(
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
            modes=(False, True),
        )
    t3 = time.perf_counter()

    def stats_of(results: list[tuple[list[Target], pl.DataFrame]]) -> dict[str, pl.DataFrame]:
        per_metric = merge_results(results, metrics, out_keys).per_metric()  # days with rows only
        return {n: f.rename({DAY: "day"}) if DAY in f.columns else f for n, f in per_metric.items()}

    mergeable = stats_of(refined[False])
    out = mergeable, mergeable if refined[True] is refined[False] else stats_of(refined[True])
    stats.timings["reduce"] = time.perf_counter() - t3
    return out


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
    modes: Sequence[bool] = (True,),
) -> tuple[dict[bool, list[tuple[list[Target], pl.DataFrame]]], list[str]]:
    """The map phase: partial stats of every batch, for each group of targets, refined for each
    of ``modes`` from the same first pass: groups far from the shift get a further pass (see
    :func:`recentre`), each group around its own mean (mode ``True``: exact per group), or each
    experiment around its mean over all groups (mode ``False``: mergeable across groups)."""
    t0 = time.perf_counter()
    fused: dict[str, tuple[Inlined, Mapping[str, str]]] = {}
    whole: list[str] = []
    labelled = any(b == "day" or b.startswith("tod:") for b in by)
    for n in names:
        inl = experiments.inline(n)
        # An experiment that changes the time column is grouped by its own times, which the
        # fused scan (whose day and time-of-day come from the source rows) cannot do.
        if inl is None or (labelled and moves_time(dataset, experiments, n)):
            whole.append(n)
        else:
            fused[n] = (inl, experiments.columns(n))
    for b in by:  # each experiment groups by its own value of a column: every one must have it
        if b != "day" and not b.startswith("tod:") and not b.startswith("__") and b not in OUTPUT_COLUMNS:
            if not any(b in experiments.columns(n) for n in names):
                raise UnknownColumnError(
                    f"Cannot group by {b!r}: no such column. Use 'day', a 'tod:' bucket or a column: "
                    f"{', '.join(dataset.columns)}.",
                    column=b,
                )
            for n in names:
                if b not in experiments.columns(n):
                    raise UnknownColumnError(
                        f"Cannot group by {b!r}: experiment {n!r} has no such column"
                        + (f" (the source has: {', '.join(dataset.columns)})" if n == BASELINE else "")
                        + ". Group the experiments that have it (experiments=[...], --experiment).",
                        column=b,
                        experiment=n,
                    )
    fused, apart = split_groupings(fused, by, dataset.columns)
    whole = [n for n in names if n in whole or n in apart]
    out_keys = ([DAY] if "day" in by else []) + [group_key(b) for b in by if b != "day"]
    if "day" in by and dataset.time_column is None:
        raise InputError(
            "Cannot group by day: the source has no time column (set 'time_column' in metadata.json to a "
            "TIMESTAMP column)." + date_columns_hint(dataset.columns)
        )
    batches = make_batches(dataset.files, batch_size)
    stats.batches, stats.files = len(batches), len(dataset.files)
    stats.timings["plan"] = time.perf_counter() - t0

    executor.with_config(dataset.connection(1))
    centre = centre_metric(metrics)
    run = _Map(
        dataset=dataset,
        experiments=experiments,
        pairs=pairs,
        metrics=[*metrics, centre] if centre is not None else list(metrics),
        by=by,
        window=window,
        executor=executor,
        batch_size=batch_size,
        tracer=tracer,
        stats=stats,
        cache=cache,
        control=control,
        batches=batches,
        bar=Progress(len(batches) * ((1 if fused else 0) + len(whole)), "metrics", enabled=progress),
        started=t0,
    )
    with run.bar:  # ends its line however the run ends (an error, a Ctrl-C)
        shifts = run.shifts(fused) if fused else ({}, False)
        base = run.passes(fused, whole, shifts, None)
        types = _group_types(dataset, experiments, names, by) if centre is not None else {}
        refined: dict[bool, list[tuple[list[Target], pl.DataFrame]]] = {}
        for per_group in modes:
            own = out_keys if per_group else []  # the groups that get shifts of their own
            same = [m for m in refined if (out_keys if m else []) == own]
            if same:  # ungrouped, both modes are one: refine once
                refined[per_group] = refined[same[0]]
                continue
            results, table = base, None
            for _ in range(RECENTRE_PASSES if centre is not None else 0):
                assert centre is not None
                wider = recentre(merge_results(results, [centre], own), own, types, table)
                if wider is None:
                    break
                table = wider
                stats.recentred += 1
                if tracer is not None:
                    tracer(f"-- groups far from the shift, scanned again around their own means: {len(table.rows)}")
                # Those groups' rows come from the new pass alone; every other group's from the first
                # (ungrouped, the one group is all rows: the new pass alone).
                kept = [(t, _without_groups(f, table)) for t, f in base] if own else []
                results = kept + run.passes(fused, whole, shifts, table)
            refined[per_group] = results
    return refined, out_keys


def listed_days(dataset: Dataset, window: SessionWindow | None, source_days: Sequence[dt.date]) -> list[dt.date]:
    """The days a run by day lists for every experiment and pair, whichever experiments it runs:
    ``source_days`` (the days holding source rows inside the session window, from the day index),
    and the day of each one-day file that has rows, none of them inside the window."""
    days = set(source_days)
    if dataset.time_column is not None:
        tz = window.timezone if window is not None else dataset.metadata.timezone
        for f in dataset.files:
            if f.rows and f.time_min is not None and f.time_max is not None:
                one = file_days(f, tz, window)
                if len(one) == 1:
                    days.add(one[0])
    return sorted(days)


@dataclass
class _Map:
    """What the passes of one map phase share: the data, the question, where to run, and the
    run's record (stats, progress bar)."""

    dataset: Dataset
    experiments: Experiments
    pairs: Sequence[Pair]
    metrics: Sequence[Metric]  # with the centring checks
    by: Sequence[str]
    window: SessionWindow | None
    executor: Executor
    batch_size: int
    tracer: Tracer | None
    stats: RunStats
    cache: StatsCache | None
    control: duckdb.DuckDBPyConnection
    batches: list[list[FileInfo]]
    bar: Progress
    started: float
    _first_scan: FusedScan | None = None

    def scan(self, fused: Mapping[str, tuple[Inlined, Mapping[str, str]]]) -> FusedScan:
        return FusedScan(self.dataset, fused, self.pairs, self.metrics, self.by)

    def shifts(self, fused: Mapping[str, tuple[Inlined, Mapping[str, str]]]) -> tuple[dict[str, float], bool]:
        """The fused experiments' shifts and whether the sampled first rows hold a NaN."""
        self._first_scan = scan = self.scan(fused)
        first = self.batches[0]
        try:
            return _shifts(scan, batch_relation(self.dataset, first), self.tracer, self.control, self.cache, first)
        except ExecutionError as e:  # name the experiment whose SQL fails on these rows, if one does
            raise _blame(scan, [], e, self.window, self.control) from e.__cause__

    def passes(
        self,
        fused: Mapping[str, tuple[Inlined, Mapping[str, str]]],
        whole: Sequence[str],
        shifts: tuple[dict[str, float], bool],
        table: ShiftTable | None,
    ) -> list[tuple[list[Target], pl.DataFrame]]:
        """One pass over the data: the fused scan, then each experiment that needs its chain."""
        out = []
        if fused:
            # A scan renders its aggregates once: a pass with other shifts needs a scan of its own.
            scan = self._first_scan if table is None and self._first_scan is not None else self.scan(fused)
            done = self.fused_pass(scan, *shifts, table)
            if done is not None:
                out.append(done)
        t0 = time.perf_counter()
        for n in whole:
            if table is not None:
                self.bar.total += len(self.batches)
            out.append(
                _run_chain(
                    self.dataset,
                    self.experiments,
                    n,
                    self.pairs,
                    self.metrics,
                    self.by,
                    self.window,
                    self.batches,
                    self.executor,
                    self.tracer,
                    self.stats,
                    self.batch_size,
                    table,
                    advance=self.bar.advance,
                )
            )
        if whole:
            self.stats.timings["whole"] = self.stats.timings.get("whole", 0.0) + time.perf_counter() - t0
        return out

    def fused_pass(
        self, scan: FusedScan, shifts: Mapping[str, float], sampled_nan: bool, table: ShiftTable | None
    ) -> tuple[list[Target], pl.DataFrame] | None:
        """The fused scan's partials of every batch (with a ``table``: of the batches that can hold
        its groups), from the cache where it has them."""
        stats, cache, tracer = self.stats, self.cache, self.tracer
        targets = scan.build(shifts, table)
        tz = self.window.timezone if self.window is not None else self.dataset.metadata.timezone
        batches = self.batches if table is None else [b for b in self.batches if table.may_hold(b, tz, self.window)]
        if not batches:
            return None
        if table is not None:
            self.bar.total += len(batches)
        sqls = [scan.batch_query(b, self.window) for b in batches]
        # Batches whose inputs the footers show NULL-free run without validity keys; their check
        # sums then prove there was no NaN or infinity, or the batch is run again with the keys.
        # (When the sampled first rows already hold a NaN, every batch carries its keys at once.)
        fast = [not sampled_nan and scan.fast_eligible(targets, b) for b in batches]
        if table is None:
            stats.queries.extend(sqls[:1])
        t1 = time.perf_counter()
        stats.timings["plan"] = t1 - self.started  # resolving the chain, the shifts query, building every query
        keys = [cache.key(sql, b) for sql, b in zip(sqls, batches, strict=True)] if cache is not None else []
        cached: list[pl.DataFrame | None] = cache.get_many(keys) if cache is not None else [None] * len(sqls)
        needed = {DAY, *(n for n, _ in scan.by), *scan.keys, *scan.aggregates}
        cached = [f if f is not None and needed <= set(f.columns) else None for f in cached]  # not ours: recompute
        todo = [i for i, c in enumerate(cached) if c is None]
        hits = len(sqls) - len(todo)
        stats.cache_hits += hits
        if tracer is not None:
            for i, b in enumerate(batches):
                if cached[i] is not None:
                    tracer(f"-- from the cache: {', '.join(f.path for f in b)}")
        self.bar.advance(hits)
        try:
            computed = self._compute(scan, batches, [(i, fast[i]) for i in todo])
        except ExecutionError as e:
            raise _blame(scan, targets, e, self.window, self.control) from e.__cause__
        checks = sorted({c for t in targets for c in t.checks})
        redo = [
            k
            for k, (i, frame) in enumerate(zip(todo, computed, strict=True))
            if fast[i]
            and frame.height
            and not frame.select(pl.all_horizontal([pl.col(c).is_finite() for c in checks]).all()).item()
        ]
        if redo:  # a NaN or infinity somewhere: those batches need their validity keys after all
            self.bar.total += len(redo)
            for k, frame in zip(redo, self._compute(scan, batches, [(todo[k], False) for k in redo]), strict=True):
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
        stats.timings["map"] = stats.timings.get("map", 0.0) + time.perf_counter() - t1
        return targets, pl.concat(frames, how="vertical_relaxed")

    def _compute(
        self, scan: FusedScan, batches: Sequence[list[FileInfo]], chosen: Sequence[tuple[int, bool]]
    ) -> list[pl.DataFrame]:
        """The partials of the chosen batches (index, fast). With fewer batches than workers (say,
        the new day of an incremental run), a batch of several parts runs as one query per part, so
        idle workers help; the parts' rows are the same either way."""
        split = len(chosen) < self.executor.workers
        runs = []
        for i, fast in chosen:
            b = batches[i]
            n = len(scan.parts(b)) if split else 1
            runs.append([scan.batch_query(b, self.window, fast=fast, part=j if n > 1 else None) for j in range(n)])
        flat = [q for qs in runs for q in qs]
        files_of = {q: [f.path for f in batches[i]] for (i, _), qs in zip(chosen, runs, strict=True) for q in qs}
        if self.tracer is not None:
            for q in flat:
                self.tracer(q)
        self.bar.total += len(flat) - len(chosen)
        done = iter(
            self.executor.map(
                _sql_task, flat, describe=lambda sql: files_of[sql], on_done=self.bar.advance, home=self.control
            )
        )
        return [pl.concat([next(done) for _ in qs], how="vertical_relaxed") for qs in runs]


# Sums of squares are taken around one shift per expression (the median of its first rows). A
# group whose centred sum of squares is below this fraction of the sum it comes from lies so far
# from that shift that cancellation has cost it 3 or more of its ~16 digits: the run scans again
# with that group's rows shifted by the group's own mean (at most RECENTRE_PASSES times).
RECENTRE_BELOW = 1e-3
RECENTRE_PASSES = 2
CENTRE = "__centre"


def centre_metric(metrics: Sequence[Metric]) -> Metric | None:
    """The count and the shifted sums and sums of squares of the shifted roles the metrics use
    (identical aggregates of the metrics are shared), or None when no metric uses a shift."""
    used = sorted({c for m in metrics for _, agg in m.stats for c in sb.column_names(agg)} & {"pred_c", "target_c"})
    if not used:
        return None
    stats: list[tuple[str, exp.Expr]] = [("n", exp.Count(this=exp.Star()))]
    for r in used:
        stats.append((f"s1_{r}", exp.Sum(this=sb.column(r))))
        stats.append((f"s2_{r}", exp.Sum(this=exp.Mul(this=sb.column(r), expression=sb.column(r)))))
    return Metric(CENTRE, "centring checks", tuple(stats), {n: "sum" for n, _ in stats}, exp.Null(), "", "")


def recentre(
    merged: Merged, out_keys: Sequence[str], types: Mapping[str, str], table: ShiftTable | None
) -> ShiftTable | None:
    """The shifts of a further pass when some group's sums of squares lost their precision to its
    distance from the shift (see ``RECENTRE_BELOW``): each such experiment, group and expression
    is shifted by its own mean (from the merged ``centre_metric`` stats). None when none needs it
    (or none would change)."""
    st = merged.stats[CENTRE]
    n = st.get_column("n").to_numpy()
    keys = merged.labels.select(out_keys).rows() if out_keys else [()] * len(n)
    current: dict[tuple[str, tuple], float] = {}
    if table is not None:
        for group, values in table.rows:
            current |= {(r, group): v for r, v in zip(table.roles, values, strict=True) if v is not None}
    best: dict[tuple[str, tuple], float] = {}
    for side, role in enumerate(("pred_c", "target_c")):
        if f"s1_{role}" not in st.columns:
            continue
        s1, s2 = st.get_column(f"s1_{role}").to_numpy(), st.get_column(f"s2_{role}").to_numpy()
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            centred = s2 - s1 * s1 / n
            bad = (n > 0) & (s2 > 0) & np.isfinite(s2) & np.isfinite(s1) & (centred < RECENTRE_BELOW * s2)
            # A shift so far off that the squares overflowed (the first rows of the first file a
            # block of 1e300 sentinels, say): the sum around it is too coarse to give the mean
            # (1e300 + (-1e300 + 0.3) is 0 or 1e284), so the next pass takes the plain sums, around
            # 0, and the one after, if those lose precision, the mean they give.
            overflowed = (n > 0) & ~np.isfinite(s2)
            bad |= overflowed
        for i in np.flatnonzero(bad):
            t = merged.targets[i]
            key = (shift_role(t.experiment, t.roles[side]), tuple(keys[i]))
            if current.get(key, 0.0) != 0.0:  # already its own mean: what is left is its own spread
                continue
            used = current.get(key, t.shifts[side])  # the shift these sums were taken around
            new = 0.0 if overflowed[i] else used + float(s1[i]) / float(n[i])
            if new != used:
                best[key] = new
    if not best:
        return None
    shifts = current | best
    roles = tuple(dict.fromkeys(r for r, _ in shifts))
    groups = list(dict.fromkeys(g for _, g in shifts))
    rows = tuple((g, tuple(shifts.get((r, g)) for r in roles)) for g in groups)
    return ShiftTable(tuple(out_keys), tuple(types[k] for k in out_keys), roles, rows)


def _blame(
    scan: FusedScan,
    targets: Sequence[Target],
    error: ExecutionError,
    window: SessionWindow | None,
    con: duckdb.DuckDBPyConnection,
) -> ExecutionError | MetricError:
    """The experiment or metric whose SQL makes a fused batch query fail (a cast that fails on some
    rows, say), found by running each experiment's conditions and pair expressions, then each
    metric's aggregates, alone over the failing batch; the error itself when none fails alone (or
    when the failure was not DuckDB's)."""
    cause = error.__cause__
    batch = [f for f in scan.dataset.files if f.path in set(error.files)]
    if not isinstance(cause, duckdb.Error) or retryable(cause) or not batch:
        return error  # an unreadable file, say: not an experiment's doing
    where, _ = window_and_day(scan.dataset, batch, window, need_day=False)
    try:
        rows = sb.select([exp.Count(this=exp.Star())], batch_relation(scan.dataset, batch), where=where)
        fetch_all(con, sb.render(rows))
    except duckdb.Error:
        return error
    exprs: dict[str, tuple[Inlined, list[exp.Expr]]] = {}
    for name, _, inl, p, t, _, _ in scan.bound:
        exprs.setdefault(name, (inl, []))[1].extend([p, t])
    for name, (inl, used) in exprs.items():
        checks = [sb.func("count", e.copy()) for e in used] or [exp.Count(this=exp.Star())]
        conds = [where] if where is not None else []
        probe = sb.select(checks, batch_relation(scan.dataset, batch), where=sb.and_all([*conds, *inl.conditions]))
        try:
            fetch_all(con, sb.render(probe))
        except duckdb.Error as e:
            return ExecutionError(
                f"Experiment {name!r} failed on {', '.join(f.path for f in batch)}: {brief(e)}",
                files=error.files,
                sql=error.sql,
                experiment=name,
            )
    for m in scan.metrics:
        columns = dict.fromkeys(c for t in targets for c in t.stats.get(m.name, {}).values())
        if not columns:
            continue
        probe = sb.select(
            [scan.aggregates[c].copy() for c in columns], batch_relation(scan.dataset, batch), where=where
        )
        try:
            fetch_all(con, sb.render(probe))
        except duckdb.Error as e:
            return _metric_error(m, f"its stats failed on {', '.join(f.path for f in batch)}", e)
    return error


def _metric_error(metric: Metric, what: str, cause: BaseException) -> MetricError:
    """``Metric 'name' (its file): <what>: <the driver's message>``."""
    return MetricError(
        f"Metric {metric.name!r} ({metric.path or 'built in'}): {what}: {brief(cause)}",
        metric=metric.name,
        path=metric.path or None,
    )


def _without_groups(frame: pl.DataFrame, table: ShiftTable) -> pl.DataFrame:
    """The partials of ``frame`` outside the table's groups."""
    if not frame.height:
        return frame
    if not table.keys:
        return frame.head(0)
    groups = pl.DataFrame({k: [g[j] for g, _ in table.rows] for j, k in enumerate(table.keys)}, strict=False).cast(
        {k: frame.schema[k] for k in table.keys}
    )
    return frame.join(groups, on=list(table.keys), how="anti", nulls_equal=True, maintain_order="left")


def _group_types(dataset: Dataset, experiments: Experiments, names: Sequence[str], by: Sequence[str]) -> dict[str, str]:
    """The SQL type of each group key of the partials."""
    types = {DAY: "DATE", TOD: "TIME"}
    for b in by:
        if b != "day" and not b.startswith("tod:"):
            found = [experiments.columns(n)[b] for n in names if b in experiments.columns(n)]
            types[b] = found[0] if found else dataset.columns.get(b, "VARCHAR")
    return types


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
    table: ShiftTable | None = None,
    advance: Callable[[int], None] = lambda n: None,
) -> tuple[list[Target], pl.DataFrame]:
    """Metrics of an experiment that the fused scan cannot answer: its chain is built as views
    (and Python steps) on a connection, per batch when that gives the same rows as running it on
    all data (:meth:`Experiments.batchable`), else once over all files. ``advance(n)`` is called
    as each group of files is done, with the number of ``batches`` it held."""
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

    per_row = "day" in by and moves_time(dataset, experiments, name)

    def aggregate(files: Sequence[FileInfo]) -> str:
        _, day = window_and_day(
            dataset, files, window, need_day="day" in by, day_per_row=per_row, rows_aware=aware_in(dataset, cols)
        )
        sql = sb.render(scan.whole_query(rel, day))
        if not stats.queries or stats.queries[-1] != sql:
            stats.queries.append(sql)
        return sql

    per_batch = experiments.batchable(name)
    if not per_batch:
        groups = [list(dataset.files)]
    elif experiments.has_python(name):  # a per-batch Python step sees whole days: a day's files together
        groups = day_groups(dataset, window)
    else:
        groups = batches
    # The progress bar counts ``batches``: each group advances it by the batches that start in it.
    first_file = {b[0].path: i for i, b in enumerate(batches)}
    weight = [sum(1 for f in g if f.path in first_file) for g in groups] if per_batch else [len(batches)]
    first = dataset.connection(1 if per_batch else executor.workers).open()
    try:
        build_chain(first, dataset, experiments, name, groups[0], window, tracer, batch_size)
        try:
            shifts, _ = _shifts(scan, rel, tracer, con=first)
        except ExecutionError as e:
            raise ExecutionError(
                f"Experiment {name!r} failed: {brief(e.__cause__ or e)}",
                files=[f.path for f in groups[0]],
                sql=e.sql,
                experiment=name,
            ) from e.__cause__
        targets = scan.build(shifts, table)
        try:
            frames = [_frame(first, aggregate(groups[0]), tracer)]
        except duckdb.Error as e:
            raise ExecutionError(f"Experiment {name!r} failed: {brief(e)}", files=[f.path for f in groups[0]]) from e
    finally:
        first.close()
    advance(weight[0])

    tasks = [ChainTask(dataset, experiments, name, list(g), window, batch_size, aggregate(g)) for g in groups[1:]]
    done = iter(weight[1:])
    frames += map_chain_tasks(executor, tasks, on_done=lambda: advance(next(done)))
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

    def __post_init__(self) -> None:
        # A task carries only its own chain: the other experiments' steps stay home.
        self.experiments = self.experiments.for_chain(self.name)


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


def map_chain_tasks(executor: Executor, tasks: Sequence[ChainTask], on_done: OnDone = None) -> list[pl.DataFrame]:
    """:func:`run_chain_task` over ``tasks`` on ``executor``. When a task cannot be pickled for
    the executor's workers, the error names the Python step whose function does not pickle."""
    try:
        return executor.map(run_chain_task, tasks, describe=lambda t: [f.path for f in t.files], on_done=on_done)
    except UnpicklableTaskError as e:
        error = e
    # Outside the except block, so that the raised error has cloudpickle's as its only cause.
    for task in {t.name: t for t in tasks}.values():
        if found := task.experiments.unpicklable_step(task.name):
            raise unpicklable_step_error(found[0], task.name, error.executor, found[1]) from found[1]
    raise error


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
            raise ExecutionError(f"The query of the first rows{where} failed: {brief(e)}", files=paths, sql=sql) from e
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
    *,
    days: Sequence[dt.date] = (),
) -> pl.DataFrame:
    """Merge each target's cells and evaluate every metric's final query; tidy output."""
    merged = merge_results(results, metrics, out_keys, days=days)
    _warn_infinite_sums(merged, metrics)
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


def _warn_infinite_sums(merged: Merged, metrics: Sequence[Metric]) -> None:
    """Warn where a summed statistic is infinite although every row summed was finite (rows
    with NaN or ±inf are excluded first): float64 overflowed (squares of values beyond ~1e154,
    say), so the metrics using it are null or ±inf, not the data's."""
    hits: dict[tuple[str, str, str], list[str]] = {}
    for m in metrics:
        frame = merged.stats[m.name]
        for s in m.stat_names:
            if m.merge[s] != "sum":
                continue
            for i in np.flatnonzero(np.isinf(frame[s].to_numpy())):
                row = merged.labels.row(int(i), named=True)
                names = hits.setdefault((row["experiment"], row["pred"], row["target"]), [])
                if m.name not in names:
                    names.append(m.name)
    if hits:
        shown = "; ".join(
            f"experiment {e!r}, pair {p}:{t}: {', '.join(ms)}" for (e, p, t), ms in list(hits.items())[:3]
        )
        more = f" (and {len(hits) - 3} more)" if len(hits) > 3 else ""
        warn(
            f"A sum overflowed float64 (values too large, e.g. beyond ~1e154 when squared), so these metrics are "
            f"null or infinite: {shown}{more}. Rescale the columns in an experiment (divide by a power of ten)."
        )


@dataclass
class Merged:
    """The merged cells of every target: one row per (experiment, pair, group) in ``labels``
    (``experiment, pred, target, <group keys>``), the same rows of each metric's stats in
    ``stats[metric]`` (one column per stat), and the rows excluded as invalid."""

    labels: pl.DataFrame
    stats: dict[str, pl.DataFrame]
    excluded: np.ndarray
    targets: list[Target] = field(default_factory=list)  # the target of each row

    def per_metric(self) -> dict[str, pl.DataFrame]:
        return {name: pl.concat([self.labels, frame], how="horizontal") for name, frame in self.stats.items()}


def merge_results(
    results: Sequence[tuple[list[Target], pl.DataFrame]],
    metrics: Sequence[Metric],
    out_keys: Sequence[str],
    *,
    days: Sequence[dt.date] = (),
) -> Merged:
    """Merge each target's cells: the stats of its valid cells, per group, and the count of the
    rows in its invalid cells (``n_excluded``).

    Every group where a target's conditions select a cell gets a row (with no group keys: one
    row per target), so each group that has rows gets every metric and ``n_excluded``. Cells
    merge in a fixed order, by group and then by position (:func:`duckharness.metrics.merge.reduce_runs`),
    so the same partials give the same bits. Each partials frame is turned into one matrix, and
    each target is a row selection and a column selection of it.

    Grouped by day alone, every target also gets a row for each of ``days`` it has no rows on
    (:func:`listed_days`): no rows, sums 0, minima and maxima null.
    """
    out_keys = list(out_keys)
    label_parts: list[pl.DataFrame] = []
    stat_parts: dict[str, list[np.ndarray]] = {m.name: [] for m in metrics}
    seen_parts: dict[str, list[np.ndarray]] = {m.name: [] for m in metrics}
    excluded_parts: list[np.ndarray] = []
    owners: list[Target] = []
    for targets, partials in results:
        if out_keys and partials.height:
            # A GROUP BY of constants over no rows gives DuckDB one row (a batch with no row in
            # the window, grouped by its day): no cell, so no group of its own.
            partials = partials.filter(pl.col(ROWS) > 0)
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
            owners.extend([t] * groups)
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
    if days:
        assert out_keys == [DAY]
        _add_empty_days(results, metrics, days, label_parts, stat_parts, seen_parts, excluded_parts, owners)
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
    return Merged(labels, stats, excluded, owners)


def _add_empty_days(
    results: Sequence[tuple[list[Target], pl.DataFrame]],
    metrics: Sequence[Metric],
    days: Sequence[dt.date],
    label_parts: list[pl.DataFrame],
    stat_parts: dict[str, list[np.ndarray]],
    seen_parts: dict[str, list[np.ndarray]],
    excluded_parts: list[np.ndarray],
    owners: list[Target],
) -> None:
    """Append to the parts :func:`merge_results` builds a row for each (target, day) of ``days``
    that has none: a target's rows may come from several results (a re-centring pass)."""
    have: dict[tuple[str, str, str], set[dt.date]] = {}
    first: dict[tuple[str, str, str], Target] = {}
    for targets, _ in results:
        for t in targets:
            first.setdefault((t.experiment, t.pair.pred, t.pair.target), t)
    for part in label_parts:
        for e, p, tg, d in part.select("experiment", "pred", "target", DAY).iter_rows():
            have.setdefault((e, p, tg), set()).add(d)
    for key, t in first.items():
        missing = [d for d in days if d not in have.get(key, ())]
        if not missing:
            continue
        n = len(missing)
        label_parts.append(
            pl.DataFrame(
                {"experiment": [key[0]] * n, "pred": [key[1]] * n, "target": [key[2]] * n, DAY: missing},
                schema={"experiment": pl.String, "pred": pl.String, "target": pl.String, DAY: pl.Date},
            )
        )
        for m in metrics:
            width = len(m.stat_names)
            stat_parts[m.name].append(np.zeros((n, width)))
            seen_parts[m.name].append(np.zeros((n, width), dtype=bool))
        excluded_parts.append(np.zeros(n))
        owners.extend([t] * n)


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
    # Each final is cast to DOUBLE: a formula that gives text or a list fails here, by name.
    finals = [
        sb.alias(
            sb.cast(sb.substitute_columns(m.final, {s: sb.column(f"{m.name}.{s}") for s in m.stat_names}), "DOUBLE"),
            m.name,
        )
        for m in metrics
    ]

    def query(chosen: Sequence[exp.Expr]) -> str:
        return sb.render(sb.select([sb.column("__i"), *chosen], "merged").order_by("__i", copy=False), copy=False)

    sql = query(finals)
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
            try:
                rows = con.execute(sql).fetchall()
            except duckdb.Error as e:
                for m, final in zip(metrics, finals, strict=True):  # which metric's formula it is
                    try:
                        con.execute(query([final])).fetchall()
                    except duckdb.Error as alone:
                        raise _metric_error(m, "its final query failed on the merged stats", alone) from alone
                raise ExecutionError(f"The final query of the metrics failed: {brief(e)}", sql=sql) from e
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
