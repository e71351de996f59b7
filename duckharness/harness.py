"""The facade: :class:`Harness` is what users (and the CLI) call."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import polars as pl
from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.data.metadata import Metadata, SessionWindow, parse_window_text
from duckharness.data.source import Dataset, file_identities, is_remote, open_dataset
from duckharness.engine.analysis import Comparison
from duckharness.engine.cache import StatsCache, cache_disabled_by_env, default_cache_dir
from duckharness.engine.days import DayIndex, index_days, settle_days
from duckharness.engine.plan import Pair, default_pairs
from duckharness.engine.run import RunStats, baseline_query, run_metrics
from duckharness.errors import HarnessClosedError, InputError, SourceError, UnknownMetricError, warn
from duckharness.execution.connection import fetch_all
from duckharness.execution.executor import EXECUTORS, Executor, caused_by_interruption, make_executor
from duckharness.experiments.chain import apply_python_step, build_chain, collect_step, relation_sql
from duckharness.experiments.steps import BASELINE, Experiments, Step, parse_experiments_file, pickle_error
from duckharness.metrics.library import DEFAULT_METRICS, Metric, MetricLibrary
from duckharness.outputs.export import ExportResult
from duckharness.outputs.sink import SinkResult

# window=: None or True (the metadata's session window), False (none), a SessionWindow, a (start,
# end) pair of datetime.time / "HH:MM[:SS]" / None (open end), or "START-END" as --window takes it.
WindowBound = str | dt.time | None
WindowArg = SessionWindow | tuple[WindowBound, WindowBound] | str | bool | None
# The repr reads at most this many rows' times to count the days exactly (a fraction of a second).
REPR_READ_ROWS = 1_000_000


_F = TypeVar("_F", bound=Callable[..., Any])


def _interruptible(method: _F) -> _F:
    """A Ctrl-C during the call reaches the caller as KeyboardInterrupt, whatever DuckDB or a
    worker made of it on the way (``InterruptException``, ``RuntimeError('Query interrupted')``,
    a failed batch), once the call has cleaned up (no half-written output)."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            if caused_by_interruption(e):
                raise KeyboardInterrupt from e
            raise

    return call  # type: ignore[return-value]


def _open(method: _F) -> _F:
    """Refuse a call on a closed harness with one clear error (rather than DuckDB's
    "Connection already closed!" from wherever the call first touches a connection)."""

    @functools.wraps(method)
    def call(self: Harness, *args: Any, **kwargs: Any) -> Any:
        self._check_open()
        return method(self, *args, **kwargs)

    return call  # type: ignore[return-value]


def _not_empty(value: Any, argument: str, instead: str) -> None:
    """An empty list for an argument that has a default asks for nothing: refuse it, saying to leave
    the argument out for the default (``instead``), rather than return an empty or a failed result."""
    if value is not None and not isinstance(value, str) and isinstance(value, Sized) and len(value) == 0:
        raise InputError(f"{argument}={value!r} asks for nothing: leave {argument} out for {instead}.")


