#!/usr/bin/env bash
# Installs what wglb's build, demo and tests need on a fresh Debian machine, idempotently.
# Needs root (apt, and later network namespaces).
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "setup: run as root (apt-get, network namespaces)" >&2
    exit 1
fi

packages=(
    wireguard-go     # real WireGuard peers for the demo and tests (no kernel module here)
    wireguard-tools  # wg
    iproute2         # ip netns, veth
    iputils-ping     # ping through the tunnels
    ethtool          # test rigs set veth offloads for the XDP datapath
    nftables         # tests rewrite a client's source mapping (NAT rebinding) with nft
    keepalived       # VRRP for the HA pair tests (deploy/keepalived/)
    bird2            # BGP and BFD for the active-active tests (deploy/bird/)
    systemd          # systemd-analyze verifies the packaged units
    binutils         # strip, for the Debian package
    python3-venv     # the schema checkers of deploy/ (below) live in a virtualenv
    prometheus       # promtool: the tests check the metrics exposition and deploy/ with it
    llvm-22-dev      # bpf-linker links the XDP program against Debian's LLVM 22
    ca-certificates
)
bash "$(dirname "$0")/apt-install.sh" "${packages[@]}"

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install Rust with rustup first" >&2
    exit 1
fi
# The lints need rustfmt and clippy; ask rustup only when they are missing.
for component in rustfmt clippy; do
    command="cargo ${component/rustfmt/fmt} --version"
    $command >/dev/null 2>&1 || rustup component add "$component"
done

# The XDP program (ebpf/xdp) is built by lb/build.rs with a pinned nightly whose LLVM (22) is the
# one bpf-linker links with; "latest nightly" would move to an LLVM that Debian does not ship.
cd "$(dirname "$0")/.."
ebpf_toolchain=$(sed -n 's/^const EBPF_TOOLCHAIN: &str = "\(.*\)";$/\1/p' lb/build.rs)
if [[ -z $ebpf_toolchain ]]; then
    echo "setup: cannot find EBPF_TOOLCHAIN in lb/build.rs" >&2
    exit 1
fi
if ! rustup component list --installed --toolchain "$ebpf_toolchain" 2>/dev/null | grep -q '^rust-src'; then
    rustup toolchain install "$ebpf_toolchain" --profile minimal --component rust-src
fi
# Schema checkers for deploy/ (lb/tests/deploy.rs): the Kubernetes API's schemas and the Compose
# specification's, from PyPI, pinned, in a virtualenv of their own.
tools=/opt/wglb-tools/venv
if ! "$tools/bin/pip" freeze 2>/dev/null | grep -qx 'kubernetes-validate==1.37.0' \
    || ! "$tools/bin/pip" freeze 2>/dev/null | grep -qx 'check-jsonschema==0.39.0'; then
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet kubernetes-validate==1.37.0 check-jsonschema==0.39.0
fi
# The Debian package (scripts/package.sh).
cargo_deb_version=3.8.0
if [[ $(cargo deb --version 2>/dev/null) != *"$cargo_deb_version"* ]]; then
    cargo install cargo-deb --locked --version "$cargo_deb_version"
fi
bpf_linker_version=0.13.0
if [[ $(bpf-linker --version 2>/dev/null) != *"$bpf_linker_version"* ]]; then
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked --force --version "$bpf_linker_version" \
        --no-default-features --features llvm-22
fi
