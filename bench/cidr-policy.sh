#!/usr/bin/env bash
# A large CIDR policy on real endpoints (#11 points 3 and 4): one agent, N
# endpoints (default 20) created through cilia-cni with `app=cidr`, then one
# import of the shape of Cilium's RegenerateCIDRPolicyRules benchmark (the
# replica (c) of `cargo bench -p cilia-policy --bench resolve`): one
# CiliumNetworkPolicy with RULES specs (default 1000) selecting `app=cidr`,
# spec i one egress `toCIDR` (/8, /16, /24, /28, /32 by i mod 5; first
# octet 10, 192 or 244) on TCP port 80 + i mod 97; 44,595 map entries per
# endpoint at the default. `cilia policy import` returns when every selected
# endpoint's map in the kernel holds its entries, so its wall time is the
# time to enforce; a second import (every port moved by 1000) measures a
# change of every entry. Baseline in the same run: the same imports before
# any endpoint exists (parse, resolve, CIDR identities, store; no endpoint
# map). The agent's VmRSS is read settled before and after, so the growth
# over N is what each endpoint keeps. Needs root and the release binaries.
# Prints markdown.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-20}
RULES=${RULES:-1000}
BIN=${BIN:-$PWD/target/release}
P=ccidr$$
RUN=/run/$P
SOCK=$RUN/cilia.sock
source scripts/lib/procs.sh
source bench/lib/prelude.sh
source bench/lib/node-agent.sh
source bench/lib/import.sh
cleanup() {
  stop_tracked
  for i in $(seq "$N"); do del_netns "$P-$i"; done
  del_netns "$P-node"
  rm -rf "$RUN" "/sys/fs/bpf/$P"
}
bench_traps
need_bins cilia-agent cilia cilia-cni
start_node_agent fd00:c4f::/112 10.208.0.0/16
for i in $(seq "$N"); do ip netns add "$P-$i"; done
cilia() { "$BIN/cilia" --socket "$SOCK" "$@"; }

policy() { # OFFSET: the policy file, ports 80 + OFFSET + i mod 97
  python3 - "$RULES" "$1" >"$RUN/policy-$1.yaml" <<'EOF'
import sys
rules, offset = map(int, sys.argv[1:])
print("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: cidr\nspecs:")
for i in range(1, rules + 1):
    first = (10, 192, 244)[i % 3]
    b, c, d = i % 17, i % 121, (i % 16) << 4
    cidr = (f"{first}.0.0.0/8", f"{first}.{b}.0.0/16", f"{first}.{b}.{c}.0/24",
            f"{first}.{b}.{c}.{d}/28", f"{first}.{b}.{c}.{i % 255}/32")[i % 5]
    print(f"- endpointSelector: {{matchLabels: {{app: cidr}}}}\n  egress:\n  - toCIDR: ['{cidr}']\n"
          f"    toPorts: [{{ports: [{{port: '{80 + offset + i % 97}', protocol: TCP}}]}}]")
EOF
}
policy 0
policy 1000

idle=$(settled_rss)
base=$(timed_import "$RUN/policy-0.yaml")
base2=$(timed_import "$RUN/policy-1000.yaml")
cilia policy delete --all >/dev/null

for i in $(seq "$N"); do cni_add_app "cidr$i" "/run/netns/$P-$i" cidr; done
before=$(settled_rss)
with=$(timed_import "$RUN/policy-0.yaml")
after=$(settled_rss)
# The entries of the first endpoint's map, read back from the kernel.
first=$(cilia -o json endpoint list | python3 -c 'import json, sys; print(min(e["id"] for e in json.load(sys.stdin)))')
entries=$(cilia -o json bpf policy get "$first" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["entries"]))')
with2=$(timed_import "$RUN/policy-1000.yaml")
after2=$(settled_rss)

per() { awk -v a="$1" -v b="$2" -v n="$N" 'BEGIN { printf "%.1f", (a - b) * 1000 / n }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
kept() { awk -v a="$1" -v b="$2" -v n="$N" 'BEGIN { printf "%.2f", (a - b) / 1024 / n }'; }
echo "a CIDR policy of $RULES specs (replica (c)) on $N endpoints ($entries entries each); $(nproc) CPUs, kernel $(uname -r)"
echo
echo "| import | no endpoints (baseline) | $N endpoints | per endpoint |"
echo "|---|---|---|---|"
echo "| first import | $base s | $with s | $(per "$with" "$base") ms |"
echo "| change (every port moved) | $base2 s | $with2 s | $(per "$with2" "$base2") ms |"
echo
echo "| agent VmRSS | MiB |"
echo "|---|---|"
echo "| idle, before the baseline imports | $(mib "$idle") |"
echo "| $N endpoints, no policy | $(mib "$before") |"
echo "| after the first import | $(mib "$after") (+$(kept "$after" "$before") MiB per endpoint) |"
echo "| after the change | $(mib "$after2") (+$(kept "$after2" "$before") MiB per endpoint over no policy) |"
