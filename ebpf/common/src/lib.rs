//! What wglb's two datapaths (the userspace relay in `lb/` and the XDP program in `ebpf/xdp`) must
//! agree on bit for bit: which datagrams are WireGuard, how a client's source tuple hashes to a
//! Maglev slot, and the layout of the program's maps. It is `no_std`, allocation-free and loop-bounded so the eBPF verifier accepts it.
#![no_std]

pub mod admission;
pub mod checksum;
pub mod handshake;
pub mod hash;
pub mod index;
pub mod mac1;
pub mod session;
pub mod wireguard;
pub mod xdp;
