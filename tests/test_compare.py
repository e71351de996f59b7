"""Comparing two experiments: per-day loss differential, Diebold–Mariano (HLN), and the seeded
day-block bootstrap of the pooled difference, against pandas/numpy references."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
from conftest import read_all
from scipy import stats as sps
from scipy.stats import spearmanr

from duckharness import Harness, InputError, UnknownExperimentError, UnknownMetricError

CLIP = "SELECT * REPLACE (greatest(least(pred_10s, 0.2), -0.2) AS pred_10s) FROM baseline"


def session_rows(folder: Path) -> pd.DataFrame:
    df = read_all(folder).to_pandas()
    local = df["ts"].dt.tz_convert("US/Eastern")
    keep = (local.dt.time >= dt.time(9, 30)) & (local.dt.time <= dt.time(16, 0))
    return df[keep].assign(day=local[keep].dt.date)


def daily_n_sse(df: pd.DataFrame, pred: pd.Series) -> pd.DataFrame:
    err = (df["target_10s"] - pred) ** 2
    return pd.DataFrame({"day": df["day"], "err": err}).groupby("day")["err"].agg(["count", "sum"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import SESSION, write_dataset

    from duckharness.demo import one_day, trading_days

    rng = np.random.default_rng(11)
    out = tmp_path_factory.mktemp("cmp") / "bt"
    days = trading_days(dt.date(2026, 3, 4), 8)
    write_dataset(out, {d.isoformat(): one_day(d, 1500, rng, symbols=5) for d in days}, SESSION)
    return out


@pytest.fixture(scope="module")
def reference(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    df = session_rows(folder)
    return daily_n_sse(df, df["pred_10s"].clip(-0.2, 0.2)), daily_n_sse(df, df["pred_10s"])


def harness(folder: Path) -> Harness:
    h = Harness(folder, cache=False)
    h.add_experiment("clipped", CLIP)
    return h


def dm_direct(d: np.ndarray, lag: int) -> tuple[float, float]:
    t, dbar = len(d), d.mean()
    gam = [np.sum((d[k:] - dbar) * (d[: t - k] - dbar)) / t for k in range(lag + 1)]
    s = gam[0] + 2 * sum((1 - k / (lag + 1)) * gam[k] for k in range(1, lag + 1))
    h = lag + 1
    stat = dbar / np.sqrt(s / t) * np.sqrt((t + 1 - 2 * h + h * (h - 1) / t) / t)
    return stat, 2 * sps.t.sf(abs(stat), t - 1)


def test_daily_differential_and_dm_match_pandas(folder: Path, reference: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    ra, rb = reference
    with harness(folder) as h:
        c = h.compare("mse", "clipped", "baseline", "pred_10s:target_10s", lag=1, n_boot=200)
    mse_a, mse_b = (ra["sum"] / ra["count"]).to_numpy(), (rb["sum"] / rb["count"]).to_numpy()
    assert c.daily["day"].to_list() == list(ra.index)
    assert c.daily["value_a"].to_numpy() == pytest.approx(mse_a, rel=1e-12)
    assert c.daily["diff"].to_numpy() == pytest.approx(mse_a - mse_b, rel=1e-9, abs=1e-15)
    row = c.table.row(0, named=True)
    stat, p = dm_direct(mse_a - mse_b, 1)
    assert row["dm_stat"] == pytest.approx(stat, rel=1e-8)
    assert row["p_value"] == pytest.approx(p, rel=1e-6)
    assert row["n_days"] == 8 and row["lag"] == 1
    pooled = ra["sum"].sum() / ra["count"].sum() - rb["sum"].sum() / rb["count"].sum()
    assert row["diff"] == pytest.approx(pooled, rel=1e-9)
    assert row["value_b"] == pytest.approx(rb["sum"].sum() / rb["count"].sum(), rel=1e-12)


def test_bootstrap_recombines_resampled_days_exactly(
    folder: Path, reference: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    ra, rb = reference
    n_boot, seed = 300, 42
    with harness(folder) as h:
        row = h.compare("mse", "clipped", "baseline", "pred_10s", n_boot=n_boot, seed=seed, level=0.9).table.row(
            0, named=True
        )
    # Independent recombination: draw days with the same generator, pool the sums, take the quantiles.
    draws = np.random.default_rng(seed).integers(0, len(ra), size=(n_boot, len(ra)))
    na, sa, nb, sb = (x.to_numpy()[draws].sum(axis=1) for x in (ra["count"], ra["sum"], rb["count"], rb["sum"]))
    low, high = np.quantile(sa / na - sb / nb, [0.05, 0.95])
    assert row["ci_low"] == pytest.approx(low, rel=1e-9)
    assert row["ci_high"] == pytest.approx(high, rel=1e-9)
    assert row["ci_low"] <= row["diff"] <= row["ci_high"]
    assert (row["level"], row["n_boot"], row["seed"]) == (0.9, n_boot, seed)


def test_bootstrap_is_reproducible_with_a_seed(folder: Path) -> None:
    with harness(folder) as h:
        one = h.compare("mse", "clipped", "baseline", "pred_10s", n_boot=200, seed=1).table
        same = h.compare("mse", "clipped", "baseline", "pred_10s", n_boot=200, seed=1).table
        other = h.compare("mse", "clipped", "baseline", "pred_10s", n_boot=200, seed=2).table
    assert one.select("ci_low", "ci_high").row(0) == same.select("ci_low", "ci_high").row(0)
    assert one.select("ci_low", "ci_high").row(0) != other.select("ci_low", "ci_high").row(0)


def test_compare_costs_one_scan(folder: Path) -> None:
    with harness(folder) as h:
        seen: list[str] = []
        with h.trace(seen.append):
            h.compare("r2", "clipped", "baseline", ["pred_10s", "pred_1s"], n_boot=50)
    reads = [s for s in seen if "read_parquet" in s.lower() and "GROUP BY ALL" in s]
    assert len(reads) == 8  # one aggregate query per file (one file per day), for both experiments and pairs


def test_days_one_experiment_lacks_are_left_out_of_both_pools(make_panel: Callable[..., Path]) -> None:
    """Like for like: the pooled values, their difference and the bootstrap use the days both
    daily values are defined, as the test does (before, b was pooled over all its days)."""
    folder = make_panel(days=4)
    df = read_all(folder).to_pandas()
    with Harness(folder, cache=False) as h:
        h.add_experiment("early", "ts < TIMESTAMPTZ '2026-03-06 00:00:00+00'")
        c = h.compare("mae", "early", "baseline", "pred_10s", n_boot=100)
    assert c.daily["value_a"].null_count() == 2 and c.daily["diff"].null_count() == 2
    row = c.table.row(0, named=True)
    ok = df[np.isfinite(df["pred_10s"]) & df["target_10s"].notna()]
    err = (ok["pred_10s"] - ok["target_10s"]).abs()
    early = ok["ts"] < pd.Timestamp("2026-03-06", tz="UTC")
    assert row["n_days"] == 2
    assert row["value_a"] == pytest.approx(err[early].mean(), rel=1e-12)
    assert row["value_b"] == pytest.approx(err[early].mean(), rel=1e-12)  # the same rows, those days
    assert row["diff"] == pytest.approx(0, abs=1e-12)
    assert row["ci_low"] == pytest.approx(0, abs=1e-12) and row["ci_high"] == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("blank", ["NULL", "'NaN'::DOUBLE"])
def test_days_whose_predictions_are_all_missing_in_one_experiment_count_for_neither(
        make_panel: Callable[..., Path], blank: str) -> None:
    """Rows on such a day are all excluded, so its daily value is undefined: the pooled values,
    their difference and the bootstrap leave the day out, as the test does. Otherwise a model
    with an outage would look significantly different from itself."""
    folder = make_panel(days=4)
    df = read_all(folder).to_pandas()
    with Harness(folder, cache=False) as h:
        h.add_experiment("outage", f"SELECT * REPLACE (CASE WHEN ts >= TIMESTAMPTZ '2026-03-06 00:00:00+00' "
                                   f"THEN {blank} ELSE pred_10s END AS pred_10s) FROM baseline")
        c = h.compare("mse", "outage", "baseline", "pred_10s", n_boot=200, seed=3)
    row = c.table.row(0, named=True)
    ok = df[np.isfinite(df["pred_10s"]) & df["target_10s"].notna()]
    kept = ok[ok["ts"] < pd.Timestamp("2026-03-06", tz="UTC")]
    mse = float(((kept["pred_10s"].to_numpy(np.longdouble) - kept["target_10s"].to_numpy(np.longdouble)) ** 2).mean())
    assert row["n_days"] == 2
    assert row["value_a"] == pytest.approx(mse, rel=1e-12) and row["value_b"] == pytest.approx(mse, rel=1e-12)
    assert row["diff"] == pytest.approx(0, abs=1e-12)
    assert row["ci_low"] == pytest.approx(0, abs=1e-12) and row["ci_high"] == pytest.approx(0, abs=1e-12)


def test_compare_rank_ic_pools_the_mean_daily_ic(make_panel: Callable[..., Path]) -> None:
    folder = make_panel(days=5)
    df = read_all(folder).to_pandas()
    df["day"] = df["ts"].dt.tz_convert("US/Eastern").dt.date
    def daily_ic(pred: str) -> pd.Series:
        ok = df[np.isfinite(df[pred]) & df["target_10s"].notna()]  # each experiment's own valid rows
        return ok.groupby("day").apply(lambda g: spearmanr(g[pred], g["target_10s"]).statistic, include_groups=False)

    a, b = daily_ic("pred_1s"), daily_ic("pred_10s")
    with Harness(folder, cache=False) as h:
        h.add_experiment("other", "SELECT * REPLACE (pred_1s AS pred_10s) FROM baseline")
        c = h.compare("rank_ic", "other", "baseline", "pred_10s", n_boot=100, lag=0)
    assert c.daily["diff"].to_numpy() == pytest.approx((a - b).to_numpy(), abs=1e-12)
    row = c.table.row(0, named=True)
    assert row["diff"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert row["dm_stat"] == pytest.approx(dm_direct((a - b).to_numpy(), 0)[0], rel=1e-9)


def test_unknown_experiment_or_metric_is_named(folder: Path) -> None:
    with harness(folder) as h:
        with pytest.raises(UnknownExperimentError, match="'nosuch'"):
            h.compare("mse", "nosuch", "baseline")
        with pytest.raises(UnknownMetricError, match="'msx'"):
            h.compare("msx", "clipped", "baseline")
        with pytest.raises(InputError, match="two different experiments"):
            h.compare("mse", "baseline", "baseline")


def test_comparison_table_is_tidy_per_pair(folder: Path) -> None:
    with harness(folder) as h:
        c = h.compare("mse", "clipped", "baseline", ["pred_10s", "pred_1s"], n_boot=50)
    assert c.table.select("metric", "a", "b", "pred").rows() == [
        ("mse", "clipped", "baseline", "pred_10s"), ("mse", "clipped", "baseline", "pred_1s")
    ]
    # pred_1s is not clipped: identical forecasts, so the test is undefined and the interval is [0, 0].
    one_s = c.table.row(1, named=True)
    assert one_s["dm_stat"] is None and one_s["ci_low"] == 0 and one_s["ci_high"] == 0
    assert c.daily.filter(pl.col("pred") == "pred_1s")["diff"].to_list() == [0.0] * 8


def test_compare_an_experiment_that_needs_all_rows(folder: Path) -> None:
    df = session_rows(folder)
    demeaned = df["pred_10s"] - df["pred_10s"].mean()  # over all session rows, not per day
    ra, rb = daily_n_sse(df, demeaned), daily_n_sse(df, df["pred_10s"])
    with Harness(folder, cache=False) as h:
        h.add_experiment("demeaned", "SELECT * REPLACE (pred_10s - avg(pred_10s) OVER () AS pred_10s) FROM baseline")
        c = h.compare("mse", "demeaned", "baseline", "pred_10s", n_boot=100, lag=0)
    want = (ra["sum"] / ra["count"] - rb["sum"] / rb["count"]).to_numpy()
    assert c.daily["diff"].to_numpy() == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert c.table["dm_stat"][0] == pytest.approx(dm_direct(want, 0)[0], rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "why"), [({"lag": -1}, "lag must be 0 or more"), ({"n_boot": 0}, "n_boot"), ({"level": 95}, "level")]
)
def test_bad_test_settings_are_input_errors_before_any_scan(folder: Path, kwargs: dict, why: str) -> None:
    h = Harness(folder, cache=False)
    h.add_experiment("clipped", CLIP)
    statements: list[str] = []
    with h.trace(statements.append), pytest.raises(InputError, match=why):
        h.compare("mse", "clipped", "baseline", "pred_10s", **kwargs)
    assert statements == []
