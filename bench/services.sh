#!/usr/bin/env bash
# New TCP connections/s and request/responses/s to a service frontend (VIP)
# while N services exist, N in $SERVICES:
#   cilia:    two endpoints (app=client, app=server) on an agent; N services
#             (frontends in 198.51.100.0/24 and 203.0.113.0/24, one port per
#             address block of 512), each with the server as its backend;
#             the client connects to the last service created. Translation
#             happens in the client's from-container program (per-packet LB),
#             or in its connect() when the agent's socket LB covers it.
#   iptables: kube-proxy's iptables layout in a router namespace between a
#             client and a server namespace: nat PREROUTING -> KUBE-SERVICES
#             (one `-d VIP -p tcp --dport P -j KUBE-SVC-*` rule per service,
#             walked in order) -> KUBE-SVC-* -> KUBE-SEP-* (DNAT to the
#             server); the client connects to the last service's VIP.
#   direct:   each client to the server's own address (no translation; the
#             iptables path still walks KUBE-SERVICES, as with kube-proxy).
# Measured in the same run with bench/rr.py (one connection at a time,
# latency bound). Median of $REPS rounds of $DURATION s. Needs root and the
# release binaries. Prints a markdown table; ratios are to N=first.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVICES=${SERVICES:-"1 1000 10000 30000"}
DURATION=${DURATION:-5}
REPS=${REPS:-3}
PORT=${PORT:-8080}
SETTLE=${SETTLE:-2}
CT_BUDGET=${CILIA_CT_BUDGET:-200000}
NICE=${NICE:--10}
CLIENT_CPU=${CLIENT_CPU-$(($(nproc) - 1))}
SERVER_CPU=${SERVER_CPU-$(($(nproc) - 1))}
BIN=target/release
P=csv$$
RUN=/run/$P
BPF=/sys/fs/bpf/$P
SOCK=$RUN/cilia.sock
NSS=("$P-node" "$P-cli" "$P-srv" "$P-vcli" "$P-vrt" "$P-vsrv")
T0=$(date +%s)
source scripts/lib/procs.sh
source bench/lib/prelude.sh
source scripts/lib/topo.sh

bench_traps cleanup_tracked

need_root
need_bins cilia cilia-agent
for n in $SERVICES; do [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 60000 ] || { echo "bad service count: $n (1..60000)" >&2; exit 1; }; done
mkdir -p "$RUN"
for ns in "${NSS[@]}"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
for ns in "$P-cli" "$P-vcli"; do ip netns exec "$ns" sysctl -qw net.ipv4.ip_local_port_range="1024 65535"; done
pin() { [ -n "$1" ] && echo "taskset -c $1" || true; }
CLI_RUN="nice -n $NICE $(pin "$CLIENT_CPU")"
SRV_RUN="nice -n $NICE $(pin "$SERVER_CPU")"
log() { echo "[$(($(date +%s) - T0))s] $*" >&2; }
cilia() { "$BIN/cilia" --socket "$SOCK" "$@"; }

# --- iptables: client -- router (kube-proxy rules) -- server ---------------
# All addresses are documentation ones, inside these namespaces only; the
# client's default route points at the router namespace, which has no
# other link.
routed_path "$P-vcli" "${P}c" 192.0.2.1/26 "$P-vrt" "${P}rc" 192.0.2.62/26 "${P}rs" 192.0.2.65/26 \
  "$P-vsrv" "${P}s" 192.0.2.66/26

# --- cilia: agent in a node namespace, two endpoints -----------------------
nsenter --net="/run/netns/$P-node" "$BIN/cilia-agent" --state-dir "$RUN/state" --bpf-root "$BPF" \
  --socket "$SOCK" --ipv6-range fd00:c1c::/112 --ipv4-range 10.202.0.0/24 \
  --ct-budget "$CT_BUDGET" >"$RUN/agent.log" 2>&1 &
AGENT_PID=$!
track "$AGENT_PID"
for _ in $(seq 100); do cilia status >/dev/null 2>&1 && break; sleep 0.1; done
cilia status >/dev/null || { echo "agent did not start:" >&2; cat "$RUN/agent.log" >&2; exit 1; }
cilia endpoint create --netns "$P-srv" --labels app=server >/dev/null
cilia endpoint create --netns "$P-cli" --labels app=client >/dev/null
SRV_IP=$(cilia -o json endpoint list | python3 -c "import json,sys; print([e['ipv4'] for e in json.load(sys.stdin) if e['labels'].get('app')=='server'][0].split('/')[0])")

