#!/usr/bin/env bash
# Fuzzes everything wglb parses from the network or from files (fuzz/, see fuzz/README.md) for a
# bounded time per target, and fails if a target crashes; the input that crashed it is left in
# fuzz/artifacts/TARGET/. Run after scripts/setup.sh, which installs the pinned nightly.
#   scripts/fuzz.sh [TARGET...]     every target by default
#   FUZZ_SECONDS=N                  seconds per target (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
seconds=${FUZZ_SECONDS:-30}

# cargo-fuzz itself builds with the stable toolchain (0.13.2 checked on rustc 1.95).
cargo_fuzz_version=0.13.2
if [[ $(cargo fuzz --version 2>/dev/null) != *"$cargo_fuzz_version"* ]]; then
    cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
fi
# The targets need a nightly (coverage instrumentation flags): the one the XDP program pins is
# installed already, and pinning keeps the fuzz build from moving under the project.
toolchain=$(sed -n 's/^const EBPF_TOOLCHAIN: &str = "\(.*\)";$/\1/p' lb/build.rs)
if [[ -z $toolchain ]]; then
    echo "fuzz: cannot find EBPF_TOOLCHAIN in lb/build.rs" >&2
    exit 1
fi
fuzz=(cargo "+$toolchain" fuzz)

if (($#)); then
    targets=("$@")
else
    mapfile -t targets < <("${fuzz[@]}" list)
fi
# Without AddressSanitizer: the code under test is safe Rust, so its bugs show as panics, which
# libFuzzer catches anyway; instrumenting the whole dependency tree (tokio, tonic, aya...) with the
# sanitizer took a fifth more CPU time to build and ran five times fewer inputs per second here.
# Every `run` must repeat `-s none`, or cargo-fuzz rebuilds everything with the sanitizer.
sanitizer=(-s none)
# One build for all targets: they share the dependency tree.
"${fuzz[@]}" build "${sanitizer[@]}"
for target in "${targets[@]}"; do
    # New inputs go to a scratch corpus (the first directory), so fuzz/corpus/ keeps only its
    # committed seeds; the scratch one survives between local runs in fuzz/target/.
    scratch=fuzz/target/corpus/$target
    log=fuzz/target/$target.log
    mkdir -p "$scratch"
    # -timeout: an input that takes seconds is a bug too, and must not outlast the time limit.
    # No stdin: the sidecar's parser reads the key and token files a text names, and a text that
    # names /dev/stdin must not wait on a terminal.
    if ! "${fuzz[@]}" run "${sanitizer[@]}" "$target" "$scratch" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -verbosity=0 -print_final_stats=1 \
        </dev/null >"$log" 2>&1; then
        # The panic, the input that caused it and the commands that reproduce and minimize it.
        grep -v -e NEW_FUNC -e '^warning: wglb' "$log" >&2
        echo "fuzz: $target failed (output above, and in $log)" >&2
        exit 1
    fi
    awk -v target="$target" -v seconds="$seconds" '
        /^stat::number_of_executed_units:/ { runs = $2 }
        /^stat::new_units_added:/ { added = $2 }
        END { printf "fuzz: %s: %d inputs in %ss, %d new in the corpus, no crash\n", target, runs, seconds, added }' "$log"
done
