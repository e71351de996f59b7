"""Metric files: the shipped ones parse and are plain DuckDB SQL; users' folders; malformed files."""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from conftest import SESSION, read_all, write_dataset

from duckharness import Harness, MetricError, MetricLibrary, UnknownMetricError
from duckharness.demo import one_day, trading_days
from duckharness.metrics.library import DEFAULT_METRICS, builtin_metric_dir, load_metric_file, parse_metric

SHIPPED = sorted(builtin_metric_dir().glob("*.sql"))
EASTERN = zoneinfo.ZoneInfo("America/New_York")
PAIR = "pred_10s:target_10s"


def _r2(p: np.ndarray, t: np.ndarray) -> float:
    return 1 - np.sum((t - p) ** 2) / np.sum((t - t.mean()) ** 2)


# Independent numpy definitions of every shipped metric.
REFERENCE: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "count": lambda p, t: float(len(p)),
    "bias": lambda p, t: float(np.mean(p - t)),
    "mae": lambda p, t: float(np.mean(np.abs(p - t))),
    "mse": lambda p, t: float(np.mean((p - t) ** 2)),
    "rmse": lambda p, t: float(np.sqrt(np.mean((p - t) ** 2))),
    "r2": _r2,
    "corr": lambda p, t: float(np.corrcoef(p, t)[0, 1]),
    "hit_rate": lambda p, t: float(np.mean(np.sign(p) == np.sign(t))),
}

MAX_ABS_ERROR = """\
-- metric: max_abs_error
-- description: The largest absolute error.
-- stats
SELECT max(abs(pred - target)) AS worst, count(*) AS n FROM input;
-- merge
SELECT max(worst) AS worst, sum(n) AS n FROM partials;
-- final
SELECT worst AS value FROM merged;
"""


