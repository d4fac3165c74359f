#!/usr/bin/env bash
# The main job across nodes (`scripts/demo.sh --nodes N`, N >= 2): an etcd
# and N cilia-agents, each agent in a network namespace that plays a node,
# the nodes joined by an underlay (veths to a bridge in a "fabric"
# namespace, documentation addresses 198.51.100.0/24 and 2001:db8:100::/64).
# The Star Wars scenario runs across them: the deathstar on node 1, the
# tiefighter and the xwing on node 2. The policy is imported once, on node 1,
# and holds on every node; on the overlay (the default, CILIA_DEMO_TUNNEL=
# disabled for native routing) the deathstar's node decides with the
# identity the VXLAN header carried. `cilia observe --cluster` shows the
# flows of all nodes in one stream.
# Everything lives in namespaces this script creates and is removed on exit
# (success, failure or Ctrl-C); processes are ended by PID.
#   CILIA_DEMO_KEEP=1        leave it running
#   CILIA_DEMO_BIN=DIR       use binaries already built in DIR (skips setup.sh)
#   CILIA_DEMO_NAME=N        prefix of its namespaces and directories (default cilia-mdemo)
#   CILIA_DEMO_NODES=N       number of nodes (default 2)
#   CILIA_DEMO_TUNNEL=MODE   vxlan (default) or disabled
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/procs.sh
source scripts/lib/demo.sh
if [ "$(id -u)" -ne 0 ]; then
  echo "demo-cluster.sh: run as root (it creates network namespaces and loads BPF programs)" >&2
  exit 1
fi
if [ -z "${CILIA_DEMO_BIN:-}" ]; then scripts/setup.sh; fi
command -v etcd >/dev/null || { echo "demo-cluster.sh: etcd not found (Debian etcd-server; scripts/setup.sh installs it)" >&2; exit 1; }

BIN=${CILIA_DEMO_BIN:-target/release}
P=${CILIA_DEMO_NAME:-cilia-mdemo}
N=${CILIA_DEMO_NODES:-2}
TUNNEL=${CILIA_DEMO_TUNNEL:-vxlan}
[ "$N" -ge 2 ] || { echo "demo-cluster.sh: --nodes must be at least 2" >&2; exit 2; }
RUN=/run/$P
BPF=/sys/fs/bpf/$P
FABRIC=$P-fabric
ETCD=http://198.51.100.254:2379
NODES=(); HEALTH=()
for i in $(seq "$N"); do NODES+=("$P-node$i"); HEALTH+=("$P-health$i"); done
SHIPS=(deathstar tiefighter xwing)
NSS=("$FABRIC" "${NODES[@]}" "${HEALTH[@]}" "${SHIPS[@]/#/$P-}")
declare -A AGENT_PID=()

remove_all() {
  stop_tracked
  del_netns "${NSS[@]}"
  rm -rf "$RUN" "$BPF"
}
cleanup() {
  if [ "${CILIA_DEMO_KEEP:-0}" = 1 ]; then
    echo "(kept: CILIA_SOCKET=$RUN/node1/cilia.sock and node2 ... ; remove with CILIA_DEMO_NAME=$P and a rerun)"
    return
  fi
  remove_all
}
trap cleanup EXIT
trap 'exit 130' INT TERM
remove_all
mkdir -p "$RUN"

on() { local n=$1; shift; CILIA_SOCKET=$RUN/node$n/cilia.sock "$BIN/cilia" "$@"; }
start_agent() { # node number
  local i=$1
  mkdir -p "$RUN/node$i"
  nsenter --net=/run/netns/$P-node$i "$BIN/cilia-agent" --state-dir "$RUN/node$i/state" \
    --bpf-root "$BPF/node$i" --socket "$RUN/node$i/cilia.sock" --node-name "node$i" \
    --node-ip "198.51.100.$i" --ipv6-range "fd00:c1a:$i::/112" --ipv4-range "10.200.$i.0/24" \
    --kvstore etcd --kvstore-endpoints "$ETCD" --tunnel "$TUNNEL" --health-netns "$P-health$i" \
    >>"$RUN/node$i/agent.log" 2>&1 &
  AGENT_PID[$i]=$!
  track "${AGENT_PID[$i]}"
  for _ in $(seq 150); do on "$i" status >/dev/null 2>&1 && return; sleep 0.1; done
  echo "agent of node$i did not start:"; cat "$RUN/node$i/agent.log"; exit 1
}
field() { # node class key
  on "$1" endpoint list -o json | python3 -c "import json,sys; print([e['$3'] for e in json.load(sys.stdin) if e['labels'].get('class')=='$2'][0])"
}

