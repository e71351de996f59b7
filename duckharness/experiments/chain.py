"""Running an experiment chain on one DuckDB connection, for a batch of files or for all of them.

SQL steps become views named after their experiments (each step's FROM already names its base),
so a chain is a stack of views over a ``baseline`` view of the batch. A Python step reads its
base as a Polars LazyFrame, and its result is registered on the connection under the step's
name, so later SQL steps read it like any view. This is the path for chains that cannot be fused
into the single scan (Python steps, aggregates, windows); the result is exactly what applying
the chain to those rows gives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import duckdb
import polars as pl
from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.data.metadata import SessionWindow
from duckharness.data.source import Dataset, FileInfo
from duckharness.engine.plan import (
    MAX_VIEW_WINDOW_DAYS,
    aware_in,
    batch_relation,
    day_groups,
    file_days,
    per_row_window,
    window_and_day,
)
from duckharness.errors import TransformError, UnpicklableStepError
from duckharness.execution.connection import fetch_all, interruptible
from duckharness.experiments.steps import BASELINE, Experiments, Step

Tracer = Callable[[str], None]


def apply_python_step(step: Step, frame: pl.LazyFrame) -> pl.LazyFrame:
    """Call a Python step's function; errors name the experiment and the function."""
    assert step.fn is not None
    try:
        out = step.fn(frame)
    except Exception as e:
        raise TransformError(
            f"Experiment {step.name!r}: Python step {step.sql} raised {type(e).__name__}: {e}",
            experiment=step.name,
            step=step.sql,
        ) from e
    if isinstance(out, pl.DataFrame):
        out = out.lazy()
    if type(out).__name__ == "DataFrame" and type(out).__module__.startswith("pandas"):
        # Refused, not converted: a pandas index (a set_index("ts"), say) is no column, and
        # converting would drop it silently; the user knows whether to reset_index() first.
        raise TransformError(
            f"Experiment {step.name!r}: Python step {step.sql} returned a pandas DataFrame; Python steps take "
            f"and return Polars: return pl.from_pandas(df).lazy() (after df.reset_index() if its index holds "
            f"a column, such as the time), or work on the LazyFrame with Polars expressions.",
            experiment=step.name,
            step=step.sql,
        )
    if not isinstance(out, pl.LazyFrame):
        raise TransformError(
            f"Experiment {step.name!r}: Python step {step.sql} must return a Polars LazyFrame, "
            f"got {type(out).__name__}.",
            experiment=step.name,
            step=step.sql,
        )
    return out


def unpicklable_step_error(step: Step, experiment: str, executor: str, error: Exception) -> UnpicklableStepError:
    """The error for a Python step the ``executor``'s workers cannot receive (``error`` is
    cloudpickle's), raised by a run of ``experiment`` (whose chain holds ``step``)."""
    via = "" if experiment == step.name else f" (a step of {experiment!r}'s chain)"
    return UnpicklableStepError(
        f"Experiment {step.name!r}{via}: Python step {step.sql} cannot be sent to the {executor} workers, "
        f"because it does not pickle: {type(error).__name__}: {error}. Define the function at module level in "
        f"a module the workers can import, and keep locks, open files and connections out of its closure "
        f"and the globals it uses; or run on threads (executor='threads'), where it needs no pickling.",
        experiment=step.name,
        step=step.sql,
        executor=executor,
    )


def collect_step(step: Step, frame: pl.LazyFrame) -> pl.DataFrame:
    """Collect a Python step's output (with Polars' streaming engine); errors name the step."""
    try:
        return frame.collect(engine="streaming")
    except Exception as e:
        raise TransformError(
            f"Experiment {step.name!r}: Python step {step.sql} failed when run: {type(e).__name__}: {e}",
            experiment=step.name,
            step=step.sql,
        ) from e


def source_query(dataset: Dataset, files: Sequence[FileInfo], window: SessionWindow | None) -> exp.Expr:
    """``SELECT * FROM <files> WHERE <session window>``: the baseline of one batch."""
    where, _ = window_and_day(dataset, files, window, need_day=False, max_window_days=MAX_VIEW_WINDOW_DAYS)
    return sb.select([exp.Star()], batch_relation(dataset, files), where=where)


