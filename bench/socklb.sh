#!/usr/bin/env bash
# Socket-level vs per-packet load balancing: a client endpoint talks to a
# service (frontend 192.0.2.10:80/tcp and [2001:db8::10]:80/tcp, three
# backend endpoints running bench/rr.py serve on 8080), in the same run,
# over three paths:
#   direct  the baseline: the client connects to one backend's address;
#   socket  the agent with --socket-lb on: connect() is translated once, the
#           packets carry the backend from the first one;
#   packet  the agent restarted with --socket-lb off: every packet of the
#           flow is translated by the client endpoint's program (DNAT, and
#           rev-NAT of the replies).
# Measured with bench/rr.py: request/responses per second on one connection
# (rr, 64 B each way, latency bound) and new connections per second (conn),
# both families, $REPS rounds (paths interleaved per round), median per path;
# printed as ratios against direct, and socket against packet.
# The client runs in a cgroup v2 directory made for the run, which is where
# the agent attaches the socket LB (--socket-lb-cgroup): nothing else on the
# machine is translated.
# Then one more measurement of new connections per path with the kernel's
# BPF statistics on (kernel.bpf_stats_enabled, restored on exit): the time
# spent in each socket hook, per run and per connection, for translated
# sockets (socket), untranslated sockets of a served namespace (direct),
# and sockets of a namespace no agent serves (other: a client and a server
# on 127.0.0.1 in a namespace of their own, both in the bench cgroup) -
# what the socket LB costs the machine's other processes.
# Needs root, python3, bpftool, the release binaries, the services CLI (`cilia
# service update`) and the per-packet load balancer: without them it says
# which is missing and exits 1.
#   DURATION=5 (s per measurement, max 60)  REPS=3
# Everything it creates (namespaces csl<pid>-*, run dir, bpffs dir, cgroup)
# is removed on exit, also on failure or Ctrl-C; processes are ended by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
[ "$DURATION" -le 60 ] || DURATION=60
REPS=${REPS:-3}
BIN=${CILIA_BENCH_BIN:-target/release}
P=csl$$
RUN=/run/$P
BPF=/sys/fs/bpf/$P
SOCK=$RUN/cilia.sock
NSS=("$P-node" "$P-client" "$P-b1" "$P-b2" "$P-b3" "$P-other")
VIP4=192.0.2.10
VIP6=2001:db8::10
source scripts/lib/procs.sh
source bench/lib/prelude.sh
CG=""
BPF_STATS0=$(sysctl -n kernel.bpf_stats_enabled 2>/dev/null || echo 0)
cleanup() {
  sysctl -qw kernel.bpf_stats_enabled="$BPF_STATS0" 2>/dev/null || true
  stop_tracked
  del_netns "${NSS[@]}"
  [ -n "$CG" ] && rmdir "$CG" 2>/dev/null || true
  rm -rf "$RUN" "$BPF"
}
bench_traps

need_root
command -v python3 >/dev/null || { echo "socklb.sh: needs python3 (scripts/setup.sh)" >&2; exit 1; }
command -v bpftool >/dev/null || { echo "socklb.sh: needs bpftool (scripts/setup.sh)" >&2; exit 1; }
need_bins cilia cilia-agent
cilia() { "$BIN/cilia" --socket "$SOCK" "$@"; }
if ! "$BIN/cilia" service update --help >/dev/null 2>&1; then
  echo "socklb.sh: this build has no \`cilia service update\` (the services CLI): cannot create the service" >&2
  exit 1
fi
for root in /sys/fs/cgroup /sys/fs/cgroup/unified; do
  if [ "$(stat -f -c %T "$root" 2>/dev/null)" = cgroup2fs ]; then CG=$root/$P; break; fi
done
[ -n "$CG" ] || { echo "socklb.sh: no cgroup v2 mount" >&2; exit 1; }
mkdir "$CG"
mkdir -p "$RUN"
for ns in "${NSS[@]}"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done

