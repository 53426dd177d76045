#!/usr/bin/env bash
# Prepares what the guest test (qemu-interop/vhost_guest.rs) boots: qemu-system-x86_64, and
# in DIR (default target/guest) a Debian kernel, the modules /dev/vda needs and a static
# busybox. Idempotent: a second run with everything in place does nothing.
#
# qemu-system-x86 comes from bookworm-backports, because the preinstalled qemu-utils 10.0.2
# is the backports build and bookworm's own qemu-system-x86 (7.2) would replace it. The
# suite is added in a sources file of its own; debian.sources is never edited.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-target/guest}"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
UPDATED=""
apt_update() {
    if [ -z "$UPDATED" ]; then
        $SUDO apt-get update -qq
        UPDATED=1
    fi
}

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "qemu-system-x86_64 not found: installing qemu-system-x86 from bookworm-backports" >&2
    SRC=/etc/apt/sources.list.d/bookworm-backports.sources
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        $SUDO tee "$SRC" >/dev/null <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    apt_update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        -t bookworm-backports qemu-system-x86 >/dev/null
fi
qemu-system-x86_64 --version | head -1 >&2

if [ -f "$DIR/ready" ]; then
    exit 0
fi
echo "preparing the guest kernel, modules and busybox in $DIR" >&2
rm -rf "$DIR"
mkdir -p "$DIR/modules"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
apt_update
# The metapackage names the current kernel package; only the .deb is fetched and unpacked
# (nothing is installed on this machine).
KPKG="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
(cd "$WORK" && apt-get download -qq "$KPKG" busybox-static)
for deb in "$WORK"/*.deb; do dpkg-deb -x "$deb" "$WORK/root"; done
cp "$WORK"/root/boot/vmlinuz-* "$DIR/vmlinuz"
cp "$WORK/root/bin/busybox" "$DIR/busybox"

# virtio_blk and virtio_pci are modules in Debian's kernel. The .deb carries no modules.dep
# (depmod makes it on install), so the dependency closure is read from each module's
# `depends=` field and written in load order to modules.order.
MODROOT="$(echo "$WORK"/root/lib/modules/*)"
declare -A SEEN=()
ORDER=()
add_module() {
    local name="$1" file deps dep
    [ -n "${SEEN[$name]:-}" ] && return
    SEEN[$name]=1
    file="$(find "$MODROOT" -name "$name.ko" -o -name "${name//_/-}.ko" | head -1)"
    if [ -z "$file" ]; then
        echo "module $name not found in $KPKG" >&2
        exit 1
    fi
    deps="$(grep -a -o 'depends=[a-z0-9_,-]*' "$file" | head -1 | cut -d= -f2)"
    for dep in ${deps//,/ }; do add_module "$dep"; done
    cp "$file" "$DIR/modules/$name.ko"
    ORDER+=("$name")
}
add_module virtio_pci
add_module virtio_blk
printf '%s\n' "${ORDER[@]}" >"$DIR/modules/modules.order"
echo "$KPKG" >"$DIR/ready"
echo "guest: $KPKG, modules: ${ORDER[*]}" >&2
