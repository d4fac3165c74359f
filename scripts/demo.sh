#!/usr/bin/env bash
# The main job: sets everything up, starts cilia-agent on its embedded
# defaults inside a node network namespace, and runs the Star Wars scenario of
# Cilium's getting-started guide, live: endpoints deathstar, tiefighter and
# xwing; before policy both ships land; after importing
# examples/starwars/cnp-l3-l4.yaml the tiefighter lands and the xwing is
# dropped; after examples/starwars/cnp-l7.yaml (HTTP rules, enforced by
# cilia-proxy) the tiefighter may still land but its PUT /v1/exhaust-port is
# answered 403 "Access denied". Then a trace, the kernel's maps, and an agent
# crash that traffic (L7 included) survives. Everything lives in namespaces this script creates and is removed
# on exit — success, failure or Ctrl-C: every process it starts is recorded by
# PID and ended by PID, with whatever still runs in its namespaces.
#   CILIA_DEMO_KEEP=1   leave it running
#   CILIA_DEMO_BIN=DIR  use binaries already built in DIR (e.g. target/debug);
#                       skips scripts/setup.sh (packages, release build)
#   CILIA_DEMO_NAME=N   name of its namespaces, run dir and bpffs dir (default
#                       cilia-demo), so a test can run it beside a user's demo
#   --nodes N           run it across N nodes (scripts/demo-cluster.sh): etcd,
#                       one agent per node namespace, the VXLAN overlay
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--nodes" ]; then
  case "${2:-}" in
    1) shift 2 ;;
    [2-9]) CILIA_DEMO_NODES=$2 exec scripts/demo-cluster.sh ;;
    *) echo "demo.sh: --nodes takes a number from 1 to 9" >&2; exit 2 ;;
  esac
