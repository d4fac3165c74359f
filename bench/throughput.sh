#!/usr/bin/env bash
# iperf3 throughput (DURATION s, IPv6 and IPv4) between two cilia endpoints,
# next to the same test over a plain veth pair between two namespaces without
# any BPF, measured in the same run: one TCP stream, 4 parallel TCP streams
# (-P 4) and 1400-byte UDP datagrams at full rate (-u -l 1400 -b 0, the
# receiver's rate). Then the cost of tracing every packet, on one TCP
# stream. Needs root and the release binaries (scripts/setup.sh). Prints
# markdown tables.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
BIN=target/release
P=cbench$$
RUN=/run/$P
SOCK=$RUN/cilia.sock
source scripts/lib/procs.sh
source bench/lib/prelude.sh
cleanup() { # every process started is tracked by PID; then the namespaces
  stop_tracked
  del_netns "$P-node" "$P-a" "$P-b" "$P-va" "$P-vb"
  rm -rf "$RUN" "/sys/fs/bpf/$P"
}
bench_traps
mkdir -p "$RUN"
for ns in node a b va vb; do ip netns add "$P-$ns"; ip -n "$P-$ns" link set lo up; done

# measure CLIENT_NS SERVER_NS SERVER_IP VAR [IPERF3 ARGS...]: a one-shot
# iperf3 server (tracked here, not in a $(...) subshell, so cleanup knows its
# PID), then the client. The rate is the receiver's.
measure() {
  local client=$1 server=$2 ip=$3 var=$4
  shift 4
  ip netns exec "$P-$server" iperf3 -s -1 -B "$ip" >/dev/null 2>&1 &
  track $!
  sleep 0.3
  local gbps
  gbps=$(ip netns exec "$P-$client" iperf3 -c "$ip" -t "$DURATION" -J "$@" |
    python3 -c 'import json,sys
e = json.load(sys.stdin)["end"]
s = e.get("sum_received") or e["sum"]
print("%.2f" % (s["bits_per_second"]/1e9))')
  printf -v "$var" '%s' "$gbps"
}

# Baseline: a plain veth pair, no BPF.
ip link add "${P}x" netns "$P-va" type veth peer name "${P}y" netns "$P-vb"
ip -n "$P-va" addr add 2001:db8:b::1/64 dev "${P}x" nodad
ip -n "$P-vb" addr add 2001:db8:b::2/64 dev "${P}y" nodad
ip -n "$P-va" addr add 198.51.100.1/24 dev "${P}x"
ip -n "$P-vb" addr add 198.51.100.2/24 dev "${P}y"
ip -n "$P-va" link set "${P}x" up; ip -n "$P-vb" link set "${P}y" up

# cilia: two endpoints on an agent.
nsenter --net=/run/netns/$P-node "$BIN/cilia-agent" --state-dir "$RUN/state" --bpf-root "/sys/fs/bpf/$P" \
  --socket "$SOCK" --ipv6-range fd00:c1b::/112 --ipv4-range 10.201.0.0/24 >"$RUN/agent.log" 2>&1 &
track $!
for _ in $(seq 100); do "$BIN/cilia" --socket "$SOCK" status >/dev/null 2>&1 && break; sleep 0.1; done
"$BIN/cilia" --socket "$SOCK" endpoint create --netns "$P-a" >/dev/null
"$BIN/cilia" --socket "$SOCK" endpoint create --netns "$P-b" >/dev/null
sleep 0.5

echo "| traffic | path | IPv6 Gbit/s | IPv4 Gbit/s |"
echo "|---|---|---|---|"
# mode: name, then iperf3's arguments.
for mode in "1 TCP stream" "4 TCP streams|-P 4" "UDP, 1400-byte datagrams|-u -l 1400 -b 0"; do
  name=${mode%%|*}
  args=()
  [[ $mode == *"|"* ]] && read -r -a args <<<"${mode#*|}"
  measure va vb 2001:db8:b::2 base6 "${args[@]}"; measure va vb 198.51.100.2 base4 "${args[@]}"
  echo "| $name | plain veth pair, no BPF (baseline) | $base6 | $base4 |"
  measure a b fd00:c1b::3 x6 "${args[@]}"; measure a b 10.201.0.3 x4 "${args[@]}"
  echo "| $name | cilia endpoint -> endpoint (BPF redirect_peer) | $x6 | $x4 |"
  python3 -c "print('| $name | **ratio cilia / baseline** | %.2f | %.2f |' % ($x6/$base6, $x4/$base4))"
  if [[ $name == "1 TCP stream" ]]; then c6=$x6; c4=$x4; fi
done
echo

# Monitoring cost on real traffic: the same cilia path while `cilia monitor
# --type trace` listens, i.e. a trace event for every packet.
"$BIN/cilia" --socket "$SOCK" monitor --type trace -o json >/dev/null 2>&1 &
MON=$!
track "$MON"
sleep 1
measure a b fd00:c1b::3 m6; measure a b 10.201.0.3 m4
kill $MON 2>/dev/null || true
echo "| path (1 TCP stream) | IPv6 Gbit/s | IPv4 Gbit/s |"
echo "|---|---|---|"
echo "| cilia endpoint -> endpoint | $c6 | $c4 |"
echo "| cilia with \`cilia monitor --type trace\` listening | $m6 | $m4 |"
python3 -c "print('| ratio traced / cilia | %.2f | %.2f |' % ($m6/$c6, $m4/$c4))"
