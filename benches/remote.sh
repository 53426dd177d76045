#!/usr/bin/env bash
# benches/remote.sh — a remote base image over HTTP: this engine's remote file
# (qcow2-remote, through `qcow2 bench` / `qcow2 convert` on the URL) against QEMU's curl
# driver (`qemu-img bench` / `qemu-img convert` on the same URL) and `curl -o /dev/null`,
# all against one nginx on loopback serving one 1 GiB qcow2 image (fully written by
# qemu-io, 64 KiB clusters), in one run, interleaved.
#
#   first touch: every request in a MiB of the image not read before in that process
#                (stride 633 MiB over 1 GiB: each of the 1024 MiB once; the default
#                32 MiB cache turns over for the 1 MiB reads), QD1 for
#                both (QEMU 10.0.2's curl driver hangs in qemu-img bench at depth 3 with
#                4 KiB requests and at depth 2 with 1 MiB ones), and ours at QD8 too;
#   cached:      the same offsets read once first (`qcow2 bench --warmup`, a cache that
#                holds the image), then timed; QEMU's driver has no cache of that size and
#                is timed re-reading them, as it would;
#   floor:       curl fetching the first-touch ranges one at a time on one connection
#                (64 KiB, our block size, and 1 MiB): what QD1 can reach at best;
#   cache file:  the same offsets read by one process with `--remote-cache-dir`, then
#                timed in a second process with the same folder (QEMU: as for cached);
#   sequential:  the whole image read in 1 MiB requests (`qcow2 bench`, QD8), against
#                `curl -o /dev/null` of the object: what the store serves;
#   convert:     the whole image to raw on tmpfs, against curl writing the object to tmpfs
#                and against `qemu-img convert -m 1` (more coroutines hang its curl driver);
#   one worker:  the 1 MiB first-touch rows again with `qcow2 bench --workers 1`;
#   CPU:         for the 1 MiB first-touch rows and curl's 1 MiB floor, each client's CPU
#                per request (the whole process, user + system) and nginx's CPU per MiB it
#                served meanwhile; from curl's and nginx's, the machine's bound: the most
#                1 MiB requests per second that these cores allow a client that only
#                receives the bytes, before any copy into a cache or a caller's buffer.
#   settling:    every timed contender starts after RB_SETTLE seconds of quiet [4]. On a
#                guest with free page reporting (the reference VM), memory a process
#                frees goes back to the host about 2 s later, and touching it again costs
#                a fault in the host: a process started right after another one reuses
#                that one's memory for free, and one started later pays about 2.5 ms per
#                MiB it touches. Back to back, which contender gained depended on which
#                one ran before it (first-touch 1 MiB at QD8 with a 256 MiB cache:
#                1205-1690 IOPS right after another run, 722-1029 after a pause);
#                settled, each starts as a fresh process on a quiet host does.
#
# Writes the table of medians and ratios into BENCHMARKS.md between the BEGIN/END
# remote.sh markers (RB_NO_WRITE=1: print only).
#
#   bash benches/remote.sh                 # about 3-5 minutes on the 2-core reference VM
#   RB_REPS=1 RB_NO_WRITE=1 bash benches/remote.sh
#
# Knobs: RB_DIR scratch folder [./bench-scratch/remote]; RB_REPS repeats, median [3];
# RB_SHM tmpfs folder for convert targets [/dev/shm/qcow2-remote-bench]; RB_SETTLE seconds
# of quiet before each timed contender [4].
# Installs nginx-light, curl and QEMU's curl driver (qemu-block-extra) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${RB_DIR:-$ROOT/bench-scratch/remote}
SHM=${RB_SHM:-/dev/shm/qcow2-remote-bench}
REPS=${RB_REPS:-3}
SETTLE=${RB_SETTLE:-4}
mkdir -p "$DIR" "$SHM"
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

