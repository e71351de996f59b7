"""The command line: each command opens a :class:`~duckharness.Harness`, calls one method, prints.

Library errors print ``Error: ...`` and exit 1 (``--debug`` shows the traceback instead). Ctrl-C
(SIGINT) prints ``Interrupted.`` and exits 130, SIGTERM prints ``Terminated.`` and exits 143; both
stop the command by raising KeyboardInterrupt in the main thread, so the clean-up of a sink, sample
or export in progress runs and nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any


def _harness(args: argparse.Namespace) -> Any:
    from duckharness.harness import Harness

    h = Harness(
        args.source,
        storage_options=_storage_options(getattr(args, "storage_options", None)),
        executor=getattr(args, "executor", None) or "threads",
        address=getattr(args, "address", None),
        retries=2 if getattr(args, "retries", None) is None else int(args.retries),
        metadata=getattr(args, "metadata", None),
        metric_dirs=list(dict.fromkeys(getattr(args, "metric_dir", None) or ())),  # a folder given twice: once
        workers=getattr(args, "workers", None),
        tracer=(lambda sql: print(sql, file=sys.stderr)) if getattr(args, "trace", False) else None,
        progress=False if getattr(args, "quiet", False) else None,
        cache=False if getattr(args, "no_cache", False) else (getattr(args, "cache", None) or True),
    )
    if getattr(args, "experiments", None):
        try:
            h.load_experiments(args.experiments)
        except BaseException:
            h.close()
            raise
    return h


def _storage_options(text: str | None) -> dict[str, Any] | None:
    """``--storage-options`` as JSON text or ``@file.json`` (kept out of shell history that way)."""
    if not text:
        return None
    import json

    from duckharness.errors import InputError

    try:
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as f:
                value = json.load(f)
        else:
            value = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"--storage-options must be JSON or @file.json: {e}") from None
    if not isinstance(value, dict):
        raise InputError("--storage-options must be a JSON object.")
    return value


def _window_text(text: str) -> str:
    """``--window``, checked by argparse with the rules ``window="START-END"`` has in Python
    (:func:`~duckharness.data.metadata.parse_window_text`): a malformed window is a usage error
    (exit 2), like any other malformed option. The Harness parses the text itself."""
    start, dash, end = text.strip().partition("-")
    if not dash or not (start.strip() or end.strip()):  # the hint names the command line's spellings
        raise argparse.ArgumentTypeError(
            f"{text!r} must be START-END, e.g. 09:30-16:00 (or 10:00- / --window=-15:00 for one bound; "
            f"--no-window for none)"
        )
    from duckharness.data.metadata import parse_window_text
    from duckharness.errors import MetadataError

    try:
        parse_window_text(text)
    except MetadataError as e:
        raise argparse.ArgumentTypeError(str(e).rstrip(".")) from None
    return text


def _window(args: argparse.Namespace) -> Any:
    if getattr(args, "no_window", False):
        return False
    return getattr(args, "window", None)  # "START-END" or None (the metadata's)


def cmd_metrics(args: argparse.Namespace) -> int:
    from duckharness.outputs.results import FORMATS

    with _harness(args) as h:
        df = h.metrics(
            args.metric or None,
            pairs=args.pair or None,
            experiments=args.experiment or None,
            by=args.by or None,
            window=_window(args),
        )
    sys.stdout.write(FORMATS[args.format](df).rstrip("\n") + "\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    with _harness(args) as h:
        info = h.info(window=_window(args))
        tree = h.experiment_tree()
    if args.format == "json":
        print(json.dumps(info, indent=2, default=str))
        return 0
    gib = info["bytes"] / 2**30
    print(f"Source:   {info['root']}")
    print(f"Files:    {info['files']} ({gib:.2f} GiB), rows {info['rows']:,}")
    print(f"Days:     {info['days']} ({info['first_day']} to {info['last_day']})")
    print(f"Time:     {info['time_column']}; session window: {info['session_window'] or 'none'}")
    print("Metadata:")
    for key, value in info["metadata"].items():  # one key a line; a long value (a sink's chain) cut short
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        text = " ".join(text.split())
        print(f"  {key}: {text if len(text) <= 100 else text[:97] + '...'}")
    print("Columns:")
    width = max(len(c) for c in info["columns"])
    for c, d in info["columns"].items():
        print(f"  {c.ljust(width)}  {d['role']:<10}  {d['type']}")
    print("Experiments:")
    print("  " + tree.replace("\n", "\n  "))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from duckharness.outputs.paths import check_output, check_outside_source
    from duckharness.outputs.sample import sample_format, write_sample

    target = check_output(args.output, kind="file", overwrite=args.overwrite)  # before the work
    sample_format(target)
    with _harness(args) as h:
        check_outside_source(h.dataset, target, "Sample")
        df = h.sample(
            args.experiment,
            args.strategy,
            n=args.n,
            n_days=args.days,
            step=args.step,
            seed=args.seed,
            window=_window(args),
        )
    write_sample(df, target, overwrite=args.overwrite)
    print(f"Wrote {df.height:,} rows x {df.width} columns of {args.experiment!r} ({args.strategy}) to {args.output}")
    return 0


def cmd_sink(args: argparse.Namespace) -> int:
    with _harness(args) as h:
        result = h.sink(
            args.experiment,
            args.output,
            partition_by=args.partition_by,
            overwrite=args.overwrite,
            window=_window(args),
        )
    print(
        f"Wrote {result.rows:,} rows of {args.experiment!r} in {len(result.files)} files to {result.path} "
        f"({result.timings.get('total', 0):.2f} s)"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from duckharness.demo import write_demo_dataset
    from duckharness.harness import Harness
    from duckharness.outputs.results import format_table

    out = args.dir or tempfile.mkdtemp(prefix="duckharness-demo-")
    paths = write_demo_dataset(out, days=args.days, rows=args.rows, overwrite=args.overwrite)
    print(f"Wrote {len(paths)} daily Parquet files, metadata.json and experiments.sql to {out}")
    with Harness(out) as h:
        h.load_experiments(os.path.join(out, "experiments.sql"))
        print(
            f"Session window: {h.session_window.describe() if h.session_window else 'none'}; "
            f"experiments: {', '.join(h.experiments.names)}\n"
        )
        df = h.metrics(["count", "r2", "rmse", "mae", "bias", "corr", "hit_rate"])
        print(format_table(df.filter(df["metric"] != "n_excluded")))
        print("\nPer day, pred_10s:target_10s, r2 and corr:")
        per_day = h.metrics(["r2", "corr"], pairs=["pred_10s:target_10s"], experiments=["baseline", "tight"], by="day")
        print(format_table(per_day.filter(per_day["metric"] != "n_excluded")))
        t = h.last_run.timings if h.last_run else {}
        print("\nTimings (s): " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
    print(f"\nTry: duckharness metrics {out} --experiments {os.path.join(out, 'experiments.sql')} --by day")
    return 0


def _print_frame(df: Any, fmt: str) -> None:
    from duckharness.outputs.results import FRAME_FORMATS

    sys.stdout.write(FRAME_FORMATS[fmt](df).rstrip("\n") + "\n")


def cmd_summary(args: argparse.Namespace) -> int:
    with _harness(args) as h:
        df = h.summary(
            args.metric or "rank_ic",
            pairs=args.pair or None,
            experiments=args.experiment or None,
            lag=args.lag,
            cross_section=args.cross_section,
            window=_window(args),
            plot=args.plot,
            rolling=args.rolling,
        )
    _print_frame(df, args.format)
    if args.plot:
        print(f"Wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    with _harness(args) as h:
        result = h.compare(
            args.metric,
            args.a,
            args.b,
            pairs=args.pair or None,
            lag=args.lag,
            n_boot=args.n_boot,
            seed=args.seed,
            level=args.level,
            cross_section=args.cross_section,
            window=_window(args),
            plot=args.plot,
        )
    _print_frame(result.daily if args.daily else result.table, args.format)
    if args.plot:
        print(f"Wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_deciles(args: argparse.Namespace) -> int:
    with _harness(args) as h:
        df = h.deciles(
            pairs=args.pair or None,
            experiments=args.experiment or None,
            buckets=args.buckets,
            window=_window(args),
            plot=args.plot,
        )
    _print_frame(df, args.format)
    if args.plot:
        print(f"Wrote {args.plot}", file=sys.stderr)
    return 0


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


class _Once(argparse.Action):
    """A single-valued option that may be given once (``compare --metric mse --metric corr`` is
    a usage error, not the last one silently)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        seen: set[str] = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in seen:
            parser.error(
                f"{option_string} given twice ({getattr(namespace, self.dest)!r} and {values!r}); "
                f"it takes one value (run the command once for each)"
            )
        seen.add(self.dest)
        setattr(namespace, self.dest, values)


