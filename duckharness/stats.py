"""Pure statistics: merging partial sufficient statistics and summarising them.

Partial stats from any split of the rows into batches merge to the stats of all the rows: sums
add, minima and maxima take the min and max. The merge is associative and commutative (up to
floating-point rounding of sums), so batches can be computed anywhere and combined in any order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl

_AGG = {"sum": lambda c: pl.col(c).sum(), "min": lambda c: pl.col(c).min(), "max": lambda c: pl.col(c).max()}


def merge_partials(partials: pl.DataFrame, keys: Sequence[str], how: Mapping[str, str]) -> pl.DataFrame:
    """Merge rows of partial stats that share ``keys``; ``how`` maps each stat column to
    ``sum``, ``min`` or ``max``. With no keys the result is one row (sums of nothing are 0).

    Example:
        >>> p = pl.DataFrame({"day": [1, 1, 2], "n": [2.0, 3.0, 4.0], "hi": [5.0, 7.0, 1.0]})
        >>> merge_partials(p, ["day"], {"n": "sum", "hi": "max"}).rows()
        [(1, 5.0, 7.0), (2, 4.0, 1.0)]
    """
    aggs = [_AGG[h](c).alias(c) for c, h in how.items()]
    if not keys:
        return partials.select(aggs)
    return partials.group_by(list(keys), maintain_order=True).agg(aggs).sort(list(keys), nulls_last=True)
