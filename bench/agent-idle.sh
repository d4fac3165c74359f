#!/usr/bin/env bash
# The idle agent's memory and where it is (#11 point 3): one agent (release
# build) in its own namespace, no endpoint; once its RSS has settled
# (at least IDLE_MIN s after it answers, then unchanged over 2 s: right
# after start it is still loading the shared generic endpoint program),
# VmRSS against the goal of 20 MiB, and the
# resident KiB of /proc/<pid>/smaps grouped by what is mapped: the agent's
# code, its read-only data, the BPF maps it has mapped (the event ring),
# the heap and anonymous memory, shared libraries, stacks. ROUNDS (default
# 3) agents one after the other; the median is the figure.
# Needs root and the release binaries (BIN=… for another build). Prints
# markdown.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
BIN=${BIN:-$PWD/target/release}
IDLE_TIMEOUT=${IDLE_TIMEOUT:-60}
IDLE_MIN=${IDLE_MIN:-5} # s before the first reading: start-up's generic program load is done by then
P=cidle$$
RUN=/run/$P
SOCK=$RUN/cilia.sock
source scripts/lib/procs.sh
source bench/lib/prelude.sh
source bench/lib/node-agent.sh
cleanup() {
  stop_tracked
  del_netns "$P-node"
  rm -rf "$RUN" "/sys/fs/bpf/$P"
}
bench_traps
need_bins cilia-agent cilia cilia-cni

# smaps grouped: "part KiB" lines.
breakdown() {
  local exe
  exe=$(readlink "/proc/$AGENT_PID/exe")
  awk -v exe="$exe" '
    /^[0-9a-f]+-[0-9a-f]+ / {
      perms = $2; path = $6
      if (path == exe) part = (perms ~ /x/) ? "agent code" : (perms ~ /w/ ? "agent data (rw)" : "agent read-only data")
      else if (path ~ /bpf-map/) part = "BPF maps mapped (event ring)"
      else if (path == "[heap]" || path == "") part = "heap and anonymous"
      else if (path ~ /^\[stack/) part = "stacks"
      else if (path ~ /\.so/) part = "shared libraries"
      else part = "other (" path ")"
      next
    }
    $1 == "Rss:" { kib[part] += $2 }
    END { for (p in kib) print p "\t" kib[p] }' "/proc/$AGENT_PID/smaps" | sort
}

mkdir -p "$RUN"
for r in $(seq "$ROUNDS"); do
  start_node_agent fd00:c1d::/112 10.207.0.0/16
  sleep "$IDLE_MIN"
  idle=$(settled_rss)
  breakdown | sed "s/^/$r\t/" >>"$RUN/parts"
  echo "$idle" >>"$RUN/idle"
  stop_tracked
  del_netns "$P-node"
  rm -rf "/sys/fs/bpf/$P" "$RUN/state"
done

echo "cilia-agent idle memory ($ROUNDS agents one after the other, $(nproc) CPUs, kernel $(uname -r))"
echo
python3 - "$RUN/idle" "$RUN/parts" <<'EOF'
import statistics, sys
idle = [int(l) for l in open(sys.argv[1]) if l.strip()]
parts = {}
for l in open(sys.argv[2]):
    r, part, kib = l.rstrip("\n").split("\t")
    parts.setdefault(part, []).append(int(kib))
print("| part | resident (MiB, median) |")
print("|---|---|")
for part, v in sorted(parts.items(), key=lambda kv: -statistics.median(kv[1])):
    if statistics.median(v) < 52:  # shown as 0.0
        continue
    print(f"| {part} | {statistics.median(v) / 1024:.1f} |")
mib = [k / 1024 for k in idle]
print(f"| **VmRSS** | **{statistics.median(mib):.1f}** (rounds: {', '.join(f'{m:.1f}' for m in mib)}; goal <= 20) |")
EOF
