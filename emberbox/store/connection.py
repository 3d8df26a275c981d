"""What the store's SQL runs on: one connection surface for both backends.

Every blocking function of the store takes a :class:`Connection`: a ``sqlite3.Connection``
as it is (single host), or a :class:`~emberbox.store.postgres.PgConnection` (a cluster's
PostgreSQL), which takes the same ``?`` placeholders. The SQL is shared; the few places
where the two dialects differ ask :func:`is_postgres`. Nothing here imports psycopg.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol


class Cursor(Protocol):
    """The part of a DB-API cursor the store uses."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """The part of a DB-API connection the store uses: ``?`` placeholders, autocommit
    (explicit transactions only, through :func:`emberbox.store.db.transaction`)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def close(self) -> None: ...


def is_postgres(conn: Connection) -> bool:
    """Whether ``conn`` talks to PostgreSQL (else it is SQLite)."""
    return getattr(conn, "dialect", "sqlite") == "postgresql"


def to_pyformat(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s``, with every literal ``%`` doubled.

    A ``?`` inside a string literal (``'...'``), a quoted identifier (``"..."``) or a
    comment stays as it is. psycopg reads ``%`` everywhere in a query that has
    parameters, literals included, so every ``%`` is doubled. Dollar-quoted strings and
    ``E'...'`` backslash escapes are not used by the store and not understood here.
    """
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        char = sql[i]
        if char in "'\"":
            end = _quoted_end(sql, i)
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        else:
            out.append("%s" if char == "?" else "%%" if char == "%" else char)
            i += 1
    return "".join(out)


def _quoted_end(sql: str, start: int) -> int:
    """The index just past the literal or identifier opening at ``start`` (a doubled
    quote inside is an escaped quote); the end of the text when it is not closed."""
    quote, i = sql[start], start + 1
    while i < len(sql):
        if sql[i] == quote:
            if sql.startswith(quote * 2, i):
                i += 2
                continue
            return i + 1
        i += 1
    return len(sql)
