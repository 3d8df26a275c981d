"""The API replica's pure parts: headers to and from a host, URLs, WebSocket closes, the
relayed-route table, index rows as the API shows them (``lost``)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from typer.testing import CliRunner

from emberbox import errors
from emberbox.api.app import create_app
from emberbox.api.cluster import create_cluster_app, passthrough, sandboxes, sockets
from emberbox.api.cluster.proxy import request_headers, response_headers, upstream_url
from emberbox.api.cluster.relay import close_for_caller, host_subprotocols, websocket_url
from emberbox.cli import cluster as cluster_cli
from emberbox.cli.common import EXIT_ERROR
from emberbox.config import Settings
from emberbox.models import ExecRequest, SandboxPublic
from emberbox.sdk import AsyncCluster, Cluster, Sandbox
from emberbox.service.cluster_index import differs, sandbox_public, with_host_down
from emberbox.store import SandboxRow
from tests.support.fakes_cluster import FakeCluster, FakeHost
from tests.support.servers import serving

NOW = datetime(2026, 12, 5, tzinfo=UTC)


def _row(state: str = "running") -> SandboxRow:
    return SandboxRow(
        id="sb1",
        state=state,
        image="default",
        vcpus=1,
        memory_mib=512,
        timeout_s=300,
        created_at=NOW,
        expires_at=NOW + timedelta(seconds=300),
        updated_at=NOW,
        metadata={"a": "b"},
        env={"SECRET": "x"},
        tenant_id="t1",
        host="alpha",
    )


def test_request_headers_drop_the_callers_key_and_hop_by_hop_ones() -> None:
    """The host gets its own key, never the caller's; hop-by-hop headers (also those a
    Connection header names), Host and cookies stay behind; the rest passes."""
    sent = request_headers(
        [
            (b"Authorization", b"Bearer caller-key"),
            (b"x-api-key", b"caller-key"),
            (b"host", b"api.example"),
            (b"connection", b"keep-alive, x-private"),
            (b"x-private", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"cookie", b"a=b"),
            (b"content-type", b"application/json"),
            (b"content-length", b"12"),
            (b"x-request-id", b"forged"),
        ],
        key="host-key",
        request_id="req-1",
    )
    assert sent == [
        (b"content-type", b"application/json"),
        (b"content-length", b"12"),
        (b"authorization", b"Bearer host-key"),
        (b"x-request-id", b"req-1"),
    ]


def test_response_headers_keep_the_body_framing_but_not_the_hosts_own() -> None:
    """Content-Length and Content-Encoding pass (the body is relayed raw); the host's
    Date, Server, request id and hop-by-hop headers do not."""
    kept = response_headers(
        [
            (b"Content-Type", b"application/x-ndjson"),
            (b"content-length", b"5"),
            (b"content-encoding", b"gzip"),
            (b"date", b"x"),
            (b"server", b"uvicorn"),
            (b"x-request-id", b"host-id"),
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"close"),
        ]
    )
    assert kept == [
        (b"content-type", b"application/x-ndjson"),
        (b"content-length", b"5"),
        (b"content-encoding", b"gzip"),
    ]


@pytest.mark.parametrize(
    ("base", "path", "query", "url"),
    [
        (
            "http://10.0.0.2:9000",
            "/v1/sandboxes/a/files",
            b"path=%2Ftmp%2Fx",
            "http://10.0.0.2:9000/v1/sandboxes/a/files?path=%2Ftmp%2Fx",
        ),
        ("http://10.0.0.2:9000/", "/v1/sandboxes/a", b"", "http://10.0.0.2:9000/v1/sandboxes/a"),
    ],
)
def test_upstream_url_keeps_the_path_and_query_as_sent(
    base: str, path: str, query: bytes, url: str
) -> None:
    """The host's URL is its base + the caller's (still encoded) path and query."""
    assert upstream_url(base, path, query) == url


def test_websocket_url_and_subprotocols() -> None:
    """http -> ws, https -> wss; a terminal ticket (this replica's) is not offered to
    the host, the PTY protocol is."""
    assert websocket_url("http://h:1", "/v1/sandboxes/a/pty", b"cols=80") == (
        "ws://h:1/v1/sandboxes/a/pty?cols=80"
    )
    assert websocket_url("https://h:1/", "/x") == "wss://h:1/x"
    offered = ["emberbox.pty", "emberbox.ticket.secret"]
    assert host_subprotocols(offered) == ["emberbox.pty"]


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (1000, "bye", (1000, "bye")),
        (4404, "no sandbox x", (4404, "no sandbox x")),
        (None, None, (1000, "")),
        (1005, "", (1000, "")),
        (1006, "", (4503, "the sandbox's host went away")),
    ],
)
def test_the_callers_close_mirrors_the_hosts(
    code: int | None, reason: str | None, expected: tuple[int, str]
) -> None:
    """The host's close code reaches the caller; a dropped host is 4503 (HostDown)."""
    assert close_for_caller(code, reason) == expected


def test_every_native_sandbox_route_is_answered_or_relayed() -> None:
    """Each operation of the native app's OpenAPI document with a sandbox or snapshot id
    is either answered by the replica or relayed, and relayed JSON routes keep their
    body model (the replica checks it as the native app does)."""
    paths = create_app(Settings()).openapi()["paths"]
    wanted = {
        (method.upper(), path)
        for path, operations in paths.items()
        if "{sandbox_id}" in path or "{snapshot_id}" in path
        for method in operations
    }
    assert ("POST", "/v1/sandboxes/{sandbox_id}/exec") in wanted  # the document was read
    answered = passthrough.answered_by(sandboxes.router) | passthrough.answered_by(
        sockets.ticket_router
    )
    relayed = passthrough.answered_by(passthrough.relay_router(answered))
    covered = {(method, path.replace(":path", "")) for method, path in answered | relayed}
    assert wanted - covered == set()
    bodies = {
        item.path: item.body
        for router in passthrough.NATIVE_ROUTERS
        for item in passthrough.relayed_routes(list(router.routes), answered)
        if "POST" in item.methods
    }
    assert bodies["/v1/sandboxes/{sandbox_id}/exec"] is ExecRequest
    assert bodies["/v1/sandboxes/{sandbox_id}/processes/{pid}/stdin"] is None  # raw body
    assert "/v1/sandboxes/{sandbox_id}/snapshots" not in bodies  # answered, not relayed


def test_a_row_whose_host_is_down_is_lost_unless_it_had_ended() -> None:
    """Live and paused rows read as lost while their host does not answer; stopped and
    error rows keep their state."""
    for state in ("creating", "running", "paused", "stopping", "lost"):
        assert with_host_down(_row(state)).state == "lost"
    for state in ("stopped", "error"):
        assert with_host_down(_row(state)).state == state


def test_index_rows_show_neither_host_nor_env() -> None:
    """The public form of an index row has no host and no env; a host's answer that
    differs only in metadata is not worth a write, a new state is."""
    row = _row()
    public = sandbox_public(row)
    dumped = public.model_dump()
    assert "host" not in dumped and "env" not in dumped
    assert public.state == "running" and public.metadata == {"a": "b"}
    same = SandboxPublic.model_validate({**dumped, "metadata": {}})
    assert not differs(row, same)
    assert differs(row, SandboxPublic.model_validate({**dumped, "state": "paused"}))
    assert differs(replace(row, expires_at=NOW), same)


def test_errors_of_a_cluster_are_host_errors() -> None:
    """NoCapacity and HostDown are 503s under HostError (what SDK users catch)."""
    assert issubclass(errors.NoCapacity, errors.HostError)
    assert errors.NoCapacity.status_code == errors.HostDown.status_code == 503


def test_replica_app_without_hosts(tmp_path: Path) -> None:
    """Through the replica app itself (no host servers): a create with no host with room
    is a 503 NoCapacity with Retry-After; a sandbox whose host is down reads lost and is
    killed in the index; admin routes, health and the routes cluster mode does not serve."""
    settings = Settings(data_dir=tmp_path, api_key=SecretStr("admin-key"))
    cluster = FakeCluster()
    cluster.add(FakeHost("alpha", "http://127.0.0.1:9", "k", down=True))
    app = create_cluster_app(settings, cluster, monitor_interval_s=0)
    auth = {"Authorization": "Bearer admin-key"}
    with TestClient(app) as client:
        assert client.post("/v1/sandboxes", json={}).status_code == 401
        full = client.post("/v1/sandboxes", json={}, headers=auth)
        assert full.status_code == 503 and full.headers["retry-after"] == "5"
        assert full.json()["error"]["type"] == "NoCapacity"
        context = app.state.cluster
        info = sandbox_public(_row())
        assert client.portal is not None
        client.portal.call(lambda: context.index.record(info, host="alpha", tenant_id="local"))
        assert client.get("/v1/sandboxes/sb1", headers=auth).json()["state"] == "lost"
        relayed = client.post("/v1/sandboxes/sb1/exec", json={"cmd": ["true"]}, headers=auth)
        assert relayed.status_code == 503 and relayed.json()["error"]["type"] == "HostDown"
        assert client.delete("/v1/sandboxes/sb1", headers=auth).status_code == 204
        listed = client.get("/v1/sandboxes", headers=auth).json()["sandboxes"]
        assert [(s["id"], s["state"]) for s in listed] == [("sb1", "stopped")]
        assert client.get("/v1/sandboxes/nope", headers=auth).status_code == 404
        hosts = client.get("/v1/cluster/hosts", headers=auth).json()["hosts"]
        assert [(h["name"], h["alive"]) for h in hosts] == [("alpha", False)]
        drain = client.post("/v1/cluster/hosts/alpha/drain", json={"drain": True}, headers=auth)
        assert drain.json()["hosts"][0]["draining"] is True
        assert client.get("/healthz").json()["sandboxes"] == 0
        for path in ("/e2b/sandboxes", "/mcp", "/console/"):
            answer = client.get(path, headers=auth)
            assert answer.status_code == 501, path
            assert answer.json()["error"]["type"] == "NotServedInCluster"
        assert client.post("/v1/images", headers=auth).status_code == 501


def test_sdk_cluster_calls_and_no_capacity(tmp_path: Path) -> None:
    """Cluster.hosts / drain (sync and async) through a real server; a create with no
    room raises NoCapacity carrying the Retry-After seconds; a tenant key is refused."""
    settings = Settings(data_dir=tmp_path, api_key=SecretStr("admin-key"))
    cluster = FakeCluster()
    cluster.add(FakeHost("beta", "http://127.0.0.1:9", "k", down=True))
    cluster.add(FakeHost("alpha", "http://127.0.0.1:9", "k", down=True))
    app = create_cluster_app(settings, cluster, monitor_interval_s=0)
    with serving(app, lifespan=True) as url:
        key = "admin-key"
        assert [h.name for h in Cluster.hosts(url=url, api_key=key)] == ["alpha", "beta"]
        drained = Cluster.drain("beta", url=url, api_key=key)
        assert [(h.name, h.draining) for h in drained] == [("alpha", False), ("beta", True)]
        undone = anyio.run(lambda: AsyncCluster.drain("beta", False, url=url, api_key=key))
        assert [h.draining for h in undone] == [False, False]
        assert [h.alive for h in anyio.run(lambda: AsyncCluster.hosts(url=url, api_key=key))] == [
            False,
            False,
        ]
        with pytest.raises(errors.NotFound):
            Cluster.drain("gamma", url=url, api_key=key)
        with pytest.raises(errors.NoCapacity) as full:
            Sandbox.create(url=url, api_key=key)
        assert full.value.retry_after_s == 5.0
        assert "no host is reachable" in full.value.message
        with pytest.raises(errors.Unauthorized):
            Cluster.hosts(url=url, api_key="eb_wrong")


def test_cli_cluster_status_and_drain(tmp_path: Path) -> None:
    """`emberbox cluster status` prints every host with its capacity; `drain NAME` and
    `drain NAME --undo` flip it; a wrong key is a clean error, no traceback."""
    settings = Settings(data_dir=tmp_path, api_key=SecretStr("admin-key"))
    cluster = FakeCluster()
    cluster.add(FakeHost("alpha", "http://127.0.0.1:9", "k", max_sandboxes=3, down=True))
    app = create_cluster_app(settings, cluster, monitor_interval_s=0)
    runner = CliRunner()
    with serving(app, lifespan=True) as url:
        opts = ["--url", url, "--api-key", "admin-key"]
        shown = runner.invoke(cluster_cli.app, ["status", *opts])
        assert shown.exit_code == 0, shown.output
        assert "alpha" in shown.output and "0/3" in shown.output and "NO" in shown.output
        drained = runner.invoke(cluster_cli.app, ["drain", "alpha", *opts])
        assert drained.exit_code == 0 and cluster.hosts_by_name["alpha"].draining
        as_json = json.loads(runner.invoke(cluster_cli.app, ["status", "--json", *opts]).output)
        assert as_json[0]["draining"] is True
        undone = runner.invoke(cluster_cli.app, ["drain", "alpha", "--undo", *opts])
        assert undone.exit_code == 0 and not cluster.hosts_by_name["alpha"].draining
        refused = runner.invoke(cluster_cli.app, ["status", "--url", url, "--api-key", "nope"])
        assert refused.exit_code == EXIT_ERROR and "Traceback" not in refused.output


def test_public_port_urls_are_refused_in_cluster_mode(tmp_path: Path) -> None:
    """Making a port public through a replica is a 501 naming why (its URL would be a
    host's); revoking goes to the host (here: down, so HostDown)."""
    settings = Settings(data_dir=tmp_path, api_key=SecretStr("admin-key"))
    cluster = FakeCluster()
    cluster.add(FakeHost("alpha", "http://127.0.0.1:9", "k", down=True))
    app = create_cluster_app(settings, cluster, monitor_interval_s=0)
    auth = {"Authorization": "Bearer admin-key"}
    with TestClient(app) as client:
        info = sandbox_public(_row())
        assert client.portal is not None
        client.portal.call(
            lambda: app.state.cluster.index.record(info, host="alpha", tenant_id="local")
        )
        made = client.post("/v1/sandboxes/sb1/ports/8000", json={"public": True}, headers=auth)
        assert made.status_code == 501 and "public port URLs" in made.json()["error"]["message"]
        revoked = client.post("/v1/sandboxes/sb1/ports/8000", json={"public": False}, headers=auth)
        assert revoked.status_code == 503 and revoked.json()["error"]["type"] == "HostDown"
        unknown = client.post("/v1/sandboxes/nope/ports/8000", json={"public": True}, headers=auth)
        assert unknown.status_code == 404  # ownership first, as for any id
