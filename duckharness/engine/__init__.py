"""The engine: one fused scan plan per file batch, the map over batches and the merge of their
partial statistics, per-day statistics, research analysis, and the cache of partials per file."""
