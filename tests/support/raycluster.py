"""A real multi-node Ray cluster on this machine, for tests/cluster (and B1's smoke test).

:func:`running_ray_cluster` starts, with ``ray.cluster_utils.Cluster``:

- a head node on 127.0.0.2 with 1 CPU, no dashboard and none of the host resources (so no
  ``HostAgent`` can land on it; drivers such as API replicas attach to it);
- one node per host name on 127.0.0.3, .4, ... with ``{"emberbox_host_<name>": 1}`` and 1 CPU.

127.0.0.1 is avoided on purpose: Ray rewrites a 127.0.0.1/localhost bootstrap address to the
machine's own IP, where nothing listens. Every Ray process runs with token authentication on
(``RAY_AUTH_MODE=token`` and a random ``RAY_AUTH_TOKEN``, set in ``os.environ`` for the
lifetime of the cluster and restored afterwards; :attr:`RayCluster.env` is what a subprocess
needs to join). Node death is detected fast through the GCS health check settings
(:data:`HEALTH_CHECK`): a killed node is marked dead within ~``period * threshold``.

:meth:`RayCluster.kill_node` kills a host node the hard way (its raylet, its workers and
their children, SIGKILL, as a machine that dies); :meth:`RayCluster.restart_node` adds a new
node with the same IP and resource. Teardown removes every node, also on failure, and
SIGKILLs whatever still mentions the cluster's temp dir.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.paths import pids_mentioning, short_tmp_dir

HEAD_IP = "127.0.0.2"
FIRST_HOST_OCTET = 3
# GCS -> raylet health checks: one every second, a node is dead after 5 missed checks of 2 s
# each at most. Tighter settings (1 s x 3) detect in ~3 s but risk false deaths when QEMU
# under TCG starves the raylets of CPU on this 2-core box.
HEALTH_CHECK: dict[str, Any] = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 5,
}
NODE_WAIT_S = 60.0


def host_resource(name: str) -> str:
    """The custom resource that pins host ``name``'s agent to its node."""
    return f"emberbox_host_{name}"


@dataclass
class RayCluster:
    """A running cluster: its GCS address, its auth env, and its host nodes by name."""

    address: str  # "127.0.0.2:PORT", what `ray.init(address=...)` and `--cluster` take
    token: str
    temp_dir: Path
    _cluster: Any  # ray.cluster_utils.Cluster
    _nodes: dict[str, Any] = field(default_factory=dict)  # name -> ray._private.node.Node
    _ips: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """What a subprocess (API replica, CLI) needs in its environment to join."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @property
    def hosts(self) -> list[str]:
        return list(self._ips)

    def node_ip(self, name: str) -> str:
        return self._ips[name]

    def node_id(self, name: str) -> str:
        """The Ray node id (hex) of host ``name``'s current node."""
        return str(self._nodes[name].node_id)

    def is_up(self, name: str) -> bool:
        return name in self._nodes

    def connect(self, namespace: str = "emberbox") -> None:
        """Make this process a driver of the cluster (idempotent); disconnected at teardown."""
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, namespace=namespace, log_to_driver=False)

    def kill_node(self, name: str) -> float:
        """Kill host ``name``'s node: raylet, workers and their children, all SIGKILL.

        Returns the monotonic time of the kill (for measuring detection time).
        """
        node = self._nodes.pop(name)
        raylet_socket = str(node.raylet_socket_name)
        workers = pids_mentioning(raylet_socket)
        killed_at = time.monotonic()
        self._cluster.remove_node(node, allow_graceful=False)
        for pid in workers + pids_mentioning(raylet_socket):
            _kill(pid)
        _wait_gone(pids_mentioning(raylet_socket), 10.0)
        return killed_at

    def restart_node(self, name: str) -> None:
        """Start a fresh node for host ``name`` (same IP, same resource) after a kill."""
        if name in self._nodes:
            raise RuntimeError(f"host {name}'s node is still up")
        self._nodes[name] = _add_host_node(self._cluster, name, self._ips[name], self.temp_dir)

    def wait_node_dead(self, name: str, node_id: str, timeout_s: float = 60.0) -> float:
        """Block until the GCS reports node ``node_id`` dead; return the monotonic time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive = set(self._cluster.global_state._live_node_ids())
            if node_id not in alive:
                return time.monotonic()
            time.sleep(0.1)
        raise TimeoutError(f"Ray still reports host {name}'s node {node_id} alive")


@contextmanager
def running_ray_cluster(
    hosts: Sequence[str] = ("h1", "h2", "h3"),
    *,
    system_config: Mapping[str, Any] | None = None,
) -> Iterator[RayCluster]:
    """A head plus one node per name in ``hosts``; everything is stopped on the way out."""
    from ray.cluster_utils import Cluster

    token = secrets.token_hex(32)
    temp_dir = short_tmp_dir("ebray-")
    saved = _set_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, **_QUIET_ENV})
    cluster: Any = None
    ray_cluster: RayCluster | None = None
    try:
        cluster = Cluster(
            initialize_head=True,
            shutdown_at_exit=True,
            head_node_args={
                "num_cpus": 1,
                "include_dashboard": False,
                "node_ip_address": HEAD_IP,
                "temp_dir": str(temp_dir),
                "_system_config": {**HEALTH_CHECK, **(system_config or {})},
            },
        )
        ray_cluster = RayCluster(cluster.address, token, temp_dir, cluster)
        for index, name in enumerate(hosts):
            ip = f"127.0.0.{FIRST_HOST_OCTET + index}"
            ray_cluster._ips[name] = ip
            ray_cluster._nodes[name] = _add_host_node(cluster, name, ip, temp_dir)
        cluster.wait_for_nodes(NODE_WAIT_S)
        yield ray_cluster
    finally:
        _teardown(cluster, temp_dir)
        _set_env(saved)
        shutil.rmtree(temp_dir, ignore_errors=True)


_QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def _add_host_node(cluster: Any, name: str, ip: str, temp_dir: Path) -> Any:
    return cluster.add_node(
        num_cpus=1,
        resources={host_resource(name): 1},
        node_ip_address=ip,
        temp_dir=str(temp_dir),
    )


def _teardown(cluster: Any, temp_dir: Path) -> None:
    import ray

    try:
        if ray.is_initialized():
            ray.shutdown()
    finally:
        try:
            if cluster is not None:
                for node in list(cluster.worker_nodes):
                    cluster.remove_node(node, allow_graceful=False)
                if cluster.head_node is not None:
                    cluster.remove_node(cluster.head_node, allow_graceful=False)
        finally:
            # Workers and whatever they started (host servers) that outlived their raylet.
            leftovers = pids_mentioning(str(temp_dir))
            for pid in leftovers:
                _kill(pid)
            _wait_gone(leftovers, 10.0)
            _reset_ray_globals()


def _reset_ray_globals() -> None:
    import ray._private.services

    ray._private.services.find_gcs_addresses.cache_clear()  # type: ignore[attr-defined]
    try:
        import ray._common.utils

        ray._common.utils.reset_ray_address()
    except (ImportError, AttributeError, OSError):
        pass


def _set_env(values: Mapping[str, str | None]) -> dict[str, str | None]:
    """Set (or, for None, unset) env vars and refresh Ray's cached config; return the old ones."""
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")  # Ray reads RAY_AUTH_MODE once per process otherwise
    # and caches the token: a second cluster in this process has another one
    AuthenticationTokenLoader.instance().reset_cache()
    return saved


def _kill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _wait_gone(pids: Sequence[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in pids):
            return
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