ip netns exec "$P-srv" $SRV_RUN python3 bench/rr.py serve "$PORT" 0.0.0.0 3600 & track $!
ip netns exec "$P-vsrv" $SRV_RUN python3 bench/rr.py serve "$PORT" 0.0.0.0 3600 & track $!

reach() { # ns ip port
  ip netns exec "$1" timeout 5 python3 -c 'import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1).close()' "$2" "$3" 2>/dev/null
}
for _ in $(seq 50); do reach "$P-cli" "$SRV_IP" "$PORT" && reach "$P-vcli" 192.0.2.66 "$PORT" && break; sleep 0.1; done
reach "$P-cli" "$SRV_IP" "$PORT" || { echo "no connectivity cilia client -> server $SRV_IP:$PORT" >&2; exit 1; }
reach "$P-vcli" 192.0.2.66 "$PORT" || { echo "no connectivity through the router namespace" >&2; exit 1; }

# Frontend i: address i mod 512 of the two documentation /24s, port
# 1000 + i div 512 (60,000 distinct frontends).
vip() { python3 -c "import sys; i=int(sys.argv[1]); a=i%512; print(('198.51.100.%d' if a<256 else '203.0.113.%d') % (a%256), 1000+i//512)" "$1"; }

load_cilia() { # N: the services 1..N, each with the server as backend, in
  # one `cilia service import --prune` (one API call, one store commit):
  # the others are deleted.
  python3 - "$1" "$SRV_IP" "$PORT" >"$RUN/services.json" <<'EOF'
import json, sys
n, srv, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
out = []
for i in range(1, n + 1):
    a = (i - 1) % 512
    addr = ("198.51.100.%d" if a < 256 else "203.0.113.%d") % (a % 256)
    out.append({"id": i, "frontend": "%s:%d/tcp" % (addr, 1000 + (i - 1) // 512),
                "backends": [{"address": "%s:%d" % (srv, port)}]})
json.dump(out, sys.stdout)
EOF
  cilia service import --prune "$RUN/services.json" >/dev/null
}
gen_ipt() { # N: iptables-restore input for the nat table, kube-proxy style
  python3 - "$1" "$PORT" <<'EOF'
import sys
n, port = int(sys.argv[1]), int(sys.argv[2])
out = ["*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n"]
for i in range(1, n + 1):
    out.append(":KUBE-SVC-%06d - [0:0]\n:KUBE-SEP-%06d - [0:0]\n" % (i, i))
out.append("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n")
for i in range(1, n + 1):
    a = (i - 1) % 512
    addr = ("198.51.100.%d" if a < 256 else "203.0.113.%d") % (a % 256)
    out.append("-A KUBE-SERVICES -d %s/32 -p tcp -m tcp --dport %d -j KUBE-SVC-%06d\n" % (addr, 1000 + (i - 1) // 512, i))
    out.append("-A KUBE-SVC-%06d -j KUBE-SEP-%06d\n" % (i, i))
    out.append("-A KUBE-SEP-%06d -p tcp -m tcp -j DNAT --to-destination 192.0.2.66:%d\n" % (i, port))
out.append("COMMIT\n")
sys.stdout.write("".join(out))
EOF
}
now() { date +%s.%N; }
median() { printf '%s\n' "$@" | { grep -E '^[0-9.]+$' || true; } | sort -g | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
# The client's source ports (rr.py's RR_PORTS): a VIP measurement and the
# direct one right after it use disjoint ranges. A connection closes with a
# RST, but the router's conntrack keeps it 10 s: a direct connection
# reusing a VIP connection's source port has the reply tuple of that
# DNAT'd entry (server:8080 -> client:port), so the router's NAT must remap
# its source port or drop it - the direct column measured 334-1342 conn/s
# against the VIP's 6000 before the ranges were split.
VIP_PORTS=10000-37499
DIRECT_PORTS=37500-64999
measure() { # ns mode ip port [ports]: ops/s, or "err"
  local out
  if out=$(ip netns exec "$1" env RR_PORTS="${5:-$VIP_PORTS}" timeout $((DURATION + 30)) $CLI_RUN python3 bench/rr.py "$2" "$3" "$4" "$DURATION" 2>"$RUN/rr.err"); then
    echo "$out"
  else
    log "rr.py $2 in $1 -> $3:$4 failed: $(tail -n1 "$RUN/rr.err")"; echo err
  fi
}

declare -A CC IC CR IR DC DI LT
declare -A CCs ICs CRs IRs DCs DIs LTs CDs IDs CD ID
ratio() { python3 -c "import sys
try: print('%.3f' % (float(sys.argv[1]) / float(sys.argv[2])))
except Exception: print('-')" "$1" "$2"; }
for r in $(seq "$REPS"); do
  for n in $SERVICES; do
    t=$(now)
    load_cilia "$n" || { log "N=$n: loading the services into cilia failed"; exit 1; }
    LTs[$n]+=" $(python3 -c "print('%.2f' % ($(now) - $t))")"
    gen_ipt "$n" >"$RUN/ipt.rules"
    ip netns exec "$P-vrt" iptables-restore <"$RUN/ipt.rules"
    read -r VIP VPORT < <(vip $((n - 1)))
    reach "$P-cli" "$VIP" "$VPORT" || { log "N=$n: the cilia client cannot reach $VIP:$VPORT"; exit 1; }
    reach "$P-vcli" "$VIP" "$VPORT" || { log "N=$n: the iptables client cannot reach $VIP:$VPORT"; exit 1; }
    sleep "$SETTLE"
    # Each VIP figure next to its direct one: their ratio cancels what the
    # other load of the machine does to both.
    cc=$(measure "$P-cli" conn "$VIP" "$VPORT"); dc=$(measure "$P-cli" conn "$SRV_IP" "$PORT" "$DIRECT_PORTS")
    ic=$(measure "$P-vcli" conn "$VIP" "$VPORT"); di=$(measure "$P-vcli" conn 192.0.2.66 "$PORT" "$DIRECT_PORTS")
    CCs[$n]+=" $cc"; DCs[$n]+=" $dc"; ICs[$n]+=" $ic"; DIs[$n]+=" $di"
    CDs[$n]+=" $(ratio "$cc" "$dc")"; IDs[$n]+=" $(ratio "$ic" "$di")"
    CRs[$n]+=" $(measure "$P-cli" rr "$VIP" "$VPORT")"
    IRs[$n]+=" $(measure "$P-vcli" rr "$VIP" "$VPORT")"
    log "N=$n round $r: cilia conn${CCs[$n]} | direct${DCs[$n]} | ipt conn${ICs[$n]} | direct${DIs[$n]} | cilia rr${CRs[$n]} | ipt rr${IRs[$n]}"
  done
done
for n in $SERVICES; do
  CC[$n]=$(median ${CCs[$n]}); IC[$n]=$(median ${ICs[$n]}); CR[$n]=$(median ${CRs[$n]}); IR[$n]=$(median ${IRs[$n]})
  DC[$n]=$(median ${DCs[$n]}); DI[$n]=$(median ${DIs[$n]}); LT[$n]=$(median ${LTs[$n]})
  CD[$n]=$(median ${CDs[$n]}); ID[$n]=$(median ${IDs[$n]})
done
first=$(printf '%s\n' $SERVICES | sort -n | head -n1)
echo
echo "Median of $REPS rounds of ${DURATION} s runs, one connection at a time (latency bound), 64 B request and response; client/server CPU ${CLIENT_CPU:-any}/${SERVER_CPU:-any}, nice $NICE. (ratio): to the same column at N=$first; cilia/ipt: the two at the same N; VIP/direct: per round, new conn/s to the VIP over new conn/s to the server's address measured right after it, median."
echo
echo "| services N | cilia new conn/s (ratio) | iptables new conn/s (ratio) | cilia/ipt conn | cilia rr/s (ratio) | iptables rr/s (ratio) | direct conn/s cilia / iptables path | VIP/direct cilia (ratio) | VIP/direct iptables (ratio) | cilia load s |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for n in $SERVICES; do
  echo "| $n | ${CC[$n]} ($(ratio "${CC[$n]}" "${CC[$first]}")) | ${IC[$n]} ($(ratio "${IC[$n]}" "${IC[$first]}")) | $(ratio "${CC[$n]}" "${IC[$n]}") | ${CR[$n]} ($(ratio "${CR[$n]}" "${CR[$first]}")) | ${IR[$n]} ($(ratio "${IR[$n]}" "${IR[$first]}")) | ${DC[$n]} / ${DI[$n]} | ${CD[$n]} ($(ratio "${CD[$n]}" "${CD[$first]}")) | ${ID[$n]} ($(ratio "${ID[$n]}" "${ID[$first]}")) | ${LT[$n]} |"
done
log "total $(($(date +%s) - T0)) s"
