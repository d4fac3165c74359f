#!/usr/bin/env bash
# The container image is self-contained and fits the DaemonSet: builds it
# with scripts/build-image.sh from already-built binaries (debug ones do:
# the point is what the image holds, not how fast it runs), then, in
# containers with no network:
#   - every binary runs (`cilia --version`, `cilia-agent --help`,
#     `cilia-proxy --version`, `cilia-cni` answering CNI VERSION);
#   - the image holds the four binaries, their libraries and the loader,
#     and nothing else;
#   - the init container's command of install/kubernetes/cilia.yaml
#     installs cilia-cni and the conflist into mounted host directories;
#   - cilia-agent accepts every flag in the manifest's `args` and reads
#     every CILIA_* key of its ConfigMap (the `[env: …]` of `--help`).
# Needs root and podman; under CI=true a missing one is a failure, never a skip.
#   tests/image.sh [BIN_DIR]        (default target/debug)
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir=${1:-target/debug}
tag=localhost/cilia:test
manifest=install/kubernetes/cilia.yaml

skip_or_fail() {
  if [ "${CI:-}" = "true" ]; then
    echo "image.sh: FAILED: $1 (CI=true: no skipping)" >&2
    exit 1
  fi
  echo "image.sh: SKIPPED: $1" >&2
  exit 0
}
[ "$(id -u)" -eq 0 ] || skip_or_fail "needs root (podman's image store and runc)"
command -v podman >/dev/null || skip_or_fail "podman is not installed (scripts/setup.sh --deps)"

work=$(mktemp -d /tmp/cilia-image-test.XXXXXX)
cleanup() {
  podman rmi --force "$tag" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

passed=0
failed=0
ok() { echo "ok: $1"; passed=$((passed + 1)); }
fail() { echo "FAILED: $1" >&2; failed=$((failed + 1)); }

scripts/build-image.sh --bin-dir "$bin_dir" --tag "$tag"

# podman 4.3 here: runc (crun fails on this cgroup layout) and ulimits
# within the hard limits (docs: README, the cilia-cni section).
run() {
  podman run --rm --network none --runtime runc \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 "$@"
}

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
out=$(run "$tag" cilia --version 2>&1) && [[ $out == *" $version" ]] &&
  ok "cilia --version: $out" || fail "cilia --version: $out"
out=$(run "$tag" cilia-proxy --version 2>&1) && [[ $out == *" $version" ]] &&
  ok "cilia-proxy --version: $out" || fail "cilia-proxy --version: $out"
help=$(run "$tag" cilia-agent --help 2>&1) && [[ $help == *"Usage: cilia-agent"* ]] &&
  ok "cilia-agent --help" || fail "cilia-agent --help: $help"
out=$(echo '{"cniVersion":"1.0.0"}' | run -i -e CNI_COMMAND=VERSION "$tag" cilia-cni 2>&1) &&
  [[ $out == *'"supportedVersions"'* ]] &&
  ok "cilia-cni VERSION: $out" || fail "cilia-cni VERSION: $out"
# The default command is the agent (what `podman run IMAGE` starts).
out=$(podman image inspect --format '{{.Config.Cmd}}' "$tag")
[ "$out" = "[/usr/bin/cilia-agent]" ] && ok "default command: $out" || fail "default command: $out"

# Nothing but the binaries, their libraries, the loader and empty dirs.
cid=$(podman create --runtime runc "$tag")
files=$(podman export "$cid" | tar -t | grep -v '/$' | sed 's|^\./||' | sort)
podman rm "$cid" >/dev/null
expected=$( {
  for b in cilia-agent cilia cilia-cni cilia-proxy; do
    echo "usr/bin/$b"
    ldd "$bin_dir/$b" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
  done
  echo "var/run" # the symlink to /run
} | sed 's|^/||' | sort -u)
# Files podman itself puts into every container (mount points it creates).
actual=$(grep -vxE 'etc/(hosts|hostname|resolv.conf)|run/\.containerenv|\.containerenv' <<<"$files" || true)
if [ "$actual" = "$expected" ]; then
  ok "the image holds exactly: $(tr '\n' ' ' <<<"$expected")"
else
  fail "image contents differ: $(diff <(echo "$expected") <(echo "$actual") | grep '^[<>]' | tr '\n' ' ')"
fi

# The init container, as the manifest runs it.
init_cmd=(cilia cni install --bin-dir /host/opt/cni/bin --conf-dir /host/etc/cni/net.d)
if ! grep -qzF "$(printf '            - %s\n' "${init_cmd[@]}")" "$manifest"; then
  fail "the init container's command in $manifest is not: ${init_cmd[*]}"
fi
mkdir -p "$work/bin" "$work/net.d"
# The image holds its binaries without debug info (scripts/build-image.sh).
objcopy --strip-debug "$bin_dir/cilia-cni" "$work/cilia-cni.expected"
if out=$(run --read-only -v "$work/bin:/host/opt/cni/bin" -v "$work/net.d:/host/etc/cni/net.d" \
  "$tag" "${init_cmd[@]}" 2>&1) &&
  cmp -s "$work/bin/cilia-cni" "$work/cilia-cni.expected" &&
  [ -x "$work/bin/cilia-cni" ] &&
  cmp -s "$work/net.d/10-cilia.conflist" examples/cni/cilia.conflist; then
  ok "init container installed cilia-cni and 10-cilia.conflist: $(tr '\n' ' ' <<<"$out")"
else
  fail "init container: $out; bin: $(ls -l "$work/bin") net.d: $(ls -l "$work/net.d")"
fi

# Every flag and CILIA_* key the manifest gives the agent, known to it.
flags=$(awk '/^ *args:/ { inargs = 1; next }
             inargs && /^ *- --/ { sub(/^ *- /, ""); sub(/=.*/, ""); print; next }
             { inargs = 0 }' "$manifest")
keys=$(grep -oE '^  CILIA_[A-Z0-9_]+:' "$manifest" | tr -d ' :')
[ -n "$keys" ] || fail "no CILIA_* keys found in $manifest"
for f in $flags; do
  grep -qE -- "^ +(-[a-zA-Z], )?$f( |$)" <<<"$help" &&
    ok "cilia-agent knows $f" || fail "cilia-agent --help has no $f (used in $manifest)"
done
for k in $keys; do
  grep -qF "[env: $k=" <<<"$help" &&
    ok "cilia-agent reads $k" || fail "cilia-agent --help reads no $k (ConfigMap in $manifest)"
done

echo "test result: $([ "$failed" -eq 0 ] && echo ok || echo FAILED). $passed passed; $failed failed; 0 ignored (image)"
[ "$failed" -eq 0 ]
