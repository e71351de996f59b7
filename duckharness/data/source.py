"""Sources: which Parquet files, their schemas and time ranges, and the metadata beside them.

A source is a directory, a glob, a list of files, or (through fsspec) a URL. Listing happens once;
each file's schema, row count and time-column range come from the Parquet footers in one DuckDB
query, so later steps (per-day window bounds, schema drift, batching) need no more I/O.
"""

from __future__ import annotations

import copy
import datetime as dt
import glob as globlib
import hashlib
import os
import posixpath
import zoneinfo
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.data.metadata import Metadata, parse_metadata, parse_metadata_text
from duckharness.errors import MetadataError, SourceError, warn
from duckharness.execution.connection import ConnectionConfig, fetch_all
from duckharness.execution.executor import brief

# Time columns that hold instants (DuckDB reads Parquet timestamps adjusted to UTC as these);
# every other TIMESTAMP* type holds wall-clock times, read as UTC.
AWARE_TIMESTAMP_TYPES = ("TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ", "TIMESTAMPTZ_NS", "TIMESTAMP_NS WITH TIME ZONE")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class FileInfo:
    """One Parquet file: its path, identity (size, mtime) and what its footer says."""

    path: str
    size: int
    mtime: float
    rows: int
    columns: Mapping[str, str]
    time_min: dt.datetime | None = None
    time_max: dt.datetime | None = None
    # (min, max) of the time column in each row group, in file order; empty when any row group
    # has no statistics. Each is a row's time, so they show days the file holds without a read.
    time_groups: tuple[tuple[dt.datetime, dt.datetime], ...] = ()
    null_free: frozenset[str] = frozenset()  # columns whose footer statistics count no NULLs
    row_groups: tuple[int, ...] = ()  # rows of each row group, in file order (empty when unknown)
    # A digest of the footer's column chunks (sizes, statistics, null counts), part of the file's
    # identity in the cache: a rewrite that keeps the size and the mtime (cp -p, rsync -t) but not
    # the values still changes it.
    footer: str = ""
    # For a local file, its inode and status-change time (ctime, nanoseconds): any write, rename
    # into place or ``touch``/``utime`` sets the ctime to now, and nothing a user runs sets it
    # back, so a rewrite that restores the size, the mtime and even the footer is still seen.
    # Empty for remote objects (their ETag stamp is ``mtime``).
    change: str = ""


@dataclass
class Dataset:
    """The resolved source: files, the union of their schemas, metadata, time column."""

    files: list[FileInfo]
    columns: dict[str, str]
    metadata: Metadata
    time_column: str | None
    root: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    filesystem: Any = field(default=None, repr=False)
    # Whether the source is a folder or a glob, so that listing it again may find files added
    # under ``root`` (a list of files, or one file, is those files only).
    listed: bool = False

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    @property
    def remote(self) -> bool:
        return self.filesystem is not None

    def connection(self, threads: int | None = 1) -> ConnectionConfig:
        """The connection settings every reader of this dataset uses (remote filesystem included)."""
        return ConnectionConfig(threads=threads, filesystem=self.filesystem)

    @property
    def time_is_aware(self) -> bool:
        return self.time_column is not None and self.columns[self.time_column] in AWARE_TIMESTAMP_TYPES


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in _GLOB_CHARS)


def _glob_root(pattern: str) -> str:
    parts = pattern.split("/")
    keep = []
    for part in parts:
        if _has_glob(part):
            break
        keep.append(part)
    return "/".join(keep) or "."