def _positive(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _not_negative(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _at_least_2(text: str) -> int:
    value = _whole(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def _by_key(text: str) -> str:
    """A grouping key; a time-of-day bucket's length is checked here (a usage error, like any
    malformed option value), the rest by the run."""
    if text.startswith("tod:"):
        from duckharness.engine.plan import parse_bucket
        from duckharness.errors import InputError

        try:
            parse_bucket(text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e).rstrip(".")) from None
    return text


def _level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (e.g. 0.95), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (e.g. 0.95), got {text}")
    return value


def _source_options(p: argparse.ArgumentParser, *, experiments: bool = True, window: bool = True) -> None:
    p.add_argument("source", help="directory, glob or Parquet file of backtest results")
    p.add_argument("--metadata", metavar="FILE", help="metadata JSON file (default: metadata.json beside the data)")
    if experiments:
        p.add_argument("--experiments", metavar="FILE", help="SQL file of '-- experiment: NAME' statements")
    if window:
        w = p.add_mutually_exclusive_group()
        w.add_argument(
            "--window",
            type=_window_text,
            metavar="HH:MM-HH:MM",
            help="override the metadata session window (HH:MM- or --window=-HH:MM for one bound)",
        )
        w.add_argument("--no-window", action="store_true", help="ignore the session window")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options for remote sources, JSON or @file.json")
    p.add_argument("--workers", type=_positive, help="parallel workers (default: CPU count)")
    p.add_argument(
        "--executor",
        choices=["threads", "processes", "ray", "dask"],
        help="where file batches run (default threads)",
    )
    p.add_argument("--address", help="an existing Ray (ray://host:10001, auto) or Dask (tcp://host:8786) cluster")
    p.add_argument("--retries", type=_not_negative, metavar="N", help="retries of a failed batch (default 2)")
    p.add_argument("--trace", action="store_true", help="print every SQL statement to stderr")
    c = p.add_mutually_exclusive_group()
    c.add_argument(
        "--cache",
        metavar="DIR",
        help="folder of cached partial statistics (default $DUCKHARNESS_CACHE, else $XDG_CACHE_HOME/duckharness, "
        "else ~/.cache/duckharness)",
    )
    c.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def cmd_export(args: argparse.Namespace) -> int:
    if not args.sql and not args.db:
        from duckharness.errors import InputError

        raise InputError("Give --sql OUT.sql, --db OUT.duckdb, or both.")
    import os

    if args.sql and args.db and os.path.abspath(args.sql) == os.path.abspath(args.db):
        from duckharness.errors import InputError

        raise InputError("--sql and --db must be different files.")
    with _harness(args) as h:
        result = _export(h, args)
    for path in (result.sql_path, result.db_path):
        if path:
            print(f"Wrote {path}")
    print(f"Views: {', '.join(result.views)}")
    print(f"Metric macros: {', '.join(result.macros)}")
    for name, why in result.skipped.items():
        print(f"Left out {name}: {why}")
    opens = [
        f"duckdb -init {result.sql_path}" if result.sql_path else "",
        f"duckdb {result.db_path}" if result.db_path else "",
    ]
    print("Open with:  " + "   or   ".join(o for o in opens if o))
    return 0


def _export(h: Any, args: argparse.Namespace) -> Any:
    return h.export(args.sql, args.db, window=_window(args), materialize=args.materialize, overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    from duckharness import __version__

    p = argparse.ArgumentParser(prog="duckharness", description="SQL-first evaluation of backtests on DuckDB.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of short error messages")
    p.add_argument("--version", action="version", version=f"duckharness {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="write a sample dataset and evaluate experiments on it",
        description="Write a sample dataset (several days crossing a DST switch, three horizons) "
        "and run experiments and metrics on it.",
    )
    d.add_argument("dir", nargs="?", help="where to write the sample data (default: a new temporary folder)")
    d.add_argument("--days", type=_positive, default=6, help="trading days to write (default 6)")
    d.add_argument("--rows", type=_positive, default=20_000, help="rows per day (default 20000)")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier demo dataset in DIR")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser(
        "metrics",
        help="compute metrics for experiments and pred:target pairs",
        description="Compute metrics for every experiment and pred:target pair, pooled or grouped.",
    )
    _source_options(m)
    m.add_argument("--experiment", action="append", metavar="NAME", help="only these experiments (repeatable)")
    m.add_argument("--metric", action="append", metavar="NAME", help="metric name (repeatable; default: a core set)")
    m.add_argument("--metric-dir", action="append", metavar="DIR", help="folder of your own metric SQL files")
    m.add_argument(
        "--pair",
        action="append",
        metavar="PRED:TARGET",
        help="pred:target pair (repeatable; PRED alone pairs pred_X with target_X; default: every such pair)",
    )
    m.add_argument(
        "--by",
        action="append",
        type=_by_key,
        metavar="KEY",
        help="group by 'day', a column (each experiment's own value of it) or a local time-of-day bucket "
        "such as tod:30min (repeatable)",
    )
    m.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")
    m.set_defaults(func=cmd_metrics)

    i = sub.add_parser(
        "info",
        help="describe a source: files, days, rows, columns with roles, metadata, window",
        description="Describe a source: files, days (those holding rows inside the session window, as "
        "'metrics --by day' labels them), rows, columns with their roles, metadata, session window and experiments.",
    )
    _source_options(i)
    i.add_argument("--format", choices=["text", "json"], default="text", help="output format")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser(
        "sample",
        help="write a sample of an experiment's rows to a Parquet or CSV file",
        description="Take a sample of an experiment's rows through its logic and write it to a Parquet or CSV "
        "file (by the extension of -o).",
    )
    _source_options(s)
    s.add_argument(
        "--experiment", default="baseline", action=_Once, metavar="NAME", help="experiment to sample (default baseline)"
    )
    s.add_argument(
        "--strategy",
        default="random_days",
        choices=["random_days", "head", "gather_every"],
        help="random_days (whole days; default), head (first N rows), gather_every (every N-th row); rows "
        "picked at random are not offered: they break the time series",
    )
    s.add_argument(
        "--days", "--n-days", dest="days", type=_positive, default=5, help="days for random_days (default 5)"
    )
    s.add_argument("--n", type=_positive, default=100_000, help="rows for head (default 100000)")
    s.add_argument("--step", type=_positive, default=100, help="N for gather_every (default 100)")
    s.add_argument("--seed", type=int, help="random seed (random_days)")
    s.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="file to write: Parquet (.parquet, .pq) or CSV (.csv)"
    )
    s.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    s.set_defaults(func=cmd_sample)

    k = sub.add_parser(
        "sink",
        help="materialise an experiment to a folder of Parquet files (atomic)",
        description="Write an experiment's rows to a folder of Parquet files with a metadata.json, so the "
        "folder is itself a source. Streaming and atomic: nothing is left behind on failure.",
    )
    _source_options(k)
    k.add_argument("--experiment", required=True, action=_Once, metavar="NAME", help="experiment to write")
    k.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    k.add_argument("--partition-by", choices=["day"], help="one file per local day")
    k.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    k.set_defaults(func=cmd_sink)

    pair_help = "pred:target pair (repeatable; PRED alone pairs pred_X with target_X; default: every such pair)"
    formats = ["table", "records", "csv", "json"]

    su = sub.add_parser(
        "summary",
        help="statistics of per day metric series: mean, std, ICIR, Newey–West t, share of positive days",
        description="Per-day series of each metric (rank_ic by default) summarised across days: mean, std, "
        "ICIR = mean/std, t statistic with Newey–West (HAC) standard errors, p-value, fraction of positive days.",
    )
    _source_options(su)
    su.add_argument("--experiment", action="append", metavar="NAME", help="only these experiments (repeatable)")
    su.add_argument("--metric", action="append", metavar="NAME", help="rank_ic or a metric name (repeatable)")
    su.add_argument("--metric-dir", action="append", metavar="DIR", help="folder of your own metric SQL files")
    su.add_argument("--pair", action="append", metavar="PRED:TARGET", help=pair_help)
    su.add_argument("--lag", type=_not_negative, metavar="L", help="Newey–West lag (default floor(4 (T/100)^(2/9)))")
    su.add_argument("--cross-section", action="store_true", help="rank IC within each timestamp across symbols")
    su.add_argument("--plot", metavar="FILE.png", help="save the per day series chart (PNG; .pdf, .svg by extension)")
    su.add_argument("--rolling", type=_positive, default=20, help="rolling-mean window in days (default 20)")
    su.add_argument("--format", choices=formats, default="table", help="output format")
    su.set_defaults(func=cmd_summary)

    c = sub.add_parser(
        "compare",
        help="is experiment A better than B? Diebold–Mariano test and bootstrap interval",
        description="Compare experiments A and B on one metric: per day differences with a Diebold–Mariano test "
        "(Newey–West variance, Harvey–Leybourne–Newbold correction, Student t p-value) and a seeded day block "
        "bootstrap interval of the difference in the pooled metric. One scan.",
    )
    _source_options(c)
    c.add_argument("--a", required=True, action=_Once, metavar="NAME", help="experiment A (differences are A − B)")
    c.add_argument("--b", required=True, action=_Once, metavar="NAME", help="experiment B")
    c.add_argument(
        "--metric", required=True, action=_Once, metavar="NAME", help="metric to compare, e.g. mse or rank_ic"
    )
    c.add_argument("--metric-dir", action="append", metavar="DIR", help="folder of your own metric SQL files")
    c.add_argument("--pair", action="append", metavar="PRED:TARGET", help=pair_help)
    c.add_argument("--lag", type=_not_negative, metavar="L", help="Newey–West lag (default floor(4 (T/100)^(2/9)))")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    c.add_argument("--n-boot", type=_positive, default=2000, help="bootstrap resamples (default 2000)")
    c.add_argument("--level", type=_level, default=0.95, help="confidence level of the interval (default 0.95)")
    c.add_argument("--cross-section", action="store_true", help="rank IC within each timestamp across symbols")
    c.add_argument("--daily", action="store_true", help="print the per day values and differences instead")
    c.add_argument("--plot", metavar="FILE.png", help="save the comparison chart (PNG; .pdf or .svg by the extension)")
    c.add_argument("--format", choices=formats, default="records", help="output format (default records)")
    c.set_defaults(func=cmd_compare)

    dc = sub.add_parser(
        "deciles",
        help="mean target by prediction quantile bucket (buckets cut per day, pooled exactly)",
        description="Cut each day's rows into prediction quantile buckets (pandas qcut semantics) and report the "
        "pooled mean target and prediction per bucket.",
    )
    _source_options(dc)
    dc.add_argument("--experiment", action="append", metavar="NAME", help="only these experiments (repeatable)")
    dc.add_argument("--pair", action="append", metavar="PRED:TARGET", help=pair_help)
    dc.add_argument("--buckets", type=_at_least_2, default=10, help="number of buckets (default 10)")
    dc.add_argument("--plot", metavar="FILE.png", help="save the bucket chart (PNG; .pdf or .svg by the extension)")
    dc.add_argument("--format", choices=formats, default="table", help="output format")
    dc.set_defaults(func=cmd_deciles)

    e = sub.add_parser(
        "export",
        help="write the experiment chain as a SQL script and/or a DuckDB database for the DuckDB CLI",
        description="Write baseline and every SQL experiment as views, plus dh_<metric>(pred, target) macros, "
        "to a SQL script (duckdb -init OUT.sql) and/or a database file (duckdb OUT.duckdb).",
    )
    _source_options(e)
    e.add_argument("--metric-dir", action="append", metavar="DIR", help="folder of your own metric SQL files")
    e.add_argument("--sql", metavar="OUT.sql", help="SQL script to write")
    e.add_argument("--db", metavar="OUT.duckdb", help="DuckDB database file to write")
    e.add_argument("--materialize", metavar="DIR", help="write Python-step experiments here and export views on them")
    e.add_argument(
        "--overwrite", action="store_true", help="replace output files (and materialized folders) that exist"
    )
    e.set_defaults(func=cmd_export)
    for command in sub.choices.values():  # --debug after the command too (not given: the one before it)
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks instead of short errors"
        )
    return p


