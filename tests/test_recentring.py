"""Groups far from the run's shift (days or symbols at very different levels against their spread)
are scanned again around their own means, so their r2 and corr keep their precision. References are
numpy in extended precision on the stored values."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_dataset

from duckharness import Harness

LEVELS = {"A": 0.0, "B": 1e7, "C": -3e5}


def stamps(day: str, n: int) -> pa.Array:
    start = int(dt.datetime.fromisoformat(f"{day}T15:00:00+00:00").timestamp()) * 10**6
    return pa.array(start + np.arange(n, dtype=np.int64) * 10**6, pa.timestamp("us", tz="UTC"))


def exact(p: np.ndarray, t: np.ndarray) -> dict[str, float | None]:
    """r2, corr and mse of the stored values in extended precision (None where undefined)."""
    p, t = p.astype(np.longdouble), t.astype(np.longdouble)
    pc, tc, e = p - p.mean(), t - t.mean(), t - p
    spp, stt = np.sum(pc * pc), np.sum(tc * tc)
    return {
        "r2": float(1 - np.sum(e * e) / stt) if stt > 0 else None,
        "corr": float(np.sum(pc * tc) / np.sqrt(spp * stt)) if spp > 0 and stt > 0 else None,
        "mse": float(np.mean(e * e)),
    }


def values(got: pl.DataFrame, key: str) -> dict[tuple, float | None]:
    rows = got.filter(pl.col("metric").is_in(["r2", "corr", "mse"])).select(key, "metric", "value").rows()
    return {(k, m): v for k, m, v in rows}


def check(got: dict[tuple, float | None], want: dict[tuple, float | None]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        if v is None:
            assert got[k] is None, k
        else:
            assert got[k] == pytest.approx(v, rel=1e-9), k


@pytest.fixture
def days_apart(tmp_path: Path) -> tuple[Path, dict[tuple, float | None]]:
    """Three days at levels 0, 1e7 and -3e5, each with a spread of 0.01: one shift fits one day."""
    rng = np.random.default_rng(0)
    tables, want = {}, {}
    for day, level in zip(["2024-06-03", "2024-06-04", "2024-06-05"], LEVELS.values(), strict=True):
        x = rng.normal(size=3000)
        p, t = level + 0.01 * x, level + 0.01 * (0.5 * x + rng.normal(size=3000))
        tables[day] = pa.table({"ts": stamps(day, 3000), "pred_a": p, "target_a": t})
        want |= {(dt.date.fromisoformat(day), m): v for m, v in exact(p, t).items()}
    write_dataset(tmp_path / "days", tables, {})
    return tmp_path / "days", want


def test_days_far_from_the_shift_are_scored_around_their_own_means(
    days_apart: tuple[Path, dict[tuple, float | None]],
) -> None:
    folder, want = days_apart
    trace: list[str] = []
    with Harness(folder, cache=False, tracer=trace.append) as h:
        got = h.metrics(["r2", "corr", "mse"], pairs="pred_a:target_a", by="day")
        passes = h.last_run.recentred if h.last_run else None
    check(values(got, "day"), want)
    assert passes == 1
    assert any(s.startswith("-- groups far from the shift") for s in trace)


def test_a_pass_around_some_days_reads_only_their_files(days_apart: tuple[Path, dict[tuple, float | None]]) -> None:
    folder, _ = days_apart
    trace: list[str] = []
    with Harness(folder, cache=False, tracer=trace.append) as h:
        h.metrics(["r2"], pairs="pred_a:target_a", by="day")
    joined = [s for s in trace if "__dh_shift" in s and s.startswith("SELECT")]
    # The shift comes from the first day's rows: only the other two days are scanned again.
    assert sorted(s.split("READ_PARQUET(['")[1].split("'")[0].rsplit("/", 1)[1] for s in joined) == [
        "2024-06-04.parquet",
        "2024-06-05.parquet",
    ]


@pytest.fixture
def symbols_apart(tmp_path: Path) -> tuple[Path, pa.Table]:
    """Two days, each with symbols A, B and C at levels 0, 1e7 and -3e5 (spread 0.01), and D whose
    prediction is a constant far from the others."""
    rng = np.random.default_rng(1)
    tables = {}
    for day in ["2024-06-03", "2024-06-04"]:
        n = 4000
        sym = np.array(["A", "B", "C", "D"])[np.arange(n) % 4]
        level = np.array([LEVELS.get(s, 50.0) for s in sym])
        x = rng.normal(size=n)
        p = np.where(sym == "D", 123.456789, level + 0.01 * x)
        t = level + 0.01 * (0.5 * x + rng.normal(size=n))
        vol = rng.integers(0, 2000, n)
        tables[day] = pa.table({"ts": stamps(day, n), "symbol": sym, "volume": vol, "pred_a": p, "target_a": t})
    write_dataset(tmp_path / "syms", tables, {})
    return tmp_path / "syms", pa.concat_tables(tables.values())


def reference_by_symbol(table: pa.Table, where: np.ndarray | None = None) -> dict[tuple, float | None]:
    sym = np.asarray(table["symbol"])
    keep = np.ones(len(sym), dtype=bool) if where is None else where
    p, t = np.asarray(table["pred_a"]), np.asarray(table["target_a"])
    want = {}
    for s in "ABCD":
        m = keep & (sym == s)
        want |= {(s, k): v for k, v in exact(p[m], t[m]).items()}
    return want


def test_symbols_far_apart_keep_their_precision_in_fused_and_whole_experiments(
    symbols_apart: tuple[Path, pa.Table],
) -> None:
    folder, table = symbols_apart
    with Harness(folder, cache=False) as h:
        h.add_experiment("liquid", "volume > 1000")
        h.add_experiment("ordered", "SELECT * FROM baseline ORDER BY ts LIMIT 1000000")  # needs all rows at once
        got = h.metrics(["r2", "corr", "mse"], pairs="pred_a:target_a", by="symbol")
        passes = h.last_run.recentred if h.last_run else None
    liquid = np.asarray(table["volume"]) > 1000
    for name, where in [("baseline", None), ("liquid", liquid), ("ordered", None)]:
        check(values(got.filter(pl.col("experiment") == name), "symbol"), reference_by_symbol(table, where))
    assert passes == 1


def test_recentred_runs_are_bit_identical_across_workers_and_from_the_cache(
    symbols_apart: tuple[Path, pa.Table], tmp_path: Path
) -> None:
    folder, _ = symbols_apart
    runs = []
    for workers, cache in [(1, False), (2, False), (2, tmp_path / "cache"), (2, tmp_path / "cache")]:
        with Harness(folder, cache=cache, workers=workers) as h:
            got = h.metrics(["r2", "corr"], pairs="pred_a:target_a", by=["day", "symbol"])
            runs.append((got["value"].to_list(), h.last_run.cache_hits if h.last_run else None))
    assert all(values == runs[0][0] for values, _ in runs)
    assert runs[3][1] == 4  # both passes of both days from the cache


def test_ordinary_data_is_scanned_once(backtest: Path) -> None:
    with Harness(backtest, cache=False) as h:
        h.metrics(pairs=["pred_1s", "pred_10s"], by=["day", "symbol"])
        assert h.last_run is not None and h.last_run.recentred == 0
        h.metrics(pairs=["pred_1s", "pred_10s"], by="tod:30min")
        assert h.last_run.recentred == 0


def test_a_pooled_run_that_recentres_gives_each_metric_once_and_right(
    days_apart: tuple[Path, dict[tuple, float | None]],
) -> None:
    folder, _ = days_apart
    stored = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))])
    p, t = np.asarray(stored["pred_a"]), np.asarray(stored["target_a"])
    high = t > 1  # the day at 1e7 alone: far from the shift taken from the first day's rows
    with Harness(folder, cache=False) as h:
        h.add_experiment("high", "target_a > 1")
        got = h.metrics(["count", "r2", "corr", "mse"], pairs="pred_a:target_a")
        passes = h.last_run.recentred if h.last_run else None
    rows = got.select("experiment", "metric", "value").rows()
    assert len(rows) == len({(e, m) for e, m, _ in rows})  # no metric twice
    values_of = {(e, m): v for e, m, v in rows}
    for name, keep in [("baseline", np.ones(len(p), dtype=bool)), ("high", high)]:
        assert values_of[(name, "count")] == keep.sum()
        for m, v in exact(p[keep], t[keep]).items():
            assert values_of[(name, m)] == pytest.approx(v, rel=1e-9), (name, m)
    assert passes == 1


def test_an_experiment_whose_rows_lie_far_from_the_shift_is_scored_and_compared_exactly(
    symbols_apart: tuple[Path, pa.Table],
) -> None:
    folder, table = symbols_apart
    sym = np.asarray(table["symbol"])
    p, t = np.asarray(table["pred_a"]), np.asarray(table["target_a"])
    day = np.asarray(table["ts"].cast(pa.date32()))
    b = sym == "B"
    want = exact(p[b], t[b])
    with Harness(folder, cache=False) as h:
        h.add_experiment("b_only", "symbol = 'B'")
        h.add_experiment("b_same", "SELECT * REPLACE (pred_a * 1.0 AS pred_a) FROM b_only")
        pooled = h.metrics(["r2", "corr"], pairs="pred_a:target_a", experiments=["b_only"])
        compared = {m: h.compare(m, "b_same", "b_only", "pred_a:target_a") for m in ["r2", "corr"]}
    got = dict(pooled.filter(pl.col("metric") != "n_excluded").select("metric", "value").rows())
    for m in ["r2", "corr"]:
        assert got[m] == pytest.approx(want[m], rel=1e-9), m
        row = compared[m].table.row(0, named=True)
        assert row["value_a"] == pytest.approx(want[m], rel=1e-9) and row["value_b"] == pytest.approx(want[m], rel=1e-9)
        for d, value in compared[m].daily.select("day", "value_a").rows():
            keep = b & (day == d)
            assert value == pytest.approx(exact(p[keep], t[keep])[m], rel=1e-9), (m, d)


def test_compare_scores_each_day_around_its_own_level_and_pools_exactly(
    days_apart: tuple[Path, dict[tuple, float | None]],
) -> None:
    """Days at very different levels (a price series, say): compare's daily values equal each
    day's exact value (they used to be taken around the experiment's one shift: NULL or off by
    up to 1e-4), while its pooled values stay exact over all days."""
    folder, want = days_apart
    stored = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))])
    p, t = np.asarray(stored["pred_a"]), np.asarray(stored["target_a"])
    pooled = exact(p, t)
    with Harness(folder, cache=False) as h:
        h.add_experiment("same", "SELECT * REPLACE (pred_a * 1.0 AS pred_a) FROM baseline")
        for m in ["r2", "corr", "mse"]:
            c = h.compare(m, "same", "baseline", "pred_a:target_a", lag=0)
            for day, value_a, value_b in c.daily.select("day", "value_a", "value_b").rows():
                assert value_a == pytest.approx(want[(day, m)], rel=1e-9), (m, day)
                assert value_b == pytest.approx(want[(day, m)], rel=1e-9), (m, day)
            row = c.table.row(0, named=True)
            assert row["n_days"] == 3
            assert row["value_a"] == pytest.approx(pooled[m], rel=1e-9), m
            assert row["value_b"] == pytest.approx(pooled[m], rel=1e-9), m


@pytest.mark.parametrize("level", [0.0, 1e6], ids=["level_0", "level_1e6"])
def test_a_sentinel_block_that_sets_the_shift_does_not_spoil_the_other_days(tmp_path: Path, level: float) -> None:
    """The first rows of the first file are 1e300 sentinels, so the shift (a median of the first
    rows) is 1e300 and every other day's squares overflow: those days are scanned again around
    0, then, if that loses precision (a level of 1e6 with a spread of 1e-3), around their mean."""
    from scipy.stats import pearsonr

    rng = np.random.default_rng(0)
    n, spread = 2000, 1e-3 if level else 1.0
    tables, want = {}, {}
    for i, day in enumerate(["2026-09-01", "2026-09-02", "2026-09-03"]):
        ts = pa.array(np.datetime64(f"{day}T15:00:00", "us") + np.arange(n).astype("timedelta64[s]"),
                      pa.timestamp("us", tz="UTC"))
        z = rng.standard_normal(n)
        p, t = level + spread * z, level + spread * (z + rng.standard_normal(n))
        if i == 0:
            p[:1500] = 1e300
        else:
            want[dt.date.fromisoformat(day)] = pearsonr(p, t).statistic
        tables[day] = pa.table({"ts": ts, "pred": p, "target": t})
    write_dataset(tmp_path, tables, {})
    with Harness(tmp_path, cache=False) as h:
        got = h.metrics(["corr"], pairs="pred:target", by="day").filter(metric="corr")
        assert h.last_run.recentred >= 1
    values = dict(got.select("day", "value").rows())
    assert {d: values[d] for d in want} == pytest.approx(want, rel=1e-9)
