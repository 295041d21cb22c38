"""Operation names for SQL text: `SELECT orders`, `INSERT users`, `BEGIN`, `USE shop`, `SHOW TABLES`."""

from __future__ import annotations

import re

_COMMENT = re.compile(r"/\*.*?\*/|--[^\n]*", re.DOTALL)
_QUOTES = re.compile(r"[`\"\[\]]")
_NAME = r"(?:[`\"\[]?[\w$]+[`\"\]]?\.)?[`\"\[]?[\w$]+[`\"\]]?"
_TABLE = re.compile(
    rf"\b(?:FROM|INTO|UPDATE|JOIN|TABLE|EXISTS)\s+(?:ONLY\s+)?(?:IF\s+(?:NOT\s+)?EXISTS\s+)?({_NAME})", re.IGNORECASE
)
_WITH_TABLE = frozenset(("SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "MERGE", "REPLACE", "COPY", "TRUNCATE",
                         "CREATE", "DROP", "ALTER"))  # fmt: skip
# Verbs whose next word is the object they act on: `USE shop`, `DESC users`, `SHOW TABLES`.
_WITH_OBJECT = re.compile(rf"^\s*(USE|DESC|DESCRIBE|SHOW)\s+({_NAME})", re.IGNORECASE)
# SQL keywords that are not table names: `select 1 from dual`, `delete from only` would name nothing.
_NOT_TABLES = frozenset(("dual", "select", "lateral", "unnest", "values"))


def operation(query: str) -> str:
    """The statement's verb, upper case ("" when there is none)."""
    words = _COMMENT.sub(" ", query[:2048]).split(None, 1)
    return words[0].upper().strip("(;") if words else ""


def name(query: str) -> str:
    """`SELECT orders` for `select * from orders where ...`; the verb alone without a table."""
    verb = operation(query)
    if verb in _WITH_TABLE:
        m = _TABLE.search(_COMMENT.sub(" ", query[:4096]))
        if m:
            table = _QUOTES.sub("", m.group(1)).lower()
            if table not in _NOT_TABLES:
                return f"{verb} {table}"
    elif verb in ("USE", "DESC", "DESCRIBE", "SHOW"):
        m = _WITH_OBJECT.match(_COMMENT.sub(" ", query[:512]))
        if m:
            word = _QUOTES.sub("", m.group(2))
            # SHOW names a kind of thing (TABLES, VARIABLES); USE and DESC name a database or table.
            return f"{verb} {word.upper() if verb == 'SHOW' else word.lower()}"
    return verb or "SQL"
