"""Batch executors: run one task per batch of files on local threads, local processes, Ray or Dask.

Every executor runs ``fn(con, task)`` with a DuckDB connection opened on the worker from the same
:class:`ConnectionConfig` (``threads=1``: one query per file batch on parallel connections measured
faster than one multi-threaded query), and returns results in task order, so the same batches give
the same bits on any executor and any number of workers. Functions and tasks are shipped with
cloudpickle; only small partial statistics travel back. Each task that succeeds is reported as it
finishes, in whatever order the workers finish them (a progress bar moves with the run, not when
the last batch of a round is back). A task that fails is retried up to
``retries`` times (a file being rewritten, a lost worker); then the run fails with an
:class:`ExecutionError` naming the batch's files, and no partial result is returned. Errors that
would fail again are not retried: input errors (a Python step that raises, say) are raised as they
are, and DuckDB's errors about the query itself (a type mismatch, an overflow) fail the run at once.
So do a task that does not pickle (:class:`UnpicklableTaskError`, before anything is sent) and
worker processes that exit while starting (a script without the ``__main__`` guard).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import duckdb

from duckharness.errors import ExecutionError, InputError, MissingDependencyError, UnpicklableTaskError
from duckharness.execution.connection import ConnectionConfig

Fn = Callable[[duckdb.DuckDBPyConnection, Any], Any]
OnDone = Callable[[], None] | None  # called on the map's own thread as each task succeeds
EXECUTORS = ("threads", "processes", "ray", "dask")
_DASK_WORKER_SETUP = "duckharness.execution.dask_worker"  # the preload module of the local Dask cluster's workers


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


# One connection per (worker process, config) for processes, Ray and Dask; configs are compared by
# their pickle. (Local threads keep one connection per pool thread for a round: ThreadExecutor.)
_local = threading.local()


def _connection(config: ConnectionConfig) -> duckdb.DuckDBPyConnection:
    cache = getattr(_local, "cons", None)
    if cache is None:
        cache = _local.cons = {}
    key = config.cache_key()
    if key not in cache:
        cache[key] = config.open()
    return cache[key]


def run_payload(payload: bytes) -> Any:
    """Worker entry point for processes, Ray and Dask: unpickle ``(config, fn, task)`` and run it."""
    import cloudpickle

    config, fn, task = cloudpickle.loads(payload)
    return fn(_connection(config), task)


def is_interruption(e: BaseException) -> bool:
    """Whether ``e`` is an interruption (Ctrl-C, SIGTERM): KeyboardInterrupt, DuckDB's
    InterruptException, or the ``RuntimeError('Query interrupted')`` DuckDB raises when a signal
    stops a query."""
    if isinstance(e, KeyboardInterrupt | duckdb.InterruptException):
        return True
    return isinstance(e, RuntimeError) and str(e).strip() == "Query interrupted"


_TRACEBACK_OF_INTERRUPT = re.compile(r"^(KeyboardInterrupt|SystemExit)\b", re.MULTILINE)


def caused_by_interruption(e: BaseException) -> bool:
    """Whether ``e`` is, or was caused by, an interruption (:func:`is_interruption`), or is a
    DuckDB error whose text is the traceback of a KeyboardInterrupt raised inside a Python
    filesystem (fsspec) that DuckDB was reading through."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if is_interruption(x):
            return True
        if isinstance(x, duckdb.Error | OSError) and _TRACEBACK_OF_INTERRUPT.search(str(x)):
            return True
        todo += [x.__cause__, x.__context__]
    return False


def retryable(e: BaseException) -> bool:
    # A worker that cannot import a module, and DuckDB's errors about the query itself (binding,
    # types, conversions, overflow), fail the same way every time. An unreadable file or a lost
    # connection may not (a file being rewritten, a network hiccup).
    if isinstance(e, ImportError | duckdb.DataError):
        return False
    if is_interruption(e):  # retrying would swallow a Ctrl-C or SIGTERM
        return False
    return not isinstance(e, duckdb.ProgrammingError) or isinstance(e, duckdb.InvalidInputException)


MESSAGE_CHARS = 300  # a driver message can quote a whole column of values


_RAISED = re.compile(r"^(?!LINE \d)([A-Za-z_][\w.]*): \S")  # "EndpointConnectionError: Could not ..."


