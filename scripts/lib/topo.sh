# Topologies the bench scripts share (source it).
#
#   routed_path CLI_NS CLI_DEV CLI_ADDR/LEN RTR_NS RTR_CLI_DEV RTR_CLI_ADDR/LEN \
#               RTR_SRV_DEV RTR_SRV_ADDR/LEN SRV_NS SRV_DEV SRV_ADDR/LEN
#
# A client and a server namespace joined through a router namespace by two
# veth pairs and routed by the router's stack: each end's default route is
# the router, which has no other link. Documentation addresses only, inside
# the caller's own namespaces (which it deletes on exit).
routed_path() {
  local cns=$1 cdev=$2 caddr=$3 rns=$4 rcdev=$5 rcaddr=$6 rsdev=$7 rsaddr=$8
  local sns=$9 sdev=${10} saddr=${11} l
  ip link add "$cdev" netns "$cns" type veth peer name "$rcdev" netns "$rns"
  ip link add "$sdev" netns "$sns" type veth peer name "$rsdev" netns "$rns"
  ip -n "$cns" addr add "$caddr" dev "$cdev"
  ip -n "$rns" addr add "$rcaddr" dev "$rcdev"
  ip -n "$rns" addr add "$rsaddr" dev "$rsdev"
  ip -n "$sns" addr add "$saddr" dev "$sdev"
  for l in "$cns $cdev" "$rns $rcdev" "$rns $rsdev" "$sns $sdev"; do
    set -- $l
    ip -n "$1" link set "$2" up
  done
  ip -n "$cns" route add default via "${rcaddr%/*}"
  ip -n "$sns" route add default via "${rsaddr%/*}"
  ip netns exec "$rns" sysctl -qw net.ipv4.ip_forward=1
}
