"""The host side's pure parts: the host server's environment, the actor's options, host
names, MemAvailable (emberbox/cluster/{server,hosts,agent}.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from emberbox.cluster.agent import free_memory_mib, max_sandboxes_of
from emberbox.cluster.hosts import (
    actor_options,
    check_name,
    probe_gcs,
    resource_name,
    status_of,
)
from emberbox.cluster.server import HOST_DEFAULTS, server_env
from emberbox.config import Settings
from emberbox.errors import HostError, InvalidRequest


def test_server_env_keeps_cluster_and_ray_settings_out() -> None:
    """The host server is a single-host server: no database URL, no Ray token, its own
    data dir, address, port and key, no per-key throttle of the cluster's traffic unless
    asked; start_host's env goes over the worker's and the defaults."""
    base = {
        "PATH": "/usr/bin",
        "EMBERBOX_DATABASE_URL": "postgresql://x",
        "EMBERBOX_CLUSTER_ADDRESS": "10.0.0.1:6379",
        "EMBERBOX_API_KEY": "operator-key",
        "EMBERBOX_MAX_SANDBOXES": "8",
        "RAY_AUTH_TOKEN": "secret",
        "RAY_AUTH_MODE": "token",
    }
    extra = {
        "EMBERBOX_MAX_SANDBOXES": "2",
        "EMBERBOX_NETWORK_CIDR": "10.230.0.0/16",
        "EMBERBOX_RATE_LIMIT_PER_S": "50",
    }
    env = server_env(base, extra, data_dir=Path("/d"), host="10.0.0.5", port=8123, key="k")
    assert env == {
        "PATH": "/usr/bin",
        "EMBERBOX_RATE_LIMIT_PER_S": "50",  # the operator's, over the host default
        "EMBERBOX_RATE_LIMIT_BURST": HOST_DEFAULTS["EMBERBOX_RATE_LIMIT_BURST"],
        "EMBERBOX_TENANT_MAX_WEBSOCKETS": HOST_DEFAULTS["EMBERBOX_TENANT_MAX_WEBSOCKETS"],
        "EMBERBOX_MAX_SANDBOXES": "2",
        "EMBERBOX_NETWORK_CIDR": "10.230.0.0/16",
        "EMBERBOX_DATA_DIR": "/d",
        "EMBERBOX_HOST": "10.0.0.5",
        "EMBERBOX_PORT": "8123",
        "EMBERBOX_API_KEY": "k",
    }


def test_max_sandboxes_is_read_from_the_child_env() -> None:
    """The agent reports the server's limit from the env it gives it (any case), else
    the default."""
    assert max_sandboxes_of({"EMBERBOX_MAX_SANDBOXES": "7"}) == 7
    assert max_sandboxes_of({"emberbox_max_sandboxes": "5"}) == 5
    assert max_sandboxes_of({}) == Settings.model_fields["max_sandboxes"].default


def test_actor_options_pin_the_host() -> None:
    """Detached, restarted forever, no CPU held, pinned by the host's resource."""
    options = actor_options("h1")
    assert options["name"] == "emberbox-host-h1"
    assert options["namespace"] == "emberbox"
    assert options["lifetime"] == "detached"
    assert options["max_restarts"] == -1
    assert options["num_cpus"] == 0
    assert options["resources"] == {"emberbox_host_h1": 1}
    assert resource_name("gpu-box_2") == "emberbox_host_gpu-box_2"


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 64, "é"])
def test_bad_host_names_are_refused(name: str) -> None:
    """A host name becomes a Ray resource and actor name: a clear 400 otherwise."""
    with pytest.raises(InvalidRequest):
        check_name(name)


def test_free_memory_is_memavailable() -> None:
    """MemAvailable in kB -> MiB; a kernel without the line gives 0."""
    meminfo = "MemTotal:  24683928 kB\nMemFree:  1000 kB\nMemAvailable:  2097152 kB\n"
    assert free_memory_mib(meminfo) == 2048
    assert free_memory_mib("MemTotal: 1 kB\n") == 0


def test_status_of_the_actor_answer() -> None:
    """The actor's dict becomes a HostStatus (images as a tuple, alive)."""
    raw = {
        "name": "h1",
        "url": "http://10.0.0.5:8123",
        "draining": True,
        "sandboxes": 2,
        "max_sandboxes": 16,
        "free_memory_mib": 4096,
        "images": ["default", "py"],
        "node_id": "abc",
    }
    status = status_of(raw, "abc")
    assert status.alive and status.draining and status.images == ("default", "py")
    assert (status.sandboxes, status.max_sandboxes, status.node_id) == (2, 16, "abc")


def test_status_of_a_host_whose_server_does_not_answer() -> None:
    """The actor answered, its server did not: not alive (no placement), but reachable."""
    raw = {
        "name": "h1",
        "url": "http://10.0.0.5:8123",
        "draining": False,
        "serving": False,
        "sandboxes": 0,
        "max_sandboxes": 16,
        "free_memory_mib": 4096,
        "images": [],
    }
    status = status_of(raw, "abc")
    assert not status.alive and status.reachable


def test_an_unreachable_ray_address_fails_at_once() -> None:
    """ray.init retries a GCS that is not there for minutes; the probe says so at once
    (and leaves "auto" and URLs to Ray)."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        probe_gcs(f"127.0.0.1:{port}")  # something answers: no error
    with pytest.raises(HostError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        probe_gcs(f"127.0.0.1:{port}", timeout_s=2.0)
    probe_gcs("auto")
    probe_gcs("ray://127.0.0.1:1")
