#!/usr/bin/env bash
# The XDP prefilter against iptables, both dropping the same source CIDRs.
#   1. ns/packet under BPF_PROG_TEST_RUN (cargo bench --bench prefilter):
#      10 and 10,000 CIDRs, listed and unlisted sources, both families,
#      against the empty XDP program.
#   2. Packets/s dropped on a veth, a generator sending 60-byte UDP frames
#      from 203.0.113.9 in a "gen" namespace to a "dut" namespace as fast as
#      one CPU can, with two generators: trafgen (Debian netsniff-ng, a
#      packet socket: the sender builds an skb per packet, for both
#      filters) and bench/xdpgen.c (in-kernel, BPF_PROG_TEST_RUN live
#      frames: XDP frames reach the dut's veth without an skb, as a NIC's
#      buffers reach its driver; the dut's veth has GRO on, so it takes
#      them when no XDP program runs and builds the skbs the stack needs):
#        iptables: the dut's raw PREROUTING chain holds N-1 never-matching
#                  `-s <cidr> -j DROP` rules, then `-s 203.0.113.0/24 -j DROP`
#                  (a linear chain: the matching rule last);
#        xdp:      a cilia agent in the dut with --prefilter-device, the same
#                  N CIDRs through `cilia prefilter update` (native XDP on the
#                  veth; the mode is printed).
#      Drops counted by each filter's own counters over $DURATION s while the
#      generator runs (pinned to one CPU, which also runs the veth's receive
#      path); $REPS rounds, the four measurements interleaved in each, median
#      of each. Printed as a markdown table with the ratio xdp / iptables.
# Everything runs inside namespaces this script creates (gen, dut), removed
# on exit (also on failure or Ctrl-C); processes are ended by PID. Needs
# root and the release binaries (cargo build --release --workspace --bins).
#   CIDRS="10 10000"  DURATION=5 (max 60)  REPS=3  GEN_CPU=<last CPU>
#   TESTRUN=0 skips part 1
set -euo pipefail
cd "$(dirname "$0")/.."
CIDRS=${CIDRS:-"10 10000"}
DURATION=${DURATION:-5}
REPS=${REPS:-3}
GEN_CPU=${GEN_CPU-$(($(nproc) - 1))}
BIN=${CILIA_BENCH_BIN:-target/release}
P=cpf$$
RUN=/run/$P
BPF=/sys/fs/bpf/$P
SOCK=$RUN/cilia.sock
NSS=("$P-gen" "$P-dut")
source scripts/lib/procs.sh
source bench/lib/prelude.sh

bench_traps cleanup_tracked

need_root
[ "$DURATION" -ge 1 ] && [ "$DURATION" -le 60 ] || { echo "DURATION must be 1-60" >&2; exit 1; }
for n in $CIDRS; do [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 65536 ] || { echo "bad CIDR count: $n" >&2; exit 1; }; done
need_bins cilia cilia-agent
if ! command -v trafgen >/dev/null; then
  echo "==> installing netsniff-ng (trafgen)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq netsniff-ng >/dev/null
fi
if ! command -v ethtool >/dev/null; then
  echo "==> installing ethtool" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ethtool >/dev/null
fi
command -v iptables-restore >/dev/null || { echo "needs iptables (scripts/setup.sh)" >&2; exit 1; }

if [ "${TESTRUN:-1}" = 1 ]; then
  echo "### BPF_PROG_TEST_RUN"
  echo
  cargo bench -q -p cilia-datapath --bench prefilter 2>/dev/null
  echo
fi

mkdir -p "$RUN"
for ns in "${NSS[@]}"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add g0 address 0a:00:00:00:00:a1 netns "$P-gen" type veth peer name d0 address 0a:00:00:00:00:b1 netns "$P-dut"
ip -n "$P-gen" addr add 192.0.2.2/24 dev g0
ip -n "$P-dut" addr add 192.0.2.1/24 dev d0
ip -n "$P-gen" link set g0 up
ip -n "$P-dut" link set d0 up

# 60-byte UDP frame 203.0.113.9:40000 -> 192.0.2.1:9, to d0's MAC.
cat >"$RUN/frame.cfg" <<'EOF'
{
  0x0a, 0x00, 0x00, 0x00, 0x00, 0xb1,
  0x0a, 0x00, 0x00, 0x00, 0x00, 0xa1,
  0x08, 0x00,
  0x45, 0x00, 0x00, 0x2e, 0x00, 0x01, 0x40, 0x00, 0x40, 0x11, csumip(14, 33),
  203, 0, 113, 9,
  192, 0, 2, 1,
  0x9c, 0x40, 0x00, 0x09, 0x00, 0x1a, 0x00, 0x00,
  fill(0x41, 18),
}
EOF

