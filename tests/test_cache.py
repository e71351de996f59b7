"""The per-batch statistics cache: hits on re-runs, never stale, safe under concurrent runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from duckharness import Harness
from duckharness.engine.cache import StatsCache
from duckharness.errors import SourceError

METRICS = ["count", "r2", "mse"]
PAIR = ["pred_10s:target_10s"]


def counts(df: pl.DataFrame) -> float:
    return df.filter((pl.col("metric") == "count") & (pl.col("experiment") == "baseline"))["value"][0]


def reference_count(folder: Path) -> int:
    """Rows inside the 09:30-16:00 US/Eastern window, computed without duckharness."""
    n = 0
    for f in sorted(folder.glob("*.parquet")):
        ts = pl.from_arrow(pq.read_table(f, columns=["ts"]))["ts"].dt.convert_time_zone("US/Eastern")
        parts = [ts.dt.hour(), ts.dt.minute(), ts.dt.second(), ts.dt.microsecond()]
        h, m, s, us = (p.cast(pl.Int64) for p in parts)
        t = h * 3600 + m * 60 + s + us / 1e6
        n += int(((t >= 9.5 * 3600) & (t <= 16 * 3600)).sum())
    return n


def test_rerun_is_served_from_cache_with_identical_values(backtest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = Harness(backtest, cache=cache)
    a = first.metrics(METRICS, pairs=PAIR)
    assert first.last_run is not None and first.last_run.cache_hits == 0
    second = Harness(backtest, cache=cache)
    b = second.metrics(METRICS, pairs=PAIR)
    assert second.last_run is not None and second.last_run.cache_hits == second.last_run.batches == 6
    assert a.equals(b)
    assert counts(a) == reference_count(backtest)


@contextlib.contextmanager
def newest_day_held_back(folder: Path, tmp_path: Path) -> Iterator[Path]:
    """The folder without its newest file inside the block; the file is back after it."""
    newest = sorted(folder.glob("*.parquet"))[-1]
    held = tmp_path / newest.name
    shutil.move(newest, held)
    try:
        yield newest
    finally:
        shutil.move(held, newest)


def test_adding_a_day_reads_only_the_new_file(make_backtest, tmp_path: Path) -> None:
    folder = make_backtest(days=6)
    cache = tmp_path / "cache"
    with newest_day_held_back(folder, tmp_path) as newest:
        Harness(folder, cache=cache).metrics(METRICS, pairs=PAIR)
    statements: list[str] = []
    h = Harness(folder, cache=cache, tracer=statements.append)
    df = h.metrics(METRICS, pairs=PAIR)
    assert h.last_run is not None and h.last_run.cache_hits == 5
    scans = [s for s in statements if "GROUP BY ALL" in s and "READ_PARQUET" in s]
    assert len(scans) == 1 and newest.name in scans[0]
    assert counts(df) == reference_count(folder)


def test_file_rewritten_under_the_same_name_is_recomputed(backtest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    before = Harness(backtest, cache=cache).metrics(METRICS, pairs=PAIR)
    victim = sorted(backtest.glob("*.parquet"))[2]
    table = pq.read_table(victim)
    half = table.slice(0, table.num_rows // 2)
    pq.write_table(half, victim)
    stat = os.stat(victim)
    os.utime(victim, (stat.st_atime, stat.st_mtime + 5))  # a new modification time, as a rewrite has
    h = Harness(backtest, cache=cache)
    after = h.metrics(METRICS, pairs=PAIR)
    assert h.last_run is not None and h.last_run.cache_hits == 5
    assert counts(after) == reference_count(backtest) < counts(before)


def test_a_rewrite_keeping_size_and_mtime_is_recomputed(tmp_path: Path) -> None:
    """``cp -p`` / ``rsync -t`` of a same-size file with other values keeps size and mtime; the
    footer's statistics differ, and they are part of the file's identity."""
    from conftest import write_dataset

    n = 2000
    start = np.datetime64("2026-03-04T15:00:00", "us")
    ts = pa.array(start + np.arange(n).astype("timedelta64[s]"), pa.timestamp("us", tz="UTC"))
    rng = np.random.default_rng(5)
    p, t = rng.normal(size=n), rng.normal(size=n)

    def write(target: np.ndarray) -> Path:
        folder = tmp_path / "d"
        write_dataset(folder, {"2026-03-04": pa.table({"ts": ts, "pred_a": p, "target_a": target})}, {})
        return folder / "2026-03-04.parquet"

    def rewrite(target: np.ndarray) -> None:  # uncompressed, plain: the same bytes of layout
        pq.write_table(pa.table({"ts": ts, "pred_a": p, "target_a": target}), victim, compression="none",
                       use_dictionary=False)

    victim = write(t)
    rewrite(t)
    stat = os.stat(victim)
    cache = tmp_path / "cache"
    with Harness(tmp_path / "d", cache=cache) as h:
        before = h.metrics(["corr"], pairs="pred_a:target_a")["value"][0]
    rewrite(-t)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(victim).st_size == stat.st_size and os.stat(victim).st_mtime_ns == stat.st_mtime_ns
    with Harness(tmp_path / "d", cache=cache) as h:
        after = h.metrics(["corr"], pairs="pred_a:target_a")["value"][0]
        assert h.last_run is not None and h.last_run.cache_hits == 0
    assert before == pytest.approx(float(np.corrcoef(p, t)[0, 1]), rel=1e-12)
    assert after == pytest.approx(float(np.corrcoef(p, -t)[0, 1]), rel=1e-12)


def test_changed_experiment_or_metric_file_is_recomputed(backtest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    metric = metrics_dir / "sum_pred.sql"
    metric.write_text("-- stats\nSELECT sum(pred) AS s FROM input;\n-- final\nSELECT s AS value FROM merged;\n")
    h = Harness(backtest, cache=cache, metric_dirs=[metrics_dir])
    h.add_experiment("liquid", "volume > 1000")
    h.metrics(["sum_pred"], pairs=PAIR)
    metric.write_text("-- stats\nSELECT sum(pred * 2) AS s FROM input;\n-- final\nSELECT s AS value FROM merged;\n")
    h2 = Harness(backtest, cache=cache, metric_dirs=[metrics_dir])
    h2.add_experiment("liquid", "volume > 1000")
    doubled = h2.metrics(["sum_pred"], pairs=PAIR)
    assert h2.last_run is not None and h2.last_run.cache_hits == 0
    h3 = Harness(backtest, cache=cache, metric_dirs=[metrics_dir])
    h3.add_experiment("liquid", "volume > 2000")
    changed = h3.metrics(["sum_pred"], pairs=PAIR)
    assert h3.last_run is not None and h3.last_run.cache_hits == 0
    a = doubled.filter((pl.col("experiment") == "liquid") & (pl.col("metric") == "sum_pred"))["value"][0]
    b = changed.filter((pl.col("experiment") == "liquid") & (pl.col("metric") == "sum_pred"))["value"][0]
    assert a != b


def test_concurrent_runs_sharing_a_cache_give_correct_results(backtest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    expected = Harness(backtest, cache=False).metrics(METRICS, pairs=PAIR)
    results: list[pl.DataFrame] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(Harness(backtest, cache=cache, workers=1).metrics(METRICS, pairs=PAIR))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4 and all(r.equals(expected) for r in results)
    assert len(StatsCache(cache)) == 6
    assert not list(cache.glob("*/.*.tmp"))  # no half-written entries left


def test_a_rewrite_keeping_size_mtime_and_footer_is_recomputed_even_under_an_open_harness(tmp_path: Path) -> None:
    """The predictions of a day shuffled among its rows: every column chunk keeps its size,
    min/max and null count, so the footer digest is the same, and the mtime is put back. The
    file's ctime (which nothing sets back) still changes, and no run serves the old values."""
    from conftest import write_dataset

    n = 2000
    start = np.datetime64("2026-03-04T15:00:00", "us")
    ts = pa.array(start + np.arange(n).astype("timedelta64[s]"), pa.timestamp("us", tz="UTC"))
    rng = np.random.default_rng(9)
    p, t = rng.normal(size=n), rng.normal(size=n)
    folder = tmp_path / "d"
    write_dataset(folder, {"2026-03-04": pa.table({"ts": ts, "pred_a": p, "target_a": t})}, {})
    victim = folder / "2026-03-04.parquet"

    def rewrite(pred: np.ndarray) -> None:
        pq.write_table(pa.table({"ts": ts, "pred_a": pred, "target_a": t}), victim, compression="none",
                       use_dictionary=False)

    rewrite(p)
    stat = os.stat(victim)
    shuffled = rng.permutation(p)
    cache = tmp_path / "cache"
    h = Harness(folder, cache=cache)
    before = h.metrics(["corr"], pairs="pred_a:target_a")["value"][0]
    footer = h.dataset.files[0].footer
    rewrite(shuffled)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(victim).st_size == stat.st_size and os.stat(victim).st_mtime_ns == stat.st_mtime_ns
    kept_open = h.metrics(["corr"], pairs="pred_a:target_a")["value"][0]
    assert h.dataset.files[0].footer == footer  # only the ctime tells
    assert h.last_run is not None and h.last_run.cache_hits == 0
    h.close()
    with Harness(folder, cache=cache) as fresh:
        again = fresh.metrics(["corr"], pairs="pred_a:target_a")["value"][0]
        assert fresh.last_run is not None and fresh.last_run.cache_hits == 1  # the entry just written
    assert before == pytest.approx(float(np.corrcoef(p, t)[0, 1]), rel=1e-12)
    assert kept_open == again == pytest.approx(float(np.corrcoef(shuffled, t)[0, 1]), rel=1e-12)


