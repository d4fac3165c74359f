# What the demos (scripts/demo.sh, scripts/demo-cluster.sh) share: headings
# and the ships' HTTP calls to the deathstar (source it; needs $P, the
# demo's namespace prefix).

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
in_ship() { local ns=$P-$1; shift; ip netns exec "$ns" "$@"; }
call() { # ship address method path: one line with the deathstar's answer
  if out=$(in_ship "$1" curl -s --max-time 2 -X "$3" "http://$2$4" 2>/dev/null); then
    printf '  %-10s %-4s %-24s -> deathstar %-18s %s\n' "$1" "$3" "$4" "$2" "${out%$'\r'}"
  else
    printf '  %-10s %-4s %-24s -> deathstar %-18s \033[31mno answer (dropped)\033[0m\n' "$1" "$3" "$4" "$2"
  fi
}
land() { call "$1" "$2" POST /v1/request-landing; }
