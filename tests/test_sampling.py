"""Samples of experiment rows (random_days, head, gather_every), against references computed here.

The reference reads every Parquet file with pyarrow, applies the 09:30-16:00 US/Eastern session
window from each row's local time, re-implements each experiment in Polars/numpy, and sorts by
time; each strategy is then checked against what it means on those rows.
"""

from __future__ import annotations

import datetime as dt
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SESSION, session_days, write_dataset
from polars.testing import assert_frame_equal

from duckharness import Harness
from duckharness.demo import one_day, trading_days
from duckharness.errors import DuckHarnessWarning, InputError, UnknownExperimentError

DAYS = trading_days(dt.date(2026, 3, 4), 6)  # crosses the DST switch of 2026-03-08
ROWS = 2500
TRACE: list[str] = []


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sampling") / "bt"
    rng = np.random.default_rng(5)
    write_dataset(out, {d.isoformat(): one_day(d, ROWS, rng, symbols=8) for d in DAYS}, SESSION, row_group_size=500)
    return out


@pytest.fixture(scope="module")
def ref(folder: Path) -> pl.DataFrame:
    """All windowed rows, sorted by time, with their local day."""
    frames = []
    for p in sorted(folder.glob("*.parquet")):
        df = pl.from_arrow(pq.read_table(p))
        assert isinstance(df, pl.DataFrame)
        frames.append(df)
    df = pl.concat(frames)
    local = pl.col("ts").dt.convert_time_zone("US/Eastern")
    df = df.with_columns(local.dt.date().alias("_day"), local.dt.time().alias("_tod"))
    df = df.filter((pl.col("_tod") >= dt.time(9, 30)) & (pl.col("_tod") <= dt.time(16, 0))).drop("_tod").sort("ts")
    assert df["ts"].is_unique().all()  # time order is a total order
    assert sorted(df["_day"].unique().to_list()) == DAYS
    return df


def zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std(ddof=1)


def with_z(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.Series("pred_z", zscore(df["pred_10s"].to_numpy())))


def ref_rows(ref: pl.DataFrame, name: str) -> pl.DataFrame:
    """The experiment's rows (sorted by time, with _day) re-implemented here."""
    liquid = ref.filter(pl.col("volume") > 1000)
    if name == "liquid":
        return liquid
    if name == "z_day":
        return pl.concat([with_z(part) for part in liquid.partition_by("_day", maintain_order=True)]).sort("ts")
    if name == "z_all":
        return with_z(liquid)
    if name == "pm":
        return liquid.with_columns(pl.col("pred_10s").mean().over("symbol").alias("pm"))
    raise KeyError(name)


def add_pred_z(lf: pl.LazyFrame) -> pl.LazyFrame:
    p = pl.col("pred_10s")
    return lf.with_columns(((p - p.mean()) / p.std()).alias("pred_z"))


@pytest.fixture(scope="module")
def harness(folder: Path) -> Harness:
    h = Harness(folder, workers=2, tracer=TRACE.append)
    h.add_experiment("liquid", "volume > 1000")
    h.add_experiment("z_day", add_pred_z, base="liquid")
    h.add_experiment("z_all", add_pred_z, base="liquid", per_batch=False)
    h.add_experiment("pm", "SELECT *, avg(pred_10s) OVER (PARTITION BY symbol) AS pm FROM liquid")
    return h


def local_days(df: pl.DataFrame) -> set[dt.date]:
    return set(df["ts"].dt.convert_time_zone("US/Eastern").dt.date().to_list())


def assert_rows(got: pl.DataFrame, want: pl.DataFrame, *, sort: bool = True) -> None:
    want = want.drop("_day")
    got = got.sort("ts") if sort else got
    assert got.columns == want.columns
    assert_frame_equal(got, want, check_exact=False, rel_tol=1e-9, abs_tol=1e-12)


def read_paths(trace: list[str]) -> set[str]:
    out: set[str] = set()
    for s in trace:
        for m in re.finditer(r"read_parquet\s*\(\s*\[([^\]]*)\]", s, re.IGNORECASE):
            out.update(re.findall(r"'([^']+)'", m.group(1)))
    return out


