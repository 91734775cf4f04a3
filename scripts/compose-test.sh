#!/usr/bin/env bash
# End-to-end test of the Docker Compose deployment (docker-compose.yml), driven from the host:
#   1. builds the image (scripts/docker-build.sh; the binaries must already be built),
#   2. starts pd1-3 and store1-3 under a project name of its own and waits until all six are
#      healthy (at most ATOLL_UP_TIMEOUT seconds, default 90),
#   3. from the host, with target/release/kvctl: put/get/scan, `stores` shows 3 stores up, the
#      published status ports answer; etcdctl (if installed) put/get and endpoint health on the
#      stores' published ports (the endpoints are printed for etcd clients),
#   4. stops one store (SIGKILL by default; the one leading the data's region unless
#      ATOLL_STOP_STORE=storeN) and checks that writes and reads still succeed within 20 s,
#   5. starts store4 with `--profile scale up -d store4` and checks that it registers,
#   6. starts the cluster again with mutual TLS (docker-compose.tls.yml) and checks that put/get
#      with the client certificate works from the host and plaintext is refused,
#   7. always tears everything down (`--profile scale down -v`), also on failure or Ctrl-C.
# Exit status 0 only if every step passed.
#
# Environment (all optional):
#   ATOLL_COMPOSE            compose command (default: docker-compose, else `docker compose`)
#   ATOLL_COMPOSE_PROJECT    project name (default atoll-ci-$$)
#   ATOLL_SKIP_BUILD=1       use the existing image instead of running scripts/docker-build.sh
#   ATOLL_KVCTL              host kvctl binary (default target/release/kvctl)
#   ATOLL_UP_TIMEOUT         seconds for all six services to become healthy (default 90)
#   ATOLL_STOP_MODE          kill (default, SIGKILL) or stop (SIGTERM) for the stopped store
#   ATOLL_STOP_STORE         which store to stop: leader (default) or store1/store2/store3
#   ATOLL_KEEP=1             leave the cluster running at the end (for debugging)
# and every variable docker-compose.yml reads, e.g. on a machine with busy ports or subnets:
#   ATOLL_PD1_PORT=12379 ATOLL_PD2_PORT=12479 ATOLL_PD3_PORT=12579 \
#   ATOLL_STORE1_PORT=30160 ... ATOLL_STORE1_STATUS_PORT=30180 ... ATOLL_NET_PREFIX=172.31.99 \
#     scripts/compose-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$SECONDS
log() { printf '[compose-test %3ds] %s\n' "$((SECONDS - t0))" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

# ---- settings --------------------------------------------------------------------------------
export ATOLL_PD1_PORT=${ATOLL_PD1_PORT:-2379}
export ATOLL_PD2_PORT=${ATOLL_PD2_PORT:-2479}
export ATOLL_PD3_PORT=${ATOLL_PD3_PORT:-2579}
export ATOLL_STORE1_PORT=${ATOLL_STORE1_PORT:-20160}
export ATOLL_STORE2_PORT=${ATOLL_STORE2_PORT:-20161}
export ATOLL_STORE3_PORT=${ATOLL_STORE3_PORT:-20162}
export ATOLL_STORE4_PORT=${ATOLL_STORE4_PORT:-20163}
export ATOLL_STORE1_STATUS_PORT=${ATOLL_STORE1_STATUS_PORT:-20180}
export ATOLL_STORE2_STATUS_PORT=${ATOLL_STORE2_STATUS_PORT:-20181}
export ATOLL_STORE3_STATUS_PORT=${ATOLL_STORE3_STATUS_PORT:-20182}
export ATOLL_STORE4_STATUS_PORT=${ATOLL_STORE4_STATUS_PORT:-20183}
export ATOLL_NET_PREFIX=${ATOLL_NET_PREFIX:-172.31.213}
export ATOLL_BIND_IP=${ATOLL_BIND_IP:-127.0.0.1}
export ATOLL_IMAGE=${ATOLL_IMAGE:-atoll:local}
project=${ATOLL_COMPOSE_PROJECT:-atoll-ci-$$}
kvctl_bin=${ATOLL_KVCTL:-target/release/kvctl}
up_timeout=${ATOLL_UP_TIMEOUT:-90}
stop_mode=${ATOLL_STOP_MODE:-kill}
# The host reaches published ports on ATOLL_BIND_IP (0.0.0.0 means every address: use loopback).
host_ip=$ATOLL_BIND_IP
[ "$host_ip" = 0.0.0.0 ] && host_ip=127.0.0.1
pd_endpoints="$host_ip:$ATOLL_PD1_PORT,$host_ip:$ATOLL_PD2_PORT,$host_ip:$ATOLL_PD3_PORT"

if [ -n "${ATOLL_COMPOSE:-}" ]; then
  read -r -a compose <<<"$ATOLL_COMPOSE"
elif command -v docker-compose >/dev/null; then
  compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  fail "neither docker-compose nor the docker compose plugin is installed"
fi
compose_files=(-f docker-compose.yml)
dc() { "${compose[@]}" -p "$project" "${compose_files[@]}" "$@"; }

[ -x "$kvctl_bin" ] || fail "$kvctl_bin is missing: cargo build --release --workspace --all-targets"
kv() { "$kvctl_bin" --timeout 5 "$@"; }

# ---- teardown, always ------------------------------------------------------------------------
dump() {
  log "docker-compose ps:"
  dc --profile scale ps -a >&2 || true
  log "logs (last 40 lines per service):"
  dc --profile scale logs --no-color --tail 40 >&2 || true
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ $rc -ne 0 ] && [ -n "${started:-}" ]; then dump; fi
  if [ "${ATOLL_KEEP:-0}" = 1 ]; then
    log "ATOLL_KEEP=1: cluster left running; remove it with:"
    log "  ${compose[*]} -p $project --profile scale down -v"
  else
    log "tearing down project $project"
    if ! dc --profile scale down -v --remove-orphans >/dev/null 2>&1 \
       && ! dc --profile scale down -v --remove-orphans >&2; then
      log "teardown failed (see above)"
      [ $rc -ne 0 ] || rc=1
    fi
  fi
  if [ $rc -eq 0 ]; then log "PASS in $((SECONDS - t0))s"; else log "FAILED (exit $rc) after $((SECONDS - t0))s"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- preflight: the host ports must be free --------------------------------------------------
if command -v ss >/dev/null; then
  busy=()
  for v in ATOLL_PD1_PORT ATOLL_PD2_PORT ATOLL_PD3_PORT \
           ATOLL_STORE1_PORT ATOLL_STORE2_PORT ATOLL_STORE3_PORT ATOLL_STORE4_PORT \
           ATOLL_STORE1_STATUS_PORT ATOLL_STORE2_STATUS_PORT ATOLL_STORE3_STATUS_PORT \
           ATOLL_STORE4_STATUS_PORT; do
    if ss -ltnH "( sport = :${!v} )" 2>/dev/null | grep -q .; then busy+=("$v=${!v}"); fi
  done
  [ ${#busy[@]} -eq 0 ] || fail "host ports in use: ${busy[*]} (override these variables)"
fi

# ---- helpers ---------------------------------------------------------------------------------
# Prints the health of a service's container: healthy, starting, unhealthy, exited, missing.
health() {
  local id
  # -a: Compose v2 lists running containers only without it.
  id=$(dc --profile scale ps -a -q "$1" 2>/dev/null | head -1)
  [ -n "$id" ] || { echo missing; return; }
  docker inspect -f '{{if ne .State.Status "running"}}{{.State.Status}}{{else if .State.Health}}{{.State.Health.Status}}{{else}}running{{end}}' "$id" 2>/dev/null || echo missing
}

# wait_healthy DEADLINE_SECONDS SERVICE...: all healthy before SECONDS reaches the deadline.
wait_healthy() {
  local deadline=$1; shift
  local s h pending
  while :; do
    pending=()
    for s in "$@"; do
      h=$(health "$s")
      case $h in
        healthy) ;;
        exited|dead) fail "$s is $h" ;;
        *) pending+=("$s:$h") ;;
      esac
    done
    [ ${#pending[@]} -eq 0 ] && return 0
    [ "$SECONDS" -lt "$deadline" ] || fail "not healthy in time: ${pending[*]}"
    sleep 1
  done
}

# The stores PD lists, one JSON object a line.
store_lines() {
  kv --pd "$pd_endpoints" --output json stores | sed 's/},{/}\n{/g'
}

# retry SECONDS DESCRIPTION COMMAND...: runs COMMAND until it succeeds or SECONDS pass.
retry() {
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs)) out
  while :; do
    if out=$("$@" 2>&1); then return 0; fi
    [ "$SECONDS" -lt "$deadline" ] || fail "$what: still failing after ${secs}s: $out"
    sleep 1
  done
}

