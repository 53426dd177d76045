#!/usr/bin/env bash
# vhost-user-blk side by side: the same libblkio client (benches/vhost_client.rs) drives
# qemu-storage-daemon (QEMU's qcow2 driver, cache.direct=on, aio=io_uring) and
# `qcow2 serve --vhost-user-blk` (--cache none --aio io_uring) on the same images, one
# queue each, interleaved; and `qcow2 serve` over NBD with qemu-img bench for the NBD
# ratio. Server CPU per request is the server process's user + system time over the run
# (/proc/PID/stat) divided by the requests. Writes the table between the vhost.sh markers
# of BENCHMARKS.md. Run on a quiet machine: REPS=3 SECS=5 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${REPS:-3}"
SECS="${SECS:-5}"
cargo build -q --release -p qcow2-cli
cargo bench -q -p qcow2-vhost --bench vhost_client --no-run 2>/dev/null
CLIENT="$PWD/$(ls -t target/release/deps/vhost_client-* | grep -v '\.d$' | head -1)"
QCOW2="$PWD/target/release/qcow2"
W="$PWD/bench-scratch/vhost"
mkdir -p "$W"
cd "$W"
OUT="$W/results.txt"
: >"$OUT"
PID=""
# A failed run must not leave a server behind.
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null || true' EXIT

cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
ticks="$(getconf CLK_TCK)"

start_server() { # who image sock
    rm -f "$3"
    if [ "$1" = qcow2 ]; then
        "$QCOW2" serve "$2" --vhost-user-blk "$3" --num-queues 1 --cache none --aio io_uring \
            2>/dev/null &
    else
        qemu-storage-daemon \
            --blockdev "driver=file,node-name=file,filename=$2,cache.direct=on,aio=io_uring" \
            --blockdev driver=qcow2,node-name=qcow2,file=file \
            --export "type=vhost-user-blk,id=exp,node-name=qcow2,addr.type=unix,addr.path=$3,writable=on,num-queues=1" &
    fi
    PID=$!
    for _ in $(seq 200); do [ -S "$3" ] && return; sleep 0.05; done
    echo "server $1 did not start" >&2
    exit 1
}

run() { # workload who image client-args...
    local workload="$1" who="$2" img="$3"
    shift 3
    start_server "$who" "$img" "$W/$who.sock"
    local c0 c1 out
    c0="$(cpu "$PID")"
    out="$("$CLIENT" --socket "$W/$who.sock" --secs "$SECS" "$@")"
    c1="$(cpu "$PID")"
    kill -TERM "$PID"
    wait "$PID" || true
    python3 - "$workload" "$who" "$out" "$c0" "$c1" "$ticks" >>"$OUT" <<'EOF'
import json, sys
w, who, out, c0, c1, hz = sys.argv[1:]
r = json.loads(out)
cpu_us = (int(c1) - int(c0)) / int(hz) * 1e6 / r["ops"]
print(f"{w}\t{who}\t{r['iops']:.0f}\t{cpu_us:.1f}")
EOF
}

# A written 1 GiB image for reads and overwrites (real data, not fallocated).
if [ ! -f written.qcow2 ]; then
    qemu-img create -q -f qcow2 -o cluster_size=65536 written.qcow2 1G
    qemu-io -c 'write -P 0x11 0 1G' written.qcow2 >/dev/null
fi

for rep in $(seq "$REPS"); do
    order="qsd qcow2"
    [ $((rep % 2)) -eq 0 ] && order="qcow2 qsd"
    for who in $order; do
        run "read QD1" "$who" written.qcow2 --rw read --qd 1 --seed "$rep"
        run "read QD32" "$who" written.qcow2 --rw read --qd 32 --seed "$rep"
        run "overwrite QD32" "$who" written.qcow2 --rw write --qd 32 --seed "$rep"
        rm -f fresh.qcow2
        qemu-img create -q -f qcow2 -o cluster_size=65536 fresh.qcow2 8G
        run "allocating write QD32" "$who" fresh.qcow2 --rw write --qd 32 --pattern stride \
            --stride 65536
    done
    # The same reads through `qcow2 serve` over NBD (qemu-img bench, golden-ratio stride).
    rm -f nbd.sock
    "$QCOW2" serve written.qcow2 --socket nbd.sock --cache none --aio io_uring 2>/dev/null &
    PID=$!
    for _ in $(seq 200); do [ -S nbd.sock ] && break; sleep 0.05; done
    c0="$(cpu "$PID")"
    t0="$(date +%s.%N)"
    qemu-img bench -f raw -c 200000 -d 32 -s 4096 -S 1640542208 \
        "nbd+unix:///?socket=$W/nbd.sock" >/dev/null
    t1="$(date +%s.%N)"
    c1="$(cpu "$PID")"
    kill -TERM "$PID"
    wait "$PID" || true
    python3 -c "
print(f'read QD32\tnbd\t{200000/($t1-$t0):.0f}\t{($c1-$c0)/$ticks*1e6/200000:.1f}')" >>"$OUT"
done

TABLE="$(python3 - "$OUT" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    w, who, iops, cpu = line.rstrip("\n").split("\t")
    rows.setdefault((w, who), []).append((float(iops), float(cpu)))
def med(w, who, i):
    v = rows.get((w, who))
    return statistics.median(x[i] for x in v) if v else None
targets = {"read QD1": "≥ 1.0 ×", "read QD32": "≥ 1.5 ×", "overwrite QD32": "≥ 1.5 ×",
           "allocating write QD32": "≥ 3 ×"}
print("| 4 KiB workload, libblkio client, 1 queue | qsd IOPS | qcow2 IOPS | qcow2 / qsd | qsd CPU µs/req | qcow2 CPU µs/req | target |")
print("|---|---:|---:|---:|---:|---:|---|")
for w in ["read QD1", "read QD32", "overwrite QD32", "allocating write QD32"]:
    a, b = med(w, "qsd", 0), med(w, "qcow2", 0)
    ca, cb = med(w, "qsd", 1), med(w, "qcow2", 1)
    print(f"| {w} | {a:.0f} | {b:.0f} | {b/a:.2f} | {ca:.1f} | {cb:.1f} | {targets[w]} IOPS, less CPU |")
n, v = med("read QD32", "nbd", 0), med("read QD32", "qcow2", 0)
nc = med("read QD32", "nbd", 1)
print(f"| read QD32 over NBD (`qcow2 serve`, qemu-img bench) vs vhost-user-blk | {n:.0f} (NBD) | {v:.0f} | {v/n:.2f} (vhost / NBD) | — | {nc:.1f} (NBD) | ≥ 5 × NBD |")
EOF
)"
echo "$TABLE"
cd ../..
python3 benches/put_table.py vhost.sh "$TABLE"
