#!/usr/bin/env bash
# Installs what cilia needs on a Debian machine (idempotent), mounts bpffs,
# and builds the workspace in release mode.
#   scripts/setup.sh            install + build
#   scripts/setup.sh --deps     install only
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(clang-19 llvm-19 clang-format-19 libbpf-dev linux-libc-dev bpftool iproute2 iputils-ping iperf3 curl util-linux python3 iptables nftables)
PKGS+=(podman runc busybox-static)  # cilia-cni tests: real containers (podman 4.3, runc; busybox as the image)
PKGS+=(etcd-server protobuf-compiler)  # cilia-kvstore etcd tests: a real etcd on 127.0.0.1; etcd-client builds its gRPC code with protoc
PKGS+=(binutils)  # scripts/build-image.sh: objcopy strips debug info from the image's binaries
PKGS+=(tcpdump)  # cilia-datapath nodeport tests: a capture proves DSR replies bypass the LB node

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (installs packages, mounts bpffs, loads BPF programs)" >&2
  exit 1
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "setup.sh: cargo not found: install a Rust toolchain (rustup) first" >&2
  exit 1
fi

# The conventional bpffs mount; the agent would mount it too.
if [ "$(stat -f -c %T /sys/fs/bpf 2>/dev/null)" != "bpf_fs" ]; then
  mount -t bpf bpffs /sys/fs/bpf
fi

[ "${1:-}" = "--deps" ] && exit 0

echo "==> building (release)"
cargo build --release --workspace --bins
echo "==> installing the CNI plugin and podman settings"
scripts/install-cni.sh
