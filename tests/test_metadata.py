"""metadata.json: parsing, validation errors that name the file and key, and session-window bounds."""

from __future__ import annotations

import datetime as dt
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import write_dataset

from duckharness import Harness, MetadataError, SessionWindow
from duckharness.data.metadata import DEFAULT_TIMEZONE, parse_metadata, parse_metadata_text
from duckharness.errors import DuckHarnessWarning, InputError

UTC = dt.UTC


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def small_table(rows: int = 10) -> pa.Table:
    start = np.datetime64("2026-03-05T14:00:00", "us")
    return pa.table({
        "ts": pa.array(start + np.arange(rows).astype("timedelta64[m]"), pa.timestamp("us", tz="UTC")),
        "volume": np.arange(rows, dtype=np.int64),
        "pred_a": np.linspace(-1, 1, rows),
        "target_a": np.linspace(1, -1, rows),
    })


def folder_with_metadata(tmp_path: Path, text: str | None, table: pa.Table | None = None) -> Path:
    folder = tmp_path / "data"
    write_dataset(folder, {"day1": table if table is not None else small_table()}, None)
    if text is not None:
        (folder / "metadata.json").write_text(text)
    return folder


# -- valid metadata -------------------------------------------------------------------------------

def test_hh_mm_times_parse_to_a_session_window(tmp_path: Path) -> None:
    folder = folder_with_metadata(tmp_path, json.dumps({"start_time": "09:30", "end_time": "16:00",
                                                         "timezone": "America/Chicago"}))
    with Harness(folder) as h:
        meta = h.metadata
        assert meta.start_time == dt.time(9, 30)
        assert meta.end_time == dt.time(16, 0)
        assert meta.timezone == "America/Chicago"
        assert meta.path == str(folder / "metadata.json")
        assert h.session_window == SessionWindow(dt.time(9, 30), dt.time(16), "America/Chicago")


def test_hh_mm_ss_times_keep_their_seconds() -> None:
    meta = parse_metadata({"start_time": "09:30:15", "end_time": "15:59:59"})
    assert meta.start_time == dt.time(9, 30, 15)
    assert meta.end_time == dt.time(15, 59, 59)
    assert meta.session_window is not None
    assert meta.session_window.describe() == "09:30:15–15:59:59 US/Eastern"


def test_timezone_defaults_to_us_eastern(tmp_path: Path) -> None:
    folder = folder_with_metadata(tmp_path, json.dumps({"start_time": "09:30", "end_time": "16:00"}))
    with Harness(folder) as h:
        assert DEFAULT_TIMEZONE == "US/Eastern"
        assert h.metadata.timezone == "US/Eastern"
        assert h.session_window is not None and h.session_window.timezone == "US/Eastern"


def test_empty_metadata_object_means_no_window_and_default_timezone(tmp_path: Path) -> None:
    folder = folder_with_metadata(tmp_path, "{}")
    with Harness(folder) as h:
        assert h.session_window is None
        assert h.metadata.timezone == "US/Eastern"
        assert dict(h.metadata.extra) == {}


def test_unknown_keys_are_kept_in_extra(tmp_path: Path) -> None:
    raw = {"start_time": "09:30", "end_time": "16:00", "model": "gbm-v3", "horizons": ["1s", "10s"],
           "params": {"depth": 6}}
    folder = folder_with_metadata(tmp_path, json.dumps(raw))
    with Harness(folder) as h:
        assert dict(h.metadata.extra) == {"model": "gbm-v3", "horizons": ["1s", "10s"], "params": {"depth": 6}}
        # Known keys are not duplicated in extra, and as_dict gives everything back.
        assert "start_time" not in h.metadata.extra
        extra = {k: raw[k] for k in ("model", "horizons", "params")}
        assert h.metadata.as_dict() == {"start_time": "09:30:00", "end_time": "16:00:00",
                                        "timezone": "US/Eastern", **extra}


@pytest.mark.parametrize(("key", "meant"), [("start", "start_time"), ("Start_Time", "start_time"),
                                           ("end_tme", "end_time"), ("tz", "timezone")])
