#!/usr/bin/env bash
# New TCP connections/s and request/responses/s between a client and a server
# namespace while the server's ingress policy holds N rules, N in $RULES:
#   cilia:    two endpoints (app=client, app=server) on an agent; one
#             CiliumNetworkPolicy selecting app=server with N ingress rules:
#             N-1 fromCIDR rules for documentation /32s (/128s) that never
#             match, then fromEndpoints app=client, all on TCP/$PORT.
#   iptables: a plain veth pair (192.0.2.1 <-> 192.0.2.2), the server
#             namespace's INPUT chain holds N-1 non-matching
#             `-s <doc /32> -p tcp --dport $PORT -j ACCEPT` rules, then the
#             matching one, policy DROP (no conntrack rule: every packet walks
#             the chain).
#   floor:    another plain veth pair with no rules at all, measured beside
#             both: what one veth hop costs with nothing enforced. cilia's
#             path is two veth hops (container -> node -> container, by
#             redirect_peer) plus its programs; iptables' here is one hop.
#   floor2:   that two-hop path without cilia: client and server veths into
#             a node namespace, where bench/redirect_peer.c hands each packet
#             to the other side by bpf_redirect_peer and does nothing else
#             (static neighbours: no ARP). cilia/floor2 is what cilia's
#             programs cost; floor2/floor what the second device costs.
#   routed:   iptables on the path an iptables-based CNI gives two pods of
#             one node (cilia's shape): client -> node -> server, routed by
#             the node namespace's stack, the N rules in its FORWARD chain
#             (the same rules; before them one that passes the server's
#             replies, as cilia's server has no egress policy).
# Then one more pass at the smallest N with the kernel's BPF statistics on
# (kernel.bpf_stats_enabled, restored on exit): the time spent inside
# cilia's programs and inside floor2's per new connection and per
# request/response, measured by the kernel rather than by the rates.
# Both measured in the same run with bench/rr.py (one connection at a time,
# latency bound; Python dominates absolute numbers, the trend with N is the
# point). Median of $REPS runs of $DURATION s each. Needs root and the release
# binaries (scripts/setup.sh). Prints markdown tables. The agent takes its
# settings from the environment too: CILIA_FLOW_BUFFER_SIZE=0 runs it without
# its flow ring (events only while `cilia monitor` runs).
set -euo pipefail
cd "$(dirname "$0")/.."
RULES=${RULES:-"10 1000 10000"}
DURATION=${DURATION:-5}
REPS=${REPS:-3}
PORT=${PORT:-8080}
IMPORT_TIMEOUT=${IMPORT_TIMEOUT:-300}  # per import
SETTLE=${SETTLE:-2}    # s between loading the rules and measuring
# The client's endpoint opens up to ~10k connections/s and each closed one
# stays counted against its conntrack budget until a GC removes it. The
# default budget (32768) carries that (bench/ct-rate.sh), but only by early
# GC runs, a walk of the table every second, whose CPU would be measured as
# cilia's; a budget the client never nears keeps the GC on its interval.
CT_BUDGET=${CILIA_CT_BUDGET:-200000}
CHUNK=${CHUNK:-10000}  # rules per CiliumNetworkPolicy (10000 rules: ~1.2 MB of YAML)
# Client and server share one CPU, at raised priority: far less noise from
# other work on the host (and no cross-CPU wakeups). NICE=0 CLIENT_CPU=
# SERVER_CPU= turns this off (empty: unpinned).
NICE=${NICE:--10}
CLIENT_CPU=${CLIENT_CPU-$(($(nproc) - 1))}
SERVER_CPU=${SERVER_CPU-$(($(nproc) - 1))}
BIN=target/release
P=cps$$
RUN=/run/$P
BPF=/sys/fs/bpf/$P
SOCK=$RUN/cilia.sock
NSS=("$P-node" "$P-cli" "$P-srv" "$P-other" "$P-vcli" "$P-vsrv" "$P-pcli" "$P-psrv" "$P-hcli" "$P-hnode" "$P-hsrv"
  "$P-rcli" "$P-rnode" "$P-rsrv")
T0=$(date +%s)
source scripts/lib/procs.sh
source bench/lib/prelude.sh
source scripts/lib/topo.sh

