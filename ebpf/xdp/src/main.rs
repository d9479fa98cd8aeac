//! wglb's XDP program. Built for the BPF target only; on the host (where `cargo test --workspace`
//! compiles every member) it is an empty binary.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
