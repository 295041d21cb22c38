"""The shop's data: what PostgreSQL is seeded with, and the ids the traffic may ask for."""

from __future__ import annotations

PRODUCTS = range(1, 101)
OUT_OF_STOCK = frozenset({13, 47, 88})  # ~3% of single-item checkouts get 409
USERS = range(1, 1001)

SCHEMA = """
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, price_cents int NOT NULL, stock int NOT NULL);
CREATE TABLE orders (id bigserial PRIMARY KEY, user_id int NOT NULL, items jsonb NOT NULL,
                     total_cents int NOT NULL, created timestamptz NOT NULL DEFAULT now());
CREATE INDEX orders_user ON orders (user_id);
"""

ADJECTIVES = ("Small", "Large", "Blue", "Wooden", "Steel", "Organic", "Vintage", "Quiet", "Folding", "Travel")
NOUNS = ("Mug", "Lamp", "Chair", "Notebook", "Kettle", "Backpack", "Clock", "Teapot", "Desk", "Umbrella")


def products() -> list[tuple[int, str, int, int]]:
    """(id, name, price_cents, stock): the same catalog on every run."""
    return [
        (
            i,
            f"{ADJECTIVES[i % 10]} {NOUNS[(i // 10) % 10]}",
            499 + (i * 7919) % 9500,
            0 if i in OUT_OF_STOCK else 20 + (i * 31) % 300,
        )
        for i in PRODUCTS
    ]
