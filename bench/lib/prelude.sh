# Sourced by every bench script after it has changed to the repository
# root: the checks a bench makes before it starts anything, and its exit
# traps. A bench defines cleanup() (the processes it started, its
# namespaces, pins and files), or uses cleanup_tracked, before it calls
# bench_traps, so nothing it made outlives it, whether it ends, fails or is
# interrupted.

bench_traps() { # [FUNCTION]: the cleanup to run on exit (default: cleanup)
  trap "${1:-cleanup}" EXIT
  trap 'exit 130' INT TERM
}

# The cleanup of a bench that tracks what it starts (scripts/lib/procs.sh),
# names its namespaces in NSS and pins under BPF, with its files in RUN.
cleanup_tracked() {
  stop_tracked
  del_netns "${NSS[@]}"
  rm -rf "$RUN" "$BPF"
}

need_root() {
  [ "$(id -u)" = 0 ] || { echo "$(basename "$0"): needs root" >&2; exit 1; }
}

need_bins() { # BINARY...: each must be in $BIN
  local b
  for b in "$@"; do
    [ -x "$BIN/$b" ] || { echo "$(basename "$0"): $BIN/$b missing: cargo build --release --workspace --bins" >&2; exit 1; }
  done
}
