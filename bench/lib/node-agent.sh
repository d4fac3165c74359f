# Shared by the CNI benches (source after scripts/lib/procs.sh and
# bench/lib/prelude.sh): one agent in a node namespace of its own.
# Uses BIN, P (the run's prefix), RUN, SOCK; AGENT_WRAP, when set, prefixes
# the agent's command (a profiler).

start_node_agent() { # IPV6_RANGE IPV4_RANGE: namespace $P-node, log $RUN/agent.log; sets AGENT_PID
  mkdir -p "$RUN"
  ip netns add "$P-node"
  ip -n "$P-node" link set lo up
  # shellcheck disable=SC2086 # AGENT_WRAP is words
  nsenter --net="/run/netns/$P-node" ${AGENT_WRAP:-} "$BIN/cilia-agent" --state-dir "$RUN/state" \
    --bpf-root "/sys/fs/bpf/$P" --socket "$SOCK" --ipv6-range "$1" --ipv4-range "$2" >"$RUN/agent.log" 2>&1 &
  AGENT_PID=$!
  track "$AGENT_PID"
  local _
  for _ in $(seq 200); do
    "$BIN/cilia" --socket "$SOCK" status >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the agent did not answer within 20 s; its log ends:" >&2
  tail -5 "$RUN/agent.log" >&2
  exit 1
}

# The agent's /proc status field FIELD (VmRSS, VmHWM) in KiB.
agent_status_kib() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$AGENT_PID/status"; }

# The agent's resident KiB by kind of mapping, from /proc/<pid>/smaps:
# "HEAP ANON FILE OTHER": [heap] (glibc's main arena); unnamed anonymous
# mappings (its second arena, large allocations, thread stacks); file-backed
# (the binary and libraries); the rest ([stack], BPF map and ring-buffer
# mappings, vdso). Says which kind a growth of VmRSS is.
agent_smaps_kib() {
  awk '/^[0-9a-f]+-[0-9a-f]+ / { name = (NF >= 6) ? $6 : ""; next }
       /^Rss:/ { if (name == "[heap]") h += $2; else if (name == "") a += $2; else if (name ~ /^\//) f += $2; else o += $2 }
       END { printf "%d %d %d %d\n", h, a, f, o }' "/proc/$AGENT_PID/smaps"
}

# The agent's heap as its allocator counts it, in KiB: "IN_USE FREE" (the
# `cilia_agent_heap_bytes` gauges of its metrics endpoint, the default
# 127.0.0.1:9962 in the node's namespace; "- -" when it does not answer).
# Beside the resident heap it tells retained objects (in use grows) from
# fragmentation (resident grows, in use does not).
agent_heap_kib() {
  ip netns exec "$P-node" curl -sf --max-time 5 http://127.0.0.1:9962/metrics 2>/dev/null |
    awk '/^cilia_agent_heap_bytes\{state="in_use"\}/ { u = int($2 / 1024) }
         /^cilia_agent_heap_bytes\{state="free"\}/ { f = int($2 / 1024) }
         END { if (u == "") print "- -"; else printf "%d %d\n", u, f }'
}

# The agent's VmRSS once it has settled: unchanged over 2 s, at most
# IDLE_TIMEOUT (default 60) s. Right after start it is still loading (and
# verifying) the shared generic endpoint program, whose parsed object and
# the kernel's BTF are transient: a reading then is not idle.
settled_rss() {
  local prev=-1 cur t0=$SECONDS
  while :; do
    cur=$(agent_status_kib VmRSS)
    [ "$cur" = "$prev" ] && break
    [ $((SECONDS - t0)) -ge "${IDLE_TIMEOUT:-60}" ] && break
    prev=$cur
    sleep 2
  done
  echo "$cur"
}
