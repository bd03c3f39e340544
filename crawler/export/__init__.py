"""Reading the archive as data: typed Parquet or JSON-lines exports, and SQL over it.

`export` writes what is new since the last export (`harvest export`); `sql` opens
an embedded DuckDB whose `images` are the archive's committed lines, typed by
the one schema in `schema` (`harvest sql`). Both read lines through
`archive.reader` and type them in DuckDB (`typed`).
"""
