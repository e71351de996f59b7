"""Columns of other types than DOUBLE and TIMESTAMP: integer and float32 pairs, nanosecond
timestamps with a time zone, files holding the same columns in another order. References are
numpy in extended precision and pandas."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from conftest import write_dataset

from duckharness import ExecutionError, Harness

START = dt.datetime(2024, 6, 3, 13, 30, tzinfo=dt.UTC)  # 09:30 US/Eastern


def stamps(n: int, *, start: dt.datetime = START, step_s: int = 1, unit: str = "us") -> pa.Array:
    base = int(start.timestamp()) * 10**9
    ns = base + np.arange(n, dtype=np.int64) * step_s * 10**9
    return pa.array(ns // (1 if unit == "ns" else 1000), pa.timestamp(unit, tz="UTC"))


def exact(p: np.ndarray, t: np.ndarray) -> dict[str, float]:
    """mse, mae, bias, r2 and corr of the stored values, in extended precision."""
    p, t = p.astype(np.longdouble), t.astype(np.longdouble)
    e = t - p
    tc, pc = t - t.mean(), p - p.mean()
    return {
        "mse": float(np.mean(e * e)),
        "mae": float(np.mean(np.abs(e))),
        "bias": float(np.mean(p - t)),
        "r2": float(1 - np.sum(e * e) / np.sum(tc * tc)),
        "corr": float(np.sum(pc * tc) / np.sqrt(np.sum(pc * pc) * np.sum(tc * tc))),
    }


def pooled(h: Harness, pair: str) -> dict[str, float]:
    got = h.metrics(["mse", "mae", "bias", "r2", "corr"], pairs=pair, experiments="baseline")
    return dict(got.select("metric", "value").rows())


@pytest.mark.parametrize("dtype", [pa.int16(), pa.int32(), pa.int64()], ids=["int16", "int32", "int64"])
def test_integer_pairs_are_scored_in_double_without_overflow(tmp_path: Path, dtype: pa.DataType) -> None:
    rng = np.random.default_rng(3)
    hi = {pa.int16(): 30_000, pa.int32(): 2_000_000_000, pa.int64(): 3_000_000_000_000}[dtype]
    t = rng.integers(-hi, hi, 2000)
    p = np.clip(t + rng.integers(-hi // 2, hi // 2, 2000), -hi, hi)  # errors of about the range
    table = pa.table({"ts": stamps(2000), "pred_a": pa.array(p, dtype), "target_a": pa.array(t, dtype)})
    write_dataset(tmp_path, {"2024-06-03": table}, {})
    with Harness(tmp_path, cache=False) as h:
        got = pooled(h, "pred_a:target_a")
    want = exact(p, t)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name


def test_float32_pairs_are_scored_in_double_precision_of_the_stored_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    t = rng.normal(size=5000).astype(np.float32)
    p = (0.3 * t + rng.normal(size=5000)).astype(np.float32)
    table = pa.table({"ts": stamps(5000), "pred_a": pa.array(p), "target_a": pa.array(t)})
    write_dataset(tmp_path, {"2024-06-03": table}, {})
    with Harness(tmp_path, cache=False) as h:
        got = pooled(h, "pred_a:target_a")
    want = exact(p, t)
    for name, value in want.items():  # float32 arithmetic would be off by ~1e-7
        assert got[name] == pytest.approx(value, rel=1e-12), name


def _tagged(tmp_path: Path, tags: dict[str, str]) -> Path:
    tables = {}
    for day, tag in tags.items():
        start = dt.datetime.fromisoformat(f"{day}T14:00:00+00:00")
        tables[day] = pa.table(
            {"ts": stamps(10, start=start), "pred_a": np.zeros(10), "target_a": np.ones(10), "tag": [tag] * 10}
        )
    write_dataset(tmp_path, tables, {})
    return tmp_path


BAD = "SELECT * REPLACE (CAST(tag AS INTEGER) AS pred_a) FROM baseline"


@pytest.mark.parametrize(
    "sql", [BAD, "SELECT * FROM baseline WHERE CAST(tag AS INTEGER) > 0"], ids=["column_change", "filter"]
)
def test_an_experiment_whose_sql_fails_on_some_rows_is_named_with_the_file_and_not_retried(
    tmp_path: Path, sql: str
) -> None:
    folder = _tagged(tmp_path, {"2024-06-03": "1", "2024-06-04": "x"})  # the second day cannot be cast
    with Harness(folder, cache=False) as h:
        h.add_experiment("liquid", "pred_a >= 0")
        h.add_experiment("bad", sql)
        with pytest.raises(ExecutionError, match=r"Experiment 'bad' failed on .*2024-06-04\.parquet: Conversion") as e:
            h.metrics(["mse"], pairs="pred_a:target_a")
    assert e.value.experiment == "bad" and e.value.files[0].endswith("2024-06-04.parquet")
    assert "attempt" not in str(e.value.__cause__)  # raised at the first failure: no retries


def test_an_error_in_the_first_rows_query_names_the_experiment_and_the_file(tmp_path: Path) -> None:
    # The first rows' query (the shifts) reads every experiment at once; the one that fails is
    # found and named, as for the batch queries (before: only the file was named).
    folder = _tagged(tmp_path, {"2024-06-03": "x"})
    with Harness(folder, cache=False) as h:
        h.add_experiment("fine", "pred_a >= 0")
        h.add_experiment("bad", BAD)
        with pytest.raises(ExecutionError, match=r"Experiment 'bad' failed on .*2024-06-03\.parquet: Conversion") as e:
            h.metrics(["mse", "r2"], pairs="pred_a:target_a")
    assert e.value.experiment == "bad" and e.value.files[0].endswith("2024-06-03.parquet")
    assert e.value.files[0].endswith("2024-06-03.parquet")


def test_time_of_day_buckets_of_nanosecond_instants_are_local_wall_clock(tmp_path: Path) -> None:
    # Local 09:30:00, 10:15:00 and 16:00:00 US/Eastern (in the window), and 1 ns outside each end.
    local = ["09:30:00", "10:15:00", "16:00:00"]
    at = [dt.datetime.fromisoformat(f"2024-06-03T{x}-04:00") for x in local]
    ns = [int(a.timestamp()) * 10**9 for a in at] + [
        int(at[0].timestamp()) * 10**9 - 1,
        int(at[2].timestamp()) * 10**9 + 1,
    ]
    table = pa.table(
        {"ts": pa.array(ns, pa.timestamp("ns", tz="UTC")), "pred_a": np.arange(5.0), "target_a": np.ones(5)}
    )
    write_dataset(
        tmp_path, {"2024-06-03": table}, {"start_time": "09:30", "end_time": "16:00", "timezone": "US/Eastern"}
    )
    with Harness(tmp_path, cache=False) as h:
        got = h.metrics(["count"], pairs="pred_a:target_a", experiments="baseline", by=["day", "tod:1h"])
    rows = sorted(got.filter(pl.col("metric") == "count").select("day", "tod", "value").rows())
    assert rows == [
        (dt.date(2024, 6, 3), dt.time(9), 1.0),
        (dt.date(2024, 6, 3), dt.time(10), 1.0),
        (dt.date(2024, 6, 3), dt.time(16), 1.0),
    ]


def test_lazyframe_of_files_with_columns_in_another_order_matches_pandas(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    days = [dt.date(2024, 6, 3), dt.date(2024, 6, 4)]
    tables = {}
    for i, d in enumerate(days):
        start = dt.datetime.combine(d, dt.time(14), tzinfo=dt.UTC)
        t = pa.table({"ts": stamps(4, start=start), "pred_a": rng.normal(size=4), "target_a": rng.normal(size=4)})
        tables[d.isoformat()] = t if i == 0 else t.select(["target_a", "pred_a", "ts"])
    write_dataset(tmp_path, tables, {})
    want = pd.concat([tables[d.isoformat()].to_pandas()[["ts", "pred_a", "target_a"]] for d in days], ignore_index=True)
    with Harness(tmp_path, cache=False) as h:
        got = h.lazyframe().collect()
    assert got.columns == ["ts", "pred_a", "target_a"]
    got_pd = got.to_pandas().sort_values("ts", ignore_index=True)
    pd.testing.assert_frame_equal(got_pd, want.sort_values("ts", ignore_index=True), check_dtype=False)


def test_random_days_draws_only_days_with_rows_in_the_window(tmp_path: Path) -> None:
    window = {"start_time": "09:30", "end_time": "16:00", "timezone": "US/Eastern"}
    tables = {}
    for d in [dt.date(2024, 6, 3), dt.date(2024, 6, 4), dt.date(2024, 6, 5)]:
        tables[d.isoformat()] = pa.table(
            {
                "ts": stamps(10, start=dt.datetime.combine(d, dt.time(15), tzinfo=dt.UTC)),
                "pred_a": np.ones(10),
                "target_a": np.ones(10),
            }
        )
    # 2024-06-06: rows only before the window opens (06:00-06:09 US/Eastern).
    early = dt.datetime(2024, 6, 6, 10, tzinfo=dt.UTC)
    tables["2024-06-06"] = pa.table({"ts": stamps(10, start=early), "pred_a": np.ones(10), "target_a": np.ones(10)})
    write_dataset(tmp_path, tables, window)
    with Harness(tmp_path, cache=False) as h:
        for seed in range(8):
            got = h.sample("baseline", "random_days", n_days=3, seed=seed)
            days = set(got["ts"].dt.convert_time_zone("US/Eastern").dt.date().to_list())
            assert days == {dt.date(2024, 6, 3), dt.date(2024, 6, 4), dt.date(2024, 6, 5)}


def test_random_days_does_not_draw_an_empty_file_as_a_day(tmp_path: Path) -> None:
    tables = {}
    for d in [dt.date(2024, 6, 3), dt.date(2024, 6, 4)]:
        start = dt.datetime.combine(d, dt.time(15), tzinfo=dt.UTC)
        tables[d.isoformat()] = pa.table(
            {"ts": stamps(10, start=start), "pred_a": np.ones(10), "target_a": np.ones(10)}
        )
    empty = tables["2024-06-03"].slice(0, 0)
    tables["2024-06-05"] = empty
    write_dataset(tmp_path, tables, {})
    with Harness(tmp_path, cache=False) as h:
        for seed in range(6):
            got = h.sample("baseline", "random_days", n_days=2, seed=seed)
            assert got.height == 20, seed


def test_an_experiment_that_needs_all_rows_and_fails_is_named(tmp_path: Path) -> None:
    folder = _tagged(tmp_path, {"2024-06-03": "x"})
    with Harness(folder, cache=False) as h:
        h.add_experiment("bad", "SELECT * FROM baseline WHERE CAST(tag AS INTEGER) = 1 ORDER BY ts LIMIT 10")
        with pytest.raises(ExecutionError, match=r"Experiment 'bad' failed: Conversion Error") as e:
            h.metrics(["r2"], pairs="pred_a:target_a", experiments="bad")
    assert e.value.experiment == "bad" and e.value.files[0].endswith("2024-06-03.parquet")


@pytest.mark.parametrize("call", ["rank_ic", "deciles"])
def test_per_day_scans_name_the_experiment_whose_sql_fails(tmp_path: Path, call: str) -> None:
    folder = _tagged(tmp_path, {"2024-06-03": "1", "2024-06-04": "x"})
    with Harness(folder, cache=False) as h:
        h.add_experiment("fine", "pred_a >= 0")
        h.add_experiment("bad", "SELECT * FROM baseline WHERE CAST(tag AS INTEGER) = 1")
        with pytest.raises(ExecutionError, match=r"Experiment 'bad' failed on .*2024-06-04\.parquet: Conversion") as e:
            getattr(h, call)("pred_a:target_a", experiments=["fine", "bad"])
    assert e.value.experiment == "bad"


def test_a_pair_column_stored_as_text_in_one_file_is_refused_naming_that_file(tmp_path: Path) -> None:
    from duckharness import InputError

    rng = np.random.default_rng(8)
    tables = {}
    for i, day in enumerate(["2024-06-03", "2024-06-04", "2024-06-05"]):
        p = rng.normal(size=50)
        start = START + dt.timedelta(days=i)
        tables[day] = pa.table({"ts": stamps(50, start=start), "target_a": rng.normal(size=50),
                                "pred_a": pa.array([f"{v:.6f}" for v in p]) if i == 1 else p})
    write_dataset(tmp_path, tables, {})
    with Harness(tmp_path, cache=False) as h, pytest.raises(InputError) as info:
        h.metrics(["mse"], pairs="pred_a:target_a")
    assert (f"'pred_a' of experiment 'baseline' is VARCHAR, not numeric (the files' common type: it is VARCHAR "
            f"in {tmp_path / '2024-06-04.parquet'});") in str(info.value)


def _day(day: int, unit: str, rng: np.random.Generator, n: int = 40, pred: pa.Array | None = None) -> pa.Table:
    p = rng.standard_normal(n)
    return pa.table({
        "ts": stamps(n, start=START + dt.timedelta(days=day), step_s=60, unit=unit),
        "pred_x": pred if pred is not None else pa.array(p),
        "target_x": pa.array(0.4 * p + rng.standard_normal(n)),
    })


def test_days_written_in_micro_and_nanoseconds_read_as_one_source(tmp_path: Path) -> None:
    """Polars writes microseconds, pandas 2 nanoseconds. Before: sqlglot's ParseError
    ("No expression was parsed from 'TIMESTAMPTZ_NS'") when the Harness was created."""
    rng = np.random.default_rng(5)
    tables = {"2024-06-03": _day(0, "us", rng), "2024-06-04": _day(1, "ns", rng), "2024-06-05": _day(2, "us", rng)}
    write_dataset(tmp_path, tables, {"timezone": "US/Eastern"})
    with Harness(tmp_path, cache=False) as h:
        got = h.metrics(["count", "corr"], pairs="pred_x", by="day")
        ic = h.rank_ic("pred_x")
    for k, (day, t) in enumerate(tables.items()):
        p, y = t["pred_x"].to_numpy(), t["target_x"].to_numpy()
        rows = got.filter(pl.col("day") == dt.date(2024, 6, 3 + k))
        assert rows.filter(metric="count")["value"].item() == len(p), day
        assert rows.filter(metric="corr")["value"].item() == pytest.approx(exact(p, y)["corr"], rel=1e-12)
        assert ic.filter(pl.col("day") == dt.date(2024, 6, 3 + k), metric="rank_ic")["value"].item() == (
            pytest.approx(pd.Series(p).rank().corr(pd.Series(y).rank()), rel=1e-12))


def test_a_day_whose_prediction_column_has_no_type_counts_its_rows_as_excluded(tmp_path: Path) -> None:
    """A writer stores an all-None column with Parquet type NULL. Before: sqlglot's ParseError
    ("No expression was parsed from '"NULL"'"), or, with that file alone, "is "NULL", not numeric"."""
    rng = np.random.default_rng(6)
    full, empty = _day(0, "us", rng), _day(1, "us", rng, pred=pa.nulls(40))
    assert empty.schema.field("pred_x").type == pa.null()
    write_dataset(tmp_path, {"2024-06-03": full, "2024-06-04": empty}, {"timezone": "US/Eastern"})
    with Harness(tmp_path, cache=False) as h:
        assert h.columns["pred_x"] == "DOUBLE"
        got = {(r["day"], r["metric"]): r["value"] for r in
               h.metrics(["count", "mse"], pairs="pred_x", by="day").iter_rows(named=True)}
    p, y = full["pred_x"].to_numpy(), full["target_x"].to_numpy()
    d1, d2 = dt.date(2024, 6, 3), dt.date(2024, 6, 4)
    assert got[d1, "count"] == 40 and got[d1, "n_excluded"] == 0
    assert got[d1, "mse"] == pytest.approx(exact(p, y)["mse"], rel=1e-12)
    assert (got[d2, "count"], got[d2, "n_excluded"], got[d2, "mse"]) == (0, 40, None)
    (tmp_path / "2024-06-03.parquet").unlink()  # that day alone: the column has no type at all
    with Harness(tmp_path, cache=False) as h:
        alone = h.metrics(["count", "mse"], pairs="pred_x")
    assert {r["metric"]: r["value"] for r in alone.iter_rows(named=True)} == {
        "count": 0, "n_excluded": 40, "mse": None}
