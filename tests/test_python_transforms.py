"""Python (Polars LazyFrame) experiment steps, against references computed here with numpy/polars.

The references read the Parquet files themselves, apply the 09:30-16:00 US/Eastern session window
from each row's local wall-clock time, and apply each transform either to every file (one day)
separately or to all windowed rows at once, with numpy. Metrics come from scikit-learn / scipy.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SESSION, write_dataset
from polars.testing import assert_frame_equal
from scipy.stats import pearsonr
from sklearn.metrics import mean_squared_error, r2_score

from duckharness import Harness
from duckharness.demo import one_day, trading_days
from duckharness.errors import TransformError

DAYS = trading_days(dt.date(2026, 3, 4), 5)  # 03-04, 05, 06, 09, 10: crosses the DST switch of 03-08
ROWS = 3000
THIRD_DAY = DAYS[2]
REL = 1e-9
METRICS = ["count", "r2", "mse", "corr"]


# --- data and the independent reference ------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pytransforms") / "bt"
    rng = np.random.default_rng(11)
    write_dataset(out, {d.isoformat(): one_day(d, ROWS, rng, symbols=8) for d in DAYS}, SESSION, row_group_size=1000)
    return out


def windowed_rows(folder: Path) -> pl.DataFrame:
    """Every row of every file with its file stem and local day, kept if 09:30 <= local time <= 16:00."""
    frames = []
    for p in sorted(folder.glob("*.parquet")):
        df = pl.from_arrow(pq.read_table(p))
        assert isinstance(df, pl.DataFrame)
        frames.append(df.with_columns(pl.lit(p.stem).alias("_file")))
    df = pl.concat(frames)
    local = pl.col("ts").dt.convert_time_zone("US/Eastern")
    df = df.with_columns(local.dt.date().alias("_day"), local.dt.time().alias("_tod"))
    return df.filter((pl.col("_tod") >= dt.time(9, 30)) & (pl.col("_tod") <= dt.time(16, 0))).drop("_tod")


@pytest.fixture(scope="module")
def ref(folder: Path) -> pl.DataFrame:
    df = windowed_rows(folder)
    assert df["_file"].n_unique() == len(DAYS)
    # Each file is one local day, so "per batch" and "per day" are the same split here.
    assert df.group_by("_file").agg(pl.col("_day").n_unique())["_day"].to_list() == [1] * len(DAYS)
    assert 0.6 < df.height / (ROWS * len(DAYS)) < 0.8
    return df


def zscore_np(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std(ddof=1)


def per_file(df: pl.DataFrame, fn: Callable[[pl.DataFrame], pl.DataFrame]) -> pl.DataFrame:
    parts = [fn(part) for part in df.partition_by("_file", maintain_order=True)]
    return pl.concat(parts)


def with_z(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.Series("pred_z", zscore_np(df["pred_10s"].to_numpy())))


def above_median(df: pl.DataFrame) -> pl.DataFrame:
    p = df["pred_10s"].to_numpy()
    return df.filter(pl.Series(p > np.median(p)))


def liquid(df: pl.DataFrame) -> pl.DataFrame:
    return df.filter(pl.col("volume") > 1000)


def symbol_mean_of_z(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col("pred_z").mean().over("symbol").alias("pz_sym"))


REFERENCE: dict[str, Callable[[pl.DataFrame], pl.DataFrame]] = {
    "baseline": lambda w: w,
    "z_day": lambda w: per_file(w, with_z),
    "z_all": with_z,
    "med_day": lambda w: per_file(w, above_median),
    "med_all": above_median,
    "liquid": liquid,
    "liquid_z": lambda w: per_file(liquid(w), with_z),
    "liquid_z_pos": lambda w: per_file(liquid(w), with_z).filter((pl.col("pred_z") > 0) & (pl.col("spread") < 0.02)),
    "liquid_zw": lambda w: with_z(liquid(w)),
    "liquid_zw_pos": lambda w: with_z(liquid(w)).filter((pl.col("pred_z") > 0) & (pl.col("spread") < 0.02)),
    "z_day_sym": lambda w: symbol_mean_of_z(per_file(w, with_z)),
}


def reference_metrics(rows: pl.DataFrame, pred: str, target: str) -> dict[str, float]:
    p, t = rows[pred].to_numpy(), rows[target].to_numpy()
    return {
        "count": float(len(p)),
        "r2": float(r2_score(t, p)),
        "mse": float(mean_squared_error(t, p)),
        "corr": float(pearsonr(p, t).statistic),
    }


# --- the user's Python steps ---------------------------------------------------------------------

def add_pred_z(lf: pl.LazyFrame) -> pl.LazyFrame:
    p = pl.col("pred_10s")
    return lf.with_columns(((p - p.mean()) / p.std()).alias("pred_z"))


def keep_above_median(lf: pl.LazyFrame) -> pl.LazyFrame:
    return lf.filter(pl.col("pred_10s") > pl.col("pred_10s").median())


def add_experiments(h: Harness) -> None:
    h.add_experiment("z_day", add_pred_z)
    h.add_experiment("z_all", add_pred_z, per_batch=False)
    h.add_experiment("med_day", keep_above_median)
    h.add_experiment("med_all", keep_above_median, per_batch=False)
    h.add_experiment("liquid", "volume > 1000")
    h.add_experiment("liquid_z", add_pred_z, base="liquid")
    h.add_experiment("liquid_z_pos", "SELECT * FROM liquid_z WHERE pred_z > 0 AND spread < 0.02")
    h.add_experiment("liquid_zw", add_pred_z, base="liquid", per_batch=False)
    h.add_experiment("liquid_zw_pos", "pred_z > 0 AND spread < 0.02", base="liquid_zw")
    h.add_experiment("z_day_sym", "SELECT *, avg(pred_z) OVER (PARTITION BY symbol) AS pz_sym FROM z_day")


@pytest.fixture(scope="module")
def harness(folder: Path) -> Harness:
    h = Harness(folder, workers=2)
    add_experiments(h)
    return h


def got_metrics(h: Harness, experiments: list[str], pairs: list[str], by: str | None = None) -> dict:
    res = h.metrics(METRICS, pairs=pairs, experiments=experiments, by=by)
    out = {}
    for r in res.iter_rows(named=True):
        if r["metric"] != "n_excluded":
            out[(r["experiment"], r["pred"], r["target"], r[by] if by else None, r["metric"])] = r["value"]
    return out


def ref_metrics(ref: pl.DataFrame, experiments: list[str], pairs: list[str], by: str | None = None) -> dict:
    out = {}
    for name in experiments:
        rows = REFERENCE[name](ref)
        groups = [(None, rows)] if by is None else [
            (k[0], part) for k, part in rows.group_by("_day", maintain_order=True)]
        for g, part in groups:
            for pair in pairs:
                p, t = pair.split(":")
                for m, v in reference_metrics(part, p, t).items():
                    out[(name, p, t, g, m)] = v
    return out


def assert_metrics_match(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    assert all(math.isfinite(v) for v in want.values())
    assert got == pytest.approx(want, rel=REL, abs=1e-12)


# --- metrics of Python experiments --------------------------------------------------------------

def test_baseline_count_matches_the_reference_session_window(harness: Harness, ref: pl.DataFrame) -> None:
    # Sanity of the reference itself: the window applied here is the harness's window.
    got = got_metrics(harness, ["baseline"], ["pred_10s:target_10s"])
    assert_metrics_match(got, ref_metrics(ref, ["baseline"], ["pred_10s:target_10s"]))


def test_per_batch_zscore_metrics_use_mean_and_std_of_each_day(harness: Harness, ref: pl.DataFrame) -> None:
    pairs = ["pred_z:target_10s", "pred_10s:target_10s"]
    assert_metrics_match(got_metrics(harness, ["z_day"], pairs), ref_metrics(ref, ["z_day"], pairs))


def test_whole_data_zscore_metrics_use_mean_and_std_of_all_rows(harness: Harness, ref: pl.DataFrame) -> None:
    pairs = ["pred_z:target_10s", "pred_10s:target_10s"]
    assert_metrics_match(got_metrics(harness, ["z_all"], pairs), ref_metrics(ref, ["z_all"], pairs))


def test_per_batch_and_whole_data_zscores_give_different_metrics(harness: Harness, ref: pl.DataFrame) -> None:
    got = got_metrics(harness, ["z_day", "z_all"], ["pred_z:target_10s"])
    for m in ("mse", "r2", "corr"):
        day, whole = got[("z_day", "pred_z", "target_10s", None, m)], got[("z_all", "pred_z", "target_10s", None, m)]
        assert day != pytest.approx(whole, rel=1e-6), m
    # An affine map of all rows at once leaves the pooled correlation of pred_10s unchanged.
    p, t = ref["pred_10s"].to_numpy(), ref["target_10s"].to_numpy()
    assert got[("z_all", "pred_z", "target_10s", None, "corr")] == pytest.approx(pearsonr(p, t).statistic, rel=REL)


def test_python_row_filter_per_batch_keeps_rows_above_each_days_median(harness: Harness, ref: pl.DataFrame) -> None:
    names, pairs = ["med_day", "med_all"], ["pred_10s:target_10s"]
    got, want = got_metrics(harness, names, pairs), ref_metrics(ref, names, pairs)
    assert_metrics_match(got, want)
    assert got[("med_day", "pred_10s", "target_10s", None, "count")] != got[
        ("med_all", "pred_10s", "target_10s", None, "count")]


def test_sql_then_python_then_sql_chain_matches_reference(harness: Harness, ref: pl.DataFrame) -> None:
    names = ["liquid", "liquid_z", "liquid_z_pos", "liquid_zw", "liquid_zw_pos"]
    pairs = ["pred_z:target_10s", "pred_1s:target_1s"]
    got = got_metrics(harness, names, ["pred_10s:target_10s"]) | got_metrics(harness, names[1:], pairs)
    want = ref_metrics(ref, names, ["pred_10s:target_10s"]) | ref_metrics(ref, names[1:], pairs)
    assert_metrics_match(got, want)
    # The SQL filter after the Python step sees the z-scores of its own semantics.
    z_day_rows = REFERENCE["liquid_z_pos"](ref)["ts"].to_list()
    z_all_rows = REFERENCE["liquid_zw_pos"](ref)["ts"].to_list()
    assert set(z_day_rows) != set(z_all_rows)
    assert got[("liquid_z_pos", "pred_z", "target_10s", None, "mse")] != pytest.approx(
        got[("liquid_zw_pos", "pred_z", "target_10s", None, "mse")], rel=1e-6)


@pytest.mark.parametrize("name", ["z_day", "z_all", "liquid_z_pos", "liquid_zw_pos"])
def test_metrics_by_day_of_python_experiments_match_reference_per_day(
        harness: Harness, ref: pl.DataFrame, name: str) -> None:
    pairs = ["pred_z:target_10s"]
    got = got_metrics(harness, [name], pairs, by="day")
    assert len({k[3] for k in got}) == len(DAYS)
    assert_metrics_match(got, ref_metrics(ref, [name], pairs, by="day"))


def test_sql_window_step_after_per_batch_python_step_sees_per_day_zscores(
        harness: Harness, ref: pl.DataFrame) -> None:
    # z_day is per batch: its z-scores use each day's mean and std, whatever follows it. The
    # window step after it (mean per symbol over all rows) makes the chain run on all files at
    # once, which must not change what the per-batch step computes.
    pairs = ["pz_sym:target_10s", "pred_z:target_10s"]
    assert_metrics_match(got_metrics(harness, ["z_day_sym"], pairs), ref_metrics(ref, ["z_day_sym"], pairs))


def test_metrics_timings_report_listing_plan_map_whole_and_reduce(harness: Harness) -> None:
    harness.metrics(["count"], pairs=["pred_10s:target_10s"], experiments=["baseline", "liquid", "z_day"])
    t = harness.last_run.timings
    assert {"listing", "plan", "map", "whole", "reduce"} <= set(t)
    assert all(isinstance(v, float) and v >= 0 for v in t.values())
    harness.metrics(["count"], pairs=["pred_10s:target_10s"], experiments=["liquid"])
    assert "whole" not in harness.last_run.timings  # only the fused scan ran


# --- errors --------------------------------------------------------------------------------------

def explode(lf: pl.LazyFrame) -> pl.LazyFrame:
    raise RuntimeError("kaput")


def test_function_raising_at_add_time_is_a_transform_error_naming_experiment_and_function(folder: Path) -> None:
    h = Harness(folder)
    with pytest.raises(TransformError) as ei:
        h.add_experiment("broken", explode)
    msg = str(ei.value)
    assert "'broken'" in msg and "explode" in msg and "RuntimeError" in msg and "kaput" in msg
    assert ei.value.experiment == "broken"
    assert ei.value.step is not None and ei.value.step.endswith("explode")
    assert isinstance(ei.value.__cause__, RuntimeError)
    assert "broken" not in h.experiments.names  # not registered


def test_function_reading_unknown_column_fails_at_add_time(folder: Path) -> None:
    def read_nope(lf: pl.LazyFrame) -> pl.LazyFrame:
        return lf.with_columns(pl.col("no_such_column") * 2)

    h = Harness(folder)
    with pytest.raises(TransformError, match=r"'nope'.*read_nope.*no_such_column") as ei:
        h.add_experiment("nope", read_nope)
    assert ei.value.experiment == "nope"
    assert "nope" not in h.experiments.names


@pytest.mark.parametrize("value", [42, None, "lf", [1, 2]], ids=["int", "none", "str", "list"])
def test_function_returning_a_non_lazyframe_is_a_transform_error(folder: Path, value: object) -> None:
    h = Harness(folder)
    with pytest.raises(TransformError, match=rf"'odd'.*must return a Polars LazyFrame, got {type(value).__name__}"):
        h.add_experiment("odd", lambda lf: value)
    assert "odd" not in h.experiments.names


def _local_day(df: pl.DataFrame) -> pl.Series:
    return df["ts"].dt.convert_time_zone("US/Eastern").dt.date()


def fail_on_third_day(lf: pl.LazyFrame) -> pl.LazyFrame:
    df = lf.collect()
    if df.height and (_local_day(df) == THIRD_DAY).any():
        raise ValueError(f"cannot handle {THIRD_DAY}")
    return df.lazy()


def check_lazily(lf: pl.LazyFrame) -> pl.LazyFrame:
    def check(ts: pl.Series) -> pl.Series:
        if ts.len() and (ts.dt.convert_time_zone("US/Eastern").dt.date() == THIRD_DAY).any():
            raise ValueError("third day seen at collect time")
        return ts

    return lf.with_columns(pl.col("ts").map_batches(check, return_dtype=pl.Datetime("us", "UTC")))


def wrong_type_on_data(lf: pl.LazyFrame) -> pl.LazyFrame:
    df = lf.collect()
    return df.lazy() if df.height == 0 else df.to_dicts()  # type: ignore[return-value]


@pytest.mark.parametrize(("fn", "per_batch", "pattern"), [
    (fail_on_third_day, True, r"'late'.*fail_on_third_day raised ValueError: cannot handle 2026-03-06"),
    (fail_on_third_day, False, r"'late'.*fail_on_third_day raised ValueError: cannot handle 2026-03-06"),
    (check_lazily, True, r"'late'.*check_lazily failed when run.*third day seen at collect time"),
    (wrong_type_on_data, True, r"'late'.*wrong_type_on_data must return a Polars LazyFrame, got list"),
], ids=["raise_per_batch", "raise_whole", "raise_at_collect", "wrong_type"])
def test_function_failing_only_on_data_raises_transform_error_when_metrics_run(
        folder: Path, fn: Callable, per_batch: bool, pattern: str) -> None:
    h = Harness(folder, workers=2)
    h.add_experiment("late", fn, per_batch=per_batch)  # fine on the empty frame
    with pytest.raises(TransformError, match=pattern) as ei:
        h.metrics(["count"], pairs=["pred_10s:target_10s"], experiments=["late"])
    assert ei.value.experiment == "late"
    assert ei.value.step is not None and ei.value.step.endswith(fn.__name__)


def test_function_failing_on_third_day_raises_transform_error_from_lazyframe_collect(folder: Path) -> None:
    h = Harness(folder)
    h.add_experiment("late", fail_on_third_day)
    assert h.lazyframe("late").head(5).collect().height == 5  # the first day is fine
    with pytest.raises(TransformError, match=r"'late'.*fail_on_third_day"):
        h.lazyframe("late").collect()


# --- pickling ------------------------------------------------------------------------------------

def test_python_step_survives_cloudpickle_round_trip(folder: Path) -> None:
    scale = 3.0

    def scaled(lf: pl.LazyFrame) -> pl.LazyFrame:  # a closure: pickled by value
        return lf.with_columns((pl.col("pred_10s") * scale).alias("pred_s"))

    h = Harness(folder)
    h.add_experiment("scaled", scaled, per_batch=False)
    step = h.experiments.step("scaled")
    loaded = cloudpickle.loads(cloudpickle.dumps(step))
    assert (loaded.name, loaded.base, loaded.per_batch, loaded.is_python) == ("scaled", "baseline", False, True)
    assert loaded.label == step.label
    frame = pl.DataFrame({"pred_10s": [1.0, -2.0, 0.5], "other": ["a", "b", "c"]})
    out = loaded.fn(frame.lazy()).collect()
    assert out["pred_s"].to_list() == [3.0, -6.0, 1.5]
    assert out.equals(step.fn(frame.lazy()).collect())
    fn = cloudpickle.loads(cloudpickle.dumps(step.fn))
    assert fn(frame.lazy()).collect()["pred_s"].to_list() == [3.0, -6.0, 1.5]


def test_pickled_python_step_runs_in_a_fresh_interpreter(folder: Path) -> None:
    offset = 0.25

    def shifted(lf: pl.LazyFrame) -> pl.LazyFrame:
        return lf.with_columns((pl.col("pred_10s") + offset).alias("pred_o"))

    h = Harness(folder)
    h.add_experiment("shifted", shifted)
    blob = cloudpickle.dumps(h.experiments.step("shifted"))
    code = ("import sys, cloudpickle, polars as pl\n"
            "s = cloudpickle.loads(sys.stdin.buffer.read())\n"
            "out = s.fn(pl.DataFrame({'pred_10s': [1.0, 2.0]}).lazy()).collect()\n"
            "print(s.name, s.per_batch, out['pred_o'].to_list())")
    proc = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "shifted True [1.25, 2.25]"


def test_sql_step_survives_cloudpickle_round_trip(harness: Harness) -> None:
    step = harness.experiments.step("liquid_z_pos")
    loaded = cloudpickle.loads(cloudpickle.dumps(step))
    assert (loaded.name, loaded.base, loaded.is_python) == ("liquid_z_pos", "liquid_z", False)
    assert loaded.render(pretty=False) == step.render(pretty=False)


# --- introspection -------------------------------------------------------------------------------

def test_experiment_tree_shows_names_sql_and_python_labels(harness: Harness) -> None:
    z = f"{add_pred_z.__module__}.{add_pred_z.__qualname__}"
    med = f"{keep_above_median.__module__}.{keep_above_median.__qualname__}"
    expected = "\n".join([
        "baseline",
        f"├── z_day  python: {z} (per batch)",
        "│   └── z_day_sym  SQL: SELECT *, avg(pred_z) OVER (PARTITION BY symbol) AS pz_sym FROM z_day",
        f"├── z_all  python: {z} (whole data)",
        f"├── med_day  python: {med} (per batch)",
        f"├── med_all  python: {med} (whole data)",
        "└── liquid  SQL: volume > 1000",
        f"    ├── liquid_z  python: {z} (per batch)",
        "    │   └── liquid_z_pos  SQL: SELECT * FROM liquid_z WHERE pred_z > 0 AND spread < 0.02",
        f"    └── liquid_zw  python: {z} (whole data)",
        "        └── liquid_zw_pos  SQL: pred_z > 0 AND spread < 0.02",
    ])
    assert harness.experiment_tree() == expected


def test_experiment_sql_of_python_chain_lists_each_step_in_order(harness: Harness) -> None:
    text = harness.experiment_sql("liquid_z_pos")
    marks = ["-- baseline", "-- liquid (from baseline): SQL: volume > 1000",
             "-- liquid_z (from liquid): python: ", "add_pred_z (per batch)",
             "-- liquid_z_pos (from liquid_z): SQL: "]
    pos = [text.find(m) for m in marks]
    assert -1 not in pos and pos == sorted(pos), text
    assert "2026-03-10.parquet" in text and "pred_z > 0" in text


def test_experiment_sql_of_sql_chain_runs_in_plain_duckdb_to_the_reference_rows(
        harness: Harness, ref: pl.DataFrame) -> None:
    sql = harness.experiment_sql("liquid")
    assert duckdb.sql(f"SELECT count(*) FROM ({sql})").fetchall()[0][0] == liquid(ref).height


def test_relation_schema_has_the_python_columns_without_reading_data(folder: Path) -> None:
    trace: list[str] = []
    h = Harness(folder, tracer=trace.append)
    h.add_experiment("liquid", "volume > 1000")
    h.add_experiment("liquid_z", add_pred_z, base="liquid")
    trace.clear()
    schema = h.relation_schema("liquid_z")
    assert schema["pred_z"] == pl.Float64
    assert schema["ts"] == pl.Datetime("us", "UTC")
    assert list(schema)[-1] == "pred_z" and len(schema) == len(h.columns) + 1
    assert not any("read_parquet" in s.lower() for s in trace)


def read_paths(trace: list[str]) -> set[str]:
    """Every file path named in a read_parquet([...]) of the traced statements."""
    out: set[str] = set()
    for s in trace:
        for m in re.finditer(r"read_parquet\s*\(\s*\[([^\]]*)\]", s, re.IGNORECASE):
            out.update(re.findall(r"'([^']+)'", m.group(1)))
    return out


@pytest.mark.parametrize("kind", ["sql", "python"])
def test_lazyframe_head_reads_only_the_first_file(folder: Path, ref: pl.DataFrame, kind: str) -> None:
    trace: list[str] = []
    h = Harness(folder, tracer=trace.append)
    h.add_experiment("liquid", "volume > 1000")
    if kind == "sql":
        h.add_experiment("tight", "spread < 0.02", base="liquid")
    else:
        h.add_experiment("tight", lambda lf: lf.filter(pl.col("spread") < 0.02), base="liquid")
    trace.clear()
    lf = h.lazyframe("tight")
    assert read_paths(trace) == set()  # nothing read until collected
    head = lf.head(10).collect()
    first = str(sorted(folder.glob("*.parquet"))[0])
    assert read_paths(trace) == {first}
    want = ref.filter((pl.col("volume") > 1000) & (pl.col("spread") < 0.02)).sort("ts").head(10)
    assert want["_file"].unique().to_list() == [DAYS[0].isoformat()]
    assert head.equals(want.drop("_file", "_day"))


@pytest.mark.parametrize("name", ["liquid", "liquid_z", "liquid_zw_pos"])
def test_lazyframe_collect_has_as_many_rows_as_relation_and_reference(
        harness: Harness, ref: pl.DataFrame, name: str) -> None:
    n = harness.lazyframe(name).collect().height
    assert n == harness.relation(name).count("*").fetchall()[0][0]
    assert n == REFERENCE[name](ref).height


@pytest.mark.parametrize("name", ["z_day", "z_all", "med_day"])
def test_lazyframe_rows_equal_reference(harness: Harness, ref: pl.DataFrame, name: str) -> None:
    got = harness.lazyframe(name).collect().sort("ts")
    want = REFERENCE[name](ref).sort("ts").drop("_file", "_day")
    assert got.columns == want.columns
    assert_frame_equal(got, want, check_exact=False, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("name", ["z_day", "z_all", "med_day"])
def test_relation_rows_equal_reference(harness: Harness, ref: pl.DataFrame, name: str) -> None:
    # A per-batch Python step must see each file batch on its own in the relation too.
    got = harness.relation(name).pl().sort("ts")
    want = REFERENCE[name](ref).sort("ts").drop("_file", "_day")
    assert got.height == want.height
    assert_frame_equal(got, want, check_exact=False, rel_tol=1e-9, abs_tol=1e-12)



# --- a per-batch step sees one day, however the files hold the days ------------------------------------

def zscore_with_rows(lf: pl.LazyFrame) -> pl.LazyFrame:
    p = pl.col("pred_10s")
    return lf.with_columns(((p - p.mean()) / p.std()).alias("pred_10s"), pl.len().alias("step_rows"))


@pytest.fixture(scope="module")
def odd_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three days in one file, a day split over two files, and a one-day file."""
    out = tmp_path_factory.mktemp("odd") / "bt"
    rng = np.random.default_rng(23)
    days = trading_days(dt.date(2026, 3, 9), 5)  # 03-09 .. 03-13
    tables = {d: one_day(d, 900, rng, symbols=5) for d in days}
    split = tables[days[3]]
    write_dataset(out, {
        "multi": pa.concat_tables([tables[d] for d in days[:3]]),
        "split_a": split.slice(0, 400), "split_b": split.slice(400),
        "single": tables[days[4]],
    }, SESSION, row_group_size=300)
    return out