def brief(e: BaseException) -> str:
    """The first line of an error's message, cut to ``MESSAGE_CHARS`` characters. A DuckDB error
    that carries a Python traceback (a remote filesystem's read failing inside a scan) starts
    with ``Traceback (most recent call last):``: its cause is the traceback's last exception line.

    Example:
        >>> brief(OSError("Traceback (most recent call last):\\n  File 'x.py', line 3, in send\\n"
        ...               "EndpointConnectionError: Could not connect to the endpoint URL\\n\\nLINE 1: SELECT"))
        'EndpointConnectionError: Could not connect to the endpoint URL'
    """
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if "Traceback (most recent call last):" in line:
        causes = [x for x in text.splitlines() if _RAISED.match(x)]
        if causes:
            cause = causes[-1].strip()
            before = line.split("Traceback (most recent call last):")[0].strip()
            line = f"{before} {cause}".strip()
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 1] + "…"


class Executor:
    """Base class: the retry loop and error reporting; subclasses run one round of tasks."""

    name = "base"
    pickles_tasks = True  # tasks travel to other processes with cloudpickle (not on ThreadExecutor)

    def __init__(self, workers: int | None = None, *, retries: int = 2, config: ConnectionConfig | None = None):
        self.workers = workers or default_workers()
        if self.workers < 1:
            raise InputError(f"workers must be at least 1, got {self.workers}.")
        if retries < 0:
            raise InputError(f"retries must be 0 or more, got {retries}.")
        self.retries = retries
        self.config = config or ConnectionConfig(threads=1)

    def with_config(self, config: ConnectionConfig) -> Executor:
        self.config = config
        return self

    def _payload(self, fn: Fn, task: Any) -> bytes:
        """``(config, fn, task)`` pickled for a worker (see :func:`run_payload`). A task that does
        not pickle would not on a second try either: the run fails at once."""
        import cloudpickle

        try:
            return cloudpickle.dumps((self.config, fn, task))
        except Exception as e:  # TypeError, PicklingError, AttributeError, RecursionError, ...
            raise UnpicklableTaskError(
                f"A task of this run cannot be sent to the {self.name} workers: it does not pickle "
                f"({type(e).__name__}: {brief(e)}). What a run sends (its Python steps, storage_options) must "
                f"pickle with cloudpickle; or run on threads (executor='threads').",
                executor=self.name,
            ) from e

    def _round(
        self, fn: Fn, tasks: Sequence[Any], home: duckdb.DuckDBPyConnection | None = None, on_done: OnDone = None
    ) -> list[tuple[bool, Any]]:
        """One attempt at every task: ``(True, result)`` or ``(False, error)`` per task, in task
        order; ``on_done()`` is called on this thread as each task succeeds, as soon as it does."""
        raise NotImplementedError

    def map(
        self,
        fn: Fn,
        tasks: Sequence[Any],
        describe: Callable[[Any], list[str]] = lambda t: [],
        on_done: Callable[[], None] | None = None,
        home: duckdb.DuckDBPyConnection | None = None,
    ) -> list[Any]:
        """``[fn(con, t) for t in tasks]``, in parallel, in task order, with retries.

        ``on_done()`` is called on the calling thread once per task, when it has succeeded, as it
        finishes (while other tasks still run), so a progress bar moves with the run.
        ``home`` is a connection opened from this executor's config in this process: local
        threads then run on cursors of its database (already warm, no ~20 ms open each) rather
        than on new connections. Retries always start from fresh connections.
        """
        results: list[Any] = [None] * len(tasks)
        attempts = [0] * len(tasks)
        pending = list(range(len(tasks)))
        while pending:
            outcomes = self._round(fn, [tasks[i] for i in pending], home, on_done)
            home = None  # retries start from fresh connections
            retry = []
            for i, (ok, value) in zip(pending, outcomes, strict=True):
                if ok:
                    results[i] = value
                    continue
                attempts[i] += 1
                if caused_by_interruption(value):  # Ctrl-C stopped this batch's query
                    raise KeyboardInterrupt from value
                if isinstance(value, ImportError):
                    raise ExecutionError(
                        f"A {self.name} worker cannot import {getattr(value, 'name', None) or value}: install it on "
                        f"the workers (or define Python steps in a module they can import).",
                        files=describe(tasks[i]),
                    ) from value
                if isinstance(value, InputError):
                    raise value
                if attempts[i] > self.retries or not retryable(value):
                    files = describe(tasks[i])
                    where = f" ({', '.join(files)})" if files else ""
                    raise ExecutionError(
                        f"Batch {i + 1} of {len(tasks)}{where} failed after {attempts[i]} attempt(s) on {self.name}: "
                        f"{brief(value)}",
                        files=files,
                    ) from value
                retry.append(i)
            pending = retry
        return results

    def close(self) -> None:
        """Release what the executor started (pools, clusters it created)."""