def _whole_number(value: Any, argument: str, *, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InputError(f"{argument} must be a whole number of at least {least}, got {value!r}.")


class Harness:
    """Experiments and metrics over a folder of Parquet backtest results.

    Args:
        source: a directory, a glob, or a list of Parquet files.
        storage_options: options for remote filesystems (fsspec).
        metadata: None to read ``metadata.json`` beside the data, or a mapping, or a path.
        metric_dirs: folders of the user's own metric files (added to the packaged ones).
        workers: parallel DuckDB connections for the batch map (default: CPU count).
        batch_size: files per batch (default 1).
        tracer: a callable that receives every SQL statement executed (e.g. ``print``).
        progress: show a progress bar on long runs (default: only when stderr is a terminal).
        executor: where the batch map runs: ``threads`` (default), ``processes``, ``ray``, ``dask``,
            or an :class:`~duckharness.execution.executor.Executor`.
        address: an existing cluster for ``ray`` (``ray://host:10001`` or ``auto``) or ``dask``
            (``tcp://scheduler:8786``); default: a local cluster started on first use.
        retries: times a failed batch is retried before the run fails naming its files.
        cache: partial statistics are cached per file batch (keyed by the exact query and each
            file's path, size and modification stamp) in ``~/.cache/duckharness`` (or
            ``$DUCKHARNESS_CACHE``), so re-runs and new days re-read only what changed; a folder
            to use another place, or False to turn it off. ``h.cache.clear()`` empties it.

    Every method that reads rows takes ``window=``, the local wall-clock session window that picks
    the source rows on each day:

    - ``None`` or ``True``: the metadata's window (``start_time``, ``end_time``, ``timezone``);
    - ``False``: no window (every row, days by local date);
    - ``("10:00", "11:00")``: a (start, end) pair of ``HH:MM[:SS]`` strings or ``datetime.time``
      values, None for an open end, in the metadata's time zone;
    - ``"10:00-11:00"``: the same as one string, as ``--window`` takes it (``"10:00-"`` or
      ``"-15:00"`` for one bound);
    - a :class:`~duckharness.data.metadata.SessionWindow`, to give another time zone too.

    An end before the start runs overnight; equal times are refused.

    Lists (``metrics``, ``pairs``, ``experiments``, ``by``) may be left out for their defaults;
    an empty list asks for nothing and is an :class:`~duckharness.errors.InputError`.

    After :meth:`close` (or the end of a ``with`` block) every method raises
    :class:`~duckharness.errors.HarnessClosedError`; create a new Harness.

    Example:
        >>> h = Harness("data/run42")                                     # doctest: +SKIP
        >>> h.add_experiment("liquid", "volume > 1000")                   # doctest: +SKIP
        >>> h.metrics(["r2", "corr"], pairs=["pred_10s:target_10s"])      # doctest: +SKIP
    """

    @_interruptible
    def __init__(
        self,
        source: Any,
        *,
        storage_options: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        metric_dirs: Sequence[str | os.PathLike[str]] = (),
        workers: int | None = None,
        batch_size: int = 1,
        tracer: Callable[[str], None] | None = None,
        progress: bool | None = None,
        executor: str | Executor = "threads",
        address: str | None = None,
        retries: int = 2,
        cache: bool | str | os.PathLike[str] = True,
    ) -> None:
        self._closed = True  # until the connections below are open
        if workers is not None:
            _whole_number(workers, "workers", least=1)
        _whole_number(batch_size, "batch_size", least=1)
        self.tracer = tracer
        self.progress = progress
        self.executor_name = executor if isinstance(executor, str) else "custom"
        self.address = address
        self.retries = retries
        self.cache: StatsCache | None = None
        if cache is True and not cache_disabled_by_env():
            self.cache = StatsCache(default_cache_dir())
        elif cache and cache is not True:
            self.cache = StatsCache(cache)
        self._executors: dict[tuple[str, int | None], Executor] = {}
        if isinstance(executor, Executor):
            self._executors[("custom", workers)] = executor
        elif executor not in EXECUTORS:
            raise InputError(f"Unknown executor {executor!r}. Choose one of: {', '.join(EXECUTORS)}.")
        if address is not None and executor not in ("ray", "dask"):
            raise InputError(
                f"address={address!r} names a cluster, which only the 'ray' and 'dask' executors use; "
                f"choose one (executor='ray' or 'dask', --executor on the command line)."
            )
        if storage_options and not is_remote(source):
            warn(
                f"storage_options are for a remote source (s3://, gs://, ...); {source!r} is local, so they are not "
                f"used. Check the source's path."
            )
        t = time.perf_counter()
        self._source, self._metadata_arg, self._storage_options = source, metadata, storage_options
        self.dataset: Dataset = open_dataset(source, metadata=metadata, storage_options=storage_options, tracer=tracer)
        self.listing_seconds = time.perf_counter() - t
        self.metric_library = MetricLibrary(metric_dirs)
        self.workers = workers
        self.batch_size = batch_size
        self.last_run: RunStats | None = None
        self._schema_con = self.dataset.connection(1).open()
        self._schema_con.execute(
            sb.render(
                exp.Create(
                    this=exp.Table(this=sb.ident(BASELINE)),
                    kind="TABLE",
                    expression=sb.select([exp.Star()], sb.read_parquet(self.dataset.paths)).limit(0),
                )
            )
        ).fetchall()
        self._data_con: duckdb.DuckDBPyConnection | None = None
        self._closed = False
        self._day_indexes: dict[SessionWindow | None, tuple[tuple, DayIndex]] = {}
        self.experiments = Experiments(self.dataset.columns, self._bind)

    def _bind(self, step: Step) -> dict[str, str]:
        """Create ``step`` over zero-row relations, so DuckDB (or the Python function) shows its
        columns, or fails on an unknown column, before any data is read."""
        self._check_open()  # h.experiments.add(...) comes here without a Harness method
        con = self._schema_con
        if step.query is not None:
            fetch_all(con, sb.render(sb.create_view(step.name, step.query)), self.tracer)
        else:
            empty = con.sql(sb.render(sb.select([exp.Star()], exp.Table(this=sb.ident(step.base))).limit(0))).pl()
            out = collect_step(step, apply_python_step(step, empty.lazy()))
            con.register(step.name, out)
        rows = fetch_all(con, sb.render(exp.Describe(this=exp.Table(this=sb.ident(step.name)))), self.tracer)
        return {r[0]: r[1] for r in rows}

    def _refresh(self) -> None:
        """List the source again before reading it: a file rewritten, added or removed since the
        last listing (this Harness may live for hours in a notebook) is seen, with its new footer,
        and the cache keys follow. A change of columns needs a new Harness (the experiments were
        bound to the old ones)."""
        known = {f.path: (f.size, f.mtime, f.change) for f in self.dataset.files}
        if file_identities(self._source, self._storage_options) == known:
            return
        fresh = open_dataset(
            self._source, metadata=self._metadata_arg, storage_options=self._storage_options, tracer=self.tracer
        )
        if fresh.columns != self.dataset.columns:
            added = [c for c in fresh.columns if c not in self.dataset.columns]
            gone = [c for c in self.dataset.columns if c not in fresh.columns]
            retyped = [
                c for c in fresh.columns if c in self.dataset.columns and fresh.columns[c] != self.dataset.columns[c]
            ]
            what = "; ".join(
                f"{label}: {', '.join(cols)}"
                for label, cols in (("new", added), ("gone", gone), ("new type", retyped))
                if cols
            )
            raise SourceError(
                f"The columns of the source changed since this Harness was created ({what}); create a new Harness.",
                path=self.dataset.root,
            )
        self.dataset = fresh

    # -- the data ---------------------------------------------------------------------------
    @property
    def metadata(self) -> Metadata:
        return self.dataset.metadata

    @property
    def files(self) -> list[str]:
        return self.dataset.paths

    @property
    def columns(self) -> dict[str, str]:
        """Columns of the source (union by name over all files) with their DuckDB types."""
        return dict(self.dataset.columns)

    @property
    def targets(self) -> list[str]:
        return [c for c in self.dataset.columns if c.startswith("target_")]

    @property
    def predictions(self) -> list[str]:
        return [c for c in self.dataset.columns if c.startswith("pred_")]

    @property
    def features(self) -> list[str]:
        """Columns that are neither targets, predictions nor the time column."""
        skip = set(self.targets) | set(self.predictions) | {self.dataset.time_column}
        return [c for c in self.dataset.columns if c not in skip]

    @property
    def time_column(self) -> str | None:
        return self.dataset.time_column

    @property
    def session_window(self) -> SessionWindow | None:
        return self.dataset.metadata.session_window

    def _window(self, window: WindowArg) -> SessionWindow | None:
        """The session window a call asked for (see the class docstring for the forms)."""
        if window is None or window is True:
            return self.session_window
        if window is False:
            return None
        if isinstance(window, SessionWindow):
            return window
        tz = self.dataset.metadata.timezone
        if isinstance(window, str):
            return SessionWindow(*parse_window_text(window, prefix="Window "), tz)
        if not isinstance(window, tuple | list) or len(window) != 2:
            raise InputError(
                f"window must be True or None (the metadata's), False (none), a SessionWindow, a (start, end) "
                f"pair such as ('09:30', '16:00') (HH:MM[:SS] strings or datetime.time; None for an open end) "
                f"or a 'START-END' string such as '09:30-16:00', got {window!r}."
            )
        start, end = (None if bound is None or bound == "" else bound for bound in window)
        return SessionWindow(start, end, tz)

    # -- experiments ------------------------------------------------------------------------
    @_open
    def add_experiment(
        self,
        name: str,
        step: str | Callable[[pl.LazyFrame], pl.LazyFrame],
        base: str | None = None,
        *,
        per_batch: bool = True,
        replace: bool = False,
    ) -> Step:
        """Add an experiment step over ``base`` (default ``baseline``).

        ``step`` is a WHERE condition, a SELECT whose FROM names its base, or a Python function
        taking and returning a Polars LazyFrame. A Python step runs on each file batch (one day,
        by default) unless ``per_batch=False``, in which case it sees all rows at once; use that
        for logic that crosses days (rolling windows over days, whole-sample ranks). The step is
        validated at once; errors name the experiment and the culprit. A name already defined is
        refused unless ``replace=True`` (a notebook cell run again): the experiments built on it
        are then validated on the new step, and if one no longer binds nothing changes.

        The ``processes``, ``ray`` and ``dask`` executors send a Python step to their workers with
        cloudpickle; a function that does not pickle (a lock or an open file in its closure) runs
        on threads only. When this harness's default executor is one of those, such a step gives a
        warning here (it is still added: a run may choose ``executor="threads"``), and a run of it
        on them an :class:`~duckharness.errors.UnpicklableStepError`.

        Example:
            >>> h.add_experiment("liquid", "volume > 1000")                       # doctest: +SKIP
            >>> h.add_experiment("liquid", "volume > 2000", replace=True)         # doctest: +SKIP
            >>> h.add_experiment("z", lambda lf: lf.with_columns(                 # doctest: +SKIP
            ...     (pl.col("pred_10s") / pl.col("pred_10s").std()).alias("pred_z")), base="liquid")
        """
        added = self.experiments.add(name, step, base, per_batch=per_batch, replace=replace)
        if added.fn is not None and (executor := self._executor(None, None)).pickles_tasks:
            error = pickle_error(added.fn)
            if error is not None:
                warn(
                    f"Experiment {name!r}: Python step {added.sql} does not pickle ({type(error).__name__}: "
                    f"{error}), so it cannot be sent to the {executor.name} workers this harness runs on by "
                    f"default. Define the function at module level in a module the workers can import, without "
                    f"locks or open files in its closure; or run it with executor='threads'."
                )
        return added

    @_open
    def remove_experiment(self, name: str) -> None:
        """Remove an experiment; refused while other experiments are built on it (it names them)."""
        self.experiments.remove(name)

    @_open
    def load_experiments(self, path: str | os.PathLike[str]) -> list[str]:
        """Add every ``-- experiment: NAME`` statement of a SQL file; returns their names."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"Cannot read experiments file {p}: {e.strerror}.") from None
        except UnicodeDecodeError as e:
            raise InputError(f"Experiments file {p} is not UTF-8 text (byte {e.start}).") from None
        steps = parse_experiments_file(text, path=str(p), known=self.experiments.names)
        self.experiments.add_all(steps)
        return [s.name for s in steps]

    @_open
    def experiment_sql(self, name: str, *, window: WindowArg = None, pretty: bool = True) -> str:
        """The full SQL of an experiment's chain, from the Parquet files to its rows.

        For a chain with Python steps, the SQL of each step in order, with the Python steps named
        in comments (such a chain has no single query).
        """
        base = baseline_query(self.dataset, self._window(window))
        if name == BASELINE:
            return sb.render(base, pretty=pretty)
        if not self.experiments.has_python(name):
            return sb.render(self.experiments.query(name, base), pretty=pretty)
        parts = [f"-- baseline\n{sb.render(base, pretty=pretty)};"]
        for s in self.experiments.chain(name):
            parts.append(
                f"-- {s.name} (from {s.base}): {s.label}" + ("" if s.is_python else f"\n{s.render(pretty=pretty)};")
            )
        return "\n\n".join(parts)

    @_open
    def experiment_tree(self) -> str:
        """The experiments as a tree from baseline, each with its SQL or Python function."""
        return self.experiments.tree()

    @_open
    def relation(self, name: str = BASELINE, *, window: WindowArg = None) -> duckdb.DuckDBPyRelation:
        """A lazy DuckDB relation of an experiment's rows (on a connection the harness owns).

        Pure SQL chains stay lazy; Python steps on the way are run when the relation is made.
        """
        self._refresh()
        self.experiments.columns(name)  # unknown names raise here
        if not self.experiments.has_python(name):
            return self._schema_con.sql(self.experiment_sql(name, window=window, pretty=False))
        con = self._data_connection()
        build_chain(
            con,
            self.dataset,
            self.experiments,
            name,
            self.dataset.files,
            self._window(window),
            self.tracer,
            self.batch_size,
        )
        return con.sql(relation_sql(name))

    @_open
    @_interruptible
    def lazyframe(self, name: str = BASELINE, *, window: WindowArg = None) -> pl.LazyFrame:
        """A Polars LazyFrame of an experiment's rows that reads the files only when collected.

        Chains that work file by file are read one file batch at a time (a ``head()`` reads only
        the first files; selected columns are pushed down); other chains stream from one query.
        """
        self._refresh()
        from duckharness.experiments.lazy import experiment_lazyframe

        self.experiments.columns(name)
        return experiment_lazyframe(self, name, self._window(window))

    @_open
    def relation_schema(self, name: str = BASELINE) -> pl.Schema:
        """The Polars schema of an experiment's rows (from zero-row relations; no data read)."""
        self.experiments.columns(name)
        q = sb.select([exp.Star()], exp.Table(this=sb.ident(name))).limit(0)
        return self._schema_con.sql(sb.render(q)).pl().schema

    @_open
    @_interruptible
    def sample(
        self,
        experiment: str = BASELINE,
        strategy: str = "random_days",
        *,
        n: int = 100_000,
        n_days: int = 5,
        step: int = 100,
        seed: int | None = None,
        window: WindowArg = None,
    ) -> pl.DataFrame:
        """A sample of an experiment's rows, taken through the experiment's logic.

        Strategies: ``random_days`` (``n_days`` whole days chosen with ``seed`` among the days
        that hold rows inside the window, as ``info()`` counts them; reads only those days' files;
        fewer days than asked warn; the preferred one), ``head`` (the first ``n`` rows in time
        order; stops reading once it has them), ``gather_every`` (every ``step``-th row in time
        order). ``random_rows`` is refused: it breaks the time series.
        """
        self._refresh()
        from duckharness.outputs.sample import take_sample

        return take_sample(
            self, experiment, strategy, n=n, n_days=n_days, step=step, seed=seed, window=self._window(window)
        )

    @_open
    @_interruptible
    def sink(
        self,
        experiment: str,
        out: str | os.PathLike[str],
        *,
        partition_by: str | None = None,
        overwrite: bool = False,
        window: WindowArg = None,
        progress: bool | None = None,
    ) -> SinkResult:
        """Write an experiment's rows to Parquet in folder ``out``, streaming, atomically.

        ``partition_by="day"`` writes one ``YYYY-MM-DD.parquet`` per local day. The folder gets a
        ``metadata.json`` (the source's, plus the experiment and its SQL), so it opens as a new
        ``Harness``. Nothing is left behind if the sink fails; an existing ``out`` is replaced only
        with ``overwrite=True``.
        """
        self._refresh()
        from duckharness.outputs.sink import sink_experiment

        result = sink_experiment(
            self,
            experiment,
            out,
            partition_by=partition_by,
            overwrite=overwrite,
            window=self._window(window),
            progress=self.progress if progress is None else progress,
        )
        self.last_run = RunStats(timings=dict(result.timings), files=len(self.dataset.files))
        return result

    @_open
    @_interruptible
    def export(
        self,
        sql: str | os.PathLike[str] | None = None,
        db: str | os.PathLike[str] | None = None,
        *,
        window: WindowArg = None,
        materialize: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
    ) -> ExportResult:
        """Write the chain as a SQL script (``duckdb -init SQL``) and/or a DuckDB database file
        (``duckdb DB``): ``baseline`` and every SQL experiment as views, a ``dh_<metric>(pred,
        target)`` macro per metric and ``dh_day(ts)``. Paths are absolute, the time zone is pinned,
        credentials are never written, and the same chain gives byte-identical files.

        Python steps cannot be views: they are left out (see ``result.skipped``) unless
        ``materialize=DIR``, which sinks them to ``DIR/<name>/`` and exports views over those files.
        An existing file is replaced only with ``overwrite=True``.

        Example:
            >>> h.export("chain.sql", "chain.duckdb")                  # doctest: +SKIP
            $ duckdb chain.duckdb -c "SELECT dh_r2(pred_10s, target_10s) FROM liquid"
        """
        self._refresh()
        from duckharness.outputs.export import export

        return export(self, sql, db, window=self._window(window), materialize=materialize, overwrite=overwrite)

    @_open
    @_interruptible
    def info(self, *, window: WindowArg = None) -> dict[str, Any]:
        """A summary of the source: files, days, rows, columns with roles, metadata, window.

        ``days`` counts the days ``metrics(by="day")`` gives rows to: days that hold rows inside
        the session window (or ``window``), labelled as ``by="day"`` labels them (an overnight
        session's rows after midnight belong to the evening before). The footers' row-group
        statistics settle most days; what they leave open is read from the time column (see
        ``engine/days.py``).
        """
        self._refresh()
        files = self.dataset.files
        chosen = self._window(window)
        days = self._day_index(chosen).days
        roles = {}
        for c, t in self.dataset.columns.items():
            role = (
                "time"
                if c == self.time_column
                else "target"
                if c in self.targets
                else "prediction"
                if c in self.predictions
                else "feature"
            )
            roles[c] = {"type": t, "role": role}
        return {
            "root": self.dataset.root,
            "files": len(files),
            "bytes": sum(f.size for f in files),
            "rows": sum(f.rows for f in files),
            "days": len(days),
            "first_day": days[0].isoformat() if days else None,
            "last_day": days[-1].isoformat() if days else None,
            "time_column": self.time_column,
            "session_window": chosen.describe() if chosen else None,
            "metadata": self.dataset.metadata.as_dict(),
            "columns": roles,
            "experiments": self.experiments.names,
        }

    def _day_index(
        self, window: SessionWindow | None, *, days: Iterable[dt.date] | None = None, settle: bool = True
    ) -> DayIndex:
        """The source's days under ``window``: settled (the open ones among ``days``, or all) unless
        ``settle`` is false. Kept for the files as listed now, so what was read is not read again."""
        key = tuple((f.path, f.size, f.mtime, f.change, f.footer) for f in self.dataset.files)
        known = self._day_indexes.get(window)
        index = known[1] if known is not None and known[0] == key else index_days(self.dataset, window)
        if settle and not index.settled:
            index = settle_days(index, self.dataset, window, self._data_connection(), days=days, tracer=self.tracer)
        self._day_indexes[window] = (key, index)
        return index

    def _data_connection(self) -> duckdb.DuckDBPyConnection:
        if self._data_con is None:
            self._data_con = self.dataset.connection(self.workers).open()
        return self._data_con

    # -- metrics ----------------------------------------------------------------------------
    @_open
    @_interruptible
    def metrics(
        self,
        metrics: Sequence[str | Metric] | str | None = None,
        pairs: Sequence[str | tuple[str, str] | Pair] | str | None = None,
        experiments: Sequence[str] | str | None = None,
        by: str | Sequence[str] | None = None,
        *,
        window: WindowArg = None,
        workers: int | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
        executor: str | Executor | None = None,
    ) -> pl.DataFrame:
        """Exact metrics for every experiment × pair, pooled or grouped by ``by``.

        Args:
            metrics: metric names (default: count, r2, mse, mae, corr, hit_rate).
            pairs: ``"pred_10s:target_10s"`` strings or tuples (default: every pred_X with target_X).
            experiments: names (default: all, baseline first).
            by: None for pooled results, ``"day"``, a column name, a local time-of-day bucket
                ``"tod:30min"`` (output column ``tod``; units s, min, h), or a list of them. Each
                experiment is grouped by its own value of a column (one it computes or replaces,
                such as a symbol mapped to its sector); every experiment asked for must have it.
            window: None for the metadata's session window, False for none, ``("09:30", "16:00")``
                (strings or ``datetime.time``; None for an open end), ``"09:30-16:00"`` or a
                :class:`~duckharness.data.metadata.SessionWindow` (see :class:`Harness`).
            executor: ``threads`` (default), ``processes``, ``ray``, ``dask`` or an Executor;
                defaults to the harness's.

        Returns:
            A tidy DataFrame: ``experiment, pred, target, [by...], metric, value``; each
            (experiment, pair, group) also has an ``n_excluded`` row counting rows dropped
            because pred or target was NULL, NaN or infinite.
        """
        self._refresh()
        if metrics == "rank_ic" or (not isinstance(metrics, str) and metrics is not None and "rank_ic" in metrics):
            raise UnknownMetricError(
                "Metric 'rank_ic' is computed per day from ranks, not from mergeable sums: use "
                "h.rank_ic(...), h.series('rank_ic') or h.summary('rank_ic') (command line: "
                "duckharness summary --metric rank_ic, or compare --metric rank_ic).",
                metric="rank_ic",
            )
        _not_empty(metrics, "metrics", f"the default ones ({', '.join(DEFAULT_METRICS)}), or name one, e.g. 'r2'")
        _not_empty(by, "by", "pooled results, or name a grouping, e.g. by='day'")
        if batch_size is not None:
            _whole_number(batch_size, "batch_size", least=1)
        ms = self.metric_library.resolve(metrics)
        names = self._experiment_names(experiments)
        pair_list = self._pairs(pairs, names)
        by_list = list(dict.fromkeys([by] if isinstance(by, str) else (by or [])))
        run_executor = self._executor(executor, workers)
        self.last_run = RunStats()
        self.last_run.timings["listing"] = self.listing_seconds
        with self._control() as control:
            return run_metrics(
                self.dataset,
                self.experiments,
                names,
                pair_list,
                ms,
                by_list,
                self._window(window),
                executor=run_executor,
                batch_size=batch_size or self.batch_size,
                tracer=self.tracer,
                stats=self.last_run,
                progress=self.progress if progress is None else progress,
                cache=self.cache,
                control=control,
                source_days=self._day_index(self._window(window)).days if by_list == ["day"] else (),
            )

    # -- research statistics ------------------------------------------------------------------
    @_open
    @_interruptible
    def rank_ic(
        self,
        pairs: Sequence[str | tuple[str, str] | Pair] | str | None = None,
        experiments: Sequence[str] | str | None = None,
        *,
        cross_section: bool = False,
        window: WindowArg = None,
        progress: bool | None = None,
    ) -> pl.DataFrame:
        """Per-day rank IC: Spearman correlation of pred and target within each day.

        Ties get average ranks; rows with a NULL, NaN or infinite pred or target are left out.
        With ``cross_section=True`` the IC is computed within each timestamp across symbols (as
        factor research does, e.g. alphalens' per-date IC) and a day's value is the mean over its
        timestamps whose IC is defined. Ranks are not mergeable sums, so this runs its own scan
        with window functions per day (files are grouped so that no day is split). ``progress``
        shows its progress bar, one step per day group (default: the harness's setting).

        Returns:
            A tidy DataFrame ``experiment, pred, target, day, metric, value`` with metrics
            ``rank_ic``, ``n`` (rows used) and, cross-sectionally, ``n_sections``.

        Example:
            >>> h.rank_ic("pred_10s:target_10s", ["baseline", "liquid"])          # doctest: +SKIP
        """
        self._refresh()
        from duckharness.engine.daywise import rank_ic

        t = time.perf_counter()
        out = rank_ic(
            self.dataset,
            self.experiments,
            self._experiment_names(experiments),
            self._pairs(pairs, self._experiment_names(experiments)),
            self._window(window),
            self._executor(None, None),
            cross_section=cross_section,
            batch_size=self.batch_size,
            tracer=self.tracer,
            cache=self.cache,
            progress=self.progress if progress is None else progress,
        )
        self._record_run(t)
        if cross_section:
            _warn_without_sections(out)
        return out

    @_open
    @_interruptible
    def series(
        self,
        metrics: Sequence[str] | str = "rank_ic",
        pairs: Sequence[str | tuple[str, str] | Pair] | str | None = None,
        experiments: Sequence[str] | str | None = None,
        *,
        cross_section: bool = False,
        window: WindowArg = None,
        plot: str | os.PathLike[str] | None = None,
        rolling: int = 20,
        progress: bool | None = None,
    ) -> pl.DataFrame:
        """Per-day values of metrics (``rank_ic`` or any metric file), tidy:
        ``experiment, pred, target, day, metric, value``. ``progress`` shows the scans' progress
        bars (default: the harness's setting).

        ``plot="series.png"`` also saves the series with a ``rolling``-day rolling mean
        (:func:`duckharness.outputs.plots.plot_series`; needs ``pip install "duckharness[plot]"``).

        Example:
            >>> h.series("corr", "pred_10s", plot="ic.png")                        # doctest: +SKIP
        """
        from duckharness.engine.analysis import daily_series

        _not_empty(metrics, "metrics", "the default ('rank_ic'), or name one, e.g. 'corr'")
        names = list(dict.fromkeys([metrics] if isinstance(metrics, str) else metrics))
        self._check_metric_names(names)
        _check_plot(plot)
        df = daily_series(
            self,
            names,
            self._pairs(pairs, self._experiment_names(experiments)),
            self._experiment_names(experiments),
            window,
            cross_section=cross_section,
            progress=progress,
        )
        if plot is not None:
            from duckharness.outputs.plots import plot_series

            plot_series(df, plot, rolling=rolling)
        return df

    @_open
    @_interruptible
    def summary(
        self,
        metrics: Sequence[str] | str = "rank_ic",
        pairs: Sequence[str | tuple[str, str] | Pair] | str | None = None,
        experiments: Sequence[str] | str | None = None,
        *,
        lag: int | None = None,
        cross_section: bool = False,
        window: WindowArg = None,
        plot: str | os.PathLike[str] | None = None,
        rolling: int = 20,
        progress: bool | None = None,
    ) -> pl.DataFrame:
        """Statistics of each metric's per-day series across days.

        Columns: ``experiment, pred, target, metric, n_days, mean, std`` (ddof 1), ``icir``
        (mean/std), ``t_stat`` (mean over its Newey–West standard error, Bartlett kernel with
        ``nw_lag`` lags, default ``floor(4 (T/100)^(2/9))``), ``p_value`` (two-sided, Student t with
        T − 1 df), ``nw_lag``, ``frac_positive`` (share of days above zero). Days where the metric is
        undefined are left out. ``plot="series.png"`` also saves the per-day series (see
        :meth:`series`); ``progress`` shows the scans' progress bars (default: the harness's setting).

        Example:
            >>> h.summary(["rank_ic", "corr"], "pred_10s:target_10s")               # doctest: +SKIP
        """
        from duckharness.engine.analysis import summarize

        if lag is not None and lag < 0:
            raise InputError(f"lag must be 0 or more, got {lag}.")
        series = self.series(
            metrics,
            pairs,
            experiments,
            cross_section=cross_section,
            window=window,
            plot=plot,
            rolling=rolling,
            progress=progress,
        )
        names = self._experiment_names(experiments)
        asked = [metrics] if isinstance(metrics, str) else list(dict.fromkeys(metrics))
        expected = [(n, p.pred, p.target, m) for n in names for p in self._pairs(pairs, names) for m in asked]
        return summarize(series, lag=lag, expected=expected)

    @_open
    @_interruptible
    def compare(
        self,
        metric: str,
        a: str,
        b: str,
        pairs: Sequence[str | tuple[str, str] | Pair] | str | None = None,
        *,
        lag: int | None = None,
        n_boot: int = 2000,
        seed: int | None = 0,
        level: float = 0.95,
        cross_section: bool = False,
        window: WindowArg = None,
        plot: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
    ) -> Comparison:
        """Is experiment ``a`` different from ``b`` on ``metric``? From one scan by day.

        The per-day differential ``d_t = metric_a(t) − metric_b(t)`` gets a Diebold–Mariano test
        (Newey–West variance with ``lag`` lags, default ``floor(4 (T/100)^(2/9))``; the
        Harvey–Leybourne–Newbold correction; p-value from Student t with T − 1 df). The difference
        of the *pooled* metric gets a day-block bootstrap interval: days are resampled with
        replacement (the same days for both), their sufficient statistics merged exactly, and the
        metric finalized; ``seed`` makes it reproducible. For ``rank_ic`` the pooled value is the
        mean daily IC. ``progress`` shows the scan's progress bar (default: the harness's setting).

        Returns:
            A :class:`~duckharness.engine.analysis.Comparison` with ``daily`` and ``table`` frames;
            ``plot="cmp.png"`` also saves its chart.

        Example:
            >>> c = h.compare("mse", "clipped", "baseline", "pred_10s:target_10s", seed=7)   # doctest: +SKIP
            >>> c.table.select("diff", "dm_stat", "p_value", "ci_low", "ci_high")  # doctest: +SKIP
        """
        from duckharness.engine.analysis import compare

        self._check_metric_names([metric])
        _check_plot(plot)
        if lag is not None and lag < 0:
            raise InputError(f"lag must be 0 or more, got {lag}.")
        if n_boot < 1:
            raise InputError(f"n_boot must be at least 1, got {n_boot}.")
        if not 0 < level < 1:
            raise InputError(f"level must be between 0 and 1 (e.g. 0.95), got {level}.")
        result = compare(
            self,
            metric,
            a,
            b,
            self._pairs(pairs, [a, b] if a in self.experiments and b in self.experiments else []),
            window,
            lag=lag,
            n_boot=n_boot,
            seed=seed,
            level=level,
            cross_section=cross_section,
            progress=progress,
        )
        if plot is not None:
            result.plot(plot)
        return result

    @_open
    @_interruptible
    def deciles(
        self,
        pairs: Sequence[str | tuple[str, str] | Pair] | str | None = None,
        experiments: Sequence[str] | str | None = None,
        *,
        buckets: int = 10,
        by: str | None = None,
        window: WindowArg = None,
        plot: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
    ) -> pl.DataFrame:
        """Mean target by prediction quantile bucket, buckets cut within each day.

        Each day's rows are cut at that day's prediction quantiles (``pandas.qcut`` semantics:
        linear interpolation, buckets ``(e_{k−1}, e_k]``, tied predictions in one bucket);
        counts and sums merge across days, so the pooled mean target per bucket is exact.

        Args:
            buckets: number of buckets (10: deciles).
            by: None for pooled across days, or ``"day"`` for one table per day.
            plot: save the bucket chart as a PNG (pooled tables only).
            progress: show the progress bar, one step per day group (default: the harness's setting).

        Returns:
            ``experiment, pred, target, [day], bucket, n, mean_pred, mean_target`` (bucket 1
            holds the lowest predictions).

        Example:
            >>> h.deciles("pred_10s:target_10s", "baseline", plot="deciles.png")      # doctest: +SKIP
        """
        self._refresh()
        from duckharness.engine.daywise import quantile_buckets

        if by not in (None, "day"):
            raise InputError(f"deciles: by must be None or 'day', got {by!r}.")
        if plot is not None and by is not None:
            raise InputError("deciles: plot= draws the pooled table; call without by='day'.")
        _check_plot(plot)
        t = time.perf_counter()
        df = quantile_buckets(
            self.dataset,
            self.experiments,
            self._experiment_names(experiments),
            self._pairs(pairs, self._experiment_names(experiments)),
            self._window(window),
            self._executor(None, None),
            buckets=buckets,
            by_day=by == "day",
            batch_size=self.batch_size,
            tracer=self.tracer,
            cache=self.cache,
            progress=self.progress if progress is None else progress,
        )
        self._record_run(t)
        if plot is not None:
            from duckharness.outputs.plots import plot_deciles

            plot_deciles(df, plot)
        return df

    def _record_run(self, started: float) -> None:
        """``last_run`` of a per-day window scan (rank IC, buckets): its files and total time."""
        self.last_run = RunStats(files=len(self.dataset.files))
        self.last_run.timings["listing"] = self.listing_seconds
        self.last_run.timings["total"] = time.perf_counter() - started

    def _check_metric_names(self, names: Sequence[str]) -> None:
        """Per-day statistics take ``rank_ic`` or a metric of the library; an error lists both."""
        for n in names:
            if n != "rank_ic" and n not in self.metric_library.names:
                raise UnknownMetricError(
                    f"Unknown metric {n!r}. Available: {', '.join(['rank_ic', *self.metric_library.names])}.",
                    metric=n,
                )

    def _executor(self, executor: str | Executor | None, workers: int | None) -> Executor:
        """The executor for a run: a given instance, or one made from a name and kept (clusters
        are started once per harness and closed with it)."""
        if isinstance(executor, Executor):
            return executor
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise InputError(f"workers must be a whole number of at least 1, got {workers!r}.")
        if executor is None and self.executor_name == "custom":
            return next(iter(self._executors.values()))
        kind = executor or self.executor_name
        if kind == "threads":
            return make_executor("threads", workers or self.workers, retries=self.retries)
        key = (kind, workers or self.workers)
        if key not in self._executors:
            self._executors[key] = make_executor(
                kind, workers or self.workers, address=self.address, retries=self.retries
            )
        return self._executors[key]

    def _pairs(self, pairs: Any, experiments: Sequence[str] = ()) -> list[Pair]:
        """The pairs asked for; by default every pred_X/target_X pair of the source that each of
        ``experiments`` has (a pair one of them drops is left out, with a warning)."""
        _not_empty(pairs, "pairs", "every pred_X/target_X pair, or name one, e.g. pairs=['pred_10s:target_10s']")
        if pairs is None:
            found = default_pairs(self.dataset.columns)
            if not found:
                raise InputError(
                    "No pred_X/target_X column pairs found; name them: pairs=['PRED:TARGET'] (--pair PRED:TARGET)."
                )
            kept = []
            for pair in found:
                lacking = next(
                    (
                        (n, c)
                        for n in experiments
                        for c in (pair.pred, pair.target)
                        if c not in self.experiments.columns(n)
                    ),
                    None,
                )
                if lacking is None:
                    kept.append(pair)
                else:
                    warn(
                        f"Pair {pair.pred}:{pair.target} is left out of the default pairs: experiment {lacking[0]!r} "
                        f"has no column {lacking[1]!r}. Name the pairs (pairs=[...], --pair) to choose."
                    )
            if not kept:
                raise InputError(
                    f"No pred_X/target_X pair is in every experiment asked for ({', '.join(experiments)}); "
                    f"name them: pairs=['PRED:TARGET'] (--pair PRED:TARGET), or choose the experiments."
                )
            return kept
        if isinstance(pairs, (str, Pair)) or (
            isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(x, str) for x in pairs)
        ):
            pairs = [pairs]
        return list(dict.fromkeys(Pair.parse(p) for p in pairs))  # a pair given twice is one pair

    def _experiment_names(self, experiments: Sequence[str] | str | None) -> list[str]:
        _not_empty(experiments, "experiments", "all of them, or name one, e.g. experiments=['baseline']")
        if experiments is None:
            return self.experiments.names
        names = list(dict.fromkeys([experiments] if isinstance(experiments, str) else experiments))
        for n in names:
            if n not in self.experiments:
                self.experiments.step(n)  # raises UnknownExperimentError naming it
        return names

    # -- tracing ----------------------------------------------------------------------------
    @_open
    @contextlib.contextmanager
    def trace(self, fn: Callable[[str], None] = print) -> Iterator[None]:
        """Within the block, every SQL statement the harness executes is passed to ``fn``."""
        old, self.tracer = self.tracer, fn
        try:
            yield
        finally:
            self.tracer = old

    @contextlib.contextmanager
    def _control(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor for a run's small queries (shifts, final formulas): it shares the schema
        connection's database (no ~15 ms open per run) but has its own session."""
        cursor = self.dataset.connection(1).session(self._schema_con.cursor())
        try:
            yield cursor
        finally:
            cursor.close()

    def _check_open(self) -> None:
        if self._closed:
            raise HarnessClosedError(
                f"This Harness of {self.dataset.root} is closed (close() or the end of its `with` block "
                f"ran); create a new one: Harness({self.dataset.root!r}, ...)."
            )

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run (then every method raises :class:`HarnessClosedError`)."""
        return self._closed

    def close(self) -> None:
        """Close the harness's DuckDB connections and the clusters it started. Closing twice is
        harmless; any other call afterwards raises :class:`HarnessClosedError`."""
        if self._closed:
            return
        self._closed = True
        for ex in self._executors.values():
            ex.close()
        self._executors = {}
        self._schema_con.close()
        if self._data_con is not None:
            self._data_con.close()
            self._data_con = None

    def __enter__(self) -> Harness:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return f"<closed Harness({self.dataset.root!r})>"
        return (
            f"Harness({self.dataset.root!r}, files={len(self.dataset.files)}, days={self._days_shown()}, "
            f"experiments={self.experiments.names})"
        )

    def _days_shown(self) -> str:
        """The day count of ``info()`` for the repr, which reads at most ``REPR_READ_ROWS`` rows'
        times to settle it; beyond that, the range the footers allow (``58..82``; ``0..?`` when
        files without statistics could hold any day)."""
        index = self._day_index(self.session_window, settle=False)
        if not index.settled:
            opened = {p for paths in index.open.values() for p in paths} | index.unplaced
            if sum(f.rows for f in self.dataset.files if f.path in opened) <= REPR_READ_ROWS:
                index = self._day_index(self.session_window)
        if index.settled:
            return str(len(index.held))
        most = "?" if index.unplaced else str(len(set(index.held) | set(index.open)))
        return f"{len(index.held)}..{most}"


def _check_plot(plot: str | os.PathLike[str] | None) -> None:
    """Refuse a plot path that cannot be written before any data is read."""
    if plot is not None:
        from duckharness.outputs.plots import check_plot_path

        check_plot_path(plot)


def _warn_without_sections(ic: pl.DataFrame) -> None:
    """Warn when a cross-sectional IC found rows but no timestamp shared by two of them (ticks
    at each symbol's own times, say), naming the experiments: every value is null then."""
    sections = ic.filter(pl.col("metric") == "n_sections").group_by("experiment").agg(pl.col("value").sum())
    rows = ic.filter(pl.col("metric") == "n").group_by("experiment").agg(pl.col("value").sum())
    joined = rows.join(sections, on="experiment", suffix="_sections")
    empty = joined.filter((pl.col("value") > 0) & (pl.col("value_sections") == 0))["experiment"].sort().to_list()
    if empty:
        warn(
            f"Cross-sectional rank IC of {', '.join(map(repr, empty))}: no timestamp holds two or more rows, "
            f"so every value is null. The cross-section is the rows sharing one exact timestamp; round the "
            f"time in an experiment (e.g. date_trunc('minute', ts) AS ts) to group rows into sections."
        )
