"""Shared fixtures: small real Parquet datasets written to a temporary folder."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from duckharness.demo import one_day, trading_days

DST_START = dt.date(2026, 3, 4)  # six trading days from here cross the 2026-03-08 switch


def write_dataset(folder: Path, tables: Mapping[str, pa.Table], metadata: Mapping[str, Any] | None = None,
                  *, row_group_size: int = 4096) -> list[str]:
    """Write ``{file stem: table}`` as Parquet files plus ``metadata.json`` (unless None)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, table in tables.items():
        path = folder / f"{stem}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
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
