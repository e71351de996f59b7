"""Local outputs: every path duckharness writes (a sink folder, a sample file, an exported script
or database) is checked before anything is written, written beside its target under a hidden
temporary name, and moved into place only when complete.

The rules, the same for every output:

- the folder that holds the output must exist: nothing is created above it;
- an existing output is replaced only with ``overwrite=True`` (``--overwrite``);
- a new output is never moved over one that appeared while it was being written;
- an error while writing is an :class:`~duckharness.errors.InputError` naming the user's path and
  the reason (no space left, read-only file system, ...), never the temporary name, and the
  temporary file or folder is removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import sys
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from duckharness.errors import InputError

if TYPE_CHECKING:
    from duckharness.data.source import Dataset

_REASONS = {
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded; free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "permission denied; write elsewhere or change the folder's permissions",
    errno.EPERM: "permission denied; write elsewhere or change the folder's permissions",
    errno.ENOENT: "its folder does not exist (any more); create it or write elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; give a file path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
}
_EXISTS = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR)
# "(os error 28)" (Polars, Rust) or "errno":"28" (DuckDB's IO errors)
_ERRNO_IN_TEXT = re.compile(r"os error (\d+)|\"errno\"\s*:\s*\"?(\d+)")
_OS_TEXTS = {os.strerror(code): code for code in _REASONS}


def check_output(path: str | os.PathLike[str], *, kind: str, overwrite: bool) -> str:
    """The absolute path of a local output ``kind`` ('file' or 'folder') after checking, before
    anything is written, that it can be written there.

    Example:
        >>> check_output("/nonexistent/x.parquet", kind="file", overwrite=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        duckharness.errors.InputError: Cannot write /nonexistent/x.parquet: folder /nonexistent does not exist...
    """
    text = os.fspath(path)
    if isinstance(text, str) and "://" in text and not text.startswith("file://"):
        raise InputError(
            f"Cannot write {text}: this output is written to a local path only (sinks can write to a remote "
            f"store). Write it locally and upload it, or sink the experiment there."
        )
    target = os.path.abspath(text.removeprefix("file://") if isinstance(text, str) else text)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        ancestor = parent
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            raise InputError(f"Cannot write {target}: {ancestor} is a file, not a folder. Choose another path.")
        raise InputError(
            f"Cannot write {target}: folder {parent} does not exist. Create it first or choose another path."
        )
    if os.path.lexists(target):
        if kind == "file" and os.path.isdir(target):
            raise InputError(f"Output {target} is a folder; give a file path.")
        if kind == "folder" and not os.path.isdir(target):
            raise InputError(f"Output {target} exists and is not a folder; choose another path.")
        if not overwrite:
            raise InputError(f"Output {target} already exists. Use overwrite=True (--overwrite) to replace it.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(
            f"Cannot write {target}: folder {parent} is not writable (read-only file system or no permission). "
            f"Write elsewhere."
        )
    return target


def temporary_name(target: str) -> str:
    """A hidden name beside ``target`` for writing it: ``/a/.b.parquet.tmp-1a2b3c4d``."""
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}")


def os_errno(e: BaseException) -> int | None:
    """The OS error code behind an OSError or a DuckDB/Polars error whose text carries one."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    text = str(e)
    m = _ERRNO_IN_TEXT.search(text)
    if m:
        return int(m.group(1) or m.group(2))
    return next((code for message, code in _OS_TEXTS.items() if message in text), None)


def concerns_output(e: OSError, target: str, tmp: str) -> bool:
    """Whether an OSError raised while writing ``target`` (through ``tmp``) is about the output
    (its paths, or a full or read-only disk) rather than, say, reading the source."""
    names = [os.fspath(n) for n in (e.filename, e.filename2) if isinstance(n, (str, os.PathLike))]
    if any(str(n).startswith((tmp, target)) for n in names):
        return True
    return not names and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def write_error(e: BaseException, target: str, tmp: str | None = None) -> InputError:
    """An InputError naming ``target`` (never ``tmp``) for an error raised while writing it."""
    code = os_errno(e)
    reason = _REASONS.get(code) if code is not None else None
    if reason is None:
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        reason = text.replace(tmp, target) if tmp else text
    return InputError(f"Cannot write {target}: {reason}.")


@contextlib.contextmanager
def written_atomically(target: str, *, overwrite: bool) -> Iterator[str]:
    """Yields a temporary path beside ``target`` to write; when the block ends it is renamed to
    ``target``, on any error (or interruption) it is removed, and OS errors name ``target``.

    ``target`` comes from :func:`check_output`. Without ``overwrite`` the rename fails if a file
    appeared at ``target`` meanwhile; with it, it replaces the file there.
    """
    tmp = temporary_name(target)
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                rename_no_replace(tmp, target)
            except OSError as e:
                if not is_exists_error(e):
                    raise
                raise InputError(
                    f"Output {target} appeared while it was being written; not replacing it. "
                    f"Use overwrite=True (--overwrite) to replace it."
                ) from None
    except OSError as e:
        raise write_error(e, target, tmp) from e
    finally:
        remove_quietly(tmp)


def remove_quietly(path: str) -> None:
    """Remove a file (and a DuckDB ``.wal`` beside it) if there; cleaning up never raises."""
    for p in (path, path + ".wal"):
        with contextlib.suppress(OSError):
            if os.path.lexists(p):
                os.remove(p)


def is_exists_error(e: OSError) -> bool:
    """Whether a rename failed because its destination exists."""
    return isinstance(e, FileExistsError) or e.errno in _EXISTS


def rename_no_replace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists, atomically
    where the system allows (Linux ``renameat2(RENAME_NOREPLACE)``); elsewhere an existence check
    then ``os.rename``, which refuses a non-empty folder or (on Windows) anything existing."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: the file system cannot do it
            if code == errno.EEXIST:
                raise FileExistsError(code, os.strerror(code), dst)
            raise OSError(code, os.strerror(code), src, None, dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def replace_folder(tmp: str, target: str) -> bool:
    """Put the finished folder ``tmp`` in place of the folder ``target``: ``target`` is moved
    aside, ``tmp`` renamed in (never over something that appeared meanwhile) and the old folder
    removed; if that rename fails the old one is put back (or, if something else took its place,
    removed). False, with nothing done, when ``target`` is gone meanwhile."""
    import shutil

    old = f"{tmp}.old"
    try:
        os.rename(target, old)
    except FileNotFoundError:
        return False
    try:
        rename_no_replace(tmp, target)
    except BaseException:
        try:
            rename_no_replace(old, target)
        except OSError:
            shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return True


def _load_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28, some musl)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def check_outside_source(dataset: Dataset, target: str, what: str = "Output") -> None:
    """Refuse an output inside the source's folder (a later listing of the source would read it
    as more data: its rows twice), around it, or that is one of its files. Paths are compared
    with symlinks resolved, so a link to the source folder is the source folder."""
    if dataset.remote:
        return
    real = os.path.realpath(target)
    src = os.path.realpath(dataset.root)
    inside = dataset.listed and os.path.commonpath([real, src]) == src
    holds = any(os.path.commonpath([real, os.path.realpath(p)]) == real for p in dataset.paths)
    if inside or holds:
        raise InputError(
            f"{what} {target} overlaps the source {dataset.root} (inside it, an output would be read as more "
            f"of the source; around it, it would replace it); choose a path outside it."
        )
