"""Every shipped metric against independent references (scikit-learn, scipy, numpy longdouble).

The references filter and transform the rows themselves with pandas/numpy: the session window is
applied from each row's US/Eastern wall-clock time, experiments are re-implemented in pandas, and
metrics come from scikit-learn, scipy or numpy in extended precision. Nothing here asks
duckharness how to compute what it is checked against.
"""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import SESSION, read_all, write_dataset
from scipy.stats import pearsonr
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from duckharness import Harness
from duckharness.errors import DuckHarnessWarning

EASTERN = zoneinfo.ZoneInfo("US/Eastern")
DAYS = [dt.date(2026, 3, 4), dt.date(2026, 3, 5), dt.date(2026, 3, 6),  # EST (UTC-5)
        dt.date(2026, 3, 9), dt.date(2026, 3, 10), dt.date(2026, 3, 11)]  # EDT (UTC-4), after 2026-03-08
ROWS_PER_DAY = 3000
METRICS = ["count", "r2", "mse", "rmse", "mae", "bias", "corr", "hit_rate"]
PAIRS = [("pred_10s", "target_10s"), ("pred_1s", "target_1s")]
REL = 1e-10


# --- data ------------------------------------------------------------------------------------

def day_table(day: dt.date, rows: int, rng: np.random.Generator, symbols: int = 8) -> pa.Table:
    """One day of rows from 08:00 to 17:00 US/Eastern.

    ``pred_10s`` has a spread of 0.4, so clipping at +-0.5 changes about a fifth of the rows;
    ``pred_1s``/``target_1s`` are rounded to one decimal, so many values are exactly zero (which
    is what the hit-rate zero rule is about).
    """
    open_utc = dt.datetime.combine(day, dt.time(8), EASTERN).astimezone(dt.UTC).replace(tzinfo=None)
    offsets = np.sort(rng.integers(0, 9 * 3600 * 10**6, rows)).astype("timedelta64[us]")
    pred_10s = 0.4 * rng.standard_normal(rows)
    pred_1s = np.round(0.3 * rng.standard_normal(rows), 1)
    return pa.table({
        "ts": pa.array(np.datetime64(open_utc, "us") + offsets, pa.timestamp("us", tz="UTC")),
        "symbol": pa.array(rng.choice([f"S{i}" for i in range(symbols)], rows)),
        "volume": rng.integers(1, 5000, rows),
        "spread": np.abs(rng.standard_normal(rows)) * 0.01 + 0.01,
        "mom": rng.standard_normal(rows),
        "pred_10s": pred_10s,
        "target_10s": 0.6 * pred_10s + rng.standard_normal(rows) + 0.05,
        "pred_1s": pred_1s,
        "target_1s": np.round(0.5 * pred_1s + 0.3 * rng.standard_normal(rows), 1),
    })


def local_frame(table: pa.Table) -> pd.DataFrame:
    """All rows as pandas, with the local (US/Eastern) date and whether the row is in 09:30-16:00."""
    df = table.to_pandas()
    local = df["ts"].dt.tz_convert("US/Eastern")
    h, m, s, us = (getattr(local.dt, f).astype(np.int64) for f in ("hour", "minute", "second", "microsecond"))
    tod_us = ((h * 60 + m) * 60 + s) * 10**6 + us
    df["day"] = [d.date() for d in local]
    df["in_session"] = (tod_us >= (9 * 60 + 30) * 60 * 10**6) & (tod_us <= 16 * 3600 * 10**6)
    return df


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(20260308)
    write_dataset(folder, {d.isoformat(): day_table(d, ROWS_PER_DAY, rng) for d in DAYS}, SESSION,
                  row_group_size=1000)
    df = local_frame(read_all(folder))
    assert len(df) == len(DAYS) * ROWS_PER_DAY
    assert 0.6 < df["in_session"].mean() < 0.8  # 6.5 of 9 hours
    return folder, df


# --- experiments and their independent re-implementations -------------------------------------

def _clip(w: pd.DataFrame) -> pd.DataFrame:
    return w.assign(pred_10s=np.clip(w["pred_10s"].to_numpy(), -0.5, 0.5))


def _symbol_mean(w: pd.DataFrame) -> pd.DataFrame:
    return w.assign(pm=w.groupby("symbol")["pred_10s"].transform("mean"))


