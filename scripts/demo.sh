#!/usr/bin/env bash
# Sets up, builds and runs the self-contained demo: real wireguard-go clients and gateways in
# network namespaces behind wglb: a gateway failure as WireGuard alone recovers from it, then one
# with gateway agents.
set -euo pipefail
source "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p wglb -p wglb-lab -p wglb-agent
exec target/release/wglb-lab demo --wglb target/release/wglb --agent target/release/wglb-agent \
    --svg target/wglb-demo.svg