cidr_list() { # N: N-1 never-matching CIDRs (10.0.0.0/8 /32s), then 203.0.113.0/24
  python3 - "$1" <<'EOF'
import ipaddress, sys
n = int(sys.argv[1])
base = int(ipaddress.IPv4Address("10.0.0.0"))
for i in range(n - 1):
    print("%s/32" % ipaddress.IPv4Address(base + i * 97))
print("203.0.113.0/24")
EOF
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
ipt_drops() { ip netns exec "$P-dut" iptables -t raw -nvxL PREROUTING | awk 'NR>2 {s+=$1} END {print s+0}'; }
xdp_drops() { "$BIN/cilia" --socket "$SOCK" -o json prefilter list | python3 -c 'import json,sys; print(sum(c["packets"] for c in json.load(sys.stdin)["cidrs"]))'; }

# Runs trafgen for DURATION s (plus a second to ramp up) and prints drops/s
# as counted by `$1` (a function) over the DURATION s window.
rate_trafgen() {
  local counter=$1 before after gen
  taskset -c "$GEN_CPU" ip netns exec "$P-gen" timeout $((DURATION + 5)) \
    trafgen --dev g0 --conf "$RUN/frame.cfg" --cpus 1 --notouch-irq --num 2000000000 >/dev/null 2>&1 &
  gen=$!
  track "$gen"
  sleep 1
  before=$($counter)
  sleep "$DURATION"
  after=$($counter)
  kill "$gen" 2>/dev/null || true
  wait "$gen" 2>/dev/null || true
  echo $(((after - before) / DURATION))
}
# Runs the in-kernel generator (xdpgen) for DURATION s and prints drops/s as
# counted by `$1` over its run (the counters are read before and after).
rate_xdpgen() {
  local counter=$1 before after out
  before=$($counter)
  out=$(taskset -c "$GEN_CPU" ip netns exec "$P-gen" "$RUN/xdpgen" g0 "$DURATION")
  after=$($counter)
  awk -v d=$((after - before)) -v t="${out#* }" 'BEGIN {printf "%d\n", d / t}'
}

cilia() { "$BIN/cilia" --socket "$SOCK" "$@"; }
AGENT_PID=""
# start_agent [DEVICE]: the agent in the dut, the prefilter on DEVICE (none:
# the agent detaches it from the devices an earlier run attached it to).
start_agent() {
  local dev=()
  [ -n "${1:-}" ] && dev=(--prefilter-device "$1")
  nsenter --net="/run/netns/$P-dut" "$BIN/cilia-agent" --state-dir "$RUN/state" --bpf-root "$BPF" \
    --socket "$SOCK" --ipv6-range fd00:c1c::/112 --metrics-addr off "${dev[@]}" >>"$RUN/agent.log" 2>&1 &
  AGENT_PID=$!
  track "$AGENT_PID"
  for _ in $(seq 100); do cilia status >/dev/null 2>&1 && return; sleep 0.1; done
  echo "agent did not start:" >&2; cat "$RUN/agent.log" >&2; exit 1
}
stop_agent() {
  kill "$AGENT_PID"
  for _ in $(seq 50); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
  wait "$AGENT_PID" 2>/dev/null || true
}
set_cidrs() { # N: the prefilter's CIDRs become cidr_list N
  local f
  # At most 1000 CIDRs per request (a command-line argument is limited to 128 KiB).
  cilia -o json prefilter list | python3 -c 'import json,sys; print("\n".join(c["cidr"] for c in json.load(sys.stdin)["cidrs"]))' |
    { grep . || true; } | split -l 1000 - "$RUN/listed."
  for f in "$RUN"/listed.*; do
    [ -e "$f" ] || continue
    cilia prefilter delete --cidr "$(paste -sd, "$f")" >/dev/null
    rm -f "$f"
  done
  cidr_list "$1" | split -l 1000 - "$RUN/cidrs."
  for f in "$RUN"/cidrs.*; do
    cilia prefilter update --cidr "$(paste -sd, "$f")" >/dev/null
    rm -f "$f"
  done
}
set_ipt() { # N: the dut's raw PREROUTING becomes cidr_list N as DROP rules (0: empty)
  {
    echo "*raw"
    echo ":PREROUTING ACCEPT [0:0]"
    echo ":OUTPUT ACCEPT [0:0]"
    [ "$1" -gt 0 ] && cidr_list "$1" | sed 's/^/-A PREROUTING -j DROP -s /'
    echo "COMMIT"
  } | ip netns exec "$P-dut" iptables-restore
}

gcc -O2 -o "$RUN/xdpgen" bench/xdpgen.c -lbpf || { echo "building bench/xdpgen.c failed (needs gcc, libbpf-dev)" >&2; exit 1; }
clang-19 -target bpf -O2 -g -Wall -I"/usr/include/$(gcc -print-multiarch)" -c bench/xdp_drop.c -o "$RUN/xdp_drop.o" ||
  { echo "building bench/xdp_drop.c failed (needs clang-19, libbpf-dev)" >&2; exit 1; }
empty_drops() { ip netns exec "$P-dut" ethtool -S d0 | awk '/xdp_drops/ {s+=$2} END {print s+0}'; }
# The in-kernel generator's frames reach d0 as XDP frames: without an XDP
# program d0 needs NAPI (GRO on) to take them, as a NIC driver has; with
# GRO on they become skbs there, as on a NIC.
ip netns exec "$P-dut" ethtool -K d0 gro on >/dev/null

declare -A S
# Rounds interleave the four measurements per CIDR count: iptables with
# each generator (the agent's prefilter detached), then the prefilter with
# each generator (iptables empty).
for r in $(seq "$REPS"); do
  for n in $CIDRS; do
    start_agent ""   # detaches the prefilter an earlier round attached
    stop_agent
    set_ipt "$n"
    S[ipt-trafgen-$n]+=" $(rate_trafgen ipt_drops)"
    S[ipt-xdpgen-$n]+=" $(rate_xdpgen ipt_drops)"
    set_ipt 0
    if [ "$n" = "${CIDRS%% *}" ]; then
      # The floor: an XDP program that drops everything, checking nothing.
      ip -n "$P-dut" link set dev d0 xdpdrv obj "$RUN/xdp_drop.o" sec xdp
      S[empty-trafgen]+=" $(rate_trafgen empty_drops)"
      S[empty-xdpgen]+=" $(rate_xdpgen empty_drops)"
      ip -n "$P-dut" link set dev d0 xdpdrv off
    fi
    start_agent d0
    MODE=$(cilia -o json prefilter list | python3 -c 'import json,sys; print(json.load(sys.stdin)["devices"][0]["mode"])')
    set_cidrs "$n"
    S[xdp-trafgen-$n]+=" $(rate_trafgen xdp_drops)"
    S[xdp-xdpgen-$n]+=" $(rate_xdpgen xdp_drops)"
    stop_agent
    echo "round $r, $n CIDRs (xdp $MODE): iptables trafgen${S[ipt-trafgen-$n]} xdpgen${S[ipt-xdpgen-$n]} | prefilter trafgen${S[xdp-trafgen-$n]} xdpgen${S[xdp-xdpgen-$n]}" >&2
  done
done

echo "### Drops/s on a veth, one CPU for generator and receiver (xdp: $MODE mode)"
echo
echo "Receive-side ns/packet: 1e9/rate minus 1e9/(the empty XDP drop's rate with the same generator), i.e. what the filter costs beyond a drop that checks nothing."
echo
echo "| CIDRs | generator | empty XDP drop (drops/s) | iptables raw PREROUTING (drops/s) | XDP prefilter (drops/s) | XDP / iptables | iptables ns/pkt beyond empty | prefilter ns/pkt beyond empty | ratio of those |"
echo "|---|---|---|---|---|---|---|---|---|"
for n in $CIDRS; do
  for g in trafgen xdpgen; do
    e=$(median ${S[empty-$g]}); i=$(median ${S[ipt-$g-$n]}); x=$(median ${S[xdp-$g-$n]})
    awk -v n="$n" -v g="$g" -v e="$e" -v i="$i" -v x="$x" 'BEGIN {
      ci = 1e9 / i - 1e9 / e; cx = 1e9 / x - 1e9 / e
      printf "| %d | %s | %d | %d | %d | %.2f | %.0f | %.0f | %s |\n", n, g, e, i, x, x / i, ci, cx, (cx > 0 ? sprintf("%.1f", ci / cx) : "-")
    }'
  done
done
echo
echo "(median of $REPS rounds of ${DURATION} s; trafgen: a packet socket, an skb built per packet on the sender; xdpgen: bench/xdpgen.c, frames injected from the kernel as XDP frames, no skb unless the receiver builds one)"
