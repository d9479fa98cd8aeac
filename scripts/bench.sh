#!/usr/bin/env bash
# The throughput rig in one command (as root): installs what the benchmarks need on top of the
# project's own setup (nginx stream, nftables, iperf3), then runs, on network namespaces of this
# machine only:
#   rig      wglb (userspace, XDP native, XDP generic) against nginx stream, a userspace relay's
#            floor, nftables DNAT and kernel forwarding: packets/s, Gbit/s, loss, CPU per packet,
#            64- and 1420-byte messages
#   tunnel   iperf3 TCP inside wireguard-go tunnels, through wglb and directly
#   failover time to recover from a gateway's death, wglb with and without gateway agents
#            against nginx stream and nftables DNAT
#   rehome   500 clients re-homed at once with gateway agents: time to the last, pacing
#   scale    packets/s and memory with 1k, 100k and 1M live sessions
# Results: benches/results/{rig,tunnel,failover,rehome,scale}.{csv,md} and rig.svg. About 30 minutes.
# `bash scripts/bench.sh rig` runs one of them; WGLB_BENCH_QUICK=1 makes short runs.
set -euo pipefail
source "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/apt-install.sh nginx libnginx-mod-stream nftables iperf3
source "$HOME/.cargo/env" 2>/dev/null || true
# The benchmarks (crate wglb-benches) run the balancer's binary, the failover and rehome ones
# the gateway agent next to it, and the rig the userspace relay floor (wglb-relay): all built
# first, into target/release where they look. (A second command: `--bin` would apply to every
# package of the first.)
cargo build --release --locked -p wglb -p wglb-agent
cargo build --release --locked -p wglb-lab --bin wglb-relay
benches=("${@:-rig tunnel failover rehome scale}")
for bench in ${benches[*]}; do
    echo "== $bench"
    cargo bench -p wglb-benches --bench "$bench" 2> >(grep -v '^warning: wglb@' >&2)
done
echo "results: benches/results/"
