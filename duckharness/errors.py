"""One exception root for everything duckharness raises.

Every error a user can cause by their input subclasses both :class:`DuckHarnessError` and
:class:`ValueError`, and carries the file, key, column, experiment or metric at fault as
attributes so that callers can act on it without parsing the message.
"""

from __future__ import annotations

import os
import sys
import warnings


class DuckHarnessError(Exception):
    """Root of every error raised by duckharness."""


class DuckHarnessWarning(UserWarning):
    """Root of every warning duckharness gives (a run that went on, e.g. without caching)."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str) -> None:
    """Give a :class:`DuckHarnessWarning` that points at the caller's own line: the first frame
    outside this package, however deep in it the warning arose (Python 3.11 has no
    ``skip_file_prefixes``)."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the frame that called warn()
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back  # type: ignore[assignment]
    warnings.warn(message, DuckHarnessWarning, stacklevel=level)


class InputError(DuckHarnessError, ValueError):
    """Bad input from the user: a source, a metadata file, an experiment, a metric."""


class SourceError(InputError):
    """The source cannot be listed or read (empty glob, unreadable Parquet file, ...)."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class MetadataError(InputError):
    """``metadata.json`` is missing, is not valid JSON, or holds a bad value."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.key = key


class ExperimentError(InputError):
    """An experiment step is invalid."""

    def __init__(self, message: str, *, experiment: str | None = None) -> None:
        super().__init__(message)
        self.experiment = experiment


class ExperimentSQLError(ExperimentError):
    """The SQL of an experiment step does not parse or has a form that is not allowed."""


class UnknownExperimentError(ExperimentError):
    """An experiment (or a base) that is not defined was named."""


class DuplicateExperimentError(ExperimentError):
    """An experiment with that name already exists."""


class ExperimentCycleError(ExperimentError):
    """Experiments that name each other as base, directly or through others."""

    def __init__(self, message: str, *, cycle: list[str]) -> None:
        super().__init__(message, experiment=cycle[0] if cycle else None)
        self.cycle = cycle


class UnknownColumnError(ExperimentError):
    """A column that does not exist in the relation it is read from."""

    def __init__(self, message: str, *, column: str, experiment: str | None = None) -> None:
        super().__init__(message, experiment=experiment)
        self.column = column


class TransformError(ExperimentError):
    """A Python step raised, or returned something other than a Polars LazyFrame/DataFrame."""

    def __init__(self, message: str, *, experiment: str | None = None, step: str | None = None) -> None:
        super().__init__(message, experiment=experiment)
        self.step = step


class UnpicklableStepError(TransformError):
    """A Python step that cannot be sent to the workers of the ``processes``, ``ray`` or ``dask``
    executor: cloudpickle cannot pickle its function (a lock or an open file in its closure, say).
    It still runs on ``threads``."""

    def __init__(
        self, message: str, *, experiment: str | None = None, step: str | None = None, executor: str | None = None
    ) -> None:
        super().__init__(message, experiment=experiment, step=step)
        self.executor = executor


class MetricError(InputError):
    """A metric file is malformed, or an unknown metric was asked for."""

    def __init__(self, message: str, *, metric: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.metric = metric
        self.path = path


class UnknownMetricError(MetricError):
    """A metric name that no metric file defines."""


class HarnessClosedError(DuckHarnessError, ValueError):
    """A method of a :class:`~duckharness.Harness` was called after ``close()`` (or after its
    ``with`` block ended): its connections and workers are gone. A ValueError, as Python's own
    I/O on a closed file is."""


class ExecutionError(DuckHarnessError):
    """A query failed while it ran over the data; names the files of the failing batch."""

    def __init__(
        self, message: str, *, files: list[str] | None = None, sql: str | None = None, experiment: str | None = None
    ) -> None:
        super().__init__(message)
        self.files = files or []
        self.sql = sql
        self.experiment = experiment


class UnpicklableTaskError(ExecutionError):
    """A task of a run cannot be pickled to be sent to the executor's workers; the engine names the
    Python step at fault when there is one (:class:`UnpicklableStepError`)."""

    def __init__(self, message: str, *, executor: str) -> None:
        super().__init__(message)
        self.executor = executor


class MissingDependencyError(DuckHarnessError, ImportError):
    """An optional package a feature needs is not installed; the message says what to install."""

    def __init__(self, message: str, *, package: str, extra: str) -> None:
        super().__init__(message)
        self.package = package
        self.extra = extra