fi
[ $# -eq 0 ] || { echo "demo.sh: unknown argument $1 (only --nodes N)" >&2; exit 2; }
source scripts/lib/procs.sh
source scripts/lib/demo.sh
if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh: run as root (it creates network namespaces and loads BPF programs): in a root shell scripts/demo.sh, from another account sudo scripts/demo.sh" >&2
  exit 1
fi
if [ -z "${CILIA_DEMO_BIN:-}" ]; then scripts/setup.sh; fi

BIN=${CILIA_DEMO_BIN:-target/release}
P=${CILIA_DEMO_NAME:-cilia-demo}
RUN=/run/$P
BPF=/sys/fs/bpf/$P
NODE=$P-node
export CILIA_SOCKET=$RUN/cilia.sock
AGENT_ARGS=(--state-dir "$RUN/state" --bpf-root "$BPF" --socket "$CILIA_SOCKET"
  --ipv6-range fd00:c1a::/112 --ipv4-range 10.200.0.0/24)
SHIPS=(deathstar tiefighter xwing)
NSS=("$NODE" "${SHIPS[@]/#/$P-}")
AGENT_PID=

# Also run first, for what a previous run killed without its trap left:
# its namespaces (and the processes inside them) and files; nothing else.
remove_all() {
  stop_tracked
  del_netns "${NSS[@]}"
  rm -rf "$RUN" "$BPF"
}
cleanup() {
  if [ "${CILIA_DEMO_KEEP:-0}" = 1 ]; then
    echo "(kept: agent pid $AGENT_PID in netns $NODE; export CILIA_SOCKET=$CILIA_SOCKET)"
    return
  fi
  remove_all
}
trap cleanup EXIT
trap 'exit 130' INT TERM
remove_all
mkdir -p "$RUN"

cilia() { "$BIN/cilia" "$@"; }
start_agent() { # nsenter execs the agent: $! is the agent's PID
  nsenter --net=/run/netns/$NODE "$BIN/cilia-agent" "${AGENT_ARGS[@]}" >>"$RUN/agent.log" 2>&1 &
  AGENT_PID=$!
  track "$AGENT_PID"
  for _ in $(seq 100); do cilia status >/dev/null 2>&1 && return; sleep 0.1; done
  echo "agent did not start:"; cat "$RUN/agent.log"; exit 1
}
field() { cilia endpoint list -o json | python3 -c "import json,sys; print([e['$2'] for e in json.load(sys.stdin) if e['labels'].get('class')=='$1'][0])"; }

say "node namespace $NODE, IP forwarding off; cilia-agent on its embedded store"
ip netns add $NODE
ip -n $NODE link set lo up
start_agent
cilia status

say "three endpoints, each in its own network namespace, labelled as in the Star Wars demo"
ip netns add "$P-deathstar"
cilia endpoint create --netns "$P-deathstar" --labels org=empire,class=deathstar
ip netns add "$P-tiefighter"
cilia endpoint create --netns "$P-tiefighter" --labels org=empire,class=tiefighter
ip netns add "$P-xwing"
cilia endpoint create --netns "$P-xwing" --labels org=alliance,class=xwing
cilia endpoint list
DS=$(field deathstar id); DS6=$(field deathstar ipv6); DS4=$(field deathstar ipv4); XW=$(field xwing id)
ip netns exec "$P-deathstar" "$BIN/deathstar" 80 >/dev/null 2>&1 &
track $!
for _ in $(seq 50); do in_ship tiefighter curl -s --max-time 1 "http://[$DS6]/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

say "forwarding in the node namespace: ipv4=$(ip netns exec $NODE cat /proc/sys/net/ipv4/ip_forward) ipv6=$(ip netns exec $NODE cat /proc/sys/net/ipv6/conf/all/forwarding): BPF forwards"
say "before any policy, every ship lands (IPv6 and IPv4)"
for ship in tiefighter xwing; do land $ship "[$DS6]"; land $ship "$DS4"; done

say "import the L3/L4 policy: only org=empire may reach the deathstar, on TCP/80"
sed -n '/^apiVersion/,$p' examples/starwars/cnp-l3-l4.yaml
cilia policy import examples/starwars/cnp-l3-l4.yaml
for ship in tiefighter xwing; do land $ship "[$DS6]"; land $ship "$DS4"; done

say "which flows were dropped, and by which policy? (cilia observe)"
cilia observe --verdict DROPPED --to-label class=deathstar --protocol TCP --last 2
say "but the tiefighter may also fire at the exhaust port"
call tiefighter "[$DS6]" PUT /v1/exhaust-port

say "import the L7 policy: org=empire may only POST /v1/request-landing (HTTP rules, enforced by cilia-proxy)"
sed -n '/^apiVersion/,$p' examples/starwars/cnp-l7.yaml
cilia policy import examples/starwars/cnp-l7.yaml
for addr in "[$DS6]" "$DS4"; do
  call tiefighter "$addr" POST /v1/request-landing
  call tiefighter "$addr" PUT /v1/exhaust-port
  call xwing "$addr" POST /v1/request-landing
done
say "the HTTP requests, as the proxy saw them (cilia observe --type l7)"
cilia observe --type l7 --last 4
say "the proxy, started and supervised by the agent"
cilia status --verbose | grep 'l7-proxy' 
say "why was the xwing dropped? (control plane and the loaded BPF program, side by side)"
cilia policy trace --src "$XW" --dst "$DS" --dport 80/TCP --datapath
say "the deathstar's policy map, read back from the kernel"
cilia bpf policy get "$DS"
say "identities and the ipcache"
cilia identity list
cilia bpf ipcache list
say "connection tracking"
cilia bpf ct list

say "kill -9 the agent during 30 landings (through the L7 proxy): traffic and policy do not notice"
in_ship tiefighter sh -c "ok=0; for i in \$(seq 30); do curl -sf --max-time 1 -XPOST http://[$DS6]/v1/request-landing >/dev/null && ok=\$((ok+1)); sleep 0.05; done; echo \"  tiefighter: \$ok of 30 landings succeeded\"" &
LOOP=$!
track "$LOOP"
sleep 0.5
kill -9 "$AGENT_PID"
wait "$AGENT_PID" 2>/dev/null || true
echo "  (agent pid $AGENT_PID killed)"
wait $LOOP || true
land xwing "[$DS6]"
say "restart: the agent restores the same endpoints, addresses and policy"
start_agent
cilia endpoint list
cilia policy get

say "a service: the deathstar behind virtual addresses, balanced in the kernel (socket LB at connect(), per packet otherwise)"
cilia service update --frontend 10.96.0.10:80/tcp --backends "$DS4:80"
cilia service update --frontend "[fd00:96::10]:80/tcp" --backends "[$DS6]:80"
cilia service list
for addr in "[fd00:96::10]" 10.96.0.10; do land tiefighter "$addr"; land xwing "$addr"; done
say "the service flows: frontend and the backend chosen; the policy is the backend's"
cilia observe --type service --last 2
cilia bpf lb list

say "datapath counters"
cilia bpf metrics list
say "done (CILIA_DEMO_KEEP=1 $0 keeps it running; then: export CILIA_SOCKET=$CILIA_SOCKET)"
