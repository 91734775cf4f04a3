#!/usr/bin/env bash
# Runs the test suite of aetcd (an etcd client library; its PyPI sdist ships its tests) against
# Atoll's etcd API: a local cluster (1 PD, 3 stores) from target/release on ports of its own.
# Installs what it needs into target/etcd-client-suite (a Python venv: aetcd 1.0.0, grpcio,
# protobuf, pytest) on first use. Needs etcdctl (scripts/ensure-deps.sh installs it).
#
# Served: everything outside lock and auth (the next issues). Deselected, with the reason
# (docs/etcd.md):
#   test_maintenance.py::test_*alarm*             Atoll raises no alarms and answers none, also
#                                                 to ACTIVATE (docs/etcd.md, Maintenance)
#   test_maintenance.py::test_hash                Hash is Unimplemented (no single backend)
#   test_maintenance.py::test_snapshot            Snapshot is Unimplemented (no member holds
#                                                 every region)
# and the suite itself skips two tests that need its own pifpaf cluster (--with-cluster).
# test_lock.py and test_auth.py are not run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/target/etcd-client-suite
src=$venv/aetcd-1.0.0
pd_port=${ATOLL_SUITE_PD_PORT:-32379}
store_port=${ATOLL_SUITE_STORE_PORT:-32160}
status_port=${ATOLL_SUITE_STATUS_PORT:-32180}
dir=$(mktemp -d /tmp/atoll-etcd-suite.XXXXXX)

if [ ! -x "$venv/bin/pytest" ] || [ ! -d "$src/tests" ]; then
  echo "etcd-client-suite: installing aetcd 1.0.0 and pytest into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "grpcio>1.66.0,<2" "protobuf>4,<8" pytest==9.0.3 \
    pytest-asyncio==1.3.0 pytest-mock==3.15.1
  "$venv/bin/pip" download -q --no-deps --no-binary :all: aetcd==1.0.0 -d "$venv"
  tar xzf "$venv/aetcd-1.0.0.tar.gz" -C "$venv"
  "$venv/bin/pip" install -q --no-deps "$venv/aetcd-1.0.0.tar.gz"
fi

stop() {
  ATOLL_LOCAL_PD_PORT=$pd_port "$root/scripts/local-cluster.sh" stop "$dir" || true
  rm -rf "$dir"
}
trap stop EXIT
ATOLL_LOCAL_PD_PORT=$pd_port ATOLL_LOCAL_STORE_PORT=$store_port \
  ATOLL_LOCAL_STATUS_PORT=$status_port scripts/local-cluster.sh start 3 "$dir" >&2
# Every store listens before the suite starts.
for i in 0 1 2; do
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$((store_port + i))") 2>/dev/null && break
    sleep 0.2
  done
done

cd "$src"
TEST_ETCD_HTTP_URL=http://127.0.0.1:$store_port "$venv/bin/pytest" -p no:cacheprovider \
  -o addopts="" -q -rs \
  tests/test_client.py tests/test_exceptions.py tests/test_rtypes.py tests/test_utils.py \
  tests/integration/test_kv.py tests/integration/test_cluster.py \
  tests/integration/test_maintenance.py tests/integration/test_watch.py \
  tests/integration/test_lease.py \
  --deselect tests/integration/test_maintenance.py::test_create_alarm_all_members \
  --deselect tests/integration/test_maintenance.py::test_create_alarm_specific_member \
  --deselect tests/integration/test_maintenance.py::test_list_alarms \
  --deselect tests/integration/test_maintenance.py::test_disarm_alarm \
  --deselect tests/integration/test_maintenance.py::test_hash \
  --deselect tests/integration/test_maintenance.py::test_snapshot
