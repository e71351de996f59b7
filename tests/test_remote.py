"""Remote sources through fsspec: a real S3 endpoint (moto's server on 127.0.0.1) and memory://.

Every remote result is compared with the local run over the very same files (``==`` on values:
the same bytes in the same batches must give the same bits).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from _s3 import S3, serve_s3, time_limit
from conftest import SESSION, write_dataset

from duckharness import Harness
from duckharness.cli import main
from duckharness.data.source import is_remote
from duckharness.demo import one_day, trading_days
from duckharness.errors import ExecutionError, InputError, MetadataError, SourceError, TransformError

BUCKET = "dh-remote"
METRICS = ["count", "r2", "mse", "mae", "corr", "hit_rate"]
DAYS = trading_days(dt.date(2026, 3, 4), 4)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    """The moto S3 server on 127.0.0.1, shared with the other modules that use it."""
    yield from serve_s3()


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    """Every test fails after 60 s instead of hanging the run."""
    with time_limit(60):
        yield


# --- data ---------------------------------------------------------------------------------------------

def add_z(lf: pl.LazyFrame) -> pl.LazyFrame:
    """A per-batch Python step (module level, so it pickles)."""
    return lf.with_columns((pl.col("pred_10s") / pl.col("pred_10s").std()).alias("pred_z"))


def fail_on_third_day(lf: pl.LazyFrame) -> pl.LazyFrame:
    df = lf.collect()
    if df.height and df["ts"].dt.convert_time_zone("US/Eastern").dt.date().min() == DAYS[2]:
        raise ValueError("no good on the third day")
    return df.lazy()


def drift_table(rows: int, volume: pa.DataType, offset_minutes: int, extra: dict[str, pa.Array]) -> pa.Table:
    start = np.datetime64("2026-03-05T15:00:00", "us") + np.timedelta64(offset_minutes, "m")
    rng = np.random.default_rng(offset_minutes)
    return pa.table({
        "ts": pa.array(start + np.arange(rows).astype("timedelta64[s]"), pa.timestamp("us", tz="UTC")),
        "symbol": pa.array([f"S{i % 3}" for i in range(rows)]),
        "volume": pa.array(np.arange(rows) * 10, volume),
        "target_10s": rng.standard_normal(rows),
        "pred_10s": rng.standard_normal(rows),
        **extra,
    })


@pytest.fixture(scope="module", autouse=True)
def data(tmp_path_factory: pytest.TempPathFactory, s3: S3) -> dict[str, object]:
    """Local folders and their copies in the bucket; everything is uploaded before any test runs
    (s3fs caches listings per filesystem instance)."""
    root = tmp_path_factory.mktemp("remote")
    rng = np.random.default_rng(7)
    run = root / "run1"
    write_dataset(run, {d.isoformat(): one_day(d, 1500, rng, symbols=8) for d in DAYS}, SESSION, row_group_size=500)
    drift = root / "drift"
    write_dataset(drift, {
        "a": drift_table(300, pa.int32(), 0, {"f_only_a": pa.array(np.ones(300, dtype=np.float32))}),
        "b": drift_table(200, pa.int64(), 60, {"f_only_b": pa.array(["x"] * 200)}),
    }, {})
    s3.bucket(BUCKET)
    urls = s3.upload(run, BUCKET, "run1")
    s3.upload(run, BUCKET, "victim")          # a source that a sink must never overwrite
    s3.upload(drift, BUCKET, "drift")
    for p in sorted(run.glob("*.parquet"))[:2]:  # data without metadata.json
        s3.put(BUCKET, f"nometa/{p.name}", p.read_bytes())
    s3.put(BUCKET, "meta/narrow.json", json.dumps({**SESSION, "start_time": "10:00", "end_time": "11:00"}).encode())
    s3.put(BUCKET, "foreign/notes.txt", b"someone else's data")
    return {"run": run, "drift": drift, "urls": urls}


def values(df: pl.DataFrame) -> list[float | None]:
    return df["value"].to_list()


def assert_identical(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert a.drop("value").equals(b.drop("value"))
    assert values(a) == values(b)  # ==, not approx
    assert a.height > 0


def with_experiments(h: Harness) -> Harness:
    h.add_experiment("liquid", "volume > 1000")
    h.add_experiment("tight", "SELECT * FROM liquid WHERE spread < 0.02")
    h.add_experiment("z", add_z)
    return h


# --- the same results as the local run --------------------------------------------------------------

def test_is_remote_tells_urls_from_local_paths(tmp_path: Path) -> None:
    assert is_remote("s3://b/p/") and is_remote(["s3://b/p/a.parquet"]) and is_remote("memory://x")
    assert not is_remote(str(tmp_path)) and not is_remote(tmp_path) and not is_remote("file:///tmp/x")
    assert not is_remote([str(tmp_path / "a.parquet")]) and not is_remote([])


@pytest.fixture(scope="module")
def local_metrics(data: dict) -> dict[str, pl.DataFrame]:
    with with_experiments(Harness(data["run"], workers=2)) as local:
        return {"pooled": local.metrics(METRICS), "day": local.metrics(METRICS, by="day"),
                "day_sql": local.metrics(METRICS, by="day", experiments=["baseline", "tight"])}


@pytest.mark.parametrize("form", ["directory", "directory_no_slash", "glob", "list"])
def test_remote_source_equals_the_local_run_exactly(s3: S3, data: dict, local_metrics: dict, form: str) -> None:
    source = {"directory": f"s3://{BUCKET}/run1/", "directory_no_slash": f"s3://{BUCKET}/run1",
              "glob": f"s3://{BUCKET}/run1/*.parquet", "list": list(data["urls"])}[form]
    with with_experiments(Harness(source, storage_options=s3.options(), workers=2)) as remote, \
            Harness(data["run"]) as local:
        assert remote.dataset.remote and not local.dataset.remote
        assert remote.files == data["urls"]
        assert remote.dataset.root == f"s3://{BUCKET}/run1"
        assert remote.columns == local.columns
        assert [f.rows for f in remote.dataset.files] == [f.rows for f in local.dataset.files]
        assert [(f.time_min, f.time_max) for f in remote.dataset.files] == \
            [(f.time_min, f.time_max) for f in local.dataset.files]
        if form == "directory":  # every experiment, pooled and by day
            for by in (None, "day"):
                got = remote.metrics(METRICS, by=by)
                assert set(got["experiment"]) == {"baseline", "liquid", "tight", "z"}
                assert_identical(got, local_metrics["day" if by else "pooled"])
        else:
            got = remote.metrics(METRICS, by="day", experiments=["baseline", "tight"])
            assert_identical(got, local_metrics["day_sql"])


def test_metadata_json_is_read_from_the_bucket(s3: S3, data: dict) -> None:
    with Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options()) as h, Harness(data["run"]) as local:
        assert h.metadata.path == f"s3://{BUCKET}/run1/metadata.json"
        assert h.session_window is not None
        assert h.session_window.describe() == local.session_window.describe()
        windowed = h.metrics(["count"], pairs=["pred_10s:target_10s"]).filter(metric="count")["value"].item()
        everything = h.metrics(["count"], pairs=["pred_10s:target_10s"], window=False)
        assert windowed < everything.filter(metric="count")["value"].item() == 6000  # the window was applied
    # An explicit metadata file in the bucket (a narrower window) is read too.
    narrow = f"s3://{BUCKET}/meta/narrow.json"
    with Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options(), metadata=narrow) as h, \
            Harness(data["run"], metadata={**SESSION, "start_time": "10:00", "end_time": "11:00"}) as local:
        assert h.metadata.path == narrow
        assert_identical(h.metrics(["count", "r2"]), local.metrics(["count", "r2"]))
        assert h.metrics(["count"]).filter(metric="count")["value"][0] < windowed


def test_a_local_metadata_file_serves_a_remote_source(s3: S3, data: dict, tmp_path: Path) -> None:
    """``--metadata /local/file.json`` with an ``s3://`` source used to be looked up in the bucket."""
    local_file = tmp_path / "narrow.json"
    local_file.write_text(json.dumps({**SESSION, "start_time": "10:00", "end_time": "11:00"}))
    for given in (str(local_file), local_file, f"file://{local_file}"):
        with Harness(f"s3://{BUCKET}/nometa/", storage_options=s3.options(), metadata=given, cache=False) as h:
            assert h.metadata.path == str(local_file)
            assert h.session_window is not None and h.session_window.describe().startswith("10:00:00–11:00:00")


