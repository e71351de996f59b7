"""A daily backtest on real data: S&P 500 returns and volatility, evaluated with duckharness.

The S&P 500 daily prices shipped inside the ``arch`` package (1999-2018) are turned into a
backtest-results dataset, one Parquet file per year plus a ``metadata.json``, with simple
forecasts made only from data known at the close of day t:

* next-day log return (``target_ret`` = r[t+1]):
  ``pred_ret_mom`` = trailing 20-day mean return (momentum),
  ``pred_ret_mr``  = -0.1 * r[t] (short-term mean reversion);
* next-day squared return (``target_sq`` = r[t+1]^2):
  ``pred_sq_ewma`` = RiskMetrics EWMA variance (lambda 0.94),
  ``pred_sq_hist`` = trailing 20-day mean of squared returns.

Features: ``abs_ret`` = |r[t]| and ``vol20`` = annualised trailing 20-day volatility in percent.
The last day has no next day: its targets are NaN, which duckharness excludes and counts in the
``n_excluded`` rows.

The harness then scores the forecasts on ``baseline`` (all days) and on ``high_vol`` (days with
``vol20`` above its full-sample median, rounded to a constant), pooled and by ``year``.

Run:  python examples/sp500_backtest.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from duckharness import Harness
from duckharness.outputs.results import format_table

WINDOW = 20            # trailing window (trading days) of the momentum, hist and vol20 columns
EWMA_LAMBDA = 0.94     # RiskMetrics daily decay
MR_SCALE = 0.1         # pred_ret_mr = -MR_SCALE * r[t]
CLOSE = "16:00"        # each row is stamped at the close, America/New_York
TIMEZONE = "America/New_York"
PAIRS = ["pred_ret_mom:target_ret", "pred_ret_mr:target_ret",
         "pred_sq_ewma:target_sq", "pred_sq_hist:target_sq"]
METRICS = ["count", "r2", "mse", "mae", "corr"]


def load_prices() -> pd.Series:
    """Daily adjusted close of the S&P 500 from ``arch.data.sp500`` (1999-01-04 .. 2018-12-31)."""
    from arch.data import sp500

    return sp500.load()["Adj Close"].astype("float64").sort_index()


def build_frame(prices: pd.Series) -> pd.DataFrame:
    """One row per day t: forecasts known at the close of t, targets of day t+1, features."""
    r = np.log(prices).diff()                          # r[t] = log(P[t] / P[t-1])
    r2 = r * r
    # EWMA variance forecast of r[t+1]^2 made at t: s[t] = lambda s[t-1] + (1 - lambda) r[t]^2,
    # seeded with the first squared return (pandas' ewm with adjust=False is exactly this recursion).
    ewma = r2.ewm(alpha=1 - EWMA_LAMBDA, adjust=False).mean()
    hist = r2.rolling(WINDOW).mean()
    day = prices.index.normalize()
    ts = (pd.DatetimeIndex(day) + pd.Timedelta(CLOSE + ":00")).tz_localize(TIMEZONE).tz_convert("UTC")
    df = pd.DataFrame({
        "ts": ts,
        "year": day.year.astype("int32"),
        "pred_ret_mom": r.rolling(WINDOW).mean().to_numpy(),
        "pred_ret_mr": (-MR_SCALE * r).to_numpy(),
        "target_ret": r.shift(-1).to_numpy(),
        "pred_sq_ewma": ewma.to_numpy(),
        "pred_sq_hist": hist.to_numpy(),
        "target_sq": r2.shift(-1).to_numpy(),
        "abs_ret": r.abs().to_numpy(),
        "vol20": (r.rolling(WINDOW).std() * np.sqrt(252) * 100).to_numpy(),
    })
    # Drop the warm-up days (no full trailing window yet). The last day is kept: its forecasts are
    # real, its targets (tomorrow) are unknown, i.e. NaN.
    warm = df[["pred_ret_mom", "pred_sq_hist", "vol20"]].notna().all(axis=1) & df["abs_ret"].notna()
    return df[warm.to_numpy()].reset_index(drop=True)


def write_dataset(df: pd.DataFrame, out: Path) -> list[Path]:
    """One Parquet file per year plus ``metadata.json`` (daily data: no session window)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for year, part in df.groupby("year", sort=True):
        path = out / f"sp500_{year}.parquet"
        part.to_parquet(path, index=False)
        paths.append(path)
    meta = {"timezone": TIMEZONE, "source": "arch.data.sp500", "frequency": "daily",
            "close": CLOSE, "ewma_lambda": EWMA_LAMBDA, "window": WINDOW}
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return paths


def high_vol_threshold(df: pd.DataFrame) -> float:
    """The constant that splits the days: full-sample median of vol20, rounded to 0.1 point."""
    return round(float(df["vol20"].median()), 1)


def evaluate(out: Path, threshold: float) -> pl.DataFrame:
    """Pooled and per-year metrics; pooled rows have ``year`` = null."""
    with Harness(out) as h:
        h.add_experiment("high_vol", f"vol20 > {threshold}")
        pooled = h.metrics(METRICS, pairs=PAIRS)
        by_year = h.metrics(METRICS, pairs=PAIRS, by="year")
    return pl.concat([pooled.with_columns(pl.lit(None, dtype=by_year.schema["year"]).alias("year"))
                      .select(by_year.columns), by_year])


def main(out_dir: str | None = None) -> pl.DataFrame:
    """Build the dataset in ``out_dir`` (a temporary folder if None), evaluate it, print the
    tables, and return the tidy metrics (pooled rows have ``year`` = null)."""
    t0 = time.perf_counter()
    df = build_frame(load_prices())
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sp500_backtest_")
        out_dir = tmp.name
    try:
        out = Path(out_dir)
        paths = write_dataset(df, out)
        threshold = high_vol_threshold(df)
        print(f"S&P 500 {df['ts'].iloc[0]:%Y-%m-%d} .. {df['ts'].iloc[-1]:%Y-%m-%d}: {len(df):,} days "
              f"in {len(paths)} files under {out}")
        print(f"high_vol: vol20 > {threshold} (annualised %, full-sample median)\n")
        result = evaluate(out, threshold)
    finally:
        if tmp is not None:
            tmp.cleanup()
    shown = result.filter(pl.col("metric") != "n_excluded")
    print("Pooled over all years")
    print(format_table(shown.filter(pl.col("year").is_null()).drop("year")))
    for exp_name in ("baseline", "high_vol"):
        print(f"\nBy year, {exp_name}")
        print(format_table(shown.filter(pl.col("year").is_not_null() & (pl.col("experiment") == exp_name))))
    print(f"\n({time.perf_counter() - t0:.2f} s)")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="folder for the Parquet files and metadata.json (default: a temporary folder)")
    main(parser.parse_args().out)
