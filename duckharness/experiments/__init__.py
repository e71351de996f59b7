"""Experiments: named SQL (or Python) steps chained from ``baseline``, and how a chain is run as views
over a batch of files or read as a Polars LazyFrame."""