def test_schema_drift_across_remote_files(s3: S3, data: dict) -> None:
    with Harness(f"s3://{BUCKET}/drift/", storage_options=s3.options()) as h, Harness(data["drift"]) as local:
        assert h.columns == local.columns
        assert h.columns["volume"] == "BIGINT"  # int32 in one file, int64 in the other
        assert list(h.columns)[-2:] == ["f_only_a", "f_only_b"]
        assert h.columns["f_only_a"] == "FLOAT" and h.columns["f_only_b"] == "VARCHAR"
        got = h.metrics(["count", "r2", "corr"], by="symbol", window=False)
        assert_identical(got, local.metrics(["count", "r2", "corr"], by="symbol", window=False))
        assert got.filter(metric="count")["value"].sum() == 500
        rows = h.relation().pl()
        assert rows.height == 500 and rows["f_only_a"].null_count() == 200 and rows["f_only_b"].null_count() == 300


def test_sample_random_days_reads_only_the_chosen_files(s3: S3, data: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    with with_experiments(Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options())) as h, \
            with_experiments(Harness(data["run"])) as local:
        fs = h.dataset.filesystem
        opened: list[str] = []
        real_open = fs.open

        def spy(path: str, *a: object, **kw: object) -> object:
            opened.append(path)
            return real_open(path, *a, **kw)

        monkeypatch.setattr(fs, "open", spy)
        sqls: list[str] = []
        with h.trace(sqls.append):
            got = h.sample("z", n_days=2, seed=3)
        monkeypatch.undo()
        days = sorted(got["ts"].dt.convert_time_zone("US/Eastern").dt.date().unique().to_list())
        assert len(days) == 2
        chosen = {f"s3://{BUCKET}/run1/{d.isoformat()}.parquet" for d in days}
        assert set(opened) == chosen  # only the chosen days' files were read (opened through fsspec)
        read_in_sql = {u for u in data["urls"] if any(u in s for s in sqls)}
        assert read_in_sql == chosen
        assert got.equals(local.sample("z", n_days=2, seed=3))


