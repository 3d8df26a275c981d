"""A real PostgreSQL 15 for tests: :func:`running_postgres` initdb's a cluster in a temp
dir, starts ``postgres`` on 127.0.0.1:<free port> (plus a unix socket in the temp dir),
creates a database and yields its ``postgresql://`` URL; on exit it stops the server
(fast shutdown, then SIGKILL) and removes the dir, also when the test fails.

Auth: the unix socket is ``trust`` for the superuser (only this test process can reach
the temp dir, and it is how we create the role), TCP is ``scram-sha-256`` with a random
password for the ``emberbox`` role: the product reads its password from the URL, so the
tests exercise exactly that path (and can check the password is never printed). The role
may create databases, so a test can take a fresh one (:func:`fresh_database`).

As root (the test VMs and CI run as root) PostgreSQL refuses to run, so the server runs
as the ``postgres`` OS user (``setpriv``) in a temp dir chowned to it. Debian's
``postgresql`` package also runs a system cluster on 5432; it is never used here.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.servers import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
START_WAIT_S = 60.0
STOP_WAIT_S = 15.0
DATABASE = "emberbox"
ROLE = "emberbox"
SERVER_OPTIONS = (
    # A throwaway cluster: durability buys nothing and costs seconds on a shared host.
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "shared_buffers=32MB",
    "max_connections=200",
)


def _as_postgres(argv: list[str]) -> list[str]:
    """``argv`` run as the ``postgres`` OS user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *argv]


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _initdb(data: Path, workdir: Path) -> None:
    done = subprocess.run(
        _as_postgres(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        ),
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed ({done.returncode}): {done.stdout}\n{done.stderr}")


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-4000:]
    except OSError:
        return "(no log)"


def _wait_ready(proc: subprocess.Popen[bytes], sockdir: Path, port: int, log: Path) -> None:
    import psycopg

    deadline = time.monotonic() + START_WAIT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}:\n{_log_tail(log)}")
        try:
            with psycopg.connect(
                host=str(sockdir), port=port, user="postgres", dbname="postgres", connect_timeout=2
            ):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres not ready in {START_WAIT_S}s:\n{_log_tail(log)}"
                ) from None
            time.sleep(0.1)


def _create_database(sockdir: Path, port: int, password: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=str(sockdir), port=port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(password)
            )
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(DATABASE), sql.Identifier(ROLE)
            )
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT), then SIGKILL to the whole process group."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # backends left behind, if any
    proc.wait()


@contextmanager
def running_postgres() -> Iterator[str]:
    """A fresh PostgreSQL 15 with a database; yields ``postgresql://emberbox:…@127.0.0.1:port/emberbox``."""
    workdir = Path(tempfile.mkdtemp(prefix="emberbox-pg-"))
    try:
        _chown_to_postgres(workdir)
        data = workdir / "data"
        log = workdir / "postgres.log"
        _initdb(data, workdir)
        port = free_port()
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                _as_postgres(
                    [
                        str(PG_BIN / "postgres"),
                        "-D",
                        str(data),
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(port),
                        "-k",
                        str(workdir),
                        *(arg for option in SERVER_OPTIONS for arg in ("-c", option)),
                    ]
                ),
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: _stop kills the backends too
            )
        try:
            _wait_ready(proc, workdir, port, log)
            password = secrets.token_urlsafe(16)
            _create_database(workdir, port, password)
            yield f"postgresql://{ROLE}:{password}@127.0.0.1:{port}/{DATABASE}"
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def fresh_database(url: str, name: str) -> str:
    """A new empty database ``name`` on the server of ``url`` (as its role); its URL."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return url.rsplit("/", 1)[0] + "/" + name
