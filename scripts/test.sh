#!/usr/bin/env bash
# The test command: builds everything once (release: the same artifacts serve the unit
# tests, the multi-process tests and the Docker images) and runs every test: cargo's, the
# aetcd client suite against the etcd API (scripts/etcd-client-suite.sh), the compose test.
#   ATOLL_CHAOS_LONG=1   also run the long chaos runs (10 minutes each)
#   ATOLL_SKIP_COMPOSE=1 skip the docker compose test even where Docker is available
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/ensure-deps.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace
# An etcd client library's own test suite against Atoll's etcd API (aetcd, from PyPI).
./scripts/etcd-client-suite.sh
if [ -x scripts/compose-test.sh ] && [ "${ATOLL_SKIP_COMPOSE:-0}" != 1 ] && docker info >/dev/null 2>&1; then
  ./scripts/compose-test.sh
fi