# --- sinks ------------------------------------------------------------------------------------------

def _no_new_local_staging(before: set[str]) -> bool:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "duckharness-sink-*"))) <= before


@pytest.mark.parametrize("partition_by", [None, "day"])
def test_sink_to_s3_reopens_as_a_harness_equal_to_a_local_sink(
        s3: S3, data: dict, tmp_path: Path, partition_by: str | None) -> None:
    out = f"out/sink-{partition_by}-{uuid.uuid4().hex[:6]}"
    with with_experiments(Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options())) as h:
        result = h.sink("tight", f"s3://{BUCKET}/{out}", partition_by=partition_by)
        local_result = h.sink("tight", tmp_path / "tight", partition_by=partition_by)
    assert result.path == f"s3://{BUCKET}/{out}"
    names = [Path(f).name for f in local_result.files]
    assert result.files == [f"s3://{BUCKET}/{out}/{n}" for n in names]
    assert result.rows == local_result.rows > 0
    # Exactly the parts and metadata.json under the target, no staging prefix anywhere.
    assert s3.keys(BUCKET, out) == sorted([f"{out}/{n}" for n in names] + [f"{out}/metadata.json"])
    assert not [k for k in s3.keys(BUCKET, "out/") if ".tmp-" in k]
    meta = json.loads(s3.client().get_object(Bucket=BUCKET, Key=f"{out}/metadata.json")["Body"].read())
    assert meta["duckharness_sink"]["experiment"] == "tight"
    assert meta["duckharness_sink"]["source"] == f"s3://{BUCKET}/run1"
    with Harness(f"s3://{BUCKET}/{out}", storage_options=s3.options()) as back, Harness(tmp_path / "tight") as loc:
        assert back.files == result.files
        assert back.relation().pl().equals(loc.relation().pl())
        assert back.relation().pl().height == result.rows
        assert_identical(back.metrics(METRICS, by="day"), loc.metrics(METRICS, by="day"))


def test_sink_refuses_an_existing_remote_output_without_overwrite(s3: S3) -> None:
    out = f"s3://{BUCKET}/out/again"
    with with_experiments(Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options())) as h:
        first = h.sink("tight", out)
        before = s3.keys(BUCKET, "out/again/")
        with pytest.raises(InputError, match="already exists") as info:
            h.sink("liquid", out)
        assert out in str(info.value)
        assert s3.keys(BUCKET, "out/again/") == before
        with Harness(out, storage_options=s3.options()) as back:
            assert back.relation().pl().height == first.rows
        # overwrite=True replaces an earlier sink.
        second = h.sink("liquid", out, overwrite=True)
        assert second.rows > first.rows
    # A fresh filesystem instance, so this checks the bucket and not s3fs's cached listing (that
    # cache is the subject of its own test below).
    with Harness(out, storage_options=s3.options(skip_instance_cache=True)) as back:
        assert back.relation().pl().height == second.rows
        assert back.metadata.as_dict()["duckharness_sink"]["experiment"] == "liquid"


