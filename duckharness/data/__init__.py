"""Where the rows come from: the Parquet files of a source, their schemas and time ranges, and the
``metadata.json`` beside them with its session window."""
