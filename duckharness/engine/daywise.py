"""Statistics computed within each day: rank IC (Spearman) and prediction-quantile buckets.

Ranks and quantiles are not mergeable sums, so they are computed per day in SQL with window
functions and only then merged across days. Files are grouped so that no local day is split
between two groups (a day that spans files is ranked as a whole; a group that holds several days
partitions by the day label), and each group runs through the experiment's chain on a
connection of its own, in parallel, like any batch (a progress bar counts the groups as they
finish, as ``metrics`` counts its batches). (An experiment whose Python steps move rows
to another group's day has those groups run again as one.) Rows whose pred or target is NULL, NaN or
±infinite are left out, as for every metric.

- **Rank IC**: within each day (or each timestamp cross-section of a day), the Pearson
  correlation of the average ranks of pred and target (ties get the mean of the ranks they
  span), which is Spearman's rho; a cross-sectional day's value is the mean of its timestamps'
  ICs (cross-sections whose IC is undefined, e.g. a single symbol, are skipped).
- **Quantile buckets**: each day's prediction quantiles (pandas' levels and numpy's linear
  interpolation, computed in SQL to the same bits: :func:`bucket_query`) cut the day's rows into
  ``q`` buckets ``(e_{k−1}, e_k]``, the lowest including the minimum, which is
  ``pandas.qcut(pred, q, labels=False) + 1`` per day; counts and sums of pred and target per
  bucket merge exactly across days.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import duckdb
import polars as pl
from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.data.metadata import SessionWindow
from duckharness.data.source import Dataset, FileInfo, date_columns_hint
from duckharness.engine.cache import StatsCache
from duckharness.engine.plan import DAY, Pair, aware_in, day_groups, moves_time, replaces_time, window_and_day
from duckharness.engine.run import ChainTask, map_chain_tasks, run_chain_task
from duckharness.errors import ExecutionError, InputError, UnknownColumnError
from duckharness.execution.executor import Executor, brief, retryable
from duckharness.execution.progress import Progress
from duckharness.experiments.chain import chain_statements, source_query
from duckharness.experiments.steps import Experiments
from duckharness.metrics.merge import merge_partials

Tracer = Callable[[str], None]
PAIR, TS, BUCKET = "__pair", "__ts", "__bucket"
_P, _T, _RP, _RT = "__p", "__t", "__rp", "__rt"


def _valid_rows(relation: exp.Expr, day: exp.Expr, pair: Pair, types: dict[str, str], ts: str | None) -> exp.Select:
    """``SELECT day, [ts], pred, target FROM relation WHERE both are finite numbers``."""
    p, t = sb.column(pair.pred), sb.column(pair.target)
    proj = [sb.alias(day.copy(), DAY)]
    if ts is not None:
        proj.append(sb.alias(sb.column(ts), TS))
    proj += [sb.alias(sb.cast(p, "DOUBLE"), _P), sb.alias(sb.cast(t, "DOUBLE"), _T)]
    where = exp.and_(sb.is_valid_number(p, types[pair.pred]), sb.is_valid_number(t, types[pair.target]))
    return sb.select(proj, relation.copy(), where=where)


def _average_rank(col: str, partition: list[str]) -> exp.Expr:
    """``rank() + (ties − 1) / 2``: the mean of the ranks a group of tied values spans."""
    part = [sb.column(c) for c in partition]
    first = sb.window(exp.Rank(), part, [sb.column(col)])
    ties = sb.window(exp.Count(this=exp.Star()), [*[c.copy() for c in part], sb.column(col)])
    half = exp.Div(this=exp.paren(exp.Sub(this=ties, expression=sb.number(1))), expression=sb.number(2.0))
    return exp.Add(this=first, expression=half)


def rank_ic_query(
    relation: exp.Expr, day: exp.Expr, pairs: Sequence[Pair], types: dict[str, str], ts: str | None
) -> exp.Expr:
    """Per (pair, day): the rank IC and the rows (and, with ``ts``, cross-sections) it used."""
    parts = []
    for i, pair in enumerate(pairs):
        part = [DAY] if ts is None else [DAY, TS]
        ranked = sb.select(
            [
                *[sb.column(c) for c in part],
                sb.alias(_average_rank(_P, part), _RP),
                sb.alias(_average_rank(_T, part), _RT),
            ],
            _valid_rows(relation, day, pair, types, ts).subquery("v"),
        )
        ic = sb.func("corr", sb.column(_RP), sb.column(_RT))
        per = sb.select(
            [*[sb.column(c) for c in part], sb.alias(ic, "__s_ic"), sb.alias(exp.Count(this=exp.Star()), "__s_n")],
            ranked.subquery("r"),
            group_by_all=True,
        )
        if ts is None:
            q = sb.select([sb.alias(sb.number(i), PAIR), exp.Star()], per.subquery("d"))
            q = q.select(sb.alias(sb.cast(exp.Null(), "DOUBLE"), "__s_sections"))
        else:
            defined = exp.and_(exp.Not(this=sb.is_null(sb.column("__s_ic"))), sb.func("isfinite", sb.column("__s_ic")))
            q = sb.select(
                [
                    sb.alias(sb.number(i), PAIR),
                    sb.column(DAY),
                    sb.alias(
                        exp.Filter(this=exp.Avg(this=sb.column("__s_ic")), expression=exp.Where(this=defined)), "__s_ic"
                    ),
                    sb.alias(exp.Sum(this=sb.column("__s_n")), "__s_n"),
                    sb.alias(
                        exp.Filter(this=exp.Count(this=exp.Star()), expression=exp.Where(this=defined.copy())),
                        "__s_sections",
                    ),
                ],
                per.subquery("s"),
                group_by_all=True,
            )
        parts.append(q)
    return sb.union_all(parts)


# Each bucket edge is one interpolation in the per-day query (and one CASE branch): beyond a few
# hundred, DuckDB's expression depth limit and the query's size are reached before any use.
MAX_BUCKETS = 200


def qcut_levels(buckets: int) -> list[float]:
    """The interior quantile levels ``pandas.qcut(x, buckets)`` uses: ``linspace(0, 1, q + 1)``,
    each rounded up to the next double when ``q * level`` is not the whole number it stands for."""
    import numpy as np

    levels = np.linspace(0, 1, buckets + 1)
    np.putmask(levels, buckets * levels != np.arange(buckets + 1), np.nextafter(levels, 1))
    return [float(v) for v in levels[1:-1]]


def _double(value: float) -> exp.Expr:
    return sb.cast(sb.string(repr(value)), "DOUBLE")  # parsed from its shortest repr: the same double


def _edge_columns(n: exp.Expr, xs: exp.Expr, index: exp.Expr, k: int) -> list[exp.Expr]:
    """numpy's neighbours of virtual index ``index`` (0-based; the end value past either end) in
    the sorted list ``xs`` of ``n`` values, and its fraction: columns ``__a{k}, __b{k}, __t{k}``."""
    last = exp.GTE(this=index.copy(), expression=exp.Sub(this=n.copy(), expression=sb.number(1)))
    below = exp.LT(this=index.copy(), expression=sb.number(0))
    floor = sb.func("floor", index.copy())

    def at(offset: int) -> exp.Expr:
        pos = (
            exp.case()
            .when(last.copy(), n.copy())
            .when(below.copy(), sb.number(1))
            .else_(exp.Add(this=sb.cast(floor.copy(), "BIGINT"), expression=sb.number(offset)))
        )
        return sb.func("list_extract", xs.copy(), pos)

    t = exp.Sub(this=index.copy(), expression=floor.copy())
    return [sb.alias(at(1), f"__a{k}"), sb.alias(at(2), f"__b{k}"), sb.alias(t, f"__t{k}")]


def _lerp(k: int) -> exp.Expr:
    """numpy's ``_lerp``: ``a + (b - a) * t``, or ``b - (b - a) * (1 - t)`` when ``t >= 0.5``."""
    a, b, t = sb.column(f"__a{k}"), sb.column(f"__b{k}"), sb.column(f"__t{k}")
    diff = exp.paren(exp.Sub(this=b.copy(), expression=a.copy()))
    one_minus_t = exp.paren(exp.Sub(this=_double(1.0), expression=t.copy()))
    up = exp.Sub(this=b, expression=exp.Mul(this=diff.copy(), expression=one_minus_t))
    down = exp.Add(this=a, expression=exp.Mul(this=diff, expression=t.copy()))
    return exp.case().when(exp.GTE(this=t, expression=_double(0.5)), up).else_(down)