say "the underlay: fabric namespace $FABRIC with bridge br0, $N node namespaces on it"
ip netns add "$FABRIC"
ip -n "$FABRIC" link set lo up
ip -n "$FABRIC" link add br0 type bridge
ip -n "$FABRIC" addr add 198.51.100.254/24 dev br0
ip -n "$FABRIC" addr add 2001:db8:100::fe/64 dev br0 nodad
ip -n "$FABRIC" link set br0 up
for i in $(seq "$N"); do
  ns=$P-node$i
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$FABRIC" link add "n$i" type veth peer name eth0 netns "$ns"
  ip -n "$FABRIC" link set "n$i" master br0 up
  ip -n "$ns" addr add "198.51.100.$i/24" dev eth0
  ip -n "$ns" addr add "2001:db8:100::$i/64" dev eth0 nodad
  ip -n "$ns" link set eth0 up
done

say "etcd in the fabric namespace, at $ETCD"
ip netns exec "$FABRIC" etcd --name demo --data-dir "$RUN/etcd" \
  --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster demo=http://127.0.0.1:2380 >"$RUN/etcd.log" 2>&1 &
track $!
for _ in $(seq 100); do ip netns exec "$FABRIC" curl -sf "$ETCD/health" >/dev/null 2>&1 && break; sleep 0.1; done

say "one cilia-agent per node (--kvstore etcd --tunnel $TUNNEL)"
for i in $(seq "$N"); do start_agent "$i"; done
for _ in $(seq 100); do
  [ "$(on 1 node list -o json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" -ge "$N" ] && break
  sleep 0.1
done
on 1 node list
on 1 status --cluster

say "the deathstar on node1; the tiefighter and the xwing on node2"
ip netns add "$P-deathstar"
on 1 endpoint create --netns "$P-deathstar" --labels org=empire,class=deathstar
ip netns add "$P-tiefighter"
on 2 endpoint create --netns "$P-tiefighter" --labels org=empire,class=tiefighter
ip netns add "$P-xwing"
on 2 endpoint create --netns "$P-xwing" --labels org=alliance,class=xwing
on 1 endpoint list
on 2 endpoint list
DS6=$(field 1 deathstar ipv6); DS4=$(field 1 deathstar ipv4)
ip netns exec "$P-deathstar" "$BIN/deathstar" 80 >/dev/null 2>&1 &
track $!
for _ in $(seq 100); do in_ship tiefighter curl -s --max-time 1 "http://[$DS6]/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

say "cluster-wide identities: the same labels have the same number on every node"
on 1 identity list
on 2 identity list

say "before any policy, both ships land across nodes (IPv6 and IPv4)"
for ship in tiefighter xwing; do land $ship "[$DS6]"; land $ship "$DS4"; done

say "import the L3/L4 policy ONCE, on node1: only org=empire may reach the deathstar, on TCP/80"
on 1 policy import examples/starwars/cnp-l3-l4.yaml
for _ in $(seq 50); do on 2 policy get -o json 2>/dev/null | grep -q rule1 && break; sleep 0.1; done
echo "  node2 has it too:"; on 2 policy get | sed 's/^/    /' | head -5
for ship in tiefighter xwing; do land $ship "[$DS6]"; land $ship "$DS4"; done

say "the whole cluster's flows in one stream (cilia observe --cluster), each naming its node"
on 2 observe --cluster --to-label class=deathstar --protocol TCP --last 6

say "import the L7 policy, this time on node2: org=empire may only POST /v1/request-landing"
echo "  (the deathstar's node hands the tiefighter's flows, arriving over the overlay, to its cilia-proxy)"
on 2 policy import examples/starwars/cnp-l7.yaml
for _ in $(seq 100); do on 1 status --verbose 2>/dev/null | grep -q 'l7-proxy.*ok' && break; sleep 0.1; done
for addr in "[$DS6]" "$DS4"; do
  call tiefighter "$addr" POST /v1/request-landing
  call tiefighter "$addr" PUT /v1/exhaust-port
  call xwing "$addr" POST /v1/request-landing
done
say "the HTTP requests, as node1's proxy saw them, asked from node2 (cilia observe --cluster --type l7)"
on 2 observe --cluster --type l7 --last 4

say "the node list: addresses, pod ranges, health probed over the datapath"
sleep 3
on 2 node list

say "done (CILIA_DEMO_KEEP=1 keeps it running)"
