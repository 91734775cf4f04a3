#!/usr/bin/env bash
# Atoll vs etcd, side by side on this machine (docs/benchmarks.md):
#   scripts/bench-compare.sh OUT.jsonl [KVBENCH]
# Atoll: 1 PD + 3 storage nodes (scripts/local-cluster.sh), pre-split into 16 regions, driven
# by `kvctl bench`. etcd: 3 members of Debian's etcd-server (../shared/tools/kvbench's
# scripts/etcd-local.sh), driven by kvbench with --conns 3. Same key/value sizes and
# durations. Needs `etcd` on PATH and a built kvbench (default /tmp/kvbench/target/release/kvbench).
#   DUR=15 (seconds per run)  ONLY=regex (run names)  SKIP_ETCD=1  SKIP_ATOLL=1
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
EP3=127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379

label() { sed "s/^{/{\"system\":\"$1\",\"run\":\"$2\",/"; }
want() { [[ "$1" =~ $only ]]; }

if [ "${SKIP_ATOLL:-0}" != 1 ]; then
  scripts/local-cluster.sh start 3 "$dir"
  trap 'scripts/local-cluster.sh stop "$dir"' EXIT
  # 16 regions over the bench key space (bench/0000000000 .. bench/0000009999).
  $K split $(for i in $(seq 1 15); do printf "bench/%010d " $((i * 625)); done) >/dev/null
  sleep 15 # PD balances the leaders
  common=(--duration "$dur" --warmup 1 --key-size 16 --value-size 256 --keys 10000)
  want put64 && $K bench put --clients 64 "${common[@]}" | label atoll put64 | tee -a "$out"
  want put256 && $K bench put --clients 256 "${common[@]}" | label atoll put256 | tee -a "$out"
  want get64 && $K bench get --clients 64 "${common[@]}" | label atoll get64 | tee -a "$out"
  want txn1 && $K bench txn --clients 16 --keys 1 --duration "$dur" --warmup 1 | label atoll txn1 | tee -a "$out"
  want txn16 && $K bench txn --clients 16 --keys 16 --duration "$dur" --warmup 1 | label atoll txn16 | tee -a "$out"
  scripts/local-cluster.sh stop "$dir"
  trap - EXIT
fi

if [ "${SKIP_ETCD:-0}" != 1 ]; then
  pids=$("$kvbdir/scripts/etcd-local.sh" 3 "$ebase")
  trap 'kill $pids 2>/dev/null || true' EXIT
  sleep 3
  c=(--endpoints "$EP3" --conns 3 --duration "$dur" --warmup 1 --key-size 16 --val-size 256)
  want put64 && $kvb put --clients 64 "${c[@]}" | label etcd put64 | tee -a "$out"
  want put256 && $kvb put --clients 256 "${c[@]}" | label etcd put256 | tee -a "$out"
  if want get64; then
    # Load the key space, then compact and defragment: etcd 3.4's reads slow down after write
    # bursts (kvbench README, pitfall 1), so its reads are measured "fresh", on loaded keys.
    $kvb put --endpoints "$EP3" --conns 3 --clients 64 --total 10000 --key-size 16 --val-size 256 >/dev/null
    "$kvbdir/scripts/etcd-compact-defrag.sh" "$EP3" >/dev/null
    $kvb get --clients 64 --no-preload "${c[@]}" | label etcd get64 | tee -a "$out"
  fi
  want txn1 && $kvb txn --clients 16 --counters 1 "${c[@]}" | label etcd txn1 | tee -a "$out"
  want txn16 && $kvb txn --clients 16 --counters 16 "${c[@]}" | label etcd txn16 | tee -a "$out"
  kill $pids 2>/dev/null || true
  trap - EXIT
  for _ in $(seq 1 40); do kill -0 $pids 2>/dev/null || break; sleep 0.5; done
fi
rm -rf "$dir" "$ebase"
