#!/usr/bin/env bash
# benches/compare.sh — one run, one file system, five contenders:
#   raw       fio (ioengine=io_uring, direct=1) on a fully written raw file: the physical limit
#   qemu      qemu-img bench / qemu-img convert on the same qcow2 workload
#   ours      qcow2 bench / qcow2 convert (release build of this workspace)
#   imago     imago 0.2.6 and
#   qcow2-rs  qcow2-rs 0.1.6, each in its natural mode (benches/peers: imago's futures on a
#             current-thread runtime, qcow2-rs on tokio-uring), the same request loop
# Every contender is timed as a whole process by /usr/bin/time: CPU per request is user +
# system of the process (open and close included) divided by the requests.
# Prints one table of medians and ratios and writes it into BENCHMARKS.md between the
# BEGIN/END markers, with the machine description.
#
#   bash benches/compare.sh            # about 8-12 minutes on the 2-core reference VM
#   CB_REPS=1 CB_GIB=1 bash benches/compare.sh   # a quick look
#
# Knobs: CB_DIR scratch folder on the file system under test [./bench-scratch]; CB_REPS
# repeats per row, interleaved qemu/ours/raw, median reported [3]; CB_GIB image size [2];
# CB_NO_WRITE=1 prints without touching BENCHMARKS.md; CB_NO_PEERS=1 skips imago/qcow2-rs;
# CB_SHM tmpfs folder for the page-cache rows [/dev/shm/qcow2-compare].
# Installs fio, jq and time when missing (apt); if that is impossible, the raw column is
# skipped and the table says so.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${CB_DIR:-$ROOT/bench-scratch}
REPS=${CB_REPS:-3}
GIB=${CB_GIB:-2}
SIZE=$((GIB << 30))
mkdir -p "$DIR"
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

need=()
command -v fio >/dev/null || need+=(fio)
command -v jq >/dev/null || need+=(jq)
[ -x /usr/bin/time ] || need+=(time)
command -v qemu-img >/dev/null || need+=(qemu-utils)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; } ||
    log "could not install ${need[*]}"
fi
HAVE_FIO=1; command -v fio >/dev/null || HAVE_FIO=0
command -v jq >/dev/null || { log "jq is required"; exit 1; }

log "building the release binary"
cargo build --release -q -p qcow2-cli
Q=$ROOT/target/release/qcow2
# The peers are a crate of their own (benches/peers, with its own Cargo.lock), so that the
# workspace and CI never build them.
HAVE_PEERS=0
if [ "${CB_NO_PEERS:-0}" != 1 ]; then
  log "building the peer engines (imago, qcow2-rs)"
  if (cd benches/peers && cargo build --release -q --locked); then HAVE_PEERS=1
  else log "could not build benches/peers: the imago and qcow2-rs columns are skipped"; fi
fi
PEER=$ROOT/benches/peers/target/release/qcow2-peer-bench
PEERS=(); [ "$HAVE_PEERS" = 1 ] && PEERS=(imago qcow2-rs)

# Golden-ratio strides (see ../shared/perf/baselines.sh): every block once per pass,
# consecutive requests far apart, for both qemu-img and qcow2 (qemu-img bench has no
# random mode).
stride() { # $1 = block size -> step in bytes
  python3 - "$SIZE" "$1" <<'PY'
import math, sys
size, bs = int(sys.argv[1]), int(sys.argv[2]); n = size // bs
k = int(n * (1 - 1 / ((1 + 5 ** 0.5) / 2))) | 1
while math.gcd(k, n - 1) != 1 or math.gcd(k, n) != 1: k += 2
print(k * bs)
PY
}
S4K=$(stride 4096); S64K=$(stride 65536)

RAW=$DIR/raw.img; FULL=$DIR/full.qcow2
if [ "$HAVE_FIO" = 1 ] && [ ! -s "$RAW" -o "$(stat -c %s "$RAW" 2>/dev/null)" != "$SIZE" ]; then
  log "writing raw.img ($GIB GiB)"
  fio --name=fill --filename="$RAW" --ioengine=io_uring --direct=1 --rw=write --bs=1M \
      --iodepth=8 --size="$SIZE" --output=/dev/null
