"""Storage behind one interface (base.Store); the embedded DuckDB file is the default."""

from deeptrace.server.store.base import Store


def open_store(location: str) -> Store:
    """A store from --db: a file path (DuckDB), or `duckdb:PATH`."""
    from deeptrace.server.store.duckdb_store import DuckDBStore

    return DuckDBStore(location.removeprefix("duckdb:"))
