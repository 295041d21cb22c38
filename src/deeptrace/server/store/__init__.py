"""Storage behind one interface (base.Store): the embedded DuckDB file by default, ClickHouse
past one machine."""

from deeptrace.server.store.base import Store

SCHEMES = ("duckdb", "clickhouse")


def open_store(location: str) -> Store:
    """A store from its URL: `duckdb:///PATH` (or a plain file path, --db's short form) or
    `clickhouse://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE`; any other scheme is refused."""
    scheme, sep, rest = location.partition("://")
    if not sep or scheme == "duckdb":
        from deeptrace.server.store.duckdb_store import DuckDBStore

        # As SQLAlchemy reads sqlite:///: three slashes, then the path (a fourth for an absolute one).
        return DuckDBStore(rest.removeprefix("/") if sep else location.removeprefix("duckdb:"))
    if scheme == "clickhouse":
        from deeptrace.server.store.clickhouse_store import ClickHouseStore

        return ClickHouseStore(location)
    raise ValueError(
        f"unknown store scheme {scheme!r} in {location!r}: use {' or '.join(s + '://' for s in SCHEMES)}"
    )