def _is_interruption(e: BaseException) -> bool:
    from duckharness.execution.executor import caused_by_interruption

    return caused_by_interruption(e)


def _interrupt_on_signals(received: list[int], armed: list[bool]) -> Callable[[], None]:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt in the main thread while ``armed[0]`` (and
    record which came, as DuckDB turns the exception into its own), so ``finally`` blocks clean
    up; unarmed, a signal is only recorded (while DuckDB's module loads, where an exception would
    abort the process, and while the outcome is reported). Returns the undo. A signal that is
    ignored (a background job's SIGINT) stays ignored.

    Python runs a signal handler only when the main thread is back in the interpreter, and DuckDB
    checks for one only between tasks, so a long operator (a sink's COPY of a sorted or windowed
    experiment) would finish first. A watcher thread therefore reads the signal wakeup fd and
    interrupts every DuckDB connection of the process at once (:func:`interrupt_all`)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        received.append(signum)
        if armed[0]:
            raise KeyboardInterrupt

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, interrupt)
    stop_watching = _watch_signals(set(previous))  # loads DuckDB

    def undo() -> None:
        stop_watching()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return undo


def _watch_signals(signals: set[int]) -> Callable[[], None]:
    """Start a thread that calls :func:`interrupt_all` whenever one of ``signals`` arrives (read
    from the wakeup fd, written by Python's C-level handler even while the main thread is inside
    DuckDB); returns the function that stops it and restores the previous wakeup fd."""
    import socket

    from duckharness.execution.connection import interrupt_all

    if not signals:
        return lambda: None
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
        old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main thread of the main interpreter
        reader.close()
        writer.close()
        return lambda: None

    def watch() -> None:
        with contextlib.suppress(OSError):
            while data := reader.recv(64):
                if signals.intersection(data):
                    interrupt_all()

    watcher = threading.Thread(target=watch, name="duckharness-signals", daemon=True)
    watcher.start()

    def stop() -> None:
        signal.set_wakeup_fd(old_fd)
        writer.close()  # the watcher reads end-of-file and returns
        watcher.join(timeout=2)
        reader.close()

    return stop


