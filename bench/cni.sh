#!/usr/bin/env bash
# CNI ADD latency and agent memory: N (default 100) ADDs driven by invoking
# the cilia-cni binary directly, as a runtime would, each into a prepared
# network namespace, against an agent in a node namespace of its own. The
# time is from the plugin's start to its exit, which is when the agent has
# made the endpoint ready (program attached, addresses published). Then the
# agent's RSS (VmRSS, VmHWM from /proc/<pid>/status) with N endpoints, and
# the DEL latency (a DEL returns once its endpoint is disconnected) and how
# long after the last DEL every endpoint's devices, programs and record are
# gone. Needs root and the release binaries (BIN=… for another build).
# Prints markdown.
# AGENT_LOG=file keeps the agent's log (each DEL logs its steps' times).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100}
BIN=${BIN:-$PWD/target/release}
P=ccni$$
RUN=/run/$P
SOCK=$RUN/cilia.sock
AGENT_PID=
source scripts/lib/procs.sh
source bench/lib/prelude.sh
source bench/lib/node-agent.sh
cleanup() { # every process started is tracked by PID; then the namespaces
  stop_tracked
  if [ -n "${AGENT_LOG:-}" ] && [ -f "$RUN/agent.log" ]; then cp "$RUN/agent.log" "$AGENT_LOG"; fi
  for i in $(seq "$N"); do del_netns "$P-$i"; done
  del_netns "$P-node"
  rm -rf "$RUN" "/sys/fs/bpf/$P"
}
bench_traps
need_bins cilia-agent cilia cilia-cni
start_node_agent fd00:c1e::/112 10.202.0.0/22
for i in $(seq "$N"); do ip netns add "$P-$i"; done
rss() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$AGENT_PID/status"; }
RSS0=$(rss VmRSS)

CONF="{\"cniVersion\":\"1.0.0\",\"name\":\"cilia\",\"type\":\"cilia-cni\",\"socket\":\"$SOCK\",\"args\":{\"cni\":{\"labels\":{\"app\":\"bench\"}}}}"
plugin() { # COMMAND ID NETNS
  CNI_COMMAND=$1 CNI_CONTAINERID=$2 CNI_NETNS=$3 CNI_IFNAME=eth0 CNI_PATH=$BIN \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=$2" "$BIN/cilia-cni" <<<"$CONF" >"$RUN/out" ||
    { echo "cilia-cni $1 $2 failed: $(cat "$RUN/out")" >&2; exit 1; }
}
: >"$RUN/add"; : >"$RUN/del"
for i in $(seq "$N"); do
  t0=$(date +%s%N); plugin ADD "bench$i" "/run/netns/$P-$i"; t1=$(date +%s%N)
  echo $(((t1 - t0) / 1000)) >>"$RUN/add"
done
ready=$("$BIN/cilia" --socket "$SOCK" -o json endpoint list | python3 -c 'import json,sys; print(sum(e["state"]=="ready" for e in json.load(sys.stdin)))')
RSS1=$(rss VmRSS); HWM=$(rss VmHWM)
for i in $(seq "$N"); do
  t0=$(date +%s%N); plugin DEL "bench$i" ""; t1=$(date +%s%N)
  echo $(((t1 - t0) / 1000)) >>"$RUN/del"
done
# A DEL returns once its endpoint is disconnected; the agent removes its
# programs and devices after. Until the last is gone (bounded: 60 s).
t_dels=$(date +%s%N)
left=-1
for _ in $(seq 600); do
  left=$("$BIN/cilia" --socket "$SOCK" -o json endpoint list | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
  [ "$left" = 0 ] && break
  sleep 0.1
done
t_reaped=$(date +%s%N)
[ "$left" = 0 ] || { echo "bench/cni.sh: $left endpoints still there 60 s after the last DEL" >&2; exit 1; }

pct() { sort -n "$1" | awk -v p="$2" '{ a[NR] = $1 } END { i = int((NR * p + 99) / 100); if (i < 1) i = 1; printf "%.1f", a[i] / 1000 }'; }
echo "cilia-cni, $N sequential ADDs then DELs ($(nproc) CPUs, kernel $(uname -r)); $ready endpoints ready after the ADDs"
echo
echo "| measure | p50 | p99 | max |"
echo "|---|---|---|---|"
echo "| CNI ADD → endpoint ready (ms) | $(pct "$RUN/add" 50) | $(pct "$RUN/add" 99) | $(pct "$RUN/add" 100) |"
echo "| CNI DEL (ms) | $(pct "$RUN/del" 50) | $(pct "$RUN/del" 99) | $(pct "$RUN/del" 100) |"
echo
echo "every endpoint's devices, programs and record gone $(((t_reaped - t_dels) / 1000000)) ms after the last DEL returned"
echo
echo "slowest ADDs (ms, by order of the ADD): $(awk '{ printf "%d %.1f\n", NR, $1 / 1000 }' "$RUN/add" | sort -k2 -n -r | head -3 | awk '{ printf "#%d %s; ", $1, $2 }')"
echo
echo "| agent memory | KiB |"
echo "|---|---|"
echo "| VmRSS, no endpoints | $RSS0 |"
echo "| VmRSS, $N endpoints | $RSS1 |"
echo "| VmHWM (peak) | $HWM |"
