"""Shared fixtures: small real Parquet datasets written to a temporary folder."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from duckharness.demo import one_day, trading_days

DST_START = dt.date(2026, 3, 4)  # six trading days from here cross the 2026-03-08 switch


def write_dataset(folder: Path, tables: Mapping[str, pa.Table], metadata: Mapping[str, Any] | None = None,
                  *, row_group_size: int = 4096, statistics: bool = True) -> list[str]:
    """Write ``{file stem: table}`` as Parquet files plus ``metadata.json`` (unless None)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, table in tables.items():
        path = folder / f"{stem}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size, write_statistics=statistics)
        paths.append(str(path))
    if metadata is not None:
        (folder / "metadata.json").write_text(json.dumps(metadata))
    return paths


SESSION = {"start_time": "09:30", "end_time": "16:00", "timezone": "US/Eastern"}


@pytest.fixture
def make_backtest(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_backtest(days=6, rows=5000, seed=0, metadata=SESSION)`` -> folder.

    Files are the demo's synthetic days (08:00-17:00 US/Eastern, crossing the DST switch).
    """
    counter = iter(range(1000))

    def make(days: int = 6, rows: int = 5000, seed: int = 0, metadata: Mapping[str, Any] | None = SESSION,
             start: dt.date = DST_START, symbols: int = 20) -> Path:
        folder = tmp_path / f"bt{next(counter)}"
        rng = np.random.default_rng(seed)
        tables = {d.isoformat(): one_day(d, rows, rng, symbols=symbols) for d in trading_days(start, days)}
        write_dataset(folder, tables, metadata)
        return folder

    return make


@pytest.fixture
def backtest(make_backtest: Callable[..., Path]) -> Path:
    """Six days x 5000 rows crossing the DST switch, with a 09:30-16:00 US/Eastern window."""
    return make_backtest()


def read_all(folder: Path | str, files: Sequence[str] | None = None) -> pa.Table:
    """Every row of a dataset, for computing references independently of duckharness."""
    paths = files or sorted(str(p) for p in Path(folder).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default")


os.environ.setdefault("POLARS_MAX_THREADS", "2")
# Tests compare runs with each other (workers, batch sizes): a shared cache would make those
# comparisons vacuous. The cache has tests of its own that turn it on explicitly.
os.environ["DUCKHARNESS_CACHE"] = "off"


def panel_day(day: dt.date, rng: np.random.Generator, *, timestamps: int = 8, symbols: int = 6,
              invalid: bool = True) -> pa.Table:
    """A small factor-research panel for one day: ``timestamps`` cross-sections of ``symbols``
    names from 15:00 UTC, predictions and targets rounded to 0.1 (so ranks have ties), volume,
    and (with ``invalid``) a NaN prediction and a NULL target on the first rows."""
    n = timestamps * symbols
    start = np.datetime64(dt.datetime.combine(day, dt.time(15, 0)), "us")
    ts = start + (np.repeat(np.arange(timestamps), symbols) * 60 * 10**6).astype("timedelta64[us]")
    pred = np.round(rng.standard_normal(n), 1)
    target = np.round(0.5 * pred + rng.standard_normal(n), 1)
    pred_1s = np.round(pred + 0.3 * rng.standard_normal(n), 1)
    target_1s = target.copy()
    target_list: list[float | None] = target.tolist()
    if invalid:
        pred[0] = np.nan
        target_list[1] = None
    return pa.table({
        "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "symbol": pa.array([f"S{i}" for i in range(symbols)] * timestamps),
        "volume": pa.array(rng.integers(1, 3000, n)),
        "pred_10s": pa.array(pred, pa.float64()),
        "target_10s": pa.array(target_list, pa.float64()),
        "pred_1s": pa.array(pred_1s, pa.float64()),
        "target_1s": pa.array(target_1s, pa.float64()),
    })


@pytest.fixture
def make_panel(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_panel(days=4, seed=0, files=None, **panel_day options)`` -> folder with one
    file per day (or ``files={stem: [day index, ...]}`` to split or join days across files) and a
    ``metadata.json`` with no session window (US/Eastern)."""
    counter = iter(range(1000))

    def make(days: int = 4, seed: int = 0, files: Mapping[str, Sequence[tuple[int, slice]]] | None = None,
             metadata: Mapping[str, Any] | None = None, **kw: Any) -> Path:
        folder = tmp_path / f"panel{next(counter)}"
        rng = np.random.default_rng(seed)
        tables = [panel_day(d, rng, **kw) for d in trading_days(DST_START, days)]
        if files is None:
            out = {d.isoformat(): t for d, t in zip(trading_days(DST_START, days), tables, strict=True)}
        else:
            def rows(i: int, s: slice) -> pa.Table:
                lo, hi = s.start or 0, s.stop or tables[i].num_rows
                return tables[i].slice(lo, hi - lo)

            out = {stem: pa.concat_tables([rows(i, s) for i, s in parts]) for stem, parts in files.items()}
        write_dataset(folder, out, {"timezone": "US/Eastern"} if metadata is None else metadata)
        return folder

    return make


# A source of files that each hold several days (a week or more, weekends included, in one row
# group unless told otherwise), with a day split over two files and the 2026-03-08 DST switch.
# Each weekday has rows at 14:00, 15:00, 17:00 and 20:30 UTC: 09:00 (outside a 09:30-16:00
# window), 10:00, 12:00 and 15:30 US/Eastern before the switch; 10:00, 11:00, 13:00 and 16:30
# (outside) after it. Presidents' Day (2026-02-16) has no rows, and 2026-02-20 only one at 14:00
# UTC (09:00 local): a day with rows, none inside the session window.
MULTIDAY_HOURS = (dt.time(14), dt.time(15), dt.time(17), dt.time(20, 30))
MULTIDAY_FILES = {  # stem: (first instant, last instant), UTC; 2026-02-11 is split between files
    "2026-02-02": (dt.datetime(2026, 2, 2), dt.datetime(2026, 2, 11, 16)),
    "2026-02-11": (dt.datetime(2026, 2, 11, 16), dt.datetime(2026, 3, 4, 23)),
    "2026-03-05": (dt.datetime(2026, 3, 5), dt.datetime(2026, 3, 28)),
}


def multiday_times() -> list[dt.datetime]:
    """Every row time of the multi-day source (UTC, naive), in order."""
    out = []
    day = dt.date(2026, 2, 2)
    while day <= dt.date(2026, 3, 27):
        if day.weekday() < 5 and day != dt.date(2026, 2, 16):
            hours = MULTIDAY_HOURS[:1] if day == dt.date(2026, 2, 20) else MULTIDAY_HOURS
            out += [dt.datetime.combine(day, h) for h in hours]
        day += dt.timedelta(days=1)
    return out


@pytest.fixture
def make_multiday(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_multiday(metadata={}, row_group_size=1_000_000, statistics=True, seed=0)`` ->
    folder of the multi-day source above (the same rows for the same seed, whatever the layout)."""
    counter = iter(range(1000))

    def make(metadata: Mapping[str, Any] | None = None, row_group_size: int = 1_000_000, statistics: bool = True,
             seed: int = 0) -> Path:
        folder = tmp_path / f"multiday{next(counter)}"
        times = multiday_times()
        rng = np.random.default_rng(seed)
        pred = rng.standard_normal(len(times))
        target = 0.3 * pred + rng.standard_normal(len(times))
        tables = {}
        for stem, (lo, hi) in MULTIDAY_FILES.items():
            rows = [i for i, t in enumerate(times) if lo <= t < hi]
            tables[stem] = pa.table({
                "ts": pa.array([times[i] for i in rows], pa.timestamp("us", tz="UTC")),
                "pred_x": pa.array(pred[rows]),
                "target_x": pa.array(target[rows]),
            })
        write_dataset(folder, tables, {} if metadata is None else metadata, row_group_size=row_group_size,
                      statistics=statistics)
        return folder

    return make


def session_days(folder: Path | str, metadata: Mapping[str, Any]) -> pl.DataFrame:
    """Every row of a dataset with its session day (``_day``), computed here with pandas: the
    local date, inside the window when ``metadata`` sets one; an overnight window's rows up to its
    end belong to the day before. Rows outside the window are dropped."""
    df = read_all(folder).to_pandas()
    wall = df["ts"].dt.tz_convert(metadata.get("timezone", "US/Eastern")).dt.tz_localize(None)
    tod, date = wall - wall.dt.normalize(), wall.dt.date  # the wall-clock time to the nanosecond

    def clock(key: str) -> pd.Timedelta | None:  # "HH:MM" or "HH:MM:SS" as a time since midnight
        if key not in metadata:
            return None
        return pd.Timedelta(metadata[key] + (":00" if metadata[key].count(":") == 1 else ""))

    start, end = clock("start_time"), clock("end_time")
    after = tod >= start if start is not None else pd.Series(True, index=df.index)
    before = tod <= end if end is not None else pd.Series(True, index=df.index)
    if start is not None and end is not None and end < start:  # overnight
        keep = after | before
        day = date.where(after, (pd.to_datetime(date) - pd.Timedelta(days=1)).dt.date)  # calendar arithmetic
    else:
        keep, day = after & before, date
    out = pl.from_pandas(df.assign(_day=day)[keep.to_numpy()])
    return out.with_columns(pl.col("_day").cast(pl.Date)).sort("ts")