fi
if [ ! -s "$FULL" ] || [ "$(qemu-img info --output=json "$FULL" | jq '."virtual-size"')" != "$SIZE" ]; then
  log "writing full.qcow2 ($GIB GiB, every cluster allocated)"
  rm -f "$FULL"
  qemu-img create -q -f qcow2 -o cluster_size=65536 "$FULL" "$SIZE"
  qemu-img bench -q -w -f qcow2 -t none -i io_uring -s 1M -d 8 -c $((SIZE >> 20)) --pattern=0xa5 "$FULL" >/dev/null
fi

# ---- runners; each prints "IOPS CPU_US_PER_IO" (or seconds for convert rows)
fio_run() { # fio args... (FIO_FILE, FIO_ENGINE, FIO_DIRECT override the defaults: fio does
  # not let a later --ioengine or --direct replace an earlier one)
  local out; out=$(fio --name=t --filename="${FIO_FILE:-$RAW}" --ioengine="${FIO_ENGINE:-io_uring}" \
      --direct="${FIO_DIRECT:-1}" --size="$SIZE" \
      --runtime=4 --ramp_time=1 --time_based --output-format=json "$@")
  jq -r '.jobs[0] as $j | (($j.read.iops + $j.write.iops)) as $i |
         "\($i) \((($j.usr_cpu + $j.sys_cpu) / 100) * 1000000 / ($i + 0.0001))"' <<<"$out"
}
timed() { # cmd... ; sets W and CPU (seconds)
  /usr/bin/time -f '%e %U %S' -o "$DIR/.time" "$@" >"$DIR/.out" 2>&1
  read -r W U S <"$DIR/.time"
  CPU=$(awk -v u="$U" -v s="$S" 'BEGIN{print u+s}')
}
qemu_bench() { # count image args...
  local c=$1 img=$2; shift 2
  timed qemu-img bench -f qcow2 -t "${CACHE:-none}" -i io_uring -c "$c" "$@" "$img"
  local t; t=$(awk '/Run completed/{print $4}' "$DIR/.out")
  awk -v c="$c" -v t="$t" -v cpu="$CPU" 'BEGIN{printf "%.0f %.1f\n", c/t, cpu*1e6/c}'
}
ours_bench() { # count image args...
  local c=$1 img=$2; shift 2
  timed "$Q" bench --output json -t "${CACHE:-none}" -i io_uring -c "$c" "$@" "$img"
  local iops; iops=$(jq -r '.iops' "$DIR/.out")
  awk -v i="$iops" -v c="$c" -v cpu="$CPU" 'BEGIN{printf "%.0f %.1f\n", i, cpu*1e6/c}'
}
peer_bench() { # engine count image args...
  local e=$1 c=$2 img=$3; shift 3
  timed "$PEER" "$e" "$img" -t "${CACHE:-none}" -c "$c" "$@"
  local iops; iops=$(jq -r '.iops' "$DIR/.out")
  awk -v i="$iops" -v c="$c" -v cpu="$CPU" 'BEGIN{printf "%.0f %.1f\n", i, cpu*1e6/c}'
}
bench_of() { # tool count image args... (qemu-img's spellings; peers take the same ones)
  local t=$1; shift
  case $t in
    qemu) qemu_bench "$@" ;;
    ours) ours_bench "$@" ;;
    *) peer_bench "$t" "$@" ;;
  esac
}
fresh() { rm -f "$1"; qemu-img create -q -f qcow2 -o cluster_size=65536 "$1" "$SIZE"; }
median() { sort -g | awk '{a[NR]=$1} END{if (NR == 0) exit; print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A R
record() { R["$1|$2"]+="$3"$'\n'; }  # row tool value

NALLOC=$((SIZE / 65536 < 20000 ? SIZE / 65536 : 20000))
# 20 000 clusters scattered over 4 TiB (about two per L2 table): reads of them miss the L2
# cache of every engine, and show whether misses of different tables wait for each other.
SPARSE=$DIR/sparse.qcow2
if [ ! -s "$SPARSE" ]; then
  log "writing sparse.qcow2 (4 TiB virtual, 20 000 scattered clusters)"
  qemu-img create -q -f qcow2 -o cluster_size=65536 "$SPARSE" 4T
  qemu-img bench -q -w -f qcow2 -t none -i io_uring -c 20000 -d 16 -s 64k -S 219873280 --pattern=0x6b "$SPARSE" >/dev/null
fi
SHM=${CB_SHM:-/dev/shm/qcow2-compare}; mkdir -p "$SHM"; SHMFULL=$SHM/full.qcow2
log "copying full.qcow2 to $SHM (page-cache rows)"
cp --sparse=always "$FULL" "$SHMFULL"
[ "$HAVE_FIO" = 1 ] && cp --sparse=always "$RAW" "$SHM/raw.img"
for rep in $(seq 1 "$REPS"); do
  log "rep $rep/$REPS"
  # Every tool in turn on each row, the order rotated by the repeat so that no contender
  # always runs first after the previous row's writes.
  TOOLS=(qemu ours "${PEERS[@]}")
  n=${#TOOLS[@]}; ORDER=()
  for k in $(seq 0 $((n - 1))); do ORDER+=("${TOOLS[$(( (k + rep) % n ))]}"); done
  for tool in "${ORDER[@]}"; do
    # 4k read QD1 / QD32 on an allocated image
    read -r i c < <(bench_of "$tool" 20000 "$FULL" -d 1 -s 4k -S "$S4K"); record read1 "$tool" "$i"; record read1cpu "$tool" "$c"
    read -r i c < <(bench_of "$tool" 100000 "$FULL" -d 32 -s 4k -S "$S4K"); record read32 "$tool" "$i"; record read32cpu "$tool" "$c"
    # 4k reads QD32 from the page cache: the same image on tmpfs, no O_DIRECT
    read -r i c < <(CACHE=writeback bench_of "$tool" 400000 "$SHMFULL" -d 32 -s 4k -S "$S4K"); record readpc "$tool" "$i"; record readpccpu "$tool" "$c"
    # 4k overwrite QD32
    read -r i c < <(bench_of "$tool" 60000 "$FULL" -w -d 32 -s 4k -S "$S4K" --pattern 0x3c); record ow32 "$tool" "$i"; record ow32cpu "$tool" "$c"
    # 4k allocating write QD32 on an empty image (every request a new cluster)
    fresh "$DIR/empty.qcow2"; read -r i c < <(bench_of "$tool" "$NALLOC" "$DIR/empty.qcow2" -w -d 32 -s 4k -S "$S64K"); record alloc32 "$tool" "$i"; record alloc32cpu "$tool" "$c"
    # 1 MiB sequential allocating write QD8
    fresh "$DIR/empty.qcow2"; read -r i c < <(bench_of "$tool" $((SIZE >> 20)) "$DIR/empty.qcow2" -w -d 8 -s 1M); record seq1m "$tool" "$i"; record seq1mcpu "$tool" "$c"
    # 4k reads QD32 that miss the L2 cache: 20 000 clusters scattered over a 4 TiB disk
    read -r i c < <(bench_of "$tool" 20000 "$SPARSE" -d 32 -s 4k -S 219873280); record l2miss "$tool" "$i"; record l2misscpu "$tool" "$c"
  done
  # 64 KiB allocating writes over a backing file (COW of whole clusters), QD16
  for tool in qemu ours; do
    rm -f "$DIR/top.qcow2"
    qemu-img create -q -f qcow2 -b full.qcow2 -F qcow2 "$DIR/top.qcow2" "$SIZE"
    if [ $tool = qemu ]; then read -r i c < <(qemu_bench "$NALLOC" "$DIR/top.qcow2" -w -d 16 -s 64k -S "$S64K")
    else read -r i c < <(ours_bench "$NALLOC" "$DIR/top.qcow2" -w -d 16 -s 64k -S "$S64K"); fi
    record cow64 $tool "$i"
  done
  if [ "$HAVE_FIO" = 1 ]; then
    read -r i c < <(fio_run --rw=randread --bs=4k --iodepth=1); record read1 raw "$i"; record read1cpu raw "$c"
    read -r i c < <(fio_run --rw=randread --bs=4k --iodepth=32); record read32 raw "$i"; record read32cpu raw "$c"
    # page cache: a bare pread loop (psync) on the tmpfs copy
    read -r i c < <(FIO_FILE="$SHM/raw.img" FIO_ENGINE=psync FIO_DIRECT=0 fio_run --rw=randread --bs=4k); record readpc raw "$i"; record readpccpu raw "$c"
    read -r i c < <(fio_run --rw=randwrite --bs=4k --iodepth=32); record ow32 raw "$i"; record alloc32 raw "$i"
    read -r i c < <(fio_run --rw=write --bs=1M --iodepth=8); record seq1m raw "$i"
    read -r i c < <(fio_run --rw=randwrite --bs=64k --iodepth=16); record cow64 raw "$i"
  fi
done

# NBD: qemu-nbd and qcow2 serve on a Unix socket, both O_DIRECT + io_uring, the same
# client (qemu-img bench over nbd+unix) for 4 KiB random-stride reads and overwrites, QD32.
nbd_run() { # server(qemu|ours) rw-flag
  local sock=$DIR/nbd.sock pid
  rm -f "$sock"
  if [ "$1" = qemu ]; then
    qemu-nbd -f qcow2 --cache=none --aio=io_uring -k "$sock" --persistent "$FULL" & pid=$!
  else
    "$Q" serve "$FULL" --socket "$sock" --cache none --aio io_uring & pid=$!
  fi
  for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
  # shellcheck disable=SC2086
  timed qemu-img bench -f raw -c 60000 -d 32 -s 4k -S "$S4K" $2 "nbd+unix:///?socket=$sock"
  local t; t=$(awk '/Run completed/{print $4}' "$DIR/.out")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  awk -v c=60000 -v t="$t" 'BEGIN{printf "%.0f\n", c/t}'
}
for rep in $(seq 1 "$REPS"); do
  log "nbd rep $rep/$REPS"
  record nbdread qemu "$(nbd_run qemu "")"; record nbdread ours "$(nbd_run ours "")"
  record nbdwrite qemu "$(nbd_run qemu "-w")"; record nbdwrite ours "$(nbd_run ours "-w")"
done

# Compressed convert of 1 GiB (deterministic compressible source, as in the baselines).
SRC=$DIR/comp-src.raw
if [ ! -s "$SRC" ]; then
  log "generating the 1 GiB compressible source"
  python3 - "$SRC" <<'PY'
import random, struct, sys
out = sys.argv[1]; size = 1 << 30; CL = 65536
rng = random.Random(20251125)
vocab = [''.join(rng.choice('etaoinshrdlucmfwypvbgkjqxz') for _ in range(rng.randint(2, 10))) for _ in range(3000)]
words = rng.choices(vocab, weights=[1.0 / (i + 1) for i in range(len(vocab))], k=900_000)
text = bytearray()
for i, w in enumerate(words):
    text += w.encode(); text += b'\n' if i % 13 == 12 else b' '
text = bytes(text)
recs = bytearray()
for i in range(300_000):
    recs += struct.pack('<IIHHI', i, rng.randint(0, 4096), rng.randint(0, 15), 0x1234, rng.getrandbits(12))
recs = bytes(recs); randpool = rng.randbytes(8 << 20); zero = bytes(CL)
with open(out, 'wb') as f:
    for c in range(size // CL):
        r = rng.random()
        if r < 0.25:   f.write(zero)
        elif r < 0.70: o = rng.randrange(len(text) - CL); f.write(text[o:o + CL])
        elif r < 0.90: o = rng.randrange(len(recs) - CL); f.write(recs[o:o + CL])
        else:          o = rng.randrange(len(randpool) - CL); f.write(randpool[o:o + CL])
PY
fi
cat "$SRC" >/dev/null
for rep in $(seq 1 "$REPS"); do
  for t in zlib zstd; do
    rm -f "$DIR/c.qcow2"; timed qemu-img convert -c -f raw -O qcow2 -o compression_type=$t "$SRC" "$DIR/c.qcow2"; record "conv_$t" qemu "$W"
    rm -f "$DIR/c.qcow2"; timed "$Q" convert -c -f raw -O qcow2 -o compression_type=$t "$SRC" "$DIR/c.qcow2"; record "conv_$t" ours "$W"
    qemu-img compare -q -f raw "$SRC" "$DIR/c.qcow2"
  done
done

# Memory: the metadata cache bound holds on a 64 GiB virtual disk under random writes.
log "memory: 64 GiB virtual disk, random 4 KiB allocating writes"
"$Q" bench --output json -t none -c 100 -d 1 -s 4k "$FULL" >"$DIR/.mem"
RSS0=$(jq '."peak-rss-kib"' "$DIR/.mem")
MEM=""
for cc in 16 64 512; do
  rm -f "$DIR/big.qcow2"; qemu-img create -q -f qcow2 -o cluster_size=65536 "$DIR/big.qcow2" 64G
  "$Q" bench --output json -t none -w --random -c 8000 -d 32 -s 4k --cache-clusters $cc "$DIR/big.qcow2" >"$DIR/.mem"
  rss=$(jq '."peak-rss-kib"' "$DIR/.mem")
  MEM+="| $cc | $((cc * 2 * 64 / 1024)).$(( (cc * 2 * 64 % 1024) * 10 / 1024 )) | $((rss / 1024)) | $(( (rss - RSS0) / 1024 )) |"$'\n'
done
rm -f "$DIR/big.qcow2"

get() { printf '%s' "${R["$1|$2"]:-}" | { grep -v '^$' || true; } | median | awk '{ if ($1 >= 100) printf "%.0f", $1; else printf "%.1f", $1 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "" || b == "" || b == 0) print "—"; else printf "%.2f", a/b }'; }
TABLE=$DIR/table.md
{
  pcol() { [ "$HAVE_PEERS" = 1 ] && printf '%s' "$1" || printf 'skipped'; }
  echo "| workload | raw fio | qemu-img | qcow2 | imago | qcow2-rs | qcow2 / raw | qcow2 / qemu | qcow2 / imago | qcow2 / qcow2-rs | target |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  row() { # key label target
    local r q o im qr; r=$(get "$1" raw); q=$(get "$1" qemu); o=$(get "$1" ours)
    im=$(get "$1" imago); qr=$(get "$1" qcow2-rs)
    echo "| $2 | ${r:-—} | $q | $o | $(pcol "$im") | $(pcol "$qr") | $(ratio "$o" "$r") | $(ratio "$o" "$q") | $(ratio "$o" "$im") | $(ratio "$o" "$qr") | $3 |"
  }
  row read1 "4 KiB read QD1, allocated image (IOPS)" "≥ 1.0 × qemu-img and each peer"
  row read32 "4 KiB read QD32, allocated image (IOPS)" "≥ 0.90 × raw, ≥ 1.3 × qemu-img"
  row readpc "4 KiB read QD32 from the page cache, tmpfs (IOPS)" "≥ imago"
  row ow32 "4 KiB overwrite QD32 (IOPS)" "≥ 1.2 × qemu-img"
  row alloc32 "4 KiB allocating write QD32, empty image (IOPS)" "≥ 4 × qemu-img, ≥ 2.5 × imago"
  row seq1m "1 MiB sequential allocating write QD8 (IOPS)" "≥ 0.9 × raw"
  row cow64 "64 KiB allocating write over a backing file QD16 (IOPS)" "— (raw: 64k randwrite)"
  row l2miss "4 KiB read QD32 missing the L2 cache (20 000 clusters over 4 TiB, IOPS)" "≥ 1.5 × qemu-img"
  for k in nbdread:"4 KiB random-stride read QD32 over NBD, qemu-nbd vs qcow2 serve (IOPS)" nbdwrite:"4 KiB random-stride overwrite QD32 over NBD (IOPS)"; do
    q=$(get "${k%%:*}" qemu); o=$(get "${k%%:*}" ours)
    echo "| ${k#*:} | — | $q | $o | — | — | — | $(ratio "$o" "$q") | — | — | ≥ 3 × qemu-nbd |"
  done
  for t in zlib zstd; do
    q=$(get "conv_$t" qemu); o=$(get "conv_$t" ours)
    echo "| compressed convert of 1 GiB, $t (seconds, lower is better) | — | $q | $o | — | — | — | $(ratio "$q" "$o") (speed-up) | — | — | ≥ 2 × qemu-img |"
  done
  echo
  echo "CPU per request (µs, user + system of the whole process; lower is better):"
  echo
  echo "| workload | raw fio | qemu-img | qcow2 | imago | qcow2-rs | qcow2 / qemu | qcow2 / imago | qcow2 / qcow2-rs | target |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  crow() { # key label target
    local r q o im qr; r=$(get "$1" raw); q=$(get "$1" qemu); o=$(get "$1" ours)
    im=$(get "$1" imago); qr=$(get "$1" qcow2-rs)
    echo "| $2 | ${r:-—} | $q | $o | $(pcol "$im") | $(pcol "$qr") | $(ratio "$o" "$q") | $(ratio "$o" "$im") | $(ratio "$o" "$qr") | $3 |"
  }
  crow read1cpu "4 KiB read QD1" "≤ 0.8 × qemu-img, ≤ qcow2-rs"
  crow read32cpu "4 KiB read QD32" "≤ 0.8 × qemu-img, ≤ qcow2-rs"
  crow readpccpu "4 KiB read QD32, page cache" "≤ 2 × imago"
  crow ow32cpu "4 KiB overwrite QD32" "—"
  crow alloc32cpu "4 KiB allocating write QD32" "—"
  crow seq1mcpu "1 MiB sequential allocating write QD8" "—"
  crow l2misscpu "4 KiB read QD32 missing the L2 cache" "—"
  echo
  echo "Memory, 8000 random 4 KiB allocating writes (QD32) on a 64 GiB virtual disk: peak RSS of the whole process against the metadata cache bound (L2 + refcount caches, each \`cache-clusters\` × 64 KiB); a 100-request read run on the small image has a peak RSS of $((RSS0 / 1024)) MiB (runtime, io_uring ring, buffers)."
  echo
  echo "| cache clusters | cache bound (MiB) | peak RSS (MiB) | above the small run (MiB) |"
  echo "|---:|---:|---:|---:|"
  printf '%s' "$MEM"
  echo
  echo "Run $(date -u +%FT%TZ) on $(nproc) CPUs, $(uname -r), $(qemu-img --version | head -1), $( [ "$HAVE_FIO" = 1 ] && fio --version || echo 'fio: not installed, raw column skipped'); $GIB GiB images, 64 KiB clusters, O_DIRECT for every contender (io_uring for fio, QEMU and ours; imago's own blocking file I/O on a current-thread runtime; qcow2-rs on tokio-uring) but the page-cache row (tmpfs, no O_DIRECT), medians of $REPS interleaved runs. qemu-img convert's target cache is 'unsafe' (no final fsync); qcow2 convert syncs before it renames the target into place."
} >"$TABLE"
cat "$TABLE"
if [ "${CB_NO_WRITE:-0}" != 1 ]; then
  python3 - "$TABLE" "$ROOT/BENCHMARKS.md" <<'PY'
import sys, re
table = open(sys.argv[1]).read()
path = sys.argv[2]
try:
    doc = open(path).read()
except FileNotFoundError:
    doc = "# Benchmarks\n\n<!-- BEGIN compare.sh -->\n<!-- END compare.sh -->\n"
new = "<!-- BEGIN compare.sh -->\n" + table + "<!-- END compare.sh -->"
doc = re.sub(r"<!-- BEGIN compare.sh -->.*?<!-- END compare.sh -->", lambda m: new, doc, flags=re.S)
open(path, "w").write(doc)
PY
  log "BENCHMARKS.md updated"
fi
rm -rf "$SHM"
