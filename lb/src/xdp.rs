//! The XDP program's userspace side: the object embedded at build time, loading it through the
//! kernel's verifier with maps sized from the configuration, filling the maps the program
//! decides by (listeners, gateways, Maglev tables, NAT ports) and reading back its sessions and
//! counters. Policy stays here; the program (`ebpf/xdp`) only executes it.
//!
//! This is the XDP fast path's kernel half and its map interface (issue 4), exercised through
//! `BPF_PROG_TEST_RUN` ([`XdpProgram::run`]); attaching it to interfaces and keeping the maps in
//! step with the control plane behind `wglb run --datapath xdp` is the part still to come.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::{TestRun, TestRunOptions, TestRunResult, Xdp};
use aya::{Ebpf, EbpfLoader};
use wglb_common::xdp::{
    Endpoint, FlowKey, Gateway, ListenerInfo, Session, XdpCounter, CONFIG_NAT_FIRST_PORT,
    CONFIG_NAT_PORTS,
};

use crate::pool::{GatewayView, HashKey, Placement};

/// The compiled program, built from `ebpf/xdp` by `lb/build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wglb-xdp"));

/// The name of the program in the object (its function's name).
const PROGRAM: &str = "wglb";

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// What one run of the program did to a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The XDP action ([`XDP_PASS`], [`XDP_DROP`], [`XDP_TX`], [`XDP_REDIRECT`]).
    pub verdict: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
}

/// Map sizes fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sessions (and NAT entries) the kernel keeps, least recently used first out.
    pub sessions: u32,
    /// Maglev slots of all listeners together.
    pub maglev_slots: u32,
}

/// The loaded program and its maps.
pub struct XdpProgram {
    ebpf: Ebpf,
}

impl XdpProgram {
    /// Loads the program into the kernel (needs CAP_BPF or root); the verifier checks it here.
    pub fn load(limits: Limits) -> anyhow::Result<XdpProgram> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("SESSIONS", limits.sessions)
            .map_max_entries("NAT", limits.sessions)
            .map_max_entries("MAGLEV", limits.maglev_slots)
            .load(OBJECT)
            .context("loading the XDP object")?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .context("the object has no `wglb` program")?
            .try_into()?;
        program
            .load()
            .context("the kernel's verifier refused the XDP program")?;
        Ok(XdpProgram { ebpf })
    }

    fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("the object has no {name} map"))
    }

    /// The source ports new sessions leave from towards gateways: `count` ports from `first`.
    /// They must be kept away from the kernel's own (net.ipv4.ip_local_reserved_ports), since
    /// replies to them never reach a socket.
    pub fn set_nat_ports(&mut self, first: u16, count: u16) -> anyhow::Result<()> {
        let mut config: Array<&mut MapData, u32> = Array::try_from(self.map_mut("CONFIG")?)?;
        config.set(CONFIG_NAT_FIRST_PORT, first as u32, 0)?;
        config.set(CONFIG_NAT_PORTS, count as u32, 0)?;
        Ok(())
    }

    /// Sets gateway `index`, and recognises replies from its address.
    pub fn set_gateway(&mut self, index: u32, gateway: Gateway) -> anyhow::Result<()> {
        let mut gateways: Array<&mut MapData, Gateway> =
            Array::try_from(self.map_mut("GATEWAYS")?)?;
        gateways.set(index, gateway, 0)?;
        let mut by_address: BpfHashMap<&mut MapData, Endpoint, u32> =
            BpfHashMap::try_from(self.map_mut("GATEWAY_INDEX")?)?;
        by_address.insert(gateway.endpoint, index, 0)?;
        Ok(())
    }

    /// Loads listener `index`'s placement: its Maglev table at `offset` in the MAGLEV array, and
    /// its addresses (concrete local ones). A placement with no gateway for new sessions loads
    /// as an empty table, which makes the program drop new clients, counted.
    pub fn set_placement(
        &mut self,
        index: u32,
        addresses: &[SocketAddr],
        offset: u32,
        placement: &Placement,
        gateway_index: impl Fn(&GatewayView) -> u32,
    ) -> anyhow::Result<()> {
        // Gateway index + 1 per slot: 0 would read as "no gateway".
        let entries: Vec<u32> = placement.slots().map(|g| gateway_index(g) + 1).collect();
        let mut maglev: Array<&mut MapData, u32> = Array::try_from(self.map_mut("MAGLEV")?)?;
        for (slot, entry) in entries.iter().enumerate() {
            maglev.set(offset + slot as u32, entry, 0)?;
        }
        let info = ListenerInfo {
            index,
            maglev_offset: offset,
            maglev_size: entries.len() as u32,
            hash_port: (placement.hash_key() == HashKey::SourceIpPort) as u8,
            pad: [0; 3],
        };
        let mut listeners: BpfHashMap<&mut MapData, Endpoint, ListenerInfo> =
            BpfHashMap::try_from(self.map_mut("LISTENERS")?)?;
        for &address in addresses {
            listeners
                .insert(endpoint_of(address), info, 0)
                .with_context(|| format!("adding listener address {address}"))?;
        }
        Ok(())
    }

    /// The sessions the kernel holds.
    pub fn sessions(&self) -> anyhow::Result<Vec<(FlowKey, Session)>> {
        let map = self.ebpf.map("SESSIONS").context("no SESSIONS map")?;
        let sessions: BpfHashMap<&MapData, FlowKey, Session> = BpfHashMap::try_from(map)?;
        Ok(sessions.iter().collect::<Result<_, _>>()?)
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
    /// kernel would on receiving it on the loopback interface, and returns what it decided and
    /// the packet it left.
    pub fn run(&self, packet: &[u8]) -> anyhow::Result<Outcome> {
        let (result, mut out) = self.test_run(packet, 1)?;
        out.truncate(result.data_size_out as usize);
        Ok(Outcome {
            verdict: result.return_value,
            packet: out,
        })
    }

    /// The kernel's mean time per run of the program on `packet` over `repeat` runs
    /// (BPF_PROG_TEST_RUN's own clock, which excludes the system call).
    pub fn time(&self, packet: &[u8], repeat: u32) -> anyhow::Result<std::time::Duration> {
        Ok(self.test_run(packet, repeat)?.0.duration)
    }

    fn test_run(&self, packet: &[u8], repeat: u32) -> anyhow::Result<(TestRunResult, Vec<u8>)> {
        let program: &Xdp = self
            .ebpf
            .program(PROGRAM)
            .context("the object has no `wglb` program")?
            .try_into()?;
        let mut out = vec![0u8; packet.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        Ok((result, out))
    }
}

/// An address as the program's maps hold it: IPv4 as IPv4-mapped IPv6, the port in network order.
pub fn endpoint_of(address: SocketAddr) -> Endpoint {
    let addr = match address.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    Endpoint {
        addr: addr.octets(),
        port: address.port().to_be_bytes(),
        pad: [0; 2],
    }
}
