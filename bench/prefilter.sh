#!/usr/bin/env bash
# The XDP prefilter against iptables, both dropping the same source CIDRs.
#   1. ns/packet under BPF_PROG_TEST_RUN (cargo bench --bench prefilter):
#      10 and 10,000 CIDRs, listed and unlisted sources, both families,
#      against the empty XDP program.
#   2. Packets/s dropped on a veth, a generator (trafgen, Debian netsniff-ng,
#      installed if missing) sending 60-byte UDP frames from 203.0.113.9 in a
#      "gen" namespace to a "dut" namespace as fast as one CPU can:
#        iptables: the dut's raw PREROUTING chain holds N-1 never-matching
#                  `-s <cidr> -j DROP` rules, then `-s 203.0.113.0/24 -j DROP`
#                  (a linear chain: the matching rule last);
#        xdp:      a cilia agent in the dut with --prefilter-device, the same
#                  N CIDRs through `cilia prefilter update` (native XDP on the
#                  veth; the mode is printed).
#      Drops counted by each filter's own counters over $DURATION s while the
#      generator runs (pinned to one CPU, which also runs the veth's receive
#      path); median of $REPS. Printed as a markdown table with the ratio
#      xdp / iptables.
# Everything runs inside namespaces this script creates (gen, dut), removed
# on exit (also on failure or Ctrl-C); processes are ended by PID. Needs
# root and the release binaries (cargo build --release --workspace --bins).
#   CIDRS="10 10000"  DURATION=5 (max 60)  REPS=3  GEN_CPU=<last CPU>
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

cleanup() {
  stop_tracked
  del_netns "${NSS[@]}"
  rm -rf "$RUN" "$BPF"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
[ "$DURATION" -ge 1 ] && [ "$DURATION" -le 60 ] || { echo "DURATION must be 1-60" >&2; exit 1; }
for n in $CIDRS; do [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 65536 ] || { echo "bad CIDR count: $n" >&2; exit 1; }; done
for b in cilia cilia-agent; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b: cargo build --release --workspace --bins" >&2; exit 1; }
done
if ! command -v trafgen >/dev/null; then
  echo "==> installing netsniff-ng (trafgen)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq netsniff-ng >/dev/null
fi
command -v iptables-restore >/dev/null || { echo "needs iptables (scripts/setup.sh)" >&2; exit 1; }

echo "### BPF_PROG_TEST_RUN"
echo
cargo bench -q -p cilia-datapath --bench prefilter 2>/dev/null
echo

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

# Runs the generator for DURATION s (plus a second to ramp up) and prints
# drops/s as counted by `$1` (a function) over the DURATION s window.
rate() {
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

declare -A IPT XDP
# iptables first, then the agent on the same devices.
for n in $CIDRS; do
  {
    echo "*raw"
    echo ":PREROUTING ACCEPT [0:0]"
    echo ":OUTPUT ACCEPT [0:0]"
    cidr_list "$n" | sed 's/^/-A PREROUTING -j DROP -s /'
    echo "COMMIT"
  } | ip netns exec "$P-dut" iptables-restore
  samples=()
  for _ in $(seq "$REPS"); do samples+=("$(rate ipt_drops)"); done
  IPT[$n]=$(median "${samples[@]}")
  echo "iptables, $n CIDRs: ${samples[*]} drops/s" >&2
done
ip netns exec "$P-dut" iptables -t raw -F PREROUTING

nsenter --net="/run/netns/$P-dut" "$BIN/cilia-agent" --state-dir "$RUN/state" --bpf-root "$BPF" \
  --socket "$SOCK" --ipv6-range fd00:c1c::/112 --metrics-addr off \
  --prefilter-device d0 >"$RUN/agent.log" 2>&1 &
track $!
for _ in $(seq 100); do "$BIN/cilia" --socket "$SOCK" status >/dev/null 2>&1 && break; sleep 0.1; done
"$BIN/cilia" --socket "$SOCK" status >/dev/null || { echo "agent did not start:" >&2; cat "$RUN/agent.log" >&2; exit 1; }
MODE=$("$BIN/cilia" --socket "$SOCK" -o json prefilter list | python3 -c 'import json,sys; print(json.load(sys.stdin)["devices"][0]["mode"])')
for n in $CIDRS; do
  listed=$("$BIN/cilia" --socket "$SOCK" -o json prefilter list | python3 -c 'import json,sys; print(",".join(c["cidr"] for c in json.load(sys.stdin)["cidrs"]))')
  [ -n "$listed" ] && "$BIN/cilia" --socket "$SOCK" prefilter delete --cidr "$listed" >/dev/null
  # At most 1000 CIDRs per request (a command-line argument is limited to 128 KiB).
  cidr_list "$n" | split -l 1000 - "$RUN/cidrs."
  for f in "$RUN"/cidrs.*; do
    "$BIN/cilia" --socket "$SOCK" prefilter update --cidr "$(paste -sd, "$f")" >/dev/null
    rm -f "$f"
  done
  samples=()
  for _ in $(seq "$REPS"); do samples+=("$(rate xdp_drops)"); done
  XDP[$n]=$(median "${samples[@]}")
  echo "xdp ($MODE), $n CIDRs: ${samples[*]} drops/s" >&2
done

echo "### Drops/s on a veth, one generator CPU (xdp: $MODE mode)"
echo
echo "| CIDRs | iptables raw PREROUTING (drops/s) | XDP prefilter (drops/s) | ratio |"
echo "|---|---|---|---|"
for n in $CIDRS; do
  awk -v n="$n" -v i="${IPT[$n]}" -v x="${XDP[$n]}" \
    'BEGIN {printf "| %d | %d | %d | %.2f |\n", n, i, x, (i > 0 ? x / i : 0)}'
done
