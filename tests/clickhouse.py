"""A real clickhouse-server (Debian's) on a temporary directory and free ports, for tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from servers import free_port, need, wait_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # demo/: the config is written once, there
from demo.clickhouse import configure


@contextmanager
def clickhouse_server(remote: str = "", tcp: int | None = None):
    """The native protocol's port (`tcp`, or a free one) of a fresh server; `remote` is its
    <remote_servers> content."""
    binary = need("clickhouse-server")
    with tempfile.TemporaryDirectory(prefix="dt-clickhouse-") as d:
        tcp = tcp or free_port()
        config = configure(Path(d), tcp, free_port(), free_port(), remote=remote)
        log = open(Path(d, "server.log"), "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(
            [binary, f"--config-file={config}"], cwd=d, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            try:
                wait_port(tcp, 30.0)
            except AssertionError:
                raise AssertionError(
                    f"clickhouse-server did not start: {Path(d, 'server.log').read_text()[-2000:]}"
                ) from None
            yield tcp
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def wait_until(check, timeout_s: float = 60.0):
    """check() until it is true (ClickHouse's deletes run in the background)."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"still not so after {timeout_s:.0f} s")
        time.sleep(0.1)
    return value


class ChdbClient:
    """clickhouse-driver's `execute`, as the ClickHouse store calls it, on chdb: the current
    ClickHouse engine in this process. The store's SQL is checked on today's dialect this way,
    besides Debian's 18.16 server."""

    def __init__(self, database: str) -> None:
        from chdb import session

        self.database = database
        self.session = session.Session()
        self.session.query("SET output_format_arrow_string_as_string = 0")  # String is bytes, as it is stored
        self.session.query(f"CREATE DATABASE IF NOT EXISTS {database}")

    def execute(self, query: str, params=None, columnar: bool = False, settings: dict | None = None):
        from clickhouse_driver.util.escape import escape_param, escape_params

        # What the driver's escaping reads of its client.
        context = SimpleNamespace(server_info=None, client_settings={"strings_as_bytes": False,
                                                                     "server_side_params": False})  # fmt: skip
        self.session.query(f"USE {self.database}")
        if query.rstrip().endswith("VALUES") and params is not None:  # an insert of Python rows
            rows = list(zip(*params)) if columnar else params
            literal = ", ".join("(" + ", ".join(self._literal(v, escape_param, context) for v in row) + ")"
                                for row in rows)  # fmt: skip
            self.session.query(f"{query} {literal}")
            return []
        if params:
            query = query % escape_params(params, context)  # as the driver fills them in
        table = self.session.query(query, "ArrowTable")
        as_bytes = bool(settings and settings.get("strings_as_bytes"))
        if table is None or not table.num_columns:
            return []
        columns = [[self._value(v, as_bytes) for v in table.column(i).to_pylist()] for i in range(table.num_columns)]
        return list(zip(*columns))

    @staticmethod
    def _literal(value, escape_param, context) -> str:
        if isinstance(value, bytes):  # a String of any bytes, as clickhouse-driver writes it
            return "unhex('" + value.hex() + "')"
        return str(escape_param(value, context))  # numbers come back as they are

    @staticmethod
    def _value(value, as_bytes: bool):
        return value.decode("utf-8") if isinstance(value, bytes) and not as_bytes else value

    def disconnect(self) -> None:
        pass


@contextmanager
def clickhouse_shards(cluster: str = "two_shards"):
    """Two servers that both know `cluster`: one shard on each. Yields the first one's port."""
    ports = [free_port(), free_port()]
    shards = "".join(f"<shard><replica><host>127.0.0.1</host><port>{p}</port></replica></shard>" for p in ports)
    remote = f"<{cluster}>{shards}</{cluster}>"
    with clickhouse_server(remote, ports[0]), clickhouse_server(remote, ports[1]):
        yield ports
