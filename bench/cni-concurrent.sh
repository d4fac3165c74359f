#!/usr/bin/env bash
# Concurrent CNI ADDs against one agent, with a baseline in the same run:
# N (default 100) ADDs one after another, all DELs; then N ADDs issued at
# once (one cilia-cni process each, all started before any is waited for),
# all DELs. Reports each round's total time, the ratio concurrent/sequential
# (target <= 1) and the agent's peak RSS (VmHWM) during each round (the peak
# is reset before each round through /proc/<pid>/clear_refs; target
# <= 60 MiB). Every ADD runs under `timeout`, every process is tracked by
# PID (scripts/lib/procs.sh), every namespace is the bench's own. Needs root
# and the release binaries (BIN=… to measure another build). Prints markdown.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100}
BIN=${BIN:-$PWD/target/release}
ADD_TIMEOUT=${ADD_TIMEOUT:-300}   # seconds any one plugin run may take
AGENT_WRAP=${AGENT_WRAP:-}        # e.g. "heaptrack -o /tmp/agent": profile (RSS figures are then the wrapper's)
P=ccnc$$
RUN=/run/$P
SOCK=$RUN/cilia.sock
source scripts/lib/procs.sh
source bench/lib/prelude.sh
source bench/lib/node-agent.sh
cleanup() { # every process started is tracked by PID; then the namespaces
  stop_tracked
  for i in $(seq "$N"); do del_netns "$P-s$i" "$P-c$i"; done
  del_netns "$P-node"
  rm -rf "$RUN" "/sys/fs/bpf/$P"
}
bench_traps
need_bins cilia-agent cilia cilia-cni
start_node_agent fd00:c20::/112 10.204.0.0/22
for i in $(seq "$N"); do ip netns add "$P-s$i"; ip netns add "$P-c$i"; done
rss() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$AGENT_PID/status"; }
reset_peak() { echo 5 >"/proc/$AGENT_PID/clear_refs"; }   # VmHWM := VmRSS

CONF="{\"cniVersion\":\"1.0.0\",\"name\":\"cilia\",\"type\":\"cilia-cni\",\"socket\":\"$SOCK\",\"args\":{\"cni\":{\"labels\":{\"app\":\"bench\"}}}}"
plugin() { # COMMAND ID NETNS OUT
  CNI_COMMAND=$1 CNI_CONTAINERID=$2 CNI_NETNS=$3 CNI_IFNAME=eth0 CNI_PATH=$BIN \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=$2" timeout "$ADD_TIMEOUT" "$BIN/cilia-cni" <<<"$CONF" >"$4"
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
ready() { "$BIN/cilia" --socket "$SOCK" -o json endpoint list | python3 -c 'import json,sys; print(sum(e["state"]=="ready" for e in json.load(sys.stdin)))'; }
dels() { # PREFIX
  local i
  for i in $(seq "$N"); do plugin DEL "$1$i" "" "$RUN/out" || { echo "DEL $1$i failed: $(cat "$RUN/out")" >&2; exit 1; }; done
}

# Round 1: one after another (the baseline).
reset_peak
t0=$(now_ms)
for i in $(seq "$N"); do
  plugin ADD "s$i" "/run/netns/$P-s$i" "$RUN/out" || { echo "ADD s$i failed: $(cat "$RUN/out")" >&2; exit 1; }
done
t1=$(now_ms)
SEQ_MS=$((t1 - t0)); SEQ_READY=$(ready); SEQ_HWM=$(rss VmHWM)
dels s

# Round 2: all at once.
reset_peak
RSS0=$(rss VmRSS)
PIDS=()
t0=$(now_ms)
for i in $(seq "$N"); do
  plugin ADD "c$i" "/run/netns/$P-c$i" "$RUN/out-c$i" &
  PIDS+=($!); track "$!"
done
FAILED=0
for pid in "${PIDS[@]}"; do wait "$pid" || FAILED=$((FAILED + 1)); done
t1=$(now_ms)
CON_MS=$((t1 - t0)); CON_READY=$(ready); CON_HWM=$(rss VmHWM)
# Fast attach: the endpoints enforce policy on the generic program from
# their ADD on; their specialized programs follow in the background. How
# long until the last one is on its specialized program (bounded: 120 s).
generic() { "$BIN/cilia" --socket "$SOCK" -o json status | python3 -c 'import json,sys; print(json.load(sys.stdin).get("endpoints_generic", 0))'; }
for _ in $(seq 1200); do [ "$(generic)" = 0 ] && break; sleep 0.1; done
SPEC_MS=$(($(now_ms) - t0)); SPEC_LEFT=$(generic)
[ "$FAILED" -eq 0 ] || { echo "bench/cni-concurrent.sh: $FAILED concurrent ADDs failed, e.g.: $(cat "$RUN"/out-c* | grep -m1 -i error || true)" >&2; exit 1; }
dels c

RATIO=$(awk -v c="$CON_MS" -v s="$SEQ_MS" 'BEGIN { printf "%.2f", c / s }')
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
echo "cilia-cni, $N ADDs one after another, then $N issued at once, against one agent ($(nproc) CPUs, kernel $(uname -r))"
echo
echo "| round | total (s) | per ADD (ms) | endpoints ready | agent peak RSS (MiB) |"
echo "|---|---|---|---|---|"
echo "| sequential | $(awk -v m="$SEQ_MS" 'BEGIN { printf "%.1f", m / 1000 }') | $(awk -v m="$SEQ_MS" -v n="$N" 'BEGIN { printf "%.0f", m / n }') | $SEQ_READY | $(mib "$SEQ_HWM") |"
echo "| concurrent | $(awk -v m="$CON_MS" 'BEGIN { printf "%.1f", m / 1000 }') | $(awk -v m="$CON_MS" -v n="$N" 'BEGIN { printf "%.0f", m / n }') | $CON_READY | $(mib "$CON_HWM") |"
echo
echo "all $N on their specialized programs $(awk -v m="$SPEC_MS" 'BEGIN { printf "%.1f", m / 1000 }') s after the concurrent round began ($SPEC_LEFT still on the generic program; fast attach: ${CILIA_FAST_ATTACH:-on})"
echo
echo "concurrent / sequential total = **$RATIO** (target <= 1); RSS before the concurrent round $(mib "$RSS0") MiB, peak $(mib "$CON_HWM") MiB (target <= 60)"
