#!/usr/bin/env bash
# Agent memory with many endpoints, and over many create/delete cycles
# (#11 point 3). One agent (release build), its RSS from /proc/<pid>/status:
#   1. idle (no endpoint);
#   2. N endpoints (default 1000) created through cilia-cni, BATCH (default
#      100) ADDs issued at once per batch, measured once every endpoint is
#      on its specialized program (fast attach: they start on the generic
#      one); VmRSS against the goal of 40 MiB, and per endpoint;
#   3. the N deleted, then CYCLES (default 10000) create/delete cycles, BATCH
#      at a time (BATCH ADDs at once, then their DELs), VmRSS sampled every
#      SAMPLE cycles (default 1000); the least-squares slope of RSS over the
#      cycles after the first sample, in KiB per 1000 cycles (goal: no
#      growth, i.e. within the noise of a few pages), the size of the
#      agent's state file at each sample, and the agent's resident memory
#      by kind of mapping (heap, anonymous, file-backed, other: which one
#      grows) beside the allocator's own count of the heap in use and free
#      (retained objects or fragmentation).
# Bounded: every plugin run under `timeout`, the whole cycle phase under
# MAX_SECONDS (default 2400; the cycles done are reported). Every process is
# tracked by PID, every namespace is the bench's own and removed on exit.
# Needs root and the release binaries (BIN=… for another build). Prints
# markdown.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
BATCH=${BATCH:-100}
CYCLES=${CYCLES:-10000}
SAMPLE=${SAMPLE:-1000}
MAX_SECONDS=${MAX_SECONDS:-2400}
BIN=${BIN:-$PWD/target/release}
ADD_TIMEOUT=${ADD_TIMEOUT:-120}
SPECIALIZE_TIMEOUT=${SPECIALIZE_TIMEOUT:-1800} # s until every endpoint is specialized (~1.1 s of verification each here)
P=cmem$$
RUN=/run/$P
SOCK=$RUN/cilia.sock
source scripts/lib/procs.sh
source bench/lib/prelude.sh
source bench/lib/node-agent.sh
cleanup() {
  stop_tracked
  for i in $(seq "$N"); do del_netns "$P-$i"; done
  del_netns "$P-node"
  rm -rf "$RUN" "/sys/fs/bpf/$P"
}
bench_traps
need_bins cilia-agent cilia cilia-cni
[ "$BATCH" -le "$N" ] || { echo "bench/cni-memory.sh: BATCH ($BATCH) > N ($N)" >&2; exit 1; }
start_node_agent fd00:c3e::/112 10.206.0.0/16
for i in $(seq "$N"); do ip netns add "$P-$i"; done
rss() { agent_status_kib "$1"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
now_s() { date +%s; }

CONF="{\"cniVersion\":\"1.0.0\",\"name\":\"cilia\",\"type\":\"cilia-cni\",\"socket\":\"$SOCK\",\"args\":{\"cni\":{\"labels\":{\"app\":\"bench\"}}}}"
plugin() { # COMMAND ID NETNS OUT
  CNI_COMMAND=$1 CNI_CONTAINERID=$2 CNI_NETNS=$3 CNI_IFNAME=eth0 CNI_PATH=$BIN \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=$2" timeout "$ADD_TIMEOUT" "$BIN/cilia-cni" <<<"$CONF" >"$4"
}
# batch COMMAND PREFIX FIRST COUNT: COUNT plugin runs at once, ids
# PREFIX<i>, namespaces $P-<i>, i from FIRST; fails naming the first error.
batch() {
  local cmd=$1 prefix=$2 first=$3 count=$4 i pids=() failed=0 ns
  for i in $(seq "$first" $((first + count - 1))); do
    ns=""; [ "$cmd" = ADD ] && ns=/run/netns/$P-$i
    plugin "$cmd" "$prefix$i" "$ns" "$RUN/out-$i" &
    pids+=($!); track "$!"
  done
  for i in "${pids[@]}"; do wait "$i" || failed=$((failed + 1)); done
  TRACKED_PIDS=("$AGENT_PID")
  if [ "$failed" -ne 0 ]; then
    echo "bench/cni-memory.sh: $failed of $count ${cmd}s failed, e.g.: $(cat "$RUN"/out-* | grep -m1 -i error || true)" >&2
    exit 1
  fi
}
status_field() { "$BIN/cilia" --socket "$SOCK" -o json status | python3 -c "import json,sys; print(json.load(sys.stdin).get('$1', 0))"; }
endpoints() { "$BIN/cilia" --socket "$SOCK" -o json endpoint list | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))'; }
wait_specialized() { # bounded: SPECIALIZE_TIMEOUT
  local _
  for _ in $(seq $((SPECIALIZE_TIMEOUT * 2))); do [ "$(status_field endpoints_generic)" = 0 ] && return 0; sleep 0.5; done
  echo "bench/cni-memory.sh: endpoints still on the generic program after $SPECIALIZE_TIMEOUT s" >&2
  exit 1
}

