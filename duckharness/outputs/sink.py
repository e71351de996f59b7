"""Sinks: an experiment materialised to Parquet with DuckDB's streaming COPY, atomically.

Output goes to a hidden temporary folder beside the target and is renamed into place only when
every part and ``metadata.json`` are written, so a failure (a transform raising on the third day,
a full disk) leaves nothing behind, and an existing dataset is replaced only when asked to. The
output's ``metadata.json`` is the source's plus where the rows came from, so the output is itself a
valid duckharness source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import functools
import json
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb
from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.data.metadata import SessionWindow
from duckharness.data.source import FileInfo, is_remote, open_filesystem
from duckharness.engine.days import files_of
from duckharness.engine.plan import aware_in, day_groups, moves_time, per_row_window, replaces_time, window_and_day
from duckharness.errors import DuckHarnessError, ExecutionError, InputError, warn
from duckharness.execution.connection import fetch_all
from duckharness.execution.executor import brief
from duckharness.execution.progress import Progress
from duckharness.experiments.chain import build_chain
from duckharness.outputs.paths import (
    check_output,
    check_outside_source,
    concerns_output,
    is_exists_error,
    os_errno,
    rename_no_replace,
    replace_folder,
    temporary_name,
    write_error,
)

if TYPE_CHECKING:
    from duckharness.harness import Harness

_T = TypeVar("_T")


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
    target = check_output(out, kind="folder", overwrite=overwrite)
    check_outside_source(h.dataset, target)
    if os.path.exists(target):
        _check_replaceable(h, target)
    tcol = h.dataset.time_column
    if partition_by == "day" and (tcol is None or tcol not in cols):
        why = "the source has no time column" if tcol is None else f"it has no time column {tcol!r}"
        raise InputError(f"Cannot partition experiment {name!r} by day: {why}.")
    tmp = temporary_name(target)
    try:
        os.mkdir(tmp)
    except OSError as e:
        raise write_error(e, target, tmp) from e
    t0 = time.perf_counter()
    result = SinkResult(target, [], 0)
    try:
        _write_parts(h, name, tmp, partition_by, window, progress, result)
        result.timings["write"] = time.perf_counter() - t0
        _write_metadata(h, name, tmp, window, result)
        _move_into_place(h, tmp, target, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and concerns_output(e, target, tmp):
            raise write_error(e, target, tmp) from e
        if isinstance(e, duckdb.Error) and not isinstance(e, duckdb.InterruptException):
            code = os_errno(e)  # writing the output failed (a full disk, ...), not reading the source
            if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or (code is not None and tmp in str(e)):
                raise write_error(e, target, tmp) from e
            text = brief(e).replace(tmp, target)
            raise ExecutionError(f"Sink of experiment {name!r} to {target} failed: {text}") from e
        raise
    result.files = [os.path.join(target, os.path.basename(f)) for f in result.files]
    result.timings["total"] = time.perf_counter() - t0
    return result


INCOMPLETE = "_duckharness_incomplete.json"  # in a remote target while a sink moves into it
_BUCKETED = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}


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
    """Sink to object storage, as safely as a store without atomic renames allows.

    1. The parts are written locally (streaming) and uploaded, ``metadata.json`` last, under a
       staging prefix beside the target (``TARGET.tmp-xxxx/``). A failure up to here removes the
       staging prefix and leaves the target, and an earlier sink in it, untouched.
    2. Only then is the target changed: a marker object ``_duckharness_incomplete.json`` goes in
       first, then the earlier sink's ``metadata.json`` is removed, the new data files are moved
       in, files of the earlier sink that the new one does not have are removed, and the new
       ``metadata.json`` is moved in last (the commit); then the marker is removed. A target is a
       complete sink exactly when it has a sink's ``metadata.json`` and no marker; a reader that
       lists it in between sees no ``metadata.json``.
    3. If a move fails or is interrupted, what was moved in is removed (the earlier sink, already
       taken apart, is lost: there is no rename to undo it). If even that fails (the connection is
       gone, the process is killed), the marker stays, and a later ``overwrite=True`` recognises
       the target as a sink left half-moved and replaces it.

    Without ``overwrite`` the target must be empty both when the sink starts and when the move
    starts; with it, it must then be an earlier sink or a half-moved one. (Two sinks moving into
    one prefix at the same moment are not excluded: object stores offer no lock to do that.)
    """
    import tempfile

    h.experiments.columns(name)
    fs, remote = open_filesystem(url, h.dataset.storage_options)
    remote = remote.rstrip("/")
    url = fs.unstrip_protocol(remote)
    if h.dataset.remote:
        src = fs._strip_protocol(h.dataset.root).rstrip("/")
        if posixpath.commonpath([remote, src]) in (remote, src):
            raise InputError(f"Output {url} overlaps the source {h.dataset.root}; choose another prefix.")
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    bucket = remote.split("/", 1)[0]
    if protocols & _BUCKETED and not _remote_call(url, lambda: fs.exists(bucket)):
        raise InputError(
            f"Cannot write {url}: bucket {bucket!r} does not exist (or these credentials cannot see it). "
            f"Create it first or choose another bucket."
        )
    _check_remote_target(fs, remote, url, overwrite)
    t0 = time.perf_counter()
    local_root = tempfile.mkdtemp(prefix="duckharness-sink-")
    staging = f"{remote}.tmp-{uuid.uuid4().hex[:8]}"
    try:
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
        except InputError as e:
            if local_root not in str(e):
                raise
            raise InputError(
                f"Cannot write {url}: staging its parts locally under {tempfile.gettempdir()} failed: "
                f"{str(e).replace(os.path.join(local_root, 'out'), 'the staging folder')} "
                f"(set TMPDIR to a folder with space)."
            ) from e
        names = sorted(os.listdir(local.path))
        data = [f for f in names if f != "metadata.json"]
        try:
            for f in [*data, "metadata.json"]:  # metadata.json last: it marks a complete upload
                upload = functools.partial(fs.put_file, os.path.join(local.path, f), f"{staging}/{f}")
                _remote_call(url, upload, "uploading")
            _check_remote_target(fs, remote, url, overwrite, again=True)
            _move_remote(fs, staging, remote, url, data)
        except BaseException as e:
            if not _remove_staging(fs, staging) and isinstance(e, DuckHarnessError):
                kind = InputError if isinstance(e, InputError) else ExecutionError
                raise kind(
                    f"{e} Its staging prefix {fs.unstrip_protocol(staging)}/ could not be removed "
                    f"(the store did not answer); delete it when the store is back."
                ) from e
            raise
        _remove_staging(fs, staging)
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
    files = [fs.unstrip_protocol(f"{remote}/{f}") for f in data]
    return SinkResult(url, files, local.rows, {**local.timings, "total": time.perf_counter() - t0})


def _remove_staging(fs: Any, staging: str) -> bool:
    """Remove the staging prefix if it is there; False if that failed (never raises: cleaning up
    must not hide the real error)."""
    try:
        fs.invalidate_cache(staging)
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
    except Exception:
        return False
    return True


def _remote_call(url: str, call: Callable[[], _T], doing: str = "checking the output") -> _T:
    """``call()``, with the store's errors as duckharness errors naming ``url``."""
    try:
        return call()
    except PermissionError as e:
        raise InputError(f"Cannot write {url}: access denied while {doing} ({e}); check the credentials.") from e
    except FileNotFoundError as e:
        raise InputError(f"Cannot write {url}: {e} (while {doing}).") from e
    except OSError as e:
        raise ExecutionError(f"Sink to {url} failed while {doing}: {type(e).__name__}: {e}") from e


