"""The session window: local wall-clock time on each day, DST-correct, inclusive at both ends.

References are computed per row in Python with ``zoneinfo``: a row is in the window when its
local wall-clock time is within [start, end]; its day is its local date.
"""

from __future__ import annotations

import datetime as dt
import json
import zoneinfo
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SESSION, read_all, write_dataset

from duckharness import Harness, SessionWindow
from duckharness.errors import DuckHarnessWarning

EASTERN = "US/Eastern"
LONDON = "Europe/London"
# Thursday and Friday in EST, the switch day (Sunday 2026-03-08) and two days in EDT.
EASTERN_DAYS = [dt.date(2026, 3, 5), dt.date(2026, 3, 6), dt.date(2026, 3, 8), dt.date(2026, 3, 9),
                dt.date(2026, 3, 10)]
# London switches on Sunday 2026-03-29 at 01:00 UTC.
LONDON_DAYS = [dt.date(2026, 3, 26), dt.date(2026, 3, 27), dt.date(2026, 3, 28), dt.date(2026, 3, 29),
               dt.date(2026, 3, 30)]
US = dt.timedelta(microseconds=1)


def local_instants(day: dt.date, tz: str, first: dt.time, last: dt.time, step_s: int,
                   extra: Sequence[dt.time] = ()) -> list[dt.datetime]:
    """UTC instants of a regular local grid from ``first`` to ``last`` on ``day``, plus the
    local times ``extra`` (e.g. one microsecond either side of a window bound)."""
    z = zoneinfo.ZoneInfo(tz)
    lo = dt.datetime.combine(day, first, z).astimezone(dt.UTC)
    hi = dt.datetime.combine(day, last, z).astimezone(dt.UTC)
    n = int((hi - lo).total_seconds()) // step_s + 1
    out = [lo + dt.timedelta(seconds=step_s * i) for i in range(n)]
    out += [dt.datetime.combine(day, t, z).astimezone(dt.UTC) for t in extra]
    return sorted(out)


def table_of(instants: Sequence[dt.datetime], rng: np.random.Generator, *, unit: str = "us",
             tz: str | None = "UTC") -> pa.Table:
    n = len(instants)
    naive = np.array([i.astimezone(dt.UTC).replace(tzinfo=None) for i in instants], dtype="datetime64[us]")
    pred = rng.standard_normal(n)
    return pa.table({
        "ts": pa.array(naive.astype(f"datetime64[{unit}]"), pa.timestamp(unit, tz=tz)),
        "symbol": pa.array(rng.choice(["A", "B", "C"], n)),
        "volume": rng.integers(1, 5000, n),
        "pred_10s": pred,
        "target_10s": 0.5 * pred + rng.standard_normal(n),
    })


def near(*times: str) -> list[dt.time]:
    """Each local time and one microsecond before and after it."""
    out = []
    for t in times:
        base = dt.datetime.combine(dt.date(2000, 1, 1), dt.time.fromisoformat(t))
        out += [(base - US).time(), base.time(), (base + US).time()]
    return out


def write_days(folder: Path, days: Sequence[dt.date], tz: str, metadata: dict | None, *, first: str = "08:00",
               last: str = "17:00", step_s: int = 20, extra: Sequence[dt.time] = (), seed: int = 0,
               row_group_size: int = 4096, unit: str = "us", ts_tz: str | None = "UTC") -> Path:
    rng = np.random.default_rng(seed)
    lo, hi = dt.time.fromisoformat(first), dt.time.fromisoformat(last)
    tables = {d.isoformat(): table_of(local_instants(d, tz, lo, hi, step_s, extra), rng, unit=unit, tz=ts_tz)
              for d in days}
    write_dataset(folder, tables, metadata, row_group_size=row_group_size)
    return folder


def reference_counts(folder: Path, tz: str, start: str | None, end: str | None) -> dict[dt.date, int]:
    """Rows per local date whose local wall-clock time is within [start, end] (None: no bound)."""
    z = zoneinfo.ZoneInfo(tz)
    lo = dt.time.fromisoformat(start) if start else dt.time.min
    hi = dt.time.fromisoformat(end) if end else dt.time.max
    out: Counter[dt.date] = Counter()
    for t in read_all(folder)["ts"].to_pylist():
        if t.tzinfo is None:  # naive timestamps are UTC
            t = t.replace(tzinfo=dt.UTC)
        local = t.astimezone(z)
        if lo <= local.time() <= hi:
            out[local.date()] += 1
    return dict(out)


