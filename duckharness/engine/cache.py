"""A cache of partial statistics per file batch, so adding one day re-reads one day.

An entry is keyed by the exact SQL of the batch's aggregate query (which names its files and
holds every experiment, metric and shift) and by each file's identity (path, size, modification
time or ETag stamp, a digest of its footer and, for a local file, its inode and ctime). A
rewritten file, a changed metric file or experiment gives another key, so nothing stale is ever
served. Entries are Parquet files written to a temporary name and renamed into place, so
concurrent runs sharing a cache never see half-written entries; each carries a digest of its key
and values in its Parquet metadata, and one that does not match (damaged, edited, or written by
something else) is recomputed and overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl

from duckharness.data.source import FileInfo
from duckharness.errors import InputError, warn

ENV = "DUCKHARNESS_CACHE"


OFF = ("0", "off", "false", "no", "none")
_FILE = "__cache_entry"
_DIGEST = "duckharness.digest"
_SHARD = re.compile(r"[0-9a-f]{2}")
_ENTRY = re.compile(r"\.?[0-9a-f]{64}\.(parquet|json)(\.[0-9a-f]{8}\.tmp)?")


def cache_disabled_by_env() -> bool:
    """``DUCKHARNESS_CACHE=off`` turns the default cache off (tests and benchmarks use it)."""
    return os.environ.get(ENV, "").strip().lower() in OFF


def default_cache_dir() -> Path:
    """``$DUCKHARNESS_CACHE``, else ``$XDG_CACHE_HOME/duckharness``, else ``~/.cache/duckharness``."""
    if os.environ.get(ENV) and not cache_disabled_by_env():
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "duckharness"


class StatsCache:
    """Partial-statistics frames on disk, one Parquet file per (batch SQL, file identities)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._warned = False
        for p in (self.folder, *self.folder.parents):  # the nearest existing one must be a folder
            if p.exists():
                if not p.is_dir():
                    raise InputError(
                        f"The cache folder {str(self.folder)!r} cannot be made: {str(p)!r} is a file; "
                        f"give a folder (or cache=False)."
                    )
                break

    @staticmethod
    def key(sql: str, files: Sequence[FileInfo]) -> str:
        h = hashlib.sha256(sql.encode())
        for f in files:
            h.update(f"\0{f.path}\0{f.size}\0{f.mtime!r}\0{f.footer}\0{f.change}".encode())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.parquet"

    @staticmethod
    def digest(key: str, frame: pl.DataFrame) -> str:
        """A digest of an entry's key, schema and values (floats as their shortest exact text)."""
        return StatsCache._digest_of(key, frame.schema, frame.write_csv(include_header=False))

    @staticmethod
    def _digest_of(key: str, schema: pl.Schema, rows: str) -> str:
        h = hashlib.sha256(key.encode())
        h.update(repr(list(schema.items())).encode())
        h.update(rows.encode())
        return h.hexdigest()

    def _checked_together(self, keys: Sequence[str], both: pl.DataFrame, paths: dict[str, Path]) -> dict[str, bool]:
        """Whether each entry read in ``both`` matches its digest, from one CSV text of all of
        them (one Polars call instead of one per entry; a re-run checks a few entries per day)."""
        data = both.drop(_FILE)
        lines = data.write_csv(include_header=False).splitlines(keepends=True)
        if len(lines) != data.height:  # a value spanning lines: check each entry alone
            return {}
        texts: dict[str, str] = {}
        start = 0
        for run in both.get_column(_FILE).rle().to_list():
            texts[run["value"]] = "".join(lines[start : start + run["len"]])
            start += run["len"]
        out = {}
        for k in keys:
            stored = self._stored_digest(k)
            out[k] = stored is not None and stored == self._digest_of(k, data.schema, texts.get(str(paths[k]), ""))
        return out

    def _stored_digest(self, key: str) -> str | None:
        try:
            return pl.read_parquet_metadata(self._path(key)).get(_DIGEST)
        except (OSError, pl.exceptions.PolarsError):
            return None

    def _verified(self, key: str, frame: pl.DataFrame, stored: str | None) -> pl.DataFrame | None:
        return frame if stored is not None and stored == self.digest(key, frame) else None

    def get(self, key: str) -> pl.DataFrame | None:
        path = self._path(key)
        try:
            frame = pl.read_parquet(path)
        except (FileNotFoundError, OSError, pl.exceptions.PolarsError):
            return None  # missing, or unreadable: recompute (and overwrite)
        return self._verified(key, frame, self._stored_digest(key))  # damaged or edited: the same

    def put(self, key: str, frame: pl.DataFrame) -> None:
        meta = {_DIGEST: self.digest(key, frame)}
        self._write(self._path(key), lambda tmp: frame.write_parquet(tmp, metadata=meta))

    def get_many(self, keys: Sequence[str]) -> list[pl.DataFrame | None]:
        """``[self.get(k) for k in keys]``, reading the stored entries in one Parquet read (a
        re-run reads a few tiny files per day of data); any trouble and each is read alone."""
        paths = {k: self._path(k) for k in keys}
        stored = [k for k in dict.fromkeys(keys) if paths[k].is_file()]
        if len(stored) < 2:
            return [self.get(k) if k in stored else None for k in keys]
        try:
            both = pl.read_parquet([str(paths[k]) for k in stored], include_file_paths=_FILE)
            parts = both.partition_by(_FILE, as_dict=True, include_key=False)
            empty = both.clear().drop(_FILE)
            found = {k: parts.get((str(paths[k]),), empty) for k in stored}
        except (OSError, pl.exceptions.PolarsError):
            return [self.get(k) if k in stored else None for k in keys]
        # Read together, an entry's columns may have been widened to the others' types: one that
        # does not match its digest so is read again alone before it counts as damaged.
        ok = self._checked_together(stored, both, paths)
        checked = {k: f if ok.get(k) else self.get(k) for k, f in found.items()}
        return [checked.get(k) for k in keys]

    def get_values(self, key: str) -> list[float | None] | None:
        """A small list of numbers stored under ``key`` (the shifts of a run), or None."""
        try:
            values = json.loads(self._path(key).with_suffix(".json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(values, list) or not all(v is None or isinstance(v, (int, float)) for v in values):
            return None  # not ours or damaged: recompute (and overwrite)
        return [None if v is None else float(v) for v in values]

    def put_values(self, key: str, values: Sequence[float | None]) -> None:
        self._write(self._path(key).with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(list(values))))

    def _write(self, path: Path, write: Callable[[Path], object]) -> None:
        """Write to a temporary name, then rename into place: readers see all or nothing. A
        cache that cannot be written (read-only, full disk) only warns: the run's results do not
        depend on it, and nothing half-written is left."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
        except (OSError, pl.exceptions.PolarsError) as e:  # Polars reports a full disk as its own error
            if not self._warned:  # once per cache, not once per entry
                self._warned = True
                reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[-1]
                warn(f"Cannot write to the cache folder {str(self.folder)!r} ({reason}); results are not cached.")
        finally:
            with contextlib.suppress(OSError):
                if tmp.exists():
                    tmp.unlink()

    def clear(self) -> None:
        """Remove every entry this cache wrote (the folder itself, and anything else in it, stay)."""
        if not self.folder.is_dir():
            return
        for shard in self.folder.iterdir():
            if not (shard.is_dir() and not shard.is_symlink() and _SHARD.fullmatch(shard.name)):
                continue
            for entry in shard.iterdir():
                if _ENTRY.fullmatch(entry.name):
                    entry.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                shard.rmdir()  # only when empty

    def __bool__(self) -> bool:  # a cache is on even while it is empty (``if h.cache:``)
        return True

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.parquet")) if self.folder.exists() else 0