# --- random_days ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 7])
def test_random_days_returns_every_row_of_exactly_n_days_through_the_filter(
        harness: Harness, ref: pl.DataFrame, seed: int) -> None:
    s = harness.sample("liquid", "random_days", n_days=3, seed=seed)
    days = local_days(s)
    assert len(days) == 3 and days <= set(DAYS)
    want = ref_rows(ref, "liquid").filter(pl.col("_day").is_in(sorted(days)))
    assert (s["volume"] > 1000).all()
    assert_rows(s, want)


def test_random_days_is_reproducible_with_a_seed_and_varies_with_it(harness: Harness) -> None:
    a = harness.sample("liquid", "random_days", n_days=2, seed=42)
    b = harness.sample("liquid", "random_days", n_days=2, seed=42)
    assert a.equals(b)
    day_sets = {frozenset(local_days(harness.sample("liquid", "random_days", n_days=2, seed=k))) for k in range(8)}
    assert all(len(d) == 2 for d in day_sets)
    assert len(day_sets) >= 3  # 15 possible pairs of days; 8 seeds picking one pair is vanishingly unlikely


def test_random_days_reads_only_the_files_of_the_chosen_days(harness: Harness, folder: Path) -> None:
    TRACE.clear()
    s = harness.sample("liquid", "random_days", n_days=2, seed=3)
    chosen = {str(folder / f"{d.isoformat()}.parquet") for d in local_days(s)}
    assert len(chosen) == 2
    assert read_paths(TRACE) == chosen


def test_random_days_with_more_days_than_the_data_returns_every_row(harness: Harness, ref: pl.DataFrame) -> None:
    with pytest.warns(DuckHarnessWarning, match="only 6 days with rows inside the session window"):
        s = harness.sample("liquid", "random_days", n_days=50, seed=0)
    assert_rows(s, ref_rows(ref, "liquid"))


def test_random_days_of_per_batch_python_experiment_has_each_days_zscores(harness: Harness, ref: pl.DataFrame) -> None:
    s = harness.sample("z_day", "random_days", n_days=2, seed=11)
    days = local_days(s)
    assert len(days) == 2
    assert_rows(s, ref_rows(ref, "z_day").filter(pl.col("_day").is_in(sorted(days))))


@pytest.mark.parametrize("name", ["z_all", "pm"])
def test_random_days_of_whole_data_experiment_gives_the_experiments_rows_of_those_days(
        harness: Harness, ref: pl.DataFrame, name: str) -> None:
    # A sample is taken "through the experiment's logic": for an experiment computed over all
    # rows (a whole-data z-score, a mean per symbol over all days) the sampled rows must carry the
    # values the experiment gives them, not values computed over the sampled days only.
    s = harness.sample(name, "random_days", n_days=2, seed=11)
    days = local_days(s)
    assert len(days) == 2
    assert_rows(s, ref_rows(ref, name).filter(pl.col("_day").is_in(sorted(days))))


# --- random_days on files that hold several days ------------------------------------------------------

OVERNIGHT = {"start_time": "18:00", "end_time": "16:00", "timezone": "US/Eastern"}
SPLIT_DAY = dt.date(2026, 2, 11)  # its rows before 16:00 UTC are in one file, the others in the next


def sampled_days(sample: pl.DataFrame, ref: pl.DataFrame) -> pl.DataFrame:
    """The reference rows of the days the sample has rows of (by the reference's own day labels)."""
    days = ref.filter(pl.col("ts").is_in(sample["ts"].implode()))["_day"].unique()
    return ref.filter(pl.col("_day").is_in(days.implode()))


def assert_whole_days(sample: pl.DataFrame, ref: pl.DataFrame, n_days: int) -> None:
    """The sample is every row of exactly ``n_days`` of the reference's days, and nothing else."""
    want = sampled_days(sample, ref)
    assert want["_day"].n_unique() == n_days
    assert_frame_equal(sample.sort("ts"), want.drop("_day"))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metadata", [{}, SESSION, OVERNIGHT], ids=["no-window", "session", "overnight"])
def test_random_days_of_files_of_several_days_returns_exactly_n_days_that_hold_rows(
        make_multiday: Callable[..., Path], metadata: dict, seed: int) -> None:
    folder = make_multiday(metadata)
    ref = session_days(folder, metadata)
    s = Harness(folder).sample(n_days=10, seed=seed)
    assert_whole_days(s, ref, 10)


