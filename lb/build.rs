//! Builds the XDP program (`ebpf/xdp`) for the BPF target with a pinned nightly toolchain through
//! aya-build; `lb/src/xdp.rs` embeds the object, so the `wglb` binary carries its own program.

/// The nightly that builds the program: its LLVM (22) must be the one bpf-linker is built against
/// (Debian's llvm-22-dev), so it is pinned rather than "latest nightly". `scripts/setup.sh`
/// installs it.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";

fn main() -> anyhow::Result<()> {
    // The program's shared types and shape check live in wglb-common.
    println!("cargo:rerun-if-changed=../ebpf/common/src");
    let program = aya_build::Package {
        name: "wglb-xdp",
        root_dir: "../ebpf/xdp",
        ..Default::default()
    };
    aya_build::build_ebpf([program], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
}