def test_overwrite_never_replaces_the_remote_source(s3: S3) -> None:
    """A local sink refuses an output that overlaps the source even with overwrite=True."""
    before = s3.keys(BUCKET, "victim/")
    with with_experiments(Harness(f"s3://{BUCKET}/victim", storage_options=s3.options())) as h, \
            pytest.raises(InputError, match="overlaps the source"):
        h.sink("tight", f"s3://{BUCKET}/victim", overwrite=True)
    assert s3.keys(BUCKET, "victim/") == before


def test_overwrite_never_replaces_remote_data_that_is_not_an_earlier_sink(s3: S3) -> None:
    with with_experiments(Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options())) as h, \
            pytest.raises(InputError, match="not an earlier duckharness sink"):
        h.sink("tight", f"s3://{BUCKET}/foreign", overwrite=True)
    assert s3.keys(BUCKET, "foreign/") == ["foreign/notes.txt"]


def test_sink_whose_transform_fails_leaves_nothing_under_the_target(s3: S3) -> None:
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "duckharness-sink-*")))
    with Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options()) as h:
        h.add_experiment("bad", fail_on_third_day)
        with pytest.raises(TransformError, match="no good on the third day"):
            h.sink("bad", f"s3://{BUCKET}/out/bad")
    assert s3.keys(BUCKET, "out/bad") == []  # neither the target nor a staging prefix beside it
    assert _no_new_local_staging(before)


def test_sink_whose_upload_fails_removes_the_staged_parts(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    with with_experiments(Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options())) as h:
        fs = h.dataset.filesystem
        real_put, calls = fs.put_file, []

        def flaky_put(lpath: str, rpath: str, *a: object, **kw: object) -> object:
            calls.append(rpath)
            if len(calls) == 3:
                raise OSError("connection reset while uploading")
            return real_put(lpath, rpath, *a, **kw)

        monkeypatch.setattr(fs, "put_file", flaky_put)
        with pytest.raises(ExecutionError, match=f"s3://{BUCKET}/out/upfail.*uploading.*connection reset"):
            h.sink("tight", f"s3://{BUCKET}/out/upfail")
    assert len(calls) == 3  # two parts were staged before the failure
    assert s3.keys(BUCKET, "out/upfail") == []


def test_a_staging_prefix_the_store_cannot_remove_is_named_in_the_error(
        s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store stops answering mid-upload: the staged parts cannot be removed either, and the
    error says which prefix is left to delete."""
    with with_experiments(Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options())) as h:
        fs = h.dataset.filesystem
        calls: list[str] = []
        monkeypatch.setattr(fs, "put_file", _failing_after(fs.put_file, 2, OSError("read timeout"), calls))
        monkeypatch.setattr(fs, "rm", _failing_after(fs.rm, 0, OSError("read timeout"), []))
        with pytest.raises(ExecutionError, match=(
            rf"uploading.*read timeout.*staging prefix s3://{BUCKET}/out/stall\.tmp-[0-9a-f]{{8}}/ could not be "
            rf"removed.*delete it")) as info:
            h.sink("tight", f"s3://{BUCKET}/out/stall")
    named = re.search(rf"s3://{BUCKET}/(out/stall\.tmp-[0-9a-f]{{8}})/", str(info.value))
    left = s3.keys(BUCKET, "out/stall")
    assert named and len(left) == 2 and all(k.startswith(named.group(1) + "/") for k in left)
    for key in left:  # the store is back: deleting it is what the error asks for
        s3.client().delete_object(Bucket=BUCKET, Key=key)


def _failing_after(real: object, k: int, error: BaseException, calls: list[str]) -> object:
    """A stand-in for a filesystem method that works ``k`` times, then raises ``error``."""
    def call(path: object, *a: object, **kw: object) -> object:
        calls.append(str(path))
        if len(calls) > k:
            raise error
        return real(path, *a, **kw)  # type: ignore[operator]
    return call


def test_sink_moves_data_files_first_and_commits_with_metadata_json_last(
        s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the new sink moves into place over an earlier one, no reader ever finds a metadata.json
    (the commit marker) beside a mix of files, and the marker object says what is happening."""
    out, prefix = f"s3://{BUCKET}/out/order", "out/order/"
    with with_experiments(Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options())) as h:
        h.sink("tight", out, partition_by="day")
        fs = h.dataset.filesystem
        real_mv, seen = fs.mv, []

        def watched_mv(src: str, dst: str, *a: object, **kw: object) -> object:
            seen.append((Path(dst).name, s3.keys(BUCKET, prefix)))
            return real_mv(src, dst, *a, **kw)

        monkeypatch.setattr(fs, "mv", watched_mv)
        second = h.sink("liquid", out, overwrite=True)
    assert [name for name, _ in seen] == [*(Path(f).name for f in second.files), "metadata.json"]
    for _, keys in seen:
        assert f"{prefix}metadata.json" not in keys
        assert f"{prefix}_duckharness_incomplete.json" in keys
    assert s3.keys(BUCKET, prefix) == sorted([f"{prefix}{Path(f).name}" for f in second.files]
                                             + [f"{prefix}metadata.json"])  # no day files of the first


