"""Results out: tidy frames rendered as a readable table, CSV or JSON."""

from __future__ import annotations

import io
import math

import polars as pl

TIDY_TAIL = ("metric", "value")
LABELS = ("experiment", "pred", "target")


def group_columns(tidy: pl.DataFrame) -> list[str]:
    """Columns between the labels and ``metric``: the ``by`` keys of the run."""
    return [c for c in tidy.columns if c not in LABELS and c not in TIDY_TAIL]


def wide(tidy: pl.DataFrame) -> pl.DataFrame:
    """One row per (experiment, pair, group), one column per metric, in the tidy frame's order."""
    index = [*LABELS, *group_columns(tidy)]
    metrics = list(dict.fromkeys(tidy["metric"].to_list()))
    out = tidy.pivot(on="metric", index=index, values="value", aggregate_function=None, maintain_order=True)
    return out.select(*index, *[m for m in metrics if m in out.columns])


def _fmt(v: object) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if v.is_integer() and abs(v) < 1e15:
            return f"{int(v):,}"
        return f"{v:.6g}"
    return str(v)


def format_table(tidy: pl.DataFrame) -> str:
    """A plain-text table (metrics as columns) that reads well in a terminal.

    Example:
        >>> df = pl.DataFrame({"experiment": ["baseline"] * 2, "pred": ["p"] * 2, "target": ["t"] * 2,
        ...                    "metric": ["count", "r2"], "value": [10.0, 0.25]})
        >>> print(format_table(df))
        experiment  pred  target  count    r2
        ----------  ----  ------  -----  ----
        baseline    p     t          10  0.25
    """
    return format_frame(wide(tidy))


def format_frame(frame: pl.DataFrame) -> str:
    """Any frame as a plain-text table, one line per row (numbers right-aligned).

    Example:
        >>> print(format_frame(pl.DataFrame({"bucket": [1, 2], "mean_target": [-0.5, 0.25]})))
        bucket  mean_target
        ------  -----------
             1         -0.5
             2         0.25
    """
    headers = frame.columns
    rows = [[_fmt(v) for v in r] for r in frame.iter_rows()]
    numeric = [frame.schema[c].is_numeric() for c in headers]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if numeric[i] else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()

    return "\n".join([line(list(headers)), line(["-" * x for x in widths]), *[line(r) for r in rows]])


def format_records(frame: pl.DataFrame) -> str:
    """Each row as ``field  value`` lines (for wide one-row-per-result tables), blank-line separated.

    Example:
        >>> print(format_records(pl.DataFrame({"a": ["x"], "p_value": [0.0123]})))
        a        x
        p_value  0.0123
    """
    width = max((len(c) for c in frame.columns), default=0)
    blocks = ["\n".join(f"{c.ljust(width)}  {_fmt(v)}" for c, v in row.items()) for row in frame.iter_rows(named=True)]
    return "\n\n".join(blocks)


def format_csv(tidy: pl.DataFrame) -> str:
    buf = io.StringIO()
    tidy.write_csv(buf, time_format="%H:%M:%S%.f")  # time-of-day buckets as the table and JSON show them
    return buf.getvalue()


def format_json(tidy: pl.DataFrame) -> str:
    return tidy.write_json()


FORMATS = {"table": format_table, "csv": format_csv, "json": format_json}
# Wide frames (summaries, comparisons, bucket tables): the same formats without the pivot.
FRAME_FORMATS = {"table": format_frame, "records": format_records, "csv": format_csv, "json": format_json}
