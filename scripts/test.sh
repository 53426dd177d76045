#!/usr/bin/env bash
# Runs the whole test suite. Installs what a fresh Debian machine lacks first: the QEMU tools
# that the interop and golden tests compare against, and qemu-system-x86 with a guest kernel
# for the vhost-user-blk guest test (they fail loudly without them).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1; then
    echo "qemu-img/qemu-io not found: installing qemu-utils" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq qemu-utils >/dev/null
fi
qemu-img --version | head -1 >&2
# The guest test boots a Debian kernel under qemu-system-x86_64 (qemu-interop/vhost_guest.rs).
bash scripts/guest-assets.sh target/guest

cargo test --workspace "$@"