def counts_by_day(h: Harness, experiment: str = "baseline", **kw: object) -> dict[dt.date, float]:
    """Non-zero counts per day (the references have no entry for a day without rows)."""
    res = h.metrics(["count"], pairs=["pred_10s:target_10s"], experiments=[experiment], by="day", **kw)
    res = res.filter(metric="count")
    return {r["day"]: r["value"] for r in res.iter_rows(named=True) if r["value"]}


@pytest.fixture(scope="module")
def eastern(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five days 08:00-17:00 US/Eastern every 20 s, plus rows a microsecond around 09:30, 10:00,
    11:00 and 16:00; small row groups so statistics can skip data."""
    return write_days(tmp_path_factory.mktemp("eastern"), EASTERN_DAYS, EASTERN, SESSION,
                      extra=near("09:30", "10:00", "11:00", "16:00"), row_group_size=200)


# --- the window from metadata ----------------------------------------------------------------------

def test_session_window_keeps_exactly_rows_within_0930_1600_eastern_each_day_across_dst(eastern: Path) -> None:
    expected = reference_counts(eastern, EASTERN, "09:30", "16:00")
    # The reference does depend on DST: a fixed UTC-5 clock would shift the EDT days by an hour.
    fixed = reference_counts(eastern, "Etc/GMT+5", "09:30", "16:00")
    assert fixed[dt.date(2026, 3, 9)] != expected[dt.date(2026, 3, 9)]
    assert counts_by_day(Harness(eastern)) == expected


def test_session_window_is_inclusive_at_both_ends(tmp_path: Path) -> None:
    # Only the rows one microsecond around each bound, on days before and after the switch.
    folder = write_days(tmp_path, EASTERN_DAYS, EASTERN, SESSION, first="12:00", last="12:00",
                        extra=near("09:30", "16:00"))
    # Of 09:29:59.999999, 09:30, 09:30:00.000001, 12:00, 15:59:59.999999, 16:00 and
    # 16:00:00.000001 the first and last are out: 5 of 7 rows per day.
    assert counts_by_day(Harness(folder)) == dict.fromkeys(EASTERN_DAYS, 5.0)


def test_pooled_count_equals_rows_in_session_over_all_days(eastern: Path) -> None:
    res = Harness(eastern).metrics(["count"], pairs=["pred_10s:target_10s"])
    expected = sum(reference_counts(eastern, EASTERN, "09:30", "16:00").values())
    assert res.filter(metric="count")["value"].item() == expected


def test_window_false_keeps_every_row_of_each_local_day(eastern: Path) -> None:
    expected = reference_counts(eastern, EASTERN, None, None)
    assert sum(expected.values()) == read_all(eastern).num_rows
    assert counts_by_day(Harness(eastern), window=False) == expected


def test_window_override_1000_to_1100_keeps_exactly_that_hour_each_day(eastern: Path) -> None:
    expected = reference_counts(eastern, EASTERN, "10:00", "11:00")
    # 181 grid rows (both ends) + 10:00:00, 10:00:00.000001, 10:59:59.999999, 11:00:00 extras.
    assert set(expected.values()) == {185}
    assert counts_by_day(Harness(eastern), window=("10:00", "11:00")) == expected


@pytest.mark.parametrize("window", [("10:00",), ("10:00", "11:00", "12:00"), 5, dt.time(10)])
def test_a_window_that_is_not_a_start_end_pair_is_an_input_error(eastern: Path, window: object) -> None:
    from duckharness import InputError

    with Harness(eastern, cache=False) as h, pytest.raises(InputError, match=r"window must be .* \(start, end\) pair"):
        h.metrics(["count"], pairs="pred_10s:target_10s", window=window)  # type: ignore[arg-type]


@pytest.mark.parametrize("window", [
    ("10:00", "11:00"),
    (dt.time(10), dt.time(11)),
    ["10:00:00", dt.time(11)],
    "10:00-11:00",
    " 10:00 - 11:00:00 ",
    SessionWindow("10:00", "11:00", EASTERN),
    SessionWindow(start=dt.time(10), end="11:00"),
], ids=["strings", "times", "mixed_list", "text", "text_spaced", "session_window_strings", "session_window_mixed"])
def test_every_window_form_keeps_exactly_the_hour_from_1000_to_1100_each_day(eastern: Path, window: object) -> None:
    """Before, the time pair was refused (MetadataError), the text refused (InputError) and a
    SessionWindow of strings failed inside datetime.combine (TypeError)."""
    expected = reference_counts(eastern, EASTERN, "10:00", "11:00")
    assert set(expected.values()) == {185}
    with Harness(eastern, cache=False) as h:
        assert counts_by_day(h, window=window) == expected


@pytest.mark.parametrize(("window", "start", "end"), [
    ("10:00-", "10:00", None), ("-11:00", None, "11:00"), (("10:00", None), "10:00", None),
    ((None, dt.time(11)), None, "11:00"),
])
def test_a_window_open_on_one_side_keeps_every_row_of_the_day_on_that_side(
        eastern: Path, window: object, start: str | None, end: str | None) -> None:
    expected = reference_counts(eastern, EASTERN, start, end)
    with Harness(eastern, cache=False) as h:
        assert counts_by_day(h, window=window) == expected


def test_a_session_window_in_another_time_zone_picks_that_zones_wall_clock_hour(eastern: Path) -> None:
    """London's 14:00-15:00 is 09:00-10:00 in New York before 2026-03-08 and 10:00-11:00 after:
    each day keeps London's hour, dated by London's calendar."""
    expected = reference_counts(eastern, LONDON, "14:00", "15:00")
    assert set(expected) == set(EASTERN_DAYS) and expected != reference_counts(eastern, EASTERN, "14:00", "15:00")
    with Harness(eastern, cache=False) as h:
        assert counts_by_day(h, window=SessionWindow("14:00", "15:00", LONDON)) == expected


@pytest.mark.parametrize(("window", "why"), [
    ("10:00", r"Window '10:00' must be START-END, e.g. 09:30-16:00"),
    ("-", r"Window '-' must be START-END"),
    ("25:00-26:00", r"Window '25:00-26:00': '25:00' is not a valid time of day"),
    ("10-11", r"Window '10-11': '10' must be a wall-clock time 'HH:MM'"),
    ("10:00-10:00", r"Window '10:00-10:00': starts and ends at one time"),
    (("10:00", "24:00"), r"Window end is not a valid time of day: '24:00'"),
])
def test_a_malformed_window_text_or_bound_is_an_input_error_naming_it(eastern: Path, window: object,
                                                                       why: str) -> None:
    """The text follows --window's rules: one bound may be empty, not both; equal times are refused."""
    from duckharness import InputError

    with Harness(eastern, cache=False) as h, pytest.raises(InputError, match=why):
        h.metrics(["count"], pairs="pred_10s:target_10s", window=window)  # type: ignore[arg-type]


@pytest.mark.parametrize("batch_size", [2, 5])
def test_day_labels_are_right_when_one_batch_holds_several_days(eastern: Path, batch_size: int) -> None:
    h = Harness(eastern, batch_size=batch_size)
    assert counts_by_day(h) == reference_counts(eastern, EASTERN, "09:30", "16:00")
    assert counts_by_day(h, window=False) == reference_counts(eastern, EASTERN, None, None)


def test_day_labels_are_right_when_one_batch_holds_more_than_a_week(tmp_path: Path) -> None:
    days = [dt.date(2026, 3, 2) + dt.timedelta(days=i) for i in range(12)]  # across 2026-03-08
    folder = write_days(tmp_path, days, EASTERN, SESSION, first="00:00", last="23:59", step_s=300)
    h = Harness(folder, batch_size=12)
    assert counts_by_day(h) == reference_counts(folder, EASTERN, "09:30", "16:00")
    assert counts_by_day(h, window=False) == reference_counts(folder, EASTERN, None, None)


def test_experiment_that_cannot_be_inlined_sees_the_same_window_and_days(eastern: Path) -> None:
    h = Harness(eastern)
    h.add_experiment("ranked", "SELECT *, row_number() OVER (PARTITION BY symbol ORDER BY ts) AS rn FROM baseline")
    res = h.metrics(["count"], pairs=["pred_10s:target_10s"], experiments=["ranked"], by="day")
    assert "whole" in h.last_run.timings
    got = {r["day"]: r["value"] for r in res.filter(metric="count").iter_rows(named=True)}
    assert got == reference_counts(eastern, EASTERN, "09:30", "16:00")


@pytest.mark.parametrize("n_days", [5, 9], ids=["few_days", "more_than_eight_days"])
def test_rows_an_experiment_moves_out_of_the_window_keep_their_local_day(tmp_path: Path, n_days: int) -> None:
    """Hourly bars (an experiment run on all data at once) put each day's 09:30-09:59 rows at
    09:00, outside the window: they belong to their local date, not to a day of their own (NULL)."""
    days = [dt.date(2026, 3, 2) + dt.timedelta(days=i) for i in range(n_days)]  # across 2026-03-08
    folder = write_days(tmp_path, days, EASTERN, SESSION, step_s=600)
    h = Harness(folder)
    h.add_experiment("hourly", "SELECT date_trunc('hour', ts) AS ts, symbol, avg(pred_10s) AS pred_10s, "
                     "avg(target_10s) AS target_10s FROM baseline GROUP BY ALL")
    got = counts_by_day(h, "hourly")
    assert "whole" in h.last_run.timings
    z = zoneinfo.ZoneInfo(EASTERN)
    bars: set[tuple[dt.date, int, str]] = set()
    table = read_all(folder)
    for t, sym in zip(table["ts"].to_pylist(), table["symbol"].to_pylist(), strict=True):
        local = t.astimezone(z)
        if dt.time(9, 30) <= local.time() <= dt.time(16, 0):
            bars.add((local.date(), local.hour, sym))
    assert got == dict(Counter(d for d, _, _ in bars))
    assert None not in got and len(got) == n_days


def test_hourly_bars_of_an_overnight_session_keep_the_day_their_session_began(tmp_path: Path) -> None:
    """Session 18:30-04:00: the 18:00 bar holds 18:30-18:59 rows of the session that begins that
    evening, so it belongs to that day, not the day before (no day before the first session)."""
    days = [dt.date(2026, 3, 2) + dt.timedelta(days=i) for i in range(5)]  # across 2026-03-08
    meta = {"start_time": "18:30", "end_time": "04:00", "timezone": EASTERN}
    folder = write_days(tmp_path, days, EASTERN, meta, first="00:00", last="23:59", step_s=600)
    h = Harness(folder)
    h.add_experiment("hourly", "SELECT date_trunc('hour', ts) AS ts, symbol, avg(pred_10s) AS pred_10s, "
                     "avg(target_10s) AS target_10s FROM baseline GROUP BY ALL")
    got = counts_by_day(h, "hourly")
    z = zoneinfo.ZoneInfo(EASTERN)
    bars: set[tuple[dt.date, dt.datetime, str]] = set()
    table = read_all(folder)
    for t, sym in zip(table["ts"].to_pylist(), table["symbol"].to_pylist(), strict=True):
        local = t.astimezone(z)
        if local.time() >= dt.time(18, 30):
            session = local.date()
        elif local.time() <= dt.time(4, 0):
            session = local.date() - dt.timedelta(days=1)
        else:
            continue
        bars.add((session, local.replace(minute=0, second=0, microsecond=0), sym))
    assert got == dict(Counter(d for d, _, _ in bars))
    assert min(got) == days[0] - dt.timedelta(days=1)  # the night before the first file's day


@pytest.mark.parametrize("shift", ["20 MINUTE", "-12 HOUR"])
def test_an_experiment_that_moves_the_time_is_grouped_by_its_own_times(tmp_path: Path, shift: str) -> None:
    """Row by row (inlined) or over all rows at once (a window function), an experiment that
    changes ``ts`` is grouped by day and time of day of its new times, and sunk by them: the
    window still picks the source rows (baseline is the windowed source)."""
    days = [dt.date(2026, 3, 4), dt.date(2026, 3, 5), dt.date(2026, 3, 6)]
    folder = write_days(tmp_path / "d", days, EASTERN, SESSION, step_s=120)
    h = Harness(folder, cache=False)
    h.add_experiment("rowwise", f"SELECT * REPLACE (ts + INTERVAL {shift} AS ts) FROM baseline")
    h.add_experiment("allrows", f"SELECT * REPLACE (ts + INTERVAL {shift} AS ts), row_number() OVER () AS rn "
                                f"FROM baseline")
    z = zoneinfo.ZoneInfo(EASTERN)
    n, unit = shift.split()
    delta = dt.timedelta(**{unit.lower() + "s": int(n)})
    moved = []
    for t in read_all(folder)["ts"].to_pylist():
        local = t.astimezone(z)
        if dt.time(9, 30) <= local.time() <= dt.time(16, 0):
            moved.append((t + delta).astimezone(z))
    want_day = dict(Counter(m.date() for m in moved))
    want_tod = dict(Counter(m.replace(minute=30 * (m.minute // 30), second=0).time() for m in moved))
    for name in ("rowwise", "allrows"):
        assert counts_by_day(h, name) == want_day, name
        tod = h.metrics(["count"], pairs="pred_10s", experiments=[name], by="tod:30min").filter(metric="count")
        assert {r["tod"]: r["value"] for r in tod.iter_rows(named=True) if r["value"]} == want_tod, name
        with pytest.warns(DuckHarnessWarning, match="outside the session window"):
            out = h.sink(name, tmp_path / f"sink_{name}", partition_by="day")
        assert {Path(f).stem: pq.read_metadata(f).num_rows for f in out.files} == {
            d.isoformat(): c for d, c in want_day.items()}, name
    # Per-day scans: each day whole (a day made of two source files' rows is ranked once).
    ic = {n: h.rank_ic("pred_10s", [n]).filter(metric="n") for n in ("rowwise", "allrows")}
    for name, frame in ic.items():
        assert dict(frame.select("day", "value").rows()) == want_day, name


# --- other zones and time encodings ----------------------------------------------------------------

@pytest.mark.parametrize(("start", "end"), [("08:00", "16:30"), ("00:30", "03:00"), ("16:00", None)],
                         ids=["day_session", "night_window_containing_the_gap", "open_ended"])
def test_window_in_europe_london_across_its_2026_03_29_switch(tmp_path: Path, start: str, end: str | None) -> None:
    meta = {"start_time": start, "timezone": LONDON} | ({"end_time": end} if end else {})
    folder = write_days(tmp_path, LONDON_DAYS, LONDON, meta, first="00:00", last="23:59", step_s=60,
                        extra=near(start, *([end] if end else [])))
    expected = reference_counts(folder, LONDON, start, end)
    assert counts_by_day(Harness(folder)) == expected


@pytest.mark.parametrize(("unit", "tz"), [("us", None), ("ns", "UTC"), ("ns", None), ("ms", "UTC")],
                         ids=["naive_us", "aware_ns", "naive_ns", "aware_ms"])
def test_window_is_the_same_for_naive_utc_and_other_timestamp_units(tmp_path: Path, unit: str, tz: str | None) -> None:
    # (In "ms" the rows a microsecond around the bounds are truncated to whole milliseconds; the
    # reference reads the stored values, so it sees the same.)
    folder = write_days(tmp_path, EASTERN_DAYS, EASTERN, SESSION, extra=near("09:30", "16:00"), unit=unit,
                        ts_tz=tz)
    assert counts_by_day(Harness(folder)) == reference_counts(folder, EASTERN, "09:30", "16:00")


@pytest.mark.parametrize(("day", "tz", "start", "end"), [
    (dt.date(2026, 10, 25), LONDON, "01:30", "03:00"),   # 01:00-02:00 happens twice that night
    (dt.date(2026, 3, 8), EASTERN, "02:30", "04:00"),    # 02:00-03:00 does not exist that night
], ids=["start_in_repeated_fall_back_hour", "start_in_spring_forward_gap"])
def test_window_bound_inside_a_dst_transition_keeps_wall_clock_rows(
        tmp_path: Path, day: dt.date, tz: str, start: str, end: str) -> None:
    # The per-day UTC bounds are built with zoneinfo's fold=0 reading of a repeated or missing
    # local time; the wall-clock rule (and the package's own fallback for files without
    # statistics) keeps a different set of rows.
    folder = write_days(tmp_path, [day], tz, {"start_time": start, "end_time": end, "timezone": tz},
                        first="00:00", last="06:00", step_s=60)
    expected = reference_counts(folder, tz, start, end)
    assert counts_by_day(Harness(folder)) == expected


@pytest.mark.parametrize(("tz", "gap_day"), [(EASTERN, dt.date(2026, 3, 8)), ("America/Havana", dt.date(2026, 3, 8))],
                         ids=["gap_at_0200", "gap_at_midnight"])
def test_hourly_windows_of_round_the_clock_data_across_a_spring_forward_night(
        tmp_path: Path, tz: str, gap_day: dt.date) -> None:
    # Data every 5 minutes around the clock, as FX or crypto have; an hour-long window that lies
    # inside the missing hour of the switch night has no instant that day: that day has no rows,
    # the others keep theirs (was an AssertionError for every call reading rows).
    days = [gap_day - dt.timedelta(days=1), gap_day, gap_day + dt.timedelta(days=1)]
    folder = write_days(tmp_path, days, tz, {"timezone": tz}, first="00:00", last="23:55", step_s=300)
    h = Harness(folder, cache=False)
    for hour in range(24):
        start, end = f"{hour:02d}:00", f"{hour:02d}:59"
        expected = reference_counts(folder, tz, start, end)
        assert counts_by_day(h, window=(start, end)) == expected, start
        rows = h.lazyframe(window=(start, end)).select(pl.len()).collect().item()
        assert rows == sum(expected.values()), start
    gap = ("02:00", "02:59") if tz == EASTERN else ("00:00", "00:59")
    assert gap_day not in reference_counts(folder, tz, *gap)
    with pytest.warns(DuckHarnessWarning, match="only 2 days"):
        sample = h.sample(n_days=3, window=gap, seed=1)
    assert sample.height == sum(reference_counts(folder, tz, *gap).values())


@pytest.mark.parametrize(("window", "start", "end"), [
    (("07:00", "07:59"), "07:00", "07:59"), (("16:30", "17:00"), "16:30", "17:00"), ("10:00-11:00", "10:00", "11:00"),
    (False, None, None),
], ids=["before_the_data", "last_half_hour", "one_hour", "no_window"])
def test_info_counts_the_days_holding_rows_inside_the_window_asked_for(
        eastern: Path, window: object, start: str | None, end: str | None) -> None:
    """``info`` took no window (the README says every method reading rows does)."""
    expected = reference_counts(eastern, EASTERN, start, end)
    info = Harness(eastern).info(window=window)
    assert info["days"] == len(expected)
    assert info["first_day"] == (min(expected).isoformat() if expected else None)
    assert (info["session_window"] is None) == (window is False)


# --- how the window is applied -----------------------------------------------------------------

@pytest.mark.parametrize("days", [EASTERN_DAYS, [dt.date(2026, 2, 15) + dt.timedelta(days=i) for i in range(40)]],
                         ids=["five_days", "forty_days"])
def test_experiment_sql_has_no_per_row_time_zone_conversion_when_files_have_statistics(
        tmp_path: Path, days: list[dt.date]) -> None:
    folder = write_days(tmp_path, days, EASTERN, SESSION, step_s=600)
    h = Harness(folder)
    h.add_experiment("liquid", "volume > 1000")
    for name in ("baseline", "liquid"):
        sql = h.experiment_sql(name)
        assert "timezone(" not in sql.lower() and "at time zone" not in sql.lower()
        # Per-day UTC bounds instead: 09:30 EST = 14:30 UTC, 09:30 EDT = 13:30 UTC.
        assert "2026-03-06 14:30:00" in sql and "2026-03-09 13:30:00" in sql
    assert counts_by_day(h) == reference_counts(folder, EASTERN, "09:30", "16:00")


def test_files_without_statistics_fall_back_to_per_row_conversion_with_the_same_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for d in EASTERN_DAYS:
        t = table_of(local_instants(d, EASTERN, dt.time(8), dt.time(17), 20, near("09:30", "16:00")), rng)
        pq.write_table(t, tmp_path / f"{d}.parquet", write_statistics=False)
    (tmp_path / "metadata.json").write_text(json.dumps(SESSION))
    h = Harness(tmp_path)
    assert "timezone(" in h.experiment_sql("baseline").lower()  # the check above can see a conversion
    assert counts_by_day(h) == reference_counts(tmp_path, EASTERN, "09:30", "16:00")


def _row_groups_scanned(sql: str, profile: Path) -> tuple[int, int]:
    con = duckdb.connect(config={"threads": 1})
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("PRAGMA enable_profiling = 'json'")
        con.execute(f"PRAGMA profiling_output = '{profile}'")
        con.execute(sql).fetchall()
        con.execute("PRAGMA disable_profiling")
    finally:
        con.close()
    q = json.loads(profile.read_text()).get("query", {})
    if "total_row_groups_scanned" not in q or "total_row_groups_to_scan" not in q:
        pytest.skip("this DuckDB version does not report row groups scanned in its profile")
    return int(q["total_row_groups_scanned"]), int(q["total_row_groups_to_scan"])


def _row_groups_overlapping_session(folder: Path) -> tuple[int, int]:
    """Row groups whose ts statistics intersect a day's 09:30-16:00 US/Eastern, from pyarrow footers."""
    z = zoneinfo.ZoneInfo(EASTERN)
    overlapping = total = 0
    for path in sorted(folder.glob("*.parquet")):
        md = pq.ParquetFile(path).metadata
        col = md.schema.names.index("ts")
        for i in range(md.num_row_groups):
            st = md.row_group(i).column(col).statistics
            lo, hi = st.min.astimezone(z), st.max.astimezone(z)
            day = lo.date()
            w_lo = dt.datetime.combine(day, dt.time(9, 30), z)
            w_hi = dt.datetime.combine(day, dt.time(16), z)
            total += 1
            overlapping += int(lo <= w_hi and hi >= w_lo)
    return overlapping, total


def test_session_window_lets_parquet_statistics_skip_row_groups_outside_the_session(
        eastern: Path, tmp_path: Path) -> None:
    overlapping, total = _row_groups_overlapping_session(eastern)
    assert overlapping < total
    h = Harness(eastern)
    scanned, to_scan = _row_groups_scanned(h.experiment_sql("baseline", pretty=False), tmp_path / "a.json")
    assert (scanned, to_scan) == (overlapping, total)
    # Without the window every row group is read: the profile does tell them apart.
    assert _row_groups_scanned(h.experiment_sql("baseline", window=False, pretty=False),
                               tmp_path / "b.json") == (total, total)
    # The metrics run's own per-batch queries skip the same row groups.
    seen: list[str] = []
    with h.trace(seen.append):
        h.metrics(["count"], pairs=["pred_10s:target_10s"])
    batch = [s for s in seen if "GROUP BY ALL" in s.upper() and "READ_PARQUET" in s.upper()]
    assert len(batch) == len(EASTERN_DAYS)
    got = [_row_groups_scanned(s, tmp_path / f"c{i}.json") for i, s in enumerate(batch)]
    assert (sum(s for s, _ in got), sum(t for _, t in got)) == (overlapping, total)


def _day_counts(h: Harness, experiments: list[str], pairs: list[str]) -> dict[tuple[str, str, dt.date], float]:
    df = h.metrics(["count"], pairs=pairs, experiments=experiments, by="day").filter(metric="count")
    return {(r["experiment"], r["pred"], r["day"]): r["value"] for r in df.iter_rows(named=True)}


def test_by_day_lists_the_same_days_for_an_experiment_whatever_else_the_call_asks(tmp_path: Path) -> None:
    """A day with rows only outside the window, and a day where ``liquid`` keeps no rows, are
    listed (count 0) for every experiment and pair, asked alone or together: before, a day
    whose rows all lay outside the window was listed only when the call's query had no cell
    keys (one experiment, one complete pair)."""
    from duckharness.demo import one_day

    rng = np.random.default_rng(11)
    z = zoneinfo.ZoneInfo(EASTERN)
    d1, d2, d3 = dt.date(2026, 3, 4), dt.date(2026, 3, 5), dt.date(2026, 3, 6)
    early = one_day(d2, 400, rng)
    local = [t.astimezone(z).time() for t in early["ts"].to_pylist()]
    early = early.filter(pa.array([t < dt.time(9, 30) for t in local]))  # rows, none in the window
    illiquid = one_day(d3, 400, rng)
    illiquid = illiquid.set_column(illiquid.schema.get_field_index("volume"), "volume",
                                   pa.array(np.minimum(illiquid["volume"].to_numpy(), 1000)))
    tables = {d1.isoformat(): one_day(d1, 400, rng), d2.isoformat(): early, d3.isoformat(): illiquid}
    write_dataset(tmp_path, tables, SESSION)
    tables[d1.isoformat()] = tables[d1.isoformat()].drop_columns(["pred_60s"])  # a pair some files lack
    write_dataset(tmp_path, {d1.isoformat(): tables[d1.isoformat()]})
    assert early.num_rows > 0

    want: dict[tuple[str, str, dt.date], float] = {}
    for day, table in zip((d1, d2, d3), tables.values(), strict=True):
        rows = table.to_pylist()
        for pred in ("pred_10s", "pred_60s"):
            for name, keep in (("baseline", lambda r: True), ("liquid", lambda r: r["volume"] > 1000)):
                want[name, pred, day] = float(sum(
                    1 for r in rows
                    if dt.time(9, 30) <= r["ts"].astimezone(z).time() <= dt.time(16, 0) and keep(r)
                    and r.get(pred) is not None and np.isfinite(r[pred])
                    and np.isfinite(r[pred.replace("pred", "target")])))
    h = Harness(tmp_path, workers=1)
    h.add_experiment("liquid", "volume > 1000")
    assert want["liquid", "pred_10s", d3] == 0 and want["baseline", "pred_10s", d2] == 0
    for experiments in (["baseline"], ["liquid"], ["baseline", "liquid"]):
        for pairs in (["pred_10s"], ["pred_10s", "pred_60s"]):
            got = _day_counts(h, experiments, pairs)
            assert got == {k: v for k, v in want.items() if k[0] in experiments and k[1] in pairs}, (experiments, pairs)


def _naive_utc(lf: pl.LazyFrame) -> pl.LazyFrame:
    return lf.with_columns(pl.col("ts").dt.replace_time_zone(None))


def test_an_experiment_that_makes_the_time_naive_keeps_its_rows_days_and_buckets(
        make_backtest, tmp_path: Path) -> None:
    """Naive times are UTC, in an experiment's rows as in a source's: before, an experiment that
    dropped the zone was labelled as if its naive times were local (a Saturday appeared, buckets
    ran 17:00-01:00)."""
    folder = make_backtest(days=4, rows=800)
    df = read_all(folder).to_pandas()
    local = df["ts"].dt.tz_convert(EASTERN)
    inside = (local.dt.time >= dt.time(9, 30)) & (local.dt.time <= dt.time(16, 0))
    want_day = {d: float(n) for d, n in Counter(local[inside].dt.date).items()}
    want_tod = {t: float(n) for t, n in Counter(local[inside].dt.floor("h").dt.time).items()}
    h = Harness(folder, cache=False)
    h.add_experiment("sql_naive", "SELECT * REPLACE (CAST(timezone('UTC', ts) AS TIMESTAMP) AS ts) FROM baseline")
    h.add_experiment("py_naive", _naive_utc)
    for name in ("sql_naive", "py_naive"):
        by_day = h.metrics(["count"], pairs="pred_10s", experiments=[name], by="day").filter(metric="count")
        assert dict(by_day.select("day", "value").rows()) == want_day, name
        tod = h.metrics(["count"], pairs="pred_10s", experiments=[name], by="tod:1h").filter(metric="count")
        assert dict(tod.select("tod", "value").rows()) == want_tod, name
        ic = h.rank_ic("pred_10s", [name]).filter(metric="n")
        assert dict(ic.select("day", "value").rows()) == want_day, name
        out = h.sink(name, tmp_path / name, partition_by="day")
        assert {Path(f).stem: pq.read_metadata(f).num_rows for f in out.files} == {
            d.isoformat(): n for d, n in want_day.items()}, name
    assert pl.Series(list(want_day)).dt.weekday().max() <= 5


def test_by_day_lists_the_source_days_for_an_experiment_asked_alone_that_needs_all_rows(tmp_path: Path) -> None:
    """A file of several days and experiments the fused scan cannot answer (a LIMIT over all rows,
    a Python step): before, such an experiment asked alone listed only its own days."""
    from duckharness.demo import one_day

    rng = np.random.default_rng(5)
    days = [dt.date(2026, 3, 4), dt.date(2026, 3, 5), dt.date(2026, 3, 6)]
    write_dataset(tmp_path, {"all": pa.concat_tables([one_day(d, 300, rng) for d in days])}, SESSION)
    h = Harness(tmp_path, cache=False)
    h.add_experiment("first", "SELECT * FROM baseline ORDER BY ts LIMIT 50")
    h.add_experiment("early", lambda lf: lf.filter(pl.col("ts") < pl.datetime(2026, 3, 5, 15, time_zone="UTC")))
    for asked in (["first"], ["early"], ["baseline", "first", "early"]):
        got = h.metrics(["count"], pairs="pred_10s", experiments=asked, by="day").filter(metric="count")
        for name in asked:
            assert sorted(got.filter(experiment=name)["day"].to_list()) == days, (asked, name)
    counts = dict(got.filter(experiment="first").select("day", "value").rows())
    assert counts == {days[0]: 50.0, days[1]: 0.0, days[2]: 0.0}
