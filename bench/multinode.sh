#!/usr/bin/env bash
# Cross-node benchmarks: a pod on node1 talking to a pod on node2, three node
# namespaces on a fabric bridge (the addressing of cilia-testnet's Cluster:
# node N = 198.51.100.N / 2001:db8:100::N on eth0, pods fd00:c1a:N::/112 and
# 10.200.N.0/24), each path in a fresh fabric, all in the same run:
#   plain   the baseline: plain Linux, no agent, no BPF: pod veths, kernel
#           routes (node -> other node's pod range via its underlay address),
#           ip_forward on in the node namespaces;
#   vxlan   cilia agents (--tunnel vxlan) with etcd in the fabric namespace;
#   native  cilia agents (--tunnel disabled, native routing).
# Measured: iperf3 TCP throughput (single stream, $DURATION s) and TCP
# request/responses per second on one connection (bench/rr.py rr, 64 B each
# way, latency bound), both families; printed as ratios against plain Linux.
# For the cilia paths also the time to converge:
#   endpoint -> enforced: the client pod on node2 may egress only to
#     app=server (a CiliumNetworkPolicy imported on node1); a new app=server
#     endpoint is created on node1; seconds until the client's connection to
#     it is answered (a refused connection counts: the policy let it through);
#   etcd restart -> resync: etcd is killed (-9) and started again; seconds
#     from "etcd healthy" until every node lists all nodes, and until a new
#     app=server endpoint on node1 is reachable from the client on node2.
# Needs root, iperf3, etcd (scripts/setup.sh) and the release binaries.
#   MODES="plain vxlan native"   which paths to run (plain always first)
#   DURATION=5                   seconds per measurement (max 60)
#   CILIA_BENCH_BIN=target/release
# Everything it creates (namespaces cnode<pid>*/cep<pid>*, run dir, bpffs dir)
# is removed on exit, also on failure or Ctrl-C; processes are ended by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
MODES=${MODES:-"plain vxlan native"}
DURATION=${DURATION:-5}
[ "$DURATION" -le 60 ] || DURATION=60
BIN=${CILIA_BENCH_BIN:-target/release}
NODES=3
CONVERGE=${CONVERGE:-60}   # s, bound of every convergence wait
P=$$
RUN=/run/cnode$P
BPF=/sys/fs/bpf/cnode$P
source scripts/lib/procs.sh
source bench/lib/prelude.sh
NSS=()
bench_traps cleanup_tracked
need_root
for tool in iperf3 python3; do command -v $tool >/dev/null || { echo "needs $tool (scripts/setup.sh)" >&2; exit 1; }; done
mkdir -p "$RUN"

