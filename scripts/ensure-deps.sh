#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test Atoll: RocksDB's build (bindgen) needs
# libclang with its headers; the etcd API tests drive the stores with etcdctl (Debian's
# etcd-client). protoc is vendored; everything else comes from cargo. Does nothing when all is
# there already.
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

have_etcdctl() {
  command -v etcdctl >/dev/null 2>&1
}

need_libclang=0
need_etcdctl=0
have_libclang && have_headers || need_libclang=1
have_etcdctl || need_etcdctl=1
if [ "$need_libclang" = 0 ] && [ "$need_etcdctl" = 0 ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "ensure-deps: missing packages and this user cannot install them; install libclang-dev and etcd-client" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
updated=0

# apt_install PKG... : installs, refreshing the package lists once if the first try fails.
apt_install() {
  if $SUDO apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1; then
    return 0
  fi
  if [ "$updated" = 0 ]; then
    $SUDO apt-get update >/dev/null
    updated=1
  fi
  $SUDO apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1
}

if [ "$need_libclang" = 1 ]; then
  echo "ensure-deps: installing libclang (needed by RocksDB's build)..." >&2
  apt_install libclang1-14 libclang-common-14-dev || apt_install libclang-dev || true
  have_libclang && have_headers || { echo "ensure-deps: libclang still missing" >&2; exit 1; }
  echo "ensure-deps: libclang installed" >&2
fi

if [ "$need_etcdctl" = 1 ]; then
  echo "ensure-deps: installing etcdctl (Debian's etcd-client, used by the etcd API tests)..." >&2
  apt_install etcd-client || true
  have_etcdctl || { echo "ensure-deps: etcdctl still missing" >&2; exit 1; }
  echo "ensure-deps: etcdctl installed" >&2
fi
