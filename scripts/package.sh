#!/usr/bin/env bash
# Builds the Debian package of wglb, wglb-healthcheck and wglb-agent (with their systemd units
# and example configurations) into target/debian/. Needs cargo-deb (scripts/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --release -p wglb -p wglb-healthcheck -p wglb-agent
# Release builds keep line tables (profile.release debug = 1) for profiling; the package does not.
cargo deb --locked --no-build --strip -p wglb
