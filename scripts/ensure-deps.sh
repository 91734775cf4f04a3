#!/usr/bin/env bash
# Installs what a fresh machine lacks to build Atoll: RocksDB's build (bindgen) needs libclang
# with its headers. protoc is vendored; everything else comes from cargo.
set -euo pipefail

have_libclang() {
  for d in /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib; do
    # libclang-cpp.so is a different library: bindgen needs libclang.so itself
    ls "$d"/libclang.so* >/dev/null 2>&1 && return 0
    ls "$d"/libclang-[0-9]*.so* >/dev/null 2>&1 && return 0
  done
  return 1
}

have_headers() {
  ls /usr/lib/llvm-*/lib/clang/*/include/stdbool.h >/dev/null 2>&1
}

if have_libclang && have_headers; then
  exit 0
fi

echo "ensure-deps: installing libclang (needed by RocksDB's build)..." >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "ensure-deps: libclang is missing and this user cannot install packages; install libclang-dev" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends libclang1-14 libclang-common-14-dev >/dev/null 2>&1; then
  $SUDO apt-get update >/dev/null
  $SUDO apt-get install -y --no-install-recommends libclang1-14 libclang-common-14-dev >/dev/null 2>&1 \
    || $SUDO apt-get install -y --no-install-recommends libclang-dev >/dev/null
fi
have_libclang && have_headers || { echo "ensure-deps: libclang still missing" >&2; exit 1; }
echo "ensure-deps: libclang installed" >&2