def list_local(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, warn_nested: bool = True
) -> tuple[list[str], str]:
    """Resolve a local source to sorted absolute Parquet paths and the folder of its metadata
    (``warn_nested``: warn about Parquet files in subfolders of a folder that has files of its
    own; off when a run lists a source again that was listed, and warned about, when opened).

    Example:
        >>> list_local("/nonexistent/*.parquet")
        Traceback (most recent call last):
        ...
        duckharness.errors.SourceError: No Parquet files match /nonexistent/*.parquet.
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise SourceError("The source is an empty list of files.")
        paths = [os.path.abspath(os.fspath(p)) for p in source]
        for p in paths:
            if not os.path.isfile(p):
                raise SourceError(f"Source file {p} does not exist.", path=p)
        roots = {os.path.dirname(p) for p in paths}
        root = os.path.commonpath(list(roots))
        return sorted(dict.fromkeys(paths)), root
    text = os.fspath(source)  # type: ignore[arg-type]
    if _has_glob(text):
        pattern = os.path.abspath(text)
        paths = sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
        root = _glob_root(pattern)
        if not paths:
            raise SourceError(f"No Parquet files match {text}.", path=text)
        return paths, root
    path = os.path.abspath(text)
    if os.path.isdir(path):
        paths = sorted(globlib.glob(os.path.join(globlib.escape(path), "*.parquet")))
        nested = sorted(globlib.glob(os.path.join(globlib.escape(path), "*", "**", "*.parquet"), recursive=True))
        if not paths:
            paths = nested
        elif nested and warn_nested:
            warn(
                f"{path} has Parquet files of its own, so its subfolders are not read ({len(nested)} Parquet "
                f"file(s) there, e.g. {os.path.relpath(nested[0], path)}); give a glob such as "
                f"'{os.path.join(path, '**', '*.parquet')}' to read them all."
            )
        if not paths:
            raise SourceError(f"No Parquet files in directory {path}.", path=path)
        return paths, path
    if os.path.isfile(path):
        return [path], os.path.dirname(path)
    raise SourceError(f"Source {text} does not exist (not a file, a directory or a glob that matches).", path=text)


def load_metadata(root: str, metadata: Mapping[str, Any] | str | os.PathLike[str] | None) -> Metadata:
    """Metadata from a mapping, an explicit file, or ``metadata.json`` in ``root``."""
    if isinstance(metadata, Mapping):
        return parse_metadata(dict(metadata), path=None)
    path = os.fspath(metadata) if metadata is not None else posixpath.join(root, "metadata.json")
    if not os.path.isfile(path):
        raise MetadataError(
            f"Metadata file {path} not found. Put a metadata.json beside the data "
            f"(it may be just {{}}), or give another file (metadata=PATH in Python, --metadata FILE "
            f"on the command line).",
            path=path,
        )
    with open(path, "rb") as f:
        return parse_metadata_text(f.read(), path=path)


def _top_level_columns(rows: list[tuple[str, int | None, str | None]]) -> dict[str, str]:
    """Top-level (name -> DuckDB type) from ``parquet_schema`` rows of one file, in order.

    Rows are the flattened schema tree in depth-first order; nested fields are skipped over.
    """
    out: dict[str, str] = {}
    it = iter(rows[1:])  # rows[0] is the root

    def skip(n: int) -> None:
        for _ in range(n):
            _, children, _ = next(it)
            skip(children or 0)

    for name, children, dtype in it:
        out[name] = dtype or "UNKNOWN"
        skip(children or 0)
    return out


def read_footers(
    paths: list[str], *, con: duckdb.DuckDBPyConnection, tracer: Callable[[str], None] | None = None
) -> dict[str, tuple[int, dict[str, str]]]:
    """Row count and top-level schema of every file, from their footers, in one query each."""
    try:
        schema_rows = fetch_all(
            con,
            sb.render(
                sb.select(
                    [sb.column(c) for c in ("file_name", "name", "num_children", "duckdb_type")],
                    sb.table_function("parquet_schema", paths),
                )
            ),
            tracer,
        )
        count_rows = fetch_all(
            con,
            sb.render(
                sb.select(
                    [sb.column("file_name"), sb.column("num_rows")], sb.table_function("parquet_file_metadata", paths)
                )
            ),
            tracer,
        )
    except duckdb.Error:
        # Find the culprit so the error names it.
        for p in paths:
            try:
                fetch_all(
                    con, sb.render(sb.select([sb.column("num_rows")], sb.table_function("parquet_file_metadata", [p])))
                )
            except duckdb.Error as e:
                raise SourceError(f"Cannot read Parquet file {p}: {brief(e)}", path=p) from None
        raise
    by_file: dict[str, list[tuple[str, int | None, str | None]]] = {}
    for fname, name, children, dtype in schema_rows:
        by_file.setdefault(fname, []).append((name, children, dtype))
    counts = dict(count_rows)
    return {p: (int(counts[p]), _top_level_columns(by_file[p])) for p in paths}


def read_row_groups(
    paths: list[str], *, con: duckdb.DuckDBPyConnection, tracer: Callable[[str], None] | None = None
) -> tuple[dict[str, frozenset[str]], dict[str, tuple[int, ...]], dict[str, str]]:
    """Per file, from its row-group metadata: the columns that statistics say hold no NULL (none
    when unknown), the rows of each row group in file order, and a digest of every column chunk's
    compressed size, statistics and null count (see :attr:`FileInfo.footer`)."""
    null_count = sb.column("stats_null_count")
    chunk = sb.func(
        "concat_ws",
        sb.string("|"),
        *(
            sb.column(c)
            for c in ("row_group_id", "total_compressed_size", "stats_min_value", "stats_max_value", "stats_null_count")
        ),
    )
    sql = sb.render(
        sb.select(
            [
                sb.column("file_name"),
                sb.column("path_in_schema"),
                sb.alias(
                    exp.and_(
                        sb.func("bool_and", exp.Not(this=sb.is_null(null_count.copy()))),
                        sb.eq(sb.func("sum", null_count.copy()), exp.Literal.number(0)),
                    ),
                    "none",
                ),
                sb.alias(
                    exp.WithinGroup(
                        this=sb.func("list", sb.column("row_group_num_rows")),
                        expression=exp.Order(expressions=[exp.Ordered(this=sb.column("row_group_id"))]),
                    ),
                    "groups",
                ),
                sb.alias(
                    sb.func(
                        "md5",
                        exp.WithinGroup(
                            this=sb.func("string_agg", chunk, sb.string(";")),
                            expression=exp.Order(expressions=[exp.Ordered(this=sb.column("row_group_id"))]),
                        ),
                    ),
                    "chunks",
                ),
            ],
            sb.table_function("parquet_metadata", paths),
            group_by_all=True,
        )
    )
    out: dict[str, set[str]] = {p: set() for p in paths}
    groups: dict[str, tuple[int, ...]] = {}
    chunks: dict[str, list[tuple[str, str]]] = {}
    for fname, column, none, sizes, digest in fetch_all(con, sql, tracer):
        if none:
            out.setdefault(fname, set()).add(column)
        groups.setdefault(fname, tuple(int(n) for n in sizes or ()))
        chunks.setdefault(fname, []).append((column, digest or ""))
    digests = {p: hashlib.sha256(repr(sorted(c)).encode()).hexdigest()[:32] for p, c in chunks.items()}
    return {p: frozenset(cols) for p, cols in out.items()}, groups, digests


def read_time_ranges(
    paths: list[str],
    time_column: str,
    type_sql: str,
    *,
    con: duckdb.DuckDBPyConnection,
    tracer: Callable[[str], None] | None = None,
) -> dict[str, tuple[Any, Any, tuple[tuple[Any, Any], ...]]]:
    """Min and max of the time column per file, and per row group in file order, from row-group
    statistics (no data read); ``(None, None, ())`` for a file with a row group without them."""
    target = "TIMESTAMPTZ" if type_sql in AWARE_TIMESTAMP_TYPES else "TIMESTAMP"
    group = sb.column("row_group_id")
    sql = sb.render(
        sb.select(
            [
                sb.column("file_name"),
                sb.alias(sb.try_cast(sb.column("stats_min_value"), target), "lo"),
                sb.alias(sb.try_cast(sb.column("stats_max_value"), target), "hi"),
            ],
            sb.table_function("parquet_metadata", paths),
            where=sb.eq(sb.column("path_in_schema"), sb.string(time_column)),
        ).order_by(sb.column("file_name"), group)
    )
    groups: dict[str, list[tuple[Any, Any]]] = {}
    for fname, lo, hi in fetch_all(con, sql, tracer):
        groups.setdefault(fname, []).append((lo, hi))
    out: dict[str, tuple[Any, Any, tuple[tuple[Any, Any], ...]]] = {}
    for fname, ranges in groups.items():
        if any(lo is None or hi is None for lo, hi in ranges):
            out[fname] = (None, None, ())
        else:
            out[fname] = (min(lo for lo, _ in ranges), max(hi for _, hi in ranges), tuple(ranges))
    return out


def date_columns_hint(columns: Mapping[str, str]) -> str:
    """For a source without a time column: how to get days from its DATE columns, if it has any
    (a DATE cannot be the time column: it has no time of day for a window or a time zone)."""
    dates = [c for c, t in columns.items() if t == "DATE"]
    if not dates:
        return ""
    return f" A DATE column cannot be the time column; group by it by name instead: by={dates[0]!r}."


def detect_time_column(columns: Mapping[str, str], metadata: Metadata) -> str | None:
    """The metadata's ``time_column``, else ``ts``, else the only timestamp column."""
    if metadata.time_column is not None:
        if metadata.time_column not in columns:
            raise MetadataError(
                f"Key 'time_column' in {metadata.path or 'metadata'} names column {metadata.time_column!r}, "
                f"which the data does not have. Columns: {', '.join(columns)}.",
                path=metadata.path,
                key="time_column",
            )
        if not columns[metadata.time_column].startswith("TIMESTAMP"):
            raise MetadataError(
                f"Key 'time_column' in {metadata.path or 'metadata'} names {metadata.time_column!r} of type "
                f"{columns[metadata.time_column]}, not a timestamp."
                + date_columns_hint({metadata.time_column: columns[metadata.time_column]}),
                path=metadata.path,
                key="time_column",
            )
        return metadata.time_column
    if "ts" in columns and columns["ts"].startswith("TIMESTAMP"):
        return "ts"
    stamps = [c for c, t in columns.items() if t.startswith("TIMESTAMP")]
    if len(stamps) == 1:
        return stamps[0]
    if metadata.session_window is not None:
        where = f"Metadata {metadata.path}" if metadata.path else "The metadata"
        if stamps:
            why = f"the time column is ambiguous (timestamp columns: {', '.join(stamps)}); set 'time_column'"
        elif "ts" in columns:
            why = f"column 'ts' is {columns['ts']}, not a timestamp, and no other column is one"
        else:
            why = "the data has no timestamp column"
        listed = [f"{c} {t}" for c, t in columns.items()]
        more = f", … ({len(listed)} in all)" if len(listed) > 12 else ""
        raise MetadataError(
            f"{where} sets a session window but {why}. Columns: {', '.join(listed[:12])}{more}.",
            path=metadata.path,
            key="time_column",
        )
    return None


