"""Sinks: an experiment materialised to Parquet with DuckDB's streaming COPY, atomically.

Output goes to a hidden temporary folder beside the target and is renamed into place only when
every part and ``metadata.json`` are written, so a failure (a transform raising on the third day,
a full disk) leaves nothing behind, and an existing dataset is replaced only when asked to. The
output's ``metadata.json`` is the source's plus where the rows came from, so the output is itself a
valid duckharness source.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb
from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.chain import build_chain
from duckharness.connection import fetch_all
from duckharness.errors import ExecutionError, InputError
from duckharness.metadata import SessionWindow
from duckharness.plan import window_and_day
from duckharness.progress import Progress
from duckharness.sample import days_of_files
from duckharness.source import FileInfo, is_remote

if TYPE_CHECKING:
    from duckharness.harness import Harness


@dataclass
class SinkResult:
    """Where a sink wrote, how many files and rows, and how long each phase took."""

    path: str
    files: list[str]
    rows: int
    timings: dict[str, float] = field(default_factory=dict)


def _copy(
    con: duckdb.DuckDBPyConnection, query: exp.Expr, target: str, tracer: Any, partition: str | None = None
) -> int:
    opts = [exp.CopyParameter(this=exp.var("FORMAT"), expression=exp.var("parquet"))]
    if partition:
        opts.append(exp.CopyParameter(this=exp.var("PARTITION_BY"), expression=exp.paren(sb.column(partition))))
    copy = exp.Copy(this=exp.Subquery(this=query), kind=False, files=[sb.string(target)], params=opts)
    rows = fetch_all(con, sb.render(copy), tracer)
    return int(rows[0][0]) if rows and rows[0] and rows[0][0] is not None else 0


def sink_experiment(
    h: Harness,
    name: str,
    out: str | os.PathLike[str],
    *,
    partition_by: str | None,
    overwrite: bool,
    window: SessionWindow | None,
    progress: bool | None,
) -> SinkResult:
    if partition_by not in (None, "day"):
        raise InputError(f"partition_by must be None or 'day', got {partition_by!r}.")
    if is_remote(os.fspath(out)):
        return _sink_remote(
            h, name, os.fspath(out), partition_by=partition_by, overwrite=overwrite, window=window, progress=progress
        )
    cols = h.experiments.columns(name)
    target = os.path.abspath(os.fspath(out))
    if os.path.exists(target) and not overwrite:
        raise InputError(f"Output {target} already exists. Use overwrite=True (--overwrite) to replace it.")
    if os.path.exists(target) and not os.path.isdir(target):
        raise InputError(f"Output {target} exists and is not a folder.")
    if os.path.exists(target):
        _check_replaceable(h, target)
    tcol = h.dataset.time_column
    if partition_by == "day" and (tcol is None or tcol not in cols):
        raise InputError(f"Cannot partition experiment {name!r} by day: it has no time column {tcol!r}.")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    t0 = time.perf_counter()
    result = SinkResult(target, [], 0)
    try:
        _write_parts(h, name, tmp, partition_by, window, progress, result)
        result.timings["write"] = time.perf_counter() - t0
        _write_metadata(h, name, tmp, window, result)
        _swap_into_place(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, duckdb.Error):
            raise ExecutionError(f"Sink of experiment {name!r} failed: {str(e).strip().splitlines()[0]}") from e
        raise
    result.files = [os.path.join(target, os.path.basename(f)) for f in result.files]
    result.timings["total"] = time.perf_counter() - t0
    return result


def _sink_remote(
    h: Harness,
    name: str,
    url: str,
    *,
    partition_by: str | None,
    overwrite: bool,
    window: SessionWindow | None,
    progress: bool | None,
) -> SinkResult:
    """Sink to object storage: write the parts locally (streaming), upload them under a staging
    prefix beside the target, then move them into place. Until the move nothing is visible at the
    target; a failure removes the staging prefix."""
    import tempfile

    import fsspec

    h.experiments.columns(name)
    fs, remote = fsspec.core.url_to_fs(url, **dict(h.dataset.storage_options))
    remote = remote.rstrip("/")
    if h.dataset.remote:
        src = fs._strip_protocol(h.dataset.root).rstrip("/")
        if posixpath.commonpath([remote, src]) in (remote, src):
            raise InputError(f"Output {url} overlaps the source {h.dataset.root}; choose another prefix.")
    if fs.exists(remote) and fs.ls(remote):
        if not overwrite:
            raise InputError(f"Output {url} already exists. Use overwrite=True (--overwrite) to replace it.")
        try:
            with fs.open(f"{remote}/metadata.json", "rb") as f:
                earlier_sink = "duckharness_sink" in json.loads(f.read())
        except Exception:
            earlier_sink = False
        if not earlier_sink:
            raise InputError(f"Output {url} holds objects that are not an earlier duckharness sink; not replacing it.")
    t0 = time.perf_counter()
    local_root = tempfile.mkdtemp(prefix="duckharness-sink-")
    staging = f"{remote}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        local = sink_experiment(
            h,
            name,
            os.path.join(local_root, "out"),
            partition_by=partition_by,
            overwrite=False,
            window=window,
            progress=progress,
        )
        names = sorted(os.listdir(local.path))
        for f in names:  # metadata.json last: it marks a complete dataset
            if f != "metadata.json":
                fs.put_file(os.path.join(local.path, f), f"{staging}/{f}")
        fs.put_file(os.path.join(local.path, "metadata.json"), f"{staging}/metadata.json")
        if fs.exists(remote):
            fs.rm(remote, recursive=True)
        for f in [*(n for n in names if n != "metadata.json"), "metadata.json"]:
            fs.mv(f"{staging}/{f}", f"{remote}/{f}")
    except BaseException:
        try:
            if fs.exists(staging):
                fs.rm(staging, recursive=True)
        except Exception:  # cleaning up must not hide the real error
            pass
        raise
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
    files = [fs.unstrip_protocol(f"{remote}/{f}") for f in names if f != "metadata.json"]
    return SinkResult(
        fs.unstrip_protocol(remote), files, local.rows, {**local.timings, "total": time.perf_counter() - t0}
    )


def _check_replaceable(h: Harness, target: str) -> None:
    """``overwrite`` replaces an earlier sink or an empty folder, never the source or other data."""
    src = h.dataset.root if not h.dataset.remote else ""
    if src and (os.path.commonpath([target, os.path.abspath(src)]) in (target, os.path.abspath(src))):
        raise InputError(f"Output {target} overlaps the source {src}; choose another folder.")
    entries = os.listdir(target)
    if not entries:
        return
    try:
        with open(os.path.join(target, "metadata.json"), encoding="utf-8") as f:
            earlier_sink = "duckharness_sink" in json.load(f)
    except (OSError, ValueError):
        earlier_sink = False
    if not earlier_sink:
        raise InputError(
            f"Output {target} holds files that are not an earlier duckharness sink; not replacing it. "
            f"Choose a new folder or remove it yourself."
        )


def _write_parts(
    h: Harness,
    name: str,
    tmp: str,
    partition_by: str | None,
    window: SessionWindow | None,
    progress: bool | None,
    result: SinkResult,
) -> None:
    dataset = h.dataset
    batchable = h.experiments.batchable(name)
    tz = window.timezone if window is not None else dataset.metadata.timezone
    rel = exp.Table(this=sb.ident(name))
    if not batchable:
        groups: list[tuple[str, Sequence[FileInfo]]] = [("data", dataset.files)]
    elif partition_by == "day":
        groups = [(d.isoformat(), fs) for d, fs in sorted(days_of_files(dataset.files, tz, window).items())]
    else:
        width = len(str(len(dataset.files)))
        groups = [(f"part-{i:0{width}d}", [f]) for i, f in enumerate(dataset.files)]
    con = dataset.connection(1 if batchable else h.workers).open()
    try:
        with Progress(len(groups), f"sink {name}", enabled=progress) as bar:
            for stem, files in groups:
                sub = dataclasses.replace(dataset, files=list(files))
                build_chain(con, sub, h.experiments, name, files, window, h.tracer, h.batch_size)
                if partition_by == "day" and not batchable:
                    _, day = window_and_day(sub, files, window, need_day=True)
                    query = sb.select([exp.Star(), sb.alias(day, "__dh_day")], rel)
                    result.rows += _copy(con, query, os.path.join(tmp, "_parts"), h.tracer, partition="__dh_day")
                    _flatten_day_partitions(tmp, result)
                elif partition_by == "day":
                    _, day = window_and_day(sub, files, window, need_day=True)
                    query = sb.select([exp.Star()], rel, where=sb.eq(day, sb.date(dt.date.fromisoformat(stem))))
                    path = os.path.join(tmp, f"{stem}.parquet")
                    result.rows += _copy(con, query, path, h.tracer)
                    result.files.append(path)
                else:
                    path = os.path.join(tmp, f"{stem}.parquet")
                    result.rows += _copy(con, sb.select([exp.Star()], rel), path, h.tracer)
                    result.files.append(path)
                bar.advance()
    finally:
        con.close()


def _flatten_day_partitions(tmp: str, result: SinkResult) -> None:
    """``_parts/__dh_day=2026-03-04/data_0.parquet`` -> ``2026-03-04.parquet``."""
    parts = os.path.join(tmp, "_parts")
    for entry in sorted(os.listdir(parts)):
        day = entry.split("=", 1)[1]
        files = sorted(os.listdir(os.path.join(parts, entry)))
        for i, f in enumerate(files):
            dest = os.path.join(tmp, f"{day}.parquet" if len(files) == 1 else f"{day}-{i}.parquet")
            os.replace(os.path.join(parts, entry, f), dest)
            result.files.append(dest)
    shutil.rmtree(parts)


def _write_metadata(h: Harness, name: str, tmp: str, window: SessionWindow | None, result: SinkResult) -> None:
    from duckharness import __version__

    meta = h.dataset.metadata.as_dict()
    used_window = window
    has_time = h.dataset.time_column is not None and h.dataset.time_column in h.experiments.columns(name)
    if not has_time:  # e.g. an aggregate per symbol: no time column, so no window either
        for key in ("start_time", "end_time", "time_column"):
            meta.pop(key, None)
        window = None
    elif window is None:  # rows were not windowed: the output must not be windowed later either
        meta.pop("start_time", None)
        meta.pop("end_time", None)
    else:
        meta["start_time"] = window.start.isoformat() if window.start else None
        meta["end_time"] = window.end.isoformat() if window.end else None
        meta["timezone"] = window.timezone
        meta = {k: v for k, v in meta.items() if v is not None}
    if has_time:
        meta["time_column"] = h.dataset.time_column
    meta["duckharness_sink"] = {
        "source": h.dataset.root,
        "source_files": len(h.dataset.files),
        "experiment": name,
        "chain": h.experiment_sql(name, window=used_window if used_window is not None else False),
        "rows": result.rows,
        "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duckharness_version": __version__,
    }
    with open(os.path.join(tmp, "metadata.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, default=str)


def _swap_into_place(tmp: str, target: str) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first and removed only
    after the new one is in place (restored if the rename fails)."""
    if not os.path.exists(target):
        os.replace(tmp, target)
        return
    old = f"{tmp}.old"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