def _remote_state(fs: Any, remote: str) -> tuple[str, dict[str, Any]]:
    """'empty', 'sink' (an earlier duckharness sink), 'incomplete' (one left half-moved) or
    'other', with the marker or metadata that says so."""
    fs.invalidate_cache(remote)
    if not fs.exists(remote) or not fs.ls(remote):
        return "empty", {}
    for key, state in ((INCOMPLETE, "incomplete"), ("metadata.json", "sink")):
        try:
            with fs.open(f"{remote}/{key}", "rb") as f:
                found = json.loads(f.read())
        except Exception:  # missing or not JSON: not ours
            continue
        if isinstance(found, dict) and ("duckharness_sink" in found or "duckharness_sink_incomplete" in found):
            return state, found
    return "other", {}


def _check_remote_target(fs: Any, remote: str, url: str, overwrite: bool, again: bool = False) -> None:
    state, found = _remote_call(url, lambda: _remote_state(fs, remote))
    if state == "empty":
        return
    if not overwrite:
        if again:
            raise InputError(
                f"Output {url} appeared while this sink was being written (another sink to the same prefix?); "
                f"not replacing it. Use overwrite=True (--overwrite) to replace it, or choose another prefix."
            )
        extra = " (it holds a sink that was interrupted while moving into place)" if state == "incomplete" else ""
        raise InputError(f"Output {url} already exists{extra}. Use overwrite=True (--overwrite) to replace it.")
    if state == "other":
        raise InputError(f"Output {url} holds objects that are not an earlier duckharness sink; not replacing it.")
    if state == "sink":
        found_keys = _remote_call(url, lambda: fs.find(remote))
        provenance = found.get("duckharness_sink")
        added = sorted(
            posixpath.relpath(k, remote)
            for k in found_keys
            if not _sink_wrote(posixpath.relpath(k, remote), provenance, posixpath.dirname(k) == remote)
        )
        if added:
            raise InputError(
                f"Output {url} is an earlier sink, but it also holds objects a sink does not write "
                f"({', '.join(added[:5])}{', …' if len(added) > 5 else ''}); not replacing it."
            )
    stranded = found.get("duckharness_sink_incomplete", {}).get("staging") if state == "incomplete" else None
    if isinstance(stranded, str) and fs._strip_protocol(stranded).startswith(f"{remote}.tmp-"):
        with contextlib.suppress(Exception):  # the staging prefix of the interrupted sink, if still there
            fs.rm(fs._strip_protocol(stranded), recursive=True)


