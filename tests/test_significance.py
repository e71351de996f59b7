"""Statistics across days: Newey–West variance, t-statistics, Diebold–Mariano with the HLN
correction, Student t tails, and ``Harness.summary`` — each against a direct numpy/scipy
computation from the formula."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import read_all
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from duckharness import Harness, InputError
from duckharness.metrics.merge import merge_partials
from duckharness.metrics.significance import (
    bootstrap_counts,
    diebold_mariano,
    long_run_variance,
    merge_resampled,
    newey_west_lag,
    student_t_sf,
    summarize_series,
)


def nw_direct(x: np.ndarray, lag: int) -> float:
    """Newey–West long-run variance written out term by term: (1/T) ΣΣ w(|i−j|) u_i u_j."""
    u = x - x.mean()
    t = len(u)
    total = 0.0
    for i in range(t):
        for j in range(t):
            k = abs(i - j)
            if k <= lag:
                total += (1 - k / (lag + 1)) * u[i] * u[j]
    return total / t


def dm_direct(d: np.ndarray, lag: int) -> tuple[float, float]:
    """DM with HLN correction from the formula, h = lag + 1, p from Student t(T−1)."""
    t = len(d)
    dbar = d.mean()
    gammas = [np.sum((d[k:] - dbar) * (d[: t - k] - dbar)) / t for k in range(lag + 1)]
    s = gammas[0] + 2 * sum((1 - k / (lag + 1)) * gammas[k] for k in range(1, lag + 1))
    dm = dbar / np.sqrt(s / t)
    h = lag + 1
    dm_star = dm * np.sqrt((t + 1 - 2 * h + h * (h - 1) / t) / t)
    return dm_star, 2 * sps.t.sf(abs(dm_star), t - 1)


@pytest.mark.parametrize("lag", [0, 1, 3, 7])
def test_newey_west_variance_matches_the_double_sum(lag: int) -> None:
    x = np.random.default_rng(lag).standard_normal(40).cumsum() * 0.1
    assert long_run_variance(x, lag) == pytest.approx(nw_direct(x, lag), rel=1e-12)


def test_default_lag_is_floor_4_t_over_100_to_the_2_9_with_four_days_per_lag() -> None:
    for t in (2, 5, 8, 20, 60, 99, 100, 250, 1000, 5000):
        assert newey_west_lag(t) == min(math.floor(4 * (t / 100) ** (2 / 9)), t // 4)
    assert newey_west_lag(20) == math.floor(4 * (20 / 100) ** (2 / 9))  # the cap only acts below ~8 days


def test_student_t_tail_matches_scipy() -> None:
    for t, df in [(0.1, 1), (1.3, 2), (2.0, 10), (-1.7, 7), (4.5, 30), (12.0, 250), (0.0, 3)]:
        assert student_t_sf(t, df) == pytest.approx(sps.t.sf(t, df), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("lag", [0, 1, 2])
def test_diebold_mariano_with_hln_correction_matches_the_formula(lag: int) -> None:
    d = np.array([0.3, -0.1, 0.4, 0.2, 0.05, 0.6, -0.2, 0.1, 0.35, 0.0, 0.25, 0.15])
    want_stat, want_p = dm_direct(d, lag)
    got = diebold_mariano(d, lag)
    assert got.statistic == pytest.approx(want_stat, rel=1e-12)
    assert got.p_value == pytest.approx(want_p, rel=1e-9)
    assert got.n_days == 12 and got.lag == lag and got.mean_diff == pytest.approx(d.mean())


def test_diebold_mariano_drops_undefined_days_and_uses_the_default_lag() -> None:
    d = np.array([0.3, np.nan, -0.1, 0.4, 0.2, 0.05, 0.6, -0.2, 0.1, 0.35])
    got = diebold_mariano(d)
    clean = d[np.isfinite(d)]
    assert got.n_days == 9 and got.lag == newey_west_lag(9)
    assert got.statistic == pytest.approx(dm_direct(clean, newey_west_lag(9))[0], rel=1e-12)


def test_diebold_mariano_of_identical_forecasts_is_undefined() -> None:
    got = diebold_mariano(np.zeros(10))
    assert math.isnan(got.statistic) and math.isnan(got.p_value)


def test_series_summary_matches_numpy() -> None:
    x = np.random.default_rng(5).normal(0.02, 0.05, 30)
    s = summarize_series(x, lag=3)
    assert s.mean == pytest.approx(x.mean())
    assert s.std == pytest.approx(x.std(ddof=1))
    assert s.icir == pytest.approx(x.mean() / x.std(ddof=1))
    t = x.mean() / np.sqrt(nw_direct(x, 3) / 30)
    assert s.t_stat == pytest.approx(t, rel=1e-12)
    assert s.p_value == pytest.approx(2 * sps.t.sf(abs(t), 29), rel=1e-9)
    assert s.frac_positive == pytest.approx((x > 0).mean())


def test_resampled_merge_counts_a_day_once_per_draw() -> None:
    stats = np.array([[1.0, 10.0, 3.0], [2.0, 20.0, 1.0], [4.0, np.nan, 7.0]])
    counts = bootstrap_counts(3, 50, seed=9)
    got = merge_resampled(stats, ["sum", "sum", "max"], counts)
    for b in range(50):
        rows = np.repeat(np.arange(3), counts[b])
        assert got[b, 0] == stats[rows, 0].sum()
        assert got[b, 1] == np.nansum(stats[rows, 1])
        assert got[b, 2] == stats[rows, 2].max()


def test_summary_of_per_day_ic_matches_numpy(make_backtest: Callable[..., Path]) -> None:
    folder = make_backtest(days=6, rows=1500, symbols=5)
    df = read_all(folder).to_pandas()
    local = df["ts"].dt.tz_convert("US/Eastern")
    tod = local.dt.time
    df = df[(tod >= dt.time(9, 30)) & (tod <= dt.time(16, 0))].assign(day=local.dt.date)
    daily = np.array([np.corrcoef(g["pred_10s"], g["target_10s"])[0, 1] for _, g in df.groupby("day")])
    with Harness(folder, cache=False) as h:
        got = h.summary(["corr"], "pred_10s", "baseline", lag=1)
    row = got.row(0, named=True)
    assert row["n_days"] == 6 and row["nw_lag"] == 1
    assert row["mean"] == pytest.approx(daily.mean(), rel=1e-10)
    assert row["std"] == pytest.approx(daily.std(ddof=1), rel=1e-8)
    assert row["icir"] == pytest.approx(daily.mean() / daily.std(ddof=1), rel=1e-8)
    assert row["t_stat"] == pytest.approx(daily.mean() / np.sqrt(nw_direct(daily, 1) / 6), rel=1e-8)
    assert row["frac_positive"] == pytest.approx((daily > 0).mean())


def test_days_without_an_experiments_rows_are_not_in_its_summary_for_any_metric(
        make_backtest: Callable[..., Path]) -> None:
    """Before, by="day"'s count-0 days entered the count's series (n_days 10 where the corr's was 4),
    and an experiment with no rows had no summary row at all."""
    folder = make_backtest(days=6, rows=1200, symbols=5)
    df = read_all(folder).to_pandas()
    local = df["ts"].dt.tz_convert("US/Eastern")
    df = df[(local.dt.time >= dt.time(9, 30)) & (local.dt.time <= dt.time(16, 0))].assign(day=local.dt.date)
    cut = sorted(df["day"].unique())[3]
    late = df[df["day"] >= cut]
    counts = late.groupby("day").size().to_numpy(dtype=float)
    with Harness(folder, cache=False) as h:
        h.add_experiment("late", f"ts >= TIMESTAMPTZ '{dt.datetime.combine(cut, dt.time(4)).isoformat()}+00'")
        h.add_experiment("empty", "false")
        by_day = h.metrics(["count"], "pred_10s", ["late"], by="day").filter(metric="count")
        got = h.summary(["count", "corr"], "pred_10s", ["late", "empty"], lag=0)
    assert by_day.height == 6 and by_day.filter(pl.col("value") == 0).height == 3  # listed, count 0
    rows = {(r["experiment"], r["metric"]): r for r in got.iter_rows(named=True)}
    assert list(rows) == [("late", "count"), ("late", "corr"), ("empty", "count"), ("empty", "corr")]
    assert rows["late", "count"]["n_days"] == rows["late", "corr"]["n_days"] == len(counts) == 3
    assert rows["late", "count"]["mean"] == pytest.approx(counts.mean(), rel=1e-12)
    assert rows["empty", "count"]["n_days"] == rows["empty", "corr"]["n_days"] == 0
    assert rows["empty", "count"]["mean"] is None


def test_summary_covers_rank_ic_and_metrics_in_one_table(make_panel: Callable[..., Path]) -> None:
    with Harness(make_panel(days=5), cache=False) as h:
        h.add_experiment("liquid", "volume > 1000")
        got = h.summary(["rank_ic", "mse"], "pred_10s")
        with pytest.raises(InputError, match="lag"):
            h.summary("rank_ic", lag=-1)
    assert got.select("experiment", "metric").rows() == [
        ("baseline", "rank_ic"), ("baseline", "mse"), ("liquid", "rank_ic"), ("liquid", "mse")
    ]
    assert got["n_days"].to_list() == [5, 5, 5, 5]
    assert got["nw_lag"].to_list() == [newey_west_lag(5)] * 4
    assert got.schema["p_value"] == pl.Float64


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 50), st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)), min_size=1, max_size=8),
    st.integers(0, 2**32 - 1),
)
def test_resampled_merge_equals_merging_the_drawn_days(days: list[tuple[int, float, float]], seed: int) -> None:
    stats = np.array(days, dtype=float)
    counts = bootstrap_counts(len(days), 5, seed)
    got = merge_resampled(stats, ["sum", "sum", "min"], counts)
    for b in range(5):
        drawn = pl.DataFrame(stats[np.repeat(np.arange(len(days)), counts[b])], schema=["n", "s", "lo"], orient="row")
        want = merge_partials(drawn, [], {"n": "sum", "s": "sum", "lo": "min"}).row(0)
        assert got[b].tolist() == pytest.approx(list(want), rel=1e-12, abs=1e-9)


def test_diebold_mariano_with_too_few_days_for_its_lag_gives_no_test() -> None:
    got = diebold_mariano([0.1, 0.4], lag=1)  # HLN: (T + 1 - 2h + h(h - 1)/T) / T = 0 at T = 2, h = 2
    assert got.n_days == 2 and got.mean_diff == pytest.approx(0.25)
    assert math.isnan(got.statistic) and math.isnan(got.p_value)


def test_default_lag_is_at_most_t_minus_1_and_a_longer_one_is_refused() -> None:
    from duckharness.metrics.significance import newey_west_lag, summarize_series

    # floor(4 (T/100)^(2/9)), at most floor(T/4): [0, 1, 1, 2, 2, 2, 2, 2, 4] uncapped
    assert [newey_west_lag(n) for n in (1, 2, 3, 4, 5, 8, 9, 20, 100)] == [0, 0, 0, 1, 1, 2, 2, 2, 4]
    assert summarize_series([0.3], None).lag == 0
    for fn in (summarize_series, diebold_mariano, long_run_variance):
        with pytest.raises(ValueError, match="lag 3 needs more than 3 values, got 3"):
            fn([0.1, 0.2, 0.4], 3)


def test_a_lag_of_t_or_more_names_the_series(make_backtest: Callable[..., Path]) -> None:
    """With L >= T the Bartlett weights no longer taper within the series: t = 384 on 8 days at
    lag 100, where the default lag gives 69. Refused, naming what has too few days."""
    folder = make_backtest(days=3)
    with Harness(folder, cache=False) as h:
        h.add_experiment("clip", "SELECT * REPLACE (greatest(least(pred_10s, 0.1), -0.1) AS pred_10s) FROM baseline")
        summary_msg = r"lag=3 needs more than 3 days, but mse of 'baseline' \(pred_10s vs target_10s\) has 3"
        with pytest.raises(InputError, match=summary_msg):
            h.summary(["mse"], pairs="pred_10s:target_10s", lag=3)
        for lag in (2, 5):  # at lag T - 1 = 2 the HLN factor is 0: no test either
            compare_msg = (rf"lag={lag} leaves no Diebold-Mariano test for the comparison on pred_10s vs target_10s, "
                           r"which has 3 days \(the HLN factor is 0 at lag T - 1\). Use a lag below 2")
            with pytest.raises(InputError, match=compare_msg):
                h.compare("mse", "clip", "baseline", "pred_10s:target_10s", lag=lag)
        assert h.compare("mse", "clip", "baseline", "pred_10s:target_10s", lag=1).table["dm_stat"][0] is not None
        assert set(h.summary(["mse"], pairs="pred_10s:target_10s", lag=2)["nw_lag"]) == {2}


@pytest.mark.parametrize("value", [0.1, 0.7, 1 / 3, 123.456, -2.5e-20])
@pytest.mark.parametrize("n", [3, 20, 250])
def test_days_equal_up_to_rounding_give_no_t_statistic(value: float, n: int) -> None:
    exact = summarize_series(np.full(n, value), lag=0)  # np.mean of these is off by an ulp
    assert exact.mean == value and exact.std == 0.0
    assert math.isnan(exact.t_stat) and math.isnan(exact.icir) and math.isnan(exact.p_value)
    wobble = np.full(n, value) * (1 + np.where(np.arange(n) % 2 == 0, 1, -1) * 2.0**-52)
    rounded = summarize_series(wobble, lag=0)
    assert rounded.std == 0.0 and math.isnan(rounded.t_stat) and math.isnan(rounded.icir)
    assert math.isnan(diebold_mariano(wobble, lag=0).statistic)


def test_a_small_but_real_spread_still_gets_its_t_statistic() -> None:
    x = 0.05 + 1e-9 * np.random.default_rng(11).standard_normal(20)  # spread 2e-8 of the level
    s = summarize_series(x, lag=1)
    xl = x.astype(np.longdouble)
    t = float(xl.mean() / np.sqrt(nw_direct(x, 1) / 20))
    assert s.std == pytest.approx(float(np.std(xl, ddof=1)), rel=1e-6)
    assert s.t_stat == pytest.approx(t, rel=1e-6)
