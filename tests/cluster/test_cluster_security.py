"""The cluster's locks (issue 18): Ray refuses a driver without the cluster's token, and a
tenant's key opens nothing on a host's own server (only the replicas hold host keys)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.support.cluster_rig import HOSTS, Rig

pytestmark = [pytest.mark.vm]
JOIN = "import ray, sys; ray.init(address=sys.argv[1], namespace='emberbox'); print('joined')"


def join_ray(rig: Rig, **env: str) -> subprocess.CompletedProcess[str]:
    """A Python process that tries to become a driver of the rig's Ray cluster."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.run(
        [sys.executable, "-c", JOIN, rig.ray.address],
        env={**base, "HOME": str(rig.root), **env},  # no ~/.ray/auth_token to fall back on
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_ray_refuses_a_driver_without_the_token(rig: Rig) -> None:
    """Without the token, or with another one, ray.init fails; with it, it joins."""
    missing = join_ray(rig, RAY_AUTH_MODE="token")
    assert missing.returncode != 0 and "joined" not in missing.stdout
    assert "AuthenticationError" in missing.stderr, missing.stderr[-2000:]
    wrong = join_ray(rig, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    assert wrong.returncode != 0 and "joined" not in wrong.stdout
    right = join_ray(rig, **rig.ray.env)
    assert right.returncode == 0 and "joined" in right.stdout, right.stderr[-2000:]


def test_a_tenant_key_opens_nothing_on_a_host(rig: Rig) -> None:
    """Each host's server (its URL from the hosts table) answers 401 to alice's and the
    cluster admin's keys; the replicas' answers never carry a host's URL."""
    import psycopg

    deadline = time.monotonic() + 30  # the replicas' monitor records the hosts (every 5 s)
    while True:
        with psycopg.connect(rig.database_url) as conn:
            rows = conn.execute("SELECT name, url FROM hosts WHERE url IS NOT NULL").fetchall()
        urls: dict[str, str] = {str(name): str(url) for name, url in rows}
        if sorted(urls) == sorted(HOSTS) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(urls) == sorted(HOSTS), urls
    for url in urls.values():
        for key in (rig.keys["alice"], rig.admin_key):
            answer = httpx.get(
                f"{url}/v1/sandboxes", headers={"Authorization": f"Bearer {key}"}, timeout=30
            )
            assert answer.status_code == 401, (url, answer.status_code)
    with rig.admin() as admin:
        shown = admin.get("/v1/cluster/hosts").text + admin.get("/v1/sandboxes").text
    assert not any(url in shown for url in urls.values())