class ThreadExecutor(Executor):
    """Local threads, one DuckDB connection each (the default)."""

    name = "threads"
    pickles_tasks = False

    def _round(
        self, fn: Fn, tasks: Sequence[Any], home: duckdb.DuckDBPyConnection | None = None, on_done: OnDone = None
    ) -> list[tuple[bool, Any]]:
        # One connection per pool thread for the whole round (opening one costs ~20 ms and starts
        # with cold caches), closed when the round ends; a task that fails drops its thread's
        # connection, so a retry starts from a fresh one. With ``home``, the threads' connections
        # are cursors of its database, made here on the calling thread (each query still runs on
        # its own thread alone: the database has threads=1).
        config = self.config
        local = threading.local()
        opened: list[duckdb.DuckDBPyConnection] = []
        lock = threading.Lock()
        spare = [config.session(home.cursor()) for _ in range(min(self.workers, len(tasks)))] if home else []
        opened.extend(spare)

        def run(task: Any) -> tuple[bool, Any]:
            con = getattr(local, "con", None)
            try:
                if con is None:
                    with lock:
                        con = spare.pop() if spare else None
                    if con is None:
                        con = config.open()
                        with lock:
                            opened.append(con)
                    local.con = con
                return True, fn(con, task)
            except Exception as e:
                local.con = None
                return False, e

        out: list[tuple[bool, Any]] = []
        try:
            if not tasks or (
                threading.current_thread() is not threading.main_thread() and (self.workers == 1 or len(tasks) <= 1)
            ):
                for t in tasks:
                    out.append(run(t))
                    _report(out[-1][0], on_done)
                return out
            pool = ThreadPoolExecutor(max_workers=min(self.workers, len(tasks)))
            try:
                futures = [pool.submit(run, t) for t in tasks]
                out = [(False, None)] * len(futures)
                for k, f in _as_finished(futures):
                    out[k] = f.result()
                    _report(out[k][0], on_done)
                return out
            except BaseException:  # Ctrl-C while waiting: stop the threads' queries, not wait for them
                with lock:
                    running = list(opened)
                for con in running:
                    with contextlib.suppress(duckdb.Error):
                        con.interrupt()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            for con in opened:
                con.close()


class ProcessExecutor(Executor):
    """Local worker processes (spawned), for Python steps that hold the GIL.

    Each worker imports the main script again as it starts (Python's spawn). A script it cannot
    import (piped to ``python -``) fails before any is started; workers that all exit while
    starting (a script without the ``__main__`` guard runs itself in each) fail the run at once,
    saying so, where a worker lost while running a batch is retried.
    """

    name = "processes"

    def __init__(self, workers: int | None = None, **kw: Any) -> None:
        super().__init__(workers, **kw)
        self._pool: Any = None
        self._workers_up: Any = None  # the pool's event, set by each worker once it has started

    def _round(
        self, fn: Fn, tasks: Sequence[Any], home: duckdb.DuckDBPyConnection | None = None, on_done: OnDone = None
    ) -> list[tuple[bool, Any]]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        payloads = [self._payload(fn, t) for t in tasks]  # all of them, before a worker starts
        if self._pool is None:
            script = _unimportable_main()
            if script is not None:
                raise ExecutionError(_workers_cannot_import(script))
            context = multiprocessing.get_context("spawn")
            self._workers_up = context.Event()
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=context, initializer=_worker_started, initargs=(self._workers_up,)
            )
        pool, started = self._pool, self._workers_up
        futures = [pool.submit(run_payload, p) for p in payloads]
        out: list[tuple[bool, Any]] = [(False, None)] * len(futures)
        try:
            for k, f in _as_finished(futures):
                try:
                    out[k] = (True, f.result())
                except BrokenProcessPool as e:  # a worker died: lost while it ran (retried), or while starting
                    if self._pool is pool:
                        self._pool = None
                    if not started.is_set():  # no worker ever started: a new pool would fail the same way
                        raise ExecutionError(_workers_did_not_start()) from None
                    out[k] = (False, e)
                except Exception as e:
                    out[k] = (False, e)
                _report(out[k][0], on_done)
        except BaseException:  # Ctrl-C or SIGTERM while waiting: end the workers' batches now
            self._terminate(pool)
            raise
        return out

    def _terminate(self, pool: Any) -> None:
        """Stop ``pool``'s workers at once (a batch's query or Python step may run for minutes;
        shutting down would wait for it); the next round starts a new pool."""
        if self._pool is pool:
            self._pool = None
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


