"""The spec validator itself, and the driver's pure request plans checked against the spec."""

from __future__ import annotations

from emberbox.vmm.firecracker import api as fc_api
from tests.support.firecracker_spec import SpecValidator, assert_valid, needs_spec


@needs_spec
def test_validator_rejects_what_firecracker_would_reject(validator: SpecValidator) -> None:
    """The validator itself catches unknown fields, missing fields, bad enums and bad paths."""
    ok = {"vcpu_count": 2, "mem_size_mib": 512}
    assert validator.errors("PUT", "/machine-config", ok) == []
    assert validator.errors("PUT", "/machine-config", {**ok, "memory_mib": 512})  # unknown
    assert validator.errors("PUT", "/machine-config", {"vcpu_count": 2})  # required missing
    assert validator.errors("PUT", "/machine-config", {**ok, "vcpu_count": "2"})  # type
    assert validator.errors("PATCH", "/vm", {"state": "Stopped"})  # enum
    assert validator.errors(
        "PUT",
        "/snapshot/load",
        {
            "snapshot_path": "s",
            "mem_backend": {"backend_type": "File", "backend_path": "m", "extra": 1},
        },
    )  # unknown, nested via $ref
    assert validator.errors(
        "PUT", "/drives/rootfs", {**fc_api.root_drive_payload("x"), "drive_id": "other"}
    )  # path mismatch
    assert validator.errors("PUT", "/no-such-path", {})
    assert validator.errors("DELETE", "/vm", None)


@needs_spec
def test_pure_request_plans_match_the_spec(validator: SpecValidator) -> None:
    """Boot, restore, pause/resume and snapshot payloads validate without any process."""
    plan = fc_api.BootPlan(1, 256, "/k", "/i", "rootfs.ext4", "vsock.sock", "l", "m", ("quiet",))
    requests = [
        *fc_api.boot_requests(plan),
        *fc_api.restore_requests("l", "m", "snap/vmstate", "snap/memory"),
        fc_api.ApiRequest("PATCH", "/vm", fc_api.vm_state_payload("Paused")),
        fc_api.ApiRequest("PUT", "/snapshot/create", fc_api.snapshot_create_payload("a", "b")),
    ]
    assert_valid(
        validator, [{"method": r.method, "path": r.path, "body": r.body} for r in requests]
    )