def sections(text: str) -> dict[str, str]:
    """Split a metric file at its ``-- stats`` / ``-- merge`` / ``-- final`` marker lines."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^\s*--\s*(stats|merge|final)\s*:?\s*$", line, re.IGNORECASE)
        if m:
            current = m.group(1).lower()
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return {k: "\n".join(v).strip().rstrip(";") for k, v in out.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("metrics") / "bt"
    tables = {d.isoformat(): one_day(d, 1200, rng, symbols=10) for d in trading_days(dt.date(2026, 3, 5), 3)}
    write_dataset(folder, tables, SESSION)
    return folder


@pytest.fixture(scope="module")
def cols(data: Path) -> dict[str, np.ndarray]:
    t = read_all(data)
    out = {n: t[n].to_numpy(zero_copy_only=False) for n in t.column_names if n != "ts"}
    local = [x.astimezone(EASTERN) for x in t["ts"].to_pylist()]
    out["in_window"] = np.array([dt.time(9, 30) <= x.time() <= dt.time(16) for x in local])
    out["day"] = np.array([x.date() for x in local])
    return out


@pytest.fixture(scope="module")
def user_metrics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("user_metrics")
    (folder / "max_abs_error.sql").write_text(MAX_ABS_ERROR)
    return folder


# -- the shipped metric files -------------------------------------------------------------------------

def test_every_shipped_metric_has_a_numpy_reference() -> None:
    assert sorted(p.stem for p in SHIPPED) == sorted(REFERENCE)
    assert set(DEFAULT_METRICS) <= set(REFERENCE)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_metric_file_parses(path: Path) -> None:
    m = load_metric_file(path)
    assert m.name == path.stem
    assert m.description
    assert m.stat_names
    assert set(m.merge) == set(m.stat_names)
    assert set(m.merge.values()) <= {"sum", "min", "max"}
    assert m.path == str(path)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_metric_is_plain_duckdb_sql(path: Path) -> None:
    """Run the file's stats and final queries as they are, with input = a view and merged = the stats."""
    rng = np.random.default_rng(11)
    n = 400
    target = rng.standard_normal(n)
    pred = 0.5 * target + rng.standard_normal(n) * 0.8
    pred[:5] = 0.0  # a few exact zeros for hit_rate's sign rule
    target[3:8] = 0.0
    parts = sections(path.read_text())
    con = duckdb.connect()
    con.register("data", pa.table({"pred": pred, "target": target}))
    con.execute("CREATE VIEW input AS SELECT pred, target, pred AS pred_c, target AS target_c FROM data")
    stats = con.execute(parts["stats"]).fetchall()
    assert len(stats) == 1
    con.execute(f"CREATE TABLE merged AS {parts['stats']}")
    result = con.execute(parts["final"])
    assert [d[0] for d in result.description] == ["value"]
    (value,), = result.fetchall()
    assert float(value) == pytest.approx(REFERENCE[path.stem](pred, target), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_metric_merge_of_two_halves_is_plain_sql(path: Path) -> None:
    """Stats of two halves, merged with the file's merge rule, give the metric of all rows."""
    rng = np.random.default_rng(12)
    pred, target = rng.standard_normal(300), rng.standard_normal(300) + 0.3
    m = load_metric_file(path)
    parts = sections(path.read_text())
    con = duckdb.connect()
    con.register("data", pa.table({"pred": pred, "target": target, "half": np.arange(300) % 2}))
    for h in (0, 1):
        con.execute(f"CREATE OR REPLACE VIEW input AS SELECT pred, target, pred AS pred_c, target AS target_c "
                    f"FROM data WHERE half = {h}")
        con.execute(f"CREATE TABLE part{h} AS {parts['stats']}")
    merge = parts.get("merge") or "SELECT " + ", ".join(f"{m.merge[s]}({s}) AS {s}" for s in m.stat_names) \
        + " FROM partials"
    con.execute("CREATE VIEW partials AS SELECT * FROM part0 UNION ALL SELECT * FROM part1")
    con.execute(f"CREATE TABLE merged AS {merge}")
    (value,), = con.execute(parts["final"]).fetchall()
    assert float(value) == pytest.approx(REFERENCE[path.stem](pred, target), rel=1e-9, abs=1e-12)


def test_shipped_metrics_through_harness_match_numpy(data: Path, cols: dict[str, np.ndarray]) -> None:
    with Harness(data) as h:
        df = h.metrics(sorted(REFERENCE), pairs=[PAIR])
    m = cols["in_window"]
    p, t = cols["pred_10s"][m], cols["target_10s"][m]
    got = dict(zip(df["metric"].to_list(), df["value"].to_list(), strict=True))
    for name, ref in REFERENCE.items():
        assert got[name] == pytest.approx(ref(p, t), rel=1e-9), name
    assert got["n_excluded"] == 0


def _pred_table(n: int = 500) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    ts = np.datetime64("2026-03-05T15:00:00", "us") + np.arange(n).astype("timedelta64[s]")
    target = rng.standard_normal(n)
    pred = target * 0.5 + rng.standard_normal(n)
    return pa.table({"ts": pa.array(ts, pa.timestamp("us", tz="UTC")), "target_x": target}), pred, target


def test_rows_with_null_pred_are_excluded_and_counted(tmp_path: Path) -> None:
    table, pred, target = _pred_table()
    ok = np.ones(len(pred), bool)
    ok[::7] = False
    write_dataset(tmp_path / "d", {"a": table.append_column("pred_x", pa.array(pred, mask=~ok))}, {})
    with Harness(tmp_path / "d") as h:
        df = h.metrics(["count", "mse"], pairs=["pred_x:target_x"])
    got = dict(zip(df["metric"].to_list(), df["value"].to_list(), strict=True))
    assert got["count"] == ok.sum()
    assert got["n_excluded"] == len(pred) - ok.sum()
    assert got["mse"] == pytest.approx(np.mean((pred[ok] - target[ok]) ** 2), rel=1e-9)


def test_rows_with_nan_pred_are_excluded_and_counted(tmp_path: Path) -> None:
    table, pred, target = _pred_table()
    pred[::10] = np.nan  # NaN values in a Parquet DOUBLE column, as pandas/numpy write them
    ok = ~np.isnan(pred)
    write_dataset(tmp_path / "d", {"a": table.append_column("pred_x", pa.array(pred))}, {})
    with Harness(tmp_path / "d") as h:
        df = h.metrics(["count", "mse"], pairs=["pred_x:target_x"])
    got = dict(zip(df["metric"].to_list(), df["value"].to_list(), strict=True))
    assert got["count"] == ok.sum()
    assert got["n_excluded"] == len(pred) - ok.sum()
    assert got["mse"] == pytest.approx(np.mean((pred[ok] - target[ok]) ** 2), rel=1e-9)


# -- a user's metric folder ---------------------------------------------------------------------------

def test_user_metric_with_max_merge_matches_numpy(data: Path, cols: dict[str, np.ndarray],
                                                  user_metrics: Path) -> None:
    with Harness(data, metric_dirs=[user_metrics]) as h:
        assert "max_abs_error" in h.metric_library.names
        assert h.metric_library.get("max_abs_error").merge == {"worst": "max", "n": "sum"}
        pooled = h.metrics(["max_abs_error"], pairs=[PAIR])
        whole = h.metrics(["max_abs_error"], pairs=[PAIR], window=False, batch_size=2)
        per_day = h.metrics(["max_abs_error"], pairs=[PAIR], by="day")
    err = np.abs(cols["pred_10s"] - cols["target_10s"])
    m = cols["in_window"]
    assert pooled.filter(pooled["metric"] == "max_abs_error")["value"][0] == np.max(err[m])
    assert whole.filter(whole["metric"] == "max_abs_error")["value"][0] == np.max(err)
    per_day = per_day.filter(per_day["metric"] == "max_abs_error")
    expected = {d: np.max(err[m & (cols["day"] == d)]) for d in sorted(set(cols["day"][m]))}
    assert dict(zip(per_day["day"].to_list(), per_day["value"].to_list(), strict=True)) == expected


def test_user_metric_can_override_a_shipped_one_with_a_warning_naming_its_file(data: Path, tmp_path: Path) -> None:
    from duckharness.errors import DuckHarnessWarning

    (tmp_path / "count.sql").write_text("-- stats\nSELECT count(*) AS n FROM input;\n"
                                        "-- final\nSELECT n * 2 AS value FROM merged;\n")
    with pytest.warns(DuckHarnessWarning, match=f"Metric 'count' from {tmp_path / 'count.sql'} replaces the one "
                      "from the shipped metrics"):
        h = Harness(data, metric_dirs=[tmp_path])
    with h, Harness(data) as plain:
        doubled = h.metrics(["count"], pairs=[PAIR])["value"][0]
        single = plain.metrics(["count"], pairs=[PAIR])["value"][0]
    assert doubled == 2 * single


def test_a_metric_of_a_later_folder_replacing_an_earlier_ones_names_both(data: Path, tmp_path: Path) -> None:
    from duckharness.errors import DuckHarnessWarning

    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "mine.sql").write_text(MAX_ABS_ERROR.replace("max_abs_error", "mine", 1))
    with pytest.warns(DuckHarnessWarning, match=f"from {tmp_path / 'two' / 'mine.sql'} replaces the one from "
                      f"{tmp_path / 'one' / 'mine.sql'}"):
        Harness(data, metric_dirs=[tmp_path / "one", tmp_path / "two"]).close()


