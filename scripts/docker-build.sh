#!/usr/bin/env bash
# Builds the Atoll runtime image (default tag atoll:local) from the binaries already built in
# target/release. It does not run Cargo: build first with
#     cargo build --release --workspace --all-targets
#
#   scripts/docker-build.sh [IMAGE]
#
# Environment:
#   ATOLL_IMAGE    image tag (default atoll:local; the first argument wins)
#   ATOLL_BIN_DIR  where the binaries are (default target/release)
#   ATOLL_STRIP    1 (default): drop debug info from the image's copies (about 3x smaller);
#                  0: keep the binaries byte for byte
#
# The build context is staged in a temporary directory (removed afterwards): the three
# binaries, exactly the shared libraries `ldd` lists for them (with their directory layout,
# including the dynamic loader), the `atoll-probe` health check (docker/atoll-probe.rs,
# compiled here with plain `rustc`, std only), a writable /tmp and /data.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

image=${1:-${ATOLL_IMAGE:-atoll:local}}
bin_dir=${ATOLL_BIN_DIR:-target/release}
strip=${ATOLL_STRIP:-1}
bins=(pd-server storage-node kvctl)

die() { echo "docker-build: $*" >&2; exit 1; }

missing=()
for b in "${bins[@]}"; do
  [ -x "$bin_dir/$b" ] || missing+=("$bin_dir/$b")
done
if [ ${#missing[@]} -gt 0 ]; then
  die "missing binaries: ${missing[*]}
Build them first (this script does not run Cargo):
    cargo build --release --workspace --all-targets"
fi
command -v docker >/dev/null || die "docker is not installed"
command -v ldd >/dev/null || die "ldd is not installed (it comes with glibc: libc-bin)"
command -v rustc >/dev/null || die "rustc is needed to compile the health probe docker/atoll-probe.rs
(it is the toolchain that built target/release; put ~/.cargo/bin on PATH)"
[ "$(uname -m)" = x86_64 ] || echo "docker-build: note: host is $(uname -m), not x86_64" >&2

ctx=$(mktemp -d "${TMPDIR:-/tmp}/atoll-docker-context.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
rootfs=$ctx/rootfs
mkdir -p "$rootfs/usr/local/bin" "$rootfs/tmp" "$ctx/data"
chmod 1777 "$rootfs/tmp"
chmod 0755 "$ctx/data"

# The binaries (copied first, so a concurrent `cargo build` cannot change them under us
# between the copy and ldd).
for b in "${bins[@]}"; do
  if [ "$strip" = 1 ] && command -v objcopy >/dev/null; then
    objcopy --strip-debug "$bin_dir/$b" "$rootfs/usr/local/bin/$b"
  else
    cp "$bin_dir/$b" "$rootfs/usr/local/bin/$b"
  fi
  chmod 0755 "$rootfs/usr/local/bin/$b"
done

# The health probe: std-only Rust, no Cargo involved.
rustc --edition 2021 -C opt-level=2 -C panic=abort -C strip=symbols \
  -o "$rootfs/usr/local/bin/atoll-probe" docker/atoll-probe.rs \
  || die "compiling docker/atoll-probe.rs failed"

# Exactly the libraries ldd lists, at the paths it lists them (symlinks resolved), plus the
# dynamic loader at the path the binaries name as their interpreter.
libs=()
for f in "$rootfs"/usr/local/bin/*; do
  out=$(ldd "$f" 2>&1) || die "ldd $f failed: $out"
  if grep -q 'not found' <<<"$out"; then
    die "$f needs libraries this machine does not have:
$out"
  fi
  while read -r lib; do libs+=("$lib"); done < <(
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out")
done
[ ${#libs[@]} -gt 0 ] || die "ldd listed no libraries: are the binaries statically linked? (then drop this step)"
for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done

cp docker/Dockerfile "$ctx/Dockerfile"
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | head -1)
[ -n "$dirty" ] && rev="$rev-dirty"

echo "docker-build: context $(du -sh "$ctx" | cut -f1) with libraries:" \
  $(printf '%s\n' "${libs[@]}" | sort -u) >&2
old_id=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
docker build --label "org.opencontainers.image.revision=$rev" \
  --label "org.opencontainers.image.source=$root" -t "$image" "$ctx"

# Smoke test: every binary loads in the image (libraries and loader complete).
for b in "${bins[@]}"; do
  docker run --rm --entrypoint "/usr/local/bin/$b" "$image" --version >/dev/null \
    || die "$b does not start in $image (a library is missing?)"
done
probe_out=$(docker run --rm --entrypoint /usr/local/bin/atoll-probe "$image" --help 2>&1 || true)
grep -q '^usage: atoll-probe' <<<"$probe_out" || die "atoll-probe does not start in $image: $probe_out"
# The image this tag named before, now untagged: remove it (unless a container still uses it).
new_id=$(docker image inspect -f '{{.Id}}' "$image")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ] \
   && [ -z "$(docker image inspect -f '{{join .RepoTags ""}}' "$old_id" 2>/dev/null)" ]; then
  docker image rm "$old_id" >/dev/null 2>&1 || true
fi
echo "docker-build: built $image ($rev)" >&2
