#!/usr/bin/env bash
# How many short TCP connections per second one endpoint can open under its
# conntrack budget. A connection that ended stays tracked for the close
# timeout (10 s) and counted against its endpoint's budget (--ct-budget,
# default 32768) until a GC removes it; this bench shows what that budget
# lets through.
#
# Two endpoints (app=client, app=server) on one agent; bench/rr.py opens
# connections from the client as fast as it can (connect, 64 B each way,
# close with a RST) for DURATION s. Each round runs twice, the agent
# restarted in between with another budget:
#   unbounded: --ct-budget 262144 (the whole table): the budget never binds,
#              the baseline of the same run;
#   default:   no --ct-budget (CILIA_CT_BUDGET unset: 32768), or BUDGET=N.
# Reported per round: new connections/s, the ratio default/unbounded, the
# new flows dropped as "Endpoint conntrack budget exhausted", and the GC's
# early runs and early-collected closed entries (agents that count them).
# Before each run SETTLE s pass, so the previous run's closed connections
# have left the table. Median of REPS rounds. Needs root and the release
# binaries (BIN, default target/release: point it at another build to
# compare).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-30}
REPS=${REPS:-3}
SETTLE=${SETTLE:-12}
BUDGET=${BUDGET:-}
PORT=${PORT:-8080}
BIN=${BIN:-target/release}
P=cct$$
RUN=/run/$P
BPF=/sys/fs/bpf/$P
SOCK=$RUN/cilia.sock
NSS=("$P-node" "$P-cli" "$P-srv")
T0=$(date +%s)
source scripts/lib/procs.sh
source bench/lib/prelude.sh

AGENT_PID=
bench_traps cleanup_tracked

need_root
need_bins cilia cilia-agent
[[ $DURATION =~ ^[0-9]+$ && $DURATION -ge 1 && $DURATION -le 60 ]] || { echo "DURATION: 1..60 s (rr.py's cap)" >&2; exit 1; }
[[ $REPS =~ ^[0-9]+$ && $REPS -ge 1 ]] || { echo "REPS: a positive count" >&2; exit 1; }
[ -z "$BUDGET" ] || [[ $BUDGET =~ ^[0-9]+$ ]] || { echo "BUDGET: a count of entries" >&2; exit 1; }
mkdir -p "$RUN"
for ns in "${NSS[@]}"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip netns exec "$P-cli" sysctl -qw net.ipv4.ip_local_port_range="1024 65535"
log() { echo "[$(($(date +%s) - T0))s] $*" >&2; }
cilia() { "$BIN/cilia" --socket "$SOCK" "$@"; }

start_agent() { # extra agent flags...
  if [ -n "$AGENT_PID" ]; then
    kill "$AGENT_PID"
    wait "$AGENT_PID" 2>/dev/null || true
  fi
  rm -f "$SOCK"
  nsenter --net="/run/netns/$P-node" "$BIN/cilia-agent" --state-dir "$RUN/state" --bpf-root "$BPF" \
    --socket "$SOCK" --ipv6-range fd00:c1c::/112 --ipv4-range 10.202.0.0/24 "$@" >>"$RUN/agent.log" 2>&1 &
  AGENT_PID=$!
  track "$AGENT_PID"
  for _ in $(seq 200); do cilia status >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "the agent did not answer within 20 s; its log ends:" >&2
  tail -5 "$RUN/agent.log" >&2
  exit 1
}

# Sum of the agent's metric lines that start with $1 and contain $2; 0
# when there are none, or "-" when $3 is "optional" and the agent does not
# export the metric at all (an older build).
metric() {
  ip netns exec "$P-node" curl -sf --max-time 5 http://127.0.0.1:9962/metrics |
    awk -v name="$1" -v filter="$2" -v optional="${3:-}" '
      index($0, name) == 1 && (filter == "" || index($0, filter)) { s += $NF; seen = 1 }
      /^# TYPE / && index($3, substr(name, 1, length(name) - 6)) == 1 { seen = 1 }
      END { if (seen || optional != "optional") printf "%d\n", s; else print "-" }'
}
sub() { [ "$1" = - ] || [ "$2" = - ] && echo - || echo $(($2 - $1)); }

start_agent --ct-budget 262144
cilia endpoint create --netns "$P-srv" --labels app=server >/dev/null
cilia endpoint create --netns "$P-cli" --labels app=client >/dev/null
SRV_IP=$(cilia -o json endpoint list |
  python3 -c "import json,sys; print([e['ipv4'] for e in json.load(sys.stdin) if e['labels'].get('app')=='server'][0])")
SRV_IP=${SRV_IP%/*}
ip netns exec "$P-srv" python3 bench/rr.py serve "$PORT" 0.0.0.0 3600 & track $!
for _ in $(seq 50); do
  ip netns exec "$P-cli" python3 -c 'import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1).close()' \
    "$SRV_IP" "$PORT" 2>/dev/null && break
  sleep 0.1
done

DROPS=cilia_drop_count_total
EARLY=cilia_conntrack_gc_early_runs_total
CLOSED=cilia_conntrack_gc_closed_early_total
measure() { # label agent-flags...: one run, one table row; sets RATE
  local label=$1 d0 e0 c0 d1 e1 c1
  shift
  start_agent "$@"
  sleep "$SETTLE"
  d0=$(metric "$DROPS" "budget exhausted"); e0=$(metric "$EARLY" "" optional); c0=$(metric "$CLOSED" "" optional)
  # rr.py stops at the first connection without an answer within 2 s (a
  # SYN dropped twice): then the run counts 0.
  RATE=$(ip netns exec "$P-cli" python3 bench/rr.py conn "$SRV_IP" "$PORT" "$DURATION" 2>/dev/null) ||
    RATE="0 (stopped: a connection unanswered for 2 s)"
  d1=$(metric "$DROPS" "budget exhausted"); e1=$(metric "$EARLY" "" optional); c1=$(metric "$CLOSED" "" optional)
  ROW="$label | $RATE | $(sub "$d0" "$d1") | $(sub "$e0" "$e1") | $(sub "$c0" "$c1")"
}

default_flags=()
[ -z "$BUDGET" ] || default_flags=(--ct-budget "$BUDGET")
echo "| round | budget | new conn/s | budget drops | early GCs | closed entries collected early | default / unbounded |"
echo "|---|---|---|---|---|---|---|"
RATIOS=()
for rep in $(seq "$REPS"); do
  log "round $rep: unbounded"
  measure "unbounded (262144)" --ct-budget 262144
  base=$RATE
  echo "| $rep | $ROW | |"
  log "round $rep: ${BUDGET:-default}"
  measure "${BUDGET:-default (32768)}" "${default_flags[@]}"
  ratio=$(python3 -c "import sys; b=float(sys.argv[1].split()[0]); print('%.3f' % (float(sys.argv[2].split()[0]) / b if b else 0))" "$base" "$RATE")
  RATIOS+=("$ratio")
  echo "| $rep | $ROW | $ratio |"
done
echo
echo "median default/unbounded over $REPS rounds: $(printf '%s\n' "${RATIOS[@]}" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')"
echo "(binaries: $BIN; DURATION=$DURATION s, SETTLE=$SETTLE s)"
