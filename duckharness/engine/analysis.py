"""Research statistics over per-day series: summaries and comparisons of experiments.

This module joins the engine (per-day metric values and sufficient statistics from one scan,
per-day rank IC from :mod:`duckharness.engine.daywise`) to the pure statistics of
:mod:`duckharness.metrics.significance`. The :class:`~duckharness.Harness` methods ``series``,
``summary`` and ``compare`` call it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from duckharness.engine.plan import Pair
from duckharness.engine.run import evaluate_final, run_stats
from duckharness.errors import InputError
from duckharness.metrics.library import Metric
from duckharness.metrics.significance import (
    bootstrap_difference,
    check_lag,
    diebold_mariano,
    merge_resampled,
    summarize_series,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from duckharness.harness import Harness, WindowArg

RANK_IC = "rank_ic"
SERIES_KEYS = ["experiment", "pred", "target"]


def daily_series(
    h: Harness,
    metrics: Sequence[str],
    pairs: Sequence[Pair],
    names: Sequence[str],
    window: WindowArg,
    *,
    cross_section: bool = False,
    progress: bool | None = None,
) -> pl.DataFrame:
    """Per-day values of each metric (``rank_ic`` included): ``experiment, pred, target, day,
    metric, value`` from one scan for the mergeable metrics and one for rank IC (each with its
    progress bar; ``progress`` None: the harness's setting)."""
    frames = []
    mergeable = [m for m in metrics if m != RANK_IC]
    if mergeable:
        asked = list(dict.fromkeys([*mergeable, "count"]))
        df = h.metrics(asked, pairs=list(pairs), experiments=list(names), by="day", window=window, progress=progress)
        # A day where the experiment has no valid row for the pair is not a day of its series, for
        # any metric: by="day" lists it (count 0, undefined values), but a count of 0 or a sum
        # over no rows is no observation of the experiment.
        keys = [*SERIES_KEYS, "day"]
        held = df.filter((pl.col("metric") == "count") & (pl.col("value") > 0)).select(keys)
        frames.append(df.filter(pl.col("metric").is_in(mergeable)).join(held, on=keys, how="semi", nulls_equal=True))
    if RANK_IC in metrics:
        df = h.rank_ic(list(pairs), list(names), cross_section=cross_section, window=window, progress=progress)
        frames.append(df.filter(pl.col("metric") == RANK_IC))
    out = pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]
    order = {
        "experiment": {n: i for i, n in enumerate(names)},
        "pred": {p.pred: i for i, p in enumerate(pairs)},
        "metric": {m: i for i, m in enumerate(metrics)},
    }
    ranks = [
        pl.col(c).replace_strict(o, default=len(o), return_dtype=pl.Int64).alias(f"__o_{c}") for c, o in order.items()
    ]
    return (
        out.with_columns(ranks).sort([*[f"__o_{c}" for c in order], "target", "day"]).drop([f"__o_{c}" for c in order])
    )


