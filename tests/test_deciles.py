"""Prediction-quantile buckets: cut within each day like ``pandas.qcut`` and pooled across days
exactly, against a pandas groupby/qcut reference."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
from conftest import read_all

from duckharness import Harness, InputError


def qcut_reference(df: pd.DataFrame, pred: str, target: str, q: int, *, by_day: bool = False) -> pd.DataFrame:
    ok = df[np.isfinite(df[pred]) & df[target].notna()].copy()
    ok["bucket"] = ok.groupby("day")[pred].transform(lambda x: pd.qcut(x, q, labels=False) + 1)
    keys = ["day", "bucket"] if by_day else ["bucket"]
    return ok.groupby(keys).agg(n=(target, "size"), mean_pred=(pred, "mean"), mean_target=(target, "mean"))


def session(folder: Path) -> pd.DataFrame:
    df = read_all(folder).to_pandas()
    local = df["ts"].dt.tz_convert("US/Eastern")
    keep = (local.dt.time >= dt.time(9, 30)) & (local.dt.time <= dt.time(16, 0))
    return df[keep].assign(day=local[keep].dt.date)


@pytest.mark.parametrize("q", [10, 4])
def test_pooled_buckets_match_pandas_qcut_per_day(make_backtest: Callable[..., Path], q: int) -> None:
    folder = make_backtest(days=4, rows=1200, symbols=5)
    want = qcut_reference(session(folder), "pred_10s", "target_10s", q)
    with Harness(folder, cache=False) as h:
        got = h.deciles("pred_10s", "baseline", buckets=q)
    assert got["bucket"].to_list() == list(range(1, q + 1))
    assert got["n"].to_list() == want["n"].tolist()
    assert got["mean_target"].to_numpy() == pytest.approx(want["mean_target"].to_numpy(), rel=1e-10)
    assert got["mean_pred"].to_numpy() == pytest.approx(want["mean_pred"].to_numpy(), rel=1e-10)


def test_per_day_buckets_match_pandas(make_backtest: Callable[..., Path]) -> None:
    folder = make_backtest(days=3, rows=800, symbols=5)
    want = qcut_reference(session(folder), "pred_1s", "target_1s", 5, by_day=True)
    with Harness(folder, cache=False) as h:
        got = h.deciles("pred_1s", "baseline", buckets=5, by="day")
    assert list(zip(got["day"].to_list(), got["bucket"].to_list(), strict=True)) == list(want.index)
    assert got["mean_target"].to_numpy() == pytest.approx(want["mean_target"].to_numpy(), rel=1e-10)


def test_buckets_of_an_experiment_with_invalid_rows_and_ties(make_panel: Callable[..., Path]) -> None:
    # Rounded predictions tie across bucket edges; NaN/NULL rows are left out. A day split over
    # two files is cut as one day.
    files = {"a": [(0, slice(0, 30))], "b": [(0, slice(30, None)), (1, slice(None))], "c": [(2, slice(None))]}
    folder = make_panel(days=3, timestamps=20, symbols=6, files=files)
    df = read_all(folder).to_pandas()
    df["day"] = df["ts"].dt.tz_convert("US/Eastern").dt.date
    df = df[df["volume"] > 800]
    want = qcut_reference(df, "pred_10s", "target_10s", 3)
    with Harness(folder, cache=False) as h:
        h.add_experiment("liquid", "volume > 800")
        got = h.deciles("pred_10s", "liquid", buckets=3)
    assert got["n"].to_list() == want["n"].tolist()
    assert got["mean_target"].to_numpy() == pytest.approx(want["mean_target"].to_numpy(), rel=1e-10)


def test_every_experiment_and_pair_gets_its_table(make_panel: Callable[..., Path]) -> None:
    with Harness(make_panel(days=2), cache=False) as h:
        h.add_experiment("liquid", "volume > 1000")
        got = h.deciles(["pred_10s", "pred_1s"], buckets=2)
        with pytest.raises(InputError, match="from 2 to 200, got 1"):
            h.deciles("pred_10s", buckets=1)
        with pytest.raises(InputError, match=r"whole number from 2 to 200, got 2\.5"):
            h.deciles("pred_10s", buckets=2.5)  # type: ignore[arg-type]
        with pytest.raises(InputError, match=r"from 2 to 200, got 1000"):
            h.deciles("pred_10s", buckets=1000)
        with pytest.raises(InputError, match="by must be"):
            h.deciles("pred_10s", by="symbol")
    keys = got.select("experiment", "pred").unique(maintain_order=True).rows()
    assert keys == [("baseline", "pred_10s"), ("baseline", "pred_1s"), ("liquid", "pred_10s"), ("liquid", "pred_1s")]
    assert got.group_by("experiment", "pred").agg(pl.len())["len"].to_list() == [2, 2, 2, 2]


def test_rows_on_an_edge_land_in_the_bucket_pandas_qcut_gives(tmp_path: Path) -> None:
    # Day sizes where (n - 1) * k / q is a whole number put a row exactly on an edge; the edge's
    # last bits then decide its bucket (5691 rows and q = 10 once put a row one bucket up).
    import pyarrow as pa
    import pyarrow.parquet as pq

    sizes = [2, 3, 11, 21, 41, 101, 1001, 5691, 2 * 3 * 5 * 7 * 11 + 1]
    rng = np.random.default_rng(11)
    days = [dt.date(2026, 3, 2) + dt.timedelta(days=i) for i in range(len(sizes))]
    tmp_path.mkdir(exist_ok=True)
    preds = {}
    for day, n in zip(days, sizes, strict=True):
        x = rng.normal(0, 0.1, n)
        if n > 100:
            x[: n // 10] = np.round(x[: n // 10], 2)  # ties too
        preds[day] = x
        start = dt.datetime.combine(day, dt.time(15), tzinfo=dt.UTC)
        ts = pa.array([start + dt.timedelta(seconds=i) for i in range(n)], pa.timestamp("us", tz="UTC"))
        pq.write_table(pa.table({"ts": ts, "pred_a": x, "target_a": rng.normal(size=n)}), tmp_path / f"{day}.parquet")
    (tmp_path / "metadata.json").write_text("{}")
    with Harness(tmp_path, cache=False) as h:
        for q in (2, 3, 4, 5, 7, 10, 20):
            got = h.deciles("pred_a:target_a", buckets=q, by="day", window=False)
            for day, x in preds.items():
                codes = pd.qcut(x, q, labels=False, duplicates="drop") + 1
                want = np.bincount(codes, minlength=q + 1)[1:]
                mine = got.filter(pl.col("day") == day)
                counts = dict(zip(mine["bucket"].to_list(), mine["n"].to_list(), strict=True))
                assert [counts.get(b, 0) for b in range(1, q + 1)] == want.tolist(), (day, q)


def test_repeated_edges_leave_their_buckets_empty_and_keep_bucket_positions(tmp_path: Path) -> None:
    # 13 zeros then 0.1 ... 0.9 (22 rows), 7 buckets: the edges sit at sorted positions 3, 6, ...,
    # 18, i.e. 0, 0, 0, 0, 0.3, 0.6 (worked by hand); pandas.qcut raises on such repeated edges.
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = np.array([0.0] * 13 + [i / 10 for i in range(1, 10)])
    start = dt.datetime(2026, 3, 4, 15, tzinfo=dt.UTC)
    ts = pa.array([start + dt.timedelta(seconds=i) for i in range(len(p))], pa.timestamp("us", tz="UTC"))
    pq.write_table(pa.table({"ts": ts, "pred_a": p, "target_a": p * 2}), tmp_path / "2026-03-04.parquet")
    (tmp_path / "metadata.json").write_text("{}")
    with Harness(tmp_path, cache=False) as h:
        got = h.deciles("pred_a:target_a", buckets=7, window=False)
    assert got["bucket"].to_list() == [1, 5, 6, 7]
    assert got["n"].to_list() == [13, 3, 3, 3]
    assert got["mean_pred"].to_list() == pytest.approx([0.0, 0.2, 0.5, 0.8], rel=1e-15)
    with pytest.raises(ValueError, match="Bin edges must be unique"):
        pd.qcut(p, 7, labels=False)
