#!/usr/bin/env bash
# NBD side by side: qemu-nbd (--cache=none --aio=io_uring, multi-conn allowed with -e) and
# `qcow2 serve` (--cache none --aio io_uring) serve the same written 1 GiB qcow2 on a Unix
# socket, one after the other for each measurement, alternating which goes first. Clients
# that are not the bottleneck and that nobody here wrote: fio's nbd engine (libnbd) with 1
# and 4 connections at QD32 each, and nbdcopy (libnbd) copying the whole disk to null: with
# 1 and 4 connections (fio: QD32 per connection). TLS cost: 64 KiB reads QD32 over plain
# and TLS (nbds+unix, the same server certificate for both servers). Server CPU per request is the server process's
# user + system time over the run (/proc/PID/stat) divided by the requests. Writes the
# table between the nbd.sh markers of BENCHMARKS.md. Quiet machine: REPS=3 SECS=4 default.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${REPS:-3}"
SECS="${SECS:-4}"
cargo build -q --release -p qcow2-cli
QCOW2="$PWD/target/release/qcow2"
W="$PWD/bench-scratch/nbd"
mkdir -p "$W"
cd "$W"
OUT="$W/results.txt"
: >"$OUT"
PID=""
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null || true' EXIT
for t in fio nbdcopy openssl jq; do
    command -v "$t" >/dev/null || { echo "nbd.sh needs $t (apt-get install fio libnbd-bin openssl jq)" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "fio lacks the nbd engine" >&2; exit 1; }

cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
ticks="$(getconf CLK_TCK)"
SOCK="$W/nbd.sock"