# --- fabric -----------------------------------------------------------------
# fabric TAG: namespaces cnode$P<TAG>f (bridge) and cnode$P<TAG>n1..n3.
fabric() {
  local t=$1 f="cnode$P$1f" n node
  ip netns add "$f"; NSS+=("$f")
  ip -n "$f" link set lo up
  ip -n "$f" link add br0 type bridge forward_delay 0 stp_state 0 mcast_snooping 0
  ip -n "$f" addr add 198.51.100.254/24 dev br0
  ip -n "$f" addr add 2001:db8:100::fe/64 dev br0 nodad
  ip -n "$f" link set br0 up
  for n in $(seq $NODES); do
    node="cnode$P${t}n$n"
    ip netns add "$node"; NSS+=("$node")
    ip -n "$node" link set lo up
    ip -n "$node" link add eth0 type veth peer name "n$n" netns "$f"
    ip -n "$f" link set "n$n" master br0
    ip -n "$f" link set "n$n" up
    ip -n "$node" addr add "198.51.100.$n/24" dev eth0
    ip -n "$node" addr add "2001:db8:100::$n/64" dev eth0 nodad
    ip -n "$node" link set eth0 up
  done
}
node_ns() { echo "cnode$P$1n$2"; }
# new_pod_ns NAME: creates cep$P<NAME>, sets NS (no subshell: NSS must see it).
new_pod_ns() { NS="cep$P$1"; ip netns add "$NS"; NSS+=("$NS"); ip -n "$NS" link set lo up; }
inpod() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# --- measurements -------------------------------------------------------------
# throughput VAR CLIENT_NS SERVER_NS SERVER_IP: VAR = Gbit/s. Servers start
# here, not in a $(...) subshell, so that cleanup knows their PIDs.
throughput() {
  inpod "$3" iperf3 -s -1 -B "$4" >/dev/null 2>&1 &
  track $!
  wait_listen "$3" 5201
  printf -v "$1" '%s' "$(inpod "$2" timeout $((DURATION + 20)) iperf3 -c "$4" -t "$DURATION" -J |
    python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))')"
}
# rr VAR CLIENT_NS SERVER_NS SERVER_IP: VAR = request/responses per second
rr() {
  inpod "$3" python3 bench/rr.py serve 7001 "$4" $((DURATION + 30)) >/dev/null 2>&1 &
  local srv=$!
  track $srv
  wait_listen "$3" 7001
  printf -v "$1" '%s' "$(inpod "$2" timeout $((DURATION + 20)) python3 bench/rr.py rr "$4" 7001 "$DURATION")"
  kill "$srv" 2>/dev/null || true
}
# wait_listen NS PORT: until a TCP socket listens on PORT in NS (10 s). A test
# connection would spend iperf3's one-off server.
wait_listen() {
  for _ in $(seq 100); do
    [ -n "$(ip netns exec "$1" ss -Hltn "sport = :$2")" ] && return
    sleep 0.1
  done
  echo "nothing listens on port $2 in $1" >&2; exit 1
}
# until_answered CLIENT_NS IP PORT T0: seconds from epoch T0 until a connection
# is answered (accepted or refused: either means the packets got through).
until_answered() {
  inpod "$1" python3 - "$2" "$3" "$4" "$CONVERGE" <<'EOF'
import errno, socket, sys, time
ip, port, t0, bound = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
end = time.monotonic() + bound
while time.monotonic() < end:
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    s.settimeout(0.2)
    try:
        s.connect((ip, port))
        break
    except ConnectionRefusedError:
        break
    except OSError:
        time.sleep(0.02)
    finally:
        s.close()
else:
    sys.exit("never answered within %.0f s" % bound)
print("%.2f" % (time.time() - t0))
EOF
}
measure_pair() { # TAG CLIENT_NS SERVER_NS SERVER_IP6 SERVER_IP4: sets R_<TAG>_{t6,t4,r6,r4}
  throughput "R_$1_t6" "$2" "$3" "$4"
  throughput "R_$1_t4" "$2" "$3" "$5"
  rr "R_$1_r6" "$2" "$3" "$4"
  rr "R_$1_r4" "$2" "$3" "$5"
}

# --- plain Linux ----------------------------------------------------------------
run_plain() {
  fabric p
  local n node pod
  for n in 1 2; do
    node=$(node_ns p $n)
    ip netns exec "$node" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
    new_pod_ns "p$n"; pod=$NS
    ip -n "$node" link add pod0 type veth peer name eth0 netns "$pod"
    ip -n "$node" addr add "10.200.$n.1/24" dev pod0
    ip -n "$node" addr add "fd00:c1a:$n::1/112" dev pod0 nodad
    ip -n "$node" link set pod0 up
    ip -n "$pod" addr add "10.200.$n.2/24" dev eth0
    ip -n "$pod" addr add "fd00:c1a:$n::2/112" dev eth0 nodad
    ip -n "$pod" link set eth0 up
    # Pods reach other pod ranges through their node; nothing else.
    ip -n "$pod" route add 10.200.0.0/16 via "10.200.$n.1"
    ip -n "$pod" route add fd00:c1a::/32 via "fd00:c1a:$n::1"
  done
  ip -n "$(node_ns p 1)" route add 10.200.2.0/24 via 198.51.100.2
  ip -n "$(node_ns p 1)" route add fd00:c1a:2::/112 via 2001:db8:100::2
  ip -n "$(node_ns p 2)" route add 10.200.1.0/24 via 198.51.100.1
  ip -n "$(node_ns p 2)" route add fd00:c1a:1::/112 via 2001:db8:100::1
  for ip in fd00:c1a:2::2 10.200.2.2; do
    inpod "cep${P}p1" ping -c 1 -w 5 "$ip" >/dev/null || { echo "plain Linux: no route to $ip" >&2; exit 1; }
  done
  measure_pair plain "cep${P}p1" "cep${P}p2" fd00:c1a:2::2 10.200.2.2
}