def _exit_if_threads_hang(code: int, grace: float = 2.0) -> None:
    """After an interruption has been cleaned up: if a worker thread is still stuck (a read from a
    stalled object store that DuckDB cannot interrupt), exit now with ``code`` instead of letting
    the interpreter wait for it at exit, which would make Ctrl-C and SIGTERM look ignored."""
    import os
    import time

    deadline = time.monotonic() + grace

    def stuck() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]

    for t in stuck():
        t.join(max(0.0, deadline - time.monotonic()))
    if stuck():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush into the closed pipe does not
    print a second error."""
    import os

    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said with the command's own usage line, which lists its options
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    import warnings

    from duckharness.errors import DuckHarnessError, DuckHarnessWarning

    def show(message: Warning | str, category: type[Warning], *rest: object, **kw: object) -> None:
        if issubclass(category, DuckHarnessWarning):
            print(f"Warning: {message}", file=sys.stderr)
        else:
            default_show(message, category, *rest, **kw)  # type: ignore[arg-type]

    default_show = warnings.showwarning
    warnings.showwarning = show
    received: list[int] = []
    armed = [False]
    restore_signals = _interrupt_on_signals(received, armed)
    try:
        try:
            import duckharness.harness  # noqa: F401  (DuckDB, Polars, sqlglot: loaded unarmed)

            if received:  # Ctrl-C while starting up
                raise KeyboardInterrupt
            armed[0] = True
            code = int(args.func(args))
        finally:
            armed[0] = False  # from here on a signal is only recorded: the outcome is reported whole
        if received:  # a signal whose exception something swallowed: still an interruption
            raise KeyboardInterrupt
        return code
    except BaseException as e:
        if isinstance(e, BrokenPipeError):  # `duckharness ... | head`: the reader has all it wants
            _silence_stdout()
            return 128 + signal.SIGPIPE
        if received or _is_interruption(e):
            if args.debug:
                raise
            terminated = signal.SIGTERM in received
            print("Terminated." if terminated else "Interrupted.", file=sys.stderr)
            code = 128 + (signal.SIGTERM if terminated else signal.SIGINT)
            if argv is None:  # the command line, not a call from Python
                _exit_if_threads_hang(code)
            return code
        if isinstance(e, DuckHarnessError) and not args.debug:
            print(f"Error: {e}", file=sys.stderr)
            return 1
        # driver, file-system and Polars errors we did not translate: no traceback
        import duckdb
        import polars as pl

        if args.debug or not isinstance(e, duckdb.Error | OSError | pl.exceptions.PolarsError):
            raise
        from duckharness.execution.executor import brief

        text = brief(e)
        print(f"Error: {type(e).__name__}: {text}" if isinstance(e, OSError) else f"Error: {text}", file=sys.stderr)
        return 1
    finally:
        if argv is not None:  # a call from Python gets its handlers back; a process just ends,
            restore_signals()  # and a late Ctrl-C stays recorded, not a traceback at exit
        warnings.showwarning = default_show


if __name__ == "__main__":
    sys.exit(main())
