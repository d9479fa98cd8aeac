//! The XDP program's userspace side: the object embedded at build time, loading it through the
//! kernel's verifier, filling its maps and reading its counters. Policy stays here; the program
//! (`ebpf/xdp`) only executes it.
//!
//! This is the first stage of the XDP fast path (issue 4): the program filters and counts in the
//! kernel, and is exercised through `BPF_PROG_TEST_RUN` (see [`XdpProgram::run`]); attaching it
//! to interfaces behind `wglb run --datapath xdp` comes with the in-kernel forwarding.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya::Ebpf;
use wglb_common::xdp::{ListenerKey, XdpCounter};

/// The compiled program, built from `ebpf/xdp` by `lb/build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wglb-xdp"));

/// The name of the program in the object (its function's name).
const PROGRAM: &str = "wglb";

/// What one run of the program did to a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The XDP action (`XDP_PASS` = 2, `XDP_DROP` = 1, ...).
    pub verdict: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// The loaded program and its maps.
pub struct XdpProgram {
    ebpf: Ebpf,
}

impl XdpProgram {
    /// Loads the program into the kernel (needs CAP_BPF or root); the verifier checks it here.
    pub fn load() -> anyhow::Result<XdpProgram> {
        let mut ebpf = Ebpf::load(OBJECT).context("loading the XDP object")?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .context("the object has no `wglb` program")?
            .try_into()?;
        program
            .load()
            .context("the kernel's verifier refused the XDP program")?;
        Ok(XdpProgram { ebpf })
    }

    fn listeners(&mut self) -> anyhow::Result<BpfHashMap<&mut MapData, ListenerKey, u32>> {
        let map = self
            .ebpf
            .map_mut("LISTENERS")
            .context("the object has no LISTENERS map")?;
        Ok(BpfHashMap::try_from(map)?)
    }

    /// Makes datagrams to `address` (a concrete local address, not a wildcard) the listener
    /// `index`'s.
    pub fn add_listener(&mut self, address: SocketAddr, index: u32) -> anyhow::Result<()> {
        self.listeners()?
            .insert(listener_key(address), index, 0)
            .with_context(|| format!("adding listener address {address}"))
    }

    /// Every counter, summed over CPUs, in [`XdpCounter::ALL`] order.
    pub fn counters(&self) -> anyhow::Result<Vec<(XdpCounter, u64)>> {
        let map = self
            .ebpf
            .map("COUNTERS")
            .context("the object has no COUNTERS map")?;
        let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        XdpCounter::ALL
            .iter()
            .map(|&counter| {
                let per_cpu = counters.get(&(counter as u32), 0)?;
                Ok((counter, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Runs the program once on `packet` (an Ethernet frame) with `BPF_PROG_TEST_RUN`, as the
    /// kernel would on receiving it, and returns what it decided and the packet it left.
    pub fn run(&self, packet: &[u8]) -> anyhow::Result<Outcome> {
        let program: &Xdp = self
            .ebpf
            .program(PROGRAM)
            .context("the object has no `wglb` program")?
            .try_into()?;
        // Room for a program that grows the packet (encapsulation) later.
        let mut out = vec![0u8; packet.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok(Outcome {
            verdict: result.return_value,
            packet: out,
        })
    }
}

/// The map key of a listener address: IPv4 as IPv4-mapped IPv6, the port in network order.
pub fn listener_key(address: SocketAddr) -> ListenerKey {
    let addr = match address.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    ListenerKey {
        addr: addr.octets(),
        port: address.port().to_be_bytes(),
        pad: [0; 2],
    }
}
