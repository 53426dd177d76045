#!/usr/bin/env bash
# Seeds the fuzz corpora (corpus/<target>/, git-ignored) with metadata QEMU itself wrote, so
# the fuzzers start from valid structures instead of having to guess magics and layouts.
# Needs qemu-img and qemu-io (qemu-utils). Usage: bash seeds.sh
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
corpus=$PWD/corpus
mkdir -p "$corpus"/{header,l2_table,refcount_block,snapshot_table,bitmap_directory,luks_header}

be64() { od -An -t x1 -j "$2" -N 8 "$1" | tr -d ' \n'; }
hex2dec() { echo $((16#$1)); }
# seed TARGET NAME PREFIX_HEX FILE OFFSET LEN: PREFIX bytes, then LEN bytes of FILE at OFFSET.
seed() {
    { printf '%b' "$(echo -n "$3" | sed 's/../\\x&/g')"; dd if="$4" bs=64k skip="$5" count="$6" iflag=skip_bytes,count_bytes status=none; } \
        > "$corpus/$1/seed-$2"
}

cd "$tmp"
img() { qemu-img create -q -f qcow2 "$@"; }
img base.qcow2 64M
img c512.qcow2 -o cluster_size=512 64M
img c4k.qcow2 -o cluster_size=4096,refcount_bits=1 -b base.qcow2 -F qcow2 64M
img v2.qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 64M
img zstd.qcow2 -o compression_type=zstd,lazy_refcounts=on,refcount_bits=64 64M
img ext.qcow2 -o extended_l2=on 64M
img df.qcow2 -o data_file=df.raw,data_file_raw=on 64M
img rc8.qcow2 -o refcount_bits=8 64M
img luks.qcow2 --object secret,id=sec0,data=pass \
    -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 64M
img aes.qcow2 --object secret,id=sec0,data=pass -o encrypt.format=aes,encrypt.key-secret=sec0 64M
qemu-io -c 'write -P 0xab 0 64k' -c 'write -z 1M 64k' -c 'write -c -P 1 2M 64k' base.qcow2 >/dev/null
qemu-io -c 'write -P 0xab 0 4k' -c 'write -z 8k 2k' -c 'write -z 2M 64k' ext.qcow2 >/dev/null
qemu-img snapshot -c s1 base.qcow2
qemu-img snapshot -c second-snapshot base.qcow2
qemu-img snapshot -c s1 v2.qcow2
qemu-img bitmap --add base.qcow2 b0
qemu-img bitmap --add --granularity 1M base.qcow2 bitmap-one
qemu-img bitmap --add --disable base.qcow2 b2

for f in *.qcow2; do
    seed header "${f%.qcow2}" "" "$f" 0 4096
done
# L2 tables: params (cluster_bits 16 -> byte 7; flags: bit0 extended, bit2 zero flag).
for f in base ext df; do
    l1=$(hex2dec "$(be64 $f.qcow2 40)")
    l2=$(hex2dec "$(be64 $f.qcow2 "$l1")")
    l2=$((l2 & 0x00fffffffffffe00))
    flags=04; [ $f = ext ] && flags=05; [ $f = df ] && flags=06
    seed l2_table "$f" "07$flags" "$f.qcow2" "$l2" 65536
done
# Refcount block 0: order, cluster_bits byte, index, value.
for f in base:04:07 c512:04:00 c4k:00:03 zstd:06:07 rc8:03:07; do
    IFS=: read -r name order bits <<<"$f"
    rt=$(hex2dec "$(be64 $name.qcow2 48)")
    rb=$(hex2dec "$(be64 $name.qcow2 "$rt")")
    seed refcount_block "$name" "$order${bits}00000000000000030000000000000001" "$name.qcow2" "$rb" 4096
done
# Snapshot tables: version byte (1 = v3, 0 = v2), count, shift 0.
for f in base:01:0002 v2:00:0001; do
    IFS=: read -r name ver nb <<<"$f"
    off=$(hex2dec "$(be64 $name.qcow2 64)")
    seed snapshot_table "$name" "$ver${nb}00" "$name.qcow2" "$off" 4096
done
# Bitmap directory: count, cluster_bits 16, shift 0, virtual size; then the directory. Find
# the bitmaps extension (magic 23852875) in the header.
ext=$(od -An -t x1 -v -N 4096 base.qcow2 | tr -d ' \n' | grep -ob 23852875 | head -1 | cut -d: -f1)
ext=$((ext / 2))
dsize=$(hex2dec "$(be64 base.qcow2 $((ext + 16)))")
doff=$(hex2dec "$(be64 base.qcow2 $((ext + 24)))")
seed bitmap_directory base "000310000000000004000000" base.qcow2 "$doff" "$dsize"
# LUKS header: the crypto extension (0537be77) gives its offset.
ext=$(od -An -t x1 -v -N 4096 luks.qcow2 | tr -d ' \n' | grep -ob 0537be77 | head -1 | cut -d: -f1)
ext=$((ext / 2))
loff=$(hex2dec "$(be64 luks.qcow2 $((ext + 8)))")
seed luks_header luks "" luks.qcow2 "$loff" 1024
echo "seeded: $(find "$corpus" -name 'seed-*' | wc -l) files"