def test_failed_move_removes_what_was_moved_and_names_the_url(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    out = f"s3://{BUCKET}/out/movefail"
    with with_experiments(Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options())) as h:
        fs, calls = h.dataset.filesystem, []
        monkeypatch.setattr(fs, "mv", _failing_after(fs.mv, 2, OSError("connection reset while moving"), calls))
        with pytest.raises(ExecutionError, match=rf"{out}.*moving.*connection reset"):
            h.sink("tight", out)
    assert len(calls) == 3
    assert s3.keys(BUCKET, "out/movefail") == []  # neither the target nor the staging prefix


def test_overwrite_replaces_a_target_left_half_moved_by_an_interrupted_sink(
        s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interruption in the middle of the moves that cannot even clean up (the connection is
    gone) leaves part files without metadata.json, marked as ours; without overwrite that is
    refused, and overwrite=True replaces it."""
    out, prefix = f"s3://{BUCKET}/out/halfway", "out/halfway/"
    with with_experiments(Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options())) as h:
        first = h.sink("tight", out)
        fs, moves, lost = h.dataset.filesystem, [], []
        real_mv, real_rm, real_rm_file = fs.mv, fs.rm, fs.rm_file

        def mv(src: str, dst: str, *a: object, **kw: object) -> object:
            moves.append(dst)
            if len(moves) > 2:  # Ctrl-C in the third move, and the connection is gone from then on
                lost.append(True)
                raise KeyboardInterrupt
            return real_mv(src, dst, *a, **kw)

        def unless_lost(real: object) -> object:
            def call(*a: object, **kw: object) -> object:
                if lost:
                    raise OSError("connection lost")
                return real(*a, **kw)  # type: ignore[operator]
            return call

        with monkeypatch.context() as m:
            m.setattr(fs, "mv", mv)
            m.setattr(fs, "rm", unless_lost(real_rm))
            m.setattr(fs, "rm_file", unless_lost(real_rm_file))
            with pytest.raises(KeyboardInterrupt):
                h.sink("liquid", out, overwrite=True)
        left = s3.keys(BUCKET, prefix)
        assert f"{prefix}metadata.json" not in left and f"{prefix}_duckharness_incomplete.json" in left
        assert any(k.endswith(".parquet") for k in left)
        with pytest.raises(InputError, match=r"already exists.*interrupted while moving into place.*overwrite"):
            h.sink("liquid", out)
        again = h.sink("liquid", out, overwrite=True)
    assert s3.keys(BUCKET, prefix) == sorted([f"{prefix}{Path(f).name}" for f in again.files]
                                             + [f"{prefix}metadata.json"])
    assert not [k for k in s3.keys(BUCKET, "out/halfway") if ".tmp-" in k]  # the stranded staging went too
    with Harness(out, storage_options=s3.options(skip_instance_cache=True)) as back:
        assert back.relation().pl().height == again.rows > first.rows
        assert back.metadata.as_dict()["duckharness_sink"]["experiment"] == "liquid"


def test_earlier_remote_sink_is_kept_when_the_new_one_fails_before_it_is_staged(
        s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    out, prefix = f"s3://{BUCKET}/out/keep", "out/keep/"
    with with_experiments(Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options())) as h:
        first = h.sink("tight", out)
        before = {k: s3.client().get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in s3.keys(BUCKET, prefix)}
        fs, calls = h.dataset.filesystem, []
        monkeypatch.setattr(fs, "put_file", _failing_after(fs.put_file, 2, OSError("connection reset"), calls))
        with pytest.raises(ExecutionError, match="uploading"):
            h.sink("liquid", out, overwrite=True)
    assert {k: s3.client().get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in s3.keys(BUCKET, prefix)} == before
    assert not [k for k in s3.keys(BUCKET, "out/") if ".tmp-" in k]
    with Harness(out, storage_options=s3.options(skip_instance_cache=True)) as back:
        assert back.relation().pl().height == first.rows


def test_sink_to_a_missing_bucket_is_an_input_error_naming_the_url(s3: S3, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "duckharness-sink-*")))
    with with_experiments(Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options())) as h, \
            pytest.raises(InputError, match=r"Cannot write s3://no-such-bucket-x/out: bucket 'no-such-bucket-x' "
                                            r"does not exist.*Create it"):
        h.sink("tight", "s3://no-such-bucket-x/out")
    assert _no_new_local_staging(before)
    options = tmp_path / "options.json"
    options.write_text(json.dumps(s3.options()))
    assert main(["sink", f"s3://{BUCKET}/run1/", "--storage-options", f"@{options}", "-o", "s3://no-such-bucket-x/o",
                 "--experiment", "baseline", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: Cannot write s3://no-such-bucket-x/o: bucket") and err.count("\n") == 1


def test_ctrl_c_inside_an_s3_read_is_reported_as_an_interruption(
        s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A KeyboardInterrupt raised inside fsspec while DuckDB reads through it reaches us as a DuckDB
    error whose text is a Python traceback: it is an interruption, not 'Error: Traceback ...'."""
    import s3fs

    real_open = s3fs.S3FileSystem.open

    def interrupted_open(self: object, path: str, *a: object, **kw: object) -> object:
        if str(path).endswith(".parquet"):
            raise KeyboardInterrupt
        return real_open(self, path, *a, **kw)

    options = tmp_path / "options.json"
    options.write_text(json.dumps(s3.options(skip_instance_cache=True)))
    monkeypatch.setattr(s3fs.S3FileSystem, "open", interrupted_open)
    out = tmp_path / "out"
    code = main(["sink", f"s3://{BUCKET}/run1/", "--storage-options", f"@{options}", "--experiment", "baseline",
                 "-o", str(out), "-q"])
    assert (code, capsys.readouterr().err) == (130, "Interrupted.\n")
    assert sorted(os.listdir(tmp_path)) == ["options.json"]


# --- export -----------------------------------------------------------------------------------------

def test_export_of_a_remote_source_names_urls_and_never_credentials(s3: S3, tmp_path: Path) -> None:
    key, secret = "AKIDEXPORTKEY0001", "s3cr3t/EXPORT+value"
    with with_experiments(Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options(key, secret))) as h:
        result = h.export(tmp_path / "chain.sql")
        urls = h.files
    text = Path(result.sql_path).read_text()
    for u in urls:
        assert u in text
    assert key not in text and secret not in text and s3.url not in text
    assert "needs credentials, which are not written here" in text
    assert "CREATE SECRET" in text
    assert list(result.skipped) == ["z"] and "Python step" in result.skipped["z"]
    assert set(result.views) >= {"baseline", "liquid", "tight"}