# --- cilia ----------------------------------------------------------------------
cilia_n() { local t=$1 n=$2; shift 2; "$BIN/cilia" --socket "$RUN/$t/n$n.sock" "$@"; }
json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
start_etcd() { # TAG
  local t=$1
  nsenter --net="/run/netns/cnode$P${t}f" etcd --name bench --data-dir "$RUN/$t/etcd" \
    --listen-client-urls http://198.51.100.254:2379 --advertise-client-urls http://198.51.100.254:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster bench=http://127.0.0.1:2380 >>"$RUN/$t/etcd.log" 2>&1 &
  ETCD_PID=$!
  track $ETCD_PID
  for _ in $(seq 150); do
    ip netns exec "cnode$P${t}f" curl -sf --max-time 1 http://198.51.100.254:2379/health 2>/dev/null | grep -q '"true"' && return
    sleep 0.1
  done
  echo "etcd did not become healthy:"; tail -20 "$RUN/$t/etcd.log"; exit 1
}
start_agent() { # TAG N TUNNEL
  local t=$1 n=$2
  nsenter --net="/run/netns/$(node_ns "$t" "$n")" "$BIN/cilia-agent" \
    --state-dir "$RUN/$t/state$n" --bpf-root "$BPF/$t$n" --socket "$RUN/$t/n$n.sock" \
    --ipv6-range "fd00:c1a:$n::/112" --ipv4-range "10.200.$n.0/24" \
    --node-name "node$n" --node-ip "198.51.100.$n" --kvstore etcd \
    --kvstore-endpoints http://198.51.100.254:2379 --tunnel "$3" --node-lease-ttl 5 \
    --peer-api-addr "198.51.100.$n:4244" --health-netns "cnode$P${t}h$n" \
    >>"$RUN/$t/agent$n.log" 2>&1 &
  NSS+=("cnode$P${t}h$n")
  track $!
  for _ in $(seq 200); do cilia_n "$t" "$n" status >/dev/null 2>&1 && return; sleep 0.1; done
  echo "agent node$n ($3) did not start:"; tail -20 "$RUN/$t/agent$n.log"; exit 1
}
# nodes_listed TAG: every agent lists all nodes
nodes_listed() {
  local n
  for n in $(seq $NODES); do
    cilia_n "$1" "$n" node list -o json 2>/dev/null |
      python3 -c "import json,sys; sys.exit(0 if len(json.load(sys.stdin)) == $NODES else 1)" 2>/dev/null || return 1
  done
}
# seconds_until T0 CMD...: seconds from epoch T0 until CMD succeeds (bounded)
seconds_until() {
  local t0=$1; shift
  for _ in $(seq $((CONVERGE * 20))); do
    if "$@"; then python3 -c "import time; print('%.2f' % (time.time() - $t0))"; return; fi
    sleep 0.05
  done
  echo "n/a"
}
pod() { # TAG N NAME LABELS: sets POD_NS, POD_IP6, POD_IP4
  local json
  new_pod_ns "$1$3"; POD_NS=$NS
  json=$(cilia_n "$1" "$2" endpoint create --netns "$POD_NS" --labels "$4" -o json)
  POD_IP6=$(json_field ipv6 <<<"$json")
  POD_IP4=$(json_field ipv4 <<<"$json")
}
CLIENT_EGRESS='apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "client-egress"
spec:
  endpointSelector:
    matchLabels:
      app: client
  egress:
  - toEndpoints:
    - matchLabels:
        app: server'

