"""Ctrl-C (SIGINT) and SIGTERM stop the CLI cleanly: ``Interrupted.`` (exit 130) or ``Terminated.``
(exit 143) on stderr, no traceback, and no half-written output or temporary folder left behind.

The signals are real, sent to a real ``duckharness`` process while DuckDB runs the sink's COPY
into its temporary folder. To have a COPY that lasts until it is interrupted, the process runs
the CLI with one change: the sink's COPY reads a very large generated range instead of the
experiment (it writes almost no rows, so the disk is not filled); it first writes a marker file, so
the signal is sent while DuckDB is inside that COPY.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import SESSION, write_dataset

from duckharness.demo import one_day, trading_days

RUN_WITH_A_LONG_COPY = """\
import pathlib, sys
import sqlglot
import duckharness.outputs.sink as sink
from duckharness.cli import main

import duckharness.execution.connection as connection

marker, real_copy = pathlib.Path(sys.argv[1]), sink._copy
real_interrupt_all = connection.interrupt_all

def interrupt_all():  # record that the signal watcher stopped DuckDB's queries
    pathlib.Path(str(marker) + ".interrupted").write_text(str(real_interrupt_all()))

connection.interrupt_all = interrupt_all
LONG = sqlglot.parse_one("SELECT x FROM range(1000000000000) t(x) WHERE x % 1000000007 = 1", read="duckdb")

def long_copy(con, query, target, tracer, partition=None):
    marker.write_text(target)
    return real_copy(con, LONG, target, tracer)

sink._copy = long_copy
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("interrupt") / "bt"
    rng = np.random.default_rng(3)
    days = trading_days(dt.date(2026, 3, 4), 2)
    write_dataset(out, {d.isoformat(): one_day(d, 500, rng, symbols=4) for d in days}, SESSION)
    return out


def sink_then_signal(src: Path, tmp_path: Path, sig: signal.Signals, runner: str = RUN_WITH_A_LONG_COPY,
                     timings: list[float] | None = None) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Start a sink into ``tmp_path/work/out`` with ``runner``, send ``sig`` once its COPY runs;
    the finished process (and, in ``timings``, the seconds from the signal to its end)."""
    work, marker, script = tmp_path / "work", tmp_path / "copy-started", tmp_path / "run.py"
    work.mkdir()
    script.write_text(runner)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marker), "sink", str(src), "--experiment", "baseline",
         "-o", str(work / "out"), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even when the tests run in the background
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the sink's COPY did not start"
            time.sleep(0.05)
        time.sleep(0.5)  # DuckDB is inside the COPY now
        assert proc.poll() is None
        assert marker.read_text().startswith(str(work / ".out.tmp-"))  # writing into its temporary folder
        assert os.listdir(work) != []
        proc.send_signal(sig)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=60)
        if timings is not None:
            timings.append(time.monotonic() - sent)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), work


def test_ctrl_c_during_a_sinks_copy_prints_interrupted_and_leaves_nothing(src: Path, tmp_path: Path) -> None:
    done, work = sink_then_signal(src, tmp_path, signal.SIGINT)
    assert (done.returncode, done.stderr, done.stdout) == (130, "Interrupted.\n", "")
    assert os.listdir(work) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_interrupts_duckdbs_running_queries_at_once(src: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """Python runs a signal handler only between DuckDB's tasks, and a sort or window inside a
    sink's COPY can be one task of many seconds (a windowed experiment's sink of W1 went on for
    14 s after Ctrl-C): the CLI's signal watcher interrupts the process's DuckDB connections."""
    done, work = sink_then_signal(src, tmp_path, sig)
    assert done.returncode == 128 + sig
    interrupted = tmp_path / "copy-started.interrupted"
    assert interrupted.exists() and int(interrupted.read_text()) >= 1  # at least the sink's connection
    assert os.listdir(work) == []


def test_interrupt_all_stops_a_query_running_on_another_thread() -> None:
    import threading

    import duckdb

    from duckharness.execution.connection import ConnectionConfig, interrupt_all

    con = ConnectionConfig(threads=1).open()
    idle, closed = con.cursor(), ConnectionConfig().open()
    closed.close()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            con.execute("SELECT count(*) FROM range(1000000000000) t(x) WHERE x % 1000000007 = 1").fetchall()
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=run)
    started = time.monotonic()
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive()
    assert interrupt_all() >= 2  # the running connection and the others still referenced
    worker.join(timeout=10)
    assert not worker.is_alive() and time.monotonic() - started < 10
    assert len(errors) == 1 and isinstance(errors[0], duckdb.InterruptException)
    assert con.execute("SELECT 42").fetchall() == [(42,)]  # usable afterwards, as is an idle one
    assert idle.execute("SELECT 43").fetchall() == [(43,)]


def test_sigterm_during_a_sinks_copy_prints_terminated_and_leaves_nothing(src: Path, tmp_path: Path) -> None:
    done, work = sink_then_signal(src, tmp_path, signal.SIGTERM)
    assert (done.returncode, done.stderr, done.stdout) == (143, "Terminated.\n", "")
    assert os.listdir(work) == []


def test_signal_handlers_are_restored_after_an_in_process_run(src: Path, tmp_path: Path) -> None:
    from duckharness.cli import main

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    threads = threading.active_count()
    assert main(["sink", str(src), "--experiment", "baseline", "-o", str(tmp_path / "out"), "-q"]) == 0
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(wakeup) == wakeup  # the signal watcher's fd is gone again
    assert threading.active_count() == threads  # and so is its thread


def test_an_interrupted_query_is_not_retried(tmp_path: Path) -> None:
    """A signal during a batch's query (one worker) stops the map with a KeyboardInterrupt: before,
    DuckDB's RuntimeError('Query interrupted') was retried and the run went on as if nothing had
    happened."""
    import threading

    from duckharness.execution.executor import ThreadExecutor

    calls = []

    def long_query(con: object, task: int) -> object:  # a few seconds on one thread
        calls.append(task)
        return con.execute(  # type: ignore[attr-defined]
            "SELECT count(*) FROM range(1000000000) t(x) WHERE x % 1000000007 = 1").fetchall()

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            ThreadExecutor(1, retries=2).map(long_query, [0])
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert calls == [0] and time.monotonic() - started < 10  # stopped in the first attempt


RUN_WITH_A_STUCK_THREAD = """\
import pathlib, sys, threading
import sqlglot
import duckharness.outputs.sink as sink
from duckharness.cli import main