class RayExecutor(Executor):
    """Ray: an existing cluster (``address``) or a local one started on first use."""

    name = "ray"

    def __init__(self, workers: int | None = None, *, address: str | None = None, **kw: Any) -> None:
        super().__init__(workers, **kw)
        self.address = address
        self._remote: Any = None
        self._started = False

    def _round(
        self, fn: Fn, tasks: Sequence[Any], home: duckdb.DuckDBPyConnection | None = None, on_done: OnDone = None
    ) -> list[tuple[bool, Any]]:
        payloads = [self._payload(fn, t) for t in tasks]  # before a cluster is started for them
        ray = _optional("ray", "the 'ray' executor", "ray")
        if not ray.is_initialized():
            self._started = True
            if self.address:
                try:
                    ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)
                except ValueError as e:
                    if "ray[client]" not in str(e):
                        raise
                    raise MissingDependencyError(
                        f"Connecting to {self.address} needs the Ray Client: pip install 'ray[client]' "
                        f"(or 'duckharness[ray]').",
                        package="ray[client]",
                        extra="ray",
                    ) from None
            else:
                ray.init(  # a cluster of our own: no "Started a local Ray instance" line on stderr
                    num_cpus=self.workers,
                    include_dashboard=False,
                    ignore_reinit_error=True,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
        if self._remote is None:
            self._remote = ray.remote(max_retries=0)(run_payload)
        refs = [self._remote.remote(p) for p in payloads]
        position = {r: k for k, r in enumerate(refs)}
        out: list[tuple[bool, Any]] = [(False, None)] * len(refs)
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)  # the next task to finish, whichever it is
            for r in ready:
                k = position[r]
                try:
                    out[k] = (True, ray.get(r))
                except Exception as e:
                    cause = getattr(e, "cause", None)
                    out[k] = (False, cause if isinstance(cause, BaseException) else e)
                _report(out[k][0], on_done)
        return out

    def close(self) -> None:
        """Shut down a local Ray cluster this executor started (never one it was pointed at)."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
            self._remote = None


class DaskExecutor(Executor):
    """Dask distributed: an existing scheduler (``address``) or a LocalCluster started on first use."""

    name = "dask"

    def __init__(self, workers: int | None = None, *, address: str | None = None, client: Any = None, **kw: Any):
        super().__init__(workers, **kw)
        self.address = address
        self._client = client
        self._own: list[Any] = []

    def _round(
        self, fn: Fn, tasks: Sequence[Any], home: duckdb.DuckDBPyConnection | None = None, on_done: OnDone = None
    ) -> list[tuple[bool, Any]]:
        payloads = [self._payload(fn, t) for t in tasks]  # before a cluster is started for them
        distributed = _optional("distributed", "the 'dask' executor", "dask")
        Client, LocalCluster = distributed.Client, distributed.LocalCluster

        if self._client is None:
            if self.address:
                self._client = Client(self.address)
            else:
                import dask

                # Our own workers keep quiet about the tasks that raise (see dask_worker); the
                # preloads a user configured still run. The scheduler's HTTP server (health checks;
                # no dashboard) takes a free port, not 8787 with a warning when a dashboard has it.
                preload = [*(dask.config.get("distributed.worker.preload", None) or []), _DASK_WORKER_SETUP]
                cluster = LocalCluster(
                    n_workers=self.workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    scheduler_kwargs={"dashboard_address": ":0"},
                    preload=preload,
                )
                self._client = Client(cluster)
                self._own.append(cluster)
            self._own.append(self._client)
        futures = [self._client.submit(run_payload, p, pure=False) for p in payloads]
        position = {f.key: k for k, f in enumerate(futures)}  # pure=False: every task has a key of its own
        out: list[tuple[bool, Any]] = [(False, None)] * len(futures)
        for f in distributed.as_completed(futures):  # in the order they finish, failed ones too
            k = position[f.key]
            try:
                out[k] = (True, f.result())
            except Exception as e:
                out[k] = (False, e)
            _report(out[k][0], on_done)
        return out

    def close(self) -> None:
        for obj in reversed(self._own):
            obj.close()
        self._own = []
        self._client = None


def _as_finished(futures: Sequence[Future[Any]]) -> Iterator[tuple[int, Future[Any]]]:
    """``(index, future)`` of each future as it finishes. Short waits, so that a Ctrl-C the OS
    hands to another thread is seen too (see :func:`~duckharness.execution.connection.interruptible`)."""
    position = {f: k for k, f in enumerate(futures)}
    waiting = set(futures)
    while waiting:
        finished, waiting = wait(waiting, timeout=0.1)
        for f in sorted(finished, key=position.__getitem__):
            yield position[f], f


def _worker_started(event: Any) -> None:
    """A process worker's initializer: it has imported the main script and can take tasks. On
    Linux it also asks to be ended when the process that started it ends, however that ends (a
    script killed by SIGTERM runs no clean-up, and its workers would run on, orphaned)."""
    _end_with_parent()
    event.set()


def _end_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():  # ended before the request was made
        os._exit(1)


def _unimportable_main() -> str | None:
    """The ``__main__`` script when spawned workers cannot import it again (a script piped to
    ``python -`` is ``<stdin>``), else None (no script, as in a notebook; or one they can import)."""
    import multiprocessing.process

    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):  # python -m: imported by name
        return None
    path = getattr(main, "__file__", None)
    if not isinstance(path, str):
        return None
    start = getattr(multiprocessing.process, "ORIGINAL_DIR", None) or os.getcwd()  # spawn's own base
    return None if os.path.isfile(os.path.join(start, path)) else path


def _main_script() -> str | None:
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return path if isinstance(path, str) else None


def _workers_cannot_import(script: str) -> str:
    where = (
        "it was read from standard input (python - < script.py)"
        if script.startswith("<")
        else f"{script} is not a file"
    )
    return (
        f"The processes executor cannot start its workers: each imports your script again, and {where}. "
        f"Save the script as a file and run it (python script.py, with the run under "
        f"`if __name__ == \"__main__\":`), or run on threads (executor='threads')."
    )


def _workers_did_not_start() -> str:
    script = _main_script()
    if script is None:
        return (
            "The processes executor's workers exited while starting, before running any batch (their own "
            "errors are above). Where they cannot start, run on threads (executor='threads')."
        )
    return (
        f"The processes executor's workers exited while starting, before running any batch: each imports "
        f'your script ({script}) again, and most likely its run is not under `if __name__ == "__main__":`, '
        f"so each worker ran the script itself (see their errors above). Put the run under that guard, "
        f"or run on threads (executor='threads')."
    )


def _report(ok: bool, on_done: OnDone) -> None:
    if ok and on_done is not None:
        on_done()


def _optional(module: str, what: str, extra: str) -> Any:
    """Import an optional dependency, or raise the package's own error saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{what[0].upper()}{what[1:]} needs {module}: pip install 'duckharness[{extra}]'.",
            package=module,
            extra=extra,
        ) from None


def make_executor(
    executor: str | Executor | None, workers: int | None = None, *, address: str | None = None, retries: int = 2
) -> Executor:
    """An executor from a name (``threads``, ``processes``, ``ray``, ``dask``) or an instance."""
    if isinstance(executor, Executor):
        return executor
    kind = executor or "threads"
    if kind == "threads":
        return ThreadExecutor(workers, retries=retries)
    if kind == "processes":
        return ProcessExecutor(workers, retries=retries)
    if kind == "ray":
        return RayExecutor(workers, address=address, retries=retries)
    if kind == "dask":
        return DaskExecutor(workers, address=address, retries=retries)
    raise InputError(f"Unknown executor {executor!r}. Choose one of: {', '.join(EXECUTORS)}.")
