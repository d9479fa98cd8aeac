# Sourced by the scripts that need root (apt, network namespaces): as root they go on; anyone else
# is taken to root through sudo, with the same toolchain (rustup's and cargo's homes and PATH, which
# sudo would otherwise reset). A fresh Debian used as root has no sudo, and needs none.
if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null; then
        echo "$(basename "$0"): run as root (apt-get, network namespaces); sudo is not installed" >&2
        exit 1
    fi
    exec sudo env PATH="$HOME/.cargo/bin:$PATH" \
        CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}" RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" \
        bash "$0" "$@"
fi
