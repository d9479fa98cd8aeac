#!/usr/bin/env bash
# Sets up, then runs every check: formatting, lints, unit tests, the network-namespace tests
# with real WireGuard peers (these need root and fail without it), and the fuzz targets.
set -euo pipefail
source "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked --workspace 2>&1 | tee "$log"
# One closing line for the whole workspace: cargo prints one per test binary, the last of which
# (a doc-test run) may well be empty.
awk '/^test result:/ { passed += $4; failed += $6; ignored += $8 }
     END { printf "workspace: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$log"
# Everything that parses untrusted bytes, fuzzed for a bounded time (FUZZ_SECONDS a target).
bash scripts/fuzz.sh
# The Debian package: builds, installs with dpkg, units verified, removes.
bash scripts/check-package.sh