def _move_remote(fs: Any, staging: str, remote: str, url: str, data: list[str]) -> None:
    """Step 2 and 3 of :func:`_sink_remote`: move the staged sink into ``remote``."""
    marker = json.dumps({"duckharness_sink_incomplete": {"staging": fs.unstrip_protocol(staging), "files": data}})
    earlier = [p for p in _remote_call(url, lambda: fs.find(remote)) if posixpath.basename(p) != INCOMPLETE]
    moved: list[str] = []
    _remote_call(url, lambda: fs.pipe_file(f"{remote}/{INCOMPLETE}", marker.encode()), "marking the target")
    try:
        if f"{remote}/metadata.json" in earlier:
            _remote_call(url, lambda: fs.rm_file(f"{remote}/metadata.json"), "removing the earlier sink")
        for f in data:
            dest = f"{remote}/{f}"
            _remote_call(url, functools.partial(fs.mv, f"{staging}/{f}", dest), "moving the parts into place")
            moved.append(dest)
        stale = sorted(set(earlier) - {f"{remote}/{f}" for f in data} - {f"{remote}/metadata.json"})
        if stale:
            _remote_call(url, lambda: fs.rm(stale), "removing the earlier sink")
        _remote_call(url, lambda: fs.mv(f"{staging}/metadata.json", f"{remote}/metadata.json"), "committing")
    except BaseException as e:
        try:  # what was moved in goes; the marker last, so a target left behind is known as ours
            if moved:
                fs.rm(moved)
            fs.rm_file(f"{remote}/{INCOMPLETE}")
        except Exception:
            if isinstance(e, DuckHarnessError):
                kind = InputError if isinstance(e, InputError) else ExecutionError
                raise kind(
                    f"{e} The output is left incomplete (marked by {INCOMPLETE}); run the sink again with "
                    f"overwrite=True (--overwrite) to replace it."
                ) from e
        raise
    _remote_call(url, lambda: fs.rm_file(f"{remote}/{INCOMPLETE}"), "removing the marker")
    fs.invalidate_cache(remote)


def _check_replaceable(h: Harness, target: str) -> None:
    """``overwrite`` replaces an earlier sink holding only its own files, or an empty folder,
    never other data (nor the source: :func:`check_outside_source`, checked up front)."""
    entries = os.listdir(target)
    if not entries:
        return
    try:
        with open(os.path.join(target, "metadata.json"), encoding="utf-8") as f:
            provenance = json.load(f).get("duckharness_sink")
        earlier_sink = isinstance(provenance, dict)
    except (OSError, ValueError, AttributeError):
        earlier_sink, provenance = False, None
    if not earlier_sink:
        raise InputError(
            f"Output {target} holds files that are not an earlier duckharness sink; not replacing it. "
            f"Choose a new folder or remove it yourself."
        )
    added = sorted(e for e in entries if not _sink_wrote(e, provenance, os.path.isfile(os.path.join(target, e))))
    if added:
        raise InputError(
            f"Output {target} is an earlier sink, but it also holds files a sink does not write "
            f"({', '.join(added[:5])}{', …' if len(added) > 5 else ''}); not replacing it. Move them away "
            f"or choose a new folder."
        )


_SINK_FILE = re.compile(r"(part-\d+|\d{4}-\d{2}-\d{2}|data)\.parquet")


