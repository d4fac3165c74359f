#!/bin/sh
# NodePort throughput through node 1 to a backend on node 2 (one 256 MiB TCP
# transfer per phase), with XDP acceleration off, on and off again in the
# same run (two nodes and a world client in namespaces on one machine; SNAT,
# IPv4, native routing).
# Needs root. Prints a markdown table and the ratio; see docs/benchmarks.md.
set -eu
cd "$(dirname "$0")/.."
exec cargo test -p cilia-datapath --test nodeport -- --ignored --nocapture \
    bench_nodeport_throughput_with_and_without_xdp_acceleration
