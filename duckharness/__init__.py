"""duckharness: SQL-first evaluation of backtests and forecasts on DuckDB."""

from typing import TYPE_CHECKING, Any

from duckharness.errors import (
    DuckHarnessError,
    DuckHarnessWarning,
    DuplicateExperimentError,
    ExecutionError,
    ExperimentCycleError,
    ExperimentError,
    ExperimentSQLError,
    HarnessClosedError,
    InputError,
    MetadataError,
    MetricError,
    MissingDependencyError,
    SourceError,
    TransformError,
    UnknownColumnError,
    UnknownExperimentError,
    UnknownMetricError,
    UnpicklableStepError,
    UnpicklableTaskError,
)

if TYPE_CHECKING:
    from duckharness.data.metadata import Metadata, SessionWindow
    from duckharness.engine.analysis import Comparison
    from duckharness.engine.plan import Pair
    from duckharness.harness import Harness
    from duckharness.metrics.library import Metric, MetricLibrary, parse_metric

# The facade and its types are imported on first use: ``import duckharness`` (and the command
# line's start, ``duckharness --help``) does not load DuckDB, Polars and sqlglot until needed.
_LAZY = {
    "Comparison": "duckharness.engine.analysis",
    "Harness": "duckharness.harness",
    "Metadata": "duckharness.data.metadata",
    "Metric": "duckharness.metrics.library",
    "MetricLibrary": "duckharness.metrics.library",
    "Pair": "duckharness.engine.plan",
    "SessionWindow": "duckharness.data.metadata",
    "parse_metric": "duckharness.metrics.library",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'duckharness' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "Comparison",
    "DuckHarnessError",
    "DuckHarnessWarning",
    "DuplicateExperimentError",
    "ExecutionError",
    "ExperimentCycleError",
    "ExperimentError",
    "ExperimentSQLError",
    "Harness",
    "HarnessClosedError",
    "InputError",
    "Metadata",
    "MetadataError",
    "Metric",
    "MetricError",
    "MetricLibrary",
    "MissingDependencyError",
    "Pair",
    "SessionWindow",
    "SourceError",
    "TransformError",
    "UnknownColumnError",
    "UnknownExperimentError",
    "UnknownMetricError",
    "UnpicklableStepError",
    "UnpicklableTaskError",
    "__version__",
    "parse_metric",
]