marker, real_copy = pathlib.Path(sys.argv[1]), sink._copy
LONG = sqlglot.parse_one("SELECT x FROM range(1000000000000) t(x) WHERE x % 1000000007 = 1", read="duckdb")

def long_copy(con, query, target, tracer, partition=None):
    # a worker stuck where nothing can interrupt it (a read from a stalled object store)
    threading.Thread(target=threading.Event().wait, name="stuck-read").start()
    marker.write_text(target)
    return real_copy(con, LONG, target, tracer)

sink._copy = long_copy
sys.argv = ["duckharness", *sys.argv[2:]]
sys.exit(main())
"""


def test_a_signal_ends_the_command_even_when_a_worker_thread_is_stuck(src: Path, tmp_path: Path) -> None:
    """The interpreter waits for non-daemon threads at exit: a thread stuck in a stalled read
    made SIGTERM look ignored (the run went on for minutes, then only SIGKILL ended it)."""
    timings: list[float] = []
    done, work = sink_then_signal(src, tmp_path, signal.SIGTERM, RUN_WITH_A_STUCK_THREAD, timings)
    assert (done.returncode, done.stderr, done.stdout) == (143, "Terminated.\n", "")
    assert timings[0] < 15
    assert os.listdir(work) == []


SLOW_START = r"""
import importlib.abc, pathlib, sys, time
from duckharness.cli import main


class SlowHarness(importlib.abc.MetaPathFinder):  # loading DuckDB and the engine takes a while
    def find_spec(self, name, path=None, target=None):
        if name == "duckharness.harness":
            pathlib.Path(sys.argv[1]).write_text("loading")
            time.sleep(1.5)
        return None


