"""Sources: listing errors, unreadable Parquet files, the schema the harness reports, and its days."""

from __future__ import annotations

import datetime as dt
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SESSION, session_days, write_dataset

import duckharness.harness as harness_module
from duckharness import DuckHarnessWarning, Harness, SourceError


def table(rows: int = 8, *, volume_type: pa.DataType | None = None, extra: dict[str, pa.Array] | None = None,
          offset_minutes: int = 0) -> pa.Table:
    start = np.datetime64("2026-03-05T15:00:00", "us") + np.timedelta64(offset_minutes, "m")
    cols: dict[str, object] = {
        "ts": pa.array(start + np.arange(rows).astype("timedelta64[m]"), pa.timestamp("us", tz="UTC")),
        "symbol": pa.array([f"S{i % 3}" for i in range(rows)]),
        "volume": pa.array(np.arange(rows) * 10, volume_type or pa.int64()),
        "target_1s": np.linspace(-1.0, 1.0, rows),
        "pred_1s": np.linspace(-0.5, 0.5, rows),
        "target_10s": np.linspace(1.0, -1.0, rows),
        "pred_10s": np.linspace(0.5, -0.5, rows),
    }
    cols.update(extra or {})
    return pa.table(cols)


def test_storage_options_on_a_local_source_warn_that_they_are_not_used(tmp_path: Path) -> None:
    # A user who meant a bucket and typed a local path would otherwise hear nothing.
    write_dataset(tmp_path / "d", {"a": table()}, {})
    with pytest.warns(DuckHarnessWarning, match=r"storage_options are for a remote source.*is local"):
        h = Harness(tmp_path / "d", storage_options={"key": "k"})
    assert h.metrics(["count"], pairs="pred_1s:target_1s")["value"][0] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Harness(tmp_path / "d").close()
    h.close()


# -- listing errors ----------------------------------------------------------------------------------

def test_glob_that_matches_nothing_is_a_source_error(tmp_path: Path) -> None:
    pattern = str(tmp_path / "*.parquet")
    with pytest.raises(SourceError, match="No Parquet files match") as info:
        Harness(pattern)
    assert pattern in str(info.value)
    assert info.value.path == pattern


def test_empty_directory_is_a_source_error(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "metadata.json").write_text("{}")  # metadata alone is not data
    with pytest.raises(SourceError, match="No Parquet files in directory") as info:
        Harness(folder)
    assert str(folder) in str(info.value)
    assert info.value.path == str(folder)


def test_missing_path_is_a_source_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "no" / "such" / "run")
    with pytest.raises(SourceError, match="does not exist") as info:
        Harness(missing)
    assert missing in str(info.value)
    assert info.value.path == missing


def test_list_with_a_missing_file_names_it(tmp_path: Path) -> None:
    good = write_dataset(tmp_path / "d", {"a": table()}, {})[0]
    missing = str(tmp_path / "d" / "b.parquet")
    with pytest.raises(SourceError, match="does not exist") as info:
        Harness([good, missing])
    assert info.value.path == missing


def test_empty_list_is_a_source_error() -> None:
    with pytest.raises(SourceError, match="empty list"):
        Harness([])


def test_source_errors_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        Harness(tmp_path / "nothing")


# -- unreadable files --------------------------------------------------------------------------------

@pytest.mark.parametrize("garbage", [
    b"this is not a parquet file" * 20,
    b"PAR1" + b"\x00" * 16 + b"PAR1",  # right magic bytes, nonsense footer
    b"",
])
def test_corrupt_parquet_file_is_named_in_source_error(tmp_path: Path, garbage: bytes) -> None:
    folder = tmp_path / "run"
    write_dataset(folder, {"2026-03-05": table(), "2026-03-09": table()}, {})
    bad = folder / "2026-03-06.parquet"
    bad.write_bytes(garbage)
    with pytest.raises(SourceError, match="Cannot read Parquet file") as info:
        Harness(folder)
    assert str(bad) in str(info.value)
    assert info.value.path == str(bad)
    # The good files are not blamed.
    assert "2026-03-05" not in str(info.value) and "2026-03-09" not in str(info.value)