def test_a_misspelled_key_warns_naming_the_key_it_looks_like(tmp_path: Path, key: str, meant: str) -> None:
    """Before, {"start": "09:30", "end": "16:00"} silently ran with no session window at all."""
    raw = {"start_time": "09:30", "end_time": "16:00", "timezone": "US/Eastern"}
    raw.pop(meant)
    folder = folder_with_metadata(tmp_path, json.dumps({**raw, key: "US/Eastern" if meant == "timezone" else "10:00"}))
    with pytest.warns(DuckHarnessWarning, match=rf"Key '{key}' in .*metadata.json .*did you mean '{meant}'") as caught:
        Harness(folder).close()
    assert {w.filename for w in caught} == {__file__}
    with pytest.warns(DuckHarnessWarning, match=rf"Key '{key}' in the metadata .*'{meant}'"):
        Harness(folder, metadata={**raw, key: "10:00"}).close()


def test_other_keys_and_near_names_of_other_things_do_not_warn(tmp_path: Path) -> None:
    raw = {"start_time": "09:30", "end_time": "16:00", "start_date": "2026-01-02", "end_date": "2026-03-31",
           "model": "gbm", "horizons": ["1s"], "time_zone_note": "exchange time"}
    folder = folder_with_metadata(tmp_path, json.dumps(raw))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DuckHarnessWarning)
        Harness(folder).close()


def test_metadata_mapping_passed_to_harness_replaces_the_file(tmp_path: Path) -> None:
    folder = folder_with_metadata(tmp_path, None)  # no metadata.json at all
    with Harness(folder, metadata={"start_time": "10:00", "timezone": "Europe/London"}) as h:
        assert h.metadata.start_time == dt.time(10)
        assert h.metadata.timezone == "Europe/London"
        assert h.metadata.path is None


def test_time_column_from_metadata_is_used(tmp_path: Path) -> None:
    table = small_table().append_column("ts2", small_table()["ts"])
    folder = folder_with_metadata(tmp_path, json.dumps({"time_column": "ts2"}), table)
    with Harness(folder) as h:
        assert h.time_column == "ts2"


# -- errors -----------------------------------------------------------------------------------------

def test_missing_metadata_file_names_the_expected_path(tmp_path: Path) -> None:
    folder = folder_with_metadata(tmp_path, None)
    expected = str(folder / "metadata.json")
    with pytest.raises(MetadataError, match="not found") as info:
        Harness(folder)
    assert expected in str(info.value)
    assert info.value.path == expected


def test_explicit_metadata_path_that_does_not_exist_is_named(tmp_path: Path) -> None:
    folder = folder_with_metadata(tmp_path, "{}")
    missing = tmp_path / "elsewhere" / "meta.json"
    with pytest.raises(MetadataError, match=r"meta\.json") as info:
        Harness(folder, metadata=str(missing))
    assert info.value.path == str(missing)


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    folder = folder_with_metadata(tmp_path, '{"start_time": "09:30",')
    path = str(folder / "metadata.json")
    with pytest.raises(MetadataError, match="not valid JSON") as info:
        Harness(folder)
    assert path in str(info.value)
    assert info.value.path == path


def test_json_that_is_not_an_object_is_rejected() -> None:
    with pytest.raises(MetadataError, match="JSON object") as info:
        parse_metadata_text("[1, 2, 3]", path="/x/metadata.json")
    assert info.value.path == "/x/metadata.json"


def test_unknown_time_zone_names_the_timezone_key(tmp_path: Path) -> None:
    folder = folder_with_metadata(tmp_path, json.dumps({"start_time": "09:30", "timezone": "Mars/Olympus_Mons"}))
    with pytest.raises(MetadataError, match=r"Unknown time zone 'Mars/Olympus_Mons' for key 'timezone'") as info:
        Harness(folder)
    assert info.value.key == "timezone"
    assert info.value.path == str(folder / "metadata.json")


@pytest.mark.parametrize("bad", [123, "", None])
def test_timezone_that_is_not_a_name_is_rejected(bad: object) -> None:
    with pytest.raises(MetadataError, match="'timezone'") as info:
        parse_metadata({"timezone": bad})
    assert info.value.key == "timezone"


