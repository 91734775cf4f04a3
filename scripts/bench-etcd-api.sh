#!/usr/bin/env bash
# Atoll's etcd API vs etcd, through the very same etcd client (../shared/tools/kvbench):
#   scripts/bench-etcd-api.sh OUT.jsonl [KVBENCH]
# Atoll: 1 PD + 3 storage nodes (scripts/local-cluster.sh), kvbench's key space pre-split into
# 6 regions so that their leaders spread over the stores; kvbench dials the three stores. etcd:
# 3 members of Debian's etcd-server (kvbench's scripts/etcd-local.sh). Same flags for both:
# --conns 3, 16-byte keys, 256-byte values, DUR seconds after 1 s of warm-up. Rows: put at 64
# and 256 clients, linearizable get at 64, range of 100 keys at 16, CAS txn on 1 counter at 16.
# etcd's reads run after compaction + defragmentation (kvbench README, pitfall 1).
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

rows() { # SYSTEM ENDPOINTS [PRE_READ_COMMAND...]
  local sys=$1 ep=$2; shift 2
  local c=(--endpoints "$ep" --conns 3 --duration "$dur" --warmup 1 --key-size 16 --val-size 256)
  want put64 && $kvb put --clients 64 "${c[@]}" | label "$sys" put64 | tee -a "$out"
  want put256 && $kvb put --clients 256 "${c[@]}" | label "$sys" put256 | tee -a "$out"
  if want get64; then
    $kvb put --endpoints "$ep" --conns 3 --clients 64 --total 10000 --key-size 16 --val-size 256 >/dev/null
    [ $# -gt 0 ] && "$@" >/dev/null
    $kvb get --clients 64 --no-preload "${c[@]}" | label "$sys" get64 | tee -a "$out"
  fi
  if want range16; then
    [ $# -gt 0 ] && "$@" >/dev/null
    $kvb range --clients 16 --range-len 100 "${c[@]}" | label "$sys" range16 | tee -a "$out"
  fi
  want txn16 && $kvb txn --clients 16 --counters 1 "${c[@]}" | label "$sys" txn16 | tee -a "$out"
  return 0
}

if [ "${SKIP_ATOLL:-0}" != 1 ]; then
  scripts/local-cluster.sh start 3 "$dir"
  trap 'scripts/local-cluster.sh stop "$dir"' EXIT
  # kvbench's keys: /kvb/k0000000000 .. /kvb/k0000009999 (put, get), /kvb/r... (range),
  # /kvb/c... (txn). Six regions: the key space in four, range and counters in their own.
  $K split /kvb/k0000002500 /kvb/k0000005000 /kvb/k0000007500 /kvb/l /kvb/r >/dev/null
  sleep 15 # PD balances the leaders
  rows atoll 127.0.0.1:20160,127.0.0.1:20161,127.0.0.1:20162
  scripts/local-cluster.sh stop "$dir"
  trap - EXIT
fi

if [ "${SKIP_ETCD:-0}" != 1 ]; then
  pids=$("$kvbdir/scripts/etcd-local.sh" 3 "$ebase")
  trap 'kill $pids 2>/dev/null || true' EXIT
  sleep 3
  EP3=127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379
  rows etcd "$EP3" "$kvbdir/scripts/etcd-compact-defrag.sh" "$EP3"
  kill $pids 2>/dev/null || true
  trap - EXIT
  for _ in $(seq 1 40); do kill -0 $pids 2>/dev/null || break; sleep 0.5; done
fi
rm -rf "$dir" "$ebase"