def test_corrupt_file_given_directly_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"garbage" * 50)
    (tmp_path / "metadata.json").write_text("{}")
    with pytest.raises(SourceError, match=r"x\.parquet") as info:
        Harness(str(bad))
    assert info.value.path == str(bad)


# -- what the harness reports about the data ---------------------------------------------------------

@pytest.fixture
def drifted(tmp_path: Path) -> Path:
    """Two files whose schemas differ: a column only in each, and volume int32 vs int64."""
    folder = tmp_path / "drift"
    a = table(volume_type=pa.int32(), extra={"f_only_a": pa.array(np.ones(8, dtype=np.float32))})
    b = table(volume_type=pa.int64(), extra={"f_only_b": pa.array(["x"] * 8)}, offset_minutes=60)
    write_dataset(folder, {"2026-03-05a": a, "2026-03-05b": b}, {})
    return folder


def test_columns_are_the_union_of_file_schemas_with_types(drifted: Path) -> None:
    with Harness(drifted) as h:
        assert h.columns == {
            "ts": "TIMESTAMP WITH TIME ZONE",
            "symbol": "VARCHAR",
            "volume": "BIGINT",  # int32 in one file, int64 in the other: the common type
            "target_1s": "DOUBLE",
            "pred_1s": "DOUBLE",
            "target_10s": "DOUBLE",
            "pred_10s": "DOUBLE",
            "f_only_a": "FLOAT",
            "f_only_b": "VARCHAR",
        }
        # First-seen order: the first file's columns, then the second file's new ones.
        assert list(h.columns)[-2:] == ["f_only_a", "f_only_b"]


def test_columns_is_a_copy(drifted: Path) -> None:
    with Harness(drifted) as h:
        h.columns["bogus"] = "INTEGER"
        assert "bogus" not in h.columns


def test_targets_predictions_features_and_time_column(drifted: Path) -> None:
    with Harness(drifted) as h:
        assert h.targets == ["target_1s", "target_10s"]
        assert h.predictions == ["pred_1s", "pred_10s"]
        assert h.features == ["symbol", "volume", "f_only_a", "f_only_b"]
        assert h.time_column == "ts"


def test_rows_of_drifted_files_are_all_counted(drifted: Path) -> None:
    with Harness(drifted) as h:
        df = h.metrics(["count"], pairs=["pred_1s:target_1s"], window=False)
        assert df.filter(df["metric"] == "count")["value"].to_list() == [16.0]


def test_time_column_is_the_only_timestamp_when_not_named_ts(tmp_path: Path) -> None:
    t = table().rename_columns(["when", "symbol", "volume", "target_1s", "pred_1s", "target_10s", "pred_10s"])
    folder = tmp_path / "d"
    write_dataset(folder, {"a": t}, {})
    with Harness(folder) as h:
        assert h.time_column == "when"
        assert "when" not in h.features