# http_status HOST PORT PATH: the HTTP status code (bash's /dev/tcp: no curl needed).
http_status() {
  local line
  exec 3<>"/dev/tcp/$1/$2" || return 1
  printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$3" "$1" >&3
  IFS= read -r -t 5 line <&3 || true
  exec 3<&- 3>&-
  line=${line%$'\r'}
  echo "${line#* }" | cut -d' ' -f1
}

check_put_get() {
  local key=$1 val=$2 got
  kv --pd "$pd_endpoints" put "$key" "$val" >/dev/null || return 1
  got=$(kv --pd "$pd_endpoints" get "$key") || return 1
  [ "$got" = "$val" ] || { echo "get $key = '$got', want '$val'"; return 1; }
}

# ---- 1. image --------------------------------------------------------------------------------
if [ "${ATOLL_SKIP_BUILD:-0}" = 1 ]; then
  docker image inspect "$ATOLL_IMAGE" >/dev/null 2>&1 || fail "ATOLL_SKIP_BUILD=1 but there is no image $ATOLL_IMAGE"
  log "using the existing image $ATOLL_IMAGE"
else
  log "building $ATOLL_IMAGE"
  scripts/docker-build.sh "$ATOLL_IMAGE" >/dev/null || fail "scripts/docker-build.sh failed"
