"""Metrics: the metric SQL files (statistics and final expression), and the pure statistics that
merge partial sums and test per-day series."""