def union_columns(per_file: Sequence[Mapping[str, str]], con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Union by name of the files' schemas; a column whose type differs takes DuckDB's common type."""
    out: dict[str, str] = {}
    for cols in per_file:
        for name, dtype in cols.items():
            if name not in out:
                out[name] = dtype
            elif out[name] != dtype:
                out[name] = _common_type(out[name], dtype, con)
    return out


def _common_type(a: str, b: str, con: duckdb.DuckDBPyConnection) -> str:
    row = fetch_all(con, sb.common_type_query(a, b))
    return str(row[0][0])


def _local_identity(path: str) -> tuple[int, float, str]:
    st = os.stat(path)
    return st.st_size, st.st_mtime, f"{st.st_ino}:{st.st_ctime_ns}"


def file_identities(source: Any, storage_options: Mapping[str, Any] | None = None) -> dict[str, tuple[int, float, str]]:
    """Each file of the source now, listed afresh: path -> (size, modification stamp, change
    stamp); see :class:`FileInfo`."""
    if is_remote(source):
        _, paths, _, stats = list_remote(source, storage_options or {})
        return {p: (*stats[p], "") for p in paths}
    paths, _ = list_local(source, warn_nested=False)  # the source was listed (and warned about) when opened
    return {p: _local_identity(p) for p in paths}


def open_dataset(
    source: Any,
    *,
    metadata: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    tracer: Callable[[str], None] | None = None,
) -> Dataset:
    """List the source, read every footer once, and load ``metadata.json``."""
    fs = None
    stats: dict[str, tuple[int, float, str]]
    if is_remote(source):
        fs, paths, root, stamps = list_remote(source, storage_options or {})
        stats = {p: (*stamps[p], "") for p in paths}
        meta = load_remote_metadata(fs, root, metadata)
    else:
        paths, root = list_local(source)
        meta = load_metadata(root, metadata)
        stats = {p: _local_identity(p) for p in paths}
    con = ConnectionConfig(threads=None, filesystem=fs).open()
    try:
        footers = read_footers(paths, con=con, tracer=tracer)
        null_free, row_groups, digests = read_row_groups(paths, con=con, tracer=tracer)
        columns = union_columns([footers[p][1] for p in paths], con)
        time_column = detect_time_column(columns, meta)
        ranges: dict[str, tuple[Any, Any, tuple[tuple[Any, Any], ...]]] = {}
        if time_column is not None:
            ranges = read_time_ranges(paths, time_column, columns[time_column], con=con, tracer=tracer)
    finally:
        con.close()
    if time_column is not None and not meta.timezone_set and columns[time_column] in AWARE_TIMESTAMP_TYPES:
        _warn_default_zone(meta, paths, footers, time_column, fs)
    files = []
    for p in paths:
        size, mtime, change = stats[p]
        rows, cols = footers[p]
        lo, hi, groups = ranges.get(p, (None, None, ()))
        files.append(
            FileInfo(
                p,
                size,
                mtime,
                rows,
                cols,
                lo,
                hi,
                groups,
                null_free.get(p, frozenset()) & set(cols),
                row_groups.get(p, ()),
                digests.get(p, ""),
                change,
            )
        )
    listed = is_remote(source) or (not isinstance(source, (list, tuple)) and not os.path.isfile(os.fspath(source)))
    return Dataset(files, columns, meta, time_column, root, dict(storage_options or {}), fs, listed)


def stored_time_zone(path: str, column: str, fs: Any = None) -> str | None:
    """The time zone a writer recorded for ``column`` in the file's Arrow schema (Polars, pandas
    and pyarrow record it; Parquet itself keeps only "adjusted to UTC"), or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if fs is None:
            schema = pq.read_schema(path)
        else:
            with fs.open(path, "rb") as f:
                schema = pq.read_schema(f)
        kind = schema.field(column).type
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
    return kind.tz if isinstance(kind, pa.TimestampType) and kind.tz else None