def bucket_query(
    relation: exp.Expr, day: exp.Expr, pairs: Sequence[Pair], types: dict[str, str], buckets: int
) -> exp.Expr:
    """Per (pair, day, bucket): rows, sum of pred and sum of target.

    The edges are ``pandas.qcut``'s, bit for bit: its quantile levels (:func:`qcut_levels`) and
    ``numpy.quantile``'s linear method (virtual index ``(n - 1) * q``, then its ``_lerp``) on
    each day's sorted preds. (DuckDB's ``quantile_cont`` rounds differently, so a row lying
    exactly on an edge could land one bucket up.)
    """
    parts = []
    levels = qcut_levels(buckets)
    for i, pair in enumerate(pairs):
        rows = _valid_rows(relation, day, pair, types, None)
        n, xs = sb.column("__n"), sb.column("__xs")
        sorted_ = sb.select(
            [
                sb.column(DAY),
                sb.alias(exp.Count(this=exp.Star()), "__n"),
                sb.alias(sb.func("list_sort", sb.func("list", sb.column(_P))), "__xs"),
            ],
            exp.Table(this=sb.ident("v")),
            group_by_all=True,
        )
        # numpy's virtual index for its linear method: (n - 1) * q.
        index = [
            exp.Mul(this=sb.cast(exp.Sub(this=n.copy(), expression=sb.number(1)), "DOUBLE"), expression=_double(q))
            for q in levels
        ]
        neighbours = sb.select(
            [sb.column(DAY), *[c for k, ix in enumerate(index, 1) for c in _edge_columns(n, xs, ix, k)]],
            exp.Table(this=sb.ident("s")),
        )
        edges = sb.select(
            [sb.column(DAY), sb.alias(exp.Array(expressions=[_lerp(k) for k in range(1, buckets)]), "__edges")],
            exp.Table(this=sb.ident("x")),
        )
        above: exp.Expr = sb.number(1)
        for k in range(1, buckets):
            edge = sb.func("list_extract", sb.column("__edges", "e"), sb.number(k))
            above = exp.Add(this=above, expression=sb.cast(exp.GT(this=sb.column(_P, "v"), expression=edge), "INTEGER"))
        on = exp.NullSafeEQ(this=sb.column(DAY, "v"), expression=sb.column(DAY, "e"))
        q = (
            exp.select(
                sb.alias(sb.number(i), PAIR),
                sb.alias(sb.column(DAY, "v"), DAY),
                sb.alias(above, BUCKET),
                sb.alias(exp.Count(this=exp.Star()), "__s_n"),
                sb.alias(exp.Sum(this=sb.column(_P, "v")), "__s_sp"),
                sb.alias(exp.Sum(this=sb.column(_T, "v")), "__s_st"),
            )
            .from_(exp.Table(this=sb.ident("v")))
            .join(exp.Table(this=sb.ident("e")), on=on)
        )
        q.set("group", exp.Group(all=True))
        parts.append(sb.with_ctes(q, [("v", rows), ("s", sorted_), ("x", neighbours), ("e", edges)]))
    return sb.union_all([exp.paren(p) if len(parts) > 1 else p for p in parts])


