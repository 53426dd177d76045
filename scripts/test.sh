#!/usr/bin/env bash
# Runs the whole test suite. Installs what a fresh Debian machine lacks first: the QEMU tools
# that the interop and golden tests compare against, libnbd's NBD clients (nbdinfo, nbdcopy,
# the Python binding), nginx, QEMU's curl driver and moto's S3 server for the remote-image
# tests, and qemu-system-x86 with a guest kernel for the vhost-user-blk guest test (they fail
# loudly without them).
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
# libnbd's tools and Python binding are NBD clients in qemu-interop/nbd.rs. The binding is
# installed for the system's python3, which may not be the first python3 on PATH.
has_py_nbd() { python3 -c 'import nbd' 2>/dev/null || /usr/bin/python3 -c 'import nbd' 2>/dev/null; }
if ! command -v nbdinfo >/dev/null 2>&1 || ! command -v nbdcopy >/dev/null 2>&1 || ! has_py_nbd; then
    echo "libnbd tools or Python binding not found: installing libnbd-bin python3-libnbd" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libnbd-bin python3-libnbd >/dev/null
fi
# The remote-image tests (qemu-interop/remote.rs) start nginx and moto's S3 server, and compare
# with QEMU's curl block driver (Debian's qemu-block-extra, at the installed qemu-utils' version).
need=()
if [ ! -x /usr/sbin/nginx ] && ! command -v nginx >/dev/null 2>&1; then need+=(nginx-light); fi
# (grep reads the whole help: with -q, qemu-img could die of SIGPIPE and pipefail would
# report the driver missing.)
if ! qemu-img --help | grep ' http ' >/dev/null; then
    need+=("qemu-block-extra=$(dpkg-query -W -f='${Version}' qemu-utils)")
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]} for the remote-image tests" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v moto_server >/dev/null 2>&1 || ! python3 -c 'import boto3, moto' 2>/dev/null; then
    echo "moto's S3 server not found: pip install 'moto[server]'" >&2
    # A Debian system Python refuses pip installs (PEP 668) unless told otherwise.
    python3 -m pip install -q 'moto[server]' ||
        python3 -m pip install -q --break-system-packages 'moto[server]'
fi
# The Azure test (qemu-interop/remote.rs) starts Azurite, Microsoft's Azure Storage emulator,
# from npm. 3.35.0 is pinned: later releases need Node 22, Debian 12 has Node 18.
AZURITE="$PWD/target/azurite/node_modules/.bin/azurite-blob"
if [ ! -x "$AZURITE" ]; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "installing nodejs and npm for the Azure test" >&2
        SUDO=""
        if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
    fi
    echo "installing Azurite 3.35.0 into target/azurite" >&2
    npm install --prefix target/azurite --no-audit --no-fund --loglevel=error azurite@3.35.0 >&2
fi
export QCOW2_TEST_AZURITE="$AZURITE"
# The guest test boots a Debian kernel under qemu-system-x86_64 (qemu-interop/vhost_guest.rs).
bash scripts/guest-assets.sh target/guest

cargo test --workspace "$@"
