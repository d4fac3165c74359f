#!/usr/bin/env bash
# Builds the cilia container image offline: a FROM scratch image holding the
# four binaries (cilia-agent, cilia, cilia-cni, cilia-proxy), exactly the
# shared libraries `ldd` lists for them and the dynamic loader. Nothing is
# pulled: no base image, no package. The agent runs no other program at run
# time (cilia-proxy, beside it, is the only one it starts), so no `ip`, `tc`
# or shell is in the image; the DaemonSet's init container uses
# `cilia cni install`, its probes `cilia status`.
#
#   scripts/build-image.sh                      release build, tag localhost/cilia:<version>
#   scripts/build-image.sh --bin-dir target/debug --tag localhost/cilia:test
#   scripts/build-image.sh --save cilia.tar     also `podman save` it (docker-archive),
#                                               for `ctr -n k8s.io images import cilia.tar`
set -euo pipefail
# Relative --bin-dir and --save paths are the caller's, not the repository's.
caller=$PWD
cd "$(dirname "$0")/.."

BINS=(cilia-agent cilia cilia-cni cilia-proxy)
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
bin_dir=""
tag="localhost/cilia:${version}"
save=""

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit "${1:-2}"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    --tag) tag=${2:?--tag needs a name}; shift 2 ;;
    --save) save=${2:?--save needs a file}; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "build-image.sh: unknown argument $1" >&2; usage ;;
  esac
done

case "$bin_dir" in "" | /*) ;; *) bin_dir=$caller/$bin_dir ;; esac
case "$save" in "" | /*) ;; *) save=$caller/$save ;; esac

command -v podman >/dev/null || { echo "build-image.sh: podman is not installed (scripts/setup.sh --deps)" >&2; exit 1; }
command -v ldd >/dev/null || { echo "build-image.sh: ldd is not installed" >&2; exit 1; }
command -v objcopy >/dev/null || { echo "build-image.sh: objcopy is not installed (binutils; scripts/setup.sh --deps)" >&2; exit 1; }

if [ -z "$bin_dir" ]; then
  echo "==> cargo build --release (${BINS[*]})"
  cargo build --release -p cilia-agent -p cilia-cli -p cilia-cni -p cilia-proxy
  bin_dir=target/release
fi
for b in "${BINS[@]}"; do
  [ -x "$bin_dir/$b" ] || { echo "build-image.sh: $bin_dir/$b is missing or not executable" >&2; exit 1; }
done

stage=$(mktemp -d /tmp/cilia-image.XXXXXX)
trap 'rm -rf "$stage"' EXIT
root=$stage/rootfs
mkdir -p "$root/usr/bin" "$root/run" "$root/tmp" "$root/var/lib" "$root/etc"
chmod 1777 "$root/tmp"
# As on the hosts: /var/run is /run, so a netns path given either way resolves.
ln -s ../run "$root/var/run"

# One file into the rootfs at the path the loader asks for (symlinks
# followed: the image gets the file, under the name the binary needs).
add_file() {
  local src=$1
  [ -e "$root$src" ] && return 0
  mkdir -p "$root$(dirname "$src")"
  cp -L "$src" "$root$src"
}

libs=()
for b in "${BINS[@]}"; do
  # Without debug info (a debug build's agent is ~400 MB of it; symbols
  # stay, so a backtrace still names functions): the image holds what runs.
  objcopy --strip-debug "$bin_dir/$b" "$root/usr/bin/$b"
  chmod 0755 "$root/usr/bin/$b"
  out=$(ldd "$bin_dir/$b" 2>&1) || {
    # A static binary needs nothing.
    if grep -q "not a dynamic executable" <<<"$out"; then continue; fi
    echo "build-image.sh: ldd $bin_dir/$b: $out" >&2
    exit 1
  }
  if grep -q "not found" <<<"$out"; then
    echo "build-image.sh: $b needs a library this host lacks:" >&2
    grep "not found" <<<"$out" >&2
    exit 1
  fi
  # "libc.so.6 => /lib/…/libc.so.6 (0x…)" and "/lib64/ld-linux-x86-64.so.2 (0x…)";
  # linux-vdso has no file.
  while read -r path; do
    libs+=("$path")
  done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out")
done
for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do
  add_file "$lib"
done

cat >"$stage/Containerfile" <<EOF
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/bin
LABEL org.opencontainers.image.title="cilia" org.opencontainers.image.version="${version}" \\
      org.opencontainers.image.licenses="Apache-2.0 AND GPL-2.0-only"
CMD ["/usr/bin/cilia-agent"]
EOF

echo "==> podman build $tag (from $bin_dir; libraries: $(printf '%s\n' "${libs[@]}" | sort -u | tr '\n' ' '))"
podman build --pull=never --network none --tag "$tag" --file "$stage/Containerfile" "$stage" >/dev/null
echo "built $tag ($(podman image inspect --format '{{.Size}}' "$tag") bytes)"
if [ -n "$save" ]; then
  rm -f "$save"
  podman save --format docker-archive --output "$save" "$tag"
  echo "saved $tag to $save"
fi