need=()
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || need+=(nginx-light)
[ -x /usr/bin/time ] || need+=(time)
command -v curl >/dev/null || need+=(curl)
command -v qemu-img >/dev/null || need+=(qemu-utils)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! qemu-img --help | grep ' http ' >/dev/null; then
  log "installing QEMU's curl driver"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    "qemu-block-extra=$(dpkg-query -W -f='${Version}' qemu-utils)" >/dev/null
fi
NGINX=/usr/sbin/nginx; [ -x "$NGINX" ] || NGINX=nginx

log "building the release binary"
cargo build --release -q -p qcow2-cli
Q=$ROOT/target/release/qcow2

IMG=$DIR/base.qcow2
if [ ! -s "$IMG" ]; then
  log "writing a 1 GiB qcow2 image"
  qemu-img create -q -f qcow2 "$IMG" 1G
  qemu-io -c "write -P 0x5a 0 1G" "$IMG" >/dev/null
fi

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$DIR/nginx.conf" <<EOF
daemon off;
master_process off;
pid $DIR/nginx.pid;
error_log stderr error;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path $DIR; proxy_temp_path $DIR; fastcgi_temp_path $DIR;
  uwsgi_temp_path $DIR; scgi_temp_path $DIR;
  sendfile on;
  keepalive_requests 100000;
  server { listen 127.0.0.1:$PORT; root $DIR; }
}
EOF
"$NGINX" -e stderr -p "$DIR" -c "$DIR/nginx.conf" &
NGINX_PID=$!
trap 'kill $NGINX_PID 2>/dev/null; rm -rf "$SHM"' EXIT
for _ in $(seq 100); do curl -sf -o /dev/null -r 0-0 "http://127.0.0.1:$PORT/base.qcow2" && break; sleep 0.1; done
URL=http://127.0.0.1:$PORT/base.qcow2
QOPTS="driver=qcow2,file.driver=http,file.url=$URL"
STEP=$((633 << 20))
CACHE=(--remote-cache 1536M)

