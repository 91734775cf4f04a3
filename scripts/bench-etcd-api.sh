#!/usr/bin/env bash
# Atoll's etcd API vs etcd, through the very same etcd client (../shared/tools/kvbench):
#   scripts/bench-etcd-api.sh OUT.jsonl [KVBENCH]
# Atoll: 1 PD + 3 storage nodes (scripts/local-cluster.sh), kvbench's key space pre-split into
# 6 regions so that their leaders spread over the stores; kvbench dials the three stores. etcd:
# 3 members of Debian's etcd-server (kvbench's scripts/etcd-local.sh). Same flags for both:
# --conns 3, 16-byte keys, 256-byte values, DUR seconds after 1 s of warm-up. Rows: put at 1, 64
# and 256 clients, linearizable get at 64, range of 100 keys at 16, CAS txn on 1 counter at 16.
# etcd's reads run after compaction + defragmentation (kvbench README, pitfall 1).
# Each line also carries the servers' CPU over the measured window (after the warm-up until
# kvbench exits; utime + stime of every server process from /proc/PID/stat): "server_cpu_s",
# "cpu_us_per_op" (server CPU-microseconds per counted operation) and "client_cpu_s" (kvbench).
#   DUR=15  ONLY=regex (run names)  SKIP_ETCD=1  SKIP_ATOLL=1
# Needs `etcd` on PATH and a built kvbench (default /tmp/kvbench/target/release/kvbench:
# cp -r ../shared/tools/kvbench /tmp/kvbench && cargo build --release there; it needs protoc).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUT.jsonl [KVBENCH]}
kvb=${2:-/tmp/kvbench/target/release/kvbench}
kvbdir=${KVBENCH_DIR:-../shared/tools/kvbench}
dur=${DUR:-15}
only=${ONLY:-.}
K=target/release/kvctl
dir=$(mktemp -d /tmp/atoll-bench.XXXX)
ebase=$(mktemp -d /tmp/etcd-bench.XXXX)

label() { sed "s/^{/{\"system\":\"$1\",\"run\":\"$2\",/"; }
want() { [[ "$1" =~ $only ]]; }
SERVER_PIDS="" # the processes whose CPU each row reports
hz=$(getconf CLK_TCK)
ticks() { # PID... -> utime + stime of them all, in clock ticks
  local t=0 p f
  for p in "$@"; do
    # fields after the ")" of the command name: utime is the 12th, stime the 13th
    f=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null) || continue
    set -- $f
    t=$((t + ${12} + ${13}))
  done
  echo $t
}
measured() { # SYSTEM RUN KVBENCH-ARGS... : one labelled line with the CPU figures
  local sys=$1 run=$2; shift 2
  local tmp s0 s1 c0 c1
  tmp=$(mktemp)
  $kvb "$@" >"$tmp" &
  local kp=$!
  sleep 1 # kvbench's warm-up
  s0=$(ticks $SERVER_PIDS); c0=$(ticks $kp)
  while kill -0 $kp 2>/dev/null && [ "$(cut -d' ' -f3 /proc/$kp/stat 2>/dev/null)" != Z ]; do
    x=$(ticks $kp); [ "$x" -gt 0 ] && c1=$x # 0: it just exited
    sleep 0.2
  done
  s1=$(ticks $SERVER_PIDS)
  wait $kp
  python3 - "$tmp" "$sys" "$run" $((s1 - s0)) $((c1 - c0)) "$hz" <<'PY' | tee -a "$out"
import json, sys
path, system, run, server, client, hz = sys.argv[1:]
r = json.loads(open(path).read().strip().splitlines()[-1])
server_s, client_s = int(server) / int(hz), int(client) / int(hz)
line = {"system": system, "run": run, **r, "server_cpu_s": round(server_s, 2),
        "client_cpu_s": round(client_s, 2),
        "cpu_us_per_op": round(server_s * 1e6 / r["ops"], 1) if r.get("ops") else None}
print(json.dumps(line))
PY
  rm -f "$tmp"
}

rows() { # SYSTEM ENDPOINTS [PRE_READ_COMMAND...]
  local sys=$1 ep=$2; shift 2
  local c=(--endpoints "$ep" --conns 3 --duration "$dur" --warmup 1 --key-size 16 --val-size 256)
  want put1 && measured "$sys" put1 put --clients 1 "${c[@]}"
  want put64 && measured "$sys" put64 put --clients 64 "${c[@]}"
  want put256 && measured "$sys" put256 put --clients 256 "${c[@]}"
  if want get64; then
    $kvb put --endpoints "$ep" --conns 3 --clients 64 --total 10000 --key-size 16 --val-size 256 >/dev/null
    [ $# -gt 0 ] && "$@" >/dev/null
    measured "$sys" get64 get --clients 64 --no-preload "${c[@]}"
  fi
  if want range16; then
    [ $# -gt 0 ] && "$@" >/dev/null
    measured "$sys" range16 range --clients 16 --range-len 100 "${c[@]}"
  fi
  want txn16 && measured "$sys" txn16 txn --clients 16 --counters 1 "${c[@]}"
  return 0
}

if [ "${SKIP_ATOLL:-0}" != 1 ]; then
  scripts/local-cluster.sh start 3 "$dir"
  trap 'scripts/local-cluster.sh stop "$dir"' EXIT
  # kvbench's keys: /kvb/k0000000000 .. /kvb/k0000009999 (put, get), /kvb/r... (range),
  # /kvb/c... (txn). Six regions: the key space in four, range and counters in their own.
  $K split /kvb/k0000002500 /kvb/k0000005000 /kvb/k0000007500 /kvb/l /kvb/r >/dev/null
  sleep 15 # PD balances the leaders
  SERVER_PIDS=$(cat "$dir"/*.pid)
  rows atoll 127.0.0.1:20160,127.0.0.1:20161,127.0.0.1:20162
  scripts/local-cluster.sh stop "$dir"
  trap - EXIT
fi

if [ "${SKIP_ETCD:-0}" != 1 ]; then
  pids=$("$kvbdir/scripts/etcd-local.sh" 3 "$ebase")
  trap 'kill $pids 2>/dev/null || true' EXIT
  sleep 3
  SERVER_PIDS=$pids
  EP3=127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379
  rows etcd "$EP3" "$kvbdir/scripts/etcd-compact-defrag.sh" "$EP3"
  kill $pids 2>/dev/null || true
  trap - EXIT
  for _ in $(seq 1 40); do kill -0 $pids 2>/dev/null || break; sleep 0.5; done
fi
rm -rf "$dir" "$ebase"