def test_a_per_batch_python_step_sees_each_day_whole_in_any_file_layout(odd_layout: Path) -> None:
    """Before, it saw each file: the three days of one file as one, a split day as two halves,
    so a per-day z-score gave wrong per-day values (mse off by ~0.4%) with no warning."""
    w = windowed_rows(odd_layout)
    want = {}
    for (day,), part in w.sort("ts").partition_by("_day", as_dict=True, maintain_order=True).items():
        z = zscore_np(part["pred_10s"].to_numpy())
        want[day] = (float(mean_squared_error(part["target_10s"].to_numpy(), z)), part.height)
    assert len(want) == 5
    with Harness(odd_layout, workers=2) as h:
        h.add_experiment("z", zscore_with_rows)
        got = h.metrics(["mse", "count"], pairs="pred_10s", experiments=["z"], by="day")
        mse = {r["day"]: r["value"] for r in got.filter(metric="mse").iter_rows(named=True)}
        assert mse.keys() == want.keys()
        for day, (ref, _) in want.items():
            assert mse[day] == pytest.approx(ref, rel=REL), day
        rows = h.lazyframe("z").collect()
        local = rows.with_columns(pl.col("ts").dt.convert_time_zone("US/Eastern").dt.date().alias("d"))
        seen = dict(local.group_by("d").agg(pl.col("step_rows").unique()).iter_rows())
        assert seen == {d: [n] for d, (_, n) in want.items()}  # the step ran once per day, on all its rows


def to_pandas(lf: pl.LazyFrame) -> object:
    return lf.collect().to_pandas()


def test_a_step_returning_a_pandas_dataframe_is_told_how_to_convert_it(folder: Path) -> None:
    """Refused rather than converted: pl.from_pandas drops the index (a set_index('ts') would lose
    the time column silently). Before, the message said only 'got DataFrame', which a Polars
    DataFrame (accepted) is too."""
    h = Harness(folder)
    with pytest.raises(TransformError, match=r"'pd'.*to_pandas returned a pandas DataFrame; .*"
                                             r"return pl\.from_pandas\(df\)\.lazy\(\) \(after df\.reset_index\(\)"):
        h.add_experiment("pd", to_pandas)
    assert "pd" not in h.experiments.names
    h.add_experiment("pd", lambda lf: pl.from_pandas(to_pandas(lf)).lazy())  # the conversion it names works
    assert h.metrics(["count"], pairs="pred_10s:target_10s", experiments=["pd", "baseline"]).filter(
        metric="count")["value"].n_unique() == 1
