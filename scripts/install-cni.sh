#!/usr/bin/env bash
# Installs the cilia CNI plugin for podman (4.3, CNI backend) and containerd
# (idempotent): the plugin binary into both plugin directories, the network
# config, and the containers.conf settings podman needs on this machine as a
# drop-in, so unrelated settings in /etc/containers/containers.conf stay.
#   scripts/install-cni.sh          (after `cargo build --release`)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "install-cni.sh: run as root (writes /opt/cni/bin, /usr/lib/cni, /etc/cni, /etc/containers)" >&2
  exit 1
fi
bin=target/release/cilia-cni
if [ ! -x "$bin" ]; then
  echo "install-cni.sh: $bin not found: run \`cargo build --release -p cilia-cni\` first" >&2
  exit 1
fi

for dir in /opt/cni/bin /usr/lib/cni; do
  install -D -m 0755 "$bin" "$dir/cilia-cni"
done
# Runtimes take the first conflist in lexical order: a low prefix makes cilia
# containerd's default; podman selects it with --network cilia.
install -D -m 0644 examples/cni/cilia.conflist /etc/cni/net.d/10-cilia.conflist

# podman 4.3 reads /etc/containers/containers.conf.d/*.conf after containers.conf.
install -d /etc/containers/containers.conf.d
cat > /etc/containers/containers.conf.d/50-cilia.conf <<'CONF'
# Written by cilia scripts/install-cni.sh: what podman 4.3 needs on this machine.
[engine]
runtime = "runc"

[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[network]
network_backend = "cni"
CONF

echo "installed: /opt/cni/bin/cilia-cni /usr/lib/cni/cilia-cni /etc/cni/net.d/10-cilia.conflist /etc/containers/containers.conf.d/50-cilia.conf"
echo "use: podman run --network cilia …   (the agent must run: cilia-agent, socket $(printf %s /var/run/cilia/cilia.sock))"