def _name_experiment(error: ExecutionError, tasks: Sequence[ChainTask]) -> ExecutionError:
    """The failing batch's error naming its experiment, when it is the query's own (a cast that
    fails on some rows): the one experiment of those files, or the first whose task fails again."""
    cause = error.__cause__
    if not isinstance(cause, duckdb.Error) or retryable(cause):
        return error
    candidates = [t for t in tasks if [f.path for f in t.files] == error.files]
    name = candidates[0].name if len({t.name for t in candidates}) == 1 else None
    for task in candidates if name is None else []:
        con = task.dataset.connection(1).open()
        try:
            run_chain_task(con, task)
        except duckdb.Error:
            name = task.name
            break
        finally:
            con.close()
    if name is None:
        return error
    return ExecutionError(
        f"Experiment {name!r} failed on {', '.join(error.files)}: {brief(cause)}",
        files=error.files,
        sql=error.sql,
        experiment=name,
    )


def _run(
    dataset: Dataset,
    experiments: Experiments,
    names: Sequence[str],
    pairs: Sequence[Pair],
    window: SessionWindow | None,
    executor: Executor,
    build: Callable[[exp.Expr, exp.Expr, dict[str, str]], exp.Expr],
    *,
    batch_size: int,
    tracer: Tracer | None,
    outputs: frozenset[str],
    need_ts: bool = False,
    cache: StatsCache | None = None,
    label: str,
    progress: bool | None = None,
) -> pl.DataFrame:
    """Run ``build(relation, day, types)`` over each day group of each experiment; one frame
    with an ``experiment`` column.

    A progress bar named ``label`` (see :class:`Progress`; ``progress`` None: only on a terminal)
    counts the (experiment, day group) tasks: those the cache answered at once, the others as each
    finishes.

    With a ``cache``, each day group's frame of an all-SQL experiment is stored under the SQL
    that made it (the experiment's whole chain over those files, and the per-day query) and the
    files' identities, so a re-run computes only new or changed days. A chain with a Python step
    has no SQL to key it by, so it is always computed. ``outputs`` are the columns a frame has
    (a stored entry without them is recomputed).
    """
    tcol = dataset.time_column
    if need_ts and tcol is None:
        raise InputError("Cross-sectional rank IC needs a time column (set 'time_column' in metadata.json).")
    tasks: list[ChainTask] = []
    labels: list[str] = []
    keys: list[str | None] = []
    groups = day_groups(dataset, window)
    for name in names:
        cols = experiments.columns(name)
        for pair in pairs:
            for c in (pair.pred, pair.target):
                if c not in cols:
                    raise UnknownColumnError(
                        f"Experiment {name!r} has no column {c!r} (pair {pair.pred}:{pair.target}).",
                        column=c,
                        experiment=name,
                    )
        if tcol is not None and tcol not in cols:
            raise UnknownColumnError(
                f"Experiment {name!r} has no time column {tcol!r}, so its rows cannot be split by day.",
                column=tcol,
                experiment=name,
            )
        per_row = moves_time(dataset, experiments, name)
        # An experiment whose rows land on other days than their files' is ranked in one pass
        # over all files, so that each of its days is whole.
        whole = not experiments.batchable(name) or replaces_time(dataset, experiments, name)
        per_group = [list(dataset.files)] if whole else groups
        keyable = not experiments.has_python(name)  # a Python step has no SQL to key it by
        for g in per_group:
            tasks.append(_task(dataset, experiments, name, g, window, batch_size, build, per_row, cols))
            labels.append(name)
            if cache is not None and keyable:
                rows = sb.render(experiments.query(name, source_query(dataset, g, window)))
                keys.append(cache.key(f"{rows}\0{tasks[-1].sql}", g))
            else:
                keys.append(None)
    stored = iter(cache.get_many([k for k in keys if k is not None]) if cache is not None else [])
    frames: list[pl.DataFrame | None] = [None if k is None else next(stored) for k in keys]
    frames = [f if f is not None and outputs <= set(f.columns) else None for f in frames]  # not ours: recompute
    todo = [i for i, f in enumerate(frames) if f is None]
    if tracer is not None:
        shown: set[str] = set()
        for i, f in enumerate(frames):
            if f is not None:
                tracer(f"-- from the cache: {labels[i]}, {', '.join(x.path for x in tasks[i].files)}")
                continue
            if labels[i] not in shown:  # each experiment's chain, as built for its first group
                shown.add(labels[i])
                for statement in chain_statements(dataset, experiments, labels[i], tasks[i].files, window):
                    tracer(statement)
            tracer(tasks[i].sql)
    executor.with_config(dataset.connection(1))
    with Progress(len(tasks), label, enabled=progress) as bar:
        bar.advance(len(tasks) - len(todo))
        try:
            computed = map_chain_tasks(executor, [tasks[i] for i in todo], on_done=bar.advance)
        except ExecutionError as e:
            raise _name_experiment(e, [tasks[i] for i in todo]) from e.__cause__
        for i, frame in zip(todo, computed, strict=True):
            frames[i] = frame
            if cache is not None and (key := keys[i]) is not None:
                cache.put(key, frame)
        # An experiment whose times only its Python steps can move may put rows of one day in two
        # groups' frames; such groups are run again as one, so that every day it ranks is whole.
        for name in dict.fromkeys(labels):
            mine = [i for i, n in enumerate(labels) if n == name]
            merged = _groups_sharing_days([frames[i] for i in mine], [tasks[i].files for i in mine])
            if merged is None:
                continue
            cols, per_row = experiments.columns(name), moves_time(dataset, experiments, name)
            redo = [_task(dataset, experiments, name, g, window, batch_size, build, per_row, cols) for g in merged]
            bar.total += len(redo)
            try:
                again = map_chain_tasks(executor, redo, on_done=bar.advance)
            except ExecutionError as e:
                raise _name_experiment(e, redo) from e.__cause__
            for i in mine:
                frames[i] = None
            labels += [name] * len(again)
            frames += again
    out = [
        f.with_columns(pl.lit(n).alias("experiment"))
        for n, f in zip(labels, frames, strict=True)
        if f is not None and f.height
    ]
    if not out:
        return pl.DataFrame(schema={"experiment": pl.String, PAIR: pl.Int64, DAY: pl.Date})
    return pl.concat(out, how="diagonal_relaxed")


