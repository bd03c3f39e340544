"""The choices `harvest export` and `harvest sql` offer, apart from the code that needs DuckDB:
the command line reads them at every start, the heavy modules only when asked for."""

from __future__ import annotations

FORMATS = ("parquet", "jsonl.gz")  # harvest export --format
DEFAULT_FILE_MB = 256.0  # harvest export --file-mb
SQL_OUTPUT_FORMATS = ("table", "csv", "json")  # harvest sql --format
