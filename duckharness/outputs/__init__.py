"""What comes out: the rules every written path follows, sinks, samples, exports for the DuckDB
CLI, result formatting and plots."""
