#!/usr/bin/env bash
# The main job: sets everything up, starts cilia-agent on its embedded
# defaults inside a node network namespace, and shows live traffic between
# endpoints forwarded by BPF (no bridge, IP forwarding off), including an
# agent crash that traffic survives. Everything lives in namespaces this
# script creates, and is removed on exit (CILIA_DEMO_KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

BIN=target/release
RUN=/run/cilia-demo
NODE=cilia-demo-node
export CILIA_SOCKET=$RUN/cilia.sock
AGENT_ARGS=(--state-dir "$RUN/state" --bpf-root /sys/fs/bpf/cilia-demo --socket "$CILIA_SOCKET"
  --ipv6-range fd00:c1a::/112 --ipv4-range 10.200.0.0/24)
EPS=(deathstar tiefighter xwing)

cleanup() {
  [ "${CILIA_DEMO_KEEP:-0}" = 1 ] && { echo "(kept: agent in netns $NODE, socket $CILIA_SOCKET)"; return; }
  pkill -f -- "--bpf-root /sys/fs/bpf/cilia-demo" 2>/dev/null || true
  for ns in "$NODE" "${EPS[@]/#/cilia-demo-}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$RUN" /sys/fs/bpf/cilia-demo
}
trap cleanup EXIT
cleanup
mkdir -p "$RUN"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
cilia() { "$BIN/cilia" "$@"; }
in_ep() { local ns=cilia-demo-$1; shift; ip netns exec "$ns" "$@"; }

start_agent() {
  ( nsenter --net=/run/netns/$NODE "$BIN/cilia-agent" "${AGENT_ARGS[@]}" >>"$RUN/agent.log" 2>&1 & )
  for _ in $(seq 100); do cilia status >/dev/null 2>&1 && return; sleep 0.1; done
  echo "agent did not start:"; cat "$RUN/agent.log"; exit 1
}

say "node namespace $NODE: the agent runs here"
ip netns add $NODE
ip -n $NODE link set lo up
start_agent
cilia status

say "three endpoints, each in its own network namespace"
for ep in "${EPS[@]}"; do
  ip netns add cilia-demo-$ep
  cilia endpoint create --netns cilia-demo-$ep --labels "app=$ep"
done
cilia endpoint list
say "the kernel's endpoints map, read back"
cilia bpf endpoint list

ip6() { cilia endpoint list -o json | python3 -c "import json,sys; print([e['$2'] for e in json.load(sys.stdin) if e['labels'].get('app')=='$1'][0])"; }
DS6=$(ip6 deathstar ipv6); DS4=$(ip6 deathstar ipv4)
say "forwarding in the node namespace: $(ip netns exec $NODE cat /proc/sys/net/ipv4/ip_forward) (ipv4), $(ip netns exec $NODE cat /proc/sys/net/ipv6/conf/all/forwarding) (ipv6) — BPF forwards"

say "ICMP: tiefighter -> deathstar over IPv6 and IPv4"
in_ep tiefighter ping -c 2 -i 0.2 "$DS6"
in_ep tiefighter ping -c 2 -i 0.2 "$DS4"

say "TCP and UDP: xwing -> deathstar (iperf3, 1 s each)"
in_ep deathstar iperf3 -s -D -1 -B "$DS6" >/dev/null; sleep 0.3
in_ep xwing iperf3 -c "$DS6" -t 1 -f m | grep -E "sender|receiver"
in_ep deathstar iperf3 -s -D -1 -B "$DS4" >/dev/null; sleep 0.3
in_ep xwing iperf3 -c "$DS4" -u -b 50M -t 1 -f m | grep -E "receiver" || true

say "kill -9 the agent during a ping: traffic does not notice"
in_ep tiefighter ping -c 40 -i 0.05 "$DS6" >"$RUN/ping.log" &
PING=$!
sleep 0.5
pkill -9 -f -- "--bpf-root /sys/fs/bpf/cilia-demo"
wait $PING || true
tail -2 "$RUN/ping.log"
say "restart: the agent restores the same endpoints, same addresses"
start_agent
cilia endpoint list

say "datapath counters"
cilia bpf metrics list
say "done (try: CILIA_DEMO_KEEP=1 $0, then CILIA_SOCKET=$CILIA_SOCKET $BIN/cilia endpoint list)"
