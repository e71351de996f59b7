"""Executors: threads, spawned processes, a real local Ray cluster and a real Dask cluster give the
same bits; failing batches are retried and then named; input errors are not retried.

The Ray cluster and the Dask cluster are started once per test run (lazily: only tests that need
them start them) and shut down at the end.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from _s3 import S3, serve_s3, time_limit
from conftest import SESSION, write_dataset

from duckharness import Harness
from duckharness.cli import main
from duckharness.demo import one_day, trading_days
from duckharness.engine.run import ChainTask
from duckharness.errors import (
    DuckHarnessWarning,
    ExecutionError,
    InputError,
    TransformError,
    UnpicklableStepError,
)
from duckharness.execution.executor import (
    EXECUTORS,
    DaskExecutor,
    Executor,
    ProcessExecutor,
    RayExecutor,
    ThreadExecutor,
    make_executor,
)

DAYS = trading_days(dt.date(2026, 3, 4), 6)
METRICS = ["count", "r2", "mse", "mae", "corr", "hit_rate"]
BUCKET = "dh-exec"


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    """The moto S3 server on 127.0.0.1, shared with the other modules that use it."""
    yield from serve_s3()


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    """Every test fails after 60 s instead of hanging the run."""
    with time_limit(60):
        yield


# --- steps shipped to workers (module level, so they pickle) -----------------------------------------

def add_z(lf: pl.LazyFrame) -> pl.LazyFrame:
    return lf.with_columns((pl.col("pred_10s") / pl.col("pred_10s").std()).alias("pred_z"))


def tag_pid(lf: pl.LazyFrame) -> pl.LazyFrame:
    return lf.with_columns(pl.lit(os.getpid(), dtype=pl.Int64).alias("worker_pid"))


def fail_on_third_day(lf: pl.LazyFrame) -> pl.LazyFrame:
    df = lf.collect()
    if df.height and df["ts"].dt.convert_time_zone("US/Eastern").dt.date().min() == DAYS[2]:
        raise ValueError(f"bad day in pid {os.getpid()}")
    return df.lazy()


def with_experiments(h: Harness) -> Harness:
    h.add_experiment("liquid", "volume > 1000")                                # fused into one scan
    h.add_experiment("z", add_z)                                               # Python, per batch
    h.add_experiment("zpos", "SELECT * FROM z WHERE pred_z > 0")               # SQL over Python
    h.add_experiment("renamed", "SELECT * RENAME (spread AS spr) FROM liquid")  # SQL, not inlinable
    return h


# --- clusters ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A real local Ray cluster (2 CPUs, no dashboard, no usage reports), shut down at the end.

    Ray workers do not inherit the driver's sys.path (spawned processes and Dask workers do), so
    this folder is put on their PYTHONPATH: the Python steps above are pickled by reference to
    this module, as a user's steps would be to theirs (which must be importable on the cluster).
    """
    import ray

    env = pytest.MonkeyPatch()
    env.setenv("RAY_USAGE_STATS_ENABLED", "0")
    assert not ray.is_initialized()
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    with time_limit(120, "starting Ray"):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield ray
    finally:
        ray.shutdown()
        env.undo()


@pytest.fixture(scope="session")
def dask_client() -> Iterator[Any]:
    """A real Dask LocalCluster (2 worker processes, 1 thread each) and its Client."""
    from distributed import Client, LocalCluster

    with time_limit(120, "starting Dask"):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)
        client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture(scope="module")
def process_executor() -> Iterator[ProcessExecutor]:
    ex = ProcessExecutor(2)
    try:
        yield ex
    finally:
        ex.close()


def executor_for(kind: str, request: pytest.FixtureRequest) -> Executor | str:
    """An executor of ``kind`` on the session's clusters (started on first use)."""
    if kind == "threads":
        return ThreadExecutor(2)
    if kind == "processes":
        return request.getfixturevalue("process_executor")
    if kind == "ray":
        request.getfixturevalue("ray_cluster")
        return RayExecutor(2)
    if kind == "ray_by_name":  # the package finds Ray initialised and uses that cluster
        request.getfixturevalue("ray_cluster")
        return "ray"
    if kind == "dask":
        return DaskExecutor(2, client=request.getfixturevalue("dask_client"))
    raise AssertionError(kind)


