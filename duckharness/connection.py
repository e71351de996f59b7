"""The one factory for DuckDB connections, so every worker is configured the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import duckdb


@dataclass(frozen=True)
class ConnectionConfig:
    """How each DuckDB connection is set up: threads, memory, time zone, tracer."""

    threads: int | None = None
    memory_limit: str | None = None
    timezone: str = "UTC"

    def open(self, tracer: Callable[[str], None] | None = None) -> duckdb.DuckDBPyConnection:
        config: dict[str, str | bool | int | float | list[str]] = {}
        if self.threads:
            config["threads"] = self.threads
        if self.memory_limit:
            config["memory_limit"] = self.memory_limit
        # Never fetch extensions at run time: CI and many clusters have no internet.
        config["autoinstall_known_extensions"] = False
        con = duckdb.connect(":memory:", config=config)
        # Results must not depend on the machine's zone; all bounds are written as UTC instants.
        con.execute(f"SET TimeZone = '{self.timezone}'").fetchall()
        return con


def fetch_all(con: duckdb.DuckDBPyConnection, sql: str, tracer: Callable[[str], None] | None = None) -> list[tuple]:
    """Run ``sql`` and return all rows (DuckDB 2.0 results stream and must be drained)."""
    if tracer is not None:
        tracer(sql)
    return con.execute(sql).fetchall()
