#!/usr/bin/env bash
# All benchmarks, each against a baseline measured in the same run. Root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
echo "## BPF_PROG_TEST_RUN (1M repeats, median of 5)"
cargo bench -q -p cilia-datapath --bench testrun 2>/dev/null
echo
echo "## iperf3 TCP, single stream"
bench/throughput.sh
echo
echo "## HTTP (wrk): no policy vs L4 vs L7 through cilia-proxy"
bench/l7.sh
echo
echo "## Across nodes: plain Linux routing vs VXLAN overlay vs native routing"
bench/multinode.sh
echo
echo "## Services: socket-level vs per-packet load balancing"
bench/socklb.sh
echo "## XDP prefilter vs iptables raw PREROUTING (10 and 10k CIDRs)"
bench/prefilter.sh
echo
echo "## Services at scale vs kube-proxy's iptables layout"
bench/services.sh
echo
echo "## Endpoint setup: CNI ADD and DEL latency, agent memory"
bench/cni.sh
echo
echo "## Time to enforce: an import on endpoints vs the same import on none"
bench/enforce.sh
echo
echo "## A large CIDR policy on endpoints: time to enforce, agent memory per endpoint"
bench/cidr-policy.sh
echo
echo "## Conntrack GC: batch commands vs aya's per-entry calls"
cargo bench -q -p cilia-datapath --bench ctgc 2>/dev/null
echo
echo "## Short connections per second under the default conntrack budget vs none"
bench/ct-rate.sh