def test_random_days_asked_for_every_day_skip_weekends_holidays_and_days_without_session_rows(
        make_multiday: Callable[..., Path]) -> None:
    folder = make_multiday(SESSION)
    ref = session_days(folder, SESSION)
    n = ref["_day"].n_unique()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly as many days as there are: no warning
        s = Harness(folder).sample(n_days=n, seed=3)
    assert_whole_days(s, ref, n)
    assert dt.date(2026, 2, 20) not in set(s["ts"].dt.date().to_list())  # its one row is outside the window
    # Across the DST switch each day keeps its own session: 14:00 UTC is 09:00 before it (outside)
    # and 10:00 after it (inside); 20:30 UTC is 15:30 before (inside) and 16:30 after (outside).
    after = (pl.col("ts").dt.date() >= dt.date(2026, 3, 9)).alias("after")
    hours = s.group_by(after).agg(pl.col("ts").dt.time().unique().sort().alias("hours"))
    by_side = dict(hours.iter_rows())
    assert by_side == {False: [dt.time(15), dt.time(17), dt.time(20, 30)],
                       True: [dt.time(14), dt.time(15), dt.time(17)]}


@pytest.mark.parametrize("metadata", [{}, SESSION], ids=["no-window", "session"])
def test_random_days_asked_for_more_days_than_exist_warns_naming_how_many(
        make_multiday: Callable[..., Path], metadata: dict) -> None:
    folder = make_multiday(metadata)
    ref = session_days(folder, metadata)
    n = ref["_day"].n_unique()
    with pytest.warns(DuckHarnessWarning, match=rf"Asked for 1,000 random days but the source has only {n} days"):
        s = Harness(folder).sample(n_days=1000, seed=0)
    assert_frame_equal(s.sort("ts"), ref.drop("_day"))


def test_random_days_keeps_every_row_of_a_day_split_over_two_files(make_multiday: Callable[..., Path]) -> None:
    folder = make_multiday({})
    ref = session_days(folder, {})
    h = Harness(folder)
    picked = 0
    for seed in range(40):
        s = h.sample(n_days=4, seed=seed)
        assert_whole_days(s, ref, 4)
        if SPLIT_DAY in set(sampled_days(s, ref)["_day"].to_list()):
            picked += 1
            hours = s.filter(pl.col("ts").dt.date() == SPLIT_DAY)["ts"].dt.time().to_list()
            assert hours == [dt.time(14), dt.time(15), dt.time(17), dt.time(20, 30)]  # from both files
    assert picked > 0


def test_random_days_draw_depends_on_the_rows_and_seed_not_the_row_groups(
        make_multiday: Callable[..., Path]) -> None:
    one_group = make_multiday(SESSION)
    others = [make_multiday(SESSION, row_group_size=3), make_multiday(SESSION, statistics=False)]
    ref = session_days(one_group, SESSION)
    for seed in (0, 5):
        a = Harness(one_group).sample(n_days=7, seed=seed)
        assert_whole_days(a, ref, 7)
        for folder in [one_group, *others]:
            assert a.equals(Harness(folder).sample(n_days=7, seed=seed))


# --- head ---------------------------------------------------------------------------------------------

def test_head_returns_the_first_n_rows_in_time_order_across_files(harness: Harness, ref: pl.DataFrame) -> None:
    rows = ref_rows(ref, "liquid")
    n = int((rows["_day"] == DAYS[0]).sum()) + 37  # spills into the second day
    s = harness.sample("liquid", "head", n=n)
    assert s.height == n
    assert s["ts"].is_sorted()
    assert_rows(s, rows.head(n), sort=False)


def test_head_reads_only_the_first_file_when_it_holds_enough_rows(
        harness: Harness, ref: pl.DataFrame, folder: Path) -> None:
    TRACE.clear()
    s = harness.sample("liquid", "head", n=10)
    assert read_paths(TRACE) == {str(folder / f"{DAYS[0].isoformat()}.parquet")}
    assert_rows(s, ref_rows(ref, "liquid").head(10), sort=False)


def test_head_with_n_beyond_the_data_returns_every_row(harness: Harness, ref: pl.DataFrame) -> None:
    s = harness.sample("liquid", "head", n=10**7)
    assert_rows(s, ref_rows(ref, "liquid"), sort=False)


