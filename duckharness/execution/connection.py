"""The one factory for DuckDB connections, so every worker is configured the same way."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import pickle
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import duckdb

_T = TypeVar("_T")

# Every connection and cursor this process set up, so a Ctrl-C or SIGTERM can stop the queries
# running on them at once (see :func:`interrupt_all`); weak, so closing and dropping one is enough.
_LIVE: weakref.WeakSet[duckdb.DuckDBPyConnection] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class ConnectionConfig:
    """How each DuckDB connection is set up: threads, memory, time zone, and the fsspec filesystem
    registered on it for remote sources (so DuckDB reads ``s3://``, ``gs://``, ``memory://`` through
    fsspec, without downloading extensions)."""

    threads: int | None = None
    memory_limit: str | None = None
    timezone: str = "UTC"
    filesystem: Any = field(default=None, compare=False, repr=False)

    def with_threads(self, threads: int | None) -> ConnectionConfig:
        return dataclasses.replace(self, threads=threads)

    def cache_key(self) -> str:
        """Equal for configs that open equal connections (the filesystem compared by its pickle)."""
        fs = b"" if self.filesystem is None else pickle.dumps(self.filesystem)
        return f"{self.threads}|{self.memory_limit}|{self.timezone}|{hashlib.sha256(fs).hexdigest()}"

    def open(self) -> duckdb.DuckDBPyConnection:
        config: dict[str, str | bool | int | float | list[str]] = {}
        if self.threads:
            config["threads"] = self.threads
        if self.memory_limit:
            config["memory_limit"] = self.memory_limit
        # Never fetch extensions at run time: CI and many clusters have no internet.
        config["autoinstall_known_extensions"] = False
        con = duckdb.connect(":memory:", config=config)
        if self.filesystem is not None:
            con.register_filesystem(self.filesystem)
        return self.session(con)

    def session(self, con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
        """Set this config's session settings on ``con`` (a new connection or a cursor of one
        opened by :meth:`open`: cursors share the database, its threads and filesystems, but
        not session settings). Returns ``con``."""
        # Results must not depend on the machine's zone; all bounds are written as UTC instants.
        con.execute(f"SET TimeZone = '{self.timezone}'").fetchall()
        with _LIVE_LOCK:
            _LIVE.add(con)
        return con


def interrupt_all() -> int:
    """Interrupt the query running on every connection and cursor opened through
    :class:`ConnectionConfig` in this process; returns how many were signalled. Safe from any
    thread (the CLI calls it from a signal watcher): DuckDB stops the query at its next check and
    raises ``InterruptException`` in the thread that ran it, so a long operator (a sort, a window,
    a COPY) does not run to its end before a Ctrl-C takes effect. An idle or closed connection is
    not affected: its next query runs normally."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for con in live:
        with contextlib.suppress(duckdb.Error):
            con.interrupt()
    return len(live)


def interruptible(con: duckdb.DuckDBPyConnection, fn: Callable[[], _T]) -> _T:
    """``fn()``, a query on ``con``; on the main thread it runs on a helper thread while the main
    thread waits, so that a Ctrl-C (KeyboardInterrupt, raised in the waiting main thread)
    interrupts ``con`` at once and returns when its query has stopped. DuckDB alone checks for a
    signal only between tasks: a long COPY of a Parquet sink would run on for many seconds."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    outcome: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as e:  # handed to the caller below
            outcome.append((False, e))
        finally:
            done.set()

    # Waits on an Event, not Thread.join: Python 3.11's join, interrupted by a KeyboardInterrupt,
    # marks a thread that is still running as stopped, so a later join returns at once and the
    # process can exit while DuckDB still runs on that thread (which aborts it).
    threading.Thread(target=run, name="duckharness-query", daemon=True).start()
    try:
        while not done.wait(0.1):  # short waits: a signal the OS hands to another thread is seen too
            pass
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.interrupt()
        done.wait()
        raise
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def fetch_all(con: duckdb.DuckDBPyConnection, sql: str, tracer: Callable[[str], None] | None = None) -> list[tuple]:
    """Run ``sql`` and return all rows (DuckDB 2.0 results stream and must be drained); a Ctrl-C
    stops it promptly (:func:`interruptible`)."""
    if tracer is not None:
        tracer(sql)
    return interruptible(con, lambda: con.execute(sql).fetchall())
