"""A realistic sample dataset for ``duckharness demo`` and the tests.

Several trading days of synthetic high-frequency backtest results, one Parquet file per day,
rows from 08:00 to 17:00 US/Eastern (so the 09:30–16:00 session window has work to do), dates
that cross the US daylight-saving switch of 2026-03-08, and the usual columns: ``ts``, ``symbol``,
features ``f_*``, ``volume``, ``spread``, and ``target_<h>``/``pred_<h>`` per horizon.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import zoneinfo

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HORIZONS = ("1s", "10s", "60s")
DEMO_EXPERIMENTS = """\
-- experiment: liquid
SELECT * FROM baseline WHERE volume > 1000;
-- experiment: tight
SELECT * FROM liquid WHERE spread < 0.02;
-- experiment: clipped
-- (least/greatest skip NULLs and rank NaN above every number: the if() keeps a missing
-- prediction missing instead of turning it into 0.5)
SELECT * REPLACE (
    if(isfinite(pred_1s), greatest(least(pred_1s, 0.5), -0.5), pred_1s) AS pred_1s,
    if(isfinite(pred_10s), greatest(least(pred_10s, 0.5), -0.5), pred_10s) AS pred_10s,
    if(isfinite(pred_60s), greatest(least(pred_60s, 0.5), -0.5), pred_60s) AS pred_60s
) FROM baseline;
"""


def trading_days(start: dt.date, n: int) -> list[dt.date]:
    """The first ``n`` weekdays from ``start``."""
    days: list[dt.date] = []
    d = start
    while len(days) < n:
        if d.weekday() < 5:
            days.append(d)
        d += dt.timedelta(days=1)
    return days


def one_day(day: dt.date, rows: int, rng: np.random.Generator, symbols: int = 50) -> pa.Table:
    tz = zoneinfo.ZoneInfo("US/Eastern")
    open_utc = dt.datetime.combine(day, dt.time(8, 0), tz).astimezone(dt.UTC)
    start = np.datetime64(open_utc.replace(tzinfo=None), "us")
    offsets = np.sort(rng.integers(0, 9 * 3600 * 10**6, rows)).astype("timedelta64[us]")
    feats = rng.standard_normal((rows, 4))
    cols: dict[str, object] = {
        "ts": pa.array(start + offsets, pa.timestamp("us", tz="UTC")),
        "symbol": pa.array(rng.choice([f"S{i:03d}" for i in range(symbols)], rows)),
    }
    for i, name in enumerate(["imb", "mom", "vol", "ofi"]):
        cols[f"f_{name}"] = feats[:, i]
    cols["volume"] = rng.integers(1, 5000, rows)
    cols["spread"] = np.abs(rng.standard_normal(rows)) * 0.01 + 0.01
    for k, h in enumerate(HORIZONS):
        signal = 0.3 / (k + 1) * feats[:, k] + 0.1 * feats[:, 3]
        cols[f"target_{h}"] = signal + rng.standard_normal(rows) * (0.5 + 0.5 * k)
        cols[f"pred_{h}"] = signal * 0.8 + rng.standard_normal(rows) * 0.1
    return pa.table(cols)


DEMO_FILES = ("metadata.json", "experiments.sql")


def write_demo_dataset(
    out: str | os.PathLike[str],
    *,
    days: int = 6,
    rows: int = 20_000,
    start: dt.date = dt.date(2026, 3, 4),
    seed: int = 0,
    overwrite: bool = False,
) -> list[str]:
    """Write ``days`` daily files (crossing the 2026-03-08 DST switch), ``metadata.json`` and
    ``experiments.sql``.

    ``out`` must be new or empty; with ``overwrite`` it may hold an earlier demo dataset, which is
    replaced whole. A folder holding anything else is never written into.

    Returns the paths of the Parquet files written.
    """
    from duckharness.errors import InputError
    from duckharness.outputs.paths import check_output

    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"{out} is a file; give a folder for the demo dataset.")
    check_output(out, kind="folder", overwrite=True)  # a missing or unwritable parent, named
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if entries and not overwrite:
        raise InputError(
            f"Folder {out} is not empty; choose a new folder, or pass --overwrite (overwrite=True) to "
            f"replace an earlier demo dataset there."
        )
    if entries:  # --overwrite: only an earlier demo, whole, is replaced
        try:
            with open(os.path.join(out, "metadata.json")) as fh:
                is_demo = json.load(fh).get("model") == "synthetic-demo"
        except (OSError, ValueError, AttributeError):
            is_demo = False
        if not is_demo:
            what = "Parquet files" if any(e.endswith(".parquet") for e in entries) else "files"
            raise InputError(
                f"Folder {out} already holds {what} that are not a demo dataset ({', '.join(entries[:3])}"
                f"{', …' if len(entries) > 3 else ''}); choose an empty or new folder."
            )
        foreign = [e for e in entries if e not in DEMO_FILES and not re.fullmatch(r"\d{4}-\d{2}-\d{2}\.parquet", e)]
        if foreign:
            kind = "Parquet files" if all(e.endswith(".parquet") for e in foreign) else "files"
            raise InputError(
                f"Folder {out} holds {kind} a demo does not write ({', '.join(foreign)}); not replacing "
                f"it. Move them away or choose another folder."
            )
    # Everything is written to a hidden folder beside ``out`` first, which then takes its place
    # (an earlier demo is moved aside and removed), so an interruption (or a full disk) leaves
    # ``out`` as it was: absent, empty, or the earlier demo whole.
    import shutil

    from duckharness.outputs.paths import rename_no_replace, replace_folder, temporary_name

    out = os.path.abspath(os.fspath(out))
    staging = temporary_name(out)
    os.mkdir(staging)
    try:
        rng = np.random.default_rng(seed)
        names = []
        for day in trading_days(start, days):
            names.append(f"{day.isoformat()}.parquet")
            pq.write_table(
                one_day(day, rows, rng), os.path.join(staging, names[-1]), row_group_size=max(1024, rows // 8)
            )
        meta = {
            "start_time": "09:30:00",
            "end_time": "16:00:00",
            "timezone": "US/Eastern",
            "model": "synthetic-demo",
            "horizons": list(HORIZONS),
        }
        with open(os.path.join(staging, "metadata.json"), "w") as f:
            json.dump(meta, f, indent=2)
        with open(os.path.join(staging, "experiments.sql"), "w") as f:
            f.write(DEMO_EXPERIMENTS)
        if not (os.path.isdir(out) and replace_folder(staging, out)):  # empty, or an earlier demo
            rename_no_replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    paths = [os.path.join(out, n) for n in names]
    return paths
