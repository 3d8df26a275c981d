"""Opening the SQLite database, and the plumbing every query of the store shares.

:func:`connect` opens one connection in autocommit mode with WAL, ``synchronous=FULL``
and foreign keys on, creating the directory 0700 and the file 0600, and migrates the
schema. :func:`transaction` makes a read-then-write atomic against other processes too
(``BEGIN IMMEDIATE``). :func:`storage_full_errors` turns a full disk into StorageFull.
The server uses the connection through :class:`~emberbox.store.store.Store`; the CLI
(``emberbox keys``, ``emberbox audit``) opens its own while the server runs.
:func:`transaction` also takes a PostgreSQL connection (:mod:`emberbox.store.postgres`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from emberbox import errors
from emberbox.store import migrations, postgres
from emberbox.store.connection import Connection

BUSY_TIMEOUT_MS = 5000


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating 0700/0600 if new), configure and migrate the database. Blocking."""
    _prepare_files(path)
    conn = sqlite3.connect(
        path,
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise errors.HostError(f"{path}: SQLite refused WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        migrations.migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare_files(path: Path) -> None:
    """Make the directory 0700 and the file 0600 when we create them, before SQLite does
    (SQLite gives its -wal and -shm files the database file's mode)."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(parent, 0o700)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        # Never open (and close) a file another connection of this process may hold:
        # closing any descriptor of it drops all of the process's POSIX locks on it, and
        # SQLite then no longer excludes other processes (a corrupt database).
        os.chmod(path, 0o600)
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


@contextlib.contextmanager
def storage_full_errors(path: Path) -> Iterator[None]:
    """SQLITE_FULL and ENOSPC become StorageFull (HTTP 507): the write did not happen
    (SQLite rolled it back), the database stays consistent, and it works again once
    space is freed."""
    try:
        yield
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
            raise
        raise errors.StorageFull(f"{path}: no space left for the database") from exc
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise errors.StorageFull(f"{path}: no space left for the database") from exc


@contextlib.contextmanager
def transaction(conn: Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any error) on an autocommit
    connection: atomic against other processes too. On PostgreSQL: ``BEGIN`` and the
    store's advisory lock (:func:`emberbox.store.postgres.transaction`), atomic against
    other API replicas."""
    if isinstance(conn, postgres.PgConnection):
        with postgres.transaction(conn):
            yield
        return
    if not isinstance(conn, sqlite3.Connection):
        raise TypeError(f"not a store connection: {conn!r}")
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (e.g. SQLITE_FULL)
            conn.execute("ROLLBACK")
        raise


def integrity_errors(conn: Connection) -> tuple[type[Exception], ...]:
    """What a constraint violation (unique, foreign key, check) raises on ``conn``'s
    backend: ``except integrity_errors(conn):``."""
    if isinstance(conn, postgres.PgConnection):
        return postgres.integrity_errors()
    return (sqlite3.IntegrityError,)


class SqliteBackend:
    """How a :class:`~emberbox.store.store.Store` opens a SQLite database (one host)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    def connect(self) -> Connection:
        return connect(self.path)

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return storage_full_errors(self.path)

    def broken(self, conn: Connection) -> bool:
        return False
