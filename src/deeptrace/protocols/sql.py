"""Operation names for SQL text: `SELECT orders`, `INSERT users`, `BEGIN`."""

from __future__ import annotations

import re

_COMMENT = re.compile(r"/\*.*?\*/|--[^\n]*", re.DOTALL)
_QUOTES = re.compile(r"[`\"\[\]]")
_TABLE = re.compile(
    r"\b(?:FROM|INTO|UPDATE|JOIN|TABLE|EXISTS)\s+(?:ONLY\s+)?((?:[`\"\[]?[\w$]+[`\"\]]?\.)?[`\"\[]?[\w$]+[`\"\]]?)",
    re.IGNORECASE,
)


def operation(query: str) -> str:
    """The statement's verb, upper case ("" when there is none)."""
    words = _COMMENT.sub(" ", query[:2048]).split(None, 1)
    return words[0].upper().strip("(;") if words else ""


def name(query: str) -> str:
    """`SELECT orders` for `select * from orders where ...`; the verb alone without a table."""
    verb = operation(query)
    if verb in ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "MERGE", "REPLACE", "COPY", "TRUNCATE", "CREATE",
                "DROP", "ALTER"):  # fmt: skip
        m = _TABLE.search(_COMMENT.sub(" ", query[:4096]))
        if m:
            return f"{verb} {_QUOTES.sub('', m.group(1)).lower()}"
    return verb or "SQL"
