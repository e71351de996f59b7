"""Pure statistics: merging partial sufficient statistics.

Partial stats from any split of the rows into batches merge to the stats of all the rows: sums
add, minima and maxima take the min and max. The merge is associative and commutative (up to
floating-point rounding of sums), so batches can be computed anywhere and combined in any order.
It is also deterministic: rows are combined in a fixed order (by group, then by position), so the
same partials give the same bits whatever the threads or the machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

_REDUCE = {"sum": np.add, "min": np.fmin, "max": np.fmax}


def reduce_runs(
    values: np.ndarray, missing: np.ndarray, starts: np.ndarray, how: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Merge runs of rows of a stats matrix: rows ``starts[i]:starts[i + 1]`` form group ``i``
    and column ``j`` merges by ``how[j]`` (``sum``, ``min`` or ``max``), rows in order, skipping
    cells flagged ``missing``. Returns the merged ``(groups, columns)`` matrix and whether each
    merged cell saw any value (a min or max of nothing is meaningless; a sum of nothing is 0).

    Example:
        >>> v = np.array([[1.0, 5.0], [2.0, 7.0], [4.0, 1.0]])
        >>> m = np.zeros_like(v, dtype=bool)
        >>> reduce_runs(v, m, np.array([0, 2]), ["sum", "max"])[0].tolist()
        [[3.0, 7.0], [4.0, 1.0]]
    """
    groups, width = len(starts), values.shape[1]
    reduced = np.empty((groups, width))
    if not len(values) or not groups:
        for j, fn in enumerate(how):
            reduced[:, j] = 0.0 if fn == "sum" else np.nan
        return reduced, np.zeros((groups, width), dtype=bool)
    seen = np.add.reduceat((~missing).astype(np.int64), starts, axis=0) > 0
    for fn in set(how):
        idx = [j for j, h in enumerate(how) if h == fn]
        part = np.where(missing[:, idx], 0.0 if fn == "sum" else np.nan, values[:, idx])
        with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf is NaN, as in SQL
            reduced[:, idx] = _REDUCE[fn].reduceat(part, starts, axis=0)
    return reduced, seen


def merge_partials(partials: pl.DataFrame, keys: Sequence[str], how: Mapping[str, str]) -> pl.DataFrame:
    """Merge rows of partial stats that share ``keys``; ``how`` maps each stat column to
    ``sum``, ``min`` or ``max``. Missing (null) stats are skipped: a sum of nothing is 0, a min or
    max of nothing is null. With no keys the result is one row. Groups come out sorted by key.

    Example:
        >>> p = pl.DataFrame({"day": [1, 1, 2], "n": [2.0, 3.0, 4.0], "hi": [5.0, 7.0, 1.0]})
        >>> merge_partials(p, ["day"], {"n": "sum", "hi": "max"}).rows()
        [(1, 5.0, 7.0), (2, 4.0, 1.0)]
    """
    keys = list(keys)
    if keys:
        ordered = partials.with_row_index("__pos").sort([*keys, "__pos"], nulls_last=True)
        if ordered.height:
            group = ordered.select(pl.struct(keys).rle_id()).to_series().to_numpy()
            starts = np.flatnonzero(np.diff(group, prepend=-1))
        else:
            starts = np.zeros(0, dtype=np.int64)
        out = ordered[starts.tolist()].select(keys) if len(starts) else ordered.select(keys)
    else:
        ordered, starts = partials, np.zeros(1, dtype=np.int64)
        out = pl.DataFrame({"__one": [1]})
    names = list(how)
    if not names:
        return out.drop("__one") if "__one" in out.columns else out
    # All stat columns at once: one matrix of values and one of NULL flags.
    values = ordered.select([pl.col(c).cast(pl.Float64) for c in names]).to_numpy().astype(np.float64, copy=False)
    missing = ordered.select([pl.col(c).is_null() for c in names]).to_numpy().astype(bool, copy=False)
    values = values.reshape(len(ordered), len(names))
    missing = missing.reshape(len(ordered), len(names))
    reduced, seen = reduce_runs(values, missing, starts, [how[c] for c in names])
    columns = []
    for i, col in enumerate(names):
        s = pl.Series(col, reduced[:, i], dtype=pl.Float64)
        if how[col] != "sum":  # a min/max over no values is null (a NaN in the data stays NaN)
            s = pl.select(pl.when(pl.lit(pl.Series(seen[:, i]))).then(pl.lit(s)).otherwise(None)).to_series().alias(col)
        columns.append(s)
    out = out.with_columns(columns)
    return out.drop("__one") if "__one" in out.columns else out
