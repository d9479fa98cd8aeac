#!/usr/bin/env bash
# Sets up, builds and runs the self-contained demo: real wireguard-go clients and gateways in
# network namespaces behind wglb, with a gateway failure and the failover.
set -euo pipefail
source "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p wglb -p wglb-lab
exec target/release/wglb-lab demo --wglb target/release/wglb
