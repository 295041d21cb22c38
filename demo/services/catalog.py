"""catalog (Flask on gunicorn, 2 processes x 4 threads): products from PostgreSQL."""

from __future__ import annotations

import threading

import psycopg
from flask import Flask, abort, jsonify

from demo.services import env

app = Flask("catalog")
_local = threading.local()

COLUMNS = "id, name, price_cents, stock"


def db() -> psycopg.Connection:
    # A connection per thread, opened on first use: after gunicorn's fork, and on the first
    # request, which the agent sees from its first byte.
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(env.url("database"), autocommit=True)
    return conn


def as_dict(row) -> dict:
    return dict(zip(("id", "name", "price_cents", "stock"), row))


@app.get("/health")
def health():
    return jsonify(ok=True)


@app.get("/products")
def products():
    rows = db().execute(f"SELECT {COLUMNS} FROM products ORDER BY id LIMIT 20").fetchall()
    return jsonify(products=[as_dict(r) for r in rows])


@app.get("/products/<int:product_id>")
def product(product_id: int):
    row = db().execute(f"SELECT {COLUMNS} FROM products WHERE id = %s", (product_id,)).fetchone()
    if row is None:
        abort(404)
    return jsonify(as_dict(row))


@app.errorhandler(404)
def not_found(e):
    return jsonify(error="no such product"), 404


def main() -> None:
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):
        def load_config(self) -> None:
            addr, port = env.listen()
            for key, value in {
                "bind": f"{addr}:{port}",
                "workers": 2,
                "worker_class": "gthread",
                "threads": 4,
                "keepalive": 75,
                "loglevel": "warning",
                "accesslog": None,
            }.items():
                self.cfg.set(key, value)

        def load(self):
            return app

    Server().run()


if __name__ == "__main__":
    main()