EXPERIMENTS: dict[str, tuple[str, str | None]] = {
    "liquid": ("volume > 1000", None),
    "tight": ("SELECT * FROM liquid WHERE spread < 0.02", None),
    "liquid_up": ("mom > 0", "liquid"),
    "clipped": ("SELECT * REPLACE (greatest(least(pred_10s, 0.5), -0.5) AS pred_10s) FROM baseline", None),
    # Filters the *clipped* value: every clipped pred is < 0.6, an unclipped one is not.
    "clipped_sel": ("SELECT * FROM clipped WHERE pred_10s < 0.6 AND target_10s > 0", None),
    "doubled": ("SELECT *, pred_10s * 2 AS pred_double FROM baseline", None),
    # Not inlinable: the mean per symbol is over all windowed rows of all files.
    "pm": ("SELECT *, avg(pred_10s) OVER (PARTITION BY symbol) AS pm FROM baseline", None),
    "pm_above": ("SELECT * FROM pm WHERE pred_10s > pm", None),
    "per_symbol": ("SELECT symbol, avg(pred_10s) AS pred_10s, avg(target_10s) AS target_10s "
                   "FROM baseline GROUP BY symbol", None),
}

REFERENCE: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {
    "baseline": lambda w: w,
    "liquid": lambda w: w[w["volume"] > 1000],
    "tight": lambda w: w[(w["volume"] > 1000) & (w["spread"] < 0.02)],
    "liquid_up": lambda w: w[(w["volume"] > 1000) & (w["mom"] > 0)],
    "clipped": _clip,
    "clipped_sel": lambda w: (lambda c: c[(c["pred_10s"] < 0.6) & (c["target_10s"] > 0)])(_clip(w)),
    "doubled": lambda w: w.assign(pred_double=w["pred_10s"] * 2),
    "pm": _symbol_mean,
    "pm_above": lambda w: (lambda m: m[m["pred_10s"] > m["pm"]])(_symbol_mean(w)),
    "per_symbol": lambda w: w.groupby("symbol", as_index=False)[["pred_10s", "target_10s"]].mean(),
}

# Which (experiments, pairs) are asked for together, and for which groupings.
MAIN = ["baseline", "liquid", "tight", "liquid_up", "clipped", "clipped_sel", "pm", "pm_above"]
CALLS: list[tuple[list[str], list[tuple[str, str]], tuple[str | None, ...]]] = [
    (MAIN, PAIRS, (None, "day", "symbol")),
    (["doubled"], [("pred_double", "target_10s"), ("pred_10s", "target_10s")], (None, "day", "symbol")),
    # (Not by symbol: pm is constant within a symbol, so corr is undefined there; see
    # test_corr_is_null_when_prediction_is_constant_within_a_group.)
    (["pm", "pm_above"], [("pm", "target_10s")], (None, "day")),
    (["per_symbol"], [("pred_10s", "target_10s")], (None,)),
]


def reference_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    pl_, tl = p.astype(np.longdouble), t.astype(np.longdouble)
    return {
        "count": float(len(p)),
        "r2": float(r2_score(t, p)),
        "mse": float(mean_squared_error(t, p)),
        "rmse": float(np.sqrt(np.mean((pl_ - tl) ** 2))),
        "mae": float(mean_absolute_error(t, p)),
        "bias": float(np.mean(pl_ - tl)),
        "corr": float(pearsonr(p, t).statistic),
        "hit_rate": float(np.mean((np.sign(p) == np.sign(t)).astype(np.longdouble))),
    }


Key = tuple[str, str, str, Any]


@pytest.fixture(scope="module")
def harness(dataset: tuple[Path, pd.DataFrame]) -> Harness:
    folder, _ = dataset
    h = Harness(folder, workers=2)
    for name, (sql, base) in EXPERIMENTS.items():
        h.add_experiment(name, sql, base=base)
    return h


