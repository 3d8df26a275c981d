"""The PostgreSQL backend: a cluster's shared state (docs/cluster.md), psycopg 3, sync.

- :class:`PgConnection` wraps a psycopg connection in autocommit mode with the surface
  of :class:`~emberbox.store.connection.Connection`: ``?`` placeholders (turned into
  ``%s``), the same cursor. The store's SQL runs on it unchanged.
- :func:`transaction` is ``BEGIN`` + ``pg_advisory_xact_lock(STORE_LOCK_KEY)``: every
  read-then-write of the store (and every migration) holds the one lock, as SQLite's
  ``BEGIN IMMEDIATE`` holds its one write lock, so two API replicas never interleave
  a check and its write. One-statement writes that no check depends on (the audit log,
  a key's last use, a delete) take no lock: they are atomic on their own.
- :func:`database_errors`: disk full (SQLSTATE 53100) becomes StorageFull; a database
  that is unreachable or went away becomes HostError (503). Messages never carry the
  URL's password (:func:`redact`).

psycopg is imported only when a ``postgresql://`` URL is used: the single-host path
never loads it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from emberbox import errors
from emberbox.store.connection import Connection, Cursor, to_pyformat

if TYPE_CHECKING:
    import psycopg

URL_PREFIXES = ("postgresql://", "postgres://")
#: The advisory lock every write transaction holds: b"emberbox" as a signed 64-bit int.
STORE_LOCK_KEY = int.from_bytes(b"emberbox", "big")
CONNECT_TIMEOUT_S = 10
# A replica never waits forever for the store's lock (HostError, 503, instead), and a
# replica that died inside a transaction (its TCP connection half-open) loses its
# session, and so the lock, after this long: the server would wait for TCP keepalive.
LOCK_TIMEOUT_S = 30
IDLE_IN_TRANSACTION_TIMEOUT_S = 30
_USERINFO_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@?#]*:)([^/?#]*)@", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)", re.IGNORECASE)


def is_postgres_url(target: object) -> bool:
    return isinstance(target, str) and target.lower().startswith(URL_PREFIXES)


class PgConnection:
    """A psycopg connection (autocommit) with the store's ``?`` surface."""

    dialect = "postgresql"

    def __init__(self, raw: psycopg.Connection[Any], where: str) -> None:
        self.raw = raw
        self.where = where  # the URL without its password, for messages

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        # Always with parameters (maybe none), so "%" is read the same way every time.
        return self.raw.execute(to_pyformat(sql), tuple(parameters))

    def run_script(self, script: str) -> None:
        """Several statements, no parameters (the migrations): sent as they are."""
        self.raw.execute(script.encode())

    def close(self) -> None:
        self.raw.close()

    @property
    def broken(self) -> bool:
        return self.raw.closed or self.raw.broken

    @property
    def in_transaction(self) -> bool:
        from psycopg import pq

        return self.raw.info.transaction_status != pq.TransactionStatus.IDLE


def redact(url: str) -> str:
    """``url`` with its password (user info or ``?password=``) as ``***``."""
    url = _USERINFO_PASSWORD.sub(r"\1***@", url, count=1)
    return _QUERY_PASSWORD.sub(r"\1***", url)


def scrub(text: str, url: str) -> str:
    """``text`` (an error message) with any password found in ``url`` replaced by ``***``."""
    secrets = [m.group(2) for m in (_USERINFO_PASSWORD.match(url),) if m]
    secrets += [m.group(2) for m in _QUERY_PASSWORD.finditer(url)]
    for secret in secrets:
        for form in {secret, unquote(secret)}:
            if form:
                text = text.replace(form, "***")
    return text


def connect(url: str) -> PgConnection:
    """Connect (autocommit) and bring the schema up to date. Blocking.

    HostError, with the reason and without the password, when the URL is bad or the
    database cannot be reached or refuses us.
    """
    from emberbox.store import pg_migrations

    conn = connect_unmigrated(url)
    try:
        with database_errors(conn.where, url):
            pg_migrations.migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def connect_unmigrated(url: str) -> PgConnection:
    """Connect (autocommit) and nothing else: :func:`connect` without the migrations."""
    import psycopg

    where = redact(url)
    try:
        raw = psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name="emberbox",
            # A replica notices a dead database (a half-open TCP connection) in ~30 s.
            keepalives=1,
            keepalives_idle=15,
            keepalives_interval=5,
            keepalives_count=3,
        )
    except (psycopg.Error, ValueError) as exc:
        reason = scrub(str(exc).strip(), url)
        raise errors.HostError(f"cannot connect to the database {where}: {reason}") from None
    conn = PgConnection(raw, where)
    try:
        with database_errors(where, url):
            conn.execute(f"SET lock_timeout = '{int(LOCK_TIMEOUT_S * 1000)}ms'")
            conn.execute(
                "SET idle_in_transaction_session_timeout"
                f" = '{int(IDLE_IN_TRANSACTION_TIMEOUT_S * 1000)}ms'"
            )
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def transaction(conn: PgConnection) -> Iterator[None]:
    """``BEGIN``, the store's advisory lock, ... ``COMMIT`` (``ROLLBACK`` on any error)."""
    conn.execute("BEGIN")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (STORE_LOCK_KEY,))
        yield
        conn.execute("COMMIT")
    except BaseException:
        if not conn.broken and conn.in_transaction:
            # A connection that broke meanwhile has no transaction left to roll back.
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def database_errors(where: str, url: str = "") -> Iterator[None]:
    """Disk full -> StorageFull (507); unreachable, gone or shut down -> HostError (503)."""
    import psycopg

    try:
        yield
    except psycopg.errors.DiskFull as exc:
        raise errors.StorageFull(f"database {where}: no space left for the database") from exc
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        reason = scrub(str(exc).strip(), url) if url else str(exc).strip()
        raise errors.HostError(f"database {where}: {reason}") from exc


def integrity_errors() -> tuple[type[Exception], ...]:
    """What a constraint violation (unique, foreign key, check) raises on PostgreSQL."""
    import psycopg

    return (psycopg.IntegrityError,)


class PgBackend:
    """How a :class:`~emberbox.store.store.Store` opens and watches a PostgreSQL database."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.where = redact(url)

    def connect(self) -> Connection:
        return connect(self._url)

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return database_errors(self.where, self._url)

    def broken(self, conn: Connection) -> bool:
        return isinstance(conn, PgConnection) and conn.broken
