# Sourced by every bench script after it has changed to the repository
# root: the checks a bench makes before it starts anything, and its exit
# traps. A bench defines cleanup() (the processes it started, its
# namespaces, pins and files) before it calls bench_traps, so nothing it
# made outlives it, whether it ends, fails or is interrupted.

bench_traps() {
  trap cleanup EXIT
  trap 'exit 130' INT TERM
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