fi

# ---- 2. cluster up ---------------------------------------------------------------------------
log "starting project $project (${compose[*]}; network $ATOLL_NET_PREFIX.0/24; PD on $pd_endpoints)"
up_deadline=$((SECONDS + up_timeout))
started=1
# `up` itself waits for the PDs to be healthy (the stores depend on it): bound it too.
timeout "$up_timeout" "${compose[@]}" -p "$project" -f docker-compose.yml up -d >&2 \
  || fail "up -d failed or took more than ${up_timeout}s (a 'Pool overlaps' error: set ATOLL_NET_PREFIX; 'port is already allocated': set the port variables)"
wait_healthy "$up_deadline" pd1 pd2 pd3 store1 store2 store3
log "all six services healthy"

# ---- 3. host access --------------------------------------------------------------------------
kv --pd "$host_ip:$ATOLL_PD1_PORT" put k v >/dev/null || fail "put k v"
got=$(kv --pd "$host_ip:$ATOLL_PD1_PORT" get k) || fail "get k"
[ "$got" = v ] || fail "get k returned '$got', want 'v'"
for i in 1 2 3; do kv --pd "$pd_endpoints" put "scan/$i" "value$i" >/dev/null || fail "put scan/$i"; done
scan=$(kv --pd "$pd_endpoints" --output json scan scan/ scan0) || fail "scan"
want='{"kvs":[{"key":"scan/1","value":"value1"},{"key":"scan/2","value":"value2"},{"key":"scan/3","value":"value3"}]}'
[ "$scan" = "$want" ] || fail "scan scan/ scan0 returned $scan, want $want"
kv --pd "$pd_endpoints" tso >/dev/null || fail "tso"
members=$(kv --pd "$pd_endpoints" members) || fail "members"
[ "$(grep -c . <<<"$members")" = 3 ] || fail "members: want 3, got: $members"
log "put/get/scan/tso/members from the host: ok"

# etcd's API on the stores' published ports (etcdctl: Debian's etcd-client, when installed).
etcd_endpoints="$host_ip:$ATOLL_STORE1_PORT,$host_ip:$ATOLL_STORE2_PORT,$host_ip:$ATOLL_STORE3_PORT"
log "etcd clients: export ETCDCTL_API=3 ETCDCTL_ENDPOINTS=$etcd_endpoints"
if command -v etcdctl >/dev/null 2>&1; then
  ectl() { ETCDCTL_API=3 etcdctl --endpoints="$etcd_endpoints" --command-timeout=10s "$@"; }
  ectl put compose/etcd hello >/dev/null || fail "etcdctl put"
  got=$(ectl get compose/etcd --print-value-only) || fail "etcdctl get"
  [ "$got" = hello ] || fail "etcdctl get compose/etcd returned '$got', want 'hello'"
  ectl endpoint health >/dev/null 2>&1 || fail "etcdctl endpoint health: $(ectl endpoint health 2>&1)"
  log "etcdctl put/get/endpoint health from the host: ok"
fi

stores=$(store_lines) || fail "stores"
up=$(grep '"state":"up"' <<<"$stores" | grep -c '"is_down":false' || true)
[ "$up" = 3 ] || fail "want 3 stores up, got $up: $stores"
for i in 1 2 3; do
  grep -q "\"address\":\"$ATOLL_NET_PREFIX.2$i:20160\"" <<<"$stores" || fail "store$i ($ATOLL_NET_PREFIX.2$i:20160) not listed: $stores"
done
for v in ATOLL_STORE1_STATUS_PORT ATOLL_STORE2_STATUS_PORT ATOLL_STORE3_STATUS_PORT; do
  code=$(http_status "$host_ip" "${!v}" /status) || fail "status port ${!v} unreachable"
  [ "$code" = 200 ] || fail "GET /status on published port ${!v}: HTTP '$code'"
done
log "3 stores up; published status ports answer"