def _same_clock(a: str, b: str) -> bool:
    """Whether two zone names keep the same clock (aliases such as US/Eastern and
    America/New_York): their UTC offsets agree twice a month over 2000-2039."""
    try:
        za, zb = zoneinfo.ZoneInfo(a), zoneinfo.ZoneInfo(b)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    instants = (
        dt.datetime(y, m, d, 12, tzinfo=dt.UTC) for y in range(2000, 2040) for m in range(1, 13) for d in (1, 15)
    )
    return all(t.astimezone(za).utcoffset() == t.astimezone(zb).utcoffset() for t in instants)


def _warn_default_zone(
    meta: Metadata, paths: Sequence[str], footers: Mapping[str, tuple[int, dict[str, str]]], column: str, fs: Any
) -> None:
    """Sessions and days use the default zone when metadata names none: say so when the data's
    writer recorded another zone (Tokyo data would otherwise be cut into US/Eastern days)."""
    first = next((p for p in paths if column in footers[p][1]), None)
    zone = stored_time_zone(first, column, fs) if first is not None else None
    if zone is None or zone.upper() in ("UTC", "ETC/UTC", "Z", "+00:00"):
        return
    if not _same_clock(zone, meta.timezone):
        where = meta.path or "the metadata"
        warn(
            f"{where} names no timezone, so sessions and days are {meta.timezone} (the default); but "
            f"{first} stores {column!r} in time zone {zone}. If that is the market's zone, set "
            f'"timezone": "{zone}" in metadata.json.'
        )


