//! What wglb's two datapaths (the userspace relay in `lb/` and the XDP program in `ebpf/`) must
//! agree on bit for bit: which datagrams are WireGuard, and how a client's source tuple hashes to a
//! Maglev slot. It is `no_std`, allocation-free and loop-bounded so the eBPF verifier accepts it.
#![no_std]

pub mod hash;
pub mod wireguard;