BPF_STATS0=$(sysctl -n kernel.bpf_stats_enabled 2>/dev/null || echo 0)
cleanup() { # every process started is tracked by PID; then the namespaces
  sysctl -qw kernel.bpf_stats_enabled="$BPF_STATS0" 2>/dev/null || true
  cleanup_tracked
}
bench_traps

need_root
need_bins cilia cilia-agent
for n in $RULES; do [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] || { echo "bad rule count: $n" >&2; exit 1; }; done
mkdir -p "$RUN"
for ns in "${NSS[@]}"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
# Wider ephemeral range in the client namespaces (per-namespace sysctl).
for ns in "$P-cli" "$P-vcli" "$P-pcli" "$P-hcli" "$P-rcli"; do ip netns exec "$ns" sysctl -qw net.ipv4.ip_local_port_range="1024 65535"; done
pin() { [ -n "$1" ] && echo "taskset -c $1" || true; }
CLI_RUN="nice -n $NICE $(pin "$CLIENT_CPU")"
SRV_RUN="nice -n $NICE $(pin "$SERVER_CPU")"
log() { echo "[$(($(date +%s) - T0))s] $*" >&2; }
cilia() { "$BIN/cilia" --socket "$SOCK" "$@"; }

# --- iptables baseline: a plain veth pair between two namespaces ----------
ip link add "${P}c" netns "$P-vcli" type veth peer name "${P}s" netns "$P-vsrv"
ip -n "$P-vcli" addr add 192.0.2.1/24 dev "${P}c"
ip -n "$P-vsrv" addr add 192.0.2.2/24 dev "${P}s"
ip -n "$P-vcli" link set "${P}c" up
ip -n "$P-vsrv" link set "${P}s" up
# --- the floor: the same, without any rule ------------------------------------
ip link add "${P}pc" netns "$P-pcli" type veth peer name "${P}ps" netns "$P-psrv"
ip -n "$P-pcli" addr add 192.0.2.1/24 dev "${P}pc"
ip -n "$P-psrv" addr add 192.0.2.2/24 dev "${P}ps"
ip -n "$P-pcli" link set "${P}pc" up
ip -n "$P-psrv" link set "${P}ps" up
# --- the two-device floor: client -> node -> server by redirect_peer alone ----
ip link add "${P}hc" netns "$P-hcli" type veth peer name "${P}h1" netns "$P-hnode"
ip link add "${P}hs" netns "$P-hsrv" type veth peer name "${P}h2" netns "$P-hnode"
ip -n "$P-hcli" addr add 192.0.2.1/24 dev "${P}hc"
ip -n "$P-hsrv" addr add 192.0.2.2/24 dev "${P}hs"
for l in "$P-hcli ${P}hc" "$P-hsrv ${P}hs" "$P-hnode ${P}h1" "$P-hnode ${P}h2"; do
  set -- $l; ip -n "$1" link set "$2" up
done
link_attr() { # ns dev attribute
  ip -n "$1" -j link show "$2" | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['$3'])"
}
# redirect_peer delivers the frame as it is: each end addresses the other's MAC.
ip -n "$P-hcli" neigh add 192.0.2.2 lladdr "$(link_attr "$P-hsrv" "${P}hs" address)" dev "${P}hc" nud permanent
ip -n "$P-hsrv" neigh add 192.0.2.1 lladdr "$(link_attr "$P-hcli" "${P}hc" address)" dev "${P}hs" nud permanent
for hop in "h1 h2" "h2 h1"; do
  set -- $hop
  target=$(link_attr "$P-hnode" "${P}$2" ifindex)
  clang-19 -target bpf -O2 -g -Wall -I"/usr/include/$(gcc -print-multiarch)" -DTARGET="$target" \
    -c bench/redirect_peer.c -o "$RUN/redirect_$1.o" ||
    { echo "building bench/redirect_peer.c failed (needs clang-19, libbpf-dev)" >&2; exit 1; }
  ip netns exec "$P-hnode" tc qdisc add dev "${P}$1" clsact
  ip netns exec "$P-hnode" tc filter add dev "${P}$1" ingress bpf da obj "$RUN/redirect_$1.o" sec tc
done

# --- iptables, routed: client -> node -> server through the node's stack ------
routed_path "$P-rcli" "${P}rc" 192.0.2.1/25 "$P-rnode" "${P}r1" 192.0.2.126/25 "${P}r2" 192.0.2.254/25 \
  "$P-rsrv" "${P}rs" 192.0.2.130/25

