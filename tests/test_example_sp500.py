"""The S&P 500 example (examples/sp500_backtest.py) end to end, checked against numpy/pandas.

The example writes real daily data (arch.data.sp500) as one Parquet file per year and evaluates
it with duckharness; here the files are read back with pandas and every metric is recomputed
directly, pooled and per year, for the baseline and the high_vol experiment.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("arch")
pd = pytest.importorskip("pandas")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sp500_backtest.py"
PAIRS = [("pred_ret_mom", "target_ret"), ("pred_ret_mr", "target_ret"),
         ("pred_sq_ewma", "target_sq"), ("pred_sq_hist", "target_sq")]
METRICS = ("count", "r2", "mse", "mae", "corr")
REL = 1e-10


def load_example():
    spec = importlib.util.spec_from_file_location("sp500_backtest_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """Run the example once: (its tidy result, the folder, the data read back with pandas)."""
    out = tmp_path_factory.mktemp("sp500")
    result = load_example().main(str(out))
    files = sorted(out.glob("*.parquet"))
    data = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).sort_values("ts", ignore_index=True)
    return result, out, data


def reference(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(pred) & np.isfinite(target)
    p, t = pred[ok], target[ok]
    e = t - p
    sst = float(np.sum((t - t.mean()) ** 2))
    return {"count": float(ok.sum()), "r2": 1.0 - float(np.sum(e * e)) / sst, "mse": float(np.mean(e * e)),
            "mae": float(np.mean(np.abs(e))), "corr": float(np.corrcoef(p, t)[0, 1]),
            "n_excluded": float((~ok).sum())}


def lookup(result, experiment: str, pred: str, year: int | None) -> dict[str, float]:
    import polars as pl

    year_sel = pl.col("year").is_null() if year is None else pl.col("year") == year
    rows = result.filter((pl.col("experiment") == experiment) & (pl.col("pred") == pred) & year_sel)
    got = dict(zip(rows["metric"].to_list(), rows["value"].to_list(), strict=True))
    assert len(got) == rows.height, f"duplicate metric rows for {experiment}/{pred}/{year}"
    return got


def test_files_and_metadata(run) -> None:
    _, out, data = run
    years = sorted(data["year"].unique().tolist())
    assert years == list(range(1999, 2019))
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"sp500_{y}.parquet" for y in years]
    for y in years:  # one file per year, holding exactly that year
        assert set(pd.read_parquet(out / f"sp500_{y}.parquet", columns=["year"])["year"]) == {y}
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["timezone"] == "America/New_York" and meta["source"] == "arch.data.sp500"
    assert "start_time" not in meta and "end_time" not in meta
    expected = ["ts", "year", "pred_ret_mom", "pred_ret_mr", "target_ret", "pred_sq_ewma", "pred_sq_hist",
                "target_sq", "abs_ret", "vol20"]
    assert list(data.columns) == expected
    assert str(data["ts"].dt.tz) == "UTC"
    local = data["ts"].dt.tz_convert("America/New_York")
    assert (local.dt.hour == 16).all() and (local.dt.minute == 0).all()
    assert (local.dt.year == data["year"]).all()


def test_forecasts_use_only_the_past(run) -> None:
    """Targets are the next row's return; forecasts are functions of returns up to the row."""
    mod = load_example()
    _, _, d = run
    r_next = -d["pred_ret_mr"].to_numpy()[1:] / mod.MR_SCALE       # r[t+1], recovered from row t+1
    np.testing.assert_allclose(d["target_ret"].to_numpy()[:-1], r_next, rtol=1e-12, atol=1e-18)
    np.testing.assert_allclose(d["target_sq"].to_numpy()[:-1], r_next ** 2, rtol=1e-12, atol=0)
    assert np.isnan(d["target_ret"].iloc[-1]) and np.isnan(d["target_sq"].iloc[-1])
    np.testing.assert_allclose(d["abs_ret"], np.abs(d["pred_ret_mr"]) / mod.MR_SCALE, rtol=1e-12)
    ewma, a = d["pred_sq_ewma"].to_numpy(), d["abs_ret"].to_numpy()
    lam = mod.EWMA_LAMBDA
    np.testing.assert_allclose(ewma[1:], lam * ewma[:-1] + (1 - lam) * a[1:] ** 2, rtol=1e-12)
    sq = a ** 2
    w = mod.WINDOW
    hist = np.convolve(sq, np.ones(w) / w, mode="valid")              # mean of sq[i-w+1 .. i]
    np.testing.assert_allclose(d["pred_sq_hist"].to_numpy()[w - 1:], hist, rtol=1e-9)
    np.testing.assert_allclose(d["vol20"], np.sqrt(d["pred_sq_hist"] * w / (w - 1)
                                                   - d["pred_ret_mom"] ** 2 * w / (w - 1)) * np.sqrt(252) * 100,
                               rtol=1e-6)


def test_metrics_match_numpy(run) -> None:
    result, _, data = run
    threshold = round(float(np.median(data["vol20"])), 1)
    selections = {"baseline": data, "high_vol": data[data["vol20"] > threshold]}
    assert 0 < len(selections["high_vol"]) < len(data)
    assert set(result["experiment"].unique()) == set(selections)
    assert set(result["metric"].unique()) == {*METRICS, "n_excluded"}
    checked = 0
    for name, frame in selections.items():
        for year in [None, *sorted(frame["year"].unique().tolist())]:
            part = frame if year is None else frame[frame["year"] == year]
            for pred, target in PAIRS:
                want = reference(part[pred].to_numpy(), part[target].to_numpy())
                got = lookup(result, name, pred, year)
                # n_excluded may be missing where it is 0 (see test_every_group_has_n_excluded)
                got.setdefault("n_excluded", 0.0)
                assert set(got) == set(want), (name, pred, year)
                for metric, value in want.items():
                    assert got[metric] == pytest.approx(value, rel=REL, abs=0), (name, pred, year, metric)
                    checked += 1
    # every (experiment, pair, year) with rows, plus pooled; and no other groups in the result
    n_groups = sum(4 * (1 + frame["year"].nunique()) for frame in selections.values())
    assert checked == n_groups * 6
    assert result.select("experiment", "pred", "year").unique().height == n_groups
    assert data["year"].nunique() == 20


def test_last_day_is_excluded(run) -> None:
    """The last day has forecasts but no target: counted once in n_excluded (pooled and 2018)."""
    result, _, _ = run
    for year in (None, 2018):
        got = lookup(result, "baseline", "pred_sq_ewma", year)
        assert got["count"] == (5010.0 if year is None else 250.0)
        assert got["n_excluded"] == 1.0


def test_every_group_has_n_excluded(run) -> None:
    """Harness.metrics documents an n_excluded row for each (experiment, pair, group)."""
    result, _, _ = run
    assert lookup(result, "baseline", "pred_sq_ewma", 2017).get("n_excluded") == 0.0
