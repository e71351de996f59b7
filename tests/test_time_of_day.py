"""Grouping by time-of-day bucket (``by="tod:30min"``): local wall-clock buckets, across a DST
switch, pooled or per day, from the same scan as the other metrics."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
from conftest import read_all

from duckharness import Harness, InputError, UnknownColumnError


def session(folder: Path) -> pd.DataFrame:
    df = read_all(folder).to_pandas()
    local = df["ts"].dt.tz_convert("US/Eastern")
    keep = (local.dt.time >= dt.time(9, 30)) & (local.dt.time <= dt.time(16, 0))
    df = df[keep].assign(day=local[keep].dt.date)
    return df.assign(tod=local[keep].dt.floor("30min").dt.time)


def values(df: pl.DataFrame, metric: str, keys: list[str]) -> dict[tuple, float]:
    sel = df.filter(pl.col("metric") == metric)
    return {tuple(r[:-1]): r[-1] for r in sel.select(*keys, "value").rows()}


def test_pooled_tod_buckets_match_pandas_across_a_dst_switch(backtest: Path) -> None:
    ref = session(backtest)
    err = (ref["pred_10s"] - ref["target_10s"]) ** 2
    want_n = ref.groupby("tod").size()
    want_mse = err.groupby(ref["tod"]).mean()
    with Harness(backtest, cache=False) as h:
        got = h.metrics(["count", "mse"], pairs="pred_10s", experiments="baseline", by="tod:30min")
    assert got.schema["tod"] == pl.Time
    tods = got.filter(pl.col("metric") == "count")["tod"].to_list()
    assert tods == [dt.time(9 + (30 + 30 * k) // 60, (30 + 30 * k) % 60) for k in range(13)]  # 09:30 ... 15:30 local
    assert values(got, "count", ["tod"]) == {(t,): float(n) for t, n in want_n.items()}
    mse = values(got, "mse", ["tod"])
    for t, v in want_mse.items():
        assert mse[(t,)] == pytest.approx(v, rel=1e-10)


def test_day_and_tod_together_give_the_per_day_intraday_profile(make_backtest: Callable[..., Path]) -> None:
    folder = make_backtest(days=3, rows=1500, symbols=5)
    ref = session(folder)
    with Harness(folder, cache=False) as h:
        h.add_experiment("liquid", "volume > 1000")
        got = h.metrics(["count", "corr"], pairs="pred_1s", experiments="liquid", by=["day", "tod:1h"])
    liquid = ref[ref["volume"] > 1000].copy()
    liquid["hour"] = pd.to_datetime(liquid["ts"]).dt.tz_convert("US/Eastern").dt.floor("1h").dt.time
    want = liquid.groupby(["day", "hour"]).apply(
        lambda g: np.corrcoef(g["pred_1s"], g["target_1s"])[0, 1], include_groups=False
    )
    have = values(got, "corr", ["day", "tod"])
    assert have.keys() == set(want.index)
    for k, v in want.items():
        assert have[k] == pytest.approx(v, rel=1e-9)


def test_tod_works_for_experiments_that_need_all_rows(make_backtest: Callable[..., Path]) -> None:
    folder = make_backtest(days=2, rows=600, symbols=5)
    ref = session(folder)
    ref["q"] = pd.to_datetime(ref["ts"]).dt.tz_convert("US/Eastern").dt.floor("15min").dt.time
    with Harness(folder, cache=False) as h:
        h.add_experiment("ranked", "SELECT *, rank() OVER (ORDER BY ts) AS r FROM baseline")
        got = h.metrics(["count"], pairs="pred_10s", experiments="ranked", by="tod:15min")
    assert values(got, "count", ["tod"]) == {(t,): float(n) for t, n in ref.groupby("q").size().items()}


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("tod:7min", "divide 24 hours"),
        ("tod:half", "must look like"),
        ("tod:0min", "must look like"),
        ("tod:30", "must look like"),  # no unit: not silently seconds
    ],
)
def test_bad_bucket_specs_are_refused(backtest: Path, spec: str, match: str) -> None:
    with Harness(backtest, cache=False) as h, pytest.raises(InputError, match=match):
        h.metrics(["count"], pairs="pred_10s", by=spec)


def test_one_bucket_grouping_at_a_time(backtest: Path) -> None:
    with Harness(backtest, cache=False) as h, pytest.raises(InputError, match="at most one"):
        h.metrics(["count"], pairs="pred_10s", by=["tod:30min", "tod:1h"])


def test_tod_needs_the_time_column(backtest: Path) -> None:
    with Harness(backtest, cache=False) as h:
        h.add_experiment("no_time", "SELECT DISTINCT * EXCLUDE (ts) FROM baseline")  # run over its own rows
        with pytest.raises(UnknownColumnError, match="no time column"):
            h.metrics(["count"], pairs="pred_10s", experiments="no_time", by="tod:30min")


@pytest.mark.parametrize("tz", ["UTC", None], ids=["aware", "naive"])
def test_nanosecond_rows_just_before_a_bucket_boundary_stay_in_their_bucket(tmp_path: Path, tz: str | None) -> None:
    """A bucket holds [start, start + width): a row half a microsecond or less before the next
    bucket belongs to this one (a cast to microseconds would round it over)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    # US/Eastern is UTC-5 on 2026-03-06: 04:59:59.999999999 UTC is 23:59:59.999999999 local.
    stamps = ["2026-03-07T04:59:59.999999999", "2026-03-07T04:59:59.999999600", "2026-03-06T19:29:59.999999501",
              "2026-03-06T19:30:00.000000000", "2026-03-06T19:00:00.000000001"]
    ns = np.array(stamps, "datetime64[ns]")
    pq.write_table(pa.table({"ts": pa.array(ns, pa.timestamp("ns", tz)), "pred_x": np.arange(5.0),
                             "target_x": np.arange(5.0)}), tmp_path / "f.parquet")
    (tmp_path / "metadata.json").write_text(json.dumps({"timezone": "US/Eastern"}))
    local_ns = ns.astype(np.int64) - 5 * 3600 * 10**9  # the local wall clock, in ns since the epoch
    width = 30 * 60 * 10**9
    starts = (local_ns % (24 * 3600 * 10**9)) // width * width
    want: dict[dt.time, int] = {}
    for s in starts:
        t = (dt.datetime(2000, 1, 1) + dt.timedelta(microseconds=int(s) // 1000)).time()
        want[t] = want.get(t, 0) + 1
    with Harness(tmp_path, cache=False) as h:
        got = h.metrics(["count"], by="tod:30min", window=False).filter(metric="count")
    assert dict(got.select("tod", "value").rows()) == want
    assert want == {dt.time(23, 30): 2, dt.time(14, 0): 2, dt.time(14, 30): 1}