@pytest.fixture(scope="module")
def results(harness: Harness, dataset: tuple[Path, pd.DataFrame]) -> dict[str | None, tuple[dict, dict]]:
    """For each grouping: (what duckharness says, what the references say), keyed by
    metric -> (experiment, pred, target, group) -> value."""
    _, df = dataset
    window = df[df["in_session"]]
    out: dict[str | None, tuple[dict, dict]] = {}
    for by in (None, "day", "symbol"):
        got: dict[str, dict[Key, float]] = {}
        ref: dict[str, dict[Key, float]] = {}
        for names, pairs, bys in CALLS:
            if by not in bys:
                continue
            res = harness.metrics(METRICS, pairs=[f"{p}:{t}" for p, t in pairs], experiments=names, by=by)
            for row in res.iter_rows(named=True):
                key = (row["experiment"], row["pred"], row["target"], row[by] if by else None)
                got.setdefault(row["metric"], {})[key] = row["value"]
            for name in names:
                rows = REFERENCE[name](window)
                groups = [(None, rows)] if by is None else list(rows.groupby(by))
                for g, part in groups:
                    for p, t in pairs:
                        for m, v in reference_metrics(part[p].to_numpy(), part[t].to_numpy()).items():
                            ref.setdefault(m, {})[(name, p, t, g)] = v
        out[by] = (got, ref)
    return out


def _check(results: dict, by: str | None, metric: str, rel: float = REL) -> None:
    got, ref = results[by]
    assert set(got[metric]) == set(ref[metric]), "different (experiment, pair, group) sets"
    assert all(v is not None and math.isfinite(v) for v in ref[metric].values())
    assert got[metric] == pytest.approx(ref[metric], rel=rel, abs=0)


BY = pytest.mark.parametrize("by", [None, "day", "symbol"], ids=["pooled", "by_day", "by_symbol"])


# --- each metric against its reference, pooled over all files, per day and per symbol ------------

@BY
def test_r2_matches_sklearn_r2_score_on_windowed_experiment_rows(results: dict, by: str | None) -> None:
    _check(results, by, "r2")


@BY
def test_mse_matches_sklearn_mean_squared_error(results: dict, by: str | None) -> None:
    _check(results, by, "mse")


@BY
def test_rmse_matches_longdouble_root_mean_squared_error(results: dict, by: str | None) -> None:
    _check(results, by, "rmse")


@BY
def test_mae_matches_sklearn_mean_absolute_error(results: dict, by: str | None) -> None:
    _check(results, by, "mae")


@BY
def test_bias_matches_longdouble_mean_of_pred_minus_target(results: dict, by: str | None) -> None:
    _check(results, by, "bias")


@BY
def test_corr_matches_scipy_pearsonr(results: dict, by: str | None) -> None:
    _check(results, by, "corr")


@BY
def test_hit_rate_matches_sign_agreement_where_zero_matches_only_zero(
        results: dict, by: str | None, dataset: tuple[Path, pd.DataFrame]) -> None:
    _, df = dataset
    w = df[df["in_session"]]
    # The rule is only tested if zeros occur on both sides, alone and together.
    assert ((w["pred_1s"] == 0) & (w["target_1s"] == 0)).sum() > 100
    assert ((w["pred_1s"] == 0) & (w["target_1s"] != 0)).sum() > 100
    assert ((w["pred_1s"] != 0) & (w["target_1s"] == 0)).sum() > 100
    _check(results, by, "hit_rate")


@BY
def test_count_equals_rows_kept_by_session_window_and_experiment(results: dict, by: str | None) -> None:
    got, ref = results[by]
    assert got["count"] == ref["count"]  # exact


def test_n_excluded_is_zero_for_every_pair_when_no_value_is_missing(results: dict) -> None:
    got, ref = results[None]
    assert set(got["n_excluded"]) == set(ref["count"])
    assert set(got["n_excluded"].values()) == {0.0}


# --- specific experiment behaviour -------------------------------------------------------------

def test_computed_column_pred_double_is_scored_as_twice_pred(results: dict) -> None:
    got, ref = results[None]
    key = ("doubled", "pred_double", "target_10s", None)
    plain = ("doubled", "pred_10s", "target_10s", None)
    for m in ("mse", "mae", "bias", "r2", "corr", "rmse"):
        assert got[m][key] == pytest.approx(ref[m][key], rel=REL), m
    # Doubling changes the error metrics but not the correlation.
    assert got["mse"][key] != pytest.approx(got["mse"][plain], rel=1e-3)
    assert got["corr"][key] == pytest.approx(got["corr"][plain], rel=1e-12)


