"""Prometheus metrics and JSON logs of a real ``emberbox serve`` with real VMs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from emberbox.images.registry import ImageInfo
from tests.support.keys import make_key
from tests.support.paths import short_tmp_dir
from tests.support.servers import Server, free_port, serve_emberbox

pytestmark = [pytest.mark.vm]

ADMIN_KEY = "eb-observability-admin-key-0123456789"
METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def server(default_image: ImageInfo) -> Iterator[Server]:
    """One server with an admin key (from the environment) and JSON logs."""
    data_dir = short_tmp_dir("eb-obs-")
    try:
        with serve_emberbox(
            data_dir,
            EMBERBOX_API_KEY=ADMIN_KEY,
            EMBERBOX_LOG_FORMAT="json",
            EMBERBOX_POOL_SIZE="0",
            EMBERBOX_METRICS_BIND=f"127.0.0.1:{METRICS_PORT}",
        ) as running:
            yield running
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    got = client.get("/metrics")
    assert got.status_code == 200, got.text
    assert got.headers["content-type"].startswith("text/plain")
    return samples(got.text)


def total(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(value for (n, _), value in found.items() if n == name)


def test_counters_and_histograms_move_after_a_create_and_an_exec(server: Server) -> None:
    """A create and an exec move the create counter and histogram, the exec histogram,
    the HTTP counter of the exec route, and the live-sandbox gauge."""
    with server.client() as client:
        before = scrape(client)
        created = client.post("/v1/sandboxes", json={})
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["id"]
        ran = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": ["true"]})
        assert ran.status_code == 200, ran.text
        after = scrape(client)
        assert total(after, "emberbox_sandbox_creates_total") == (
            total(before, "emberbox_sandbox_creates_total") + 1
        )
        assert total(after, "emberbox_sandbox_create_seconds_count") == (
            total(before, "emberbox_sandbox_create_seconds_count") + 1
        )
        assert total(after, "emberbox_exec_seconds_count") == (
            total(before, "emberbox_exec_seconds_count") + 1
        )
        route = ("method", "POST"), ("route", "/v1/sandboxes/{sandbox_id}/exec"), ("status", "200")
        assert after["emberbox_http_requests_total", route] == 1
        running = ("image", "default"), ("state", "running")
        assert (
            after["emberbox_sandboxes", running]
            == before.get(("emberbox_sandboxes", running), 0) + 1
        )
        assert after["emberbox_vmm_resident_bytes", ()] > 0
        missing = client.get("/v1/sandboxes/nope")
        assert missing.status_code == 404
        assert scrape(client)["emberbox_errors_total", (("type", "NotFound"),)] >= 1
        client.delete(f"/v1/sandboxes/{sandbox_id}")


def test_scraping_needs_an_admin_key(server: Server) -> None:
    """Without a key, with a wrong key and with a tenant's (non-admin) key: 401."""
    tenant_key = make_key(server.settings.data_dir, "--name", "observer")
    for headers in ({}, {"Authorization": "Bearer eb_wrong"}, {"X-API-Key": tenant_key}):
        refused = httpx.get(f"{server.url}/metrics", headers=headers, timeout=30)
        assert refused.status_code == 401, (headers, refused.text)
        assert refused.json()["error"]["type"] == "Unauthorized"


def test_the_metrics_bind_serves_metrics_without_a_key(server: Server) -> None:
    """EMBERBOX_METRICS_BIND serves the same scrape on its own address, without a key, and
    nothing else there."""
    got = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30)
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/plain")
    assert ("emberbox_vmm_resident_bytes", ()) in samples(got.text)
    other = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/v1/sandboxes", timeout=30)
    assert other.status_code == 404


def test_json_logs_parse_and_carry_the_request_id(server: Server) -> None:
    """Every line of the JSON log parses; a request's id is echoed and reaches the log
    lines it caused, with the tenant, the sandbox and the duration."""
    with server.client() as client:
        created = client.post("/v1/sandboxes", json={}, headers={"X-Request-Id": "rid-create-1"})
        assert created.status_code == 201 and created.headers["x-request-id"] == "rid-create-1"
        sandbox_id = created.json()["id"]
        ran = client.post(
            f"/v1/sandboxes/{sandbox_id}/exec",
            json={"cmd": ["echo", "hi"]},
            headers={"X-Request-Id": "rid-exec-2"},
        )
        assert ran.json()["stdout"] == "hi\n"
        fresh = client.get("/v1/sandboxes", headers={"X-Request-Id": "bad id with spaces"})
        assert fresh.headers["x-request-id"] != "bad id with spaces"
        client.delete(f"/v1/sandboxes/{sandbox_id}")
    lines = [line for line in server.log_path.read_text().splitlines() if line.strip()]
    assert lines, "no log lines"
    parsed = [json.loads(line) for line in lines]  # every line parses
    assert all({"time", "level", "logger", "message"} <= set(p) for p in parsed)
    exec_lines = [p for p in parsed if p.get("request_id") == "rid-exec-2"]
    closing = [p for p in exec_lines if p.get("status") == 200]
    assert closing, exec_lines
    assert closing[0]["sandbox_id"] == sandbox_id and closing[0]["tenant"]
    assert closing[0]["duration_ms"] > 0 and closing[0]["method"] == "POST"
    assert any(p.get("request_id") == "rid-create-1" for p in parsed)
    assert ADMIN_KEY not in server.log_path.read_text()
