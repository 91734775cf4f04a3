#!/usr/bin/env bash
# The cost of TLS (docs/security.md): `kvctl bench put` against the same local cluster shape
# (scripts/local-cluster.sh: 1 PD + 3 storage nodes, 16 regions over the key space) without TLS
# and with mutual TLS on every link, one after the other, REPEATS times:
#   scripts/bench-tls.sh OUT.jsonl [REPEATS]
#   DUR=15 (seconds per run)  CLIENTS="64 256"
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUT.jsonl [REPEATS]}
repeats=${2:-2}
dur=${DUR:-15}
K=target/release/kvctl
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
  $K "${kflags[@]}" split $(for i in $(seq 1 15); do printf "bench/%010d " $((i * 625)); done) >/dev/null
  sleep 15 # PD balances the leaders
  for c in ${CLIENTS:-64 256}; do
    $K "${kflags[@]}" bench put --clients "$c" --duration "$dur" --warmup 1 --key-size 16 \
      --value-size 256 --keys 10000 |
      sed "s/^{/{\"tls\":$([ "$mode" = tls ] && echo true || echo false),\"repeat\":$r,/" | tee -a "$out"
  done
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
