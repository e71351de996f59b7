"""Export: the experiment chain as a SQL script and a DuckDB database file for the DuckDB CLI.

Both hold ``baseline`` (the source with its session window, absolute paths) and every SQL
experiment as views, one ``dh_<metric>(pred, target)`` macro per metric (an aggregate, so
``SELECT dh_r2(pred_10s, target_10s) FROM liquid`` is the pooled R² and adding
``GROUP BY dh_day(ts)`` gives it per day), and a ``duckharness_export`` view recording versions
and the chain's hash. Credentials are never written. The same chain exports to byte-identical
files: the script has no timestamps, and the database file's random identifier is replaced by
one derived from the chain's hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import duckdb
from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.data.metadata import SessionWindow
from duckharness.engine.plan import per_row_window
from duckharness.engine.run import baseline_query
from duckharness.errors import InputError
from duckharness.execution.connection import ConnectionConfig
from duckharness.experiments.steps import BASELINE
from duckharness.metrics.library import Metric
from duckharness.outputs.paths import check_output, check_outside_source, write_error, written_atomically

if TYPE_CHECKING:
    from duckharness.harness import Harness

# The DuckDB CLI current on PyPI (duckdb-cli 1.5) reads this storage version; 2.0's default it cannot.
STORAGE_VERSION = "v1.5.0"
MACRO_PREFIX = "dh_"


@dataclass
class ExportResult:
    """What an export wrote: the files, the views and macros in them, and what was left out."""

    sql_path: str | None
    db_path: str | None
    views: list[str]
    macros: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    chain_hash: str = ""


def metric_macro(metric: Metric) -> exp.Expr:
    """``CREATE OR REPLACE MACRO dh_<name>(pred, target) AS <final over single-pass stats>``.

    Each stat becomes its aggregate over rows where pred and target are finite (the engine's
    rule); ``pred_c``/``target_c`` use a shift of 0, which gives the same value in exact
    arithmetic (the engine's shift only adds precision for columns with a large mean).
    """
    # In DOUBLE, as the engine computes: integers would overflow, FLOAT would round to single.
    pred, target = sb.cast(sb.column("pred"), "DOUBLE"), sb.cast(sb.column("target"), "DOUBLE")
    roles = {"pred": pred, "target": target, "pred_c": pred, "target_c": target}
    valid = exp.and_(
        sb.func("isfinite", sb.cast(sb.column("pred"), "DOUBLE")),
        sb.func("isfinite", sb.cast(sb.column("target"), "DOUBLE")),
    )
    stats = {
        name: exp.paren(exp.Filter(this=sb.substitute_columns(agg, roles), expression=exp.Where(this=valid.copy())))
        for name, agg in metric.stats
    }
    body = sb.substitute_columns(metric.final, stats)
    return sb.create_macro(MACRO_PREFIX + metric.name, ["pred", "target"], body)


def day_macro(timezone: str, aware: bool, window: SessionWindow | None) -> exp.Expr:
    """``dh_day(ts)``: the day label the engine gives a row, i.e. its local date in the data's time
    zone (naive times are UTC), or for an overnight session the date the session started."""
    _, day = per_row_window(sb.column("ts"), aware, timezone, window)
    return sb.create_macro(MACRO_PREFIX + "day", ["ts"], day)


# Types the DuckDB 1.5 CLI cannot read from a database file (a view's column of one makes the whole
# file fail to open: "unrecognized enum value ... for enum LogicalTypeId"), and what it reads instead.
OLDER_CLI_TYPES = {"TIMESTAMP_NS WITH TIME ZONE": "TIMESTAMPTZ", "TIMESTAMPTZ_NS": "TIMESTAMPTZ"}


def older_cli_casts(h: Harness) -> dict[str, str]:
    """The source's columns the database file stores in another type, with that type."""
    return {c: OLDER_CLI_TYPES[t.upper()] for c, t in h.dataset.columns.items() if t.upper() in OLDER_CLI_TYPES}


def build_statements(
    h: Harness, window: SessionWindow | None, materialized: Mapping[str, str], *, for_database: bool = False
) -> tuple[list[tuple[str, exp.Expr]], dict[str, str]]:
    """(name, CREATE statement) for every view and macro, and experiments left out with why.

    ``for_database``: ``baseline`` reads the columns of :func:`older_cli_casts` in the type the
    DuckDB 1.5 CLI can open (nanosecond times with a zone as microseconds)."""
    base: exp.Expr = baseline_query(h.dataset, window)
    casts = older_cli_casts(h) if for_database else {}
    if casts:
        star = exp.Star(replace=[sb.alias(sb.cast(sb.column(c), t), c) for c, t in casts.items()])
        base = sb.select([star], exp.Subquery(this=base, alias=exp.TableAlias(this=sb.ident("source"))))
    out: list[tuple[str, exp.Expr]] = [(BASELINE, sb.create_view(BASELINE, base))]
    skipped: dict[str, str] = {}
    for name in h.experiments.names[1:]:
        step = h.experiments.step(name)
        if name in materialized:
            src = sb.select([exp.Star()], sb.read_parquet([os.path.join(materialized[name], "*.parquet")]))
            out.append((name, sb.create_view(name, src)))
            continue
        if step.is_python:
            skipped[name] = f"Python step {step.sql} cannot be a SQL view (export with materialize=DIR to write it)"
            continue
        missing = [d for d in step.depends if d != BASELINE and d not in {n for n, _ in out}]
        if missing:
            skipped[name] = f"depends on {', '.join(missing)}, which was left out"
            continue
        assert step.query is not None
        out.append((name, sb.create_view(name, step.query)))
    tz = window.timezone if window is not None else h.dataset.metadata.timezone
    if h.dataset.time_column is not None:
        out.append((MACRO_PREFIX + "day", day_macro(tz, h.dataset.time_is_aware, window)))
    for m in sorted((h.metric_library.get(n) for n in h.metric_library.names), key=lambda m: m.name):
        out.append((MACRO_PREFIX + m.name, metric_macro(m)))
    return out, skipped


def export(
    h: Harness,
    sql_path: str | os.PathLike[str] | None,
    db_path: str | os.PathLike[str] | None,
    *,
    window: SessionWindow | None,
    materialize: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write the script and/or the database (see :meth:`Harness.export`).

    Every output path is checked before anything is written (its folder exists, it is not a
    folder, an existing file is replaced only with ``overwrite``); both files are written under
    temporary names and moved into place only once both are complete. ``materialize=DIR`` (created
    if missing; its parent must exist) gets one sink folder per Python step, replacing an earlier
    one only with ``overwrite``.
    """
    from duckharness import __version__

    if sql_path is None and db_path is None:
        raise InputError("Nothing to export: give a SQL script path, a database path, or both.")
    sql_target = check_output(sql_path, kind="file", overwrite=overwrite) if sql_path is not None else None
    db_target = check_output(db_path, kind="file", overwrite=overwrite) if db_path is not None else None
    if sql_target is not None and sql_target == db_target:
        raise InputError(f"The SQL script and the database must be different files, got {sql_target} for both.")
    materialized: dict[str, str] = {}
    if materialize is not None:
        root = check_output(materialize, kind="folder", overwrite=True)
        check_outside_source(h.dataset, root, "The folder of materialized steps")
        python_steps = [n for n in h.experiments.names[1:] if h.experiments.step(n).is_python]
        for name in python_steps if os.path.isdir(root) else []:
            check_output(os.path.join(root, name), kind="folder", overwrite=overwrite)
        if python_steps and not os.path.isdir(root):
            try:
                os.mkdir(root)
            except OSError as e:
                raise write_error(e, root) from e
        for name in python_steps:
            folder = os.path.join(root, name)
            h.sink(name, folder, overwrite=overwrite, window=window if window is not None else False)
            materialized[name] = folder
    statements, skipped = build_statements(h, window, materialized)
    rendered = [sb.render(s) for _, s in statements]
    chain_hash = hashlib.sha256("\n".join(rendered).encode()).hexdigest()
    info = {
        "duckharness_version": __version__,
        "duckdb_version": duckdb.__version__,
        "chain_sha256": chain_hash,
        "source": h.dataset.root,
        "timezone": window.timezone if window is not None else h.dataset.metadata.timezone,
        "session_window": window.describe() if window is not None else "none",
    }
    info_view = sb.create_view(
        "duckharness_export",
        sb.select([exp.Star()], sb.values_table([(k, str(v)) for k, v in info.items()], "t", ["key", "value"])),
    )
    views = [n for n, _ in statements if not n.startswith(MACRO_PREFIX) or n in h.experiments.names]
    macros = [n for n, _ in statements if n not in views]
    result = ExportResult(sql_target, db_target, views, macros, skipped, chain_hash)
    statements_out = [*rendered, sb.render(info_view)]
    casts = older_cli_casts(h) if db_target is not None else {}
    if casts:
        db_statements, _ = build_statements(h, window, materialized, for_database=True)
        db_info = info | {
            "database_types": ", ".join(
                f"{c} read as {t} (the DuckDB 1.5 CLI has no nanosecond TIMESTAMPTZ)" for c, t in casts.items()
            )
        }
        db_info_view = sb.create_view(
            "duckharness_export",
            sb.select([exp.Star()], sb.values_table([(k, str(v)) for k, v in db_info.items()], "t", ["key", "value"])),
        )
        db_out = [*(sb.render(s) for _, s in db_statements), sb.render(db_info_view)]
    else:
        db_out = statements_out
    # Both files are written under temporary names first; they are moved into place together at
    # the end of the block, so a failure in either leaves neither written.
    with contextlib.ExitStack() as stack:
        if sql_target is not None:
            tmp = stack.enter_context(written_atomically(sql_target, overwrite=overwrite))
            _write_script(tmp, h, info, skipped, statements_out)
        if db_target is not None:
            tmp = stack.enter_context(written_atomically(db_target, overwrite=overwrite))
            try:
                _write_database(tmp, db_out, chain_hash, h.dataset.connection(1))
            except duckdb.IOException as e:
                if tmp not in str(e):
                    raise
                raise write_error(e, db_target, tmp) from e
    return result


def _write_script(
    path: str, h: Harness, info: Mapping[str, str], skipped: Mapping[str, str], statements: list[str]
) -> None:
    lines = [
        "-- duckharness export: open with  duckdb -init THIS_FILE.sql",
        *(f"-- {k}: {v}" for k, v in info.items()),
        "--",
        "-- Views: baseline (the source inside its session window) and each SQL experiment.",
        "-- Metrics: dh_<metric>(pred, target) aggregates, e.g.",
        "--   SELECT dh_r2(pred_10s, target_10s) AS r2 FROM baseline;",
        "--   SELECT dh_day(ts) AS day, dh_corr(pred_10s, target_10s) AS ic FROM baseline GROUP BY day ORDER BY day;",
    ]
    if h.dataset.storage_options:
        lines += [
            "--",
            "-- This source is remote and needs credentials, which are not written here. The views are bound",
            "-- when this script runs, so create the secret first and then read the script (not -init):",
            "--   duckdb -cmd \"CREATE SECRET (TYPE s3, KEY_ID '...', SECRET '...', REGION '...');\" \\",
            '--          -cmd ".read THIS_FILE.sql"',
            "-- For an S3-compatible store other than AWS add ENDPOINT 'host:port', URL_STYLE 'path' and",
            "-- USE_SSL false as needed. The CLI reads s3:// through its httpfs extension (INSTALL httpfs",
            "-- once; it needs internet access).",
        ]
    for name, why in skipped.items():
        lines.append(f"-- Left out: {name}: {why}")
    lines += ["", "SET TimeZone = 'UTC';", ""]
    lines += [s + ";" for s in statements]
    text = "\n".join(lines) + "\n"
    with open(path, "wb") as f:
        f.write(text.encode("utf-8"))


def _write_database(path: str, statements: list[str], chain_hash: str, config: ConnectionConfig) -> None:
    """A new database file at ``path`` (a temporary name: the caller moves it into place)."""
    con = config.open()  # no extension downloads; the source's filesystem registered for remote views
    try:
        con.execute(sb.render(sb.attach(path, "dh_export", STORAGE_VERSION))).fetchall()
        con.execute("USE dh_export").fetchall()
        for s in statements:
            con.execute(s).fetchall()
        con.execute("CHECKPOINT").fetchall()
        con.execute("USE memory").fetchall()
        con.execute("DETACH dh_export").fetchall()
    finally:
        con.close()
    _pin_database_identifier(path, hashlib.sha256(chain_hash.encode()).digest()[:16])


# DuckDB's main header: an 8-byte checksum, then the header; a random 16-byte database identifier
# sits at bytes 124..140. The checksum is 5381 XOR-ed with each 8-byte word times a constant.
_HEADER_SIZE, _ID_AT, _ID_LEN = 4096, 124, 16
_CHECKSUM_MUL = 0xBF58476D1CE4E5B9


def _checksum(buf: bytes) -> int:
    out = 5381
    for (word,) in struct.iter_unpack("<Q", buf):
        out ^= (word * _CHECKSUM_MUL) & 0xFFFFFFFFFFFFFFFF
    return out


def _pin_database_identifier(path: str, identifier: bytes) -> None:
    """Replace the file's random identifier with ``identifier`` so equal exports are equal bytes.
    Checks the checksum first and leaves the file alone if its layout is not the expected one."""
    with open(path, "r+b") as f:
        header = bytearray(f.read(_HEADER_SIZE))
        if len(header) < _HEADER_SIZE or struct.unpack("<Q", header[:8])[0] != _checksum(bytes(header[8:])):
            return
        header[_ID_AT : _ID_AT + _ID_LEN] = identifier
        header[:8] = struct.pack("<Q", _checksum(bytes(header[8:])))
        f.seek(0)
        f.write(header)