def test_no_time_column_when_data_has_no_timestamp(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    write_dataset(folder, {"a": table().drop_columns(["ts"])}, {})
    with Harness(folder) as h:
        assert h.time_column is None
        assert h.features == ["symbol", "volume"]


def test_glob_source_lists_only_matching_files_in_order(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    paths = write_dataset(folder, {"2026-03-06": table(), "2026-03-05": table(), "other": table()}, {})
    with Harness(str(folder / "2026-*.parquet")) as h:
        assert h.files == sorted(p for p in paths if "2026-" in Path(p).name)


def test_nested_parquet_files_are_found_in_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    write_dataset(folder / "2026" / "03", {"05": table()}, None)
    (folder / "metadata.json").write_text("{}")
    with Harness(folder) as h:
        assert [Path(p).name for p in h.files] == ["05.parquet"]


def test_file_row_counts_come_from_footers(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    paths = write_dataset(folder, {"a": table(rows=5), "b": table(rows=11)}, {})
    with Harness(folder) as h:
        assert {f.path: f.rows for f in h.dataset.files} == {paths[0]: 5, paths[1]: 11}
        assert [pq.ParquetFile(p).metadata.num_rows for p in paths] == [5, 11]


# -- days: info, repr and by="day" agree, on files that hold several days -----------------------------

OVERNIGHT = {"start_time": "18:00", "end_time": "16:00", "timezone": "US/Eastern"}
LAYOUTS = {  # one row group per file; row groups whose statistics show most days; no statistics
    "one-group": {}, "small-groups": {"row_group_size": 3}, "no-statistics": {"statistics": False}}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("metadata", [{}, SESSION, OVERNIGHT], ids=["no-window", "session", "overnight"])
def test_info_and_repr_count_the_days_that_hold_rows_as_by_day_labels_them(
        make_multiday: Callable[..., Path], metadata: dict, layout: str) -> None:
    folder = make_multiday(metadata, **LAYOUTS[layout])
    want = sorted(set(session_days(folder, metadata)["_day"].to_list()))
    # The reference skips weekends, the holiday and (with a window) 2026-02-20, whose only row is
    # outside it; overnight, a weekday's rows before 16:00 belong to the session of the evening before.
    assert len(want) < (want[-1] - want[0]).days + 1
    with Harness(folder) as h:
        info = h.info()
        assert (info["days"], info["first_day"], info["last_day"]) == (
            len(want), want[0].isoformat(), want[-1].isoformat())
        assert f"days={len(want)}," in repr(h)
        by_day = h.metrics(["count"], by="day")
        held = by_day.filter((pl.col("metric") == "count") & (pl.col("value") > 0))["day"].sort().to_list()
        assert held == want


def test_repr_counts_days_in_a_fresh_harness_without_info(make_multiday: Callable[..., Path]) -> None:
    folder = make_multiday(SESSION)
    want = set(session_days(folder, SESSION)["_day"].to_list())
    assert f"days={len(want)}," in repr(Harness(folder))


def test_a_day_split_over_two_files_is_one_day(make_panel: Callable[..., Path]) -> None:
    # Day 0's rows are split between a.parquet and b.parquet; b.parquet also holds day 1.
    folder = make_panel(days=2, files={"a": [(0, slice(0, 20))], "b": [(0, slice(20, None)), (1, slice(None))]})
    want = sorted(set(session_days(folder, {})["_day"].to_list()))
    assert len(want) == 2
    with Harness(folder) as h:
        assert (h.info()["days"], h.info()["first_day"], h.info()["last_day"]) == (
            2, want[0].isoformat(), want[1].isoformat())
        assert "files=2, days=2," in repr(h)


def test_repr_of_a_source_too_large_to_read_shows_the_range_the_footers_allow(
        make_multiday: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness_module, "REPR_READ_ROWS", 0)
    folder = make_multiday(SESSION)  # one row group per file: footers leave most days open
    n = len(set(session_days(folder, SESSION)["_day"].to_list()))
    with Harness(folder) as h:
        shown = re.search(r"days=(\d+)\.\.(\d+),", repr(h))
        assert shown is not None
        lo, hi = int(shown.group(1)), int(shown.group(2))
        assert lo <= n <= hi and lo < hi
        h.info()  # reads what the footers left open: the repr shows the exact count from then on
        assert f"days={n}," in repr(h)


def test_days_of_nanosecond_times_just_past_the_window_end_are_not_counted(tmp_path: Path) -> None:
    # Parquet statistics of nanosecond times read truncated to the microsecond: 16:00:00.0000005
    # reads as 16:00:00, the window's inclusive end, yet the row lies outside the window.
    def day(d: str, last: str) -> pa.Table:
        ts = np.array([f"{d}T14:00:00", f"{d}T{last}"], dtype="datetime64[ns]")  # 09:00 and ~16:00 EST
        return pa.table({"ts": pa.array(ts, pa.timestamp("ns", tz="UTC")),
                         "pred_x": [0.1, 0.2], "target_x": [0.3, 0.1]})

    folder = tmp_path / "ns"
    write_dataset(folder, {"a": day("2026-03-05", "21:00:00.000000500"), "b": day("2026-03-06", "21:00:00")}, SESSION)
    want = sorted(set(session_days(folder, SESSION)["_day"].to_list()))
    assert want == [dt.date(2026, 3, 6)]
    with Harness(folder) as h:
        assert (h.info()["days"], h.info()["first_day"]) == (1, "2026-03-06")
        by_day = h.metrics(["count"], by="day")
        assert by_day.filter((pl.col("metric") == "count") & (pl.col("value") > 0))["day"].to_list() == want
