"""duckharness: SQL-first evaluation of backtests and forecasts on DuckDB."""

from duckharness.data.metadata import Metadata, SessionWindow
from duckharness.engine.analysis import Comparison
from duckharness.engine.plan import Pair
from duckharness.errors import (
    DuckHarnessError,
    DuplicateExperimentError,
    ExecutionError,
    ExperimentCycleError,
    ExperimentError,
    ExperimentSQLError,
    InputError,
    MetadataError,
    MetricError,
    MissingDependencyError,
    SourceError,
    UnknownColumnError,
    UnknownExperimentError,
    UnknownMetricError,
)
from duckharness.harness import Harness
from duckharness.metrics.library import Metric, MetricLibrary, parse_metric

__version__ = "0.1.0"

__all__ = [
    "Comparison",
    "DuckHarnessError",
    "DuplicateExperimentError",
    "ExecutionError",
    "ExperimentCycleError",
    "ExperimentError",
    "ExperimentSQLError",
    "Harness",
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
    "UnknownColumnError",
    "UnknownExperimentError",
    "UnknownMetricError",
    "__version__",
    "parse_metric",
]
