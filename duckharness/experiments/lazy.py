"""An experiment as a Polars LazyFrame that reads files only when (and as far as) it is collected."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import polars as pl
from polars.io.plugins import register_io_source
from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.data.metadata import SessionWindow
from duckharness.engine.plan import day_groups
from duckharness.engine.run import make_batches
from duckharness.experiments.chain import build_chain

if TYPE_CHECKING:
    from duckharness.harness import Harness


def experiment_lazyframe(h: Harness, name: str, window: SessionWindow | None) -> pl.LazyFrame:
    """A LazyFrame over ``name``'s rows. Row-by-row chains are evaluated one file batch at a time
    (so ``head`` stops early and only the selected columns are read); other chains stream from
    one DuckDB query over all files."""
    schema = h.relation_schema(name)
    batchable = h.experiments.batchable(name)
    if not batchable:
        groups = [list(h.dataset.files)]
    elif h.experiments.has_python(name):  # a per-batch Python step sees whole days
        groups = day_groups(h.dataset, window)
    else:
        groups = make_batches(h.dataset.files, h.batch_size)

    def source(
        with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, batch_size: int | None
    ) -> Iterator[pl.DataFrame]:
        # Columns by name in the schema's order: files may hold them in another order.
        cols = [sb.column(c) for c in (with_columns or schema.names())]
        remaining = n_rows
        con = h.dataset.connection(1 if batchable else h.workers).open()
        try:
            for files in groups:
                rel = build_chain(con, h.dataset, h.experiments, name, files, window, h.tracer, h.batch_size)
                q = sb.select(cols, exp.Table(this=sb.ident(rel)))
                if remaining is not None:
                    q = q.limit(remaining)
                sql = sb.render(q)
                if h.tracer is not None:
                    h.tracer(sql)
                reader = con.sql(sql).to_arrow_reader(batch_size or 131_072)
                for batch in reader:
                    df = pl.from_arrow(batch)
                    assert isinstance(df, pl.DataFrame)
                    if predicate is not None:
                        df = df.filter(predicate)
                    if remaining is not None:
                        df = df.head(remaining)
                        remaining -= df.height
                    yield df
                    if remaining == 0:
                        return
        finally:
            con.close()

    return register_io_source(source, schema=schema, is_pure=True, explain_name=f"duckharness:{name}")
