"""Where queries run: the one DuckDB connection factory, and the executors that run file batches on
threads, processes, Ray or Dask."""
