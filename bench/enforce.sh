#!/usr/bin/env bash
# Time to enforce (#11 point 5) on real endpoints: one agent, N endpoints
# (default 200) created through cilia-cni in APPS apps (default 20,
# `app=app-K`), then one import of RULES rules (default 2000): APPS
# CiliumNetworkPolicies in one file, policy K selecting app-K with
# RULES/APPS ingress rules, rule J allowing app-((K+J) mod APPS) on TCP
# port 8000+J. `cilia policy import` returns when every selected endpoint's
# policy map in the kernel holds the new entries, so its wall time is the
# time to enforce. Baseline in the same run: the same import on the same
# agent before any endpoint exists (parse, resolve, store; no map written);
# the difference over N is the cost per endpoint. A second import (every
# port moved by 1000) measures a change to an enforced policy. The
# endpoints use the generic program (fast attach); their specialization
# runs in the background at nice 10 meanwhile, and the load average is
# printed. Needs root and the release binaries. Prints markdown.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-200}
APPS=${APPS:-20}
RULES=${RULES:-2000}
BIN=${BIN:-$PWD/target/release}
P=cenf$$
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
[ "$RULES" -ge "$APPS" ] || { echo "bench/enforce.sh: RULES ($RULES) < APPS ($APPS)" >&2; exit 1; }
start_node_agent fd00:c4e::/112 10.207.0.0/16
for i in $(seq "$N"); do ip netns add "$P-$i"; done
cilia() { "$BIN/cilia" --socket "$SOCK" "$@"; }

policy() { # OFFSET: writes the policy file with ports 8000+OFFSET+J
  python3 - "$APPS" "$RULES" "$1" >"$RUN/policy-$1.yaml" <<'EOF'
import sys
apps, rules, offset = map(int, sys.argv[1:])
per = -(-rules // apps)
written = 0
for k in range(apps):
    print(f"---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: enforce-{k}\n"
          f"spec:\n  endpointSelector:\n    matchLabels:\n      app: app-{k}\n  ingress:")
    for j in range(min(per, rules - written)):
        print(f"  - fromEndpoints:\n    - matchLabels:\n        app: app-{(k + j) % apps}\n"
              f"    toPorts:\n    - ports:\n      - port: \"{8000 + offset + j}\"\n        protocol: TCP")
        written += 1
EOF
}
policy 0
policy 1000

base=$(timed_import "$RUN/policy-0.yaml")
base2=$(timed_import "$RUN/policy-1000.yaml")
cilia policy delete --all >/dev/null

t0=$(date +%s)
for i in $(seq "$N"); do cni_add_app "enf$i" "/run/netns/$P-$i" "app-$((i % APPS))"; done
created=$(($(date +%s) - t0))

load() { cut -d' ' -f1 /proc/loadavg; }
l1=$(load)
with=$(timed_import "$RUN/policy-0.yaml")
with2=$(timed_import "$RUN/policy-1000.yaml")
l2=$(load)
enforced=$(cilia -o json endpoint list | python3 -c '
import json, sys
print(sum(e["state"] == "ready" for e in json.load(sys.stdin)))')

per() { awk -v a="$1" -v b="$2" -v n="$N" 'BEGIN { printf "%.1f", (a - b) * 1000 / n }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a / b }'; }
echo "time to enforce: $RULES rules in $APPS policies on $N endpoints ($enforced ready; created in ${created} s); $(nproc) CPUs, kernel $(uname -r), load average $l1 / $l2"
echo
echo "| import | no endpoints (baseline) | $N endpoints | ratio | per endpoint |"
echo "|---|---|---|---|---|"
echo "| first import | $base s | $with s | $(ratio "$with" "$base") | $(per "$with" "$base") ms |"
echo "| change (ports moved) | $base2 s | $with2 s | $(ratio "$with2" "$base2") | $(per "$with2" "$base2") ms |"