# TLS credentials in QEMU's tls-creds-x509 layout (the server directory serves both).
if [ ! -f tls/server/server-cert.pem ]; then
    mkdir -p tls/server tls/client
    (cd tls
     openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
         -subj /CN=bench-ca -keyout ca-key.pem -out ca-cert.pem 2>/dev/null
     openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
         -keyout server/server-key.pem -out server.csr 2>/dev/null
     openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -days 365 \
         -extfile <(printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth') \
         -out server/server-cert.pem 2>/dev/null
     cp ca-cert.pem server/ && cp ca-cert.pem client/)
fi

start_server() { # who tls(0/1)
    rm -f "$SOCK" "$W/qemu-nbd.pid"
    local tls=()
    if [ "$1" = qcow2 ]; then
        [ "$2" = 1 ] && tls=(--tls-creds "$W/tls/server")
        "$QCOW2" serve written.qcow2 --socket "$SOCK" --cache none --aio io_uring "${tls[@]}" \
            2>/dev/null &
        PID=$!
    else
        [ "$2" = 1 ] && tls=(--object "tls-creds-x509,id=tls0,endpoint=server,dir=$W/tls/server,verify-peer=off"
                             --tls-creds tls0)
        qemu-nbd -f qcow2 --cache=none --aio=io_uring -t -e 8 -k "$SOCK" "${tls[@]}" \
            --pid-file="$W/qemu-nbd.pid" --fork written.qcow2
        PID="$(cat "$W/qemu-nbd.pid")"
    fi
    for _ in $(seq 200); do [ -S "$SOCK" ] && return; sleep 0.05; done
    echo "server $1 did not start" >&2
    exit 1
}

stop_server() {
    kill -TERM "$PID"
    for _ in $(seq 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.05; done
    wait "$PID" 2>/dev/null || true
    PID=""
}

emit() { # workload who requests-per-second requests c0 c1
    python3 -c "
w, who, rate, ops, c0, c1, hz = '$1', '$2', float('$3'), float('$4'), int('$5'), int('$6'), int('$ticks')
print(f'{w}\t{who}\t{rate:.0f}\t{(c1-c0)/hz*1e6/ops:.2f}')" >>"$OUT"
}

fio_run() { # workload who tls rw bs jobs
    local workload="$1" who="$2" tls="$3" rw="$4" bs="$5" jobs="$6"
    start_server "$who" "$tls"
    local uri="nbd+unix:///?socket=$SOCK"
    # fio's libnbd handle may not read local paths from a URI (tls-certificates), so the
    # client checks nothing; neither server asks for a client certificate.
    [ "$tls" = 1 ] && uri="nbds+unix:///?socket=$SOCK&tls-verify-peer=false"
    local c0 c1
    c0="$(cpu "$PID")"
    fio --name=nbd --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth=32 \
        --numjobs="$jobs" --group_reporting --runtime="$SECS" --time_based \
        --randrepeat=0 --output-format=json --output="$W/fio.json" >/dev/null
    c1="$(cpu "$PID")"
    stop_server
    # With group_reporting the job's iops are the sum over its connections.
    local ops iops
    ops="$(jq '[.jobs[0].read.total_ios, .jobs[0].write.total_ios] | add' "$W/fio.json")"
    iops="$(jq '[.jobs[0].read.iops, .jobs[0].write.iops] | add' "$W/fio.json")"
    emit "$workload" "$who" "$iops" "$ops" "$c0" "$c1"
}

nbdcopy_run() { # workload who connections
    start_server "$2" 0
    local c0 c1 t0 t1
    c0="$(cpu "$PID")"
    t0="$(date +%s.%N)"
    nbdcopy --connections="$3" --requests=32 "nbd+unix:///?socket=$SOCK" null:
    t1="$(date +%s.%N)"
    c1="$(cpu "$PID")"
    stop_server
    # nbdcopy reads in 256 KiB requests by default: 4096 of them for 1 GiB.
    emit "$1" "$2" "$(python3 -c "print(4096 / ($t1 - $t0))")" 4096 "$c0" "$c1"
}

# A written 1 GiB image (real data) for reads and overwrites.
if [ ! -f written.qcow2 ]; then
    qemu-img create -q -f qcow2 -o cluster_size=65536 written.qcow2 1G
    qemu-io -c 'write -P 0x11 0 1G' written.qcow2 >/dev/null
fi

for rep in $(seq "$REPS"); do
    order="qemu-nbd qcow2"
    [ $((rep % 2)) -eq 0 ] && order="qcow2 qemu-nbd"
    for who in $order; do
        fio_run "4k randread QD32, 1 conn" "$who" 0 randread 4k 1
        fio_run "4k randread QD32, 4 conns" "$who" 0 randread 4k 4
        fio_run "4k overwrite QD32, 1 conn" "$who" 0 randwrite 4k 1
        fio_run "4k overwrite QD32, 4 conns" "$who" 0 randwrite 4k 4
        fio_run "64k randread QD32, plain" "$who" 0 randread 64k 1
        fio_run "64k randread QD32, TLS" "$who" 1 randread 64k 1
        nbdcopy_run "nbdcopy 1 GiB to null:, 1 conn" "$who" 1
        nbdcopy_run "nbdcopy 1 GiB to null:, 4 conns" "$who" 4
    done
done

TABLE="$(python3 - "$OUT" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    w, who, iops, cpu = line.rstrip("\n").split("\t")
    rows.setdefault((w, who), []).append((float(iops), float(cpu)))
def med(w, who, i):
    return statistics.median(x[i] for x in rows[(w, who)])
order = []
for line in open(sys.argv[1]):
    w = line.split("\t")[0]
    if w not in order:
        order.append(w)
print("| workload (fio nbd engine / nbdcopy, Unix socket) | qemu-nbd req/s | qcow2 req/s | qcow2 / qemu-nbd | qemu-nbd CPU µs/req | qcow2 CPU µs/req | CPU qcow2 / qemu-nbd |")
print("|---|---:|---:|---:|---:|---:|---:|")
for w in order:
    a, b = med(w, "qemu-nbd", 0), med(w, "qcow2", 0)
    ca, cb = med(w, "qemu-nbd", 1), med(w, "qcow2", 1)
    print(f"| {w} | {a:.0f} | {b:.0f} | {b/a:.2f} | {ca:.1f} | {cb:.1f} | {cb/ca:.2f} |")
for who in ["qemu-nbd", "qcow2"]:
    p = med("64k randread QD32, plain", who, 0)
    t = med("64k randread QD32, TLS", who, 0)
    print(f"| TLS cost at 64k reads, {who} | | | {100 * (1 - t / p):.0f} % fewer IOPS | | | |")
EOF
)"
echo "$TABLE"
cd ../..
python3 benches/put_table.py nbd.sh "$TABLE"