# ---- 4. one store down -----------------------------------------------------------------------
# The store that leads the first region (in a fresh cluster the only one, holding every key:
# the harder case, the region must elect a new leader), unless ATOLL_STOP_STORE names one.
victim=${ATOLL_STOP_STORE:-leader}
why="chosen by ATOLL_STOP_STORE"
if [ "$victim" = leader ]; then
  why="it led the region"
  leader_store=$(kv --pd "$pd_endpoints" --output json regions \
    | grep -o '"leader":{"id":[0-9]*,"store_id":[0-9]*}' | head -1 | grep -o '[0-9]*}$' | tr -d '}' || true)
  leader_addr=$(grep "\"id\":$leader_store," <<<"$stores" | grep -o '"address":"[^"]*"' | cut -d'"' -f4 || true)
  case $leader_addr in
    "$ATOLL_NET_PREFIX".2[1-3]:20160) victim=store${leader_addr#"$ATOLL_NET_PREFIX".2}; victim=${victim%:20160} ;;
    *) why="could not tell the leader's store (id '$leader_store', address '$leader_addr')"; victim=store2 ;;
  esac
fi
case $stop_mode in
  kill) dc kill "$victim" >/dev/null 2>&1 || fail "kill $victim" ;;
  stop) dc stop "$victim" >/dev/null 2>&1 || fail "stop $victim" ;;
  *) fail "ATOLL_STOP_MODE must be kill or stop" ;;
esac
log "$victim stopped ($stop_mode; $why)"
t_down=$SECONDS
retry 20 "write and read with $victim down" check_put_get k-after-stop v2
got=$(kv --pd "$pd_endpoints" get k) || fail "get k with $victim down"
[ "$got" = v ] || fail "get k with $victim down returned '$got'"
log "writes and reads with $victim down: ok after $((SECONDS - t_down))s"

# ---- 5. a 4th store --------------------------------------------------------------------------
dc --profile scale up -d store4 >/dev/null 2>&1 || fail "--profile scale up -d store4"
wait_healthy $((SECONDS + 60)) store4
store4_listed() {
  local s
  s=$(store_lines) || return 1
  [ "$(grep -c '"address"' <<<"$s")" = 4 ] || { echo "want 4 stores: $s"; return 1; }
  grep "\"address\":\"$ATOLL_NET_PREFIX.24:20160\"" <<<"$s" | grep -q '"state":"up"' \
    || { echo "store4 not up: $s"; return 1; }
}
retry 20 "store4 registered" store4_listed
check_put_get k-after-scale v3 || fail "put/get after store4 joined"
log "store4 registered (4 stores listed)"

# ---- 6. mutual TLS ----------------------------------------------------------------------------
log "starting again with mutual TLS (docker-compose.tls.yml)"
dc --profile scale down -v --remove-orphans >/dev/null 2>&1 || fail "down before the TLS run"
compose_files=(-f docker-compose.yml -f docker-compose.tls.yml)
up_deadline=$((SECONDS + up_timeout))
timeout "$up_timeout" "${compose[@]}" -p "$project" "${compose_files[@]}" up -d >&2 \
  || fail "up -d with docker-compose.tls.yml failed or took more than ${up_timeout}s"
wait_healthy "$up_deadline" pd1 pd2 pd3 store1 store2 store3
certs=$(mktemp -d /tmp/atoll-compose-certs.XXXX)
docker cp "$(dc ps -a -q certs | head -1):/data/." "$certs" >/dev/null || fail "copy the certificates out"
tls=(--cacert "$certs/ca.pem" --cert "$certs/client.pem" --key "$certs/client-key.pem")
tls_put_get() {
  local got
  kv "${tls[@]}" --pd "$pd_endpoints" put k-tls v-tls >/dev/null || return 1
  got=$(kv "${tls[@]}" --pd "$pd_endpoints" get k-tls) || return 1
  [ "$got" = v-tls ] || { echo "get k-tls = '$got'"; return 1; }
}
retry 20 "put/get over mutual TLS" tls_put_get
if kv --pd "$pd_endpoints" get k-tls >/dev/null 2>&1; then fail "plaintext get was served"; fi
if kv --cacert "$certs/ca.pem" --pd "$pd_endpoints" get k-tls >/dev/null 2>&1; then
  fail "a client without a certificate was served"
fi
kv "${tls[@]}" probe "$host_ip:$ATOLL_STORE1_STATUS_PORT" /metrics >/dev/null || fail "status port over HTTPS"
if command -v etcdctl >/dev/null; then
  got=$(ETCDCTL_API=3 etcdctl --endpoints "https://$host_ip:$ATOLL_STORE1_PORT" --cacert "$certs/ca.pem" \
    --cert "$certs/client.pem" --key "$certs/client-key.pem" get k-tls --print-value-only) \
    || fail "etcdctl over mutual TLS"
  [ "$got" = v-tls ] || fail "etcdctl get k-tls returned '$got'"
fi
rm -rf "$certs"
log "mutual TLS: put/get with the client certificate ok; plaintext and certificate-less clients refused"