def test_filter_on_replaced_column_sees_the_clipped_values(results: dict, dataset: tuple[Path, pd.DataFrame]) -> None:
    _, df = dataset
    w = df[df["in_session"]]
    got, _ = results[None]
    key = ("clipped_sel", "pred_10s", "target_10s", None)
    expected = int((w["target_10s"] > 0).sum())  # every clipped pred is < 0.6
    unclipped = int(((w["target_10s"] > 0) & (w["pred_10s"] < 0.6)).sum())
    assert expected != unclipped
    assert got["count"][key] == expected
    # And clipping happened: the pair's mse is that of the clipped prediction.
    t, p = w["target_10s"].to_numpy(), w["pred_10s"].to_numpy()
    assert got["mse"][("clipped", "pred_10s", "target_10s", None)] == pytest.approx(
        mean_squared_error(t, np.clip(p, -0.5, 0.5)), rel=REL)


def test_window_function_experiment_uses_symbol_means_over_all_windowed_rows(
        harness: Harness, dataset: tuple[Path, pd.DataFrame]) -> None:
    _, df = dataset
    w = df[df["in_session"]]
    res = harness.metrics(METRICS, pairs=["pm:target_10s"], experiments=["pm"])
    assert "whole" in harness.last_run.timings  # it did run as one query over all rows
    got = dict(zip(res["metric"], res["value"], strict=True))
    pm = w.groupby("symbol")["pred_10s"].transform("mean").to_numpy()
    ref = reference_metrics(pm, w["target_10s"].to_numpy())
    assert {m: got[m] for m in METRICS} == pytest.approx(ref, rel=REL)
    # Means per symbol and file (what a per-file scan would compute) give another answer.
    per_file = w.groupby(["symbol", "day"])["pred_10s"].transform("mean").to_numpy()
    assert got["corr"] != pytest.approx(pearsonr(per_file, w["target_10s"].to_numpy()).statistic, rel=1e-6)


def test_filter_over_window_function_experiment_matches_reference_on_all_rows(results: dict) -> None:
    got, ref = results[None]
    for m in METRICS:
        for pair in (("pred_10s", "target_10s"), ("pred_1s", "target_1s")):
            key = ("pm_above", *pair, None)
            assert got[m][key] == pytest.approx(ref[m][key], rel=REL), (m, pair)


def test_group_by_experiment_scores_one_row_per_symbol(results: dict) -> None:
    got, ref = results[None]
    key = ("per_symbol", "pred_10s", "target_10s", None)
    assert got["count"][key] == 8
    for m in METRICS:
        assert got[m][key] == pytest.approx(ref[m][key], rel=REL), m


# --- numerical stability -------------------------------------------------------------------------

def _stability(folder: Path, mean: float, files: int = 20, rows: int = 2000) -> tuple[dict, dict]:
    rng = np.random.default_rng(7)
    tables = {}
    for i in range(files):
        t = mean + rng.standard_normal(rows)
        tables[f"part{i:02d}"] = pa.table({"pred_x": t + 0.1 * rng.standard_normal(rows), "target_x": t})
    write_dataset(folder, tables, {})
    res = Harness(folder).metrics(["r2", "corr", "mse"])
    got = dict(zip(res["metric"], res["value"], strict=True))
    all_rows = read_all(folder)
    p = all_rows["pred_x"].to_numpy().astype(np.longdouble)
    t = all_rows["target_x"].to_numpy().astype(np.longdouble)
    pc, tc = p - p.mean(), t - t.mean()
    ref = {
        "r2": float(1 - np.sum((t - p) ** 2) / np.sum(tc * tc)),
        "corr": float(np.sum(pc * tc) / np.sqrt(np.sum(pc * pc) * np.sum(tc * tc))),
        "mse": float(np.mean((t - p) ** 2)),
    }
    return {m: got[m] for m in ref}, ref


def test_r2_corr_mse_stay_exact_when_target_mean_is_1e6_and_std_is_1(tmp_path: Path) -> None:
    # (Unshifted float64 sums of squares miss this tolerance by orders of magnitude: the variance
    # is 1e-12 of the raw second moment.)
    got, ref = _stability(tmp_path, 1e6)
    assert got == pytest.approx(ref, rel=1e-9, abs=0)


def test_r2_corr_mse_stay_exact_when_large_target_mean_is_not_a_round_number(tmp_path: Path) -> None:
    # Same as above with mean 1234567.891: the shift must be close to the mean, not just to its
    # first significant digits, for the sums of squares to keep their precision.
    got, ref = _stability(tmp_path, 1234567.891)
    assert got == pytest.approx(ref, rel=1e-9, abs=0)



