"""Sinks: an experiment written to a folder of Parquet files, atomically, that opens as a source.

Rows written are compared with references computed here (pyarrow read, session window from each
row's US/Eastern wall-clock time, experiments re-implemented in Polars/numpy); a reopened output's
metrics are compared with the original experiment's (a round trip) and with the reference.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SESSION, session_days, write_dataset
from polars.testing import assert_frame_equal
from sklearn.metrics import mean_squared_error, r2_score

from duckharness import Harness
from duckharness.demo import one_day, trading_days
from duckharness.errors import DuckHarnessWarning, InputError, TransformError, UnknownExperimentError
from duckharness.execution.progress import Progress

DAYS = trading_days(dt.date(2026, 3, 4), 5)  # crosses the DST switch of 2026-03-08
ROWS = 2500
THIRD_DAY = DAYS[2]
META = {**SESSION, "model": "m1", "horizons": ["1s", "10s", "60s"]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sink") / "bt"
    rng = np.random.default_rng(9)
    write_dataset(out, {d.isoformat(): one_day(d, ROWS, rng, symbols=8) for d in DAYS}, META, row_group_size=500)
    return out


def all_rows(folder: Path) -> pl.DataFrame:
    df = pl.concat([pl.from_arrow(pq.read_table(p)) for p in sorted(folder.glob("*.parquet"))])  # type: ignore[misc]
    local = pl.col("ts").dt.convert_time_zone("US/Eastern")
    return df.with_columns(local.dt.date().alias("_day"), local.dt.time().alias("_tod")).sort("ts")


@pytest.fixture(scope="module")
def raw(folder: Path) -> pl.DataFrame:
    return all_rows(folder)


@pytest.fixture(scope="module")
def ref(raw: pl.DataFrame) -> pl.DataFrame:
    """Windowed rows, sorted by time, with _day."""
    out = raw.filter((pl.col("_tod") >= dt.time(9, 30)) & (pl.col("_tod") <= dt.time(16, 0)))
    assert out["ts"].is_unique().all()
    return out


def with_z(df: pl.DataFrame) -> pl.DataFrame:
    x = df["pred_10s"].to_numpy()
    return df.with_columns(pl.Series("pred_z", (x - x.mean()) / x.std(ddof=1)))


def ref_rows(ref: pl.DataFrame, name: str) -> pl.DataFrame:
    liquid = ref.filter(pl.col("volume") > 1000)
    if name == "liquid":
        return liquid
    if name == "z_day":
        return pl.concat([with_z(p) for p in liquid.partition_by("_day", maintain_order=True)]).sort("ts")
    if name == "z_all":
        return with_z(liquid)
    if name == "pm":
        return liquid.with_columns(pl.col("pred_10s").mean().over("symbol").alias("pm"))
    raise KeyError(name)


def add_pred_z(lf: pl.LazyFrame) -> pl.LazyFrame:
    p = pl.col("pred_10s")
    return lf.with_columns(((p - p.mean()) / p.std()).alias("pred_z"))


def fail_on_third_day(lf: pl.LazyFrame) -> pl.LazyFrame:
    df = lf.collect()
    if df.height and (df["ts"].dt.convert_time_zone("US/Eastern").dt.date() == THIRD_DAY).any():
        raise ValueError("third day")
    return df.lazy()


@pytest.fixture(scope="module")
def harness(folder: Path) -> Harness:
    h = Harness(folder, workers=2)
    h.add_experiment("liquid", "volume > 1000")
    h.add_experiment("z_day", add_pred_z, base="liquid")
    h.add_experiment("z_all", add_pred_z, base="liquid", per_batch=False)
    h.add_experiment("pm", "SELECT *, avg(pred_10s) OVER (PARTITION BY symbol) AS pm FROM liquid")
    h.add_experiment("per_symbol", "SELECT symbol, avg(pred_10s) AS pred_10s, avg(target_10s) AS target_10s "
                                   "FROM baseline GROUP BY symbol")
    h.add_experiment("boom", fail_on_third_day, base="liquid")
    h.add_experiment("boom_all", fail_on_third_day, base="liquid", per_batch=False)
    return h


def read_back(out: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in sorted(out.glob("*.parquet"))])


def assert_rows(got: pl.DataFrame, want: pl.DataFrame) -> None:
    want = want.drop("_day", "_tod")
    assert got.columns == want.columns
    assert_frame_equal(got.sort("ts"), want, check_exact=False, rel_tol=1e-9, abs_tol=1e-12)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- round trips ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["liquid", "z_day", "z_all", "pm"])
def test_sink_writes_the_experiments_rows_and_nothing_else(
        harness: Harness, ref: pl.DataFrame, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    result = harness.sink(name, out)
    want = ref_rows(ref, name)
    assert_rows(read_back(out), want)
    assert result.rows == want.height
    assert result.path == str(out)
    assert all(os.path.dirname(f) == str(out) and os.path.isfile(f) for f in result.files)
    assert sorted(os.listdir(out)) == sorted([*(os.path.basename(f) for f in result.files), "metadata.json"])
    assert os.listdir(tmp_path) == ["out"]  # no temporary folder left beside it


def test_sink_round_trip_equals_the_relation(harness: Harness, tmp_path: Path) -> None:
    harness.sink("liquid", tmp_path / "out")
    got = read_back(tmp_path / "out").sort("ts")
    assert got.equals(harness.relation("liquid").pl().sort("ts"))


@pytest.mark.parametrize("metadata", [{}, SESSION], ids=["no-window", "session"])
def test_sink_by_day_of_files_of_several_days_writes_one_file_per_day_that_holds_rows(
        make_multiday: Callable[..., Path], tmp_path: Path, metadata: dict) -> None:
    folder = make_multiday(metadata)
    ref = session_days(folder, metadata)
    Harness(folder).sink("baseline", tmp_path / "out", partition_by="day")
    days = sorted(set(ref["_day"].to_list()))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == [f"{d.isoformat()}.parquet" for d in days]
    for d in days:
        got = pl.read_parquet(tmp_path / "out" / f"{d.isoformat()}.parquet").sort("ts")
        assert_frame_equal(got, ref.filter(pl.col("_day") == d).drop("_day"))


@pytest.mark.parametrize("name", ["liquid", "z_day", "z_all", "pm"])
def test_partition_by_day_writes_one_file_per_local_day(
        harness: Harness, ref: pl.DataFrame, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    result = harness.sink(name, out, partition_by="day")
    want = ref_rows(ref, name)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{d.isoformat()}.parquet" for d in DAYS] + ["metadata.json"])
    assert sorted(result.files) == sorted(str(out / f"{d.isoformat()}.parquet") for d in DAYS)
    for d in DAYS:
        part = pl.read_parquet(out / f"{d.isoformat()}.parquet")
        assert set(part["ts"].dt.convert_time_zone("US/Eastern").dt.date().to_list()) == {d}
        assert_rows(part, want.filter(pl.col("_day") == d))
    assert result.rows == want.height


@pytest.mark.parametrize("partition_by", [None, "day"])
def test_days_an_experiment_keeps_no_rows_of_get_no_file(
        folder: Path, ref: pl.DataFrame, tmp_path: Path, partition_by: str | None) -> None:
    # A filter that keeps only the first two days: the other days' files would hold no rows.
    cut = dt.datetime.combine(DAYS[2], dt.time(0), tzinfo=ZoneInfo("US/Eastern"))
    h = Harness(folder)
    h.add_experiment("early", f"ts < TIMESTAMPTZ '{cut.isoformat()}' AND volume > 1000")
    out = tmp_path / "out"
    result = h.sink("early", out, partition_by=partition_by)
    want = ref.filter((pl.col("_day") < DAYS[2]) & (pl.col("volume") > 1000))
    assert want.height > 0
    parts = sorted(out.glob("*.parquet"))
    assert len(parts) == 2 and sorted(str(p) for p in parts) == sorted(result.files)
    assert all(pq.read_metadata(p).num_rows > 0 for p in parts)
    assert_rows(read_back(out), want)
    assert result.rows == want.height
    assert json.loads((out / "metadata.json").read_text())["duckharness_sink"]["files"] == [p.name for p in parts]
    with Harness(out) as h2:
        assert h2.metrics(["count"], pairs=["pred_10s:target_10s"])["value"][0] == want.height


@pytest.mark.parametrize("partition_by", [None, "day"])
@pytest.mark.parametrize("how", ["row_by_row", "whole", "python_per_batch", "python_all_rows"])
def test_an_experiment_that_keeps_no_rows_writes_one_empty_file_with_its_columns(
        folder: Path, tmp_path: Path, how: str, partition_by: str | None) -> None:
    # (By day, an experiment run on all rows or through a Python step wrote no file at all: the
    # output was no source.)
    h = Harness(folder)
    if how == "row_by_row":
        h.add_experiment("none", "volume < 0")
    elif how == "whole":
        h.add_experiment("none", "SELECT * FROM (SELECT *, row_number() OVER (ORDER BY ts) AS rn FROM baseline) "
                                 "WHERE volume < 0")
    else:
        h.add_experiment("none", lambda lf: lf.filter(pl.col("volume") < 0), per_batch=how == "python_per_batch")
    out = tmp_path / "out"
    result = h.sink("none", out, partition_by=partition_by)
    parts = sorted(out.glob("*.parquet"))
    assert [p.name for p in parts] == ["data.parquet"]  # no day's or part's name for a file of no rows
    assert result.files == [str(parts[0])] and result.rows == 0
    assert pq.read_metadata(parts[0]).num_rows == 0
    assert pq.read_schema(parts[0]).names == list(h.experiments.columns("none"))
    with Harness(out) as h2:  # still a source
        assert h2.metrics(["count"], pairs=["pred_10s:target_10s"])["value"][0] == 0


def test_partition_by_other_than_day_is_refused(harness: Harness, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="partition_by"):
        harness.sink("liquid", tmp_path / "out", partition_by="symbol")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "pairs"), [
    ("liquid", ["pred_10s:target_10s", "pred_1s:target_1s"]),
    ("z_day", ["pred_z:target_10s"]),
    ("z_all", ["pred_z:target_10s"]),
])
@pytest.mark.parametrize("partition_by", [None, "day"])
def test_output_opens_as_a_harness_with_the_experiments_metrics(
        harness: Harness, ref: pl.DataFrame, tmp_path: Path, name: str, pairs: list[str],
        partition_by: str | None) -> None:
    out = tmp_path / "out"
    harness.sink(name, out, partition_by=partition_by)
    metrics = ["count", "r2", "mse", "corr", "mae"]
    with Harness(out) as h2:
        assert h2.session_window is not None and h2.session_window.describe() == harness.session_window.describe()
        for by in (None, "day"):
            new = h2.metrics(metrics, pairs=pairs, experiments=["baseline"], by=by)
            old = harness.metrics(metrics, pairs=pairs, experiments=[name], by=by)
            keys = ["pred", "target", *(["day"] if by else []), "metric"]
            new_v = {tuple(r[k] for k in keys): r["value"] for r in new.iter_rows(named=True)}
            old_v = {tuple(r[k] for k in keys): r["value"] for r in old.iter_rows(named=True)}
            assert new_v == pytest.approx(old_v, rel=1e-9, abs=1e-12)
        # And against the reference, so the round trip is not equal-but-wrong.
        rows = ref_rows(ref, name)
        res = h2.metrics(["count", "r2", "mse"], pairs=pairs[:1])
        got = dict(zip(res["metric"], res["value"], strict=True))
        p, t = (rows[c].to_numpy() for c in pairs[0].split(":"))
        assert got["count"] == len(p)
        assert got["r2"] == pytest.approx(r2_score(t, p), rel=1e-9)
        assert got["mse"] == pytest.approx(mean_squared_error(t, p), rel=1e-9)


def test_output_of_an_aggregate_experiment_opens_as_a_harness(harness: Harness, ref: pl.DataFrame,
                                                             tmp_path: Path) -> None:
    # The output of per_symbol has no time column; its metadata must not name one it lacks.
    out = tmp_path / "out"
    harness.sink("per_symbol", out)
    want = ref.group_by("symbol").agg(pl.col("pred_10s").mean(), pl.col("target_10s").mean()).sort("symbol")
    assert_frame_equal(read_back(out).sort("symbol"), want, rel_tol=1e-9)
    with Harness(out) as h2:
        assert h2.metrics(["count"], pairs=["pred_10s:target_10s"])["value"][0] == want.height


def test_partition_by_day_of_an_experiment_without_time_column_is_refused(harness: Harness, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"per_symbol.*no time column"):
        harness.sink("per_symbol", tmp_path / "out", partition_by="day")
    assert os.listdir(tmp_path) == []


# --- metadata --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["liquid", "z_day"])
def test_metadata_json_is_the_sources_plus_provenance(
        harness: Harness, folder: Path, ref: pl.DataFrame, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    harness.sink(name, out)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["start_time"] == "09:30:00" and meta["end_time"] == "16:00:00"
    assert meta["timezone"] == "US/Eastern" and meta["time_column"] == "ts"
    assert meta["model"] == "m1" and meta["horizons"] == ["1s", "10s", "60s"]
    prov = meta["duckharness_sink"]
    assert prov["experiment"] == name
    assert os.path.realpath(prov["source"]) == os.path.realpath(folder)
    assert prov["source_files"] == len(DAYS)
    assert prov["rows"] == ref_rows(ref, name).height
    assert dt.datetime.fromisoformat(prov["written_at"]) >= before
    chain = prov["chain"]
    assert "volume > 1000" in chain
    assert all(f"{d.isoformat()}.parquet" in chain for d in DAYS)
    if name == "z_day":
        assert "python:" in chain and "add_pred_z" in chain and "per batch" in chain
    assert isinstance(prov["duckharness_version"], str) and prov["duckharness_version"]


def test_sink_without_window_keeps_all_rows_and_drops_the_window_from_metadata(
        harness: Harness, raw: pl.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "out"
    harness.sink("liquid", out, window=False)
    want = raw.filter(pl.col("volume") > 1000)
    in_window = want.filter((pl.col("_tod") >= dt.time(9, 30)) & (pl.col("_tod") <= dt.time(16)))
    assert want.height > in_window.height + 1000  # the window would have dropped rows
    assert_rows(read_back(out), want)
    meta = json.loads((out / "metadata.json").read_text())
    assert "start_time" not in meta and "end_time" not in meta
    with Harness(out) as h2:
        assert h2.session_window is None
        assert h2.metrics(["count"], pairs=["pred_10s:target_10s"])["value"][0] == want.height


# --- overwrite and atomicity ---------------------------------------------------------------------

def test_existing_output_is_refused_without_overwrite_and_left_untouched(harness: Harness, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"already exists.*overwrite"):
        harness.sink("liquid", out)
    assert snapshot(out) == {"precious.txt": b"keep me"}
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("where", ["inside", "the_source", "around"])
def test_a_sink_overlapping_a_source_folder_is_refused_and_nothing_is_written(
        tmp_path: Path, where: str) -> None:
    """A sink into a subfolder of a folder of nested day files would be listed as more of the
    source (every row twice); into the source itself or a folder around it, it would replace it."""
    rng = np.random.default_rng(4)
    src = tmp_path / "src"
    for d in DAYS[:2]:
        write_dataset(src / "2026" / d.isoformat(), {"part": one_day(d, 300, rng)}, None)
    (src / "metadata.json").write_text(json.dumps(META))
    before = snapshot(tmp_path)
    out = {"inside": src / "derived", "the_source": src, "around": tmp_path}[where]
    with Harness(src) as h:
        assert len(h.files) == 2
        with pytest.raises(InputError, match=rf"Output {out} overlaps the source {src}.*outside it"):
            h.sink("baseline", out, overwrite=True)
    assert snapshot(tmp_path) == before


def test_a_link_to_the_source_folder_is_the_source_folder(folder: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for day in sorted(folder.glob("*.parquet"))[:2]:
        (src / day.name).write_bytes(day.read_bytes())
    (tmp_path / "link").symlink_to(src)
    with Harness(str(src / "*.parquet"), metadata=META) as h, pytest.raises(InputError, match="overlaps the source"):
        h.sink("baseline", tmp_path / "link" / "new")
    with Harness(tmp_path / "link", metadata=META) as h, pytest.raises(InputError, match="overlaps the source"):
        h.sink("baseline", src / "new")
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in sorted(folder.glob("*.parquet"))[:2])


def test_a_sample_into_the_source_folder_is_refused(folder: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from duckharness.cli import main

    src = tmp_path / "src"
    src.mkdir()
    for day in sorted(folder.glob("*.parquet"))[:2]:
        (src / day.name).write_bytes(day.read_bytes())
    (src / "metadata.json").write_text(json.dumps(META))
    before = snapshot(src)
    assert main(["sample", str(src), "-o", str(src / "sample.parquet")]) == 1
    assert f"Sample {src / 'sample.parquet'} overlaps the source" in capsys.readouterr().err
    assert snapshot(src) == before


def test_a_sink_beside_a_single_source_file_is_allowed(folder: Path, tmp_path: Path) -> None:
    day = sorted(folder.glob("*.parquet"))[0]
    single = tmp_path / day.name
    single.write_bytes(day.read_bytes())
    with Harness(single, metadata=META) as h:
        result = h.sink("baseline", tmp_path / "out")
        assert result.rows == h.metrics(["count"], pairs="pred_10s:target_10s")["value"][0]


def test_a_folder_with_files_of_its_own_warns_that_its_subfolders_are_not_read(folder: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    days = sorted(folder.glob("*.parquet"))
    (src / days[0].name).write_bytes(days[0].read_bytes())
    (src / "old").mkdir()
    (src / "old" / days[1].name).write_bytes(days[1].read_bytes())
    with pytest.warns(DuckHarnessWarning, match=r"subfolders are not read \(1 Parquet file\(s\) there, e\.g\. old/"):
        h = Harness(src, metadata=META)
    assert h.files == [str(src / days[0].name)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, when the source was opened, not again by each run
        assert h.metrics(["count"], pairs=["pred_10s:target_10s"])["value"][0] > 0
    h.close()


def test_overwrite_keeps_an_earlier_sink_that_holds_a_users_own_files(harness: Harness, tmp_path: Path) -> None:
    out = tmp_path / "out"
    harness.sink("liquid", out)
    (out / "my_results.csv").write_text("a,b\n1,2\n")
    (out / "mine.parquet").write_bytes(b"a user's own Parquet file")
    (out / "plots").mkdir()
    before = snapshot(out)
    with pytest.raises(InputError, match=r"earlier sink, but it also holds files a sink does not write "
                                         r"\(mine\.parquet, my_results\.csv, plots\)"):
        harness.sink("z_day", out, overwrite=True)
    assert snapshot(out) == before and (out / "plots").is_dir()


def test_overwrite_replaces_the_whole_output_folder(harness: Harness, ref: pl.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "out"
    harness.sink("liquid", out, partition_by="day")
    result = harness.sink("z_day", out, overwrite=True)
    assert sorted(os.listdir(out)) == sorted([*(os.path.basename(f) for f in result.files), "metadata.json"])
    assert not any(n.endswith(".parquet") and n[:4] == "2026" for n in os.listdir(out))
    assert_rows(read_back(out), ref_rows(ref, "z_day"))
    assert json.loads((out / "metadata.json").read_text())["duckharness_sink"]["experiment"] == "z_day"
    assert os.listdir(tmp_path) == ["out"]  # the old folder is gone


@pytest.mark.parametrize("name", ["boom", "boom_all"])
@pytest.mark.parametrize("partition_by", [None, "day"])
def test_transform_failing_on_third_day_leaves_nothing_behind(
        harness: Harness, tmp_path: Path, name: str, partition_by: str | None) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "other.txt").write_text("x")
    before = sorted(os.listdir(parent))
    with pytest.raises(TransformError, match=rf"'{name}'.*fail_on_third_day.*third day"):
        harness.sink(name, parent / "out", partition_by=partition_by)
    assert sorted(os.listdir(parent)) == before
    assert not (parent / "out").exists()


def test_failed_overwrite_leaves_the_existing_output_intact(harness: Harness, tmp_path: Path) -> None:
    out = tmp_path / "out"
    harness.sink("liquid", out, partition_by="day")
    before_files, before_parent = snapshot(out), sorted(os.listdir(tmp_path))
    with pytest.raises(TransformError, match="'boom'"):
        harness.sink("boom", out, overwrite=True)
    assert snapshot(out) == before_files
    assert sorted(os.listdir(tmp_path)) == before_parent
    with Harness(out) as h2:  # still a valid source
        assert len(h2.files) == len(DAYS)


def test_sink_of_unknown_experiment_names_it_and_creates_nothing(harness: Harness, tmp_path: Path) -> None:
    with pytest.raises(UnknownExperimentError, match="'nope'"):
        harness.sink("nope", tmp_path / "out")
    assert os.listdir(tmp_path) == []


# --- timings and progress ---------------------------------------------------------------------------

def test_sink_reports_write_and_total_timings(harness: Harness, tmp_path: Path) -> None:
    result = harness.sink("z_day", tmp_path / "out")
    t = harness.last_run.timings
    assert {"write", "total"} <= set(t)
    assert 0 <= t["write"] <= t["total"]
    assert t == result.timings


def test_progress_draws_a_bar_on_the_given_stream_when_enabled() -> None:
    stream = io.StringIO()
    with Progress(4, "work", enabled=True, stream=stream) as bar:
        bar.advance()
        bar.advance(3)
    text = stream.getvalue()
    frames = text.split("\r")[1:]
    assert len(frames) == 2
    assert frames[0].startswith("work [" + "#" * 7 + "." * 23 + "] 1/4 ")
    assert frames[1].startswith("work [" + "#" * 30 + "] 4/4 ")
    assert text.endswith("\n")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stream_cls", "enabled", "total", "drawn"), [
    (io.StringIO, None, 5, False),  # not a terminal
    (_Tty, None, 5, True),  # a terminal
    (_Tty, False, 5, False),  # asked to be quiet
    (_Tty, True, 1, False),  # one unit of work: no bar
])
def test_progress_is_shown_only_on_a_terminal_unless_asked(
        stream_cls: type, enabled: bool | None, total: int, drawn: bool) -> None:
    stream = stream_cls()
    with Progress(total, "work", enabled=enabled, stream=stream) as bar:
        for _ in range(total):
            bar.advance()
    assert bar.done == total
    assert (f"{total}/{total}" in stream.getvalue()) is drawn
    assert (stream.getvalue() == "") is not drawn


def test_sink_and_metrics_draw_progress_on_stderr_only_when_asked(
        harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    harness.sink("liquid", tmp_path / "a", progress=True)
    err = capsys.readouterr().err
    assert "sink liquid [" in err and f"{len(DAYS)}/{len(DAYS)}" in err
    harness.sink("liquid", tmp_path / "b", progress=False)
    harness.sink("liquid", tmp_path / "c")  # default: only on a terminal, and capsys is not one
    assert capsys.readouterr().err == ""
    harness.metrics(["count"], pairs=["pred_10s:target_10s"], experiments=["liquid", "z_day"], progress=True)
    err = capsys.readouterr().err
    assert "metrics [" in err and f"{2 * len(DAYS)}/{2 * len(DAYS)}" in err


def test_rows_an_experiment_moves_out_of_the_window_are_kept_when_the_sink_is_read_back(
        folder: Path, ref: pl.DataFrame, tmp_path: Path) -> None:
    h = Harness(folder, workers=2)
    h.add_experiment("later", "SELECT * REPLACE (ts + INTERVAL 30 MINUTE AS ts) FROM baseline WHERE volume > 1000")
    want = ref_rows(ref, "liquid").with_columns(pl.col("ts") + pl.duration(minutes=30))
    moved = want.filter(pl.col("ts").dt.convert_time_zone("US/Eastern").dt.time() > dt.time(16)).height
    assert moved > 100
    for partition_by in (None, "day"):
        out = tmp_path / f"out-{partition_by}"
        with pytest.warns(DuckHarnessWarning, match=f"moved {moved:,} of the {want.height:,} rows"):
            h.sink("later", out, partition_by=partition_by)
        assert_rows(read_back(out), want)
        meta = json.loads((out / "metadata.json").read_text())
        assert "start_time" not in meta and "end_time" not in meta and meta["timezone"] == "US/Eastern"
        assert meta["duckharness_sink"]["rows_picked_by_window"] == "09:30:00–16:00:00 US/Eastern"
        with Harness(out) as back:
            assert back.metrics(["count"], pairs=["pred_10s:target_10s"])["value"][0] == want.height
    h.close()



def to_next_night(lf: pl.LazyFrame) -> pl.LazyFrame:
    return lf.with_columns(pl.col("ts") + pl.duration(hours=13, minutes=57))


def test_a_python_step_that_moves_rows_to_other_days_is_sunk_by_their_own_days(
        folder: Path, ref: pl.DataFrame, tmp_path: Path) -> None:
    h = Harness(folder, workers=2)
    h.add_experiment("liquid", "volume > 1000")
    h.add_experiment("night", to_next_night, base="liquid")
    want = ref_rows(ref, "liquid").with_columns(pl.col("ts") + pl.duration(hours=13, minutes=57))
    own_day = pl.col("ts").dt.convert_time_zone("US/Eastern").dt.date()
    assert want.select((own_day != pl.col("_day")).sum()).item() > 1000  # rows moved to the next day
    out = tmp_path / "out"
    with pytest.warns(DuckHarnessWarning, match="outside the session window") as caught:
        h.sink("night", out, partition_by="day")
    assert {w.filename for w in caught} == {__file__}  # the warning points at the caller's line
    assert_rows(read_back(out), want)
    for p in sorted(out.glob("*.parquet")):
        days = pl.read_parquet(p).select(own_day.unique())["ts"].to_list()
        assert [d.isoformat() for d in days] == [p.stem[:10]], p.name
    assert sorted({p.stem[:10] for p in out.glob("*.parquet")}) == sorted(
        {d.isoformat() for d in want.select(own_day)["ts"].to_list()})
    h.close()


def double_pred(lf: pl.LazyFrame) -> pl.LazyFrame:
    return lf.with_columns(pl.col("pred_10s") * 2)


@pytest.mark.parametrize("layout", ["one_file_of_six_days", "a_day_over_two_files", "overnight_cut_at_midnight"])
def test_a_per_day_python_step_sunk_by_day_writes_each_row_once(tmp_path: Path, layout: str) -> None:
    """Before, each held day's group of files was written whole, partitioned by row: a file of six
    days was written six times (519,384 rows for 86,564)."""
    rng = np.random.default_rng(4)
    days = trading_days(dt.date(2026, 3, 4), 4)
    tables = {d: one_day(d, 600, rng, symbols=4) for d in days}
    meta: dict = dict(SESSION)
    src = tmp_path / "src"
    if layout == "one_file_of_six_days":
        write_dataset(src, {"all": pa.concat_tables(list(tables.values()))}, meta, row_group_size=10_000)
    elif layout == "a_day_over_two_files":
        split = tables[days[1]]
        write_dataset(src, {"a": pa.concat_tables([tables[days[0]], split.slice(0, 250)]),
                            "b": pa.concat_tables([split.slice(250), tables[days[2]], tables[days[3]]])}, meta)
    else:  # 12:00-10:00 sessions (overnight: 08:00-10:00 belongs to the day before), files cut at midnight
        meta = {"start_time": "12:00", "end_time": "10:00", "timezone": "US/Eastern"}
        rows = pa.concat_tables(list(tables.values()))
        local = pl.from_arrow(rows).select(pl.col("ts").dt.convert_time_zone("US/Eastern").dt.date())["ts"]
        write_dataset(src, {d.isoformat(): rows.filter((local == d).to_arrow()) for d in days}, meta)
    want = session_days(src, meta)
    h = Harness(src, cache=False)
    h.add_experiment("z", double_pred)
    out = tmp_path / "out"
    result = h.sink("z", out, partition_by="day")
    got = read_back(out)
    assert result.rows == got.height == want.height
    assert got["ts"].is_unique().all()
    for p in out.glob("*.parquet"):  # each file holds its own day's rows only
        stamps = pl.read_parquet(p)["ts"]
        assert set(want.filter(pl.col("ts").is_in(stamps.implode()))["_day"].unique().to_list()) == {
            dt.date.fromisoformat(p.stem[:10])}, p.name
