"""inventory (Flask under gunicorn, gthread worker: 2 processes x 8 threads):
GET /stock/{sku} reads the row in PostgreSQL on the thread's own connection."""

from __future__ import annotations

import sys
import threading

import psycopg
from calls import pg
from common import CONFIG, pg_dsn, truth
from flask import Flask, jsonify, request

PORT = CONFIG["ports"]["inventory"]
app = Flask(__name__)
_local = threading.local()


def db() -> psycopg.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = psycopg.connect(pg_dsn(), autocommit=True)
    return conn


@app.get("/stock/<sku>")
def stock(sku: str):
    log = truth("inventory")  # per worker process: gunicorn forks after import
    with log.serving("GET /stock", PORT, int(request.environ["REMOTE_PORT"]), key=f"stock:{sku}"):
        row = pg(log, db(), "SELECT sku, qty, warehouse FROM stock WHERE sku = %s", (sku,))
        if row is None:
            return jsonify(error="no such sku"), 404
        return jsonify(sku=row[0], qty=row[1], warehouse=row[2])


if __name__ == "__main__":
    from gunicorn.app.wsgiapp import run

    sys.argv = ["gunicorn", "--workers", "2", "--worker-class", "gthread", "--threads", "8", "--keep-alive", "75",
                "--bind", f"127.0.0.1:{PORT}", "--log-level", "warning", "inventory:app"]  # fmt: skip
    run()