sys.meta_path.insert(0, SlowHarness())
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_engine_loads_ends_the_run_quietly(src: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """A signal while DuckDB's module loads is recorded, not raised inside it (where it aborts or
    prints a traceback): the command stops before it runs, with the usual message and status."""
    marker, script = tmp_path / "loading", tmp_path / "run.py"
    script.write_text(SLOW_START)

    def loading(proc: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)

    proc, out, err = interrupt_when([sys.executable, str(script), str(marker), "metrics", str(src), "--no-cache"],
                                    loading, sig=sig)
    expected = (143, "Terminated.\n") if sig == signal.SIGTERM else (130, "Interrupted.\n")
    assert (proc.returncode, err, out) == (*expected, "")


API_CALL = """\
import os, pathlib, sys, time
from duckharness import Harness

src, work, call = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
h = Harness(src, cache=False, workers=2)
# An experiment that would run for hours: the call can only end by being interrupted.
h.add_experiment("huge", "SELECT b.* FROM baseline b CROSS JOIN range(100000000000) r(i)")
calls = {
    "metrics": lambda: h.metrics(["r2"], pairs=["pred_10s:target_10s"], experiments=["huge"]),
    "rank_ic": lambda: h.rank_ic("pred_10s", experiments=["huge"]),
    "deciles": lambda: h.deciles("pred_10s", experiments=["huge"]),
    "sink": lambda: h.sink("huge", work / "out"),
    "sample": lambda: h.sample("huge", "head", n=10**12),
}
print("started", flush=True)
try:
    calls[call]()
except KeyboardInterrupt:
    print("KeyboardInterrupt", sorted(os.listdir(work)), flush=True)
"""


def interrupt_when(args: list[str], ready: Callable[[subprocess.Popen[str]], None], *,
                   env: dict[str, str] | None = None,
                   sig: signal.Signals = signal.SIGINT) -> tuple[subprocess.Popen[str], str, str]:
    """Run ``args``, send ``sig`` once ``ready(proc)`` returns, and wait for the process to end;
    it is killed if it has not within 60 s (or ``ready`` fails)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        ready(proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, out, err


@pytest.mark.parametrize("call", ["metrics", "rank_ic", "deciles", "sink", "sample"])
def test_ctrl_c_in_a_python_api_call_raises_keyboard_interrupt_promptly(src: Path, tmp_path: Path,
                                                                        call: str) -> None:
    """Not DuckDB's RuntimeError('Query interrupted') or a failed batch, and not after the query
    has run on for many seconds (SIGINT may reach a DuckDB thread, not the waiting main thread)."""
    work, script = tmp_path / "work", tmp_path / "call.py"
    work.mkdir()
    script.write_text(API_CALL)
    def inside_the_call(proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None and proc.stdout.readline() == "started\n"
        time.sleep(1.0)  # inside the call's queries
        assert proc.poll() is None

    proc, out, err = interrupt_when([sys.executable, str(script), str(src), str(work), call], inside_the_call)
    assert (proc.returncode, out) == (0, "KeyboardInterrupt []\n"), err


PROCESSES_RUN = """\
import multiprocessing, os, pathlib, sys, time
from duckharness import Harness

def stuck(lf):  # a Python step that would run for an hour on each batch in a worker process
    df = lf.collect()
    if multiprocessing.parent_process() is not None:  # (not in the main process, which binds it)
        pathlib.Path(os.environ["MARKERS"], str(os.getpid())).write_text("")
        time.sleep(3600)
    return df.lazy()

if __name__ == "__main__":
    with Harness(sys.argv[1], cache=False, executor="processes", workers=2) as h:
        h.add_experiment("stuck", stuck)
        try:
            h.metrics(["count"], experiments=["stuck"])
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended (its parent may be gone, not yet reaped)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads worker states from /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_with_the_processes_executor_ends_the_workers_batches_instead_of_waiting(
        tmp_path: Path, sig: signal.Signals) -> None:
    """Before, after Ctrl-C the pool's shutdown waited for every running batch (a user waited
    10-20 s, here an hour): the workers are terminated. A script ended by SIGTERM (Python's default:
    no clean-up at all) left its workers running, orphaned: they now end with it."""
    src = tmp_path / "bt"
    rng = np.random.default_rng(5)
    write_dataset(src, {d.isoformat(): one_day(d, 200, rng, symbols=4) for d in trading_days(dt.date(2026, 3, 4), 6)},
                  SESSION)
    markers, script = tmp_path / "markers", tmp_path / "run.py"
    markers.mkdir()
    script.write_text(PROCESSES_RUN)
    workers: list[int] = []

    def a_worker_inside_the_step(proc: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 90
        while not os.listdir(markers):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the workers did not start the step"
            time.sleep(0.1)
        workers.extend(int(p) for p in os.listdir(markers))
        assert proc.pid not in workers and all(_alive(p) for p in workers)  # worker processes, running

    proc, out, err = interrupt_when([sys.executable, str(script), str(src)], a_worker_inside_the_step,
                                    env={**os.environ, "MARKERS": str(markers)}, sig=sig)
    if sig == signal.SIGINT:
        assert out == "KeyboardInterrupt\n", err
    else:
        assert proc.returncode == -signal.SIGTERM
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)