# --- remote sources through fsspec ---------------------------------------------------------------


def is_remote(source: Any) -> bool:
    """Whether a source is a URL of a non-local fsspec filesystem (``s3://``, ``gs://``, ``memory://``)."""
    first = source[0] if isinstance(source, (list, tuple)) and source else source
    if not isinstance(first, str) or "://" not in first:
        return False
    return not first.startswith("file://")


# Without timeouts a stalled object store (a server that accepts but never answers) hangs a run
# for as long as it stalls. Retries stack (botocore's, s3fs's, then the executor's 3 attempts per
# batch), so botocore does not retry and s3fs tries twice: a stalled store fails a batch in about
# 2 x 10 s, a dead one in seconds.
S3_TIMEOUTS = {"connect_timeout": 10, "read_timeout": 10, "retries": {"max_attempts": 1}}
S3FS_RETRIES = 2


def with_default_timeouts(url: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """``storage_options`` with timeouts for S3 unless the user set them (botocore's
    ``config_kwargs``: 10 s to connect, 10 s without a byte on a read, no botocore retry); other stores as given.

    Example:
        >>> with_default_timeouts("s3://b/x", {"config_kwargs": {"read_timeout": 5}})["config_kwargs"]
        {'read_timeout': 5, 'connect_timeout': 10, 'retries': {'max_attempts': 1}}
    """
    opts = dict(storage_options)
    if url.split("://", 1)[0].lower() in ("s3", "s3a"):
        config = dict(opts.get("config_kwargs") or {})
        for k, v in S3_TIMEOUTS.items():
            config.setdefault(k, copy.deepcopy(v))  # botocore fills a retries dict in place
        opts["config_kwargs"] = config
    return opts


def open_filesystem(url: str, storage_options: Mapping[str, Any]) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path in it, with the S3 defaults above (the
    timeouts, and s3fs's own retries, a class attribute that no option sets)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **with_default_timeouts(url, storage_options))
    if type(fs).__name__ == "S3FileSystem" and "retries" not in vars(fs):
        fs.retries = S3FS_RETRIES
    return fs, path


def _fs_error(url: str, e: BaseException) -> SourceError:
    text = brief(e).rstrip(".")
    hint = ""
    low = text.lower()
    if isinstance(e, PermissionError) or any(
        w in low for w in ("access denied", "forbidden", "access key", "signature", "credentials")
    ):
        hint = " Check the credentials in storage_options."
    elif "nosuchbucket" in low or "bucket does not exist" in low or isinstance(e, FileNotFoundError):
        hint = " Check the bucket and path."
    return SourceError(f"Cannot list {url}: {type(e).__name__}: {text}.{hint}", path=url)


def list_remote(
    source: Any, storage_options: Mapping[str, Any]
) -> tuple[Any, list[str], str, dict[str, tuple[int, float]]]:
    """List a remote source once: the filesystem, sorted URLs, the root URL, and each file's
    (size, modification time or ETag-derived stamp)."""
    urls = [str(s) for s in source] if isinstance(source, (list, tuple)) else [str(source)]
    for u in urls:
        if not is_remote(u):
            raise SourceError(f"Source list mixes URLs and local paths: {u} is local; use one kind.", path=u)
    try:
        fs, _ = open_filesystem(urls[0], storage_options)
    except (ImportError, ValueError) as e:
        raise SourceError(f"Cannot open {urls[0]}: {e}", path=urls[0]) from None
    fs.invalidate_cache()  # fsspec reuses filesystem instances: list what is there now
    found: dict[str, dict[str, Any]] = {}
    root = ""
    try:
        for url in urls:
            path = fs._strip_protocol(url)
            if _has_glob(path):
                root = root or _glob_root(path)
                for p, info in fs.glob(path, detail=True).items():
                    if info.get("type", "file") == "file":
                        found[p] = info
            elif len(urls) == 1 and fs.isdir(path):
                root = path.rstrip("/")
                entries = fs.ls(root, detail=True)
                for info in entries:
                    if info.get("type") == "file" and info["name"].endswith(".parquet"):
                        found[info["name"]] = info
                if not found:
                    for p, info in fs.glob(root + "/**/*.parquet", detail=True).items():
                        found[p] = info
            else:
                found[path] = fs.info(path)
                root = root or posixpath.dirname(path)
    except SourceError:
        raise
    except Exception as e:
        raise _fs_error(urls[0], e) from None
    if not found:
        raise SourceError(f"No Parquet files found at {urls[0]}.", path=urls[0])
    stats = {}
    for p, info in found.items():
        stamp = info.get("LastModified") or info.get("mtime") or info.get("created") or info.get("ETag") or 0
        if hasattr(stamp, "timestamp"):
            stamp = stamp.timestamp()
        elif not isinstance(stamp, (int, float)):
            stamp = float(int(hashlib.sha256(str(stamp).encode()).hexdigest()[:12], 16))
        stats[fs.unstrip_protocol(p)] = (int(info.get("size") or 0), float(stamp))
    return fs, sorted(stats), fs.unstrip_protocol(root), stats


def load_remote_metadata(fs: Any, root: str, metadata: Any) -> Metadata:
    """Metadata of a remote source: a mapping, an explicit file (a local path or ``file://`` URL
    is read from this machine, a remote URL through the source's filesystem), or
    ``metadata.json`` beside the data."""
    if isinstance(metadata, Mapping):
        return parse_metadata(dict(metadata), path=None)
    if metadata is not None and not is_remote(os.fspath(metadata)):
        return load_metadata(root, str(os.fspath(metadata)).removeprefix("file://"))
    path = str(metadata) if metadata is not None else posixpath.join(root, "metadata.json")
    try:
        with fs.open(fs._strip_protocol(path), "rb") as f:
            text = f.read()
    except FileNotFoundError:
        raise MetadataError(
            f"Metadata file {path} not found. Put a metadata.json beside the data (it may be just {{}}).",
            path=path,
        ) from None
    except Exception as e:
        raise MetadataError(f"Cannot read metadata file {path}: {type(e).__name__}: {e}", path=path) from None
    return parse_metadata_text(text, path=path)
