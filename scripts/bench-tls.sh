#!/usr/bin/env bash
# The cost of TLS (docs/security.md): `kvctl bench put` against the same local cluster shape
# (scripts/local-cluster.sh: 1 PD + 3 storage nodes, 20 regions: 16 over kvctl bench's keys, 4 over kvbench's) without TLS
# and with mutual TLS on every link, one after the other, REPEATS times:
#   scripts/bench-tls.sh OUT.jsonl [REPEATS]
#   DUR=15 (seconds per run)  CLIENTS="64 256"
# and, through etcd's own client, kvbench put at 64 clients against the three stores' etcd API
# (../shared/tools/kvbench has no TLS flags: a copy with scripts/kvbench-tls.patch applied,
# which adds etcdctl's --cacert/--cert/--key, is built into KVBENCH_TLS_DIR, default
# /tmp/kvbench-tls; SKIP_KVBENCH=1 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUT.jsonl [REPEATS]}
repeats=${2:-2}
dur=${DUR:-15}
K=target/release/kvctl
kvbdir=${KVBENCH_TLS_DIR:-/tmp/kvbench-tls}
kvb=$kvbdir/target/release/kvbench
if [ "${SKIP_KVBENCH:-0}" != 1 ] && [ ! -x "$kvb" ]; then
  rm -rf "$kvbdir" && cp -r ../shared/tools/kvbench "$kvbdir" && rm -rf "$kvbdir/target"
  patch -d "$kvbdir" -p1 <scripts/kvbench-tls.patch >/dev/null
  protoc=$(ls ~/.cargo/registry/src/*/protoc-bin-vendored-linux-x86_64-*/bin/protoc 2>/dev/null | head -1)
  (cd "$kvbdir" && PROTOC=${PROTOC:-$protoc} cargo build --release -q)
fi
certs=$(mktemp -d /tmp/atoll-bench-certs.XXXX)
$K cert --dir "$certs" >/dev/null
ktls=(--cacert "$certs/ca.pem" --cert "$certs/client.pem" --key "$certs/client-key.pem")

run() { # MODE(plain|tls) REPEAT
  local mode=$1 r=$2 dir kflags=()
  dir=$(mktemp -d /tmp/atoll-bench-tls.XXXX)
  if [ "$mode" = tls ]; then
    ATOLL_LOCAL_TLS=$certs scripts/local-cluster.sh start 3 "$dir" >/dev/null
    kflags=("${ktls[@]}")
  else
    scripts/local-cluster.sh start 3 "$dir" >/dev/null
  fi
  trap 'scripts/local-cluster.sh stop "$dir"' EXIT
  $K "${kflags[@]}" split $(for i in $(seq 1 15); do printf "bench/%010d " $((i * 625)); done) \
    /kvb/k0000002500 /kvb/k0000005000 /kvb/k0000007500 /kvb/l >/dev/null
  sleep 15 # PD balances the leaders
  for c in ${CLIENTS:-64 256}; do
    $K "${kflags[@]}" bench put --clients "$c" --duration "$dur" --warmup 1 --key-size 16 \
      --value-size 256 --keys 10000 |
      sed "s/^{/{\"tls\":$([ "$mode" = tls ] && echo true || echo false),\"repeat\":$r,/" | tee -a "$out"
  done
  if [ "${SKIP_KVBENCH:-0}" != 1 ]; then
    local eflags=()
    [ "$mode" = tls ] && eflags=("${ktls[@]}")
    $kvb put --endpoints 127.0.0.1:20160,127.0.0.1:20161,127.0.0.1:20162 --conns 3 --clients 64 \
      --duration "$dur" --warmup 1 --key-size 16 --val-size 256 "${eflags[@]}" |
      sed "s/^{/{\"tool\":\"kvbench\",\"tls\":$([ "$mode" = tls ] && echo true || echo false),\"repeat\":$r,/" | tee -a "$out"
  fi
  scripts/local-cluster.sh stop "$dir"
  trap - EXIT
  sleep 2
  rm -rf "$dir"
}

for r in $(seq 1 "$repeats"); do
  run plain "$r"
  run tls "$r"
done
rm -rf "$certs"