def count_attempts(ex: Executor, monkeypatch: pytest.MonkeyPatch, path: str) -> list[int]:
    """Wrap ``ex._round`` to count the rounds in which a task reading ``path`` was run."""
    attempts: list[int] = []
    real = ex._round

    def touches(task: Any) -> bool:
        return path in task if isinstance(task, str) else any(f.path == path for f in task.files)

    def counted(fn: Callable[..., Any], tasks: list[Any], home: Any = None,
                on_done: Any = None) -> list[tuple[bool, Any]]:
        attempts.append(sum(touches(t) for t in tasks))
        return real(fn, tasks, home, on_done)

    monkeypatch.setattr(ex, "_round", counted)
    return attempts


# --- data --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("executors")
    rng = np.random.default_rng(11)
    write_dataset(out, {d.isoformat(): one_day(d, 1500, rng, symbols=8) for d in DAYS}, SESSION, row_group_size=500)
    return out


@pytest.fixture(scope="module")
def reference(folder: Path) -> dict[str | None, pl.DataFrame]:
    with with_experiments(Harness(folder, workers=2)) as h:
        out = {by: h.metrics(METRICS, by=by, executor="threads") for by in (None, "day")}
    assert set(out[None]["experiment"]) == {"baseline", "liquid", "z", "zpos", "renamed"}
    return out


