"""Export: the chain as a SQL script and a DuckDB database, checked through the real DuckDB CLI.

Every CLI query runs in a subprocess whose working directory is a different temporary folder than
the one holding the data and the exported files (so relative paths would break), with ``HOME``
pointed at that empty folder (so no ``~/.duckdbrc`` takes part).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import os
import re
import shutil
import subprocess
import sys
import zoneinfo
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from conftest import SESSION, read_all, write_dataset

import duckharness
from duckharness import Harness
from duckharness.cli import main
from duckharness.demo import DEMO_EXPERIMENTS, one_day, trading_days
from duckharness.metrics.library import builtin_metric_dir
from duckharness.outputs.export import ExportResult

PRED, TARGET = "pred_10s", "target_10s"
PAIR = f"{PRED}:{TARGET}"
EASTERN = zoneinfo.ZoneInfo("America/New_York")
PACKAGED = sorted(p.stem for p in builtin_metric_dir().glob("*.sql"))
USER_METRIC = "max_abs_error"
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
# SQL experiments of the main chain: filters, a chained filter, column-changing steps (one of them
# chained and dropping columns), and one that needs all rows at once (a window function).
EXPERIMENTS = {
    "liquid": ("volume > 1000", None),
    "tight": ("SELECT * FROM liquid WHERE spread < 0.02", None),
    "clipped": ("SELECT * REPLACE (greatest(least(pred_10s, 0.5), -0.5) AS pred_10s) FROM baseline", None),
    "doubled": ("SELECT ts, symbol, 2 * pred_10s AS pred_10s, target_10s FROM tight", None),
    "every_other": (
        "SELECT * FROM baseline QUALIFY row_number() OVER (PARTITION BY symbol ORDER BY ts, f_imb) % 2 = 0",
        None,
    ),
}
SECRET_KEY, SECRET_VALUE = "AKIAEXAMPLEKEY123", "s3cr3t-VALUE-xyz"
HEX64 = re.compile(r"^[0-9a-f]{64}$")


# -- the DuckDB CLI -------------------------------------------------------------------------------------

def _find_duckdb() -> str | None:
    here = os.path.dirname(sys.executable)
    found = shutil.which("duckdb", path=here)
    if found:
        return found
    for name in ("duckdb", "duckdb.exe"):
        candidate = os.path.join(here, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


DUCKDB = _find_duckdb()
needs_cli = pytest.mark.skipif(DUCKDB is None, reason="DuckDB CLI not installed next to the Python executable")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def duckdb_cli(target: Path, query: str, *, cwd: Path, tz: str | None = None) -> list[dict[str, str]]:
    """Run ``query`` in the DuckDB CLI on an exported script (``-init``) or database; CSV rows."""
    assert DUCKDB is not None
    if target.suffix == ".sql":
        args = [DUCKDB, "-init", str(target), "-csv", "-c", query]
    else:
        args = [DUCKDB, "-readonly", "-csv", str(target), "-c", query]
    assert cwd.resolve() != target.parent.resolve()
    env = {**os.environ, "HOME": str(cwd), "USERPROFILE": str(cwd)}
    if tz is not None:
        env["TZ"] = tz
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    out, err = ANSI.sub("", proc.stdout), ANSI.sub("", proc.stderr)
    err = "\n".join(ln for ln in err.splitlines() if "Loading resources" not in ln)
    assert proc.returncode == 0, f"duckdb failed ({proc.returncode}) on {query!r}:\n{err}\n{out}"
    assert not re.search(r"\bError\b", err), f"duckdb reported an error on {query!r}:\n{err}"
    lines = [ln for ln in out.splitlines() if ln.strip() and "Loading resources" not in ln]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


def num(text: str) -> float | None:
    return None if text in ("", "NULL") else float(text)


def close(a: float | None, b: float | None, rel: float = 1e-9) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return a is None and (b is None or math.isnan(b))
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-300)


def metric_select(metrics: Sequence[str], day: bool) -> str:
    cols = [f"dh_{m}({PRED}, {TARGET}) AS {m}" for m in metrics]
    return ", ".join((["dh_day(ts) AS day"] if day else []) + cols)


def union_query(experiments: Sequence[str], metrics: Sequence[str], *, day: bool) -> str:
    """One query over all experiments: per experiment (and day), each metric via its macro."""
    parts = []
    for e in experiments:
        q = f"SELECT '{e}' AS experiment, {metric_select(metrics, day)} FROM {e}"
        parts.append(q + (" GROUP BY day" if day else ""))
    return " UNION ALL ".join(parts)


def api_values(df: pl.DataFrame) -> dict[tuple[str, ...], float | None]:
    """``{(experiment, [day,] metric): value}`` from a tidy metrics frame (n_excluded dropped)."""
    df = df.filter(pl.col("metric") != "n_excluded")
    out: dict[tuple[str, ...], float | None] = {}
    for row in df.iter_rows(named=True):
        key = (row["experiment"],) + ((row["day"].isoformat(),) if "day" in row else ()) + (row["metric"],)
        out[key] = row["value"]
    return out


def cli_values(rows: list[dict[str, str]], metrics: Sequence[str]) -> dict[tuple[str, ...], float | None]:
    out: dict[tuple[str, ...], float | None] = {}
    for r in rows:
        head = (r["experiment"],) + ((r["day"],) if "day" in r else ())
        for m in metrics:
            out[(*head, m)] = num(r[m])
    return out


def assert_same_values(cli: Mapping[tuple[str, ...], float | None], api: Mapping[tuple[str, ...], float | None],
                       rel: float = 1e-9) -> None:
    assert set(cli) == set(api)
    bad = {k: (cli[k], api[k]) for k in api if not close(cli[k], api[k], rel)}
    assert not bad, f"{len(bad)} of {len(api)} values differ (cli, api): {dict(list(bad.items())[:8])}"


# -- data -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four days x 2000 rows crossing the 2026-03-08 DST switch, 09:30-16:00 US/Eastern window."""
    rng = np.random.default_rng(11)
    out = tmp_path_factory.mktemp("export_data") / "bt"
    tables = {d.isoformat(): one_day(d, 2000, rng, symbols=10) for d in trading_days(dt.date(2026, 3, 4), 4)}
    write_dataset(out, tables, SESSION)
    return out


