"""The real cluster every tests/cluster/test_cluster_*.py module shares (issue 18).

One session-wide :class:`Rig`: a PostgreSQL in a temp dir (``running_postgres``), a Ray
cluster of a head and three host nodes on 127.0.0.x with token auth
(``running_ray_cluster``), a host agent on each node started the operator's way
(``emberbox cluster host start`` in a subprocess: this test process never joins the
cluster as a Ray driver, so another module may run its own), two API replicas
(``emberbox serve --cluster ADDRESS`` subprocesses on one PostgreSQL, each on its own
port) and keys made with ``emberbox keys create`` against that PostgreSQL.

Each host holds at most :data:`MAX_PER_HOST` sandboxes. Tests kill what they make; the
teardown kills every sandbox, stops the hosts, the replicas, Ray and PostgreSQL, and
fails when a QEMU, host server or Ray process of the rig is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from emberbox.config import Settings
from emberbox.images.registry import ImageInfo
from tests.support.cluster_rig import (
    HOST_START_S,
    HOSTS,
    MAX_PER_HOST,
    NETWORKS,
    TENANT_QUOTAS,
    Replica,
    Rig,
    clean_env,
    cli,
    pids_with_env,
)
from tests.support.keys import CLI
from tests.support.paths import REPO, pids_mentioning, qemu_pids_under, short_tmp_dir
from tests.support.postgres import running_postgres
from tests.support.raycluster import RayCluster, running_ray_cluster
from tests.support.servers import free_port


def _start_hosts(ray: RayCluster, root: Path) -> None:
    """``emberbox cluster host start`` for every host, in parallel subprocesses."""
    images = Settings().images_dir  # the shared image cache, as the other suites use it
    started = []
    for name in HOSTS:
        env = {
            "EMBERBOX_IMAGES_DIR": str(images),
            "EMBERBOX_CACHE_DIR": str(root / name / "cache"),  # its templates
            "EMBERBOX_NETWORK_CIDR": NETWORKS[name],
            "EMBERBOX_POOL_SIZE": "0",
            "EMBERBOX_MAX_SANDBOXES": str(MAX_PER_HOST),
        }
        args = ["cluster", "host", "start", "--name", name, "--data-dir", str(root / name)]
        args += ["--address", ray.address]
        for pair in env.items():
            args += ["--env", "=".join(pair)]
        started.append(
            subprocess.Popen(
                [sys.executable, "-c", CLI, *args],
                cwd=REPO,
                env=clean_env(ray.env),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    failures = []
    for name, process in zip(HOSTS, started, strict=True):
        _, err = process.communicate(timeout=HOST_START_S)
        if process.returncode != 0:
            failures.append(f"host {name}: {err[-3000:]}")
    assert not failures, "\n".join(failures)


def _stop_hosts(ray: RayCluster) -> None:
    for name in HOSTS:
        if ray.is_up(name):
            cli(ray.env, "cluster", "host", "stop", "--name", name, "--address", ray.address)


def _make_key(env: dict[str, str], *args: str) -> str:
    made = cli(env, "keys", "create", *args)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def _leftovers(root: Path, ray: RayCluster | None) -> list[int]:
    found = set(qemu_pids_under(root)) | set(pids_with_env(f"EMBERBOX_DATA_DIR={root}"))
    if ray is not None:
        found |= set(pids_mentioning(str(ray.temp_dir)))
    found.discard(os.getpid())
    return sorted(found)


@pytest.fixture(scope="session")
def rig(default_image: ImageInfo) -> Iterator[Rig]:
    """The shared cluster (its hosts share the image cache, where ``default_image`` is
    built if missing); everything it started is gone after it (checked)."""
    root = short_tmp_dir("ebc-")
    ray: RayCluster | None = None
    left: list[int] = []
    took: dict[str, float] = {}
    mark = time.monotonic()

    def lap(what: str) -> None:
        nonlocal mark
        took[what], mark = time.monotonic() - mark, time.monotonic()

    try:
        with ExitStack() as stack:
            database_url = stack.enter_context(running_postgres())
            lap("postgres")
            ray = stack.enter_context(running_ray_cluster(HOSTS))
            lap("ray (head + 3 nodes)")
            db_env = {"EMBERBOX_DATABASE_URL": database_url, "EMBERBOX_DATA_DIR": str(root / "cli")}
            admin_key = _make_key(db_env, "--name", "ops", "--admin")
            keys = {
                tenant: _make_key(db_env, "--name", tenant, *TENANT_QUOTAS)
                for tenant in ("alice", "bob")
            }
            lap("keys")
            stack.callback(_stop_hosts, ray)
            _start_hosts(ray, root)
            lap("hosts (emberbox cluster host start x3)")
            replicas = []
            for index in range(2):
                env = {
                    **ray.env,
                    "EMBERBOX_DATABASE_URL": database_url,
                    "EMBERBOX_CLUSTER_ADDRESS": ray.address,
                    "EMBERBOX_DATA_DIR": str(root / f"replica-{index}"),
                }
                env.pop("EMBERBOX_API_KEY", None)
                log = root / f"replica-{index}.log"
                replica = Replica(f"replica-{index}", free_port(), env, log)
                stack.callback(_print_log, replica)
                stack.callback(replica.kill, signal.SIGTERM)
                replicas.append(replica)
            for replica in replicas:
                replica.start()
            lap("API replicas x2")
            print("cluster rig up: " + ", ".join(f"{k} {v:.1f} s" for k, v in took.items()))
            made = Rig(database_url, ray, root, replicas, admin_key, keys)
            stack.callback(_kill_sandboxes, made)
            yield made
        left = _leftovers(root, ray)
    finally:
        for pid in _leftovers(root, ray):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"the cluster rig left processes running: {left}"


def _kill_sandboxes(rig: Rig) -> None:
    with contextlib.suppress(httpx.HTTPError):
        rig.kill_all_sandboxes()


def _print_log(replica: Replica) -> None:
    print(f"--- {replica.name} log ---\n{replica.log_tail()}")
