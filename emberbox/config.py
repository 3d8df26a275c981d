"""One typed Settings object: argument > ``EMBERBOX_*`` environment variable > default.

Settings are built once by the entry point (CLI, server, test fixture) and passed down;
nothing imports a module-level instance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

Accel = Literal["auto", "kvm", "tcg"]
VMMName = Literal["auto", "qemu", "firecracker"]
Mode = Literal["development", "production"]


def _home() -> Path:
    return Path.home()


class Settings(BaseSettings):
    """Everything an operator can tune. Units are in the names."""

    model_config = SettingsConfigDict(env_prefix="EMBERBOX_", extra="ignore")

    mode: Mode = "development"

    # Where things live.
    data_dir: Path = Field(default_factory=lambda: _home() / ".local" / "share" / "emberbox")
    cache_dir: Path = Field(default_factory=lambda: _home() / ".cache" / "emberbox")
    images_dir_override: Path | None = Field(default=None, alias="EMBERBOX_IMAGES_DIR")

    # Virtual machine monitor.
    vmm: VMMName = "auto"
    accel: Accel = "auto"
    qemu_binary: str = "qemu-system-x86_64"
    qemu_img_binary: str = "qemu-img"
    firecracker_binary: str = "firecracker"
    boot_timeout_s: float = Field(default=60.0, gt=0)
    boot_attempts: int = Field(default=3, ge=1, le=10)
    kvm_probe_timeout_s: float = Field(default=10.0, gt=0)
    console_log_max_bytes: int = Field(default=1 << 20, ge=4096)
    # Host cgroup per VMM process (v2, or v1 memory+pids): guest RAM + this overhead.
    vmm_cgroup_limits: bool = True
    vmm_memory_overhead_mib: int = Field(default=768, ge=64)
    vmm_pids_max: int = Field(default=512, ge=16)

    # Host hardening (QEMU): run as an unprivileged user, CPU quota, disk cap.
    vmm_user: str = "emberbox-vmm"  # QEMU's user when the server is root; "" = do not drop
    vmm_cpu_overhead: float = Field(default=0.5, ge=0)  # cgroup CPU quota: vCPUs + this
    max_disk_mib: int | None = Field(default=None, ge=1)  # overlay cap; None: the image's size

    # Firecracker (see docs/firecracker.md).
    firecracker_api_timeout_s: float = Field(default=30.0, gt=0)
    firecracker_jailer: bool = False
    jailer_binary: str = "jailer"
    jailer_uid: int | None = Field(default=None, ge=1)
    jailer_gid: int | None = Field(default=None, ge=1)
    jailer_chroot_base_dir: Path = Path("/srv/jailer")
    jailer_memory_overhead_mib: int = Field(default=64, ge=0)
    jailer_fsize_limit_bytes: int | None = Field(default=None, ge=1)

    # Sandbox shape and limits.
    default_image: str = "default"
    default_vcpus: int = Field(default=1, ge=1)
    default_memory_mib: int = Field(default=512, ge=128)  # less does not boot
    max_vcpus: int = Field(default=4, ge=1)
    max_memory_mib: int = Field(default=8192, ge=128)
    default_exec_timeout_s: float = Field(default=60.0, gt=0)
    max_exec_timeout_s: float = Field(default=3600.0, gt=0)
    exec_output_max_bytes: int = Field(default=16 << 20, ge=1024)
    max_upload_bytes: int = Field(default=1 << 30, ge=1)  # one file or archive (HTTP 413)
    max_tunnels_per_sandbox: int = Field(default=32, ge=1)  # open port connections (HTTP 403)

    # Service.
    api_key: SecretStr | None = None  # when set, every API call needs "Bearer <key>"
    # A cluster's shared PostgreSQL (postgresql://user:password@host:port/db) for the API
    # replicas and `emberbox keys`/`audit`; empty: the SQLite file in data_dir.
    database_url: str = ""
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    # Server log lines: "text" for people, "json" (one object per line) for log shippers.
    log_format: Literal["text", "json"] = "text"
    # GET /metrics without a key on this HOST:PORT too (a private network's Prometheus).
    metrics_bind: str | None = None
    max_sandboxes: int = Field(default=16, ge=1)
    default_timeout_s: int = Field(default=300, ge=1)
    max_timeout_s: int = Field(default=24 * 3600, ge=1)
    reaper_interval_s: float = Field(default=1.0, gt=0)
    # One-shot runs (POST /v1/run): each in a fresh sandbox of run_image.
    run_image: str = "polyglot"
    run_default_timeout_s: float = Field(default=10.0, gt=0)  # the program's run step
    run_max_timeout_s: float = Field(default=300.0, gt=0)
    run_compile_timeout_s: float = Field(default=60.0, gt=0)  # TCG: g++ takes ~5 s
    run_default_memory_mib: int = Field(default=256, ge=16)  # the program's cgroup limit
    run_output_max_bytes: int = Field(default=1 << 20, ge=1024)  # per stream; more: output_limit

    # Fast start (see docs/snapshots.md).
    templates: bool = True  # create restores a per-image "ready" snapshot instead of booting
    templates_max: int = Field(default=16, ge=1)  # shapes with a template on disk; others boot cold
    pool_size: int = Field(default=1, ge=0, le=64)  # restored sandboxes kept ready per image
    pool_memory_budget_mib: int = Field(default=4096, ge=0)  # guest memory the pool may hold
    # More images to keep warm (image name or ref -> VMs; the default shape), e.g.
    # EMBERBOX_POOL_IMAGES='{"grader": 1}'; within the same memory budget.
    pool_images: dict[str, int] = Field(default_factory=dict)
    snapshot_timeout_s: float = Field(default=300.0, gt=0)

    # Cluster mode (docs/cluster.md): `emberbox serve --cluster ADDRESS` serves the API
    # replica of the Ray cluster at this address (host:port of its head, or "auto").
    cluster_address: str = ""

    # Networking (see docs/networking.md): default deny; a sandbox gets a NIC with
    # egress only when its create request asks for it.
    network_cidr: str = "10.213.0.0/16"  # one /29 per networked sandbox; one server per CIDR
    network_max_allow: int = Field(default=64, ge=0)  # allow entries per sandbox
    network_dns: list[str] = Field(default_factory=lambda: ["1.1.1.1", "8.8.8.8"])  # guest's
    network_set_ip_forward: bool = True  # set net.ipv4.ip_forward=1 if it is 0 (host-wide)

    # OCI imports (see docs/images.md): the pull + unpack time limit, and the root disk's
    # size: the image's content plus headroom for the sandbox's writes, at most the cap.
    oci_import_timeout_s: float = Field(default=900.0, gt=0)
    oci_rootfs_headroom_mib: int = Field(default=1024, ge=0)
    oci_max_rootfs_mib: int = Field(default=16384, ge=64)

    # Dockerfile builds (see docs/images.md): each RUN/COPY runs in a builder microVM.
    build_egress: bool = True  # builder VMs reach the internet (private ranges stay blocked)
    build_disk_mib: int = Field(default=4096, ge=256)  # the builder disk: the image size limit
    build_vcpus: int = Field(default=1, ge=1)
    build_memory_mib: int = Field(default=1024, ge=128)
    build_step_timeout_s: float = Field(default=1800.0, gt=0)  # one RUN
    build_timeout_s: float = Field(default=3600.0, gt=0)  # the whole build
    build_context_max_bytes: int = Field(default=1 << 30, ge=1)  # file bytes in the context
    build_context_max_entries: int = Field(default=100_000, ge=1)
    build_cache_max_mib: int = Field(default=20480, ge=0)  # the layer cache; LRU beyond

    # Host disk (hostile suite): create and uploads are refused (HTTP 507, StorageFull)
    # while the data dir's file system has less than this free.
    min_free_disk_mib: int = Field(default=512, ge=0)

    # Tenancy (see docs/tenancy.md): per-tenant quotas (a key's tenant may override them;
    # the built-in "local" tenant has only the server-wide limits), per-key rate limits.
    tenant_max_sandboxes: int = Field(default=4, ge=0)  # live (creating or running)
    tenant_max_vcpus: int = Field(default=8, ge=0)  # summed over live sandboxes
    tenant_max_memory_mib: int = Field(default=4096, ge=0)  # summed over live sandboxes
    tenant_max_snapshots: int = Field(default=16, ge=0)
    tenant_max_snapshot_bytes: int = Field(default=32 << 30, ge=0)  # snapshots + paused, on disk
    tenant_max_images: int = Field(default=16, ge=0)  # a tenant's own registered images
    tenant_max_image_bytes: int = Field(default=16 << 30, ge=0)  # their blobs, on disk
    image_gc_grace_s: float = Field(default=60.0, ge=0)  # a blob this young is never collected
    image_template_after_build: bool = True  # a new image gets its template at once
    rate_limit_per_s: float = Field(default=20.0, gt=0)  # requests per second per key
    rate_limit_burst: int = Field(default=100, ge=1)  # requests a key may send at once

    # Browsers (see docs/console.md): terminal tickets for the PTY WebSocket, the origins
    # a WebSocket may come from besides the server's own, and the console's xterm.js files.
    pty_ticket_ttl_s: float = Field(default=30.0, gt=0, le=600)
    pty_tickets_max: int = Field(default=10_000, ge=1)  # in memory; past it the oldest go
    websocket_allowed_origins: list[str] = Field(default_factory=list)  # "https://host:port"
    console_assets_dir: Path | None = None  # None: emberbox/api/console/vendor (setup.sh)

    # Hostile load (see docs/security.md): request bodies, connections, keyless callers.
    max_request_body_bytes: int = Field(default=1 << 20, ge=1024)  # JSON bodies (413 above)
    request_header_timeout_s: float = Field(default=10.0, gt=0)  # a request's whole headers
    request_body_timeout_s: float = Field(default=30.0, gt=0)  # a JSON body; an upload's chunk
    keep_alive_timeout_s: int = Field(default=5, ge=1)  # an idle connection between requests
    max_connections: int = Field(default=1000, ge=1)  # open at once; more are closed at once
    forwarded_allow_ips: list[str] = Field(default_factory=list)  # proxies trusted for X-F-F
    allowed_hosts: list[str] = Field(default_factory=list)  # Host names keyless mode answers
    tenant_max_websockets: int = Field(default=8, ge=1)  # open terminal WebSockets per tenant
    audit_retention_days: int = Field(default=90, ge=1)  # older audit entries are pruned
    audit_max_rows: int = Field(default=1_000_000, ge=1000)  # and all but the newest this many
    exec_log_retention_days: int = Field(default=30, ge=1)  # older exec log entries go
    exec_log_max_rows: int = Field(default=1_000_000, ge=1000)  # and all but the newest
    ended_sandbox_retention_days: int = Field(default=7, ge=1)  # rows of ended sandboxes

    # The E2B front (docs/e2b.md): a create without allow_internet_access gets the network
    # only when this is on (E2B's own default); off keeps emberbox's default deny.
    e2b_internet_by_default: bool = False

    @property
    def images_dir(self) -> Path:
        return self.images_dir_override or self.cache_dir / "images"

    @property
    def downloads_dir(self) -> Path:
        return self.cache_dir / "downloads"

    @property
    def vms_dir(self) -> Path:
        return self.data_dir / "vms"

    @property
    def build_cache_dir(self) -> Path:
        """Dockerfile builds: the layer cache and each build's scratch dir."""
        return self.cache_dir / "build"

    @property
    def templates_dir(self) -> Path:
        """Template snapshots: a cache, rebuilt from the image when missing."""
        return self.cache_dir / "templates"

    @property
    def snapshots_dir(self) -> Path:
        """User snapshots and paused sandboxes: data, kept until deleted."""
        return self.data_dir / "snapshots"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "emberbox.db"
