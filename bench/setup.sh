#!/usr/bin/env bash
# What `make bench` needs beyond `make setup`: gVisor's runsc, the outside baseline of
# the one-shot measurement (Debian's package). Idempotent, and never fatal: without
# runsc the bench prints "skipped: <reason>" for that row and measures the rest.
set -uo pipefail

if command -v runsc >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "bench setup: runsc missing and not root (no sudo): the runsc row will be skipped"
        exit 0
    fi
    SUDO="sudo"
fi
# apt needs its lists to know the candidate; fetch them only when it has none.
if ! apt-cache policy runsc 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    echo "bench setup: apt-get update"
    $SUDO apt-get update -q || true
fi
echo "bench setup: installing runsc (gVisor)"
if ! $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends runsc; then
    echo "bench setup: could not install runsc: the runsc row will be skipped"
fi
exit 0