def test_export_database_of_a_remote_source_never_downloads_extensions(
        s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The package never fetches extensions at run time (execution/connection.py). The export's own
    connection is guarded here so the test cannot reach the internet: it records how the export
    configured its connection, and forbids downloads regardless."""
    import duckdb

    import duckharness.outputs.export as export_mod

    configs: list[dict] = []

    class GuardedDuckDB:
        """duckdb as outputs/export.py sees it: connect() records its config and never downloads."""

        def __getattr__(self, name: str) -> object:
            return getattr(duckdb, name)

        @staticmethod
        def connect(database: str = ":memory:", *a: object, config: dict | None = None, **kw: object) -> object:
            configs.append(dict(config or {}))
            return duckdb.connect(database, *a, config={**(config or {}), "autoinstall_known_extensions": False},
                                  **kw)

    import duckharness.execution.connection as connection_mod

    monkeypatch.setattr(export_mod, "duckdb", GuardedDuckDB())
    monkeypatch.setattr(connection_mod, "duckdb", GuardedDuckDB())  # every connection comes from here
    secret = "s3cr3t/EXPORT+db"
    with Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options("AKIDEXPORTKEY0002", secret)) as h:
        urls = h.files
        error: Exception | None = None
        try:
            result = h.export(None, tmp_path / "chain.duckdb")
        except duckdb.Error as e:
            error = e
        finally:
            monkeypatch.undo()
    assert configs and all(c.get("autoinstall_known_extensions") is False for c in configs), (
        f"export opened DuckDB with config {configs}: it may download extensions (here it failed with: "
        f"{str(error).splitlines()[0] if error else 'no error'})")
    assert error is None
    raw = Path(result.db_path).read_bytes()
    assert secret.encode() not in raw
    assert all(u.encode() in raw for u in urls)


# --- errors -----------------------------------------------------------------------------------------

def test_missing_bucket_is_a_source_error_naming_the_url(s3: S3) -> None:
    url = "s3://no-such-bucket-dh/run1/"
    with pytest.raises(SourceError) as info:
        Harness(url, storage_options=s3.options())
    assert url in str(info.value) and info.value.path == url
    assert "bucket" in str(info.value).lower()


@pytest.mark.parametrize("url", [f"s3://{BUCKET}/no/such/prefix/", f"s3://{BUCKET}/no/such/prefix/*.parquet",
                                 f"s3://{BUCKET}/run1/nope.parquet"])
def test_missing_prefix_or_file_is_a_source_error_naming_the_url(s3: S3, url: str) -> None:
    with pytest.raises(SourceError) as info:
        Harness(url, storage_options=s3.options())
    assert url in str(info.value) and info.value.path == url


def test_missing_file_in_a_url_list_is_named(s3: S3, data: dict) -> None:
    missing = f"s3://{BUCKET}/run1/2026-01-01.parquet"
    with pytest.raises(SourceError) as info:
        Harness([data["urls"][0], missing], storage_options=s3.options())
    assert "2026-01-01.parquet" in str(info.value)


def test_list_mixing_urls_and_local_paths_names_the_local_path(s3: S3, data: dict) -> None:
    local = str(sorted(data["run"].glob("*.parquet"))[1])
    with pytest.raises(SourceError) as info:
        Harness([data["urls"][0], local], storage_options=s3.options())
    assert local in str(info.value)


def test_missing_metadata_json_in_the_bucket_is_a_metadata_error(s3: S3) -> None:
    with pytest.raises(MetadataError, match="not found") as info:
        Harness(f"s3://{BUCKET}/nometa/", storage_options=s3.options())
    assert info.value.path == f"s3://{BUCKET}/nometa/metadata.json"
    assert info.value.path in str(info.value)
    # metadata={} makes the same data usable.
    with Harness(f"s3://{BUCKET}/nometa/", storage_options=s3.options(), metadata={}) as h:
        assert len(h.files) == 2


def test_unreachable_endpoint_fails_fast_with_a_source_error(s3: S3) -> None:
    import socket

    with socket.socket() as sock:  # a port on 127.0.0.1 that nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}",
                                                         "region_name": "us-east-1"},
            "config_kwargs": {"connect_timeout": 2, "retries": {"max_attempts": 1}}}
    t = time.perf_counter()
    with pytest.raises(SourceError) as info:
        Harness(f"s3://{BUCKET}/run1/", storage_options=opts)
    assert time.perf_counter() - t < 20
    assert f"s3://{BUCKET}/run1/" in str(info.value)
    assert "connect" in str(info.value).lower()


def test_a_stalled_endpoint_times_out_with_a_source_error(s3: S3) -> None:
    """A server that accepts connections and never answers (moto stopped with SIGSTOP, say)
    used to hang a run for over 10 minutes; reads now time out (here after 1 s, by the user's
    option) and s3fs's retries do not stack into minutes."""
    import socket
    import threading

    held: list[socket.socket] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]

        def accept() -> None:
            with contextlib.suppress(OSError):
                while True:
                    held.append(server.accept()[0])  # never answered

        threading.Thread(target=accept, daemon=True).start()
        opts = {"key": "k", "secret": "s", "config_kwargs": {"read_timeout": 1},
                "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
        t = time.perf_counter()
        with pytest.raises(SourceError, match=f"Cannot list s3://{BUCKET}/run1/: ReadTimeoutError"):
            Harness(f"s3://{BUCKET}/run1/", storage_options=opts)
        assert time.perf_counter() - t < 30
    for c in held:
        c.close()


def test_s3_reads_get_timeouts_unless_the_user_sets_their_own(s3: S3) -> None:
    remote_run = f"s3://{BUCKET}/run1/"
    with Harness(remote_run, storage_options=s3.options(), cache=False) as h:
        fs = h.dataset.filesystem
        assert fs.config_kwargs["read_timeout"] == 10 and fs.config_kwargs["connect_timeout"] == 10
        assert fs.retries == 2  # (botocore retries: the fixture sets its own)
    own = s3.options(config_kwargs={"read_timeout": 300})
    with Harness(remote_run, storage_options=own, cache=False) as h:
        assert h.dataset.filesystem.config_kwargs["read_timeout"] == 300
        assert h.dataset.filesystem.config_kwargs["connect_timeout"] == 10


def test_wrong_credentials_give_a_clear_error(s3: S3) -> None:
    """With moto's IAM authentication on, only a real IAM key pair can read the bucket."""
    key, secret = s3.iam_keys(f"dh-user-{uuid.uuid4().hex[:6]}")
    url = f"s3://{BUCKET}/run1/"
    s3.set_auth(True)
    try:
        # The right keys work (so the failures below are about the credentials).
        with Harness(url, storage_options=s3.options(key, secret, skip_instance_cache=True)) as h:
            assert len(h.files) == 4
        failures = {}
        for label, (k, s) in {"unknown key id": ("AKIAUNKNOWNKEY000000", "whatever-secret"),
                              "wrong secret": (key, "not-the-secret-123")}.items():
            t = time.perf_counter()
            with pytest.raises(SourceError) as info:
                Harness(url, storage_options=s3.options(k, s, skip_instance_cache=True,
                                                        config_kwargs={"retries": {"max_attempts": 1}}))
            assert time.perf_counter() - t < 20
            text = str(info.value)
            assert url in text and info.value.path == url
            assert s not in text  # the secret is never echoed
            failures[label] = text
    finally:
        s3.set_auth(False)
    for label, text in failures.items():
        assert "Check the credentials in storage_options" in text, (label, text)


def test_a_new_harness_sees_files_added_to_the_bucket_since_the_last_listing(s3: S3, data: dict) -> None:
    """Listing happens once per Harness; a new Harness must list again (s3fs caches listings
    in its cached filesystem instances)."""
    files = sorted(data["run"].glob("*.parquet"))
    for p in files[:2]:
        s3.put(BUCKET, f"growing/{p.name}", p.read_bytes())
    s3.put(BUCKET, "growing/metadata.json", b"{}")
    with Harness(f"s3://{BUCKET}/growing/", storage_options=s3.options()) as h:
        assert len(h.files) == 2
    s3.put(BUCKET, f"growing/{files[2].name}", files[2].read_bytes())
    assert len([k for k in s3.keys(BUCKET, "growing/") if k.endswith(".parquet")]) == 3
    with Harness(f"s3://{BUCKET}/growing/", storage_options=s3.options()) as h:
        assert len(h.files) == 3


# --- the command line -------------------------------------------------------------------------------

def test_cli_reads_storage_options_from_a_file(s3: S3, data: dict, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    opts = tmp_path / "s3.json"
    opts.write_text(json.dumps(s3.options()))
    args = ["--metric", "count", "--metric", "r2", "--by", "day", "--format", "csv", "-q"]
    url = f"s3://{BUCKET}/run1/"
    assert main(["metrics", url, "--storage-options", f"@{opts}", *args]) == 0
    remote = capsys.readouterr().out
    assert main(["metrics", url, "--storage-options", json.dumps(s3.options()), *args]) == 0
    inline = capsys.readouterr().out
    assert main(["metrics", str(data["run"]), *args]) == 0
    local = capsys.readouterr().out
    assert remote == inline == local and remote.count("\n") > 8
    assert main(["info", f"s3://{BUCKET}/run1/", "--storage-options", "{not json"]) == 1
    assert "--storage-options must be JSON" in capsys.readouterr().err


# --- memory:// --------------------------------------------------------------------------------------

def test_memory_filesystem_source_equals_the_local_run(data: dict) -> None:
    mem = fsspec.filesystem("memory")
    root = f"/dh-mem-{uuid.uuid4().hex[:6]}"
    try:
        for p in sorted(data["run"].iterdir()):
            with mem.open(f"{root}/{p.name}", "wb") as f:
                f.write(p.read_bytes())
        with with_experiments(Harness(f"memory://{root}/")) as h, with_experiments(Harness(data["run"])) as local:
            assert [Path(f).name for f in h.files] == [Path(f).name for f in local.files]
            assert all(f.startswith("memory://") for f in h.files)
            assert h.metadata.session_window is not None
            assert_identical(h.metrics(METRICS, by="day"), local.metrics(METRICS, by="day"))
            assert h.sample(n_days=1, seed=0).equals(local.sample(n_days=1, seed=0))
    finally:
        mem.rm(root, recursive=True)


def test_overwrite_keeps_a_remote_sink_that_holds_a_users_own_objects(s3: S3) -> None:
    out, prefix = f"s3://{BUCKET}/out/mine", "out/mine/"
    with with_experiments(Harness(f"s3://{BUCKET}/run1/", storage_options=s3.options())) as h:
        h.sink("tight", out)
        s3.client().put_object(Bucket=BUCKET, Key=f"{prefix}notes/readme.txt", Body=b"mine")
        s3.client().put_object(Bucket=BUCKET, Key=f"{prefix}extra.parquet", Body=b"mine too")
        before = s3.keys(BUCKET, prefix)
        with pytest.raises(InputError, match=r"earlier sink, but it also holds objects a sink does not write "
                                             r"\(extra\.parquet, notes/readme\.txt\)"):
            h.sink("liquid", out, overwrite=True)
    assert s3.keys(BUCKET, prefix) == before
