#!/usr/bin/env bash
# Leases at scale, Atoll vs etcd, through the same etcd-API client (kvctl lease-bench, gRPC
# Lease service only): scripts/bench-lease.sh [OUT.jsonl]
# Atoll: 1 PD + 3 storage nodes (scripts/local-cluster.sh, ports 2379/20160-20162); etcd: 3 members
# of Debian's etcd-server (kvbench's scripts/etcd-local.sh, client ports 12379/22379/32379), one
# after the other, nothing else started. For each: grant LEASES leases (TTL seconds each), keep
# every one alive once a second over LEASES/1000 KeepAlive streams spread over the three
# endpoints for DUR seconds, revoke them. The CPU of each server process is measured over the
# keep-alive phase (utime + stime from /proc/PID/stat, by lease-bench --cpu-pids), in % of one
# core, with its RSS at the end of the phase. One labelled JSON line per system goes to OUT.jsonl
# (if given), and a table to stdout with the machine's load (uptime) before each run.
#   LEASES=100000  TTL=10  DUR=60  STREAMS=0 (0: one per 1000 leases)  CONCURRENCY=64 (grants in
#   flight)  SKIP_ETCD=1  SKIP_ATOLL=1  KVBENCH_DIR=../shared/tools/kvbench (for etcd-local.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-}
kvbdir=${KVBENCH_DIR:-../shared/tools/kvbench}
leases=${LEASES:-100000}
ttl=${TTL:-10}
dur=${DUR:-60}
streams=${STREAMS:-0}
conc=${CONCURRENCY:-64}
K=target/release/kvctl
dir=$(mktemp -d /tmp/atoll-lbench.XXXX)
ebase=$(mktemp -d /tmp/etcd-lbench.XXXX)
lines=$dir/lines.jsonl
: >"$lines"

# SYSTEM ENDPOINTS PIDS NAMES: one lease-bench run, labelled with the process names and the load.
run() {
  local sys=$1 ep=$2 pids=$3 names=$4 load
  load=$(uptime | sed 's/.*load average: //')
  echo "# $sys: $(uptime)" >&2
  $K lease-bench --endpoints "$ep" --leases "$leases" --ttl "$ttl" --duration "$dur" \
    --streams "$streams" --concurrency "$conc" --cpu-pids "$pids" \
    | jq -c --arg sys "$sys" --arg names "$names" --arg pids "$pids" --arg load "$load" \
      '{system: $sys, load_before: $load, processes: ([$names, $pids] | map(split(",")) | transpose | map({(.[0]): .[1]}) | add)} + .' \
    | tee -a "$lines"
  if [ -n "$out" ]; then tail -n 1 "$lines" >>"$out"; fi
}

if [ "${SKIP_ATOLL:-0}" != 1 ]; then
  scripts/local-cluster.sh start 3 "$dir/atoll" >&2
  trap 'scripts/local-cluster.sh stop "$dir/atoll"' EXIT
  sleep 10 # PD balances the leaders
  pids=$(cat "$dir/atoll/pd1.pid" "$dir"/atoll/store{1,2,3}.pid | paste -sd,)
  run atoll 127.0.0.1:20160,127.0.0.1:20161,127.0.0.1:20162 "$pids" pd,store1,store2,store3
  scripts/local-cluster.sh stop "$dir/atoll"
  trap - EXIT
  sleep 2
fi

if [ "${SKIP_ETCD:-0}" != 1 ]; then
  epids=$("$kvbdir/scripts/etcd-local.sh" 3 "$ebase")
  trap 'kill $epids 2>/dev/null || true' EXIT
  for _ in $(seq 1 60); do
    ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:12379 endpoint health >/dev/null 2>&1 && break
    sleep 0.5
  done
  run etcd 127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379 "$(echo $epids | tr ' ' ,)" m1,m2,m3
  kill $epids 2>/dev/null || true
  trap - EXIT
  for _ in $(seq 1 40); do kill -0 $epids 2>/dev/null || break; sleep 0.5; done
fi

echo
printf '%-6s %7s %8s %11s %7s %7s %7s %8s  %s\n' system leases grant/s keepalive/s lost p50_ms p99_ms client% \
  "CPU % of one core per server process (RSS MiB), keep-alive phase"
jq -r '. as $r | [.system, .leases, (.grant_per_sec | floor), (.keepalive_per_sec | floor), .lost,
        .p50_ms, .p99_ms, .client_cpu_pct,
        ([.processes | to_entries[] | "\(.key) \($r.cpu_pct[.value]) (\(($r.rss_kb[.value] // 0) / 1024 | floor))"]
         | join(", "))] | @tsv' "$lines" |
  while IFS=$'\t' read -r sys n g k lost p50 p99 cl procs; do
    printf '%-6s %7s %8s %11s %7s %7s %7s %8s  %s\n' "$sys" "$n" "$g" "$k" "$lost" "$p50" "$p99" "$cl" "$procs"
  done
rm -rf "$ebase"
[ -z "$out" ] || echo "raw lines: $out"
rm -rf "$dir"