@pytest.mark.parametrize(("key", "text", "why"), [
    ("start_time", "9.30", "must be a wall-clock time"),
    ("end_time", "25:00", "not a valid time of day"),
    ("start_time", "09:60", "not a valid time of day"),
    ("end_time", "16h00", "must be a wall-clock time"),
    ("start_time", "", "must be a wall-clock time"),
    ("end_time", 1600, "must be a wall-clock time"),
])
def test_malformed_times_name_the_key_and_value(key: str, text: object, why: str) -> None:
    with pytest.raises(MetadataError, match=why) as info:
        parse_metadata({key: text}, path="/data/metadata.json")
    message = str(info.value)
    assert repr(key) in message
    assert repr(text) in message
    assert "/data/metadata.json" in message
    assert info.value.key == key


def test_malformed_time_in_file_fails_when_the_harness_opens(tmp_path: Path) -> None:
    folder = folder_with_metadata(tmp_path, json.dumps({"start_time": "9.30", "end_time": "16:00"}))
    with pytest.raises(MetadataError, match=r"'start_time'.*'9\.30'") as info:
        Harness(folder)
    assert info.value.path == str(folder / "metadata.json")


def test_time_column_naming_a_missing_column_is_an_error(tmp_path: Path) -> None:
    folder = folder_with_metadata(tmp_path, json.dumps({"time_column": "when"}))
    with pytest.raises(MetadataError, match=r"'time_column'.*'when'") as info:
        Harness(folder)
    assert info.value.key == "time_column"
    assert "ts" in str(info.value)  # lists the columns that do exist


def test_time_column_that_is_not_a_timestamp_is_an_error(tmp_path: Path) -> None:
    folder = folder_with_metadata(tmp_path, json.dumps({"time_column": "volume"}))
    with pytest.raises(MetadataError, match=r"'volume'.*not a timestamp") as info:
        Harness(folder)
    assert info.value.key == "time_column"


def test_daily_data_with_a_date_column_is_told_to_group_by_it_by_name(tmp_path: Path) -> None:
    # A DATE has no time of day for a window or a zone: it cannot be the time column, and both
    # errors say how to get per-date results instead, which then match a pandas groupby.
    rng = np.random.default_rng(4)
    dates = [dt.date(2026, 3, 2) + dt.timedelta(days=int(i)) for i in rng.integers(0, 5, 200)]
    p, t = rng.standard_normal(200), rng.standard_normal(200)
    table = pa.table({"ts": pa.array(dates, pa.date32()), "pred_a": p, "target_a": t})
    named = folder_with_metadata(tmp_path / "named", json.dumps({"time_column": "ts"}), table)
    with pytest.raises(MetadataError, match=r"'ts' of type DATE, not a timestamp\. .*by='ts'"):
        Harness(named)
    folder = folder_with_metadata(tmp_path / "plain", "{}", table)
    h = Harness(folder)
    with pytest.raises(InputError, match=r"Cannot group by day.*DATE column.*by='ts'"):
        h.metrics(["count"], by="day")
    # Per-day statistics refuse too (rank_ic gave one Spearman over all rows, labelled day null,
    # and summary called it a series of one day); so do buckets and partitions by day.
    with pytest.raises(InputError, match=r"rank IC is computed within each day.*no time column.*by='ts'"):
        h.rank_ic("pred_a:target_a")
    with pytest.raises(InputError, match=r"rank IC is computed within each day"):
        h.summary(["rank_ic"], "pred_a:target_a")
    with pytest.raises(InputError, match=r'Buckets by="day".*no time column'):
        h.deciles("pred_a:target_a", by="day")
    with pytest.raises(InputError, match=r"Cannot group by 'tod:1h': the source has no time column \("):
        h.metrics(["count"], by="tod:1h")
    with pytest.raises(InputError, match=r"Cannot partition experiment 'baseline' by day: the source has no time"):
        h.sink("baseline", tmp_path / "out", partition_by="day")
    got = h.metrics(["count", "mse"], by="ts")
    frame = pd.DataFrame({"d": dates, "se": (p - t) ** 2})
    want = frame.groupby("d")["se"].agg(["count", "mean"])
    assert dict(got.filter(metric="count").select("ts", "value").rows()) == want["count"].astype(float).to_dict()
    mse = dict(got.filter(metric="mse").select("ts", "value").rows())
    assert mse == pytest.approx(want["mean"].to_dict(), rel=1e-12)


