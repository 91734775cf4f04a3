#!/usr/bin/env bash
# Watch at scale, Atoll vs etcd, through the same etcd-API client (kvctl watch-bench, gRPC KV
# and Watch): scripts/bench-watch.sh OUT.jsonl
# Atoll: 1 PD + 3 storage nodes (scripts/local-cluster.sh), the watched prefix wb/ pre-split into
# 16 regions; etcd: 3 members of Debian's etcd-server (kvbench's scripts/etcd-local.sh).
# Rows, for each system (DUR seconds each, default 15):
#   put64          64 writers as fast as they go, no watcher
#   put64-w1000    the same with 1000 watchers on the prefix (one stream each)
#   rate500-w1000  500 puts/s, 1000 watchers: delivery latency (put sent -> event received)
#   stall60        1 watcher + 1 that reads nothing for 60 s while 500 puts/s go on; the
#                  servers' RSS before and at the end of the stall (rss_before_kb, rss_after_kb)
#   ONLY=regex (row names)  SKIP_ETCD=1  SKIP_ATOLL=1
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUT.jsonl}
kvbdir=${KVBENCH_DIR:-../shared/tools/kvbench}
dur=${DUR:-15}
only=${ONLY:-.}
K=target/release/kvctl
dir=$(mktemp -d /tmp/atoll-wbench.XXXX)
ebase=$(mktemp -d /tmp/etcd-wbench.XXXX)

label() { sed "s/^{/{\"system\":\"$1\",\"run\":\"$2\",/"; }
want() { [[ "$1" =~ $only ]]; }
rss() { ps -o rss= -C "$1" | awk '{s+=$1} END {print s+0}'; }

rows() { # SYSTEM ENDPOINTS PROCESS_NAME
  local sys=$1 ep=$2 proc=$3
  local b=($K watch-bench --endpoints "$ep" --duration "$dur")
  want put64 && "${b[@]}" --watchers 0 --clients 64 --rate 0 | label "$sys" put64 | tee -a "$out"
  want put64-w1000 && "${b[@]}" --watchers 1000 --clients 64 --rate 0 | label "$sys" put64-w1000 | tee -a "$out"
  want rate500-w1000 && "${b[@]}" --watchers 1000 --clients 16 --rate 500 | label "$sys" rate500-w1000 | tee -a "$out"
  if want stall60; then
    local before after
    before=$(rss "$proc")
    ( sleep 58; rss "$proc" > "$dir/rss_after" ) &
    $K watch-bench --endpoints "$ep" --duration 60 --watchers 1 --clients 16 --rate 500 --stall 60 \
      | label "$sys" stall60 | sed "s/^{/{\"rss_before_kb\":$before,/" > "$dir/stall.json"
    wait
    after=$(cat "$dir/rss_after")
    sed "s/^{/{\"rss_after_kb\":$after,/" "$dir/stall.json" | tee -a "$out"
  fi
  return 0
}

if [ "${SKIP_ATOLL:-0}" != 1 ]; then
  scripts/local-cluster.sh start 3 "$dir"
  trap 'scripts/local-cluster.sh stop "$dir"' EXIT
  $K split $(for i in $(seq 1 15); do printf "wb/%010d " $((i * 5000)); done) >/dev/null
  sleep 15 # PD balances the leaders
  rows atoll 127.0.0.1:20160,127.0.0.1:20161,127.0.0.1:20162 storage-node
  scripts/local-cluster.sh stop "$dir"
  trap - EXIT
fi

if [ "${SKIP_ETCD:-0}" != 1 ]; then
  pids=$("$kvbdir/scripts/etcd-local.sh" 3 "$ebase")
  trap 'kill $pids 2>/dev/null || true' EXIT
  sleep 3
  rows etcd 127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379 etcd
  kill $pids 2>/dev/null || true
  trap - EXIT
  for _ in $(seq 1 40); do kill -0 $pids 2>/dev/null || break; sleep 0.5; done
fi
rm -rf "$dir" "$ebase"