def _task(
    dataset: Dataset,
    experiments: Experiments,
    name: str,
    files: Sequence[FileInfo],
    window: SessionWindow | None,
    batch_size: int,
    build: Callable[[exp.Expr, exp.Expr, dict[str, str]], exp.Expr],
    per_row: bool,
    cols: dict[str, str],
) -> ChainTask:
    _, day = window_and_day(
        dataset, files, window, need_day=True, day_per_row=per_row, rows_aware=aware_in(dataset, cols)
    )
    sql = sb.render(build(exp.Table(this=sb.ident(name)), day, cols))
    return ChainTask(dataset, experiments, name, list(files), window, batch_size, sql)


def _groups_sharing_days(
    frames: Sequence[pl.DataFrame | None], groups: Sequence[Sequence[FileInfo]]
) -> list[list[FileInfo]] | None:
    """The file groups joined wherever two groups' frames hold the same day (in file order), or
    None when every day is in one group's frame only.

    Example (groups' days {1}, {1, 2}, {3}):
        >>> _groups_sharing_days(frames, [[a], [b], [c]])  # doctest: +SKIP
        [[a, b], [c]]
    """
    owner: dict[Any, int] = {}
    parent = list(range(len(groups)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    joined = False
    for i, f in enumerate(frames):
        if f is None or not f.height:
            continue
        for d in f.get_column(DAY).unique().to_list():
            j = owner.setdefault(d, i)
            if root(j) != root(i):
                parent[root(i)] = root(j)
                joined = True
    if not joined:
        return None
    out: dict[int, list[FileInfo]] = {}
    for i, g in enumerate(groups):
        out.setdefault(root(i), []).extend(g)
    return list(out.values())


def _label_pairs(frame: pl.DataFrame, pairs: Sequence[Pair]) -> pl.DataFrame:
    preds = pl.Series([p.pred for p in pairs])
    targets = pl.Series([p.target for p in pairs])
    idx = pl.col(PAIR).cast(pl.Int64)
    return frame.with_columns(pl.lit(preds).gather(idx).alias("pred"), pl.lit(targets).gather(idx).alias("target"))


def _need_days(dataset: Dataset, what: str) -> None:
    """Refuse a per-day statistic on a source with no time column, whose rows have no day (it
    would be one pooled value labelled with a null day)."""
    if dataset.time_column is None:
        raise InputError(
            f"{what}, but the source has no time column to take days from (set 'time_column' in metadata.json "
            f"to a TIMESTAMP column)." + date_columns_hint(dataset.columns)
        )


def rank_ic(
    dataset: Dataset,
    experiments: Experiments,
    names: Sequence[str],
    pairs: Sequence[Pair],
    window: SessionWindow | None,
    executor: Executor,
    *,
    cross_section: bool = False,
    batch_size: int = 1,
    tracer: Tracer | None = None,
    cache: StatsCache | None = None,
    progress: bool | None = None,
) -> pl.DataFrame:
    """Per-day rank IC of every experiment and pair, tidy: ``experiment, pred, target, day,
    metric, value`` with metrics ``rank_ic``, ``n`` (rows used) and, cross-sectionally,
    ``n_sections`` (timestamps whose IC is defined). ``progress``: the progress bar (None: only
    on a terminal)."""
    _need_days(dataset, "The rank IC is computed within each day")
    ts = dataset.time_column if cross_section else None
    raw = _run(
        dataset,
        experiments,
        names,
        pairs,
        window,
        executor,
        lambda rel, day, types: rank_ic_query(rel, day, pairs, types, ts),
        batch_size=batch_size,
        tracer=tracer,
        need_ts=cross_section,
        outputs=frozenset({PAIR, DAY, "__s_ic", "__s_n"} | ({"__s_sections"} if cross_section else set())),
        cache=cache,
        label="rank_ic",
        progress=progress,
    )
    if raw.height == 0:
        return pl.DataFrame(
            schema={
                "experiment": pl.String,
                "pred": pl.String,
                "target": pl.String,
                "day": pl.Date,
                "metric": pl.String,
                "value": pl.Float64,
            }
        )
    raw = _label_pairs(raw, pairs)
    metrics = {"rank_ic": "__s_ic", "n": "__s_n"} | ({"n_sections": "__s_sections"} if cross_section else {})
    long = pl.concat(
        [
            raw.select(
                "experiment",
                "pred",
                "target",
                pl.col(DAY).alias("day"),
                pl.lit(m).alias("metric"),
                pl.col(c).cast(pl.Float64).alias("value"),
                PAIR,
            )
            for m, c in metrics.items()
        ]
    )
    long = long.with_columns(pl.when(pl.col("value").is_nan()).then(None).otherwise(pl.col("value")).alias("value"))
    order = {n: i for i, n in enumerate(names)}
    morder = {m: i for i, m in enumerate(metrics)}
    return (
        long.with_columns(
            pl.col("experiment").replace_strict(order, return_dtype=pl.Int64).alias("__o"),
            pl.col("metric").replace_strict(morder, return_dtype=pl.Int64).alias("__m"),
        )
        .sort(["__o", PAIR, "day", "__m"])
        .drop("__o", "__m", PAIR)
    )


def quantile_buckets(
    dataset: Dataset,
    experiments: Experiments,
    names: Sequence[str],
    pairs: Sequence[Pair],
    window: SessionWindow | None,
    executor: Executor,
    *,
    buckets: int = 10,
    by_day: bool = False,
    batch_size: int = 1,
    tracer: Tracer | None = None,
    cache: StatsCache | None = None,
    progress: bool | None = None,
) -> pl.DataFrame:
    """Mean target (and pred) by per-day prediction-quantile bucket, pooled across days (or
    per day): ``experiment, pred, target, [day], bucket, n, mean_pred, mean_target``.
    ``progress``: the progress bar (None: only on a terminal)."""
    if isinstance(buckets, bool) or not isinstance(buckets, int) or not 2 <= buckets <= MAX_BUCKETS:
        raise InputError(f"buckets must be a whole number from 2 to {MAX_BUCKETS}, got {buckets!r}.")
    if by_day:
        _need_days(dataset, 'Buckets by="day"')
    raw = _run(
        dataset,
        experiments,
        names,
        pairs,
        window,
        executor,
        lambda rel, day, types: bucket_query(rel, day, pairs, types, buckets),
        batch_size=batch_size,
        tracer=tracer,
        outputs=frozenset({PAIR, DAY, BUCKET, "__s_n", "__s_sp", "__s_st"}),
        cache=cache,
        label="deciles",
        progress=progress,
    )
    keys = ["experiment", PAIR, *([DAY] if by_day else []), BUCKET]
    if raw.height == 0:
        merged = pl.DataFrame(
            schema={
                **{k: pl.Int64 for k in keys},
                "experiment": pl.String,
                DAY: pl.Date,
                "__s_n": pl.Float64,
                "__s_sp": pl.Float64,
                "__s_st": pl.Float64,
            }
        )
    else:
        merged = merge_partials(raw, keys, {"__s_n": "sum", "__s_sp": "sum", "__s_st": "sum"})
    order = {n: i for i, n in enumerate(names)}
    out = (
        _label_pairs(merged, pairs)
        .with_columns(pl.col("experiment").replace_strict(order, return_dtype=pl.Int64).alias("__o"))
        .sort(["__o", PAIR, *([DAY] if by_day else []), BUCKET])
    )
    return out.select(
        "experiment",
        "pred",
        "target",
        *([pl.col(DAY).alias("day")] if by_day else []),
        pl.col(BUCKET).cast(pl.Int64).alias("bucket"),
        pl.col("__s_n").cast(pl.Int64).alias("n"),
        (pl.col("__s_sp") / pl.col("__s_n")).alias("mean_pred"),
        (pl.col("__s_st") / pl.col("__s_n")).alias("mean_target"),
    )
