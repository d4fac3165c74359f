#!/usr/bin/env bash
# HTTP requests/s and latency (wrk, keep-alive) from a client endpoint to the
# deathstar endpoint, in the same run, over three paths:
#   none: no policy;
#   l4:   examples/starwars/cnp-l3-l4.yaml (identity + TCP/80, in BPF);
#   l7:   examples/starwars/cnp-l7.yaml (the same, plus HTTP rules: every
#         request goes through cilia-proxy, which checks it and forwards it).
# Every request is `POST /v1/request-landing` (allowed on every path), from
# $CONNS connections for $DURATION s, $REPS rounds (paths interleaved per
# round), median per path. Ratios are against the l4 path of the same run;
# "added p50/p99" is the l7 latency minus the l4 latency. Needs root and the
# release binaries (scripts/setup.sh); installs wrk if missing. Prints a
# markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
REPS=${REPS:-3}
CONNS=${CONNS:-8}
THREADS=${THREADS:-1}
BIN=target/release
P=cl7$$
RUN=/run/$P
BPF=/sys/fs/bpf/$P
SOCK=$RUN/cilia.sock
NSS=("$P-node" "$P-ds" "$P-tf")
source scripts/lib/procs.sh
source bench/lib/prelude.sh

bench_traps cleanup_tracked # the agent's proxy runs in the node namespace

need_root
need_bins cilia cilia-agent cilia-proxy deathstar
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cilia() { "$BIN/cilia" --socket "$SOCK" "$@"; }
mkdir -p "$RUN"
for ns in "${NSS[@]}"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
nsenter --net="/run/netns/$P-node" "$BIN/cilia-agent" --state-dir "$RUN/state" --bpf-root "$BPF" \
  --socket "$SOCK" --metrics-addr off --ipv6-range fd00:c1c::/112 --ipv4-range 10.202.0.0/24 \
  >"$RUN/agent.log" 2>&1 &
AGENT_PID=$!
track $AGENT_PID
for _ in $(seq 100); do cilia status >/dev/null 2>&1 && break; sleep 0.1; done
cilia status >/dev/null || { echo "agent did not start:" >&2; cat "$RUN/agent.log" >&2; exit 1; }
cilia endpoint create --netns "$P-ds" --labels org=empire,class=deathstar >/dev/null
cilia endpoint create --netns "$P-tf" --labels org=empire,class=tiefighter >/dev/null
DS=$(cilia -o json endpoint list | python3 -c "import json,sys; print([e['ipv4'] for e in json.load(sys.stdin) if e['labels'].get('class')=='deathstar'][0])")
DS=${DS%/*}
ip netns exec "$P-ds" "$BIN/deathstar" 80 >/dev/null 2>&1 &
track $!
URL="http://$DS/v1/request-landing"
for _ in $(seq 50); do ip netns exec "$P-tf" curl -sf -XPOST --max-time 1 "$URL" >/dev/null && break; sleep 0.1; done
cat >"$RUN/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
LUA

to_ms() { # wrk latency (e.g. 412.00us, 1.20ms, 2.00s) -> ms
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}
cpu_ticks() { # pid -> utime+stime in clock ticks (0 when gone)
  [ -n "$1" ] && [ -r "/proc/$1/stat" ] && awk '{print $14 + $15}' "/proc/$1/stat" || echo 0
}
proxy_pid() { cilia status --verbose | sed -n 's/.*l7-proxy .*pid \([0-9]*\),.*/\1/p'; }
HZ=$(getconf CLK_TCK)
run_wrk() { # -> "rps p50ms p99ms errors"
  local out rps p50 p99 errs
  out=$(ip netns exec "$P-tf" timeout $((DURATION + 30)) wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" \
    --latency -s "$RUN/post.lua" "$URL" 2>&1) || { echo "err err err err"; return; }
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  errs=$(awk '/Non-2xx or 3xx responses:/ {s += $5} /Socket errors:/ {gsub(/,/, ""); s += $4 + $6 + $8 + $10} END {print s + 0}' <<<"$out")
  echo "${rps:-err} $p50 $p99 $errs"
}
set_path() {
  cilia policy delete --all >/dev/null 2>&1 || true
  case $1 in
    l4) cilia policy import examples/starwars/cnp-l3-l4.yaml >/dev/null ;;
    l7) cilia policy import examples/starwars/cnp-l7.yaml >/dev/null ;;
  esac
  # The first request of the path must pass (the proxy starts on first use).
  for _ in $(seq 100); do ip netns exec "$P-tf" curl -sf -XPOST --max-time 1 "$URL" >/dev/null && return; sleep 0.1; done
  echo "path $1: no landing within 10 s" >&2; cilia status >&2; exit 1
}
declare -A RPS P50 P99 ERR ACPU PCPU
for r in $(seq "$REPS"); do
  for path in none l4 l7; do
    set_path $path
    PP=$(proxy_pid); a0=$(cpu_ticks $AGENT_PID); p0=$(cpu_ticks "$PP")
    read -r rps p50 p99 errs < <(run_wrk)
    a1=$(cpu_ticks $AGENT_PID); p1=$(cpu_ticks "$PP")
    cpu=$(awk -v a="$((a1 - a0))" -v p="$((p1 - p0))" -v hz="$HZ" 'BEGIN { printf "agent %.2f s, proxy %.2f s", a / hz, p / hz }')
    echo "round $r $path: $rps req/s, p50 $p50 ms, p99 $p99 ms, errors $errs; CPU: $cpu" >&2
    ACPU[$path]+="$(awk -v a="$((a1 - a0))" -v hz="$HZ" 'BEGIN { printf "%.2f", a / hz }') "
    PCPU[$path]+="$(awk -v p="$((p1 - p0))" -v hz="$HZ" 'BEGIN { printf "%.2f", p / hz }') "
    RPS[$path]+="$rps "; P50[$path]+="$p50 "; P99[$path]+="$p99 "; ERR[$path]+="$errs "
  done
done
median() { printf '%s\n' $@ | { grep -E '^[0-9.]+$' || true; } | sort -g | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
L4=$(median ${RPS[l4]}); L4P50=$(median ${P50[l4]}); L4P99=$(median ${P99[l4]})
echo "| path | req/s | vs l4 | p50 ms | p99 ms | added p50 / p99 ms vs l4 | agent / proxy CPU s per round | errors |"
echo "|---|---|---|---|---|---|---|---|"
for path in none l4 l7; do
  rps=$(median ${RPS[$path]}); p50=$(median ${P50[$path]}); p99=$(median ${P99[$path]})
  ac=$(median ${ACPU[$path]}); pc=$(median ${PCPU[$path]})
  awk -v p="$path" -v r="$rps" -v l="$L4" -v a="$p50" -v b="$p99" -v la="$L4P50" -v lb="$L4P99" -v e="${ERR[$path]}" -v ac="$ac" -v pc="$pc" \
    'BEGIN { printf "| %s | %.0f | %.2f× | %.3f | %.3f | %+.3f / %+.3f | %s / %s | %s |\n", p, r, r / l, a, b, a - la, b - lb, ac, pc, e }'
done
echo
echo "($REPS rounds of ${DURATION} s, $CONNS connections, $THREADS wrk thread(s), keep-alive; median per path)"
