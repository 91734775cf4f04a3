#!/usr/bin/env bash
# The scale benchmark (issue 17): 3 PD members + 3 storage nodes from target/release, split into
# REGIONS regions (3 replicas each), then, idle:
#   - CPU of each store and of each PD member over ATOLL_SCALE_IDLE_SECS (default 60) seconds,
#   - resident memory per store (and per region) and of the PD leader,
#   - region heartbeats per second PD received while idle,
#   - a store killed (-9) and restarted: seconds until it answers a read on its port,
#   - the PD leader killed (-9): seconds until routing for a key is answered by the new one.
# Prints progress on stderr and one JSON line on stdout. Run it on a quiet machine.
#   scripts/bench-scale.sh [REGIONS]        # default 10000; 100000 by hand
# Ports: PD 2379/2479/2579 (peer +1, status 23790+i), stores 20160-20162 (status 20180-20182);
# ATOLL_SCALE_DIR (default /tmp/atoll-scale) holds data and logs; removed first.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release
regions=${1:-10000}
idle=${ATOLL_SCALE_IDLE_SECS:-60}
dir=${ATOLL_SCALE_DIR:-/tmp/atoll-scale}
batch=500
pds="127.0.0.1:2379,127.0.0.1:2479,127.0.0.1:2579"
log() { echo "[bench-scale $(date +%T)] $*" >&2; }
now() { date +%s.%N; }
calc() { awk "BEGIN {printf \"%.2f\", $1}"; }
declare -A pid
cleanup() { for p in "${pid[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
[ -x "$bin/pd-server" ] && [ -x "$bin/storage-node" ] && [ -x "$bin/kvctl" ] ||
  { echo "build first: cargo build --release --workspace --all-targets" >&2; exit 1; }
rm -rf "$dir"; mkdir -p "$dir"
kv() { "$bin/kvctl" --pd "$pds" --timeout 10 "$@"; }

start_pd() {
  local i=$1 port=$((2379 + 100 * ($1 - 1)))
  "$bin/pd-server" --name "pd$i" --data-dir "$dir/pd$i" --client-addr "127.0.0.1:$port" \
    --peer-addr "127.0.0.1:$((port + 1))" --status-addr "127.0.0.1:$((23790 + i))" \
    --initial-cluster "pd1=127.0.0.1:2380,pd2=127.0.0.1:2480,pd3=127.0.0.1:2580" \
    >>"$dir/pd$i.log" 2>&1 &
  pid[pd$i]=$!
}
start_store() {
  local i=$1
  "$bin/storage-node" --pd "$pds" --data-dir "$dir/store$i" --addr "127.0.0.1:$((20159 + i))" \
    --status-addr "127.0.0.1:$((20179 + i))" >>"$dir/store$i.log" 2>&1 &
  pid[store$i]=$!
}
# CPU seconds (user + system) a process has used.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
# The PD member that leads (1-3), from kvctl members.
pd_leader() {
  kv --output json members | python3 -c '
import json, sys
for m in json.load(sys.stdin)["members"]:
    if m["is_leader"]:
        print({"2379": 1, "2479": 2, "2579": 3}[m["client_addr"].rsplit(":", 1)[1]])'
}
metric() { # metric STATUS_ADDR NAME: its value, 0 if absent
  curl -s "http://$1/metrics" | awk -v n="$2" '$1 == n {print $2; f = 1} END {if (!f) print 0}'
}

for i in 1 2 3; do start_pd "$i"; done
for i in 1 2 3; do start_store "$i"; done
for _ in $(seq 1 200); do kv put __ready 1 >/dev/null 2>&1 && break; sleep 0.3; done
kv put __ready 1 >/dev/null
# Split only once the first region has its 3 replicas: its splits inherit them.
for _ in $(seq 1 300); do
  peers=$(kv --output json regions | python3 -c 'import json, sys; print(min(len(r["peers"]) for r in json.load(sys.stdin)["regions"]))')
  [ "$peers" -ge 3 ] && break
  sleep 0.5
done
log "cluster up; splitting into $regions regions ($batch split keys per call)"
t0=$(now)
made=1
while [ "$made" -lt "$regions" ]; do
  n=$(( regions - made < batch ? regions - made : batch ))
  keys=$(seq "$made" $((made + n - 1)) | awk '{printf "scale/%08d ", $1}')
  # shellcheck disable=SC2086
  for try in 1 2 3 4 5; do kv split $keys >/dev/null 2>"$dir/split.err" && break
    [ "$try" = 5 ] && { cat "$dir/split.err" >&2; exit 1; }; sleep 1; done
  made=$((made + n))
  [ $((made % 5000)) -lt "$batch" ] && log "$made regions"
done
split_secs=$(calc "$(now) - $t0")
log "split in ${split_secs}s; waiting for a leader in PD's view for each region"
led() { kv --output json stores | python3 -c '
import json, sys
s = json.load(sys.stdin)["stores"]
print(sum(x["leader_count"] for x in s), min(x["region_count"] for x in s))'; }
for _ in $(seq 1 600); do
  read -r leaders min_peers < <(led)
  [ "$leaders" -ge "$regions" ] && [ "$min_peers" -ge "$regions" ] && break
  sleep 1
done
log "PD sees $leaders leaders, every store >= $min_peers peers; settling 20 s (hibernation)"
sleep 20

leader=$(pd_leader)
hb0=$(metric "127.0.0.1:$((23790 + leader))" atoll_pd_region_heartbeats_total)
declare -A c0
for k in "${!pid[@]}"; do c0[$k]=$(cpu "${pid[$k]}"); done
log "measuring ${idle}s idle"
sleep "$idle"
declare -A pct
for k in "${!pid[@]}"; do
  pct[$k]=$(calc "($(cpu "${pid[$k]}") - ${c0[$k]}) * 100 / $idle")
done
hb1=$(metric "127.0.0.1:$((23790 + leader))" atoll_pd_region_heartbeats_total)
hb_per_sec=$(calc "($hb1 - $hb0) / $idle")
rss1=$(rss_mib "${pid[store1]}"); rss2=$(rss_mib "${pid[store2]}"); rss3=$(rss_mib "${pid[store3]}")
pd_rss=$(rss_mib "${pid[pd$leader]}")
per_region_kib=$(calc "($rss1 + $rss2 + $rss3) * 1024 / 3 / $regions")
pd_cpu=${pct[pd$leader]}
log "idle: stores ${pct[store1]}/${pct[store2]}/${pct[store3]}% PD leader ${pd_cpu}%, $hb_per_sec heartbeats/s"

# A store restart: from its start until it answers a read on its own port.
log "restarting store 3"
kill -9 "${pid[store3]}"; wait "${pid[store3]}" 2>/dev/null || true
t0=$(now); start_store 3
body='{"key":"'$(printf 'scale/%08d' $((regions / 2)) | base64 -w0)'"}'
for _ in $(seq 1 1200); do
  curl -sf -m 2 -X POST "http://127.0.0.1:20162/v3/kv/range" -d "$body" >/dev/null 2>&1 && break
  sleep 0.05
done
restart_secs=$(calc "$(now) - $t0")
log "store 3 served a read ${restart_secs}s after starting"

# PD failover: the leader killed; time until a fresh client's routed read succeeds.
leader=$(pd_leader)
others=$(for i in 1 2 3; do if [ "$i" != "$leader" ]; then printf '127.0.0.1:%d,' $((2379 + 100 * (i - 1))); fi; done)
log "killing PD leader pd$leader"
kill -9 "${pid[pd$leader]}"; unset "pid[pd$leader]"
t0=$(now)
for _ in $(seq 1 600); do
  "$bin/kvctl" --pd "${others%,}" --timeout 2 --output json get "$(printf 'scale/%08d' $((regions / 3)))" >/dev/null 2>>"$dir/failover.err" && break
  sleep 0.05
done
failover_secs=$(calc "$(now) - $t0")
log "routing answered ${failover_secs}s after the kill"

printf '{"workload":"scale","regions":%d,"split_secs":%s,"idle_secs":%d,"store_cpu_pct":[%s,%s,%s],"pd_leader_cpu_pct":%s,"store_rss_mib":[%s,%s,%s],"store_kib_per_region":%s,"pd_rss_mib":%s,"region_heartbeats_per_sec":%s,"store_restart_to_read_secs":%s,"pd_failover_to_routing_secs":%s}\n' \
  "$regions" "$split_secs" "$idle" "${pct[store1]}" "${pct[store2]}" "${pct[store3]}" \
  "$pd_cpu" "$rss1" "$rss2" "$rss3" "$per_region_kib" "$pd_rss" "$hb_per_sec" \
  "$restart_secs" "$failover_secs"
