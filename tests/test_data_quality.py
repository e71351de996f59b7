"""Missing values (NULL and NaN), schema drift between days, and the forms a source can take.

References filter the rows themselves with pandas/numpy (session window from each row's
US/Eastern wall-clock time) and compute metrics with scikit-learn, scipy and numpy.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SESSION, read_all, write_dataset
from scipy.stats import pearsonr
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from duckharness import Harness
from duckharness.errors import DuckHarnessWarning

EASTERN = zoneinfo.ZoneInfo("US/Eastern")
DAYS = [dt.date(2026, 3, 4), dt.date(2026, 3, 5), dt.date(2026, 3, 6), dt.date(2026, 3, 9),
        dt.date(2026, 3, 10), dt.date(2026, 3, 11)]
ROWS = 2500
METRICS = ["count", "r2", "mse", "rmse", "mae", "bias", "corr", "hit_rate"]
REL = 1e-10


def _with_holes(values: np.ndarray, rng: np.random.Generator, *, nan: float, null: float) -> pa.Array:
    """``values`` with a fraction ``nan`` of NaNs and a fraction ``null`` of NULLs, at random rows."""
    values = values.copy()
    values[rng.random(len(values)) < nan] = np.nan
    return pa.array(values, mask=rng.random(len(values)) < null)


def day_table(day: dt.date, rows: int, rng: np.random.Generator, *, holes: bool = True,
              horizons: Sequence[str] = ("10s", "1s")) -> pa.Table:
    open_utc = dt.datetime.combine(day, dt.time(8), EASTERN).astimezone(dt.UTC).replace(tzinfo=None)
    offsets = np.sort(rng.integers(0, 9 * 3600 * 10**6, rows)).astype("timedelta64[us]")
    volume = rng.integers(1, 5000, rows).astype(np.float64)
    cols: dict[str, object] = {
        "ts": pa.array(np.datetime64(open_utc, "us") + offsets, pa.timestamp("us", tz="UTC")),
        "symbol": pa.array(rng.choice(["A", "B", "C", "D"], rows)),
        "volume": pa.array(volume.astype(np.int64), mask=(rng.random(rows) < 0.05) if holes else None),
    }
    # Different rates (and so different rows) of NaN and NULL for each pred and target column.
    # (Every column has some NULLs in every row group: NaN in a column without NULLs is the
    # subject of its own tests below.)
    rates = {"pred_10s": (0.03, 0.02), "target_10s": (0.01, 0.02), "pred_1s": (0.02, 0.03),
             "target_1s": (0.02, 0.02), "pred_60s": (0.02, 0.02), "target_60s": (0.01, 0.02)}
    for h in horizons:
        pred = 0.4 * rng.standard_normal(rows)
        target = 0.6 * pred + rng.standard_normal(rows)
        for name, v in ((f"pred_{h}", pred), (f"target_{h}", target)):
            nan, null = rates[name] if holes else (0.0, 0.0)
            cols[name] = _with_holes(v, rng, nan=nan, null=null)
    return pa.table(cols)


def local_frame(table: pa.Table) -> pd.DataFrame:
    """Rows as pandas (NULL and NaN both become NaN), with local date and the 09:30-16:00 flag."""
    df = table.to_pandas()
    local = df["ts"].dt.tz_convert("US/Eastern")
    h, m, s, us = (getattr(local.dt, f).astype(np.int64) for f in ("hour", "minute", "second", "microsecond"))
    tod = ((h * 60 + m) * 60 + s) * 10**6 + us
    df["day"] = [d.date() for d in local]
    df["in_session"] = (tod >= (9 * 60 + 30) * 60 * 10**6) & (tod <= 16 * 3600 * 10**6)
    return df


def reference_metrics(p: np.ndarray, t: np.ndarray) -> dict[str, float]:
    p, t = np.asarray(p, dtype=np.float64), np.asarray(t, dtype=np.float64)
    pl_, tl = p.astype(np.longdouble), t.astype(np.longdouble)
    return {
        "count": float(len(p)), "r2": float(r2_score(t, p)), "mse": float(mean_squared_error(t, p)),
        "rmse": float(np.sqrt(np.mean((pl_ - tl) ** 2))), "mae": float(mean_absolute_error(t, p)),
        "bias": float(np.mean(pl_ - tl)), "corr": float(pearsonr(p, t).statistic),
        "hit_rate": float(np.mean(np.sign(p) == np.sign(t))),
    }


def valid(df: pd.DataFrame, pred: str, target: str) -> pd.Series:
    return df[pred].notna() & df[target].notna()


def tidy(res: object, by: str | None = None) -> dict[tuple, float]:
    """(experiment, pred, metric[, group]) -> value."""
    return {(r["experiment"], r["pred"], r["metric"], *([r[by]] if by else [])): r["value"]
            for r in res.iter_rows(named=True)}  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def holes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("holes")
    rng = np.random.default_rng(11)
    write_dataset(folder, {d.isoformat(): day_table(d, ROWS, rng) for d in DAYS}, SESSION, row_group_size=500)
    return folder, local_frame(read_all(folder))


FILTERS = {"baseline": lambda w: w, "liquid": lambda w: w[w["volume"] > 1000]}


def _harness(folder: Path | str | list[str], **kw: object) -> Harness:
    h = Harness(folder, **kw)
    h.add_experiment("liquid", "volume > 1000")
    return h


# --- NULL and NaN ---------------------------------------------------------------------------------

def test_null_and_nan_rows_are_excluded_per_pair_and_counted_in_n_excluded(
        holes: tuple[Path, pd.DataFrame]) -> None:
    folder, df = holes
    w = df[df["in_session"]]
    # The data has NULL-only and NaN-only columns and the pairs' bad rows differ.
    assert not valid(w, "pred_10s", "target_10s").equals(valid(w, "pred_1s", "target_1s"))
    got = tidy(_harness(folder).metrics(["count"]))
    for name, f in FILTERS.items():
        rows = f(w)
        for p, t in (("pred_10s", "target_10s"), ("pred_1s", "target_1s")):
            ok = valid(rows, p, t)
            assert got[(name, p, "count")] == ok.sum(), (name, p)
            assert got[(name, p, "n_excluded")] == (~ok).sum(), (name, p)
            assert (~ok).sum() > 50


def test_metrics_on_data_with_missing_values_match_references_on_valid_rows(
        holes: tuple[Path, pd.DataFrame]) -> None:
    folder, df = holes
    w = df[df["in_session"]]
    got = tidy(_harness(folder).metrics(METRICS))
    expected, obtained = {}, {}
    for name, f in FILTERS.items():
        rows = f(w)
        for p, t in (("pred_10s", "target_10s"), ("pred_1s", "target_1s")):
            ok = rows[valid(rows, p, t)]
            for m, v in reference_metrics(ok[p].to_numpy(), ok[t].to_numpy()).items():
                expected[(name, p, m)] = v
                obtained[(name, p, m)] = got[(name, p, m)]
    assert obtained == pytest.approx(expected, rel=REL)


def test_per_day_count_and_n_excluded_match_references(holes: tuple[Path, pd.DataFrame]) -> None:
    folder, df = holes
    w = df[df["in_session"]]
    got = tidy(_harness(folder).metrics(["count", "r2", "corr"], by="day"), by="day")
    expected = {}
    for name, f in FILTERS.items():
        for day, rows in f(w).groupby("day"):
            for p, t in (("pred_10s", "target_10s"), ("pred_1s", "target_1s")):
                ok = valid(rows, p, t)
                assert (~ok).sum() > 0  # so every group has a non-zero n_excluded
                good = rows[ok]
                expected[(name, p, "count", day)] = float(ok.sum())
                expected[(name, p, "n_excluded", day)] = float((~ok).sum())
                expected[(name, p, "r2", day)] = r2_score(good[t], good[p])
                expected[(name, p, "corr", day)] = pearsonr(good[p], good[t]).statistic
    assert got == pytest.approx(expected, rel=REL)


def test_row_with_null_filter_column_is_selected_neither_by_the_filter_nor_by_its_negation(
        holes: tuple[Path, pd.DataFrame]) -> None:
    folder, df = holes
    w = df[df["in_session"]]
    h = _harness(folder)
    h.add_experiment("illiquid", "NOT (volume > 1000)")
    got = tidy(h.metrics(["count"], pairs=["pred_10s:target_10s"]))
    total = {name: got[(name, "pred_10s", "count")] + got[(name, "pred_10s", "n_excluded")]
             for name in ("baseline", "liquid", "illiquid")}
    assert total["baseline"] == len(w)
    assert total["liquid"] == (w["volume"] > 1000).sum()
    assert total["illiquid"] == (w["volume"] <= 1000).sum()
    assert total["liquid"] + total["illiquid"] == len(w) - w["volume"].isna().sum() < len(w)


def test_every_group_has_an_n_excluded_row_even_when_nothing_is_excluded(tmp_path: Path) -> None:
    # The documented contract: each (experiment, pair, group) also has an n_excluded row.
    rng = np.random.default_rng(2)
    write_dataset(tmp_path, {d.isoformat(): day_table(d, 500, rng, holes=False) for d in DAYS[:3]}, SESSION)
    for by in ("day", "symbol"):
        res = Harness(tmp_path).metrics(["count"], pairs=["pred_10s:target_10s"], by=by)
        groups = set(res.filter(metric="count")[by].to_list())
        excluded = {r[by]: r["value"] for r in res.filter(metric="n_excluded").iter_rows(named=True)}
        assert len(groups) > 1
        assert excluded == dict.fromkeys(groups, 0.0), by


@pytest.mark.parametrize("statistics", [True, False], ids=["with_statistics", "without_statistics"])
@pytest.mark.parametrize("column", ["pred_x", "target_x"])
def test_nan_in_a_float_column_without_nulls_is_excluded_and_counted(
        tmp_path: Path, statistics: bool, column: str) -> None:
    # The usual case for data written from pandas/numpy: NaN marks missing values, no NULLs.
    rng = np.random.default_rng(4)
    tables = {}
    for i in range(3):
        x = {"pred_x": rng.standard_normal(1000), "target_x": rng.standard_normal(1000)}
        x[column][rng.random(1000) < 0.05] = np.nan
        tables[f"part{i}"] = pa.table(x)
    tmp_path.mkdir(exist_ok=True)
    for stem, t in tables.items():
        pq.write_table(t, tmp_path / f"{stem}.parquet", write_statistics=statistics)
    (tmp_path / "metadata.json").write_text("{}")
    all_rows = pa.concat_tables(tables.values())
    p, t = all_rows["pred_x"].to_numpy(), all_rows["target_x"].to_numpy()
    ok = ~np.isnan(p) & ~np.isnan(t)
    assert all_rows[column].null_count == 0 and (~ok).sum() > 100
    got = tidy(Harness(tmp_path).metrics(["count", "mse", "corr"]))
    assert got == pytest.approx({("baseline", "pred_x", "count"): ok.sum(),
                                 ("baseline", "pred_x", "n_excluded"): (~ok).sum(),
                                 ("baseline", "pred_x", "mse"): mean_squared_error(t[ok], p[ok]),
                                 ("baseline", "pred_x", "corr"): pearsonr(p[ok], t[ok]).statistic}, rel=REL)



def _null_free_source(folder: Path, parts: Sequence[dict[str, np.ndarray]], row_group_size: int | None = None
                      ) -> pa.Table:
    folder.mkdir(exist_ok=True)
    tables = [pa.table(x) for x in parts]
    for i, t in enumerate(tables):
        assert all(c.null_count == 0 for c in t.columns)
        pq.write_table(t, folder / f"part{i}.parquet", row_group_size=row_group_size)
    (folder / "metadata.json").write_text("{}")
    return pa.concat_tables(tables)


@pytest.mark.parametrize("batch_size, split", [(1, False), (3, False), (1, True)],
                         ids=["batch1", "batch3", "files_in_parts"])
def test_infinities_in_some_files_without_nulls_are_excluded_and_counted(
        tmp_path: Path, batch_size: int, split: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Files whose footers show no NULL are scanned without per-row validity keys; an infinity
    # (or NaN) in one of them must still be found and excluded, without touching the other files
    # (also when a file is computed in parts: 4 parts of 200 rows here).
    if split:
        monkeypatch.setattr("duckharness.engine.plan.PART_ROWS", 200)
    rng = np.random.default_rng(21)
    parts = [{"pred_x": rng.standard_normal(800), "target_x": rng.standard_normal(800)} for _ in range(3)]
    parts[1]["pred_x"][[5, 17, 300]] = [np.inf, -np.inf, np.inf]
    parts[2]["target_x"][[40]] = -np.inf
    rows = _null_free_source(tmp_path, parts, row_group_size=200 if split else None)
    p, t = rows["pred_x"].to_numpy(), rows["target_x"].to_numpy()
    ok = np.isfinite(p) & np.isfinite(t)
    assert (~ok).sum() == 4
    got = tidy(Harness(tmp_path, batch_size=batch_size).metrics(["count", "mse", "corr", "r2"]))
    assert got == pytest.approx({("baseline", "pred_x", "count"): ok.sum(),
                                 ("baseline", "pred_x", "n_excluded"): 4,
                                 ("baseline", "pred_x", "mse"): mean_squared_error(t[ok], p[ok]),
                                 ("baseline", "pred_x", "r2"): r2_score(t[ok], p[ok]),
                                 ("baseline", "pred_x", "corr"): pearsonr(p[ok], t[ok]).statistic}, rel=REL)


@pytest.mark.parametrize("step", [
    "SELECT * REPLACE (CASE WHEN target_x > 0 THEN pred_x END AS pred_x) FROM baseline",
    "SELECT * REPLACE (nullif(sign(target_x), -1) * pred_x AS pred_x) FROM baseline",
    "SELECT * REPLACE (TRY_CAST(CASE WHEN target_x > 0 THEN '1' ELSE 'x' END AS DOUBLE) * pred_x AS pred_x) "
    "FROM baseline",
], ids=["case_without_else", "nullif", "try_cast"])
def test_experiment_that_makes_nulls_from_null_free_columns_excludes_those_rows(tmp_path: Path, step: str) -> None:
    # The columns hold no NULL, but the experiment's expression yields NULL where target_x <= 0.
    rng = np.random.default_rng(22)
    parts = [{"pred_x": rng.standard_normal(600), "target_x": rng.standard_normal(600)} for _ in range(2)]
    rows = _null_free_source(tmp_path, parts)
    p, t = rows["pred_x"].to_numpy(), rows["target_x"].to_numpy()
    ok = t > 0
    h = Harness(tmp_path)
    h.add_experiment("upside", step)
    got = tidy(h.metrics(["count", "mae"], experiments=["upside"]))
    assert got == pytest.approx({("upside", "pred_x", "count"): ok.sum(),
                                 ("upside", "pred_x", "n_excluded"): (~ok).sum(),
                                 ("upside", "pred_x", "mae"): mean_absolute_error(t[ok], p[ok])}, rel=REL)

# --- schema drift -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def drift(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """pred_60s/target_60s exist only from the fourth day on; pred_10s is float32 on day 2."""
    folder = tmp_path_factory.mktemp("drift")
    rng = np.random.default_rng(5)
    tables = {}
    for i, d in enumerate(DAYS):
        t = day_table(d, ROWS, rng, horizons=("10s", "1s", "60s") if i >= 3 else ("10s", "1s"))
        if i == 1:
            k = t.schema.get_field_index("pred_10s")
            t = t.set_column(k, "pred_10s", t["pred_10s"].cast(pa.float32()))
        tables[d.isoformat()] = t
    write_dataset(folder, tables, SESSION)
    widened = [pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]
    widened = [t.set_column(t.schema.get_field_index("pred_10s"), "pred_10s", t["pred_10s"].cast(pa.float64()))
               for t in widened]
    return folder, local_frame(pa.concat_tables(widened, promote_options="default"))


@pytest.mark.parametrize("batch_size", [1, 2, 4], ids=["batch1", "batch2_mixed", "batch4_mixed"])
def test_column_added_on_later_days_counts_only_rows_of_days_that_have_it(
        drift: tuple[Path, pd.DataFrame], batch_size: int) -> None:
    folder, df = drift
    w = df[df["in_session"]]
    assert "pred_60s" in Harness(folder).columns
    got = tidy(_harness(folder, batch_size=batch_size).metrics(METRICS, pairs=["pred_60s:target_60s"]))
    later = w[w["day"] >= DAYS[3]]
    ok = later[valid(later, "pred_60s", "target_60s")]
    assert 0 < len(ok) < len(later)
    expected = {("baseline", "pred_60s", m): v
                for m, v in reference_metrics(ok["pred_60s"].to_numpy(), ok["target_60s"].to_numpy()).items()}
    # Days without the column read it as NULL: those rows count only in n_excluded.
    expected[("baseline", "pred_60s", "n_excluded")] = float(len(w) - len(ok))
    assert {k: v for k, v in got.items() if k[0] == "baseline"} == pytest.approx(expected, rel=REL)
    liquid = later[(later["volume"] > 1000) & valid(later, "pred_60s", "target_60s")]
    assert got[("liquid", "pred_60s", "count")] == len(liquid)
    assert got[("liquid", "pred_60s", "n_excluded")] == (w["volume"] > 1000).sum() - len(liquid)


def test_days_without_the_column_have_only_n_excluded_for_that_pair_by_day(drift: tuple[Path, pd.DataFrame]) -> None:
    folder, df = drift
    w = df[df["in_session"]]
    res = Harness(folder).metrics(["count", "mse"], pairs=["pred_60s:target_60s"], by="day")
    got = tidy(res, by="day")
    for day, rows in w.groupby("day"):
        ok = valid(rows, "pred_60s", "target_60s")
        assert got[("baseline", "pred_60s", "n_excluded", day)] == (~ok).sum()
        if day < DAYS[3]:
            assert ok.sum() == 0
            assert got.get(("baseline", "pred_60s", "count", day), 0.0) == 0.0
            assert got.get(("baseline", "pred_60s", "mse", day)) is None
        else:
            assert got[("baseline", "pred_60s", "count", day)] == ok.sum()
            good = rows[ok]
            assert got[("baseline", "pred_60s", "mse", day)] == pytest.approx(
                mean_squared_error(good["target_60s"], good["pred_60s"]), rel=REL)


def test_pairs_present_on_every_day_are_unaffected_by_a_column_added_later(drift: tuple[Path, pd.DataFrame]) -> None:
    folder, df = drift
    w = df[df["in_session"]]
    got = tidy(Harness(folder).metrics(METRICS, pairs=["pred_10s:target_10s", "pred_1s:target_1s"]))
    expected = {}
    for p, t in (("pred_10s", "target_10s"), ("pred_1s", "target_1s")):
        ok = w[valid(w, p, t)]
        # pred_10s of day 2 is float32: the reference uses those float32 values, widened.
        assert set(ok["day"]) == set(DAYS)
        for m, v in reference_metrics(ok[p].to_numpy(), ok[t].to_numpy()).items():
            expected[("baseline", p, m)] = v
        expected[("baseline", p, "n_excluded")] = float(len(w) - len(ok))
    assert got == pytest.approx(expected, rel=REL)


# --- source forms -------------------------------------------------------------------------------------

def _values(h: Harness, by: str | None = None) -> dict[tuple, float]:
    return tidy(h.metrics(METRICS, by=by), by=by)


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    assert all(v is not None for v in b.values())
    for k in a:
        if k[2] in ("count", "n_excluded"):
            assert a[k] == b[k], k
    assert a == pytest.approx(b, rel=1e-12)


@pytest.fixture(scope="module")
def directory_values(holes: tuple[Path, pd.DataFrame]) -> dict[str | None, dict[tuple, float]]:
    h = _harness(holes[0])
    return {by: _values(h, by) for by in (None, "day")}


@pytest.mark.parametrize("form", ["list", "reversed_list", "glob"])
def test_list_and_glob_sources_give_the_same_as_the_directory(
        holes: tuple[Path, pd.DataFrame], directory_values: dict, form: str) -> None:
    folder, _ = holes
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    source: object = {"list": files, "reversed_list": files[::-1], "glob": str(folder / "*.parquet")}[form]
    other = _harness(source)  # type: ignore[arg-type]
    assert other.files == files
    for by in (None, "day"):
        _same(_values(other, by), directory_values[by])


def test_one_file_source_gives_that_day_of_the_directory(
        holes: tuple[Path, pd.DataFrame], directory_values: dict) -> None:
    folder, df = holes
    path = folder / f"{DAYS[3].isoformat()}.parquet"
    single = _values(_harness(str(path)))
    per_day = directory_values["day"]
    assert single == pytest.approx({k[:3]: v for k, v in per_day.items() if k[3] == DAYS[3]}, rel=1e-12)
    w = df[df["in_session"] & (df["day"] == DAYS[3])]
    ok = w[valid(w, "pred_10s", "target_10s")]
    assert single[("baseline", "pred_10s", "r2")] == pytest.approx(r2_score(ok["target_10s"], ok["pred_10s"]), rel=REL)


def test_list_of_some_files_scores_only_those_days(holes: tuple[Path, pd.DataFrame]) -> None:
    folder, df = holes
    picked = [DAYS[1], DAYS[4]]
    h = _harness([str(folder / f"{d.isoformat()}.parquet") for d in picked])
    got = _values(h)
    w = df[df["in_session"] & df["day"].isin(picked)]
    ok = w[valid(w, "pred_1s", "target_1s")]
    expected = {("baseline", "pred_1s", m): v
                for m, v in reference_metrics(ok["pred_1s"].to_numpy(), ok["target_1s"].to_numpy()).items()}
    assert {k: got[k] for k in expected} == pytest.approx(expected, rel=REL)


def test_nan_in_the_first_rows_means_each_file_is_read_once(tmp_path: Path) -> None:
    # Data that marks missing values with NaN shows it in the sampled first rows: every batch then
    # carries its validity keys from the start, instead of being read, found to hold NaN, and
    # read again.
    rng = np.random.default_rng(9)
    parts = []
    for _ in range(3):
        x = {"pred_x": rng.standard_normal(1000), "target_x": rng.standard_normal(1000)}
        x["pred_x"][rng.random(1000) < 0.05] = np.nan
        parts.append(x)
    rows = _null_free_source(tmp_path, parts)
    statements: list[str] = []
    got = tidy(Harness(tmp_path, tracer=statements.append).metrics(["count", "mse"]))
    scans = [s for s in statements if "GROUP BY ALL" in s and "READ_PARQUET" in s and "__s" in s]
    assert len(scans) == 3 and all("ISFINITE" in s for s in scans)
    p, t = rows["pred_x"].to_numpy(), rows["target_x"].to_numpy()
    ok = ~np.isnan(p)
    assert got == pytest.approx({("baseline", "pred_x", "count"): ok.sum(),
                                 ("baseline", "pred_x", "n_excluded"): (~ok).sum(),
                                 ("baseline", "pred_x", "mse"): mean_squared_error(t[ok], p[ok])}, rel=REL)


def test_values_whose_squares_overflow_give_inf_without_a_numpy_warning(tmp_path: Path) -> None:
    """A finite 1e160 squares past the largest double: mse is inf, as numpy's float64 mean of
    squares is, and no RuntimeWarning from the run's internals reaches the user: only the
    package's own warning that says so."""
    import warnings

    rng = np.random.default_rng(0)
    p, t = rng.normal(size=500), rng.normal(size=500)
    p[5] = 1e160
    start = np.datetime64("2026-03-04T15:00:00", "us")
    ts = pa.array(start + np.arange(500).astype("timedelta64[s]"), pa.timestamp("us", tz="UTC"))
    write_dataset(tmp_path / "huge", {"2026-03-04": pa.table({"ts": ts, "pred_a": p, "target_a": t})}, {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Harness(tmp_path / "huge", cache=False) as h:
            got = dict(h.metrics(["mse", "mae", "corr"], pairs="pred_a:target_a").select("metric", "value").rows())
    assert [w.category for w in caught] == [DuckHarnessWarning]
    assert "pair pred_a:target_a: mse, corr" in str(caught[0].message)
    with np.errstate(over="ignore"):
        want_mse = float(np.mean((t - p) ** 2))
    assert want_mse == np.inf and got["mse"] == np.inf
    assert got["corr"] is None  # its sums of squares overflow too: undefined, not a number
    assert got["mae"] == pytest.approx(float(np.mean(np.abs(t - p))), rel=1e-12)
