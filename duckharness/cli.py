"""The command line: each command opens a :class:`~duckharness.Harness`, calls one method, prints.

Library errors print ``Error: ...`` and exit 1 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def _harness(args: argparse.Namespace) -> Any:
    from duckharness.harness import Harness

    h = Harness(
        args.source,
        metadata=getattr(args, "metadata", None),
        metric_dirs=args.metric_dir or (),
        workers=args.workers,
        tracer=(lambda sql: print(sql, file=sys.stderr)) if args.trace else None,
    )
    if getattr(args, "experiments", None):
        try:
            h.load_experiments(args.experiments)
        except BaseException:
            h.close()
            raise
    return h


def _window(args: argparse.Namespace) -> Any:
    if args.no_window:
        return False
    if args.window:
        start, _, end = args.window.partition("-")
        return (start or None, end or None)
    return None


def cmd_metrics(args: argparse.Namespace) -> int:
    from duckharness.results import FORMATS

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


def cmd_demo(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from duckharness.demo import write_demo_dataset
    from duckharness.harness import Harness
    from duckharness.results import format_table

    out = args.dir or os.path.join(tempfile.gettempdir(), "duckharness-demo")
    paths = write_demo_dataset(out, days=args.days, rows=args.rows)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="duckharness", description="SQL-first evaluation of backtests on DuckDB.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of short error messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="write a sample dataset and evaluate experiments on it",
        description="Write a sample dataset (several days crossing a DST switch, three horizons) "
        "and run experiments and metrics on it.",
    )
    d.add_argument("dir", nargs="?", help="where to write the sample data (default: a temp folder)")
    d.add_argument("--days", type=int, default=6, help="trading days to write (default 6)")
    d.add_argument("--rows", type=int, default=20_000, help="rows per day (default 20000)")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser(
        "metrics",
        help="compute metrics for experiments and pred:target pairs",
        description="Compute metrics for every experiment and pred:target pair.",
    )
    m.add_argument("source", help="directory, glob or Parquet file of backtest results")
    m.add_argument("--experiments", metavar="FILE", help="SQL file of '-- experiment: NAME' statements")
    m.add_argument("--experiment", action="append", metavar="NAME", help="only these experiments (repeatable)")
    m.add_argument("--metric", action="append", metavar="NAME", help="metric name (repeatable; default: a core set)")
    m.add_argument("--metric-dir", action="append", metavar="DIR", help="folder of your own metric SQL files")
    m.add_argument("--pair", action="append", metavar="PRED:TARGET", help="pred:target pair (repeatable)")
    m.add_argument("--by", action="append", metavar="KEY", help="group by 'day' or a column (repeatable)")
    m.add_argument("--window", metavar="HH:MM-HH:MM", help="override the metadata session window")
    m.add_argument("--no-window", action="store_true", help="ignore the session window")
    m.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")
    m.add_argument("--workers", type=int, help="parallel DuckDB connections (default: CPU count)")
    m.add_argument("--trace", action="store_true", help="print every SQL statement to stderr")
    m.set_defaults(func=cmd_metrics)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from duckharness.errors import DuckHarnessError

    try:
        return int(args.func(args))
    except DuckHarnessError as e:
        if args.debug:
            raise
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a driver error we did not translate: still no traceback
        import duckdb

        if args.debug or not isinstance(e, duckdb.Error):
            raise
        print(f"Error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