def _sink_wrote(name: str, provenance: Any, is_file: bool) -> bool:
    """Whether ``name`` in an earlier sink folder is one of its own files: listed in its
    metadata.json (or, for a sink written before that list, named as sinks name their files)."""
    if name == "metadata.json":
        return True
    if not is_file:
        return False
    listed = provenance.get("files") if isinstance(provenance, dict) else None
    if isinstance(listed, list):
        return name in listed
    return bool(_SINK_FILE.fullmatch(name))


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
    # Days of an experiment's own times (see moves_time) are known only once its rows are made:
    # one whose rows land on other days than their files' (replaces_time) is written in one pass
    # over all files, partitioned by each row's day, like one that needs all rows at once.
    by_rows = partition_by == "day" and moves_time(dataset, h.experiments, name)
    batchable = h.experiments.batchable(name) and not (by_rows and replaces_time(dataset, h.experiments, name))
    rel = exp.Table(this=sb.ident(name))
    rows_aware = aware_in(dataset, h.experiments.columns(name))  # the experiment's own time type
    if not batchable:
        groups: list[tuple[str, Sequence[FileInfo]]] = [("data", dataset.files)]
    elif partition_by == "day" and not by_rows:
        index = h._day_index(window)  # the days that hold rows, and the files holding each
        groups = [(d.isoformat(), files_of(dataset, index.held[d])) for d in index.days]
    else:
        # A per-batch Python step sees whole days: files sharing a day go in one part, and each
        # part is written once (by its rows' own days when partitioned by day: a day per group of
        # files would write a file of several days once per day it holds).
        batches = day_groups(dataset, window) if h.experiments.has_python(name) else [[f] for f in dataset.files]
        width = len(str(len(batches)))
        groups = [(f"part-{i:0{width}d}", g) for i, g in enumerate(batches)]
    con = dataset.connection(1 if batchable else h.workers).open()
    try:
        with Progress(len(groups), f"sink {name}", enabled=progress) as bar:
            for stem, files in groups:
                sub = dataclasses.replace(dataset, files=list(files))
                build_chain(con, sub, h.experiments, name, files, window, h.tracer, h.batch_size)
                if partition_by == "day" and (by_rows or not batchable):
                    # Each row goes to its own day's file (a batch's rows may land on another
                    # batch's day: a Python step that moves times); the days are joined at the end.
                    _, day = window_and_day(
                        sub, files, window, need_day=True, day_per_row=by_rows, rows_aware=rows_aware
                    )
                    query = sb.select([exp.Star(), sb.alias(day, "__dh_day")], rel)
                    parts = os.path.join(tmp, "_parts", stem)
                    os.makedirs(os.path.dirname(parts), exist_ok=True)
                    result.rows += _copy(con, query, parts, h.tracer, partition="__dh_day")
                elif partition_by == "day":
                    _, day = window_and_day(sub, files, window, need_day=True)
                    query = sb.select([exp.Star()], rel, where=sb.eq(day, sb.date(dt.date.fromisoformat(stem))))
                    _keep_if_rows(os.path.join(tmp, f"{stem}.parquet"), con, query, h.tracer, result)
                else:
                    _keep_if_rows(
                        os.path.join(tmp, f"{stem}.parquet"), con, sb.select([exp.Star()], rel), h.tracer, result
                    )
                bar.advance()
        if result.rows == 0:  # the experiment kept no row: one empty file keeps its columns
            path = os.path.join(tmp, "data.parquet")
            _copy(con, sb.select([exp.Star()], rel).limit(0), path, h.tracer)
            result.files.append(path)
    finally:
        con.close()
    if os.path.isdir(os.path.join(tmp, "_parts")):
        _flatten_day_partitions(tmp, result)


def _keep_if_rows(path: str, con: duckdb.DuckDBPyConnection, query: exp.Expr, tracer: Any, result: SinkResult) -> None:
    """Write one group's file; a group whose rows the experiment dropped (a filter that keeps
    nothing of a day) leaves no file."""
    rows = _copy(con, query, path, tracer)
    if rows:
        result.files.append(path)
        result.rows += rows
    else:
        os.remove(path)