def assert_identical(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert a.height > 0
    assert a.drop("value").equals(b.drop("value"))
    assert a["value"].to_list() == b["value"].to_list()  # ==, not approx


@pytest.fixture
def copy(folder: Path, tmp_path: Path) -> Path:
    """A private copy of the data, for tests that damage a file."""
    return Path(shutil.copytree(folder, tmp_path / "data"))


def garbage(path: str) -> None:
    """Replace a file with garbage bytes of the same size (same name, listing already done)."""
    size = os.path.getsize(path)
    Path(path).write_bytes(np.random.default_rng(0).bytes(size))


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(autouse=True)
def damage_during_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests damage files between the listing and the reads of a run (as a writer racing
    the run would): the listing a run starts with must not see the damage first."""
    monkeypatch.setattr(Harness, "_refresh", lambda self: None)


def scramble_pages(path: str) -> None:
    """Overwrite every column chunk with random bytes but keep the footer: listing still works,
    reading the data fails."""
    md = pq.ParquetFile(path).metadata
    data = bytearray(Path(path).read_bytes())
    rng = np.random.default_rng(1)
    for rg in range(md.num_row_groups):
        for c in range(md.row_group(rg).num_columns):
            col = md.row_group(rg).column(c)
            start = col.dictionary_page_offset or col.data_page_offset
            data[start:start + col.total_compressed_size] = rng.bytes(col.total_compressed_size)
    Path(path).write_bytes(bytes(data))


# --- the same bits on every executor -----------------------------------------------------------------

def count_rounds(ex: Executor | str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Tasks per round run by ``ex`` (so a test cannot pass without the executor doing the work)."""
    rounds: list[int] = []
    if isinstance(ex, Executor):
        real = ex._round

        def counted(fn: Callable[..., Any], tasks: list[Any], home: Any = None,
                    on_done: Any = None) -> list[tuple[bool, Any]]:
            rounds.append(len(tasks))
            return real(fn, tasks, home, on_done)

        monkeypatch.setattr(ex, "_round", counted)
    return rounds


@pytest.mark.parametrize("kind", ["processes", "ray", "ray_by_name", "dask"])
def test_executor_gives_values_identical_to_threads(
        folder: Path, reference: dict, kind: str, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ex = executor_for(kind, request)
    rounds = count_rounds(ex, monkeypatch)
    groupings = (None, "day") if kind == "processes" else ("day",)  # keeps the cluster tests short
    with with_experiments(Harness(folder, workers=2)) as h:
        for by in groupings:
            assert_identical(h.metrics(METRICS, by=by, executor=ex), reference[by])
        if kind == "ray_by_name":
            made = next(iter(h._executors.values()))
            assert isinstance(made, RayExecutor) and made._remote is not None  # it ran tasks
    if isinstance(ex, Executor):
        # Per run: 6 batches of the fused scan, 5 chain batches for each of z, zpos and renamed.
        assert sum(rounds) == len(groupings) * (6 + 3 * 5), rounds
    if kind.startswith("ray"):
        assert request.getfixturevalue("ray_cluster").is_initialized()  # the shared cluster was kept


@pytest.mark.parametrize("kind", ["threads", "processes", "ray", "dask"])
def test_python_steps_run_on_the_executors_workers(
        folder: Path, reference: dict, kind: str, request: pytest.FixtureRequest) -> None:
    ex = executor_for(kind, request)
    with Harness(folder, workers=2) as h:
        h.add_experiment("tagged", tag_pid)
        got = h.metrics(["count"], pairs=["pred_10s:target_10s"], experiments=["tagged"], by="worker_pid",
                        executor=ex).filter(metric="count")
    pids = set(got["worker_pid"].to_list())
    expected = reference[None].filter(experiment="baseline", pred="pred_10s", metric="count")["value"].item()
    assert got["value"].sum() == expected
    if kind == "threads":
        assert pids == {os.getpid()}
    else:  # the first batch runs on the driver (to learn the columns); the others on the workers
        assert pids - {os.getpid()}, pids


def test_remote_source_on_the_dask_executor_gives_the_local_values(
        s3: S3, folder: Path, reference: dict, request: pytest.FixtureRequest) -> None:
    s3.bucket(BUCKET)
    s3.upload(folder, BUCKET, "run")
    ex = executor_for("dask", request)
    names = ["baseline", "liquid", "z"]
    with with_experiments(Harness(f"s3://{BUCKET}/run/", storage_options=s3.options(), workers=2)) as h:
        assert h.dataset.remote and len(h.files) == len(DAYS)
        got = h.metrics(METRICS, by="day", experiments=names, executor=ex)
    assert_identical(got, reference["day"].filter(pl.col("experiment").is_in(names)))


# --- each finished batch is reported as it finishes ---------------------------------------------------
# (what moves the progress bar: a user's bar stood at 0/8 for a whole run, then jumped to 8/8)

def test_on_done_fires_for_a_finished_batch_while_another_batch_still_runs() -> None:
    release = threading.Event()
    held_when_reported: list[bool] = []

    def task(con: Any, name: str) -> str:
        if name == "held":  # runs until the other batch has been reported (or gives up)
            return "released" if release.wait(timeout=20) else "never released"
        return name

    def on_done() -> None:
        held_when_reported.append(not release.is_set())
        release.set()

    out = ThreadExecutor(2).map(task, ["held", "quick"], on_done=on_done)
    assert out == ["released", "quick"]  # in task order, though "quick" finished first
    assert held_when_reported == [True, False]  # "quick" was reported while "held" still ran


def test_one_worker_off_the_main_thread_reports_each_batch_before_the_next_starts() -> None:
    """A worker thread with one worker runs its batches in turn, on its own thread."""
    reported: list[int] = []
    seen: dict[int, int] = {}

    def task(con: Any, i: int) -> int:
        seen[i] = len(reported)  # batches reported when this one started
        return i

    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.extend(
        ThreadExecutor(1).map(task, [0, 1, 2], on_done=lambda: reported.append(1))))
    worker.start()
    worker.join(timeout=30)
    assert out == [0, 1, 2] and seen == {0: 0, 1: 1, 2: 2} and len(reported) == 3


def test_a_retried_batch_is_reported_once_when_it_succeeds() -> None:
    failed: set[int] = set()
    reported: list[int] = []

    def flaky(con: Any, i: int) -> int:
        if i == 1 and i not in failed:
            failed.add(i)
            raise OSError("transient")
        return i * 10

    def on_done() -> None:
        reported.append(1)

    assert ThreadExecutor(2, retries=1).map(flaky, [0, 1, 2], on_done=on_done) == [0, 10, 20]
    assert failed == {1} and len(reported) == 3  # 0 and 2 in the first round, 1 in its retry only


def wait_for_gate(con: Any, task: tuple[str, str]) -> str:
    """``held`` runs until the file ``gate`` exists (made by the map's on_done) or 20 s pass;
    any other task returns at once. (Workers in other processes share no Event with the test.)"""
    import time

    name, gate = task
    if name != "held":
        return name
    deadline = time.monotonic() + 20
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            return "never released"
        time.sleep(0.01)
    return "released"


@pytest.mark.parametrize("kind", ["processes", "ray", "dask"])
def test_cluster_executors_report_a_finished_batch_while_another_batch_still_runs(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    ex = executor_for(kind, request)
    assert isinstance(ex, Executor)
    gate = tmp_path / "gate"
    held_when_reported: list[bool] = []

    def on_done() -> None:
        held_when_reported.append(not gate.exists())
        gate.touch()

    out = ex.map(wait_for_gate, [("held", str(gate)), ("quick", str(gate))], on_done=on_done)
    assert out == ["released", "quick"]
    assert held_when_reported == [True, False]


# --- retries -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "experiments", "damage"), [
    ("threads", ["baseline", "liquid"], garbage),
    ("threads", ["z", "zpos"], truncate),
    ("dask", ["baseline", "liquid"], truncate),
    ("dask", ["z", "zpos"], garbage),
    ("ray", ["baseline", "renamed"], garbage),
], ids=["threads-fused", "threads-chain", "dask-fused", "dask-chain", "ray-chain"])
def test_file_damaged_after_listing_is_retried_then_named(
        copy: Path, kind: str, experiments: list[str], damage: Callable[[str], None],
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = executor_for(kind, request)
    assert isinstance(ex, Executor) and ex.retries == 2
    with with_experiments(Harness(copy, workers=2)) as h:
        bad = h.files[2]  # not the first batch, which the driver reads itself
        damage(bad)
        attempts = count_attempts(ex, monkeypatch, bad)
        with pytest.raises(ExecutionError) as info:
            h.metrics(["count", "r2"], experiments=experiments, executor=ex)
    assert info.value.files == [bad]
    assert bad in str(info.value)
    assert sum(attempts) == 3, attempts  # the first try and two retries
    assert f"after 3 attempt(s) on {ex.name}" in str(info.value)


@pytest.mark.parametrize("kind", ["threads", "dask"])
def test_retries_0_fails_at_the_first_error(
        copy: Path, kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = executor_for(kind, request)
    ex.retries = 0
    with Harness(copy, workers=2) as h:
        bad = h.files[3]
        garbage(bad)
        attempts = count_attempts(ex, monkeypatch, bad)
        with pytest.raises(ExecutionError, match=r"after 1 attempt\(s\)") as info:
            h.metrics(["count"], executor=ex)
    assert info.value.files == [bad]
    assert attempts == [1]


def test_thread_workers_run_on_cursors_of_the_home_database_and_retry_on_fresh_connections(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from duckharness.execution.connection import ConnectionConfig

    config = ConnectionConfig(threads=1)
    home = config.open()
    home.execute("CREATE TABLE marker AS SELECT 7 AS x").fetchall()  # only its database has it
    opened: list[int] = []
    real_open = ConnectionConfig.open
    monkeypatch.setattr(ConnectionConfig, "open", lambda self: opened.append(1) or real_open(self))
    failed: set[int] = set()

    def task(con: Any, i: int) -> tuple[int, bool, str]:
        has_marker = bool(con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'marker'").fetchone()[0])
        if i == 5 and i not in failed:  # the last task, so no other runs after it on its thread
            failed.add(i)
            raise RuntimeError("transient")
        zone = con.execute("SELECT current_setting('TimeZone')").fetchone()[0]
        threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
        assert threads == 1
        return i * i, has_marker, zone

    ex = ThreadExecutor(2).with_config(config)
    out = ex.map(task, list(range(6)), home=home)
    assert [v for v, _, _ in out] == [i * i for i in range(6)]
    assert all(zone == "UTC" for _, _, zone in out)  # cursors get the config's session settings
    # The first round ran on the home database's cursors (no connection opened); the retried
    # task ran on a fresh connection, which does not see the home database's table.
    assert [m for _, m, _ in out[:5]] == [True] * 5
    assert out[5][1] is False and opened == [1]
    home.close()


def test_metrics_on_home_cursors_equal_metrics_on_fresh_connections(
        folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from duckharness.execution.connection import ConnectionConfig

    opened: list[int] = []
    real_open = ConnectionConfig.open
    monkeypatch.setattr(ConnectionConfig, "open", lambda self: opened.append(1) or real_open(self))
    with with_experiments(Harness(folder, workers=2, cache=False)) as h:
        del opened[:]
        shared = h.metrics(METRICS, experiments=["baseline", "liquid"])
        assert opened == []  # the fused scan ran on cursors of the harness's database
        real_map = ThreadExecutor.map
        monkeypatch.setattr(ThreadExecutor, "map", lambda self, *a, home=None, **k: real_map(self, *a, **k))
        fresh = h.metrics(METRICS, experiments=["baseline", "liquid"])
        assert len(opened) == 2  # one connection per worker
    assert shared.filter(pl.col("metric") == "r2").height == 2 * 3 and shared.equals(fresh)  # bit for bit


def test_harness_retries_argument_reaches_its_executor(copy: Path) -> None:
    with Harness(copy, workers=2, retries=0) as none, Harness(copy, workers=2, retries=4) as four:
        bad = none.files[1]
        garbage(bad)
        with pytest.raises(ExecutionError, match=r"after 1 attempt\(s\) on threads") as info:
            none.metrics(["count"])
        assert info.value.files == [bad]
        with pytest.raises(ExecutionError, match=r"after 5 attempt\(s\) on threads"):
            four.metrics(["count"])


@pytest.mark.parametrize("kind", ["threads", "processes", "ray", "dask"])
def test_transform_error_on_a_worker_is_not_retried(
        folder: Path, kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = executor_for(kind, request)
    assert isinstance(ex, Executor)
    with Harness(folder, workers=2) as h:
        h.add_experiment("boom", fail_on_third_day)
        third = h.files[2]
        attempts = count_attempts(ex, monkeypatch, third)
        with pytest.raises(TransformError) as info:
            h.metrics(["count"], experiments=["boom"], executor=ex)
    assert attempts == [1]  # input errors fail at once: they would fail again
    assert info.value.experiment == "boom"
    assert "fail_on_third_day" in str(info.value) and "bad day in pid" in str(info.value)
    pid = int(str(info.value).rsplit("pid ", 1)[1].split()[0].rstrip(".:"))
    assert (pid == os.getpid()) == (kind == "threads")  # it really ran on a worker


class FakeRef:
    """An object reference of FakeRay: the task's value, computed when the task was submitted."""

    def __init__(self, value: Any) -> None:
        self.value = value


class FakeRay:
    """Just enough of Ray's API to watch an executor's cluster lifecycle without starting one."""

    def __init__(self, initialized: bool) -> None:
        self.initialized, self.inits, self.shutdowns = initialized, 0, 0

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, *a: object, **kw: object) -> None:
        self.initialized, self.inits = True, self.inits + 1

    def shutdown(self) -> None:
        self.initialized, self.shutdowns = False, self.shutdowns + 1

    def remote(self, **kw: object) -> Callable[[Callable[..., Any]], Any]:
        class Task:
            def __init__(self, fn: Callable[..., Any]) -> None:
                self.remote = lambda *a: FakeRef(fn(*a))  # runs at once, here
        return Task

    def wait(self, refs: list[FakeRef], num_returns: int = 1) -> tuple[list[FakeRef], list[FakeRef]]:
        return refs[:num_returns], refs[num_returns:]  # all are ready

    def get(self, ref: FakeRef) -> Any:
        return ref.value


@pytest.mark.parametrize("running", [False, True], ids=["started_by_the_executor", "already_running"])
def test_ray_executor_close_shuts_down_only_a_cluster_it_started(
        folder: Path, running: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Executor.close: 'Release what the executor started (pools, clusters it created)'."""
    import sys

    fake = FakeRay(initialized=running)
    monkeypatch.setitem(sys.modules, "ray", fake)
    with Harness(folder, workers=2, executor="ray") as h:
        got = h.metrics(METRICS, experiments=["baseline"])
        assert_identical(got, h.metrics(METRICS, experiments=["baseline"], executor="threads"))
    assert fake.inits == (0 if running else 1)
    assert fake.initialized is running  # a cluster it started is shut down; one it found is kept
    assert fake.shutdowns == (0 if running else 1)


# --- choosing an executor ------------------------------------------------------------------------------

def test_make_executor_names_and_instances() -> None:
    assert EXECUTORS == ("threads", "processes", "ray", "dask")
    kinds = {"threads": ThreadExecutor, "processes": ProcessExecutor, "ray": RayExecutor, "dask": DaskExecutor}
    for name, cls in kinds.items():
        ex = make_executor(name, 3, retries=5)
        assert type(ex) is cls and ex.name == name and ex.workers == 3 and ex.retries == 5
        ex.close()
    assert type(make_executor(None)) is ThreadExecutor
    assert make_executor("dask", address="tcp://127.0.0.1:1").address == "tcp://127.0.0.1:1"
    mine = ThreadExecutor(1)
    assert make_executor(mine) is mine
    with pytest.raises(InputError, match=r"Unknown executor 'nope'\. Choose one of: threads, processes, ray, dask"):
        make_executor("nope")
    with pytest.raises(InputError, match="workers must be at least 1"):
        ThreadExecutor(-1)
    with pytest.raises(InputError, match="retries must be 0 or more"):
        make_executor("threads", retries=-1)


def test_unknown_executor_is_refused_by_the_harness(folder: Path) -> None:
    with pytest.raises(InputError, match="Unknown executor 'nope'"):
        Harness(folder, executor="nope")
    with Harness(folder) as h, pytest.raises(InputError, match="Unknown executor 'nope'"):
        h.metrics(["count"], executor="nope")


def test_cli_executor_choices(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["metrics", str(folder), "--executor", "nope"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and all(k in err for k in EXECUTORS)


@pytest.mark.parametrize("kind", ["dask", "ray"])
def test_cli_runs_on_an_existing_cluster(folder: Path, kind: str, request: pytest.FixtureRequest,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    args = ["metrics", str(folder), "--metric", "count", "--metric", "r2", "--by", "day", "--format", "csv", "-q",
            "--workers", "2"]
    assert main(args) == 0
    threads = capsys.readouterr().out
    if kind == "dask":
        address = request.getfixturevalue("dask_client").scheduler.address
        assert main([*args, "--executor", "dask", "--address", address]) == 0
    else:
        request.getfixturevalue("ray_cluster")
        assert main([*args, "--executor", "ray"]) == 0
    assert capsys.readouterr().out == threads and threads.count("\n") > 10


def test_cli_retries(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = sorted(str(p) for p in copy.glob("*.parquet"))[2]
    scramble_pages(bad)  # the footer is intact, so listing works and reading the data fails
    base = ["metrics", str(copy), "--metric", "count", "-q", "--workers", "2"]
    assert main([*base, "--retries", "0"]) == 1
    err = capsys.readouterr().err
    assert "failed after 1 attempt(s) on threads" in err and bad in err
    assert main([*base, "--retries", "1"]) == 1
    assert "failed after 2 attempt(s)" in capsys.readouterr().err
    assert main(base) == 1
    assert "failed after 3 attempt(s)" in capsys.readouterr().err  # the default is 2 retries
    with pytest.raises(SystemExit) as info:  # a usage error, like the other malformed option values
        main([*base, "--retries", "-1"])
    assert info.value.code == 2 and "--retries: must be 0 or more, got -1" in capsys.readouterr().err


def test_chain_tasks_pickle_with_their_python_steps(folder: Path) -> None:
    """What a worker receives: the dataset, experiments (with the function) and the batch."""
    import cloudpickle

    with with_experiments(Harness(folder)) as h:
        task = ChainTask(h.dataset, h.experiments, "zpos", h.dataset.files[:1], h.session_window, 1, "SELECT 1")
        back = cloudpickle.loads(cloudpickle.dumps(task))
    assert back.experiments.step("z").fn is add_z
    assert [f.path for f in back.files] == [h.dataset.files[0].path]



@pytest.mark.parametrize(
    ("error", "calls"),
    [
        (duckdb.ConversionException("Conversion Error: Could not convert string 'x' to INT32"), 1),
        (duckdb.BinderException("Binder Error: column not found"), 1),
        (duckdb.IOException("IO Error: could not read file"), 3),
        (duckdb.InvalidInputException("Invalid Input Error: No magic bytes found"), 3),
    ],
    ids=["conversion", "binder", "io", "bad_file"],
)
def test_only_errors_that_may_pass_on_a_second_try_are_retried(error: Exception, calls: int) -> None:
    seen: list[int] = []

    def fail(con: object, task: int) -> None:
        seen.append(task)
        raise error

    with pytest.raises(ExecutionError, match=rf"after {calls} attempt\(s\) on threads"):
        ThreadExecutor(workers=1, retries=2).map(fail, [7], describe=lambda t: ["day.parquet"])
    assert len(seen) == calls


def test_a_python_traceback_inside_a_duckdb_error_is_reported_by_its_cause() -> None:
    """A remote read failing inside a scan: DuckDB's message starts with the traceback's header
    line, which told the user nothing (seen with moto's server killed mid-run)."""
    from duckharness.execution.executor import brief

    text = ('Traceback (most recent call last):\n  File "/x/aiobotocore/httpsession.py", line 364, in send\n'
            'EndpointConnectionError: Could not connect to the endpoint URL: "http://127.0.0.1:5055/bkt/a.parquet"\n\n'
            "LINE 1: ... FROM READ_PARQUET(['s3://bkt/a.parquet'])\n              ^^^^")
    assert brief(OSError(text)) == (
        'EndpointConnectionError: Could not connect to the endpoint URL: "http://127.0.0.1:5055/bkt/a.parquet"')
    assert brief(OSError("IO Error: no such file\nLINE 1: SELECT")) == "IO Error: no such file"


def test_an_address_without_a_cluster_executor_is_refused(tmp_path: Path) -> None:
    """``--address`` with the default (threads) executor used to be ignored: the run went local."""
    from duckharness import Harness, InputError
    from duckharness.demo import write_demo_dataset

    write_demo_dataset(tmp_path / "d", days=1, rows=200)
    for executor in ("threads", "processes"):
        with pytest.raises(InputError, match=r"address='tcp://127.0.0.1:1' names a cluster, which only the 'ray' and"):
            Harness(tmp_path / "d", executor=executor, address="tcp://127.0.0.1:1")


def test_a_missing_cluster_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from duckharness.errors import MissingDependencyError
    from duckharness.execution.executor import DaskExecutor, RayExecutor

    def one(con: object, task: int) -> int:
        return task

    for module, executor, extra in (("ray", RayExecutor(1), "ray"), ("distributed", DaskExecutor(1), "dask")):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: import raises ImportError
        with pytest.raises(MissingDependencyError, match=rf"needs {module}: pip install 'duckharness\[{extra}\]'"):
            executor.map(one, [1])


def test_a_ray_client_address_without_the_client_package_says_what_to_install(tmp_path: Path) -> None:
    """Through the CLI in a fresh process (this one may have a local Ray running already)."""
    import importlib.util
    import subprocess
    import sys

    from duckharness.demo import write_demo_dataset

    if importlib.util.find_spec("grpc") is not None:
        pytest.skip("the Ray Client is installed here")
    write_demo_dataset(tmp_path / "d", days=1, rows=200)
    done = subprocess.run(
        [sys.executable, "-m", "duckharness", "metrics", str(tmp_path / "d"), "--no-cache", "--executor", "ray",
         "--address", "ray://127.0.0.1:10001"], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == ("Error: Connecting to ray://127.0.0.1:10001 needs the Ray Client: pip install "
                           "'ray[client]' (or 'duckharness[ray]').\n")


# --- what worker processes cannot receive, or cannot start for ---------------------------------------

def locked_step() -> Callable[[pl.LazyFrame], pl.LazyFrame]:
    """A step that runs on threads but does not pickle: a closure over a lock (defined in a
    function, so cloudpickle pickles it by value, lock included)."""
    lock = threading.Lock()

    def locked(lf: pl.LazyFrame) -> pl.LazyFrame:
        with lock:
            return lf

    return locked


def test_other_experiments_run_on_processes_while_an_unpicklable_step_exists(
        folder: Path, reference: dict, process_executor: ProcessExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's run of one experiment failed with a raw "cannot pickle '_thread.lock' object" because
    every task shipped every experiment's step."""
    with Harness(folder, workers=2) as h:
        h.add_experiment("z", add_z)
        ranked_on_threads = h.rank_ic("pred_10s:target_10s", ["z"], progress=False)
    rounds = count_rounds(process_executor, monkeypatch)
    with Harness(folder, workers=2, executor=process_executor) as h:
        h.add_experiment("z", add_z)
        with pytest.warns(DuckHarnessWarning, match="Experiment 'locked'"):
            h.add_experiment("locked", locked_step())
        for by in (None, "day"):
            assert_identical(h.metrics(METRICS, by=by, experiments=["z"]), reference[by].filter(experiment="z"))
        assert_identical(h.rank_ic("pred_10s:target_10s", ["z"], progress=False), ranked_on_threads)
    # z's chain ran on the worker processes: 5 batches per metrics run (the driver runs the first),
    # then the 6 days of the rank IC.
    assert sum(rounds) == 2 * 5 + len(DAYS), rounds


@pytest.mark.parametrize("kind", ["processes", "ray", "dask"])
@pytest.mark.parametrize("asked", ["locked", "after"])
def test_an_unpicklable_step_run_on_worker_processes_names_experiment_and_function(
        folder: Path, kind: str, asked: str) -> None:
    ex = make_executor(kind, 2)
    try:
        with Harness(folder, workers=2) as h:
            h.add_experiment("locked", locked_step())
            h.add_experiment("after", "SELECT * FROM locked WHERE volume > 1000")
            with pytest.raises(UnpicklableStepError) as info:
                h.metrics(["count"], experiments=[asked], executor=ex)
            # The step still runs on threads: the lock only stops it from being pickled.
            assert h.metrics(["count"], experiments=[asked], executor="threads").height > 0
    finally:
        ex.close()
    message = str(info.value)
    assert (info.value.experiment, info.value.executor) == ("locked", kind)
    assert info.value.step is not None and "locked_step.<locals>.locked" in info.value.step
    assert message.startswith("Experiment 'locked'")
    assert ("(a step of 'after''s chain)" in message) == (asked == "after")
    assert f"cannot be sent to the {kind} workers" in message and "cannot pickle '_thread.lock' object" in message
    assert "module level" in message and "executor='threads'" in message
    # Nothing was started for tasks that could not be sent.
    assert getattr(ex, "_pool", None) is None and getattr(ex, "_client", None) is None


def test_an_unpicklable_step_in_a_per_day_scan_names_experiment_and_function(
        folder: Path, process_executor: ProcessExecutor) -> None:
    with Harness(folder, workers=2, executor=process_executor) as h, pytest.warns(DuckHarnessWarning):
        h.add_experiment("locked", locked_step())
        with pytest.raises(UnpicklableStepError, match=r"^Experiment 'locked': Python step .*locked cannot be sent"):
            h.rank_ic("pred_10s:target_10s", ["locked"], progress=False)


def test_an_unpicklable_step_warns_when_added_only_if_the_harness_runs_on_worker_processes(folder: Path) -> None:
    with Harness(folder, executor="processes") as h:
        with pytest.warns(DuckHarnessWarning, match=r"Experiment 'locked': Python step .*locked does not pickle "
                                                     r"\(TypeError: cannot pickle '_thread.lock' object\)") as seen:
            h.add_experiment("locked", locked_step())
        assert seen[0].filename == __file__  # points at the user's line
        assert "locked" in h.experiments.names  # added all the same: a run may choose threads
    with Harness(folder) as h, warnings.catch_warnings():
        warnings.simplefilter("error")
        h.add_experiment("locked", locked_step())  # threads (the default): no pickling, no warning


def die_once(con: Any, marker: str) -> int:
    """A task whose worker process dies the first time it runs (as one killed by the OS would)."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return os.getpid()


def test_a_worker_process_lost_during_a_task_is_retried(tmp_path: Path) -> None:
    ex = ProcessExecutor(1, retries=1)
    try:
        pids = ex.map(die_once, [str(tmp_path / "died")])
    finally:
        ex.close()
    assert pids[0] != os.getpid() and (tmp_path / "died").exists()


UNGUARDED = """\
import polars as pl
from duckharness import Harness

def scaled(lf):
    return lf.with_columns(pl.col("pred_10s") * 2)

print("script ran", flush=True)
h = Harness({data!r}, cache=False, progress=False)
h.add_experiment("scaled", scaled)
print(h.metrics(["count"], pairs="pred_10s", experiments="scaled", executor="processes", workers=1))
"""


def run_script(source: str, tmp_path: Path, *, piped: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)}
    if piped:
        return subprocess.run([sys.executable, "-"], input=source, cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    script = tmp_path / "backtest.py"
    script.write_text(source)
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_script_without_the_main_guard_is_told_to_add_it_and_not_retried(tmp_path: Path) -> None:
    from duckharness.demo import write_demo_dataset

    write_demo_dataset(tmp_path / "d", days=2, rows=200)  # 2 days: the second one goes to the worker
    done = run_script(UNGUARDED.format(data=str(tmp_path / "d")), tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("duckharness.errors.ExecutionError: The processes executor's workers exited while "
                           "starting, before running any batch"), done.stderr[-3000:]
    assert f"({tmp_path / 'backtest.py'})" in last and 'if __name__ == "__main__":' in last
    assert "executor='threads'" in last and "attempt(s)" not in done.stderr
    assert done.stderr.count("duckharness.errors.ExecutionError") == 1
    # The script ran here and once in the one worker: the broken pool was not started again.
    assert done.stdout.count("script ran") == 2


def test_a_script_piped_to_python_is_told_to_run_from_a_file(tmp_path: Path) -> None:
    from duckharness.demo import write_demo_dataset

    write_demo_dataset(tmp_path / "d", days=2, rows=200)
    done = run_script(UNGUARDED.format(data=str(tmp_path / "d")), tmp_path, piped=True)
    assert done.returncode == 1
    assert done.stderr.count("Traceback") == 1  # ours: no worker was started to fail
    assert done.stderr.strip().splitlines()[-1] == (
        "duckharness.errors.ExecutionError: The processes executor cannot start its workers: each imports your "
        "script again, and it was read from standard input (python - < script.py). Save the script as a file and "
        "run it (python script.py, with the run under `if __name__ == \"__main__\":`), or run on threads "
        "(executor='threads').")
    assert done.stdout.count("script ran") == 1


def test_the_local_dask_cluster_the_executor_starts_does_not_log_a_failing_task(
        folder: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """distributed's workers logged "Compute Failed" and the traceback of a step that raised, on
    top of the TransformError the run gives."""
    ex = DaskExecutor(1)
    try:
        with Harness(folder) as h:
            h.add_experiment("boom", fail_on_third_day)
            with pytest.raises(TransformError, match="bad day in pid"):
                h.metrics(["count"], experiments=["boom"], executor=ex)
    finally:
        ex.close()
    err = capfd.readouterr().err
    assert "Compute Failed" not in err and "bad day" not in err, err