# --ct-budget: the client endpoint opens thousands of connections per
# second; each leaves its conntrack entries counted against the endpoint's
# budget until a GC removes them. Near the default budget (32768) the agent
# collects early, a walk of the table every second, whose CPU would be
# measured as cilia's: a budget the client never nears keeps the GC on its
# interval.
start_agent() { # start_agent on|off
  nsenter --net="/run/netns/$P-node" "$BIN/cilia-agent" --state-dir "$RUN/state" --bpf-root "$BPF" \
    --socket "$SOCK" --metrics-addr off --ipv6-range fd00:c1d::/112 --ipv4-range 10.203.0.0/24 \
    --socket-lb "$1" --socket-lb-cgroup "$CG" --ct-budget 262144 >>"$RUN/agent.log" 2>&1 &
  AGENT_PID=$!
  track $AGENT_PID
  for _ in $(seq 100); do cilia status >/dev/null 2>&1 && return; sleep 0.1; done
  echo "agent did not start:" >&2; cat "$RUN/agent.log" >&2; exit 1
}
stop_agent() {
  kill "$AGENT_PID"
  for _ in $(seq 50); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
  wait "$AGENT_PID" 2>/dev/null || true
}
ep_ip() { # ep_ip NETNS ipv4|ipv6
  cilia -o json endpoint list | python3 -c "import json,sys; print([e['$2'] for e in json.load(sys.stdin) if e['netns'].endswith('/$1') or e['netns'] == '$1'][0].split('/')[0])"
}

start_agent on
B4=() B6=()
for n in 1 2 3; do
  cilia endpoint create --netns "$P-b$n" --labels app=backend >/dev/null
  ip netns exec "$P-b$n" python3 bench/rr.py serve 8080 :: 900 >/dev/null 2>&1 &
  track $!
  B4+=("$(ep_ip "$P-b$n" ipv4)"); B6+=("$(ep_ip "$P-b$n" ipv6)")
done
cilia endpoint create --netns "$P-client" --labels app=client >/dev/null
# The namespace no agent serves: its server runs in the bench cgroup too.
sh -c 'echo $$ > "$1/cgroup.procs" && exec ip netns exec "$2" python3 bench/rr.py serve 8080 127.0.0.1 900' \
  sh "$CG" "$P-other" >/dev/null 2>&1 &
track $!
cilia service update --frontend "$VIP4:80/tcp" \
  --backends "$(printf '%s:8080,' "${B4[@]}" | sed 's/,$//')" >/dev/null
cilia service update --frontend "[$VIP6]:80/tcp" \
  --backends "$(printf '[%s]:8080,' "${B6[@]}" | sed 's/,$//')" >/dev/null

# client MODE IP PORT SECONDS -> ops/s, run in the bench cgroup inside the
# client's namespace ("err" on failure).
# Each path's clients use their own source ports (RR_PORTS, see rr.py): a
# 5-tuple of another path's flows would meet that path's lingering conntrack
# entry; under the per-packet LB a new flow whose translated tuple meets an
# entry of an untranslated flow gets no rev-NAT (see docs/benchmarks.md).
declare -A PORTS=([direct]=10000-26999 [socket]=27000-43999 [packet]=44000-60999 [other]=10000-64999)
CUR=direct
client() {
  local ns=$P-client
  [ "$CUR" = other ] && ns=$P-other
  RR_PORTS=${PORTS[$CUR]} sh -c 'echo $$ > "$1/cgroup.procs" && exec ip netns exec "$2" timeout $(($6 + 15)) python3 bench/rr.py "$3" "$4" "$5" "$6"' \
    sh "$CG" "$ns" "$@" 2>/dev/null || echo err
}
# The path must answer before it is measured.
check_path() { # check_path NAME
  local vip r
  CUR=$1
  for vip in $VIP4 $VIP6; do
    r=$(client conn "$vip" 80 1)
    if [ "$r" = err ] || [ "${r%.*}" -le 0 ]; then
      if [ "$1" = packet ]; then
        echo "socklb.sh: no answer from $vip:80 with --socket-lb off (per-packet load balancer)" >&2
      else
        echo "socklb.sh: path $1: no answer from $vip:80" >&2; cilia status >&2
      fi
      exit 1
    fi
  done
}
check_path socket
cilia status | grep -q "^Socket LB: *on cgroup" || { echo "socklb.sh: the socket LB is not on" >&2; cilia status >&2; exit 1; }