def summarize(
    series: pl.DataFrame, *, lag: int | None = None, expected: Sequence[tuple[str, str, str, str]] = ()
) -> pl.DataFrame:
    """One row of statistics across days per (experiment, pred, target, metric) of a per-day
    series; see :func:`~duckharness.metrics.significance.summarize_series`. Each ``expected``
    (experiment, pred, target, metric) the series has no day of gets a row too, with ``n_days`` 0.

    Example:
        >>> import datetime as dt
        >>> s = pl.DataFrame({"experiment": "a", "pred": "p", "target": "t", "metric": "corr",
        ...                   "day": [dt.date(2026, 1, d) for d in (5, 6, 7)], "value": [0.1, 0.3, 0.2]})
        >>> summarize(s, lag=0).select("n_days", pl.col("mean").round(6), "frac_positive").row(0)
        (3, 0.2, 1.0)
    """
    rows: list[dict[str, Any]] = []
    keys = [*SERIES_KEYS, "metric"]
    groups = {key: group for key, group in series.group_by(keys, maintain_order=True)}
    empty = series.clear()
    for key in dict.fromkeys([*expected, *groups]):  # in the order asked
        group = groups.get(key, empty)
        values = group.sort("day")["value"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        _check_lag(lag, int(np.isfinite(values).sum()), f"{key[3]} of {key[0]!r} ({key[1]} vs {key[2]})")
        s = summarize_series(values, lag)
        rows.append(
            dict(zip(keys, key, strict=True))
            | {
                "n_days": s.n_days,
                "mean": s.mean,
                "std": s.std,
                "icir": s.icir,
                "t_stat": s.t_stat,
                "p_value": s.p_value,
                "nw_lag": s.lag,
                "frac_positive": s.frac_positive,
            }
        )
    schema = {k: pl.String for k in keys} | {
        "n_days": pl.Int64,
        "mean": pl.Float64,
        "std": pl.Float64,
        "icir": pl.Float64,
        "t_stat": pl.Float64,
        "p_value": pl.Float64,
        "nw_lag": pl.Int64,
        "frac_positive": pl.Float64,
    }
    out = pl.DataFrame(rows, schema=schema)
    return out.with_columns(pl.col(pl.Float64).fill_nan(None))


@dataclass
class Comparison:
    """Experiment ``a`` against ``b`` on one metric.

    Attributes:
        metric, a, b: what was compared.
        daily: ``pred, target, day, value_a, value_b, diff`` (``diff = value_a − value_b``; null
            on a day where either is undefined).
        table: one row per pair, every figure over the ``n_days`` days where both daily values
            are defined: pooled ``value_a``, ``value_b`` and ``diff``; ``mean_daily_diff``, the
            Diebold–Mariano ``dm_stat`` and ``p_value`` (HLN-corrected, Student t with T − 1
            df), with its Newey–West ``lag``; and the day-block bootstrap interval
            ``ci_low``–``ci_high`` of the pooled difference at ``level``, from ``n_boot``
            resamples drawn with ``seed``.
    """

    metric: str
    a: str
    b: str
    daily: pl.DataFrame
    table: pl.DataFrame

    def plot(self, path: str | os.PathLike[str], *, rolling: int = 20) -> Figure:
        """Save the comparison chart as a PNG (see :func:`duckharness.outputs.plots.plot_comparison`)."""
        from duckharness.outputs.plots import plot_comparison

        return plot_comparison(self, path, rolling=rolling)


def compare(
    h: Harness,
    metric: str,
    a: str,
    b: str,
    pairs: Sequence[Pair],
    window: WindowArg,
    *,
    lag: int | None = None,
    n_boot: int = 2000,
    seed: int | None = 0,
    level: float = 0.95,
    cross_section: bool = False,
    progress: bool | None = None,
) -> Comparison:
    """Compare experiments ``a`` and ``b`` on ``metric`` from per-day statistics (one scan, with
    its progress bar; ``progress`` None: the harness's setting)."""
    if a == b:
        raise InputError(f"Compare two different experiments; both are {a!r}.")
    if n_boot < 1:
        raise InputError(f"n_boot must be at least 1, got {n_boot}.")
    if not 0 < level < 1:
        raise InputError(f"level must be between 0 and 1, got {level}.")
    names = h._experiment_names([a, b])
    daily: list[pl.DataFrame] = []
    rows: list[dict[str, Any]] = []
    if metric == RANK_IC:
        ic = h.rank_ic(list(pairs), names, cross_section=cross_section, window=window, progress=progress)
        ic = ic.filter(pl.col("metric") == RANK_IC)
        for pair in pairs:
            ic_days, va, vb = _aligned(ic, pair, a, b)
            # (value, 1) per day; a day whose IC is undefined has no stats (NaN), like a missing day
            sa, sb_ = (np.column_stack([v, np.where(np.isfinite(v), 1.0, np.nan)]) for v in (va, vb))

            def mean_ic(s: np.ndarray) -> np.ndarray:
                with np.errstate(invalid="ignore", divide="ignore"):
                    return s[:, 0] / s[:, 1]

            daily.append(_daily_frame(pair, ic_days, va, vb))
            rows.append(_row(pair, va, vb, sa, sb_, ["sum", "sum"], mean_ic, lag, n_boot, seed, level))
    else:
        m = h.metric_library.get(metric)
        h._refresh()  # (the rank-IC branch reads through h.rank_ic, which does this itself)
        with h._control() as control:
            mergeable, exact = run_stats(
                h.dataset,
                h.experiments,
                names,
                list(pairs),
                [m],
                ["day"],
                h._window(window),
                executor=h._executor(None, None),
                batch_size=h.batch_size,
                tracer=h.tracer,
                progress=h.progress if progress is None else progress,
                cache=h.cache,
                control=control,
            )
        for pair in pairs:
            # Daily values from each day's exact stats; pooled values and resamples from stats
            # that share the experiment's shifts, so days merge (see run_stats).
            days = _days(mergeable[m.name], pair)
            sa, sb_ = (_stats_matrix(mergeable[m.name], pair, e, m, days) for e in (a, b))
            va, vb = (_final(m, _stats_matrix(exact[m.name], pair, e, m, days)) for e in (a, b))
            daily.append(_daily_frame(pair, days.to_list(), va, vb))
            rows.append(
                _row(
                    pair,
                    va,
                    vb,
                    sa,
                    sb_,
                    [m.merge[s] for s in m.stat_names],
                    _finalizer(m),
                    lag,
                    n_boot,
                    seed,
                    level,
                )
            )
    table = pl.DataFrame(rows).with_columns(pl.col(pl.Float64).fill_nan(None))
    table = table.select(pl.lit(metric).alias("metric"), pl.lit(a).alias("a"), pl.lit(b).alias("b"), pl.all())
    return Comparison(metric, a, b, pl.concat(daily, how="vertical_relaxed"), table)


def _aligned(ic: pl.DataFrame, pair: Pair, a: str, b: str) -> tuple[list[Any], np.ndarray, np.ndarray]:
    sel = ic.filter((pl.col("pred") == pair.pred) & (pl.col("target") == pair.target))
    wide = sel.select("day", "experiment", "value").pivot(on="experiment", index="day", values="value").sort("day")
    days = wide["day"].to_list()

    def col(name: str) -> np.ndarray:
        if name not in wide.columns:
            return np.full(len(days), np.nan)
        return wide[name].cast(pl.Float64).fill_null(float("nan")).to_numpy()

    return days, col(a), col(b)


def _days(stats: pl.DataFrame, pair: Pair) -> pl.Series:
    """The days any experiment has stats for ``pair`` on, in order."""
    sel = stats.filter((pl.col("pred") == pair.pred) & (pl.col("target") == pair.target))
    return sel["day"].unique().sort()


def _stats_matrix(stats: pl.DataFrame, pair: Pair, name: str, m: Metric, days: pl.Series) -> np.ndarray:
    """Experiment ``name``'s per-day stats of ``pair`` as a matrix, one row per day of ``days``
    (a day it has no rows on: NaN stats, which merge as nothing)."""
    sel = stats.filter(
        (pl.col("pred") == pair.pred) & (pl.col("target") == pair.target) & (pl.col("experiment") == name)
    )
    part = days.to_frame("day").join(sel, on="day", how="left", maintain_order="left")
    return part.select([pl.col(s).cast(pl.Float64).fill_null(float("nan")) for s in m.stat_names]).to_numpy()


def _finalizer(m: Metric) -> Any:
    def finalize(s: np.ndarray) -> np.ndarray:
        return _final(m, s)

    return finalize


def _final(m: Metric, s: np.ndarray) -> np.ndarray:
    """The metric's final SQL on each row of a stats matrix (a row of all-NaN stats: NaN)."""
    if len(s) == 0:
        return np.zeros(0)
    frame = pl.DataFrame(np.asarray(s, dtype=np.float64), schema=m.stat_names, orient="row")
    frame = frame.with_columns(pl.col(c).fill_nan(None) for c in m.stat_names)
    values = evaluate_final(m, frame)
    out = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    out[np.all(np.isnan(s), axis=1)] = math.nan
    return out


def _daily_frame(pair: Pair, days: list[Any], va: np.ndarray, vb: np.ndarray) -> pl.DataFrame:
    diff = va - vb
    df = pl.DataFrame({"day": days, "value_a": va, "value_b": vb, "diff": diff})
    df = df.with_columns(pl.col("value_a", "value_b", "diff").fill_nan(None))
    return df.select(pl.lit(pair.pred).alias("pred"), pl.lit(pair.target).alias("target"), pl.all())


def _check_lag(lag: int | None, n_days: int, what: str) -> None:
    """:func:`~duckharness.metrics.significance.check_lag`, as an error naming the series."""
    try:
        check_lag(lag, n_days)
    except ValueError:
        raise InputError(
            f"lag={lag} needs more than {lag} days, but {what} has {n_days} days with a value. "
            f"Use a lag below {n_days} (or the default, which is at most floor(T/4): {n_days // 4} here)."
        ) from None


def _row(
    pair: Pair,
    va: np.ndarray,
    vb: np.ndarray,
    sa: np.ndarray,
    sb_: np.ndarray,
    how: list[str],
    finalize: Any,
    lag: int | None,
    n_boot: int,
    seed: int | None,
    level: float,
) -> dict[str, Any]:
    """The table row of one pair. Every figure is over the same days, those where both daily
    values are defined: the test, the pooled values, their difference and its bootstrap, so
    each compares like with like (a day where one experiment's rows are all excluded, or its
    metric is undefined, counts for neither)."""
    d = va - vb
    shared = np.isfinite(d)
    n_days = int(shared.sum())
    if lag is not None and n_days >= 2 and lag >= n_days - 1:  # the HLN factor is 0 at h = T
        raise InputError(
            f"lag={lag} leaves no Diebold-Mariano test for the comparison on {pair.pred} vs {pair.target}, "
            f"which has {n_days} days (the HLN factor is 0 at lag T - 1). Use a lag below {n_days - 1}."
        )
    _check_lag(lag, n_days, f"the comparison on {pair.pred} vs {pair.target}")
    dm = diebold_mariano(d, lag)
    sa, sb_ = sa[shared], sb_[shared]
    boot = bootstrap_difference(sa, sb_, how, finalize, n_boot=n_boot, seed=seed, level=level)
    ones = np.ones((1, len(sa)), dtype=np.int64)
    value_a = float(finalize(merge_resampled(sa, how, ones))[0]) if len(sa) else math.nan
    value_b = float(finalize(merge_resampled(sb_, how, ones))[0]) if len(sb_) else math.nan
    return {
        "pred": pair.pred,
        "target": pair.target,
        "n_days": dm.n_days,
        "value_a": value_a,
        "value_b": value_b,
        "diff": boot.estimate,
        "mean_daily_diff": dm.mean_diff,
        "dm_stat": dm.statistic,
        "p_value": dm.p_value,
        "lag": dm.lag,
        "ci_low": boot.low,
        "ci_high": boot.high,
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
    }