@pytest.fixture(scope="module")
def cols(folder: Path) -> dict[str, np.ndarray]:
    """The data as numpy columns, with the session window and local day computed independently."""
    t = read_all(folder)
    out = {n: t[n].to_numpy(zero_copy_only=False) for n in t.column_names if n != "ts"}
    local = [x.astimezone(EASTERN) for x in t["ts"].to_pylist()]
    out["ts_utc"] = np.array([x.timestamp() for x in t["ts"].to_pylist()])
    out["in_window"] = np.array([dt.time(9, 30) <= x.time() <= dt.time(16) for x in local])
    out["day"] = np.array([x.date().isoformat() for x in local])
    return out


@pytest.fixture(scope="module")
def user_metrics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("user_metrics")
    (d / f"{USER_METRIC}.sql").write_text(MAX_ABS_ERROR)
    return d


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory of every CLI subprocess: holds neither data nor exported files."""
    return tmp_path_factory.mktemp("elsewhere")


def add_all(h: Harness, experiments: Mapping[str, tuple[str, str | None]]) -> None:
    for name, (step, base) in experiments.items():
        h.add_experiment(name, step, base)


@dataclass
class Exported:
    sql: Path
    db: Path
    result: ExportResult
    pooled: pl.DataFrame
    by_day: pl.DataFrame


@pytest.fixture(scope="module")
def exported(folder: Path, user_metrics: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    out = tmp_path_factory.mktemp("export_out")
    with Harness(folder, metric_dirs=[user_metrics]) as h:
        add_all(h, EXPERIMENTS)
        metrics = [*PACKAGED, USER_METRIC]
        pooled = h.metrics(metrics, pairs=[PAIR])
        by_day = h.metrics(metrics, pairs=[PAIR], by="day")
        result = h.export(sql=out / "chain.sql", db=out / "chain.duckdb")
    yield Exported(out / "chain.sql", out / "chain.duckdb", result, pooled, by_day)


FILES = ["sql", "db"]


def target_of(e: Exported, kind: str) -> Path:
    return e.sql if kind == "sql" else e.db


# -- what is written --------------------------------------------------------------------------------------

def test_result_lists_views_and_macros(exported: Exported) -> None:
    r = exported.result
    assert r.sql_path == os.path.abspath(exported.sql) and r.db_path == os.path.abspath(exported.db)
    assert exported.sql.is_file() and exported.db.is_file()
    assert r.views == ["baseline", *EXPERIMENTS]
    assert sorted(r.macros) == sorted(["dh_day", *(f"dh_{m}" for m in [*PACKAGED, USER_METRIC])])
    assert r.skipped == {}
    assert HEX64.match(r.chain_hash)
    # absolute paths to the data files, never relative ones
    text = exported.sql.read_text()
    for p in re.findall(r"'([^']*\.parquet)'", text):
        assert os.path.isabs(p) and os.path.isfile(p), p


@needs_cli
@pytest.mark.parametrize("kind", FILES)
def test_catalog_in_cli_session(exported: Exported, elsewhere: Path, kind: str) -> None:
    rows = duckdb_cli(target_of(exported, kind),
                      "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name", cwd=elsewhere)
    assert sorted(r["view_name"] for r in rows) == sorted(["baseline", *EXPERIMENTS, "duckharness_export"])
    rows = duckdb_cli(target_of(exported, kind),
                      "SELECT DISTINCT function_name FROM duckdb_functions() "
                      "WHERE function_name LIKE 'dh\\_%' ESCAPE '\\'", cwd=elsewhere)
    assert sorted(r["function_name"] for r in rows) == sorted(exported.result.macros)


# -- counts -----------------------------------------------------------------------------------------------

def numpy_counts(c: Mapping[str, np.ndarray]) -> dict[str, int]:
    w = c["in_window"]
    liquid = w & (c["volume"] > 1000)
    tight = liquid & (c["spread"] < 0.02)
    # every_other: per symbol, rows of the window in (ts, f_imb) order, keep ranks 2, 4, ...
    keep = 0
    for s in np.unique(c["symbol"][w]):
        m = w & (c["symbol"] == s)
        keep += int(m.sum()) // 2
    return {"baseline": int(w.sum()), "liquid": int(liquid.sum()), "tight": int(tight.sum()),
            "clipped": int(w.sum()), "doubled": int(tight.sum()), "every_other": keep}


@needs_cli
@pytest.mark.parametrize("kind", FILES)
def test_counts_match_python_api_and_numpy(exported: Exported, cols: dict[str, np.ndarray], elsewhere: Path,
                                           kind: str) -> None:
    names = ["baseline", *EXPERIMENTS]
    query = "SELECT " + ", ".join(f"(SELECT count(*) FROM {n}) AS {n}" for n in names)
    (row,) = duckdb_cli(target_of(exported, kind), query, cwd=elsewhere)
    cli = {n: int(row[n]) for n in names}
    api_df = exported.pooled.filter(pl.col("metric") == "count")
    api = {e: int(v) for e, v in zip(api_df["experiment"], api_df["value"], strict=True)}
    assert cli == api
    assert cli == numpy_counts(cols)
    assert 0 < cli["tight"] < cli["liquid"] < cli["baseline"] < len(cols["in_window"])


# -- metric macros -------------------------------------------------------------------------------------

@needs_cli
@pytest.mark.parametrize("kind", FILES)
def test_every_packaged_metric_pooled_matches_python_api(exported: Exported, elsewhere: Path, kind: str) -> None:
    rows = duckdb_cli(target_of(exported, kind), union_query(["baseline", *EXPERIMENTS], PACKAGED, day=False),
                      cwd=elsewhere)
    api = {k: v for k, v in api_values(exported.pooled).items() if k[-1] in PACKAGED}
    assert len(api) == (1 + len(EXPERIMENTS)) * len(PACKAGED)
    assert_same_values(cli_values(rows, PACKAGED), api)


@needs_cli
@pytest.mark.parametrize("kind", FILES)
def test_every_packaged_metric_by_day_matches_python_api(exported: Exported, cols: dict[str, np.ndarray],
                                                         elsewhere: Path, kind: str) -> None:
    rows = duckdb_cli(target_of(exported, kind), union_query(["baseline", *EXPERIMENTS], PACKAGED, day=True),
                      cwd=elsewhere)
    api = {k: v for k, v in api_values(exported.by_day).items() if k[-1] in PACKAGED}
    assert {r["day"] for r in rows} == set(cols["day"][cols["in_window"]])
    assert len({r["day"] for r in rows}) == 4
    assert_same_values(cli_values(rows, PACKAGED), api)


@needs_cli
@pytest.mark.parametrize("kind", FILES)
def test_user_metric_is_exported_and_matches(exported: Exported, cols: dict[str, np.ndarray], elsewhere: Path,
                                             kind: str) -> None:
    assert f"dh_{USER_METRIC}" in exported.result.macros
    target = target_of(exported, kind)
    pooled = duckdb_cli(target, union_query(["baseline", "tight", "doubled"], [USER_METRIC], day=False), cwd=elsewhere)
    per_day = duckdb_cli(target, union_query(["baseline", "tight", "doubled"], [USER_METRIC], day=True), cwd=elsewhere)
    for rows, df in ((pooled, exported.pooled), (per_day, exported.by_day)):
        api = {k: v for k, v in api_values(df).items()
               if k[-1] == USER_METRIC and k[0] in ("baseline", "tight", "doubled")}
        assert_same_values(cli_values(rows, [USER_METRIC]), api, rel=0.0)
    # and an independent reference: the largest |pred - target| inside the window
    w = cols["in_window"]
    expected = float(np.max(np.abs(cols[PRED][w] - cols[TARGET][w])))
    assert num(next(r for r in pooled if r["experiment"] == "baseline")[USER_METRIC]) == expected


TOKYO = zoneinfo.ZoneInfo("Asia/Tokyo")


@needs_cli
@pytest.mark.parametrize("kind", FILES)
def test_dh_day_is_the_local_date_of_the_data_zone(folder: Path, tmp_path: Path, elsewhere: Path, kind: str) -> None:
    """Data in Asia/Tokyo with a 00:30-05:00 window: every row's local date is the day after its
    UTC date, so a day computed in the wrong zone would label every row wrongly."""
    meta = {"timezone": "Asia/Tokyo", "start_time": "00:30", "end_time": "05:00"}
    with Harness(folder, metadata=meta) as h:
        api = api_values(h.metrics(["count", "r2"], pairs=[PAIR], by="day"))
        h.export(sql=tmp_path / "t.sql", db=tmp_path / "t.duckdb")
    target = tmp_path / ("t.sql" if kind == "sql" else "t.duckdb")
    rows = duckdb_cli(target, union_query(["baseline"], ["count", "r2"], day=True), cwd=elsewhere)
    assert_same_values(cli_values(rows, ["count", "r2"]), api)
    t = read_all(folder)
    local = [x.astimezone(TOKYO) for x in t["ts"].to_pylist()]
    inside = [x for x in local if dt.time(0, 30) <= x.time() <= dt.time(5)]
    days = [x.date().isoformat() for x in inside]
    expected = {d: days.count(d) for d in set(days)}
    assert {r["day"]: int(r["count"]) for r in rows} == expected
    assert all(x.date() != x.astimezone(dt.UTC).date() for x in inside)  # the UTC date is always another


@needs_cli
@pytest.mark.parametrize("kind", FILES)
def test_overnight_session_days_match_python_api(folder: Path, tmp_path: Path, elsewhere: Path, kind: str) -> None:
    """A 23:00-04:00 session: the Python API's ``by="day"`` labels the after-midnight rows with the
    session's day; grouping by ``dh_day(ts)`` in the exported session must give the same groups."""
    meta = {"timezone": "Asia/Tokyo", "start_time": "23:00", "end_time": "04:00"}
    with Harness(folder, metadata=meta) as h:
        api = api_values(h.metrics(["count", "r2"], pairs=[PAIR], by="day"))
        h.export(sql=tmp_path / "o.sql", db=tmp_path / "o.duckdb")
    target = tmp_path / ("o.sql" if kind == "sql" else "o.duckdb")
    rows = duckdb_cli(target, union_query(["baseline"], ["count", "r2"], day=True), cwd=elsewhere)
    assert sum(int(r["count"]) for r in rows) == sum(v for k, v in api.items() if k[-1] == "count")
    assert_same_values(cli_values(rows, ["count", "r2"]), api)


