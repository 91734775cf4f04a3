#!/usr/bin/env bash
# Starts a local Atoll cluster (one PD, three storage nodes) in the foreground until Ctrl-C.
# Extra arguments go to `kvctl playground` (e.g. --stores 5, --data-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/ensure-deps.sh
cargo build --release --workspace --all-targets
exec target/release/kvctl playground "$@"
