#!/usr/bin/env bash
# Sets up, then runs every check: formatting, lints, unit tests, and the network-namespace tests
# with real WireGuard peers (these need root and fail without it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo test --locked --workspace