def chain_statements(
    dataset: Dataset, experiments: Experiments, name: str, files: Sequence[FileInfo], window: SessionWindow | None
) -> list[str]:
    """What :func:`build_chain` shows a tracer for ``name`` over ``files``: the views it creates
    and a comment for each Python step (for runs whose chains are built on workers, untraced)."""
    out = [sb.render(sb.create_view(BASELINE, source_query(dataset, files, window), temp=True))]
    if name == BASELINE:
        return out
    for step in experiments.chain(name):
        if step.query is not None:
            out.append(sb.render(sb.create_view(step.name, step.query, temp=True)))
        else:
            out.append(f"-- Python step {step.sql} over: {relation_sql(step.base)}")
    return out


def build_chain(
    con: duckdb.DuckDBPyConnection,
    dataset: Dataset,
    experiments: Experiments,
    name: str,
    files: Sequence[FileInfo],
    window: SessionWindow | None,
    tracer: Tracer | None = None,
    batch_size: int = 1,
) -> str:
    """Create ``baseline`` and every step up to ``name`` on ``con`` over ``files``; returns the
    relation name.

    A per-batch Python step sees one session day's rows at a time (the day ``by="day"`` gives
    them): when ``files`` hold several days, the base is built for each group of files sharing a
    day (:func:`~duckharness.engine.plan.day_groups`) on a connection of its own, or, when a step
    before needs all rows, once; either way its rows are split by day and the outputs stacked.
    """
    baseline, *statements = chain_statements(dataset, experiments, name, files, window)
    fetch_all(con, baseline, tracer)
    if name == BASELINE:
        return name
    for step, statement in zip(experiments.chain(name), statements, strict=True):
        if step.query is not None:
            fetch_all(con, statement, tracer)
            continue
        base_sql = relation_sql(step.base)
        if tracer is not None:
            tracer(statement)
        if not step.per_batch:
            frame = con.sql(base_sql).pl(lazy=True)  # streams from DuckDB, with projection pushdown
            out = collect_step(step, apply_python_step(step, frame))
            con.register(step.name, out)
            continue
        groups = day_groups(dataset, window, files) if len(files) > 1 else [list(files)]
        if len(groups) <= 1 or not experiments.batchable(step.base):
            out = _per_day(con, dataset, step, base_sql, files, window)
        else:
            parts = []
            for group in groups:
                sub = dataset.connection(1).open()
                try:
                    build_chain(sub, dataset, experiments, step.base, group, window, tracer, batch_size)
                    parts.append(_per_day(sub, dataset, step, base_sql, group, window))
                finally:
                    sub.close()
            out = pl.concat(parts, how="diagonal_relaxed")
        con.register(step.name, out)
    return name


DAY_COLUMN = "__dh_day"


def _per_day(
    con: duckdb.DuckDBPyConnection,
    dataset: Dataset,
    step: Step,
    base_sql: str,
    files: Sequence[FileInfo],
    window: SessionWindow | None,
) -> pl.DataFrame:
    """A per-batch Python step applied to each session day of its base (built on ``con`` over
    ``files``), days labelled per row as ``by="day"`` labels them; once when the footers show
    ``files`` hold one day."""
    tcol = dataset.time_column
    tz = window.timezone if window is not None else dataset.metadata.timezone
    known = all(f.time_min is not None and f.time_max is not None for f in files)
    if tcol is None or (known and len({d for f in files for d in file_days(f, tz, window)}) <= 1):
        frame = con.sql(base_sql).pl(lazy=True)  # one day: streams from DuckDB, with projection pushdown
        return collect_step(step, apply_python_step(step, frame))
    relation = con.sql(base_sql)
    columns = dict(zip(relation.columns, (str(t) for t in relation.types), strict=True))
    if tcol not in columns:
        raise TransformError(
            f"Experiment {step.name!r}: the per-batch Python step {step.sql} runs on each day's rows, and its "
            f"input (from {step.base!r}) has no time column {tcol!r} to split the rows of several days by; "
            f"keep {tcol!r} in {step.base!r}, or add the step with per_batch=False.",
            experiment=step.name,
            step=step.sql,
        )
    day = per_row_window(sb.column(tcol), bool(aware_in(dataset, columns)), tz, window)[1]
    labelled = sb.render(sb.select([exp.Star(), sb.alias(day, DAY_COLUMN)], exp.Table(this=sb.ident(step.base))))
    base = interruptible(con, lambda: con.sql(labelled).pl())
    parts = [
        collect_step(step, apply_python_step(step, group.drop(DAY_COLUMN).lazy()))
        for _, group in base.group_by(DAY_COLUMN, maintain_order=True)
    ]
    return pl.concat(parts, how="diagonal_relaxed") if parts else base.drop(DAY_COLUMN)


def relation_sql(name: str) -> str:
    return sb.render(sb.select([exp.Star()], exp.Table(this=sb.ident(name))))