def test_corr_is_null_when_prediction_is_constant_within_a_group(tmp_path: Path) -> None:
    # Pearson correlation with a constant input is undefined (scipy: nan); the metric's final
    # formula guards the zero variance with nullif(..., 0), and undefined is reported as null.
    rng = np.random.default_rng(3)
    n = 3000
    g = rng.integers(0, 8, n)
    levels = np.array([0.1, 0.3, 0.7, 1 / 3, 0.123456789, 2.0, 0.05, 0.9])
    write_dataset(tmp_path, {"a": pa.table({"g": g, "pred_x": levels[g], "target_x": rng.standard_normal(n)})}, {})
    res = Harness(tmp_path).metrics(["corr", "r2"], by="g")
    corr = {r["g"]: r["value"] for r in res.filter(metric="corr").iter_rows(named=True)}
    r2 = {r["g"]: r["value"] for r in res.filter(metric="r2").iter_rows(named=True)}
    target = read_all(tmp_path)["target_x"].to_numpy()
    # r2 is defined for a constant prediction and must still match.
    assert r2 == pytest.approx({k: r2_score(target[g == k], levels[g[g == k]]) for k in range(8)}, rel=REL)
    assert corr == dict.fromkeys(range(8))


@pytest.mark.parametrize("scale", [1e-150, 1.0, 1e150], ids=["1e-150", "1", "1e150"])
def test_corr_is_right_at_extreme_scales(tmp_path: Path, scale: float) -> None:
    """The product of the two variances would overflow at 1e150 (corr 0 before) and underflow at
    1e-150 (corr inf): the square roots are taken apart."""
    rng = np.random.default_rng(12)
    z = rng.standard_normal(1000)
    p, t = z + rng.standard_normal(1000), z + 2 * rng.standard_normal(1000)
    write_dataset(tmp_path, {"a": pa.table({"pred_x": p * scale, "target_x": t * scale})}, {})
    got = Harness(tmp_path, cache=False).metrics(["corr"])["value"][0]
    assert got == pytest.approx(pearsonr(p, t).statistic, rel=1e-12)


def test_sums_that_overflow_float64_warn_naming_the_experiment_pair_and_metrics(tmp_path: Path) -> None:
    """At 1e160 squares exceed float64 (numpy's own r2 and corr are nan, with RuntimeWarnings); the
    metrics that need them are null or inf, and a warning says so instead of a silent null. The
    metrics that need no square stay right."""
    rng = np.random.default_rng(13)
    t = rng.standard_normal(1000) * 1e160
    p = t + rng.standard_normal(1000) * 1e159
    write_dataset(tmp_path, {"a": pa.table({"pred_x": p, "target_x": t})}, {})
    h = Harness(tmp_path, cache=False)
    h.add_experiment("big", "pred_x > -1e300")
    with pytest.warns(DuckHarnessWarning, match=r"overflowed.*'big', pair pred_x:target_x: r2, mse, corr") as rec:
        res = h.metrics(["count", "r2", "mse", "mae", "corr"], experiments=["big"])
    assert len(rec) == 1
    got = dict(zip(res["metric"], res["value"], strict=True))
    assert got["r2"] is None and got["corr"] is None and got["mse"] == math.inf
    longdouble = np.abs(p.astype(np.longdouble) - t.astype(np.longdouble)).mean()
    assert got["mae"] == pytest.approx(float(longdouble), rel=1e-12)
    assert got["count"] == 1000


def test_corr_never_leaves_minus_one_to_one(tmp_path: Path) -> None:
    """Groups of two rows (|r| = 1 exactly) and of nearly collinear rows: rounding can put the
    formula a few ulps past ±1; the value is clamped."""
    rng = np.random.default_rng(5)
    n = 4000
    g = np.repeat(np.arange(n // 2), 2)
    p = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)
    t = np.where(g % 2 == 0, 3 * p + 1e-9 * rng.standard_normal(n), -p)
    write_dataset(tmp_path, {"a": pa.table({"g": g, "pred_x": p, "target_x": t})}, {})
    res = Harness(tmp_path, cache=False).metrics(["corr"], by="g").filter(metric="corr")
    values = res["value"].drop_nulls().to_numpy()
    assert len(values) > n // 4
    assert np.all(np.abs(values) <= 1.0)
    assert np.abs(values).max() == 1.0
