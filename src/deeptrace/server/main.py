"""`deeptrace server`: options, then uvicorn."""

from __future__ import annotations

import logging
import os
import re
import sys

import click

from deeptrace.association.names import ALGORITHM_NAMES, DEFAULT_ALGORITHM


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _user_password(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise click.BadParameter("expected USER:PASSWORD, both not empty", param_hint="--read-auth")
    return user, password


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _headers(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--otlp-header")
        out[key] = value
    return out


# What the server needs beyond the agent's dependencies: pyproject.toml's `server` extra.
SERVER_MODULES = ("fastapi", "uvicorn", "duckdb", "pyarrow", "opentelemetry.proto", "prometheus_client",
                  "clickhouse_driver")


def _without_password(url: str) -> str:
    """A store URL fit to print: a password in it is not."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _require_server_extra() -> None:
    import importlib

    missing = []
    for name in SERVER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise click.ClickException(f"the server needs its extra, which is not installed ({', '.join(missing)} "
                                   "missing): pip install 'deeptrace[server]'")  # fmt: skip


@click.command()
@click.option("--listen", default="127.0.0.1:8700", show_default=True, help="Address and port to serve on.")
@click.option("--store", "store_url", default=None, metavar="URL",
              help="Where spans are kept: duckdb:///PATH (embedded, the default) or "
                   "clickhouse://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE (native protocol, port 9000 by default; "
                   "user and password also from CLICKHOUSE_USER and CLICKHOUSE_PASSWORD).")  # fmt: skip
@click.option("--db", default=None, help="The embedded store's file, short for --store duckdb:///FILE "
              "[default: deeptrace.duckdb].")  # fmt: skip
@click.option("--token", envvar="DEEPTRACE_TOKEN", default=None,
              help="Token agents must send (env DEEPTRACE_TOKEN).")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Read the token from this file.")
@click.option("--no-auth", is_flag=True, help="Accept spans without a token (trusted networks only).")
@click.option("--read-auth", envvar="DEEPTRACE_READ_AUTH", default=None, metavar="USER:PASSWORD",
              help="Ask for this user and password (HTTP Basic) before the UI, the query and Jaeger APIs "
                   "and /metrics (env DEEPTRACE_READ_AUTH).")
@click.option("--read-auth-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Read USER:PASSWORD for --read-auth from this file.")
@click.option("--algorithm", type=click.Choice(ALGORITHM_NAMES), default=DEFAULT_ALGORITHM, show_default=True,
              help="How calls are linked to requests when no exact link exists.")
@click.option("--no-header-ids", is_flag=True, help="Ignore propagated ids in the traffic.")
@click.option("--hold", type=float, default=5.0, show_default=True,
              help="Seconds a span waits after it ended for its parent to arrive from any host.")
@click.option("--max-backlog-spans", type=click.IntRange(min=1), default=2_000_000, show_default=True,
              help="Accepted spans that may wait for the linker; past this ingest answers 503 and agents spool.")
@click.option("--retention-hours", type=float, default=72.0, show_default=True,
              help="Delete spans older than this (0: keep).")
@click.option("--retention-bytes", type=int, default=None, help="Delete the oldest spans when the store is larger.")
@click.option("--otlp-endpoint", default=None, help="Also export linked spans as OTLP/HTTP protobuf to this URL.")
@click.option("--otlp-header", "otlp_headers", multiple=True, help="KEY=VALUE header for OTLP export (repeatable).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)  # fmt: skip
def server(listen, store_url, db, token, token_file, no_auth, read_auth, read_auth_file, algorithm, no_header_ids, hold,
           max_backlog_spans, retention_hours, retention_bytes, otlp_endpoint, otlp_headers, log_level) -> None:  # fmt: skip
    """Receive spans from agents, link them into traces, store them, serve the UI and APIs."""
    _require_server_extra()
    import uvicorn

    from deeptrace.server.app import ServerConfig, create_app

    host, port = _listen(listen)
    if store_url and db:
        raise click.UsageError("give the store once: --store URL or --db FILE")
    db = store_url or db or "deeptrace.duckdb"
    if token_file:
        with open(token_file) as f:
            token = f.read().strip()
    if not token and not no_auth:
        raise click.UsageError("give agents a token to send: --token TOKEN, --token-file FILE or DEEPTRACE_TOKEN "
                               "(or --no-auth on a trusted network)")  # fmt: skip
    if read_auth_file:
        with open(read_auth_file) as f:
            read_auth = f.read().strip()
    config = ServerConfig(db=db, address=f"{host}:{port}", token=token or None, algorithm=algorithm, header_ids=not no_header_ids,
                          hold_s=hold, max_backlog_spans=max_backlog_spans,
                          retention_hours=retention_hours or None, retention_bytes=retention_bytes,
                          otlp_endpoint=otlp_endpoint, otlp_headers=_headers(otlp_headers),
                          read_auth=_user_password(read_auth) if read_auth else None)  # fmt: skip
    logging.basicConfig(level=log_level.upper(), format="deeptrace server: %(levelname)s %(message)s")
    try:
        app = create_app(config)
    except (OSError, ValueError) as e:  # a store that cannot be opened, or a URL no store has
        click.echo(f"deeptrace: error: {e}", err=True)
        sys.exit(2)
    where = db if "://" in db else os.path.abspath(db)
    click.echo(f"deeptrace server: store {_without_password(where)}; UI and API on http://{host}:{port}/", err=True)
    if config.read_auth is None and not _loopback(host):
        click.echo(f"deeptrace server: warning: the UI and query APIs are open to anyone who reaches {host}:{port}; "
                   "ask for a password with --read-auth USER:PASSWORD", err=True)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
