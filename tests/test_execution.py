"""Execution: parallel workers, batching, fused vs separate runs, grouping consistency."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from conftest import SESSION, read_all, write_dataset

from duckharness import Harness
from duckharness.demo import one_day, trading_days

INLINABLE = {
    "liquid": "volume > 1000",
    "tight": "SELECT * FROM liquid WHERE spread < 0.02",
    "clipped": "SELECT * REPLACE (greatest(least(pred_10s, 0.5), -0.5) AS pred_10s) FROM baseline",
    "clipped_pos": "SELECT * FROM clipped WHERE f_mom > 0",
}
WHOLE = {
    "pm": "SELECT *, avg(pred_10s) OVER (PARTITION BY symbol) AS pm FROM baseline",
    "pm_liquid": "SELECT * FROM pm WHERE volume > 1000",
}
METRICS = ["count", "r2", "mse", "rmse", "mae", "bias", "corr", "hit_rate"]
KEYS = ["experiment", "pred", "target", "metric"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven demo days (08:00-17:00 US/Eastern) across the 2026-03-08 switch."""
    out = tmp_path_factory.mktemp("exec")
    rng = np.random.default_rng(42)
    write_dataset(out, {d.isoformat(): one_day(d, 2000, rng, symbols=12)
                        for d in trading_days(dt.date(2026, 3, 4), 7)}, SESSION, row_group_size=1000)
    return out


def harness(folder: Path, experiments: dict[str, str], **kw: object) -> Harness:
    h = Harness(folder, **kw)
    for name, sql in experiments.items():
        h.add_experiment(name, sql)
    return h


def _rows(df: pl.DataFrame) -> dict[tuple, float | None]:
    keys = [c for c in df.columns if c != "value"]
    out = {tuple(r[k] for k in keys): r["value"] for r in df.iter_rows(named=True)}
    assert len(out) == df.height  # one value per key
    return out


def assert_close(a: dict, b: dict, rel: float, abs_: float = 1e-14) -> None:
    """Same keys; counts equal; other values within ``rel`` (nulls must match). ``abs_`` is for
    values near zero such as an r2 of 1e-5, which is 1 - sse/sst and so only exact to ~1e-16."""
    assert set(a) == set(b)
    for k in a:  # the key ends with the metric name
        if k[-1] in ("count", "n_excluded") or a[k] is None or b[k] is None:
            assert a[k] == b[k], k
    assert {k: v for k, v in a.items() if v is not None} == pytest.approx(
        {k: v for k, v in b.items() if v is not None}, rel=rel, abs=abs_)


# --- workers and batches ---------------------------------------------------------------------------

