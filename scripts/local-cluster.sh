#!/usr/bin/env bash
# A multi-process local cluster from the built binaries (target/release), for benchmarks
# and experiments:
#   scripts/local-cluster.sh start [STORES] [DIR] [extra storage-node flags...]
#   scripts/local-cluster.sh stop [DIR]
# PD listens on 127.0.0.1:2379 (peer 2380); store i on 20160+i (status 20180+i). Other ports:
# ATOLL_LOCAL_PD_PORT (peer: +1), ATOLL_LOCAL_STORE_PORT, ATOLL_LOCAL_STATUS_PORT.
# ATOLL_LOCAL_TLS=CERTDIR: mutual TLS on every link with the files of `kvctl cert --dir CERTDIR`
# (made if CERTDIR has no ca.pem); kvctl then needs
# --cacert CERTDIR/ca.pem --cert CERTDIR/client.pem --key CERTDIR/client-key.pem.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release
cmd=${1:-start}
pd_port=${ATOLL_LOCAL_PD_PORT:-2379}
store_port=${ATOLL_LOCAL_STORE_PORT:-20160}
status_port=${ATOLL_LOCAL_STATUS_PORT:-20180}
case "$cmd" in
  start)
    n=${2:-3}; dir=${3:-/tmp/atoll-local}; shift $(( $# < 3 ? $# : 3 ))
    mkdir -p "$dir"
    tls=(); ktls=()
    if [ -n "${ATOLL_LOCAL_TLS:-}" ]; then
      c=$ATOLL_LOCAL_TLS
      [ -f "$c/ca.pem" ] || "$bin/kvctl" cert --dir "$c" >/dev/null
      tls=(--cert-file "$c/node.pem" --key-file "$c/node-key.pem" --trusted-ca-file "$c/ca.pem"
           --client-cert-auth --peer-cert-allowed-cn atoll-node)
      ktls=(--cacert "$c/ca.pem" --cert "$c/client.pem" --key "$c/client-key.pem")
    fi
    "$bin/pd-server" --name pd1 --data-dir "$dir/pd1" --client-addr "127.0.0.1:$pd_port" --peer-addr "127.0.0.1:$((pd_port + 1))" \
      ${tls[@]+"${tls[@]}"} >"$dir/pd1.log" 2>&1 & echo $! >"$dir/pd1.pid"
    for i in $(seq 0 $((n - 1))); do
      "$bin/storage-node" --pd "127.0.0.1:$pd_port" --data-dir "$dir/store$((i + 1))" \
        --addr "127.0.0.1:$((store_port + i))" --status-addr "127.0.0.1:$((status_port + i))" ${tls[@]+"${tls[@]}"} "$@" \
        >"$dir/store$((i + 1)).log" 2>&1 & echo $! >"$dir/store$((i + 1)).pid"
    done
    for _ in $(seq 1 100); do
      "$bin/kvctl" --pd "127.0.0.1:$pd_port" ${ktls[@]+"${ktls[@]}"} --timeout 2 put __ready 1 >/dev/null 2>&1 && { echo "cluster up in $dir"; exit 0; }
      sleep 0.3
    done
    echo "cluster did not come up; see $dir/*.log" >&2; exit 1 ;;
  stop)
    dir=${2:-/tmp/atoll-local}
    for p in "$dir"/*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; rm -f "$p"; done ;;
  *) echo "usage: $0 start [STORES] [DIR] [flags...] | stop [DIR]" >&2; exit 2 ;;
esac