# Idle: once the agent's RSS has settled (see settled_rss).
RSS_IDLE=$(settled_rss)
progress() { echo "bench/cni-memory.sh: $*" >&2; } # as it goes: a run cut short still tells what it measured
progress "idle VmRSS $RSS_IDLE KiB"

# Phase 2: N endpoints, BATCH at a time.
t0=$(now_s)
for first in $(seq 1 "$BATCH" "$N"); do
  count=$BATCH; [ $((first + count - 1)) -le "$N" ] || count=$((N - first + 1))
  batch ADD m "$first" "$count"
done
wait_specialized
T_CREATE=$(($(now_s) - t0))
sleep 2
RSS_N=$(rss VmRSS); HWM_N=$(rss VmHWM); READY=$(endpoints)
progress "$READY endpoints, all specialized, in $T_CREATE s: VmRSS $RSS_N KiB, VmHWM $HWM_N KiB"
for first in $(seq 1 "$BATCH" "$N"); do
  count=$BATCH; [ $((first + count - 1)) -le "$N" ] || count=$((N - first + 1))
  batch DEL m "$first" "$count"
done
sleep 2
RSS_AFTER_DEL=$(rss VmRSS)
progress "after deleting them: VmRSS $RSS_AFTER_DEL KiB"

# Phase 3: cycles, BATCH endpoints at a time (ids differ per cycle batch,
# namespaces reused).
: >"$RUN/samples"
done_cycles=0; round=0
t0=$(now_s)
while [ "$done_cycles" -lt "$CYCLES" ]; do
  if [ $(($(now_s) - t0)) -ge "$MAX_SECONDS" ]; then break; fi
  round=$((round + 1))
  batch ADD "r${round}x" 1 "$BATCH"
  batch DEL "r${round}x" 1 "$BATCH"
  done_cycles=$((done_cycles + BATCH))
  if [ $((done_cycles % SAMPLE)) -eq 0 ]; then
    # At a quiet moment: the specializer's queue drained (its loads' ELF
    # and BTF buffers are transient, ~10 MiB while one is in flight, and
    # the heap is trimmed when it drains) and the deletes finished.
    wait_specialized
    for _ in $(seq 600); do [ "$(endpoints)" = 0 ] && break; sleep 0.1; done
    sleep 2
    echo "$done_cycles $(rss VmRSS) $(stat -c %s "$RUN/state/state.redb") $(agent_smaps_kib) $(agent_heap_kib)" >>"$RUN/samples"
    progress "cycles $(tail -1 "$RUN/samples") KiB"
  fi
done
T_CYCLES=$(($(now_s) - t0))
LEFT=$(endpoints)

echo "cilia-agent memory: $N endpoints by cilia-cni ($BATCH ADDs at once per batch), then create/delete cycles ($(nproc) CPUs, kernel $(uname -r), fast attach ${CILIA_FAST_ATTACH:-on})"
echo
echo "| measure | VmRSS (MiB) | note |"
echo "|---|---|---|"
echo "| idle, no endpoint | $(mib "$RSS_IDLE") | goal <= 20 |"
echo "| $READY endpoints, all specialized | $(mib "$RSS_N") | goal <= 40; $(awk -v a="$RSS_N" -v b="$RSS_IDLE" -v n="$N" 'BEGIN { printf "%.1f", (a - b) / n }') KiB per endpoint over idle; created in $T_CREATE s; peak (VmHWM) $(mib "$HWM_N") |"
echo "| after deleting them | $(mib "$RSS_AFTER_DEL") | |"
echo
echo "$done_cycles create/delete cycles in $T_CYCLES s ($LEFT endpoints left); VmRSS every $SAMPLE cycles:"
echo
echo "| cycles | VmRSS (MiB) | state.redb (MB) | heap | anonymous | file-backed | other (MiB, resident, from smaps) | heap in use | heap free (MiB, the allocator's count) |"
echo "|---|---|---|---|---|---|---|---|---|"
kib_or_dash() { if [ "$1" = - ]; then echo -; else mib "$1"; fi; }
while read -r c k b h a f o u fr; do
  echo "| $c | $(mib "$k") | $(awk -v b="$b" 'BEGIN { printf "%.1f", b / 1e6 }') | $(mib "$h") | $(mib "$a") | $(mib "$f") | $(mib "$o") | $(kib_or_dash "$u") | $(kib_or_dash "$fr") |"
done <"$RUN/samples"
echo
python3 - "$RUN/samples" <<'EOF'
import sys
pts = [tuple(map(float, l.split()[:2])) for l in open(sys.argv[1]) if l.strip()][1:]
if len(pts) < 2:
    print("slope: too few samples after the first (need CYCLES >= 3 * SAMPLE)")
else:
    n = len(pts); mx = sum(x for x, _ in pts) / n; my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    print(f"slope of VmRSS after the first sample: **{slope * 1000:.1f} KiB per 1000 cycles** "
          f"({n} samples, {pts[0][0]:.0f} to {pts[-1][0]:.0f} cycles)")
EOF