@pytest.mark.parametrize("by", [None, "day", "symbol"], ids=["pooled", "by_day", "by_symbol"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_workers_1_and_2_give_bit_identical_values(folder: Path, batch_size: int, by: str | None) -> None:
    h = harness(folder, INLINABLE, batch_size=batch_size)
    one = h.metrics(METRICS, by=by, workers=1)
    two = h.metrics(METRICS, by=by, workers=2)
    assert one.drop("value").equals(two.drop("value"))
    assert one["value"].to_list() == two["value"].to_list()  # ==, not approx
    assert one.filter(pl.col("value").is_null()).height == 0  # nothing hides behind null == null


def test_batch_size_3_gives_the_same_values_as_batch_size_1(folder: Path) -> None:
    # Batches change how the float sums are split, so the last bits may differ (the merge is exact
    # up to rounding); counts are integers and must be equal.
    h = harness(folder, INLINABLE)
    for by in (None, "day"):
        assert_close(_rows(h.metrics(METRICS, by=by, batch_size=3, workers=2)),
                     _rows(h.metrics(METRICS, by=by, batch_size=1, workers=1)), rel=1e-12)


def test_experiments_that_cannot_be_inlined_agree_across_worker_counts_to_rounding(folder: Path) -> None:
    # Experiments that need all rows at once run as one multi-threaded DuckDB query, whose parallel
    # sums may round differently from run to run: equal to 1e-12, counts exactly (documented).
    h = harness(folder, WHOLE)
    one = h.metrics(METRICS, pairs=["pred_10s:target_10s", "pm:target_10s"], experiments=list(WHOLE), workers=1)
    for _ in range(3):
        two = h.metrics(METRICS, pairs=["pred_10s:target_10s", "pm:target_10s"], experiments=list(WHOLE), workers=2)
        assert one.drop("value").equals(two.drop("value"))
        assert_close(_rows(one), _rows(two), rel=1e-12)
        counts = one.filter(pl.col("metric") == "count")["value"].to_list()
        assert counts == two.filter(pl.col("metric") == "count")["value"].to_list()


# --- files computed in parts ------------------------------------------------------------------------

def _part_queries(statements: list[str]) -> list[str]:
    """The batch queries that read one part of a file (a row-number range in their WHERE)."""
    return [s for s in statements if "GROUP BY ALL" in s and "file_row_number" in s.split(" WHERE ", 1)[-1]]


@pytest.mark.parametrize("by", [None, "day", ["day", "tod:1h"]], ids=["pooled", "by_day", "by_day_and_hour"])
def test_files_computed_whole_or_in_row_group_parts_give_the_same_bits(
        folder: Path, by: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    unsplit = harness(folder, INLINABLE).metrics(METRICS, by=by)
    monkeypatch.setattr("duckharness.engine.plan.PART_ROWS", 1000)  # the files hold two row groups of 1000
    statements: list[str] = []
    whole = harness(folder, INLINABLE, workers=1, tracer=statements.append).metrics(METRICS, by=by)
    batch = [s for s in statements if "GROUP BY ALL" in s and "__s1" in s and "READ_PARQUET" in s]
    assert len(batch) == 7 and all("AS __part" in q for q in batch) and not _part_queries(statements)
    statements.clear()
    parts = harness(folder, INLINABLE, workers=8, tracer=statements.append).metrics(METRICS, by=by)
    ranges = [q.split(" WHERE ", 1)[1] for q in _part_queries(statements)]
    assert len(ranges) == 14  # 7 batches for 8 workers: each file's two parts run as two queries
    assert all(("file_row_number >= 1000" in r) != ("file_row_number < 1000" in r) for r in ranges)
    assert parts.drop("value").equals(whole.drop("value"))
    assert parts["value"].to_list() == whole["value"].to_list()  # ==, not approx
    assert whole.drop("value").equals(unsplit.drop("value"))
    assert_close(_rows(whole), _rows(unsplit), rel=1e-12)


def test_files_stay_whole_when_grouped_by_a_column(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A part key would multiply the (many) symbol groups: no parts, whatever the workers.
    monkeypatch.setattr("duckharness.engine.plan.PART_ROWS", 1000)
    statements: list[str] = []
    harness(folder, INLINABLE, workers=8, tracer=statements.append).metrics(METRICS, by="symbol")
    batch = [s for s in statements if "GROUP BY ALL" in s and "__s1" in s]
    assert len(batch) == 7 and not any("file_row_number" in q for q in batch)


def test_an_incremental_run_gives_the_bits_of_a_full_run(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("duckharness.engine.plan.PART_ROWS", 1000)
    full = harness(folder, INLINABLE, workers=2, cache=False).metrics(METRICS, by="day")
    # Six days cached; the seventh is computed alone, its two parts on the two workers.
    days = sorted(folder.glob("*.parquet"))
    cache = tmp_path / "cache"
    harness([str(d) for d in days[:6]], INLINABLE, cache=cache).metrics(METRICS, by="day")
    statements: list[str] = []
    h = harness([str(d) for d in days], INLINABLE, cache=cache, workers=2, tracer=statements.append)
    later = h.metrics(METRICS, by="day")
    assert h.last_run is not None and h.last_run.cache_hits == 6
    assert len(_part_queries(statements)) == 2 and all(days[6].name in q for q in _part_queries(statements))
    assert later.drop("value").equals(full.drop("value"))
    assert later["value"].to_list() == full["value"].to_list()


def test_counts_of_files_in_parts_equal_rows_counted_in_pandas(folder: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    monkeypatch.setattr("duckharness.engine.plan.PART_ROWS", 1000)
    test_fused_run_equals_experiments_computed_from_their_own_rows(folder)


# --- fused vs alone --------------------------------------------------------------------------------

@pytest.mark.parametrize("by", [None, "day"], ids=["pooled", "by_day"])
def test_fused_run_of_all_experiments_equals_each_experiment_run_alone(folder: Path, by: str | None) -> None:
    h = harness(folder, INLINABLE | WHOLE)
    fused = h.metrics(METRICS, pairs=["pred_10s:target_10s", "pred_1s:target_1s"], by=by)
    assert set(fused["experiment"]) == {"baseline", *INLINABLE, *WHOLE}
    alone = pl.concat([h.metrics(METRICS, pairs=["pred_10s:target_10s", "pred_1s:target_1s"], by=by,
                                 experiments=[name]) for name in h.experiments.names])
    assert_close(_rows(fused), _rows(alone), rel=1e-12)


def test_fused_run_equals_experiments_computed_from_their_own_rows(folder: Path) -> None:
    """Not only self-consistent: the fused filter cells give the counts of the filtered rows."""
    h = harness(folder, INLINABLE)
    got = _rows(h.metrics(["count"], pairs=["pred_10s:target_10s"]).filter(metric="count"))
    df = read_all(folder).to_pandas()
    local = df["ts"].dt.tz_convert("US/Eastern")
    minutes = local.dt.hour.astype(int) * 60 + local.dt.minute.astype(int)
    exact = (local.dt.second == 0) & (local.dt.microsecond == 0)
    w = df[(minutes >= 570) & ((minutes < 960) | ((minutes == 960) & exact))]
    liquid = w[w["volume"] > 1000]
    expected = {"baseline": len(w), "liquid": len(liquid), "tight": int((liquid["spread"] < 0.02).sum()),
                "clipped": len(w), "clipped_pos": int((w["f_mom"] > 0).sum())}
    assert {k[0]: v for k, v in got.items()} == expected


# --- grouping consistency --------------------------------------------------------------------------

@pytest.mark.parametrize("experiments", [INLINABLE, WHOLE], ids=["inlined", "whole"])
def test_counts_by_day_and_symbol_sum_to_the_pooled_count(folder: Path, experiments: dict[str, str]) -> None:
    h = harness(folder, experiments)
    names = list(experiments)
    pooled = h.metrics(["count"], pairs=["pred_10s:target_10s"], experiments=names)
    grouped = h.metrics(["count"], pairs=["pred_10s:target_10s"], experiments=names, by=["day", "symbol"])
    assert grouped.columns == ["experiment", "pred", "target", "day", "symbol", "metric", "value"]
    for metric in ("count", "n_excluded"):
        sums = grouped.filter(metric=metric).group_by("experiment").agg(pl.col("value").sum())
        assert dict(sums.iter_rows()) == dict(pooled.filter(metric=metric).select("experiment", "value").iter_rows())
    counts = grouped.filter(metric="count")
    assert counts.select("day").n_unique() == 7 and counts.select("symbol").n_unique() == 12
    assert counts["value"].min() > 0


def test_counts_by_day_and_symbol_match_rows_grouped_in_pandas(folder: Path) -> None:
    h = Harness(folder)
    got = h.metrics(["count"], pairs=["pred_10s:target_10s"], by=["day", "symbol"]).filter(metric="count")
    df = read_all(folder).to_pandas()
    local = df["ts"].dt.tz_convert("US/Eastern")
    tod = local.dt.hour.astype(int) * 3600 + local.dt.minute.astype(int) * 60 + local.dt.second.astype(int)
    at_close = (tod == 16 * 3600) & (local.dt.microsecond == 0)
    df["day"] = [d.date() for d in local]
    w = df[(tod >= 9 * 3600 + 1800) & ((tod < 16 * 3600) | at_close)]
    expected = {(d, s): float(n) for (d, s), n in w.groupby(["day", "symbol"]).size().items()}
    assert {(r["day"], r["symbol"]): r["value"] for r in got.iter_rows(named=True)} == expected


def test_repeated_calls_on_one_harness_give_bit_identical_results(folder: Path) -> None:
    h = harness(folder, INLINABLE, workers=2)
    a = h.metrics(METRICS, by="day")
    b = h.metrics(METRICS, by="day")
    assert a.drop("value").equals(b.drop("value"))
    assert a["value"].to_list() == b["value"].to_list()


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_workers_must_be_a_whole_number_of_at_least_one(folder: Path, workers: object) -> None:
    from duckharness import InputError

    with Harness(folder, cache=False) as h, pytest.raises(InputError, match="workers must be a whole number"):
        h.metrics(["count"], workers=workers)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["value", "metric", "experiment", "__day"])
def test_grouping_by_a_column_named_like_a_result_column_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    """Before: a raw Polars DuplicateError, or for '__day' an error retried three times."""
    from duckharness.errors import InputError

    table = pa.table({"ts": pa.array([dt.datetime(2026, 3, 5, 15, tzinfo=dt.UTC)] * 4),
                      name: ["a", "b", "a", "b"], "pred_a": [0.1, 0.2, 0.3, 0.4], "target_a": [0.2, 0.1, 0.4, 0.3]})
    write_dataset(tmp_path, {"d": table}, SESSION)
    with Harness(tmp_path, cache=False) as h, pytest.raises(InputError, match=rf"Cannot group by column '{name}'"):
        h.metrics(["count"], pairs="pred_a", by=name)


# --- arguments that ask for nothing, and a closed harness -------------------------------------------

PAIR = "pred_10s:target_10s"


@pytest.mark.parametrize(("call", "argument"), [
    (lambda h: h.metrics(["r2"], pairs=[]), "pairs"),
    (lambda h: h.metrics([], pairs=PAIR), "metrics"),
    (lambda h: h.metrics(["r2"], pairs=PAIR, experiments=[]), "experiments"),
    (lambda h: h.metrics(["r2"], pairs=PAIR, by=[]), "by"),
    (lambda h: h.rank_ic(pairs=[]), "pairs"),
    (lambda h: h.rank_ic(PAIR, experiments=()), "experiments"),
    (lambda h: h.series([]), "metrics"),
    (lambda h: h.series("corr", pairs=[]), "pairs"),
    (lambda h: h.series("corr", PAIR, experiments=[]), "experiments"),
    (lambda h: h.summary([]), "metrics"),
    (lambda h: h.summary("corr", pairs=[]), "pairs"),
    (lambda h: h.summary("corr", PAIR, experiments=[]), "experiments"),
    (lambda h: h.deciles(pairs=[]), "pairs"),
    (lambda h: h.deciles(PAIR, experiments=[]), "experiments"),
    (lambda h: h.compare("mse", "baseline", "liquid", pairs=[]), "pairs"),
], ids=["metrics_pairs", "metrics_metrics", "metrics_experiments", "metrics_by", "rank_ic_pairs",
        "rank_ic_experiments", "series_metrics", "series_pairs", "series_experiments", "summary_metrics",
        "summary_pairs", "summary_experiments", "deciles_pairs", "deciles_experiments", "compare_pairs"])
def test_an_empty_list_is_an_input_error_saying_to_leave_the_argument_out(folder: Path, call: object,
                                                                         argument: str) -> None:
    """Before: a Polars ComputeError (metrics' pairs), an IndexError (rank_ic, series, summary,
    deciles), or an empty or pooled frame (experiments=[], by=[]), by method."""
    from duckharness import InputError

    asks = rf"^{argument}=(\[\]|\(\)) asks for nothing: leave {argument} out for"
    with harness(folder, {"liquid": "volume > 1000"}, cache=False) as h, pytest.raises(InputError, match=asks):
        call(h)  # type: ignore[operator]


@pytest.mark.parametrize(("kw", "why"), [
    ({"batch_size": 0}, "batch_size must be a whole number of at least 1, got 0"),
    ({"batch_size": 1.5}, "batch_size must be a whole number of at least 1, got 1.5"),
    ({"workers": 0}, "workers must be a whole number of at least 1, got 0"),
])
def test_a_harness_with_no_batch_size_or_workers_is_refused_when_created(folder: Path, kw: dict, why: str) -> None:
    """Before, batch_size=0 and workers=0 were taken as the defaults without a word."""
    from duckharness import InputError

    with pytest.raises(InputError, match=why):
        Harness(folder, cache=False, **kw)  # type: ignore[arg-type]


def test_a_run_with_batch_size_0_is_refused(folder: Path) -> None:
    from duckharness import InputError

    with Harness(folder, cache=False) as h, pytest.raises(InputError, match="batch_size must be a whole number"):
        h.metrics(["count"], pairs=PAIR, batch_size=0)


def _public_methods() -> list[str]:
    import inspect

    return sorted(n for n, v in vars(Harness).items()
                  if not n.startswith("_") and inspect.isfunction(v) and n != "close")


def test_the_public_methods_include_every_reading_method() -> None:
    assert {"metrics", "rank_ic", "series", "summary", "compare", "deciles", "sample", "sink", "export", "info",
            "relation", "lazyframe", "add_experiment", "trace"} <= set(_public_methods())


@pytest.mark.parametrize("name", _public_methods())
def test_every_method_of_a_closed_harness_says_it_is_closed(folder: Path, name: str) -> None:
    """Before, DuckDB's 'ConnectionException: Connection already closed!' (or an
    ExperimentSQLError quoting it), or a result as if open."""
    import inspect

    from duckharness import HarnessClosedError

    h = Harness(folder, cache=False)
    h.close()
    method = getattr(h, name)
    required = [p for p in inspect.signature(method).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    with pytest.raises(HarnessClosedError, match=r"This Harness of .* is closed .*; create a new one: Harness\("):
        result = method(*["baseline"] * len(required))
        if name == "trace":
            with result:
                pass


def test_a_closed_harness_refuses_experiments_and_with_and_its_repr_says_closed(folder: Path) -> None:
    from duckharness import HarnessClosedError

    with Harness(folder, cache=False) as h:
        assert not h.closed and "closed" not in repr(h)
    assert h.closed
    assert repr(h) == f"<closed Harness({str(folder)!r})>"
    h.close()  # twice is harmless
    with pytest.raises(HarnessClosedError, match="is closed"):
        h.experiments.add("liquid", "volume > 1000")
    with pytest.raises(HarnessClosedError, match="is closed"), h:
        pass
    assert isinstance(HarnessClosedError("x"), ValueError)


# --- grouping by an experiment's own columns --------------------------------------------------------

def _window_rows(folder: Path):  # type: ignore[no-untyped-def]
    df = read_all(folder).to_pandas()
    local = df["ts"].dt.tz_convert("US/Eastern")
    tod = local.dt.hour.astype(int) * 3600 + local.dt.minute.astype(int) * 60 + local.dt.second.astype(int)
    at_close = (tod == 16 * 3600) & (local.dt.microsecond == 0)
    return df[(tod >= 9 * 3600 + 1800) & ((tod < 16 * 3600) | at_close)].copy()


def _count_corr(w, key: str) -> dict[tuple[str, str], float]:  # type: ignore[no-untyped-def]
    out = {}
    for k, g in w.groupby(key):
        x, y = g["pred_10s"].to_numpy(np.longdouble), g["target_10s"].to_numpy(np.longdouble)
        dx, dy = x - x.mean(), y - y.mean()
        out[str(k), "count"] = float(len(g))
        out[str(k), "corr"] = float((dx * dy).sum() / np.sqrt((dx * dx).sum() * (dy * dy).sum()))
    return out


SECTORS = ("SELECT * REPLACE (CASE WHEN symbol < 'S006' THEN 'tech' ELSE 'energy' END AS symbol) "
           "FROM baseline")


@pytest.mark.parametrize("experiments", [["sector"], ["baseline", "sector", "sector_liquid", "sized"]],
                         ids=["alone", "with_the_source_column"])
def test_an_experiment_that_replaces_the_grouping_column_is_grouped_by_its_own_values(
        folder: Path, experiments: list[str]) -> None:
    """Before: grouped by the source's symbol, silently (12 symbols for an experiment of 2 sectors)."""
    h = harness(folder, {"sector": SECTORS, "sector_liquid": "SELECT * FROM sector WHERE volume > 1000",
                         "sized": "SELECT * REPLACE (lower(symbol) AS symbol) FROM baseline"})
    got = h.metrics(["count", "corr"], pairs=PAIR, experiments=experiments, by="symbol")
    w = _window_rows(folder)
    w["sector"] = np.where(w["symbol"] < "S006", "tech", "energy")
    w["lower"] = w["symbol"].str.lower()
    expected_by = {"baseline": (w, "symbol"), "sector": (w, "sector"),
                   "sector_liquid": (w[w["volume"] > 1000], "sector"), "sized": (w, "lower")}
    for name in experiments:
        rows = got.filter(pl.col("experiment") == name, pl.col("metric").is_in(["count", "corr"]))
        values = {(r["symbol"], r["metric"]): r["value"] for r in rows.iter_rows(named=True)}
        expected = _count_corr(*expected_by[name])
        assert values.keys() == expected.keys(), name
        assert values == pytest.approx(expected, rel=1e-12), name


def test_grouping_by_a_column_an_experiment_computes(folder: Path) -> None:
    """Before: refused ('a column of experiment ..., not of the source')."""
    h = harness(folder, {"sized": "SELECT *, CASE WHEN volume > 1500 THEN 'big' ELSE 'small' END AS size "
                                  "FROM baseline",
                         "sized_tight": "SELECT * FROM sized WHERE spread < 0.02"})
    statements: list[str] = []
    with h.trace(statements.append):
        got = h.metrics(["count", "corr"], pairs=PAIR, experiments=["sized", "sized_tight"], by="size")
    w = _window_rows(folder)
    w["size"] = np.where(w["volume"] > 1500, "big", "small")
    for name, rows in (("sized", w), ("sized_tight", w[w["spread"] < 0.02])):
        part = got.filter(pl.col("experiment") == name, pl.col("metric").is_in(["count", "corr"]))
        values = {(r["size"], r["metric"]): r["value"] for r in part.iter_rows(named=True)}
        assert values == pytest.approx(_count_corr(rows, "size"), rel=1e-12), name
    # both experiments define `size` alike: one fused scan answers them (one query per file, no views)
    assert sum("READ_PARQUET" in s and "GROUP BY" in s for s in statements) == 7
    assert not any("CREATE" in s.upper() for s in statements)


def test_grouping_by_a_column_some_experiments_lack_names_the_first_of_them(folder: Path) -> None:
    from duckharness import UnknownColumnError

    h = harness(folder, {"sized": "SELECT *, volume > 1500 AS size FROM baseline"})
    with pytest.raises(UnknownColumnError, match="experiment 'baseline' has no such column") as info:
        h.metrics(["count"], pairs=PAIR, by="size")
    assert info.value.experiment == "baseline" and info.value.column == "size"
    with pytest.raises(UnknownColumnError, match=r"'nosuch': no such column\. Use 'day'"):
        h.metrics(["count"], pairs=PAIR, by="nosuch")