@pytest.mark.parametrize(("columns", "why"), [
    ({"when": pa.array(["2026-03-05 14:00"] * 3)}, r"the data has no timestamp column\. Columns: when VARCHAR"),
    ({"ts": pa.array(["2026-03-05 14:00"] * 3)}, r"column 'ts' is VARCHAR, not a timestamp"),
    ({"a": pa.array([dt.datetime(2026, 3, 5)] * 3), "b": pa.array([dt.datetime(2026, 3, 5)] * 3)},
     r"the time column is ambiguous \(timestamp columns: a, b\); set 'time_column'"),
])
def test_a_window_without_one_timestamp_column_says_what_the_data_has(tmp_path: Path, columns: dict,
                                                                      why: str) -> None:
    """Before, a source with no timestamp column was said to have an 'ambiguous' one."""
    table = pa.table({**columns, "pred_a": [0.1, 0.2, 0.3], "target_a": [0.3, 0.2, 0.1]})
    folder = folder_with_metadata(tmp_path, json.dumps({"start_time": "09:30"}), table)
    with pytest.raises(MetadataError, match=r"metadata\.json sets a session window but " + why) as info:
        Harness(folder)
    assert info.value.key == "time_column"


def test_time_column_that_is_not_a_string_is_an_error() -> None:
    with pytest.raises(MetadataError, match="time_column") as info:
        parse_metadata({"time_column": 5})
    assert info.value.key == "time_column"


def test_metadata_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="timezone"):
        parse_metadata({"timezone": "Nowhere/Nothing"})


# -- SessionWindow.bounds around the US daylight-saving switches ------------------------------------
# 2026: clocks go forward on Sunday 2026-03-08 at 02:00 EST (UTC-5 -> UTC-4) and back on Sunday
# 2026-11-01 at 02:00 EDT (UTC-4 -> UTC-5).

REGULAR = SessionWindow(dt.time(9, 30), dt.time(16), "US/Eastern")


@pytest.mark.parametrize(("day", "lo", "hi"), [
    (dt.date(2026, 3, 6), utc(2026, 3, 6, 14, 30), utc(2026, 3, 6, 21, 0)),    # Friday, EST
    (dt.date(2026, 3, 9), utc(2026, 3, 9, 13, 30), utc(2026, 3, 9, 20, 0)),    # Monday, EDT
    (dt.date(2026, 10, 30), utc(2026, 10, 30, 13, 30), utc(2026, 10, 30, 20, 0)),  # Friday, EDT
    (dt.date(2026, 11, 2), utc(2026, 11, 2, 14, 30), utc(2026, 11, 2, 21, 0)),     # Monday, EST
])
def test_regular_session_bounds_either_side_of_dst_switch(day: dt.date, lo: dt.datetime, hi: dt.datetime) -> None:
    got_lo, got_hi, inclusive = REGULAR.bounds(day)
    assert (got_lo, got_hi, inclusive) == (lo, hi, True)
    assert got_lo.utcoffset() == dt.timedelta(0) and got_hi.utcoffset() == dt.timedelta(0)


def test_window_on_spring_forward_day_is_one_hour_shorter_in_real_time() -> None:
    w = SessionWindow(dt.time(0, 0), dt.time(4, 0), "US/Eastern")
    lo, hi, _ = w.bounds(dt.date(2026, 3, 8))
    assert lo == utc(2026, 3, 8, 5, 0)   # 00:00 EST
    assert hi == utc(2026, 3, 8, 8, 0)   # 04:00 EDT
    assert hi - lo == dt.timedelta(hours=3)


def test_window_on_fall_back_day_is_one_hour_longer_in_real_time() -> None:
    w = SessionWindow(dt.time(0, 0), dt.time(4, 0), "US/Eastern")
    lo, hi, _ = w.bounds(dt.date(2026, 11, 1))
    assert lo == utc(2026, 11, 1, 4, 0)  # 00:00 EDT
    assert hi == utc(2026, 11, 1, 9, 0)  # 04:00 EST
    assert hi - lo == dt.timedelta(hours=5)


