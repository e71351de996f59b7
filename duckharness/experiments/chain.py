"""Running an experiment chain on one DuckDB connection, for a batch of files or for all of them.

SQL steps become views named after their experiments (each step's FROM already names its base)
over a ``baseline`` view of the batch: a view for each step read from outside its run of SQL
steps, holding the others as CTEs (see :func:`_step_statements`). A Python step reads its base as
a Polars LazyFrame, and its result is registered on the connection under the step's name, so
later SQL steps read it like any view. This is the path for chains that cannot be fused
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
    baseline = _baseline_statement(dataset, files, window)
    if name == BASELINE:
        return [baseline]
    return [baseline, *(s for s in _step_statements(experiments.chain(name), name) if s is not None)]


def _baseline_statement(dataset: Dataset, files: Sequence[FileInfo], window: SessionWindow | None) -> str:
    return sb.render(sb.create_view(BASELINE, source_query(dataset, files, window), temp=True))


def _step_statements(steps: Sequence[Step], name: str) -> list[str | None]:
    """Per step of the chain to ``name``: the view it needs, a comment for a Python step, or None
    for a SQL step that needs no view of its own.

    A run of SQL steps between Python steps becomes one view per step read from outside the run
    (the last, ``name``, and each base of a Python step or of a step in a later run), holding as
    CTEs the steps of the run it reads that have no view. A view per step would be bound again
    inside every view built on it, so a chain of N steps would cost DuckDB ~N²/2 bindings (seconds
    per batch for 100 steps); the CTEs are ``NOT MATERIALIZED``, so a step that two others read is
    computed as a view is, not held in memory.
    """
    run_of: dict[str, int] = {}
    run = 0
    for s in steps:
        run += s.query is None  # a Python step is a run of its own
        run_of[s.name] = run
        run += s.query is None
    needed = {name} | {
        d for s in steps for d in s.depends if d in run_of and (s.query is None or run_of[d] != run_of[s.name])
    }
    by_name = {s.name: s for s in steps}
    viewed: set[str] = set()
    out: list[str | None] = []
    for step in steps:
        if step.query is None:
            out.append(f"-- Python step {step.sql} over: {relation_sql(step.base)}")
            continue
        if step.name not in needed:
            out.append(None)
            continue
        reads, todo = set(), [step.name]  # the steps of its run it reads, directly or not, without a view
        while todo:
            n = todo.pop()
            if n not in reads:
                reads.add(n)
                todo.extend(d for d in by_name[n].depends if run_of.get(d) == run_of[n] and d not in viewed)
        viewed.add(step.name)
        query: exp.Expr = step.query
        if len(reads) > 1:
            query = sb.select([exp.Star()], exp.Table(this=sb.ident(step.name)))
            for s in steps:
                if s.name in reads:
                    assert s.query is not None
                    query = query.with_(sb.ident(s.name), as_=s.query.copy(), materialized=False, copy=False)
        out.append(sb.render(sb.create_view(step.name, query, temp=True)))
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
    fetch_all(con, _baseline_statement(dataset, files, window), tracer)
    if name == BASELINE:
        return name
    steps = experiments.chain(name)
    for step, statement in zip(steps, _step_statements(steps, name), strict=True):
        if step.query is not None:
            if statement is not None:  # else: a CTE of a view built on it
                fetch_all(con, statement, tracer)
            continue
        assert statement is not None
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