declare -A RES
measure() { # measure PATH
  local target4=$VIP4 target6=$VIP6 port=80 mode
  CUR=$1
  if [ "$1" = direct ]; then target4=${B4[0]}; target6=${B6[0]}; port=8080; fi
  for mode in rr conn; do
    RES[$1-$mode-4]+="$(client $mode "$target4" $port "$DURATION") "
    RES[$1-$mode-6]+="$(client $mode "$target6" $port "$DURATION") "
  done
  echo "round $r $1: rr ${RES[$1-rr-4]}/ ${RES[$1-rr-6]}, conn ${RES[$1-conn-4]}/ ${RES[$1-conn-6]}(IPv4 / IPv6, all rounds)" >&2
}
set_socket_lb() { # set_socket_lb on|off (a restart of the agent)
  stop_agent
  start_agent "$1"
}
for r in $(seq "$REPS"); do
  set_socket_lb on
  check_path socket
  measure direct
  measure socket
  set_socket_lb off
  check_path packet
  measure packet
done
# --- the kernel's BPF statistics: time inside each socket hook --------------
hook_stats() { # "hook:run_time_ns:run_cnt ..." for the agent's pinned socket links
  local f id
  for f in "$BPF"/socklb/*; do
    id=$(bpftool -j link show pinned "$f" | python3 -c 'import json,sys; print(json.load(sys.stdin)["prog_id"])')
    bpftool -j prog show id "$id" | python3 -c 'import json,sys
p = json.load(sys.stdin); print("%s:%d:%d" % (sys.argv[1], p.get("run_time_ns", 0), p.get("run_cnt", 0)))' "${f##*/}"
  done | tr '\n' ' '
}
set_socket_lb on
check_path socket
STATS=()
sysctl -qw kernel.bpf_stats_enabled=1
for CUR in other direct socket; do
  target=$VIP4 port=80
  [ "$CUR" = direct ] && target=${B4[0]} port=8080
  [ "$CUR" = other ] && target=127.0.0.1 port=8080
  before=$(hook_stats)
  rate=$(client conn "$target" $port "$DURATION")
  after=$(hook_stats)
  STATS+=("$(python3 -c 'import sys
name, rate, dur = sys.argv[1], sys.argv[2], float(sys.argv[3])
def parse(s): return {h: (int(t), int(c)) for h, t, c in (x.split(":") for x in s.split())}
b, a = parse(sys.argv[4]), parse(sys.argv[5])
try: ops = float(rate) * dur
except ValueError: print("| %s | %s | - | - |" % (name, rate)); sys.exit()
hooks, total = [], 0
for h in sorted(a):
    t, c = a[h][0] - b[h][0], a[h][1] - b[h][1]
    if c:
        hooks.append("%s %.2f × %.0f ns" % (h, c / ops, t / c)); total += t
print("| %s | %.0f | %s | %.0f |" % (name, float(rate), ", ".join(hooks) or "none", total / ops))' "$CUR" "$rate" "$DURATION" "$before" "$after")")
done
sysctl -qw kernel.bpf_stats_enabled="$BPF_STATS0"

median() { printf '%s\n' $@ | { grep -E '^[0-9.]+$' || true; } | sort -g | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
echo "| measure | family | direct | socket LB | per-packet LB | socket / direct | per-packet / direct | socket / per-packet |"
echo "|---|---|---|---|---|---|---|---|"
for mode in rr conn; do
  for fam in 4 6; do
    d=$(median ${RES[direct-$mode-$fam]}); s=$(median ${RES[socket-$mode-$fam]}); k=$(median ${RES[packet-$mode-$fam]})
    awk -v m="$mode" -v f="IPv$fam" -v d="$d" -v s="$s" -v k="$k" \
      'BEGIN { n = (m == "rr") ? "req/resp per s, one connection" : "connections per s"; printf "| %s | %s | %.0f | %.0f | %.0f | %.2f× | %.2f× | %.2f× |\n", n, f, d, s, k, s / d, k / d, s / k }'
  done
done
echo
echo "($REPS rounds of ${DURATION} s per measurement; median per path)"
echo
echo "Time inside the socket hooks (kernel BPF statistics, one ${DURATION} s measurement of IPv4 new connections per path, socket LB on):"
echo
echo "| sockets | conn/s | hooks run per connection × ns per run | ns per connection |"
echo "|---|---|---|---|"
printf '%s\n' "${STATS[@]}"
echo
echo "(other: a namespace no agent serves, client and server on 127.0.0.1, both in the bench cgroup; direct: a served namespace, untranslated; socket: translated)"
