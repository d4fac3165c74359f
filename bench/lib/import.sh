# Shared by the benches that time policy imports on endpoints (source after
# bench/lib/node-agent.sh): endpoints through cilia-cni with an `app`
# label, and the wall time of one `cilia policy import`, which returns when
# every selected endpoint's map in the kernel holds its entries (the time to
# enforce). Uses BIN, RUN, SOCK.

cni_add_app() { # ID NETNS APP
  local conf="{\"cniVersion\":\"1.0.0\",\"name\":\"cilia\",\"type\":\"cilia-cni\",\"socket\":\"$SOCK\",\"args\":{\"cni\":{\"labels\":{\"app\":\"$3\"}}}}"
  CNI_COMMAND=ADD CNI_CONTAINERID=$1 CNI_NETNS=$2 CNI_IFNAME=eth0 CNI_PATH=$BIN \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=$1" "$BIN/cilia-cni" <<<"$conf" >"$RUN/out" ||
    { echo "cilia-cni ADD $1 failed: $(cat "$RUN/out")" >&2; exit 1; }
}

timed_import() { # FILE: seconds
  local t0 t1
  t0=$(date +%s%N)
  "$BIN/cilia" --socket "$SOCK" policy import "$1" >/dev/null
  t1=$(date +%s%N)
  awk -v d=$((t1 - t0)) 'BEGIN { printf "%.3f", d / 1e9 }'
}
