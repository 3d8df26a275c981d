"""Which database a process uses, and opening it outside the server (the CLI).

:func:`database_target` is what :meth:`Store.open <emberbox.store.store.Store.open>`
opens for some Settings: ``Settings.database_url`` (a cluster's PostgreSQL) when set,
else the data dir's SQLite file. :func:`open_database` opens it for ``emberbox keys``
and ``emberbox audit``, so an operator makes a cluster's keys the way a single host's
are made. Every failure is a HostError naming the database without its password.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from emberbox import errors
from emberbox.config import Settings
from emberbox.store import db, postgres
from emberbox.store.connection import Connection


def database_target(settings: Settings) -> Path | str:
    """The PostgreSQL URL when ``settings.database_url`` is set, else the SQLite path.

    HostError for a URL that is not ``postgresql://`` (the message shows only its
    scheme: the rest may hold a password).
    """
    url = settings.database_url.strip()
    if not url:
        return settings.db_path
    if not postgres.is_postgres_url(url):
        scheme = url.split(":", 1)[0] if ":" in url else "no scheme"
        raise errors.HostError(
            f"EMBERBOX_DATABASE_URL must be a postgresql://user:password@host:port/db URL "
            f"(got {scheme!r}...)"
        )
    return url


@contextlib.contextmanager
def open_database(settings: Settings) -> Iterator[Connection]:
    """(Blocking) the database of ``settings``, migrated, closed on exit; a database
    error inside the block becomes HostError too."""
    target = database_target(settings)
    opener = _postgres(target) if isinstance(target, str) else _sqlite(target)
    with opener as conn:
        yield conn


@contextlib.contextmanager
def _sqlite(path: Path) -> Iterator[Connection]:
    try:
        conn = db.connect(path)
    except (sqlite3.Error, OSError) as exc:
        raise errors.HostError(f"cannot open the database {path}: {exc}") from exc
    try:
        yield conn
    except sqlite3.Error as exc:
        raise errors.HostError(f"database {path}: {exc}") from exc
    finally:
        conn.close()


@contextlib.contextmanager
def _postgres(url: str) -> Iterator[Connection]:
    import psycopg

    conn = postgres.connect(url)  # HostError, without the password, when it cannot
    try:
        with postgres.database_errors(conn.where, url):
            yield conn
    except psycopg.Error as exc:
        reason = postgres.scrub(str(exc).strip(), url)
        raise errors.HostError(f"database {conn.where}: {reason}") from exc
    finally:
        conn.close()
