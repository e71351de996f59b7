"""Rank IC: per-day Spearman correlation (scipy's spearmanr) and per-timestamp cross-sectional IC
averaged over each day (alphalens' per-date IC semantics), with ties, invalid rows and days split
across files."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from conftest import read_all, write_dataset
from scipy.stats import spearmanr

from duckharness import Harness, UnknownMetricError


def reference_frame(folder: Path) -> pd.DataFrame:
    df = read_all(folder).to_pandas()
    df["day"] = df["ts"].dt.tz_convert("US/Eastern").dt.date
    return df


def spearman_by_day(df: pd.DataFrame, pred: str, target: str) -> dict[dt.date, float]:
    ok = df[np.isfinite(df[pred]) & df[target].notna()]
    return {d: spearmanr(g[pred], g[target]).statistic for d, g in ok.groupby("day")}


def ic_of(h_frame: pl.DataFrame, experiment: str = "baseline", pred: str = "pred_10s") -> dict[dt.date, float]:
    sel = h_frame.filter((pl.col("experiment") == experiment) & (pl.col("pred") == pred)
                         & (pl.col("metric") == "rank_ic"))
    return dict(zip(sel["day"].to_list(), sel["value"].to_list(), strict=True))


def test_rank_ic_matches_scipy_spearmanr_per_day_with_ties(make_panel: Callable[..., Path]) -> None:
    folder = make_panel(days=4)
    ref = reference_frame(folder)
    with Harness(folder, cache=False) as h:
        got = h.rank_ic(["pred_10s", "pred_1s"])
    for pred, target in (("pred_10s", "target_10s"), ("pred_1s", "target_1s")):
        want = spearman_by_day(ref, pred, target)
        have = ic_of(got, pred=pred)
        assert have.keys() == want.keys()
        for d in want:
            assert have[d] == pytest.approx(want[d], abs=1e-12)


def test_rank_ic_counts_only_valid_rows(make_panel: Callable[..., Path]) -> None:
    folder = make_panel(days=2, timestamps=5, symbols=4)
    with Harness(folder, cache=False) as h:
        got = h.rank_ic("pred_10s")
    n = got.filter(pl.col("metric") == "n")["value"].to_list()
    assert n == [18.0, 18.0]  # 20 rows a day, one NaN pred and one NULL target


def test_rank_ic_of_a_filter_experiment_ranks_only_its_rows(make_panel: Callable[..., Path]) -> None:
    folder = make_panel(days=3)
    ref = reference_frame(folder)
    with Harness(folder, cache=False) as h:
        h.add_experiment("liquid", "volume > 1000")
        got = h.rank_ic("pred_10s", ["liquid"])
    want = spearman_by_day(ref[ref["volume"] > 1000], "pred_10s", "target_10s")
    have = ic_of(got, "liquid")
    assert have == pytest.approx(want, abs=1e-12)


def test_a_day_split_across_files_is_ranked_as_one_day(make_panel: Callable[..., Path]) -> None:
    # Day 0 in two files, days 1 and 2 together in one file.
    files = {"a": [(0, slice(0, 20))], "b": [(0, slice(20, None))], "c": [(1, slice(None)), (2, slice(None))]}
    folder = make_panel(days=3, files=files)
    ref = reference_frame(folder)
    want = spearman_by_day(ref, "pred_10s", "target_10s")
    for batch_size in (1, 2):
        with Harness(folder, cache=False, batch_size=batch_size) as h:
            have = ic_of(h.rank_ic("pred_10s"))
        assert have == pytest.approx(want, abs=1e-12)


def test_cross_sectional_rank_ic_is_the_day_mean_of_per_timestamp_spearman(make_panel: Callable[..., Path]) -> None:
    folder = make_panel(days=3, timestamps=6, symbols=5)
    ref = reference_frame(folder)
    ok = ref[np.isfinite(ref["pred_10s"]) & ref["target_10s"].notna()]
    per_ts = ok.groupby(["day", "ts"]).apply(
        lambda g: spearmanr(g["pred_10s"], g["target_10s"]).statistic, include_groups=False
    )
    want = per_ts.dropna().groupby(level="day").mean().to_dict()
    with Harness(folder, cache=False) as h:
        got = h.rank_ic("pred_10s", cross_section=True)
    assert ic_of(got) == pytest.approx(want, abs=1e-12)
    sections = got.filter(pl.col("metric") == "n_sections")["value"].to_list()
    assert sections == per_ts.dropna().groupby(level="day").size().astype(float).tolist()


def test_cross_sectional_ic_on_a_hand_computed_case(tmp_path: Path) -> None:
    # alphalens semantics: one IC per date (here: per timestamp) = spearmanr over the assets.
    # t1: ranks (1,2,3) vs (1,3,2): rho = 1 - 6*2/(3*8) = 0.5
    # t2: identical order: rho = 1
    # t3: pred ties (1,1,2) -> average ranks (1.5,1.5,3) vs (1,2,3): rho = 1.5/sqrt(1.5*2) = sqrt(3)/2
    # t4: a single valid asset (the others NaN / NULL): undefined, skipped
    base = dt.datetime(2026, 3, 4, 15, 0)
    ts = [base + dt.timedelta(minutes=k) for k in range(4) for _ in range(3)]
    pred = [1, 2, 3, 1, 2, 3, 1, 1, 2, 5, float("nan"), 1]
    target = [1, 3, 2, 1, 2, 3, 1, 2, 3, 1, 2, None]
    table = pa.table({"ts": pa.array(ts, pa.timestamp("us", tz="UTC")), "symbol": ["A", "B", "C"] * 4,
                      "pred_10s": pa.array(pred, pa.float64()), "target_10s": pa.array(target, pa.float64())})
    write_dataset(tmp_path / "hand", {"2026-03-04": table}, {"timezone": "US/Eastern"})
    with Harness(tmp_path / "hand", cache=False) as h:
        got = h.rank_ic("pred_10s", cross_section=True)
    values = dict(zip(got["metric"].to_list(), got["value"].to_list(), strict=True))
    assert values["rank_ic"] == pytest.approx((0.5 + 1.0 + np.sqrt(3) / 2) / 3, abs=1e-12)
    assert values["n_sections"] == 3
    assert values["n"] == 10


def test_rank_ic_is_not_a_mergeable_metric(make_panel: Callable[..., Path]) -> None:
    with Harness(make_panel(days=1), cache=False) as h, pytest.raises(UnknownMetricError, match=r"h\.rank_ic"):
        h.metrics(["corr", "rank_ic"])


def test_a_cross_section_without_shared_timestamps_warns_and_a_panel_does_not(
        backtest: Path, make_panel: Callable[..., Path]) -> None:
    import warnings

    from duckharness.errors import DuckHarnessWarning

    with Harness(backtest, cache=False) as h, pytest.warns(DuckHarnessWarning, match=r"'baseline': no timestamp holds"):
        got = h.rank_ic("pred_10s", cross_section=True)
    assert got.filter(pl.col("metric") == "rank_ic")["value"].null_count() == got["day"].n_unique()
    with Harness(make_panel(days=2, timestamps=4, symbols=5), cache=False) as h, warnings.catch_warnings():
        warnings.simplefilter("error", DuckHarnessWarning)
        h.rank_ic("pred_10s", cross_section=True)


def later(lf: pl.LazyFrame) -> pl.LazyFrame:
    return lf.with_columns(pl.col("ts") + pl.duration(hours=13, minutes=57))


def test_a_python_step_that_moves_rows_to_another_files_day_ranks_that_day_whole(
        make_panel: Callable[..., Path]) -> None:
    folder = make_panel(days=4)
    ref = reference_frame(folder)
    ref["source_day"] = ref["day"]
    ref["ts"] = ref["ts"] + pd.Timedelta(hours=13, minutes=57)
    ref["day"] = ref["ts"].dt.tz_convert("US/Eastern").dt.date
    assert (ref.groupby("day")["source_day"].nunique() > 1).any()  # a day made of two files' rows
    want = spearman_by_day(ref, "pred_10s", "target_10s")
    with Harness(folder, cache=False) as h:
        h.add_experiment("later", later)
        got = h.rank_ic("pred_10s", ["later"])
    days = got.filter(pl.col("metric") == "rank_ic")["day"].to_list()
    assert len(days) == len(set(days))  # each day once
    assert ic_of(got, "later") == pytest.approx(want, abs=1e-12)