def test_overnight_window_across_spring_forward_ends_next_day_in_new_offset() -> None:
    w = SessionWindow(dt.time(18, 0), dt.time(6, 0), "US/Eastern")
    assert w.overnight
    lo, hi, inclusive = w.bounds(dt.date(2026, 3, 7))
    assert lo == utc(2026, 3, 7, 23, 0)  # 18:00 EST on Saturday
    assert hi == utc(2026, 3, 8, 10, 0)  # 06:00 EDT on Sunday
    assert inclusive is True


def test_overnight_window_across_fall_back() -> None:
    w = SessionWindow(dt.time(22, 0), dt.time(3, 0), "US/Eastern")
    lo, hi, _ = w.bounds(dt.date(2026, 10, 31))
    assert lo == utc(2026, 11, 1, 2, 0)  # 22:00 EDT on Saturday
    assert hi == utc(2026, 11, 1, 8, 0)  # 03:00 EST on Sunday
    assert hi - lo == dt.timedelta(hours=6)


def test_open_ended_window_runs_to_next_local_midnight_exclusive() -> None:
    w = SessionWindow(dt.time(9, 30), None, "US/Eastern")
    lo, hi, inclusive = w.bounds(dt.date(2026, 3, 8))
    assert lo == utc(2026, 3, 8, 13, 30)  # 09:30 EDT
    assert hi == utc(2026, 3, 9, 4, 0)    # midnight EDT
    assert inclusive is False


def test_window_without_start_begins_at_local_midnight() -> None:
    w = SessionWindow(None, dt.time(16), "US/Eastern")
    lo, hi, inclusive = w.bounds(dt.date(2026, 3, 8))
    assert lo == utc(2026, 3, 8, 5, 0)    # midnight EST (before the switch)
    assert hi == utc(2026, 3, 8, 20, 0)   # 16:00 EDT
    assert inclusive is True


def test_bounds_follow_european_dst_dates_not_us_ones() -> None:
    w = SessionWindow(dt.time(8, 0), dt.time(16, 30), "Europe/London")
    # 2026-03-09 is after the US switch but London is still on GMT until 2026-03-29.
    assert w.bounds(dt.date(2026, 3, 9))[:2] == (utc(2026, 3, 9, 8, 0), utc(2026, 3, 9, 16, 30))
    assert w.bounds(dt.date(2026, 3, 30))[:2] == (utc(2026, 3, 30, 7, 0), utc(2026, 3, 30, 15, 30))


def test_a_window_that_starts_and_ends_at_one_time_is_refused_naming_the_file(tmp_path: Path) -> None:
    """10:00-10:00 could mean nothing or a whole day whose 10:00 row belongs to two days."""
    path = tmp_path / "metadata.json"
    with pytest.raises(MetadataError, match=f"'start_time' and 'end_time' in {path} are both 10:00:00"):
        parse_metadata({"start_time": "10:00", "end_time": "10:00:00"}, path=str(path))


def test_a_per_call_window_that_starts_and_ends_at_one_time_is_an_input_error(tmp_path: Path) -> None:
    from duckharness import InputError

    rows = 10
    ts = pa.array(np.datetime64("2026-03-04T15:00", "us") + np.arange(rows).astype("timedelta64[m]"),
                  pa.timestamp("us", tz="UTC"))
    write_dataset(tmp_path / "d", {"2026-03-04": pa.table({"ts": ts, "pred_a": np.ones(rows),
                                                          "target_a": np.ones(rows)})}, {})
    same = "Window 10:00:00-10:00:00 starts and ends at the same time"
    with Harness(tmp_path / "d", cache=False) as h, pytest.raises(InputError, match=same):
        h.metrics(["count"], window=("10:00", "10:00"))


# -- SessionWindow built in Python ---------------------------------------------------------------------