# --- cilia: agent in a node namespace, three endpoints ----------------------
nsenter --net="/run/netns/$P-node" "$BIN/cilia-agent" --state-dir "$RUN/state" --bpf-root "$BPF" \
  --socket "$SOCK" --ipv6-range fd00:c1b::/112 --ipv4-range 10.201.0.0/24 \
  --ct-budget "$CT_BUDGET" >"$RUN/agent.log" 2>&1 &
AGENT_PID=$!
track "$AGENT_PID"
for _ in $(seq 100); do cilia status >/dev/null 2>&1 && break; sleep 0.1; done
cilia status >/dev/null || { echo "agent did not start:" >&2; cat "$RUN/agent.log" >&2; exit 1; }
cilia endpoint create --netns "$P-srv" --labels app=server >/dev/null
cilia endpoint create --netns "$P-cli" --labels app=client >/dev/null
cilia endpoint create --netns "$P-other" --labels app=other >/dev/null
field() { # label-value field
  cilia -o json endpoint list | python3 -c "import json,sys; print([e['$2'] for e in json.load(sys.stdin) if e['labels'].get('app')=='$1'][0])"
}
SRV_ID=$(field server id); SRV_IP=$(field server ipv4)
SRV_IP=${SRV_IP%/*}

# --- servers, killed on exit ------------------------------------------------
ip netns exec "$P-srv" $SRV_RUN python3 bench/rr.py serve "$PORT" 0.0.0.0 1800 & track $!
ip netns exec "$P-vsrv" $SRV_RUN python3 bench/rr.py serve "$PORT" 0.0.0.0 1800 & track $!
ip netns exec "$P-psrv" $SRV_RUN python3 bench/rr.py serve "$PORT" 0.0.0.0 1800 & track $!
ip netns exec "$P-hsrv" $SRV_RUN python3 bench/rr.py serve "$PORT" 0.0.0.0 1800 & track $!
ip netns exec "$P-rsrv" $SRV_RUN python3 bench/rr.py serve "$PORT" 0.0.0.0 1800 & track $!

reach() { # ns ip: 0 if a TCP connection to ip:PORT completes within 1 s
  ip netns exec "$1" timeout 5 python3 -c 'import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1).close()' "$2" "$PORT" 2>/dev/null
}
for _ in $(seq 50); do reach "$P-cli" "$SRV_IP" && reach "$P-vcli" 192.0.2.2 && reach "$P-pcli" 192.0.2.2 && reach "$P-hcli" 192.0.2.2 && reach "$P-rcli" 192.0.2.130 && break; sleep 0.1; done
reach "$P-cli" "$SRV_IP" || { echo "no connectivity cilia client -> server $SRV_IP:$PORT" >&2; exit 1; }
reach "$P-vcli" 192.0.2.2 || { echo "no connectivity over the veth pair" >&2; exit 1; }
reach "$P-pcli" 192.0.2.2 || { echo "no connectivity over the floor's veth pair" >&2; exit 1; }
reach "$P-hcli" 192.0.2.2 || { echo "no connectivity over the two-device floor" >&2; exit 1; }
reach "$P-rcli" 192.0.2.130 || { echo "no connectivity over the routed path" >&2; exit 1; }

# --- rule generators ----------------------------------------------------------
gen_cnp() { # N DIR: N-1 never-matching fromCIDR rules, then the client rule,
  # as CiliumNetworkPolicies of at most $CHUNK rules each (one import each).
  python3 - "$1" "$PORT" "$2" "$CHUNK" <<'EOF'
import sys
n, port, d, chunk = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
v4 = ["198.51.100.%d/32" % i for i in range(256)] + ["203.0.113.%d/32" % i for i in range(256)]
def cidr(i):  # documentation space only; IPv6 once the 512 IPv4 /32s are used
    return v4[i] if i < len(v4) else "2001:db8:%x:%x::1/128" % ((i >> 16) & 0xffff, i & 0xffff)
ports = '    toPorts:\n    - ports:\n      - port: "%s"\n        protocol: TCP\n' % port
rules = ['  - fromCIDR:\n    - "%s"\n' % cidr(i) + ports for i in range(n - 1)]
rules.append('  - fromEndpoints:\n    - matchLabels:\n        app: client\n' + ports)
for k in range(0, len(rules), chunk):
    with open("%s/cnp-%04d.yaml" % (d, k // chunk), "w") as f:
        f.write('apiVersion: "cilium.io/v2"\nkind: CiliumNetworkPolicy\nmetadata:\n'
                '  name: "policy-scale-%d"\nspec:\n  endpointSelector:\n    matchLabels:\n'
                '      app: server\n  ingress:\n' % (k // chunk) + "".join(rules[k:k + chunk]))
EOF
}
gen_ipt() { # N CHAIN [REPLIES_DEV]: iptables-restore input (IPv4 only: the
  # 512 doc /32s, cycled), the rules in CHAIN (INPUT or FORWARD), policy
  # DROP; REPLIES_DEV: a first rule accepting what comes in on it.
  python3 - "$1" "$PORT" "$2" "${3:-}" <<'EOF'
import sys
n, port, chain, replies = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
v4 = ["198.51.100.%d" % i for i in range(256)] + ["203.0.113.%d" % i for i in range(256)]
pol = {c: "DROP" if c == chain else "ACCEPT" for c in ("INPUT", "FORWARD", "OUTPUT")}
out = ["*filter\n:INPUT %(INPUT)s [0:0]\n:FORWARD %(FORWARD)s [0:0]\n:OUTPUT %(OUTPUT)s [0:0]\n" % pol]
if replies:
    out.append("-A %s -i %s -j ACCEPT\n" % (chain, replies))
rule = "-A %s -s %%s/32 -p tcp -m tcp --dport %s -j ACCEPT\n" % (chain, port)
out += [rule % v4[i % len(v4)] for i in range(n - 1)]
out.append(rule % "192.0.2.1")
out.append("COMMIT\n")
sys.stdout.write("".join(out))
EOF
}
now() { date +%s.%N; }
median() { printf '%s\n' "$@" | { grep -E '^[0-9.]+$' || true; } | sort -g | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
measure() { # ns mode ip: ops/s, or "err"
  local out
  if out=$(ip netns exec "$1" timeout $((DURATION + 30)) $CLI_RUN python3 bench/rr.py "$2" "$3" "$PORT" "$DURATION" 2>"$RUN/rr.err"); then
    echo "$out"
  else
    log "rr.py $2 in $1 -> $3 failed: $(tail -n1 "$RUN/rr.err")"; echo err
  fi
}
entries() { cilia -o json bpf policy get "$SRV_ID" 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d) if isinstance(d, list) else len(d.get("entries", d)))' 2>/dev/null || echo "?"; }

count() { cilia -o json "$@" 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo "?"; }
agent_cpu() { awk '{print $14 + $15}' "/proc/$AGENT_PID/stat" 2>/dev/null || echo 0; } # utime+stime, ticks

declare -A CC IC CR IR FC FR HC HR RC RR IMP NOTE
load() { # N: sets cilia_ok; imports the CNPs (timed) and restores the iptables rules
  local n=$1 f ti t rc imp_out nfiles ipt_t ipt_rules
  cilia policy delete --all >/dev/null 2>&1 || true # "no policies to delete" the first time
  rm -rf "$RUN/cnp"; mkdir -p "$RUN/cnp"
  gen_cnp "$n" "$RUN/cnp"
  gen_ipt "$n" INPUT >"$RUN/ipt.rules"
  gen_ipt "$n" FORWARD "${P}r2" >"$RUN/ipt-routed.rules"
  nfiles=$(ls "$RUN/cnp" | wc -l)
  cilia_ok=1
  if [ -n "${FAILED[$n]:-}" ]; then # failed in an earlier round: do not retry
    cilia_ok=0
  else
    t=$(now)
    for f in "$RUN"/cnp/*.yaml; do
      ti=$(now)
      if imp_out=$(timeout "$IMPORT_TIMEOUT" "$BIN/cilia" --socket "$SOCK" policy import "$f" 2>&1); then
        [ "$nfiles" -gt 1 ] && log "N=$n: imported $(basename "$f") ($(du -k "$f" | cut -f1) KiB) in $(python3 -c "print('%.2f' % ($(now) - $ti))") s"
      else
        rc=$?
        NOTE[$n]="cilia policy import of $(basename "$f") ($((CHUNK * 10#$(basename "$f" .yaml | cut -d- -f2))) rules already in, $(du -k "$f" | cut -f1) KiB) failed after $(python3 -c "print('%.1f' % ($(now) - $ti))") s (rc $rc): $(echo "$imp_out" | tr '\n' ' ' | cut -c1-400)"
        log "${NOTE[$n]}"
        cilia_ok=0
        break
      fi
    done
    if [ "$cilia_ok" = 1 ]; then
      IMP[$n]+=" $(python3 -c "print('%.2f' % ($(now) - $t))")"
    else
      FAILED[$n]="failed after $(python3 -c "print('%.1f' % ($(now) - $t))") s"
    fi
  fi
  t=$(now)
  ip netns exec "$P-vsrv" iptables-restore <"$RUN/ipt.rules"
  ip netns exec "$P-rnode" iptables-restore <"$RUN/ipt-routed.rules"
  ipt_t=$(python3 -c "print('%.2f' % ($(now) - $t))")
  ipt_rules=$(ip netns exec "$P-vsrv" iptables -S INPUT | grep -c '^-A INPUT' || true)
  if [ "$cilia_ok" = 1 ]; then
    # Sanity: the client is allowed, app=other is dropped by the policy.
    reach "$P-cli" "$SRV_IP" || { NOTE[$n]="client cannot reach server after import"; log "${NOTE[$n]}"; cilia_ok=0; }
    if reach "$P-other" "$SRV_IP"; then NOTE[$n]="app=other reached the server: policy not enforced?"; log "${NOTE[$n]}"; fi
  fi
  log "N=$n: cilia import${IMP[$n]:-} s (${FAILED[$n]:-ok}; $nfiles CNP), server policy map entries $(entries), identities $(count identity list), ipcache entries $(count bpf ipcache list); iptables-restore ${ipt_t} s, INPUT rules $ipt_rules"
}

# --- the kernel's BPF statistics: time spent inside programs ----------------
pinned_progs() { # DIR: ids of the programs of the links pinned in DIR (this agent's)
  local f
  for f in "$1"/*; do
    [ -e "$f" ] || continue
    bpftool -j link show pinned "$f" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["prog_id"])' || true
  done | tr '\n' ' '
}
tc_ids() { # NS: ids of the tc programs attached in namespace NS (clsact: floor2's)
  ip netns exec "$1" bpftool -j net show |
    python3 -c 'import json,sys; print(" ".join(str(p["id"]) for d in json.load(sys.stdin) for p in d.get("tc", [])))'
}
prog_stat() { # IDS...: "run_time_ns run_cnt", summed over those programs
  bpftool -j prog show | python3 -c 'import json,sys
ids = set(map(int, sys.argv[1:])); t = c = 0
for p in json.load(sys.stdin):
    if p["id"] in ids:
        t += p.get("run_time_ns", 0); c += p.get("run_cnt", 0)
print(t, c)' "$@"
}
declare -A STAT
stats_pass() { # one run each of cilia and floor2, conn and rr, statistics on
  local mode side ns ip ids socks b bs rate a as
  socks=$(pinned_progs "$BPF/socklb")
  sysctl -qw kernel.bpf_stats_enabled=1
  for mode in conn rr; do
    for side in cilia floor2; do
      if [ "$side" = cilia ]; then ns=$P-cli ip=$SRV_IP ids=$(pinned_progs "$BPF/links"); else ns=$P-hcli ip=192.0.2.2 ids=$(tc_ids "$P-hnode"); fi
      b=$(prog_stat $ids); bs=$(prog_stat $socks)
      rate=$(measure "$ns" "$mode" "$ip")
      a=$(prog_stat $ids); as=$(prog_stat $socks)
      STAT[$side-$mode]=$(python3 -c "import sys
rate, d = sys.argv[1], float(sys.argv[2])
try: ops = float(rate) * d
except ValueError: print('| %s | - | - | - | - | - |' % rate); sys.exit()
t0, c0 = map(int, sys.argv[3].split()); t1, c1 = map(int, sys.argv[4].split())
s0, _ = map(int, sys.argv[5].split()); s1, _ = map(int, sys.argv[6].split())
runs = c1 - c0
print('| %.0f | %.0f | %.1f | %.0f | %.0f |' % (float(rate), (t1 - t0) / ops, runs / ops,
      (t1 - t0) / runs if runs else 0, (s1 - s0) / ops))" "$rate" "$DURATION" "$b" "$a" "$bs" "$as")
    done
  done
  sysctl -qw kernel.bpf_stats_enabled="$BPF_STATS0"
  log "BPF statistics pass: ${STAT[*]}"
}

# Rounds outer, rule counts inner (re-imported every round): slow drift of the
# host's load spreads over all N instead of biasing the last one.
declare -A CCs ICs CRs IRs FCs FRs HCs HRs RCs RRs FAILED
first=$(printf '%s\n' $RULES | sort -n | head -n1) # ratios are to the smallest N
for r in $(seq "$REPS"); do
  for n in $RULES; do
    load "$n"
    sleep "$SETTLE" # let the agent finish any work the import set off
    cpu0=$(agent_cpu)
    [ "$cilia_ok" = 1 ] && CCs[$n]+=" $(measure "$P-cli" conn "$SRV_IP")"
    ICs[$n]+=" $(measure "$P-vcli" conn 192.0.2.2)"
    [ "$cilia_ok" = 1 ] && CRs[$n]+=" $(measure "$P-cli" rr "$SRV_IP")"
    IRs[$n]+=" $(measure "$P-vcli" rr 192.0.2.2)"
    FCs[$n]+=" $(measure "$P-pcli" conn 192.0.2.2)"
    FRs[$n]+=" $(measure "$P-pcli" rr 192.0.2.2)"
    HCs[$n]+=" $(measure "$P-hcli" conn 192.0.2.2)"
    HRs[$n]+=" $(measure "$P-hcli" rr 192.0.2.2)"
    RCs[$n]+=" $(measure "$P-rcli" conn 192.0.2.130)"
    RRs[$n]+=" $(measure "$P-rcli" rr 192.0.2.130)"
    log "N=$n round $r: cilia conn${CCs[$n]:- skipped} | ipt conn${ICs[$n]} | cilia rr${CRs[$n]:- skipped} | ipt rr${IRs[$n]} | floor conn${FCs[$n]} rr${FRs[$n]} | floor2 conn${HCs[$n]} rr${HRs[$n]} | routed ipt conn${RCs[$n]} rr${RRs[$n]}; agent CPU $(python3 -c "print('%.2f' % (($(agent_cpu) - $cpu0) / $(getconf CLK_TCK)))") s; iptables matching rule: $(ip netns exec "$P-vsrv" iptables -L INPUT -v -n -x | tail -n1 | awk '{print $1}') packets"
    # The statistics pass once, in the last round, at the smallest N.
    [ "$r" = "$REPS" ] && [ "$n" = "$first" ] && [ "$cilia_ok" = 1 ] && stats_pass
  done
done
for n in $RULES; do
  CC[$n]=$(median ${CCs[$n]:-}); IC[$n]=$(median ${ICs[$n]}); CR[$n]=$(median ${CRs[$n]:-}); IR[$n]=$(median ${IRs[$n]})
  FC[$n]=$(median ${FCs[$n]}); FR[$n]=$(median ${FRs[$n]})
  HC[$n]=$(median ${HCs[$n]}); HR[$n]=$(median ${HRs[$n]})
  RC[$n]=$(median ${RCs[$n]}); RR[$n]=$(median ${RRs[$n]})
  if [ -n "${FAILED[$n]:-}" ]; then IMP[$n]=${FAILED[$n]}; else IMP[$n]=$(median ${IMP[$n]:-}); fi
  if python3 -c "import sys; sys.exit(0 if float('${CC[$n]}') * min(${DURATION}, 10) > 55000 else 1)" 2>/dev/null; then
    log "N=$n: cilia conn rate ${CC[$n]}/s reuses source ports within cilia's 10 s CT close timeout: some SYNs may skip the policy"
  fi
done

ratio() { # value base
  python3 -c "import sys
try: print('%.2f' % (float(sys.argv[1]) / float(sys.argv[2])))
except Exception: print('-')" "$1" "$2"
}
echo
echo "Median of $REPS rounds (each round: every N in turn, policy re-imported) of ${DURATION} s runs, one connection at a time (latency bound), 64 B request and response; client/server CPU ${CLIENT_CPU:-any}/${SERVER_CPU:-any}, nice $NICE; ratio: to the same column at N=$first."
echo
echo "| rules N | cilia new conn/s (ratio) | iptables new conn/s (ratio) | cilia rr/s (ratio) | iptables rr/s (ratio) | floor new conn/s, rr/s | cilia policy import s (median) |"
echo "|---|---|---|---|---|---|---|"
for n in $RULES; do
  echo "| $n | ${CC[$n]:--} ($(ratio "${CC[$n]:-}" "${CC[$first]:-}")) | ${IC[$n]} ($(ratio "${IC[$n]}" "${IC[$first]}")) | ${CR[$n]:--} ($(ratio "${CR[$n]:-}" "${CR[$first]:-}")) | ${IR[$n]} ($(ratio "${IR[$n]}" "${IR[$first]}")) | ${FC[$n]}, ${FR[$n]} | ${IMP[$n]} |"
done
echo
echo "Against each other and the floor (a veth pair without rules), by N: new conn/s cilia/iptables, cilia/floor, iptables/floor; rr/s the same."
echo
echo "| rules N | conn cilia/iptables | conn cilia/floor | conn iptables/floor | rr cilia/iptables | rr cilia/floor | rr iptables/floor |"
echo "|---|---|---|---|---|---|---|"
for n in $RULES; do
  echo "| $n | $(ratio "${CC[$n]:-}" "${IC[$n]}") | $(ratio "${CC[$n]:-}" "${FC[$n]}") | $(ratio "${IC[$n]}" "${FC[$n]}") | $(ratio "${CR[$n]:-}" "${IR[$n]}") | $(ratio "${CR[$n]:-}" "${FR[$n]}") | $(ratio "${IR[$n]}" "${FR[$n]}") |"
done
echo
echo "The two-device floor (client -> node -> server by redirect_peer, no policy): new conn/s and rr/s, cilia against it, it against the one-device floor."
echo
echo "| rules N | floor2 new conn/s | floor2 rr/s | conn cilia/floor2 | rr cilia/floor2 | conn floor2/floor | rr floor2/floor |"
echo "|---|---|---|---|---|---|---|"
for n in $RULES; do
  echo "| $n | ${HC[$n]} | ${HR[$n]} | $(ratio "${CC[$n]:-}" "${HC[$n]}") | $(ratio "${CR[$n]:-}" "${HR[$n]}") | $(ratio "${HC[$n]}" "${FC[$n]}") | $(ratio "${HR[$n]}" "${FR[$n]}") |"
done
echo
echo "iptables on cilia's shape (client -> node -> server, routed by the node's stack, the rules in its FORWARD chain): new conn/s and rr/s, cilia against it."
echo
echo "| rules N | routed iptables new conn/s | routed iptables rr/s | conn cilia/routed | rr cilia/routed | conn routed/iptables | rr routed/iptables |"
echo "|---|---|---|---|---|---|---|"
for n in $RULES; do
  echo "| $n | ${RC[$n]} | ${RR[$n]} | $(ratio "${CC[$n]:-}" "${RC[$n]}") | $(ratio "${CR[$n]:-}" "${RR[$n]}") | $(ratio "${RC[$n]}" "${IC[$n]}") | $(ratio "${RR[$n]}" "${IR[$n]}") |"
done
if [ -n "${STAT[cilia-conn]:-}" ]; then
  echo
  echo "Time inside BPF programs (kernel.bpf_stats_enabled, one more ${DURATION} s run each at N=$first, last round; the statistics add two clock reads to every run): the tc programs (cilia: its endpoint programs, every one the agent attached; floor2: its redirect_peer programs) per operation, and cilia's socket programs (attached to the cgroup root: they run for every connection on the machine, the baselines' too)."
  echo
  echo "| run | ops/s | tc programs ns per op | tc program runs per op | ns per run | socket programs ns per op |"
  echo "|---|---|---|---|---|---|"
  for k in cilia-conn floor2-conn cilia-rr floor2-rr; do echo "| $k ${STAT[$k]}"; done
fi
for n in $RULES; do [ -n "${NOTE[$n]:-}" ] && echo && echo "N=$n: ${NOTE[$n]}"; done
log "total $(($(date +%s) - T0)) s"
