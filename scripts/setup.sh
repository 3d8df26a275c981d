#!/usr/bin/env bash
# Install what emberbox needs on a Debian 12 host, idempotently: apt packages, the
# Python venv, and the guest images (default, polyglot; cached under ~/.cache/emberbox).
set -euo pipefail
cd "$(dirname "$0")/.."

# Every program the product or the tests run: cpio (tests list the initramfs with it),
# debugfs (e2fsprogs), qemu-img (qemu-utils), pgrep (procps), ip (iproute2), nft;
# chromium (+ a font) for the web console's browser tests (tests/integration/test_console.py).
# OCI imports: skopeo (fetch), umoci (unpack), python3 (the agent's own runtime in imported
# images, docs/images.md); docker-registry: the local registry the OCI tests push to, and
# musl-tools (musl-gcc) for their image's program of another C library.
APT_PACKAGES=(qemu-system-x86 qemu-utils mmdebstrap busybox-static e2fsprogs procps nftables iproute2 cpio chromium fonts-dejavu-core)
APT_PACKAGES+=(skopeo umoci python3 docker-registry musl-tools)
APT_PACKAGES+=(postgresql)  # tests/cluster: a real PostgreSQL, initialised per test run
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# The image builder asks apt which kernel package is current: apt needs its lists.
policy=$(apt-cache policy linux-image-cloud-amd64 2>/dev/null || true)
if [ ${#missing[@]} -gt 0 ] || ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
    echo "setup: apt-get update"
    $SUDO apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# docker-registry is only for the OCI tests, which start their own on 127.0.0.1: Debian's
# package enables a service open on every address (:5000); keep it off.
if [ -d /run/systemd/system ] && systemctl is-enabled docker-registry >/dev/null 2>&1; then
    echo "setup: disabling the docker-registry service (the OCI tests run their own)"
    $SUDO systemctl disable --now docker-registry
fi

# QEMU drops to this unprivileged user when the server runs as root (EMBERBOX_VMM_USER).
id -u emberbox-vmm >/dev/null 2>&1 || $SUDO useradd --system --no-create-home --shell /usr/sbin/nologin emberbox-vmm

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
stamp=.venv/.emberbox-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing emberbox into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -U pip
    .venv/bin/pip install -q --disable-pip-version-check -e '.[server,dev,cluster]'
    touch "$stamp"
fi

# The web console's xterm.js, pinned in scripts/console/package-lock.json (not committed).
scripts/console-assets.sh

.venv/bin/emberbox image build --name default
# The one-shot runner's image (POST /v1/run): cached like the default, ~40 s cold.
.venv/bin/emberbox image build --name polyglot