def test_session_window_takes_hh_mm_strings_for_its_bounds() -> None:
    """Before, SessionWindow(start="10:00", end="11:00") was built and then failed in datetime.combine."""
    w = SessionWindow(start="09:30", end="16:00:30")
    assert w == SessionWindow(dt.time(9, 30), dt.time(16, 0, 30), "US/Eastern")
    assert w.bounds(dt.date(2026, 3, 9))[:2] == (utc(2026, 3, 9, 13, 30), utc(2026, 3, 9, 20, 0, 30))
    assert SessionWindow("22:00", "06:00", "Europe/London").overnight
    assert SessionWindow(None, "11:00").start is None


@pytest.mark.parametrize(("start", "end", "key", "why"), [
    ("9.30", None, "start", r"Window start must be a wall-clock time 'HH:MM' or 'HH:MM:SS', got '9.30'"),
    (None, "25:00", "end", r"Window end is not a valid time of day: '25:00'"),
    (930, None, "start", r"Window start must be a datetime.time or a wall-clock time .* got 930"),
    (dt.datetime(2026, 3, 9, 10), None, "start", r"Window start must be a datetime.time"),
    (dt.time(10, tzinfo=UTC), None, "start", r"Window start 10:00:00\+00:00 carries a time zone"),
    ("10:00", dt.time(10), "end", r"Window 10:00:00-10:00:00 starts and ends at the same time"),
])
def test_a_session_window_bound_that_is_not_a_wall_clock_time_is_refused_naming_it(
        start: object, end: object, key: str, why: str) -> None:
    with pytest.raises(MetadataError, match=why) as info:
        SessionWindow(start, end)  # type: ignore[arg-type]
    assert info.value.key == key
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("tz", "why"), [
    ("Mars/Olympus_Mons", r"Unknown time zone 'Mars/Olympus_Mons' for the window's timezone; use an IANA name"),
    ("", r"The window's timezone must be an IANA time zone name .* got ''"),
    (None, r"The window's timezone must be an IANA time zone name .* got None"),
])
def test_a_session_window_in_an_unknown_time_zone_is_refused_when_built(tz: object, why: str) -> None:
    """Before, it was accepted and failed at the first run with zoneinfo's own error."""
    with pytest.raises(MetadataError, match=why) as info:
        SessionWindow("09:30", "16:00", tz)  # type: ignore[arg-type]
    assert info.value.key == "timezone"


def _zoned(zone: str) -> pa.Table:
    start = np.datetime64("2026-05-05T01:00:00", "us")  # 10:00 in Tokyo
    return pa.table({"ts": pa.array(start + np.arange(5).astype("timedelta64[h]"), pa.timestamp("us", tz=zone)),
                     "pred_x": [0.1, 0.2, 0.3, 0.4, 0.5], "target_x": [0.1, 0.3, 0.2, 0.5, 0.4]})


def test_data_written_in_another_zone_than_the_default_warns_when_metadata_names_none(tmp_path: Path) -> None:
    """Before: silently US/Eastern days, so one Tokyo morning (10:00-14:00) was two days."""
    write_dataset(tmp_path, {"2026-05-05": _zoned("Asia/Tokyo")}, {})
    with pytest.warns(DuckHarnessWarning, match=r"names no timezone, so sessions and days are US/Eastern .*"
                                                r"2026-05-05\.parquet stores 'ts' in time zone Asia/Tokyo\. .*"
                                                r'"timezone": "Asia/Tokyo"') as caught:
        h = Harness(tmp_path, cache=False)
    assert {w.filename for w in caught} == {__file__}
    days = h.metrics(["count"], pairs="pred_x", by="day").filter(metric="count")
    assert days["day"].to_list() == [dt.date(2026, 5, 4), dt.date(2026, 5, 5)]  # the default, as warned


@pytest.mark.parametrize(("zone", "metadata"), [
    ("Asia/Tokyo", {"timezone": "Asia/Tokyo"}),   # named: the user chose
    ("Asia/Tokyo", {"timezone": "US/Eastern"}),   # named, even if it differs
    ("America/New_York", {}),                      # the default's clock under another name
    ("UTC", {}),                                   # stored in UTC: says nothing of the market
])
def test_no_zone_warning_when_metadata_names_one_or_the_data_agrees(tmp_path: Path, zone: str,
                                                                    metadata: dict) -> None:
    write_dataset(tmp_path, {"2026-05-05": _zoned(zone)}, metadata)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Harness(tmp_path, cache=False).close()