def _flatten_day_partitions(tmp: str, result: SinkResult) -> None:
    """``_parts/GROUP/__dh_day=2026-03-04/data_0.parquet`` -> ``2026-03-04.parquet`` (or
    ``2026-03-04-0.parquet``, ``-1``, ... when several groups or files hold rows of that day)."""
    parts = os.path.join(tmp, "_parts")
    by_day: dict[str, list[str]] = {}
    for group in sorted(os.listdir(parts)):
        for entry in sorted(os.listdir(os.path.join(parts, group))):
            folder = os.path.join(parts, group, entry)
            by_day.setdefault(entry.split("=", 1)[1], []).extend(
                os.path.join(folder, f) for f in sorted(os.listdir(folder))
            )
    for day, files in sorted(by_day.items()):
        for i, f in enumerate(files):
            dest = os.path.join(tmp, f"{day}.parquet" if len(files) == 1 else f"{day}-{i}.parquet")
            os.replace(f, dest)
            result.files.append(dest)
    shutil.rmtree(parts)


def _write_metadata(h: Harness, name: str, tmp: str, window: SessionWindow | None, result: SinkResult) -> None:
    from duckharness import __version__

    meta = h.dataset.metadata.as_dict()
    used_window, moved_out = window, False
    has_time = h.dataset.time_column is not None and h.dataset.time_column in h.experiments.columns(name)
    if not has_time:  # e.g. an aggregate per symbol: no time column, so no window either
        for key in ("start_time", "end_time", "time_column"):
            meta.pop(key, None)
        window = None
    elif window is None:  # rows were not windowed: the output must not be windowed later either
        meta.pop("start_time", None)
        meta.pop("end_time", None)
    elif (outside := _rows_outside_window(h, name, result, window)) > 0:
        # The window picked the source rows, and the experiment moved some of them out of it
        # (`ts + INTERVAL 30 MINUTE`): a window in the output's metadata would drop them when
        # it is read back, so the output has none and says which one picked its rows.
        meta.pop("start_time", None)
        meta.pop("end_time", None)
        meta["timezone"] = window.timezone
        moved_out = True
        warn(
            f"Experiment {name!r} moved {outside:,} of the {result.rows:,} rows it sank outside the session window "
            f"({window.describe()}); the output's metadata.json has no session window, so they are kept when it "
            f"is read back."
        )
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
        **({"rows_picked_by_window": window.describe()} if moved_out and window is not None else {}),
        "files": sorted(os.path.basename(f) for f in result.files),  # what --overwrite may replace
        "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duckharness_version": __version__,
    }
    with open(os.path.join(tmp, "metadata.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, default=str)


def _rows_outside_window(h: Harness, name: str, result: SinkResult, window: SessionWindow) -> int:
    """How many written rows of an experiment that may move times (see ``moves_time``) fall
    outside ``window`` (or have no time): one pass over the output's time column. Rows of any
    other experiment are the window's own rows, so 0 without reading anything."""
    tcol = h.dataset.time_column
    if tcol is None or not result.files or not moves_time(h.dataset, h.experiments, name):
        return 0
    import pyarrow.parquet as pq

    field = pq.read_schema(result.files[0]).field(tcol)
    aware = getattr(field.type, "tz", None) is not None
    where, _ = per_row_window(sb.column(tcol), aware, window.timezone, window)
    if where is None:
        return 0
    query = sb.select(
        [exp.Count(this=exp.Star())],
        sb.read_parquet(result.files),
        where=exp.Not(this=exp.Paren(this=exp.Is(this=where, expression=exp.true()))),
    )
    with duckdb.connect(config={"threads": 1}) as con:
        row = con.execute(sb.render(query)).fetchone()
    return int(row[0]) if row else 0


def _move_into_place(h: Harness, tmp: str, target: str, overwrite: bool) -> None:
    """Rename the finished ``tmp`` folder to ``target``, never over something that appeared
    meanwhile (another sink to the same folder): without ``overwrite`` that is an error; with it,
    what is there now must still be an earlier sink (or empty), and it is moved aside first and
    removed only once the new folder is in place (put back if that rename fails)."""
    for _ in range(3):
        try:
            rename_no_replace(tmp, target)
            return
        except OSError as e:
            if not is_exists_error(e):
                raise
        if not overwrite:
            raise InputError(
                f"Output {target} appeared while this sink was being written (another sink to the same "
                f"folder?); not replacing it. Use overwrite=True (--overwrite) to replace it, or choose another folder."
            )
        if not os.path.isdir(target):
            raise InputError(f"Output {target} exists and is not a folder; choose another path.")
        _check_replaceable(h, target)
        if replace_folder(tmp, target):
            return
        # removed meanwhile: try again
    raise InputError(f"Output {target} kept changing while this sink moved into place; not replacing it.")
