"""Keys through the CLI against a real ``emberbox serve``: local mode, then keys made and
revoked while the server runs, tenants' own views, and the audit log on the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from emberbox.images.registry import ImageInfo
from tests.support.keys import emberbox_cli, make_key
from tests.support.servers import Server, serve_emberbox

pytestmark = [pytest.mark.vm]


@pytest.fixture
def server(data_dir: Path, default_image: ImageInfo) -> Iterator[Server]:
    """A server in local mode; on the way out every key is revoked so that the
    fixture's clean-up (keyless) sees and kills every sandbox again."""
    with serve_emberbox(data_dir) as running:
        try:
            yield running
        finally:
            listed = json.loads(emberbox_cli(data_dir, "keys", "list", "--json").stdout)
            for tenant in {row["tenant"] for row in listed}:
                emberbox_cli(data_dir, "keys", "revoke", tenant)


def test_local_mode_then_keys_from_the_cli(server: Server, data_dir: Path) -> None:
    """Keyless works until `keys create`; then 401 without a key, each tenant sees its
    own sandboxes, an admin sees all, and `keys revoke` ends a key at its next request."""
    with server.client() as anonymous:
        local_id = anonymous.post("/v1/sandboxes", json={}).json()["id"]
        alice = make_key(data_dir, "--name", "alice", "--max-sandboxes", "2")
        root = make_key(data_dir, "--name", "root", "--admin")
        denied = anonymous.get("/v1/sandboxes")
        assert denied.status_code == 401 and "API key" in denied.json()["error"]["message"]
        as_alice = {"Authorization": f"Bearer {alice}"}
        created = anonymous.post("/v1/sandboxes", json={}, headers=as_alice)
        assert created.status_code == 201, created.text
        alice_id = created.json()["id"]
        mine = anonymous.get("/v1/sandboxes", headers={"X-API-Key": alice}).json()
        assert [s["id"] for s in mine["sandboxes"]] == [alice_id]
        assert anonymous.get(f"/v1/sandboxes/{local_id}", headers=as_alice).status_code == 404
        everyone = anonymous.get("/v1/sandboxes", headers={"X-API-Key": root}).json()
        assert {local_id, alice_id} <= {s["id"] for s in everyone["sandboxes"]}
        ran = anonymous.post(
            f"/v1/sandboxes/{alice_id}/exec", json={"cmd": ["echo", "hi"]}, headers=as_alice
        )
        assert ran.json()["stdout"] == "hi\n"
        listed = emberbox_cli(data_dir, "keys", "list")
        assert listed.returncode == 0 and "alice" in listed.stdout and "root" in listed.stdout
        assert alice.split("_")[2] not in listed.stdout  # never the secret
        revoked = emberbox_cli(data_dir, "keys", "revoke", "alice")
        assert revoked.returncode == 0, revoked.stderr
        assert anonymous.get("/v1/sandboxes", headers=as_alice).status_code == 401
        gone = emberbox_cli(data_dir, "keys", "revoke", "nobody")
        assert gone.returncode != 0 and "Traceback" not in gone.stderr
        assert "nobody" in gone.stderr
        audit = emberbox_cli(data_dir, "audit", "--tenant", "alice", "--json")
        actions = [(e["action"], e["outcome"]) for e in json.loads(audit.stdout)]
        assert actions == [("sandbox.exec", "ok"), ("sandbox.create", "ok")], audit.stdout
        for sandbox_id in (local_id, alice_id):
            killed = anonymous.delete(f"/v1/sandboxes/{sandbox_id}", headers={"X-API-Key": root})
            assert killed.status_code == 204
