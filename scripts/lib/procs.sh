# Process and namespace bookkeeping for the scripts under scripts/ and bench/
# (source it). Every process a script starts is recorded by its PID when it
# starts and ended by that PID — never by a command-line pattern, which could
# hit an agent someone else started.
#
#   some_command & track $!     remember a background process
#   stop_tracked                SIGTERM them all, wait up to 5 s, SIGKILL
#   del_netns NAME...           SIGKILL what still runs inside each namespace
#                               (`ip netns pids`), then delete it
TRACKED_PIDS=()

track() { TRACKED_PIDS+=("$1"); }

stop_tracked() {
  local pid
  for pid in "${TRACKED_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${TRACKED_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
  done
  TRACKED_PIDS=()
}

# A process left inside a namespace keeps that namespace alive after
# `ip netns del` (which only removes its name), out of reach: end it first.
del_netns() {
  local ns pid
  for ns in "$@"; do
    [ -e "/run/netns/$ns" ] || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}
