#!/usr/bin/env bash
# Where an endpoint program's time goes, by source line: runs the testrun
# bench on one case (CASE, a substring of the case's name, e.g. "IPv4 UDP
# new flow, allowed"), samples every CPU with perf for SECONDS while it
# runs, and charges each sample to the BPF source line it was in, or, for a
# helper or map function the program called, to the line that called it
# (bench/lib/bpf_lines.py: the kernel's JITed line info maps the image to
# the source). Prints a markdown table per loaded program. Needs root,
# perf, bpftool and python3; the bench's packets never leave
# BPF_PROG_TEST_RUN (no interface, no traffic).
set -euo pipefail
cd "$(dirname "$0")/.."
CASE=${CASE:?"CASE=<part of a testrun case name> bench/bpf-lines.sh"}
SECONDS_SAMPLED=${SECONDS_SAMPLED:-8}
TOP=${TOP:-30}
for tool in perf bpftool python3; do
  command -v "$tool" >/dev/null || { echo "bench/bpf-lines.sh: $tool missing" >&2; exit 1; }
done
bench=$(cargo bench -p cilia-datapath --bench testrun --no-run 2>&1 |
  sed -n 's/.*Executable .* (\(.*\))$/\1/p' | tail -1)
[ -x "$bench" ] || { echo "bench/bpf-lines.sh: no testrun bench binary" >&2; exit 1; }
WORK=$(mktemp -d /tmp/bpf-lines.XXXXXX)
BENCH_PID=
cleanup() {
  [ -n "$BENCH_PID" ] && kill "$BENCH_PID" 2>/dev/null && wait "$BENCH_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
# Enough rounds to outlast the sampling; killed when it is done.
CILIA_BENCH_ONLY="$CASE" CILIA_BENCH_ROUNDS=100000 "$bench" >"$WORK/bench.out" 2>&1 &
BENCH_PID=$!
ids=
for _ in $(seq 100); do
  # The bench's own endpoint programs: the program fds it holds.
  ids=$(python3 - "$BENCH_PID" <<'PY'
import glob, json, subprocess, sys
ids = set()
for info in glob.glob(f"/proc/{sys.argv[1]}/fdinfo/*"):
    try:
        fields = dict(l.split(":", 1) for l in open(info) if ":" in l)
    except OSError:
        continue
    if "prog_id" in fields:
        ids.add(fields["prog_id"].strip())
for prog in sorted(ids):
    show = subprocess.run(["bpftool", "prog", "show", "id", prog, "-j"], capture_output=True, text=True)
    if show.returncode == 0 and json.loads(show.stdout).get("name") in ("cil_from_container", "cil_to_container"):
        print(prog, end=" ")
PY
)
  [ -n "$ids" ] && grep -q . "$WORK/bench.out" && break
  sleep 0.2
done
[ -n "$ids" ] || { echo "bench/bpf-lines.sh: the bench loaded no endpoint program" >&2; exit 1; }
for id in $ids; do
  python3 bench/lib/bpf_lines.py jit "$id" >"$WORK/jit-$id.txt"
  bpftool prog dump xlated id "$id" linum >"$WORK/xlated-$id.txt"
done
perf record -a -g -F 20000 -o "$WORK/perf.data" -- sleep "$SECONDS_SAMPLED" 2>/dev/null
echo "## Where \`$CASE\` spends its time, by BPF source line"
python3 bench/lib/bpf_lines.py report "$WORK/perf.data" "$WORK" "$TOP"