TICK=$(getconf CLK_TCK)
# Quiet before a timed contender (see "settling" above).
settle() { sleep "$SETTLE"; }
# nginx's CPU so far, in clock ticks (it runs as one process: master_process off).
nginx_ticks() { awk '{print $14 + $15}' "/proc/$NGINX_PID/stat"; }
# Runs the command after $1 and $2 under /usr/bin/time (into $DIR/.time) and returns its
# status. With $1 = a key and the command successful, records its CPU in µs per request
# ($2 requests) as "$1_cpu" and nginx's meanwhile as "$1_srv", in $CPU_LOG: the benchmarks
# run in command substitutions, which cannot add to the parent's table.
CPU_LOG=$DIR/cpu.log
: >"$CPU_LOG"
timed() {
  local key=$1 n=$2 n0 n1 rc=0
  shift 2
  n0=$(nginx_ticks)
  /usr/bin/time -f '%e %U %S' -o "$DIR/.time" "$@" || rc=$?
  if [ -n "$key" ] && [ "$rc" = 0 ]; then
    n1=$(nginx_ticks)
    awk -v n="$n" -v a="$n0" -v b="$n1" -v t="$TICK" -v k="$key" \
      '{printf "%s_cpu %.0f\n%s_srv %.0f\n", k, ($2 + $3) * 1e6 / n, k, (b - a) * 1e6 / t / n}' \
      "$DIR/.time" >>"$CPU_LOG"
  fi
  return "$rc"
}
# IOPS of `qemu-img bench` over the curl driver at QD1: $1 count, $2 size, $3 step
# (bounded: the driver has hung at higher depths; a hang prints no number). With $4 = a
# key, also records the CPU per request of qemu-img and of nginx under "$4_cpu" and
# "$4_srv".
qemu_bench() {
  settle
  timed "${4:-}" "$1" timeout 300 qemu-img bench -c "$1" -d 1 -s "$2" -S "$3" \
    --image-opts "$QOPTS" >"$DIR/.out" 2>&1 || true
  awk -v c="$1" '/Run completed/{printf "%.0f\n", c/$4}' "$DIR/.out"
}
# IOPS of `qcow2 bench` on the URL: $1 depth, $2 count, $3 size, $4 step, $5 "warm" for
# the cached rows (a cache that holds the image, every offset read once before timing), or
# a key: then the CPU per request of the process and of nginx go under "$5_cpu", "$5_srv".
ours_bench() {
  local d=$1 c=$2 s=$3 st=$4 key=${5:-} global=() warm=() more=()
  if [ "$key" = warm ]; then global=("${CACHE[@]}"); warm=(--warmup); key=; fi
  # ONE_WORKER=1: one Tokio worker instead of one per core.
  if [ -n "${ONE_WORKER:-}" ]; then more=(--workers 1); fi
  settle
  timed "$key" "$c" \
    "$Q" "${global[@]}" bench -c "$c" -d "$d" -s "$s" -S "$st" "${warm[@]}" "${more[@]}" --output json "$URL" >"$DIR/.out"
  python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["iops"]))' "$DIR/.out"
}
# IOPS of `qcow2 bench` in a second process over a warm local cache file
# (`--remote-cache-dir`): a first process reads the same offsets and fills the file (not
# timed), the second is timed with an empty memory cache. $1 depth, $2 count, $3 size, $4 step
ours_file_bench() {
  rm -rf "$DIR/cache-dir"
  "$Q" --remote-cache-dir "$DIR/cache-dir" bench -c "$2" -d "$1" -s "$3" -S "$4" "$URL" >/dev/null
  settle
  "$Q" --remote-cache-dir "$DIR/cache-dir" bench -c "$2" -d "$1" -s "$3" -S "$4" --output json "$URL" >"$DIR/.out"
  python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["iops"]))' "$DIR/.out"
  # Its writes, left to the kernel's write-back, would otherwise slow the next rows.
  rm -rf "$DIR/cache-dir"; sync
}
# MiB/s of `qcow2 bench` on the URL: $1 depth, $2 count, $3 size, $4 step
ours_mibs() {
  settle
  "$Q" bench -c "$2" -d "$1" -s "$3" -S "$4" --output json "$URL" >"$DIR/.out"
  python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["mib-per-second"]))' "$DIR/.out"
}
# Requests/s of curl fetching $2-byte ranges at the first-touch offsets ($1 of them, stride
# 633 MiB), one after another on one kept-alive connection: the store's own floor at QD1.
# With $3 = a key, the CPU per request of curl and of nginx go under "$3_cpu", "$3_srv".
curl_ranges() {
  local n=$1 size=$2 t0 t1
  python3 - "$n" "$size" "$URL" >"$DIR/curl.cfg" <<'PY'
import sys
n, size, url = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for i in range(n):
    off = (i * (633 << 20)) % (1 << 30) // size * size
    print(f'url = "{url}"\nrange = "{off}-{off + size - 1}"\noutput = "/dev/null"')
PY
  settle
  t0=$(date +%s.%N); timed "${3:-}" "$n" curl -sf -K "$DIR/curl.cfg"; t1=$(date +%s.%N)
  awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f\n", n/(b-a)}'
}
# MiB/s of a command that moves the 1 GiB image
mibs() {
  local t0 t1
  settle
  t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f\n", 1024/(b-a)}'
}
median() { sort -g | awk '{a[NR]=$1} END{if (NR == 0) exit; print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A R
add() { R[$1]+="$2 "; }
for rep in $(seq "$REPS"); do
  log "repeat $rep/$REPS"
  add q4k "$(qemu_bench 1024 4k $STEP)"
  add o4k "$(ours_bench 1 1024 4k $STEP)"; add p4k "$(ours_bench 8 1024 4k $STEP)"
  add q1m "$(qemu_bench 1024 1M $STEP q1m)"
  add o1m "$(ours_bench 1 1024 1M $STEP o1m)"; add p1m "$(ours_bench 8 1024 1M $STEP p1m)"
  add o1w "$(ONE_WORKER=1 ours_bench 1 1024 1M $STEP o1w)"; add p1w "$(ONE_WORKER=1 ours_bench 8 1024 1M $STEP p1w)"
  add qc4k "$(qemu_bench 4096 4k $((STEP + 4096)))"
  add oc4k "$(ours_bench 1 4096 4k $((STEP + 4096)) warm)"
  add pc4k "$(ours_bench 8 4096 4k $((STEP + 4096)) warm)"
  add qc1m "$(qemu_bench 1024 1M $STEP)"
  add oc1m "$(ours_bench 1 1024 1M $STEP warm)"
  add pc1m "$(ours_bench 8 1024 1M $STEP warm)"
  add of4k "$(ours_file_bench 1 4096 4k $((STEP + 4096)))"
  add pf4k "$(ours_file_bench 8 4096 4k $((STEP + 4096)))"
  add of1m "$(ours_file_bench 1 1024 1M $STEP)"
  add pf1m "$(ours_file_bench 8 1024 1M $STEP)"
  add c64k "$(curl_ranges 1024 65536)"; add c1m "$(curl_ranges 1024 1048576 c1m)"
  add curl "$(mibs curl -sf -o /dev/null "$URL")"
  add oseq "$(ours_mibs 8 1024 1M 1M)"
  add curlshm "$(mibs curl -sf -o "$SHM/curl.raw" "$URL")"; rm -f "$SHM/curl.raw"
  add oconv "$(mibs "$Q" convert -O raw "$URL" "$SHM/ours.raw")"; rm -f "$SHM/ours.raw"
  add qconv "$(mibs timeout 300 qemu-img convert -m 1 -O raw --image-opts "$QOPTS" "$SHM/qemu.raw")"
  rm -f "$SHM/qemu.raw"
done
med() { tr ' ' '\n' <<<"${R[$1]}" | grep . | median; }
medc() { awk -v k="$1" '$1 == k {print $2}' "$CPU_LOG" | median; }
cpu_cell() { local c s; c=$(medc "$1_cpu"); s=$(medc "$1_srv"); [ -n "$c" ] && echo "$c / $s"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }

ratio_or() { if [ -n "$1" ] && [ -n "$2" ]; then ratio "$1" "$2"; else echo "—"; fi; }
row() { # label qemu ours ours-qd8 target
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$1" "${2:-hung}" "$3" "$4" \
    "$(ratio_or "$3" "$2")" "$(ratio_or "$4" "$2")" "$5"
}
TABLE=$(
  echo "| workload | QEMU curl driver QD1 | qcow2 QD1 | qcow2 QD8 | QD1 / QEMU | QD8 / QEMU | target |"
  echo "|---|---:|---:|---:|---:|---:|---|"
  row "4 KiB random read, first touch (IOPS)" "$(med q4k)" "$(med o4k)" "$(med p4k)" "≥ 2 × QEMU"
  row "1 MiB random read, first touch (IOPS)" "$(med q1m)" "$(med o1m)" "$(med p1m)" "≥ 2 × QEMU"
  row "1 MiB random read, first touch, one Tokio worker (\`bench --workers 1\`; IOPS)" "$(med q1m)" "$(med o1w)" "$(med p1w)" "≥ 2 × QEMU"
  printf '| %s | %s | | | %s | | %s |\n' "the store's floor: curl fetching the same first-touch ranges one by one, 64 KiB (our block) / 1 MiB (requests/s; curl in the QEMU column)" \
    "$(med c64k) / $(med c1m)" "$(ratio "$(med c64k)" "$(med q4k)") / $(ratio "$(med c1m)" "$(med q1m)") (curl / QEMU)" "—"
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "CPU per 1 MiB first-touch request, µs: the client process / nginx" \
    "$(cpu_cell q1m)" "$(cpu_cell o1m)" "$(cpu_cell p1m)" "$(ratio_or "$(medc o1m_cpu)" "$(medc q1m_cpu)")" \
    "$(ratio_or "$(medc p1m_cpu)" "$(medc q1m_cpu)")" "— (client CPU ratios)"
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "the same, one Tokio worker" \
    "$(cpu_cell q1m)" "$(cpu_cell o1w)" "$(cpu_cell p1w)" "$(ratio_or "$(medc o1w_cpu)" "$(medc q1m_cpu)")" \
    "$(ratio_or "$(medc p1w_cpu)" "$(medc q1m_cpu)")" "— (client CPU ratios)"
  BOUND=$(awk -v n="$(nproc)" -v c="$(medc c1m_cpu)" -v s="$(medc c1m_srv)" 'BEGIN{printf "%.0f", n * 1e6 / (c + s)}')
  printf '| %s | %s | | | %s | | %s |\n' "the machine's bound at 1 MiB: curl's CPU per range received / nginx's per MiB served (µs), and the requests/s its $(nproc) CPUs allow a client that only receives (curl in the QEMU column)" \
    "$(cpu_cell c1m) → $BOUND" "$(ratio "$BOUND" "$(med q1m)") (bound / QEMU)" "—"
  row "4 KiB random read, cached (IOPS; QEMU re-reads)" "$(med qc4k)" "$(med oc4k)" "$(med pc4k)" "no request to the store (tested)"
  row "1 MiB random read, cached (IOPS; QEMU re-reads)" "$(med qc1m)" "$(med oc1m)" "$(med pc1m)" "no request to the store (tested)"
  row "4 KiB random read, later process, warm cache file (IOPS; QEMU re-reads)" "$(med qc4k)" "$(med of4k)" "$(med pf4k)" "no request to the store (tested)"
  row "1 MiB random read, later process, warm cache file (IOPS; QEMU re-reads)" "$(med qc1m)" "$(med of1m)" "$(med pf1m)" "no request to the store (tested)"
  printf '| %s | %s | | %s | | %s | %s |\n' "sequential read of 1 GiB, 1 MiB requests, vs \`curl -o /dev/null\` (MiB/s; curl in the QEMU column)" \
    "$(med curl)" "$(med oseq)" "$(ratio "$(med oseq)" "$(med curl)")" "— (the ≥ 0.8 × target is convert's)"
  printf '| %s | %s | %s | | %s | | %s |\n' "convert 1 GiB to raw on tmpfs vs curl to a tmpfs file (MiB/s; curl in the QEMU column)" \
    "$(med curlshm)" "$(med oconv)" "$(ratio "$(med oconv)" "$(med curlshm)")" "≥ 0.8 × curl"
  printf '| %s | %s | %s | | %s | | %s |\n' "convert 1 GiB to raw on tmpfs, qemu-img convert -m 1 (MiB/s)" "$(med qconv)" "$(med oconv)" \
    "$(ratio "$(med oconv)" "$(med qconv)")" "—"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) CPUs, $(uname -r), $(qemu-img --version | head -1), nginx $("$NGINX" -v 2>&1 | sed 's|.*/||'), medians of $REPS interleaved runs, each contender started after $SETTLE s of quiet; qcow2-remote defaults (64 KiB blocks, 32 MiB cache, 16 MiB read-ahead, requests up to 4 MiB) but for the cached rows (a 1.5 GiB cache); QEMU's curl driver with its defaults (256 KiB readahead). \"hung\": qemu-img bench did not finish within 300 s."
)
echo "$TABLE"
if [ "${RB_NO_WRITE:-0}" != 1 ]; then
  python3 - "$TABLE" <<'PY'
import re, sys
table = sys.argv[1]
path = "BENCHMARKS.md"
text = open(path).read()
begin, end = "<!-- BEGIN remote.sh -->", "<!-- END remote.sh -->"
block = f"{begin}\n{table}\n{end}"
if begin in text:
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
else:
    text += "\n## Remote base images (issue 21)\n\n`bash benches/remote.sh`: see the script's header for what each row does.\n\n" + block + "\n"
open(path, "w").write(text)
PY
  log "BENCHMARKS.md updated"
fi