def test_an_entry_edited_into_other_numbers_is_recomputed(backtest: Path, tmp_path: Path) -> None:
    """Every entry carries a digest of its key and values; one rewritten with other values (by
    hand, or by anything but the cache) no longer matches and is recomputed, not served."""
    cache = tmp_path / "cache"
    expected = Harness(backtest, cache=cache).metrics(METRICS, pairs=PAIR)
    entries = sorted(cache.glob("*/*.parquet"))
    for entry in entries:
        frame = pl.read_parquet(entry)
        stats = [c for c, d in frame.schema.items() if d == pl.Float64]
        frame.with_columns(pl.col(c) * 2 for c in stats).write_parquet(entry)
    h = Harness(backtest, cache=cache)
    got = h.metrics(METRICS, pairs=PAIR)
    assert h.last_run is not None and h.last_run.cache_hits == 0
    assert got.equals(expected) and counts(got) == reference_count(backtest)
    h.metrics(METRICS, pairs=PAIR)  # the recomputed entries are whole again
    assert h.last_run.cache_hits == len(entries)


def test_corrupt_cache_entry_is_recomputed(backtest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    expected = Harness(backtest, cache=cache).metrics(METRICS, pairs=PAIR)
    for entry in cache.glob("*/*.parquet"):
        entry.write_bytes(b"not parquet")
    h = Harness(backtest, cache=cache)
    assert h.metrics(METRICS, pairs=PAIR).equals(expected)
    assert h.last_run is not None and h.last_run.cache_hits == 0


def test_cache_off_by_argument(backtest: Path) -> None:
    assert Harness(backtest, cache=False).cache is None


@pytest.mark.parametrize("seed", [1])
def test_cache_key_depends_on_file_identity_and_sql(seed: int) -> None:
    from duckharness.data.source import FileInfo

    rng = np.random.default_rng(seed)
    f = FileInfo("/x/a.parquet", 10, float(rng.integers(1, 10**9)), 1, {})
    g = FileInfo("/x/a.parquet", 11, f.mtime, 1, {})
    assert StatsCache.key("SELECT 1", [f]) != StatsCache.key("SELECT 1", [g])
    assert StatsCache.key("SELECT 1", [f]) != StatsCache.key("SELECT 2", [f])
    assert StatsCache.key("SELECT 1", [f]) == StatsCache.key("SELECT 1", [f])


def test_shifts_come_from_the_cache_until_the_first_file_changes(backtest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    Harness(backtest, cache=cache).metrics(METRICS, pairs=PAIR)
    statements: list[str] = []
    h = Harness(backtest, cache=cache, tracer=statements.append)
    h.metrics(METRICS, pairs=PAIR)
    assert not [s for s in statements if "MEDIAN(" in s]
    assert any(s.startswith("-- shifts from the cache") for s in statements)
    assert h.last_run is not None and h.last_run.cache_hits == 6
    first = sorted(backtest.glob("*.parquet"))[0]
    table = pq.read_table(first)
    pq.write_table(table.slice(table.num_rows // 2), first)  # other first rows, so other medians
    stat = os.stat(first)
    os.utime(first, (stat.st_atime, stat.st_mtime + 5))
    statements.clear()
    h = Harness(backtest, cache=cache, tracer=statements.append)
    df = h.metrics(METRICS, pairs=PAIR)
    assert [s for s in statements if "MEDIAN(" in s]
    assert counts(df) == reference_count(backtest)


def test_damaged_shift_entry_is_recomputed(backtest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    expected = Harness(backtest, cache=cache).metrics(METRICS, pairs=PAIR)
    entries = list(cache.glob("*/*.json"))
    assert len(entries) == 1
    for text in ("not json", '{"a": 1}', '["x", 2]', "[1.0]"):
        entries[0].write_text(text)
        statements: list[str] = []
        h = Harness(backtest, cache=cache, tracer=statements.append)
        assert h.metrics(METRICS, pairs=PAIR).equals(expected)
        assert [s for s in statements if "MEDIAN(" in s], text
    assert not list(cache.glob("*/.*.tmp"))


def test_a_harness_kept_open_sees_a_file_rewritten_in_place(backtest: Path, tmp_path: Path) -> None:
    h = Harness(backtest, cache=tmp_path / "cache")
    before = h.metrics(METRICS, pairs=PAIR)
    victim = sorted(backtest.glob("*.parquet"))[3]
    table = pq.read_table(victim)
    pq.write_table(table.slice(0, table.num_rows // 3), victim)
    after = h.metrics(METRICS, pairs=PAIR)
    assert h.last_run is not None and h.last_run.cache_hits == 5
    assert counts(after) == reference_count(backtest) < counts(before)


def test_a_harness_kept_open_sees_a_day_added_to_the_folder(make_backtest, tmp_path: Path) -> None:
    folder = make_backtest(days=6)
    newest = sorted(folder.glob("*.parquet"))[-1]
    held = tmp_path / newest.name
    shutil.move(newest, held)
    h = Harness(folder, cache=tmp_path / "cache")
    h.metrics(METRICS, pairs=PAIR)
    shutil.move(held, newest)
    df = h.metrics(METRICS, pairs=PAIR)
    assert h.last_run is not None and (h.last_run.batches, h.last_run.cache_hits) == (6, 5)
    assert len(h.files) == 6 and counts(df) == reference_count(folder)


def test_changed_columns_need_a_new_harness(backtest: Path) -> None:
    h = Harness(backtest, cache=False)
    h.metrics(METRICS, pairs=PAIR)
    victim = sorted(backtest.glob("*.parquet"))[1]
    table = pq.read_table(victim)
    pq.write_table(table.append_column("extra", pa.array(np.zeros(table.num_rows))), victim)
    with pytest.raises(SourceError, match=r"columns of the source changed .*new: extra.*create a new Harness"):
        h.metrics(METRICS, pairs=PAIR)
    assert counts(Harness(backtest, cache=False).metrics(METRICS, pairs=PAIR)) == reference_count(backtest)


def test_entry_with_other_columns_is_recomputed(backtest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    expected = Harness(backtest, cache=cache).metrics(METRICS, pairs=PAIR)
    for entry in cache.glob("*/*.parquet"):
        pq.write_table(pa.table({"x": [1, 2, 3]}), entry)  # valid Parquet, not partial statistics
    h = Harness(backtest, cache=cache)
    assert h.metrics(METRICS, pairs=PAIR).equals(expected)
    assert h.last_run is not None and h.last_run.cache_hits == 0


def test_clear_removes_the_entries_and_nothing_else(backtest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    h = Harness(backtest, cache=cache)
    h.metrics(METRICS, pairs=PAIR)
    mine = cache / "notes.txt"
    mine.write_text("mine")
    assert h.cache is not None and len(h.cache) == 6
    h.cache.clear()
    assert len(h.cache) == 0 and not list(cache.glob("*/*.json"))
    assert cache.is_dir() and mine.read_text() == "mine"


@pytest.mark.parametrize("value", ["off", "OFF", "0", "false", "no", "none"])
def test_cache_off_by_environment(backtest: Path, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUCKHARNESS_CACHE", value)
    assert Harness(backtest).cache is None


def test_entries_read_together_equal_entries_read_one_by_one(tmp_path: Path) -> None:
    cache = StatsCache(tmp_path / "c")
    frames = {f"{i:064x}": pl.DataFrame({"__rows": [float(i), 2.0 * i], "__s1": [0.5 * i, None]}) for i in range(4)}
    frames[f"{9:064x}"] = pl.DataFrame(schema={"__rows": pl.Float64, "__s1": pl.Float64})  # a batch with no rows
    for key, frame in frames.items():
        cache.put(key, frame)
    keys = [f"{3:064x}", f"{7:064x}", f"{0:064x}", f"{9:064x}", f"{3:064x}", f"{1:064x}"]
    together = cache.get_many(keys)
    assert [f is None for f in together] == [False, True, False, False, False, False]
    for key, frame in zip(keys, together, strict=True):
        if frame is not None:
            assert frame.equals(frames[key]) and frame.schema == frames[key].schema
    (tmp_path / "c" / "00" / f"{0:064x}.parquet").write_bytes(b"garbage")
    again = cache.get_many(keys)
    assert again[2] is None and again[0] is not None and again[0].equals(frames[keys[0]])


def test_an_empty_cache_is_still_on(tmp_path: Path) -> None:
    cache = StatsCache(tmp_path / "empty")
    assert len(cache) == 0 and bool(cache)


# --- per-day scans (rank IC, deciles) ------------------------------------------------------------

def reference_rank_ic(folder: Path, experiment_filter: str | None = None) -> dict:
    """scipy's Spearman rho of pred_10s and target_10s per US/Eastern day inside 09:30-16:00."""
    from scipy.stats import spearmanr

    df = pl.concat([pl.from_arrow(pq.read_table(f)) for f in sorted(folder.glob("*.parquet"))], how="diagonal_relaxed")
    local = pl.col("ts").dt.convert_time_zone("US/Eastern")
    secs = local.dt.hour().cast(pl.Int64) * 3600 + local.dt.minute().cast(pl.Int64) * 60 + local.dt.second()
    df = df.with_columns(local.dt.date().alias("day"), (secs + local.dt.microsecond() / 1e6).alias("t"))
    df = df.filter((pl.col("t") >= 9.5 * 3600) & (pl.col("t") <= 16 * 3600))
    df = df.filter(pl.col("pred_10s").is_finite() & pl.col("target_10s").is_finite())
    if experiment_filter == "liquid":
        df = df.filter(pl.col("volume") > 1000)
    return {
        day: spearmanr(g["pred_10s"].to_numpy(), g["target_10s"].to_numpy()).statistic
        for (day,), g in df.group_by("day")
    }


def ic_by_day(df: pl.DataFrame, experiment: str = "baseline") -> dict:
    sel = df.filter((pl.col("experiment") == experiment) & (pl.col("metric") == "rank_ic"))
    return dict(zip(sel["day"].to_list(), sel["value"].to_list(), strict=True))


def scans_and_hits(statements: list[str]) -> tuple[int, int]:
    """Per-day queries run (each day group's rank-IC or bucket query) and day groups from the cache."""
    hits = sum(s.startswith("-- from the cache") for s in statements)
    scans = sum("__s_n" in s for s in statements if not s.startswith("--"))
    return scans, hits


def test_rank_ic_and_deciles_reruns_come_from_the_cache_bit_for_bit(backtest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with Harness(backtest, cache=cache) as h:
        h.add_experiment("liquid", "volume > 1000")
        ic, dec = h.rank_ic("pred_10s:target_10s"), h.deciles("pred_10s:target_10s")
    statements: list[str] = []
    with Harness(backtest, cache=cache, tracer=statements.append) as h:
        h.add_experiment("liquid", "volume > 1000")
        del statements[:]
        ic2, dec2 = h.rank_ic("pred_10s:target_10s"), h.deciles("pred_10s:target_10s")
    assert scans_and_hits(statements) == (0, 2 * 2 * 6)  # 2 calls x 2 experiments x 6 days, none scanned
    assert ic.equals(ic2) and dec.equals(dec2)
    with Harness(backtest, cache=False) as h:
        h.add_experiment("liquid", "volume > 1000")
        assert ic.equals(h.rank_ic("pred_10s:target_10s")) and dec.equals(h.deciles("pred_10s:target_10s"))
    for name in ("baseline", "liquid"):
        got, ref = ic_by_day(ic, name), reference_rank_ic(backtest, name)
        assert got.keys() == ref.keys()
        assert all(got[d] == pytest.approx(ref[d], rel=1e-12, abs=1e-15) for d in ref)


def test_adding_a_day_scans_only_that_day_for_rank_ic(make_backtest, tmp_path: Path) -> None:
    folder = make_backtest(days=6)
    cache = tmp_path / "cache"
    with newest_day_held_back(folder, tmp_path) as newest:
        Harness(folder, cache=cache).rank_ic("pred_10s:target_10s")
    statements: list[str] = []
    h = Harness(folder, cache=cache, tracer=statements.append)
    del statements[:]
    df = h.rank_ic("pred_10s:target_10s")
    assert scans_and_hits(statements) == (1, 5)
    assert newest.stem in next(s for s in statements if "__s_n" in s)  # its day label
    views = [s for s in statements if s.startswith("CREATE OR REPLACE TEMPORARY VIEW baseline")]
    assert len(views) == 1 and newest.name in views[0]  # the chain, as built for the day it scans
    ref = reference_rank_ic(folder)
    assert len(ref) == 6 and all(ic_by_day(df)[d] == pytest.approx(ref[d], rel=1e-12) for d in ref)
    assert df.equals(Harness(folder, cache=False).rank_ic("pred_10s:target_10s"))


def test_rank_ic_of_a_rewritten_file_or_changed_experiment_is_recomputed(backtest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with Harness(backtest, cache=cache) as h:
        h.add_experiment("liquid", "volume > 1000")
        h.rank_ic("pred_10s:target_10s", ["baseline", "liquid"])
    victim = sorted(backtest.glob("*.parquet"))[2]
    table = pq.read_table(victim)
    rng = np.random.default_rng(5)
    table = table.set_column(table.schema.get_field_index("pred_10s"), "pred_10s",
                             pa.array(rng.normal(size=table.num_rows)))
    pq.write_table(table, victim)
    stat = os.stat(victim)
    os.utime(victim, (stat.st_atime, stat.st_mtime + 5))
    statements: list[str] = []
    with Harness(backtest, cache=cache, tracer=statements.append) as h:
        h.add_experiment("liquid", "volume > 5000")  # same name, other SQL
        del statements[:]
        df = h.rank_ic("pred_10s:target_10s", ["baseline", "liquid"])
    assert scans_and_hits(statements) == (1 + 6, 5)  # baseline: the rewritten day; liquid: every day
    ref = reference_rank_ic(backtest)
    assert all(ic_by_day(df)[d] == pytest.approx(ref[d], rel=1e-12) for d in ref)
    with Harness(backtest, cache=False) as fresh:
        fresh.add_experiment("liquid", "volume > 5000")
        assert df.equals(fresh.rank_ic("pred_10s:target_10s", ["baseline", "liquid"]))


def test_python_experiments_per_day_scans_are_not_cached(backtest: Path, tmp_path: Path) -> None:
    def flip(frame: pl.LazyFrame) -> pl.LazyFrame:
        return frame.with_columns(-pl.col("pred_10s"))

    cache = tmp_path / "cache"
    for _ in range(2):
        statements: list[str] = []
        with Harness(backtest, cache=cache, tracer=statements.append) as h:
            h.add_experiment("flipped", flip)
            del statements[:]
            df = h.rank_ic("pred_10s:target_10s", ["flipped"])
        assert scans_and_hits(statements) == (6, 0)
        assert sum(s.startswith("-- Python step") for s in statements) == 1  # the chain is shown once
    ref = reference_rank_ic(backtest)
    assert all(ic_by_day(df, "flipped")[d] == pytest.approx(-ref[d], rel=1e-12) for d in ref)


def test_per_day_entry_without_its_columns_is_recomputed(backtest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = Harness(backtest, cache=cache).rank_ic("pred_10s:target_10s")
    for entry in (tmp_path / "cache").glob("*/*.parquet"):
        pl.DataFrame({"something": [1.0]}).write_parquet(entry)  # valid Parquet, not ours
    statements: list[str] = []
    again = Harness(backtest, cache=cache, tracer=statements.append).rank_ic("pred_10s:target_10s")
    assert scans_and_hits(statements)[1] == 0 and again.equals(first)


def test_a_cache_path_that_is_a_file_is_refused_up_front(backtest: Path, tmp_path: Path) -> None:
    from duckharness.errors import InputError

    afile = tmp_path / "not-a-folder"
    afile.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        Harness(backtest, cache=afile)
    with pytest.raises(InputError, match=r"cannot be made: .* is a file"):
        Harness(backtest, cache=afile / "sub")


def test_a_cache_that_cannot_be_written_warns_and_the_results_stand(backtest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "blocked"
    cache.mkdir()
    for i in range(256):  # every shard name taken by a file: no entry can be written
        (cache / f"{i:02x}").write_text("")
    from duckharness.errors import DuckHarnessWarning

    with pytest.warns(DuckHarnessWarning, match="Cannot write to the cache folder") as caught:
        got = Harness(backtest, cache=cache).metrics(METRICS, pairs=PAIR)
    assert len(caught) == 1  # once per run's cache, not once per entry
    assert got.equals(Harness(backtest, cache=False).metrics(METRICS, pairs=PAIR))
    assert counts(got) == reference_count(backtest)
    assert sorted(p.name for p in cache.iterdir()) == [f"{i:02x}" for i in range(256)]  # nothing left behind


def test_the_command_line_shows_a_cache_warning_as_one_line(
        backtest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from duckharness.cli import main

    cache = tmp_path / "blocked"
    cache.mkdir()
    for i in range(256):
        (cache / f"{i:02x}").write_text("")
    assert main(["metrics", str(backtest), "--metric", "mse", "--pair", PAIR[0], "--cache", str(cache), "-q"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"Warning: Cannot write to the cache folder {str(cache)!r} (File exists); results are not cached."]


def test_a_full_disk_under_the_cache_warns_and_leaves_no_partial_entry(
        backtest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import polars as pl

    from duckharness.errors import DuckHarnessWarning

    def full(self: pl.DataFrame, file: object, *args: object, **kwargs: object) -> None:
        Path(str(file)).write_bytes(b"PAR1 half an entry")  # what a full disk leaves
        raise pl.exceptions.ComputeError(
            "parquet: File out of specification: underlying IO error: No space left on device (os error 28)")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", full)
    cache = tmp_path / "full"
    with pytest.warns(DuckHarnessWarning, match=r"Cannot write to the cache folder .*No space left on device"):
        got = Harness(backtest, cache=cache).metrics(METRICS, pairs=PAIR)
    assert counts(got) == reference_count(backtest)
    assert not list(cache.glob("*/*.parquet")) and not list(cache.glob("*/.*.tmp"))