run_cilia() { # TAG TUNNEL
  local t=$1 n s s6 s4 cns t0
  mkdir -p "$RUN/$t"
  fabric "$t"
  start_etcd "$t"
  for n in $(seq $NODES); do start_agent "$t" "$n" "$2"; done
  for _ in $(seq $((CONVERGE * 10))); do nodes_listed "$t" && break; sleep 0.1; done
  nodes_listed "$t" || echo "warning: $t: not every node lists all $NODES nodes" >&2
  pod "$t" 2 srv app=server; s=$POD_NS s6=$POD_IP6 s4=$POD_IP4
  pod "$t" 1 cli app=client; cns=$POD_NS
  for _ in $(seq $((CONVERGE * 5))); do inpod "$cns" ping -c 1 -W 1 "$s4" >/dev/null 2>&1 && break; sleep 0.2; done ||
    true
  inpod "$cns" ping -c 1 -W 1 "$s4" >/dev/null 2>&1 || echo "warning: $t: node1's pod does not reach $s4" >&2
  measure_pair "$t" "$cns" "$s" "$s6" "$s4"

  # Convergence: the client (now on node2) may egress only to app=server.
  pod "$t" 2 cli2 app=client; cns=$POD_NS
  cilia_n "$t" 1 policy import - <<<"$CLIENT_EGRESS" >/dev/null
  sleep 1
  t0=$(python3 -c 'import time; print(time.time())')
  pod "$t" 1 new1 app=server
  printf -v "C_${t}_ep" '%s' "$(until_answered "$cns" "$POD_IP4" 7999 "$t0" || echo n/a)"

  kill -9 "$ETCD_PID"; wait "$ETCD_PID" 2>/dev/null || true
  sleep 2
  start_etcd "$t"
  t0=$(python3 -c 'import time; print(time.time())')
  printf -v "C_${t}_nl" '%s' "$(seconds_until "$t0" nodes_listed "$t")"
  pod "$t" 1 new2 app=server
  printf -v "C_${t}_rs" '%s' "$(until_answered "$cns" "$POD_IP4" 7999 "$t0" || echo n/a)"
}

CILIA_MODES=()
for mode in $MODES; do
  case $mode in
    plain) ;;
    vxlan|native)
      CILIA_MODES+=("$mode")
      need_bins cilia cilia-agent
      command -v etcd >/dev/null || { echo "needs etcd (scripts/setup.sh)" >&2; exit 1; } ;;
    *) echo "unknown mode $mode (plain, vxlan, native)" >&2; exit 1 ;;
  esac
done
run_plain
for mode in "${CILIA_MODES[@]}"; do
  case $mode in
    vxlan) run_cilia vxlan vxlan ;;
    native) run_cilia native disabled ;;
  esac
done

ratio() { python3 -c "
import sys
try:
    print('%.2f' % (float(sys.argv[1]) / float(sys.argv[2])))
except (ValueError, ZeroDivisionError):
    print('n/a')" "$1" "$2"; }
label() { case $1 in plain) echo "plain Linux: veth + kernel routes, no BPF (baseline)";; vxlan) echo "cilia, VXLAN overlay";; native) echo "cilia, native routing";; esac; }
val() { local n="R_$1_$2"; echo "${!n}"; }
echo "## Pod on node1 -> pod on node2 (single TCP stream ${DURATION} s; RR: 64 B request/response on one connection)"
echo
echo "| path | IPv6 Gbit/s | IPv4 Gbit/s | IPv6 RR/s | IPv4 RR/s |"
echo "|---|---|---|---|---|"
for mode in plain "${CILIA_MODES[@]}"; do
  echo "| $(label "$mode") | $(val "$mode" t6) | $(val "$mode" t4) | $(val "$mode" r6) | $(val "$mode" r4) |"
done
if [ ${#CILIA_MODES[@]} -gt 0 ]; then
  echo
  echo "| ratio against plain Linux | IPv6 throughput | IPv4 throughput | IPv6 RR | IPv4 RR |"
  echo "|---|---|---|---|---|"
  for mode in "${CILIA_MODES[@]}"; do
    echo "| $(label "$mode") | $(ratio "$(val "$mode" t6)" "$(val plain t6)") | $(ratio "$(val "$mode" t4)" "$(val plain t4)") | $(ratio "$(val "$mode" r6)" "$(val plain r6)") | $(ratio "$(val "$mode" r4)" "$(val plain r4)") |"
  done
  echo
  echo "## Time to converge (seconds)"
  echo
  echo "| path | new endpoint on node1 -> allowed by node2's egress policy | etcd restart -> node lists complete | etcd restart -> new endpoint reachable from node2 |"
  echo "|---|---|---|---|"
  for mode in "${CILIA_MODES[@]}"; do
    c() { local n="C_$1_$2"; echo "${!n}"; }
    echo "| $(label "$mode") | $(c "$mode" ep) | $(c "$mode" nl) | $(c "$mode" rs) |"
  done
fi