def test_the_cli_prints_the_override_warning_as_one_line(data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from duckharness.cli import main

    (tmp_path / "mse.sql").write_text("-- metric: mse\n-- stats\nSELECT count(*) AS n FROM input;\n"
                                      "-- final\nSELECT n AS value FROM merged;\n")
    assert main(["metrics", str(data), "--metric-dir", str(tmp_path), "--metric", "mse", "--pair", PAIR,
                 "--no-cache"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"Warning: Metric 'mse' from {tmp_path / 'mse.sql'} replaces the one from the shipped")


def test_comments_after_each_query_of_a_metric_file_are_ignored(data: Path, cols: dict[str, np.ndarray],
                                                                tmp_path: Path) -> None:
    (tmp_path / "worst.sql").write_text("""\
-- metric: worst
-- stats
SELECT max(abs(pred - target)) AS worst,
       count(*) FILTER (WHERE 'not -- a comment' <> '/* nor this */') AS n
FROM input;   -- it's the largest error
-- merge
SELECT max(worst) AS worst, sum(n) AS n FROM partials; /* max of the maxima */
-- final
SELECT worst AS value FROM merged;;
-- a comment line after the last query
""")
    with Harness(data, metric_dirs=[tmp_path]) as h:
        assert h.metric_library.get("worst").merge == {"worst": "max", "n": "sum"}
        df = h.metrics(["worst"], pairs=[PAIR])
    m = cols["in_window"]
    assert df.filter(df["metric"] == "worst")["value"][0] == np.max(np.abs(cols["pred_10s"] - cols["target_10s"])[m])


def test_missing_metric_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(MetricError, match="does not exist") as info:
        MetricLibrary([tmp_path / "nope"])
    assert info.value.path == str(tmp_path / "nope")


# -- malformed metric files ---------------------------------------------------------------------------

MALFORMED = {
    "missing_final": ("-- stats\nSELECT count(*) AS n FROM input;\n", r"missing the '-- final' section"),
    "not_aggregate": ("-- stats\nSELECT pred - target AS e FROM input;\n-- final\nSELECT e AS value FROM merged;\n",
                      r"stats column 'e' is not an aggregate"),
    "unknown_column": ("-- stats\nSELECT sum(volume) AS v FROM input;\n-- final\nSELECT v AS value FROM merged;\n",
                       r"stats column 'v' reads column 'volume'"),
    "two_final_columns": ("-- stats\nSELECT count(*) AS n FROM input;\n"
                          "-- final\nSELECT n AS value, n * 2 AS twice FROM merged;\n",
                          r"exactly one column named value"),
    "avg_merge": ("-- stats\nSELECT sum(pred) AS s FROM input;\n-- merge\nSELECT avg(s) AS s FROM partials;\n"
                  "-- final\nSELECT s AS value FROM merged;\n",
                  r"merge column 's' must be sum\(s\), min\(s\) or max\(s\)"),
    "missing_stats": ("-- final\nSELECT 1 AS value FROM merged;\n", r"missing the '-- stats' section"),
    "final_unknown_stat": ("-- stats\nSELECT count(*) AS n FROM input;\n-- final\nSELECT m AS value FROM merged;\n",
                           r"final query reads 'm'"),
    "stats_unnamed": ("-- stats\nSELECT count(*) FROM input;\n-- final\nSELECT 1 AS value FROM merged;\n",
                      r"needs a name"),
    "stats_from_other": ("-- stats\nSELECT count(*) AS n FROM data;\n-- final\nSELECT n AS value FROM merged;\n",
                         r"must read FROM input"),
    "stats_unparsable": ("-- stats\nSELECT count(* AS n FROM input;\n-- final\nSELECT n AS value FROM merged;\n",
                         r"does not parse"),
    "final_aggregates": ("-- stats\nSELECT count(*) AS n FROM input;\n-- final\nSELECT sum(n) AS value FROM merged;\n",
                         r"may not aggregate"),
    "stats_only_comments": ("-- stats\n-- to do\n;\n-- final\nSELECT 1 AS value FROM merged;\n",
                            r"missing the '-- stats' section"),
    "two_statements_around_a_comment": ("-- stats\nSELECT count(*) AS n FROM input; -- and\n"
                                        "SELECT count(*) AS m FROM input;\n-- final\nSELECT n AS value FROM merged;\n",
                                        r"stats query does not parse: expected one SQL statement, found 2"),
    "sql_before_marker": ("SELECT 1;\n-- stats\nSELECT count(*) AS n FROM input;\n"
                          "-- final\nSELECT n AS value FROM merged;\n",
                          r"SQL before the first"),
}


@pytest.mark.parametrize("stem", sorted(MALFORMED))
def test_malformed_metric_file_is_named_in_metric_error(tmp_path: Path, stem: str) -> None:
    text, why = MALFORMED[stem]
    path = tmp_path / f"{stem}.sql"
    path.write_text(text)
    with pytest.raises(MetricError, match=why) as info:
        MetricLibrary([tmp_path])
    assert str(path) in str(info.value)
    assert info.value.path == str(path)


def test_malformed_metric_fails_when_the_harness_opens(data: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.sql"
    path.write_text(MALFORMED["avg_merge"][0])
    with pytest.raises(MetricError, match=re.escape(str(path))):
        Harness(data, metric_dirs=[tmp_path])


def test_two_files_defining_one_metric_name_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text("-- metric: same\n" + MAX_ABS_ERROR.split("\n", 1)[1])
    (tmp_path / "b.sql").write_text("-- metric: same\n" + MAX_ABS_ERROR.split("\n", 1)[1])
    with pytest.raises(MetricError, match=r"'same' is defined twice") as info:
        MetricLibrary([tmp_path])
    assert info.value.metric == "same"


def test_parse_metric_default_merge_is_sum() -> None:
    m = parse_metric("-- stats\nSELECT count(*) AS n, sum(pred) - 2 * sum(target) / 4 AS s FROM input;\n"
                     "-- final\nSELECT s / n AS value FROM merged;\n", path="lo.sql")
    assert m.name == "lo"
    assert dict(m.merge) == {"n": "sum", "s": "sum"}


@pytest.mark.parametrize(("stat", "rule"), [
    ("min(pred)", None),  # a minimum summed over batches
    ("avg(abs(pred - target))", None),
    ("median(pred)", None),
    ("sum(pred) / count(*)", None),  # a ratio of sums: divide in the final query
    ("sum(pred) * sum(target)", None),
    ("sqrt(sum(pred * pred))", None),
    ("CAST(string_agg(CAST(pred AS VARCHAR), ',') AS DOUBLE)", None),
    ("count(DISTINCT sign(target))", None),  # distinct values of each batch do not add up
    ("sum(DISTINCT pred)", None),
    ("fsum(pred)", "min"),
    ("fsum(DISTINCT abs(sign(pred)))", None),
    ("sum(pred)", "max"),
    ("max(pred)", "min"),
])
def test_a_stats_column_its_merge_rule_cannot_combine_is_refused(stat: str, rule: str | None) -> None:
    """Partials of batches (files, parts of a file) are combined by the column's merge rule; a
    column that rule cannot combine would give a wrong pooled value, so the file is refused."""
    merge = f"-- merge\nSELECT {rule}(s) AS s FROM partials;\n" if rule else ""
    text = f"-- stats\nSELECT {stat} AS s FROM input;\n{merge}-- final\nSELECT s AS value FROM merged;\n"
    with pytest.raises(MetricError, match=rf"m\.sql: stats column 's' .* cannot be merged by {rule or 'sum'}"):
        parse_metric(text, path="m.sql")


@pytest.mark.parametrize(("stat", "rule"), [
    ("count(*) FILTER (WHERE pred > 0)", "sum"), ("-sum(pred) + count_if(pred > target)", "sum"),
    ("CAST(sum(pred) AS DOUBLE) * 0.5", "sum"), ("min(pred) FILTER (WHERE target > 0)", "min"),
    ("max(abs(pred))", "max"), ("max(DISTINCT pred)", "max"), ("fsum(pred) - kahan_sum(target)", "sum"),
])
def test_stats_columns_their_merge_rule_combines_are_accepted(stat: str, rule: str) -> None:
    text = (f"-- stats\nSELECT {stat} AS s FROM input;\n-- merge\nSELECT {rule}(s) AS s FROM partials;\n"
            f"-- final\nSELECT s AS value FROM merged;\n")
    assert dict(parse_metric(text, path="m.sql").merge) == {"s": rule}


def test_a_per_batch_mean_would_be_wrong_pooled_and_is_refused_when_loaded(data: Path, tmp_path: Path) -> None:
    (tmp_path / "mae2.sql").write_text("-- metric: mae2\n-- stats\nSELECT avg(abs(pred - target)) AS m FROM input;\n"
                                       "-- final\nSELECT m AS value FROM merged;\n")
    with pytest.raises(MetricError, match=r"mae2\.sql: stats column 'm' .*cannot be merged by sum") as info:
        Harness(data, metric_dirs=[tmp_path])
    assert info.value.path == str(tmp_path / "mae2.sql")


# -- unknown metric names -----------------------------------------------------------------------------

def test_unknown_metric_lists_available_ones(data: Path, user_metrics: Path) -> None:
    with Harness(data, metric_dirs=[user_metrics]) as h, \
            pytest.raises(UnknownMetricError, match=r"Unknown metric 'r3'") as info:
        h.metrics(["r2", "r3"], pairs=[PAIR])
    message = str(info.value)
    for name in [*REFERENCE, "max_abs_error"]:
        assert name in message
    assert info.value.metric == "r3"
    assert isinstance(info.value, MetricError)


def test_unknown_metric_from_library_get() -> None:
    with pytest.raises(UnknownMetricError, match=r"Available: bias, corr, count"):
        MetricLibrary().get("nope")


@pytest.mark.parametrize("final", ["'abc'", "[n]", "CAST('x' || n AS DOUBLE)"], ids=["text", "list", "bad_cast"])
def test_a_final_query_that_gives_no_number_is_a_metric_error_naming_the_file(
        data: Path, tmp_path: Path, final: str) -> None:
    path = tmp_path / "odd.sql"
    path.write_text(f"-- stats\nSELECT count(*) AS n FROM input;\n-- final\nSELECT {final} AS value FROM merged;\n")
    with (
        Harness(data, metric_dirs=[tmp_path]) as h,
        pytest.raises(MetricError, match=r"Metric 'odd' \(.*odd\.sql\): its final query failed") as info,
    ):
        h.metrics(["count", "odd"], pairs=[PAIR])
    assert info.value.metric == "odd" and info.value.path == str(path)


def test_a_long_driver_message_is_cut_to_one_short_line(data: Path, tmp_path: Path) -> None:
    (tmp_path / "agg.sql").write_text(
        "-- stats\nSELECT sum(CAST(CAST(pred AS VARCHAR) || 'x' AS DOUBLE)) AS s FROM input;\n"
        "-- final\nSELECT s AS value FROM merged;\n")
    with Harness(data, metric_dirs=[tmp_path]) as h, pytest.raises(MetricError, match="Conversion Error") as info:
        h.metrics(["count", "agg"], pairs=[PAIR])
    assert len(str(info.value)) < 600 and "\n" not in str(info.value)
    assert str(info.value).startswith(f"Metric 'agg' ({tmp_path / 'agg.sql'}): its stats failed on ")
    assert info.value.metric == "agg"


def test_a_metric_folder_spelled_two_ways_is_read_once(data: Path, tmp_path: Path) -> None:
    import warnings

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "k.sql").write_text("-- stats\nSELECT count(*) AS n FROM input;\n"
                                  "-- final\nSELECT n AS value FROM merged;\n")
    (tmp_path / "link").symlink_to(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = Harness(data, metric_dirs=[folder, f"{folder}/", tmp_path / "link"])
    assert "k" in h.metric_library.names
    h.close()