@pytest.mark.parametrize("name", ["z_day", "z_all", "pm"])
def test_head_of_python_and_window_experiments_is_their_first_rows(
        harness: Harness, ref: pl.DataFrame, name: str) -> None:
    s = harness.sample(name, "head", n=1500)
    assert_rows(s, ref_rows(ref, name).head(1500), sort=False)


# --- gather_every -------------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [1, 7, 250])
def test_gather_every_keeps_every_step_th_row_in_time_order_across_files(
        harness: Harness, ref: pl.DataFrame, step: int) -> None:
    rows = ref_rows(ref, "liquid")
    per_day = rows.group_by("_day").len()["len"].to_list()
    if step > 1:
        assert any(c % step for c in per_day)  # the phase must carry over file boundaries
    s = harness.sample("liquid", "gather_every", step=step)
    assert s.height == len(range(0, rows.height, step))
    assert_rows(s, rows.gather_every(step), sort=False)


@pytest.mark.parametrize("name", ["z_day", "z_all"])
def test_gather_every_of_python_experiment(harness: Harness, ref: pl.DataFrame, name: str) -> None:
    s = harness.sample(name, "gather_every", step=13)
    assert "pred_z" in s.columns
    assert_rows(s, ref_rows(ref, name).gather_every(13), sort=False)


# --- refusals -----------------------------------------------------------------------------------------

def test_random_rows_is_refused_with_the_reason(harness: Harness) -> None:
    with pytest.raises(InputError) as ei:
        harness.sample("liquid", "random_rows", seed=1)
    msg = str(ei.value)
    assert "random_rows" in msg and "time series" in msg and "random_days" in msg


@pytest.mark.parametrize("strategy", ["shuffle", "tail", ""])
def test_unknown_strategy_is_refused_listing_the_options(harness: Harness, strategy: str) -> None:
    with pytest.raises(InputError, match=rf"Unknown sampling strategy '{strategy}'.*random_days, head, gather_every"):
        harness.sample("liquid", strategy)


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n_days": 0}, {"step": 0}, {"step": -3}])
def test_non_positive_sizes_are_refused(harness: Harness, kwargs: dict) -> None:
    with pytest.raises(InputError, match="at least 1"):
        harness.sample("liquid", "head", **kwargs)


def test_random_days_of_a_source_without_time_column_is_refused_naming_the_fix(tmp_path: Path) -> None:
    folder = tmp_path / "untimed"
    write_dataset(folder, {"a": pl.DataFrame({"pred_x": [0.1, 0.2], "target_x": [0.3, 0.4]}).to_arrow()}, {})
    with pytest.raises(InputError, match=r"'random_days' needs a time column.*'head' or 'gather_every'"):
        Harness(folder).sample(n_days=1)


def test_sampling_an_unknown_experiment_names_it(harness: Harness) -> None:
    with pytest.raises(UnknownExperimentError, match="'nope'"):
        harness.sample("nope", "head", n=5)


def test_random_days_of_an_experiment_without_the_time_column(tmp_path: Path) -> None:
    """Before, a file of several days came back whole (all six days for two drawn): the drawn days'
    rows are told apart by the time column. Without it, one-day files still sample; a file of
    several days is refused, naming the experiment."""
    rng = np.random.default_rng(8)
    days = trading_days(dt.date(2026, 3, 4), 4)
    tables = {d.isoformat(): one_day(d, 300, rng, symbols=4) for d in days}
    write_dataset(tmp_path / "daily", tables, SESSION)
    write_dataset(tmp_path / "one", {"all": pa.concat_tables(list(tables.values()))}, SESSION)
    with Harness(tmp_path / "daily", cache=False) as h:
        h.add_experiment("nots", "SELECT * EXCLUDE (ts) FROM baseline")
        got = h.sample("nots", "random_days", n_days=2, seed=3)
        full = h.sample("baseline", "random_days", n_days=2, seed=3)
        assert got.height == full.height and "ts" not in got.columns
    with Harness(tmp_path / "one", cache=False) as h:
        h.add_experiment("nots", "SELECT * EXCLUDE (ts) FROM baseline")
        with pytest.raises(InputError, match=r"experiment 'nots' does not have.*Keep 'ts' in 'nots'"):
            h.sample("nots", "random_days", n_days=2, seed=3)
