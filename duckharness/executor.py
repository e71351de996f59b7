"""The batch executor: runs one query per batch of files on parallel DuckDB connections.

Each worker thread owns one connection from :class:`ConnectionConfig` (``threads=1``), which
measured faster than one multi-threaded query over all files. Results come back in batch order,
whatever order the batches finish in, so the same batches give the same bits for any number of
workers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import duckdb

from duckharness.connection import ConnectionConfig
from duckharness.errors import DuckHarnessError, ExecutionError

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


class ThreadExecutor:
    """Run ``fn(con, task)`` for each task on ``workers`` threads, one DuckDB connection each."""

    name = "threads"

    def __init__(self, workers: int | None = None, config: ConnectionConfig | None = None) -> None:
        self.workers = workers or default_workers()
        self.config = config or ConnectionConfig(threads=1)

    def map(
        self,
        fn: Callable[[duckdb.DuckDBPyConnection, T], R],
        tasks: Sequence[T],
        describe: Callable[[T], list[str]] = lambda t: [],
        on_done: Callable[[], None] | None = None,
    ) -> list[R]:
        local = threading.local()
        opened: list[duckdb.DuckDBPyConnection] = []
        lock = threading.Lock()

        def run(task: T) -> R:
            con = getattr(local, "con", None)
            if con is None:
                con = local.con = self.config.open()
                with lock:
                    opened.append(con)
            try:
                out = fn(con, task)
            except DuckHarnessError:
                raise
            except duckdb.Error as e:
                files = describe(task)
                msg = str(e).strip().splitlines()[0]
                raise ExecutionError(f"Query failed on {', '.join(files) or 'a batch'}: {msg}", files=files) from e
            if on_done is not None:
                on_done()
            return out

        try:
            if self.workers == 1 or len(tasks) <= 1:
                return [run(t) for t in tasks]
            with ThreadPoolExecutor(max_workers=min(self.workers, len(tasks))) as pool:
                return list(pool.map(run, tasks))
        finally:
            for con in opened:
                con.close()