# -- NULL and NaN predictions ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gappy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two days where pred_10s has NULLs and NaNs (and target_10s a few NaN/inf); one file's NaNs
    sit where Parquet min/max statistics are finite (the case where isnan() can be folded away)."""
    rng = np.random.default_rng(5)
    out = tmp_path_factory.mktemp("gappy") / "bt"
    tables = {}
    for k, d in enumerate(trading_days(dt.date(2026, 3, 5), 2)):
        t = one_day(d, 1500, rng, symbols=8)
        pred = t[PRED].to_numpy().copy()
        target = t[TARGET].to_numpy().copy()
        null_mask = rng.random(len(pred)) < 0.07
        pred[rng.random(len(pred)) < 0.05] = np.nan
        if k == 0:
            target[rng.random(len(target)) < 0.02] = np.nan
            target[rng.random(len(target)) < 0.01] = np.inf
        t = t.set_column(t.schema.get_field_index(PRED), PRED, pa.array(pred, mask=null_mask))
        t = t.set_column(t.schema.get_field_index(TARGET), TARGET, pa.array(target))
        tables[d.isoformat()] = t
    write_dataset(out, tables, SESSION)
    return out


@needs_cli
def test_null_and_nan_rows_excluded_like_python_api(gappy: Path, tmp_path: Path, elsewhere: Path) -> None:
    names = ["baseline", "liquid"]
    with Harness(gappy) as h:
        h.add_experiment("liquid", "volume > 1000")
        pooled = h.metrics(["count", "mse"], pairs=[PAIR])
        by_day = h.metrics(["count", "mse"], pairs=[PAIR], by="day")
        h.export(sql=tmp_path / "g.sql", db=tmp_path / "g.duckdb")
    # independent reference
    t = read_all(gappy)
    p = t[PRED].to_numpy(zero_copy_only=False)
    tg = t[TARGET].to_numpy(zero_copy_only=False)
    local = [x.astimezone(EASTERN) for x in t["ts"].to_pylist()]
    w = np.array([dt.time(9, 30) <= x.time() <= dt.time(16) for x in local])
    ok = w & np.isfinite(p.astype(float)) & np.isfinite(tg)
    assert (w & ~ok).sum() > 50  # the data does have NULL/NaN rows in the window
    api = api_values(pooled)
    assert api[("baseline", "count")] == ok.sum()
    assert math.isclose(api[("baseline", "mse")], float(np.mean((p[ok] - tg[ok]) ** 2)), rel_tol=1e-9)

    for target in (tmp_path / "g.sql", tmp_path / "g.duckdb"):
        rows = duckdb_cli(target, union_query(names, ["count", "mse"], day=False), cwd=elsewhere)
        assert_same_values(cli_values(rows, ["count", "mse"]), api)
        rows = duckdb_cli(target, union_query(names, ["count", "mse"], day=True), cwd=elsewhere)
        assert_same_values(cli_values(rows, ["count", "mse"]), api_values(by_day))
        # the rows are still in the views; only the macros leave them out
        (row,) = duckdb_cli(target, f"SELECT count(*) AS n, dh_count({PRED}, {TARGET}) AS valid FROM baseline",
                            cwd=elsewhere)
        assert int(row["n"]) == w.sum() and int(row["valid"]) == ok.sum()


# -- compatibility and provenance -------------------------------------------------------------------------

@needs_cli
@pytest.mark.parametrize("kind", FILES)
def test_export_info_view_has_versions_and_chain_hash(exported: Exported, elsewhere: Path, kind: str) -> None:
    rows = duckdb_cli(target_of(exported, kind), "SELECT key, value FROM duckharness_export", cwd=elsewhere)
    info = {r["key"]: r["value"] for r in rows}
    assert info["duckharness_version"] == duckharness.__version__
    assert info["duckdb_version"] == duckdb.__version__
    assert HEX64.match(info["chain_sha256"])
    assert info["chain_sha256"] == exported.result.chain_hash


@needs_cli
def test_database_opens_in_the_cli(exported: Exported, elsewhere: Path) -> None:
    """The CLI next to the interpreter (duckdb-cli 1.5) opens the file written by duckdb 2.0."""
    (ver,) = duckdb_cli(exported.db, "SELECT library_version FROM pragma_version()", cwd=elsewhere)
    (row,) = duckdb_cli(exported.db, "SELECT count(*) AS n, dh_r2(pred_10s, target_10s) AS r2 FROM tight",
                        cwd=elsewhere)
    api = api_values(exported.pooled)
    assert int(row["n"]) == api[("tight", "count")], ver
    assert close(num(row["r2"]), api[("tight", "r2")]), ver


# -- credentials ------------------------------------------------------------------------------------------

@needs_cli
def test_credentials_are_never_written(folder: Path, tmp_path: Path, elsewhere: Path) -> None:
    opts = {"key": SECRET_KEY, "secret": SECRET_VALUE, "client_kwargs": {"region_name": "us-east-1"}}
    with Harness(folder, storage_options=opts) as h:
        h.add_experiment("liquid", "volume > 1000")
        n = api_values(h.metrics(["count"], pairs=[PAIR], experiments=["liquid"]))[("liquid", "count")]
        r = h.export(sql=tmp_path / "s.sql", db=tmp_path / "s.duckdb")
    for path in (tmp_path / "s.sql", tmp_path / "s.duckdb"):
        data = path.read_bytes()
        # positive control: the file's strings are searchable (the data path and the hash are in it)
        assert str(folder).encode() in data and r.chain_hash.encode() in data
        for secret in (SECRET_KEY, SECRET_VALUE):
            for enc in ("utf-8", "utf-16-le"):
                assert secret.encode(enc) not in data, f"{secret!r} found in {path.name}"
        (row,) = duckdb_cli(path, "SELECT count(*) AS n FROM liquid", cwd=elsewhere)
        assert int(row["n"]) == n
    assert list(tmp_path.glob("*.tmp-*")) == []


# -- determinism ------------------------------------------------------------------------------------------

def test_same_chain_exports_byte_identical_files(folder: Path, user_metrics: Path, tmp_path: Path) -> None:
    outs = [tmp_path / x for x in ("a", "b", "c")]
    for o in outs:
        o.mkdir()
    with Harness(folder, metric_dirs=[user_metrics]) as h:
        add_all(h, EXPERIMENTS)
        ra = h.export(sql=outs[0] / "x.sql", db=outs[0] / "x.duckdb")
        rb = h.export(sql=outs[1] / "other name.sql", db=outs[1] / "other name.duckdb")
    with Harness(folder, metric_dirs=[user_metrics]) as h:  # a fresh harness, the same chain
        add_all(h, EXPERIMENTS)
        rc = h.export(sql=outs[2] / "y.sql", db=outs[2] / "y.duckdb")
    assert ra.chain_hash == rb.chain_hash == rc.chain_hash
    dbs = [Path(r.db_path).read_bytes() for r in (ra, rb, rc)]
    sqls = [Path(r.sql_path).read_bytes() for r in (ra, rb, rc)]
    assert len(dbs[0]) > 4096
    assert dbs[0] == dbs[1] == dbs[2]
    assert sqls[0] == sqls[1] == sqls[2]


def test_changing_an_experiment_changes_the_chain_hash(folder: Path, user_metrics: Path, tmp_path: Path) -> None:
    with Harness(folder, metric_dirs=[user_metrics]) as h:
        add_all(h, EXPERIMENTS)
        before = h.export(sql=tmp_path / "1.sql", db=tmp_path / "1.duckdb")
    changed = {**EXPERIMENTS, "liquid": ("volume > 2000", None)}
    with Harness(folder, metric_dirs=[user_metrics]) as h:
        add_all(h, changed)
        after = h.export(sql=tmp_path / "2.sql", db=tmp_path / "2.duckdb")
    assert HEX64.match(before.chain_hash) and HEX64.match(after.chain_hash)
    assert before.chain_hash != after.chain_hash
    assert (tmp_path / "1.sql").read_bytes() != (tmp_path / "2.sql").read_bytes()
    assert (tmp_path / "1.duckdb").read_bytes() != (tmp_path / "2.duckdb").read_bytes()
    assert after.chain_hash in (tmp_path / "2.sql").read_text()


# -- Python steps -----------------------------------------------------------------------------------------

PY_STEP, PY_CHILD = "py_big_volume", "py_big_tight"


def big_volume(lf: pl.LazyFrame) -> pl.LazyFrame:
    return lf.filter(pl.col("volume") > 3000)


@needs_cli
def test_python_step_is_skipped_or_materialized(folder: Path, cols: dict[str, np.ndarray], tmp_path: Path,
                                                elsewhere: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with Harness(folder) as h:
        h.add_experiment("liquid", "volume > 1000")
        h.add_experiment(PY_STEP, big_volume)
        h.add_experiment(PY_CHILD, "SELECT * FROM py_big_volume WHERE spread < 0.02")
        api = api_values(h.metrics(["count"], pairs=[PAIR]))
        plain = h.export(sql=out / "plain.sql", db=out / "plain.duckdb")
        mat = h.export(sql=out / "mat.sql", db=out / "mat.duckdb", materialize=tmp_path / "mat")

    # left out, with reasons
    assert set(plain.skipped) == {PY_STEP, PY_CHILD}
    assert "big_volume" in plain.skipped[PY_STEP] and "materialize" in plain.skipped[PY_STEP]
    assert PY_STEP in plain.skipped[PY_CHILD]
    assert plain.views == ["baseline", "liquid"]
    script = (out / "plain.sql").read_text()
    assert not re.search(rf"VIEW\s+\"?({PY_STEP}|{PY_CHILD})\b", script, re.IGNORECASE)
    assert PY_STEP.encode() not in (out / "plain.duckdb").read_bytes()
    for target in (out / "plain.sql", out / "plain.duckdb"):
        (row,) = duckdb_cli(target, "SELECT count(*) FILTER (WHERE view_name LIKE 'py_big%') AS py, "
                            "count(*) FILTER (WHERE view_name = 'liquid') AS liquid FROM duckdb_views()",
                            cwd=elsewhere)
        assert row == {"py": "0", "liquid": "1"}

    # materialized: views over the written Parquet, with the Python API's rows
    w = cols["in_window"]
    assert api[(PY_STEP, "count")] == int((w & (cols["volume"] > 3000)).sum())
    assert mat.skipped == {}
    assert mat.views == ["baseline", "liquid", PY_STEP, PY_CHILD]
    assert list((tmp_path / "mat" / PY_STEP).glob("*.parquet"))
    for target in (out / "mat.sql", out / "mat.duckdb"):
        (row,) = duckdb_cli(target, f"SELECT (SELECT count(*) FROM {PY_STEP}) AS a, "
                            f"(SELECT count(*) FROM {PY_CHILD}) AS b, "
                            f"(SELECT dh_count({PRED}, {TARGET}) FROM {PY_CHILD}) AS c", cwd=elsewhere)
        assert int(row["a"]) == api[(PY_STEP, "count")]
        assert int(row["b"]) == int(row["c"]) == api[(PY_CHILD, "count")]


# -- the time zone ----------------------------------------------------------------------------------------

ZONES = ("UTC", "Asia/Tokyo", "America/Los_Angeles")


@pytest.fixture(scope="module")
def zoned(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, dict]]:
    """An export with a time-zone sensitive experiment (``hour(ts)`` of a TIMESTAMPTZ)."""
    out = tmp_path_factory.mktemp("zoned")
    with Harness(folder) as h:
        h.add_experiment("liquid", "volume > 1000")
        h.add_experiment("early", "hour(ts) < 17")
        api = api_values(h.metrics(["count", "r2"], pairs=[PAIR], by="day"))
        h.export(sql=out / "z.sql", db=out / "z.duckdb")
    yield out / "z.sql", out / "z.duckdb", api


def test_script_pins_the_time_zone(zoned: tuple[Path, Path, dict]) -> None:
    text = zoned[0].read_text()
    m = re.search(r"^SET\s+TimeZone\s*=\s*'([^']+)';", text, re.MULTILINE | re.IGNORECASE)
    assert m and m.group(1) == "UTC"
    assert text.index(m.group(0)) < text.index("CREATE")


@needs_cli
@pytest.mark.parametrize("kind", FILES)
def test_day_and_window_do_not_depend_on_machine_zone(zoned: tuple[Path, Path, dict], elsewhere: Path,
                                                      kind: str) -> None:
    target = zoned[0] if kind == "sql" else zoned[1]
    api = {k: v for k, v in zoned[2].items() if k[0] in ("baseline", "liquid")}
    for tz in ZONES:
        rows = duckdb_cli(target, union_query(["baseline", "liquid"], ["count", "r2"], day=True), cwd=elsewhere, tz=tz)
        assert_same_values(cli_values(rows, ["count", "r2"]), api)


@needs_cli
@pytest.mark.parametrize("kind", [
    "sql",
    pytest.param("db", marks=pytest.mark.xfail(
        strict=True, reason="a database file cannot store SET TimeZone (documented: open it with "
                            "duckdb -cmd \"SET TimeZone='UTC'\" for zone-dependent experiments)")),
])
def test_zone_sensitive_experiment_does_not_depend_on_machine_zone(zoned: tuple[Path, Path, dict], elsewhere: Path,
                                                                   kind: str) -> None:
    """``hour(ts)`` of a TIMESTAMPTZ depends on the session's TimeZone; the Python API pins UTC,
    so must a CLI session on either exported file."""
    target = zoned[0] if kind == "sql" else zoned[1]
    expected = sum(v for k, v in zoned[2].items() if k[0] == "early" and k[-1] == "count")
    got = {}
    for tz in ZONES:
        (row,) = duckdb_cli(target, "SELECT count(*) AS n, current_setting('TimeZone') AS zone FROM early",
                            cwd=elsewhere, tz=tz)
        got[tz] = (int(row["n"]), row["zone"])
    assert {tz: n for tz, (n, _) in got.items()} == {tz: expected for tz in ZONES}, got


# -- the command line -------------------------------------------------------------------------------------

@needs_cli
def test_cli_export_writes_both_files(folder: Path, user_metrics: Path, tmp_path: Path, elsewhere: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "experiments.sql").write_text(DEMO_EXPERIMENTS)
    monkeypatch.chdir(work)
    code = main(["export", str(folder), "--experiments", "experiments.sql", "--metric-dir", str(user_metrics),
                 "--sql", "out.sql", "--db", "out.duckdb", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    sql, db = work / "out.sql", work / "out.duckdb"
    assert sql.is_file() and db.is_file()
    lines = captured.out.splitlines()
    assert f"Wrote {sql}" in lines and f"Wrote {db}" in lines
    assert "Views: baseline, liquid, tight, clipped" in lines
    macro_line = next(ln for ln in lines if ln.startswith("Metric macros:"))
    listed = set(macro_line.split(":", 1)[1].replace(" ", "").split(","))
    assert listed == {f"dh_{m}" for m in [*PACKAGED, USER_METRIC, "day"]}
    assert "Traceback" not in captured.err
    with Harness(folder) as h:
        h.load_experiments(work / "experiments.sql")
        api = api_values(h.metrics(["count", "corr"], pairs=[PAIR], experiments=["tight", "clipped"]))
    for target in (sql, db):
        rows = duckdb_cli(target, union_query(["tight", "clipped"], ["count", "corr"], day=False), cwd=elsewhere)
        assert_same_values(cli_values(rows, ["count", "corr"]), api)


@pytest.mark.parametrize("args", [[], ["--materialize", "m"]])
def test_cli_export_without_outputs_is_an_error(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(folder), *args]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("Error:")
    assert "--sql" in captured.err and "--db" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


@needs_cli
def test_macros_score_integer_and_float32_columns_in_double_like_the_api(tmp_path: Path, elsewhere: Path) -> None:
    rng = np.random.default_rng(9)
    n = 3000
    t32 = rng.integers(-2_000_000_000, 2_000_000_000, n)
    tf = rng.normal(size=n).astype(np.float32)
    start = int(dt.datetime(2024, 6, 3, 15, tzinfo=dt.UTC).timestamp()) * 10**6
    table = pa.table({
        "ts": pa.array(start + np.arange(n, dtype=np.int64) * 10**6, pa.timestamp("us", tz="UTC")),
        "pred_i": pa.array(np.clip(t32 + rng.integers(-10**9, 10**9, n), -2**31 + 1, 2**31 - 1), pa.int32()),
        "target_i": pa.array(t32, pa.int32()),
        "pred_f": pa.array((0.4 * tf + rng.normal(size=n)).astype(np.float32)),
        "target_f": pa.array(tf),
    })
    write_dataset(tmp_path / "typed", {"2024-06-03": table}, {})
    metrics = ["r2", "corr", "mse"]
    with Harness(tmp_path / "typed", cache=False) as h:
        got = h.metrics(metrics, pairs=["pred_i:target_i", "pred_f:target_f"])
        api = {(r[0], r[1]): r[2] for r in got.select("pred", "metric", "value").rows()}
        h.export(db=tmp_path / "typed.duckdb")
    for pred, target in [("pred_i", "target_i"), ("pred_f", "target_f")]:
        calls = ", ".join(f"dh_{m}({pred}, {target}) AS {m}" for m in metrics)
        (row,) = duckdb_cli(tmp_path / "typed.duckdb", f"SELECT {calls} FROM baseline", cwd=elsewhere)
        for m in metrics:
            assert math.isclose(float(row[m]), api[(pred, m)], rel_tol=1e-9), (pred, m)


@needs_cli
def test_nanosecond_times_with_a_zone_export_a_database_the_older_cli_opens(tmp_path: Path) -> None:
    """DuckDB 2.0's TIMESTAMPTZ_NS (what pandas writes for zone-aware times) made the whole file fail
    to open in the 1.5 CLI ("unrecognized enum value ... LogicalTypeId"); the database reads such
    columns as microseconds, says so, and the script keeps them."""
    rng = np.random.default_rng(3)
    start = np.datetime64("2026-03-06T14:00:00", "ns")
    ts = pa.array(start + np.sort(rng.integers(0, 8 * 3600 * 10**9, 400)).astype("timedelta64[ns]"),
                  pa.timestamp("ns", tz="UTC"))
    p, t = rng.standard_normal(400), rng.standard_normal(400)
    src = tmp_path / "src"
    write_dataset(src, {"2026-03-06": pa.table({"ts": ts, "pred_a": p, "target_a": p + t})}, SESSION)
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    with Harness(src) as h:
        assert h.dataset.columns["ts"] == "TIMESTAMPTZ_NS"
        h.export(out / "x.sql", out / "x.duckdb")
        want = h.metrics(["count", "corr"], pairs="pred_a").filter(metric="corr")["value"][0]
    local = [x.astimezone(zoneinfo.ZoneInfo("US/Eastern")).time() for x in ts.to_pylist()]
    inside = np.array([dt.time(9, 30) <= x <= dt.time(16) for x in local])
    assert want == pytest.approx(np.corrcoef(p[inside], (p + t)[inside])[0, 1], rel=1e-12)
    query = "SELECT count(*) AS n, dh_corr(pred_a, target_a) AS ic FROM baseline"
    for target in (out / "x.duckdb", out / "x.sql"):
        (row,) = duckdb_cli(target, query, cwd=work)
        assert int(row["n"]) == inside.sum() and float(row["ic"]) == pytest.approx(want, rel=1e-12), target
    (note,) = duckdb_cli(out / "x.duckdb", "SELECT value FROM duckharness_export WHERE key = 'database_types'",
                         cwd=work)
    assert note["value"].startswith("ts read as TIMESTAMPTZ")
