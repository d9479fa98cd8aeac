//! The program's handle: the object embedded at build time, loaded through the kernel's verifier
//! with maps sized from the configuration, attached to interfaces, and the typed map operations
//! the fast path (`super::fastpath`) and the fixture tests use.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::{ProgramError, TestRun, TestRunOptions, TestRunResult, Xdp, XdpMode};
use aya::util::nr_cpus;
use aya::{Ebpf, EbpfLoader};
use wglb_common::admission::{AdmissionLimits, SourceBudget};
use wglb_common::mac1::Mac1Key;
use wglb_common::xdp::{
    counter_slot, Endpoint, FlowKey, Gateway, GatewayTraffic, IndexEntry, IndexKey, ListenerInfo,
    NatKey, Session, XdpCounter, CONFIG_NAT_FIRST_PORT, CONFIG_NAT_PORTS,
};

use crate::lifecycle::Standing;
use crate::pool::{GatewayView, HashKey, Placement};

/// The compiled program, built from `ebpf/xdp` by `lb/build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wglb-xdp"));
/// The floor program built beside it: parse, rewrite, transmit and nothing more, which the cost
/// benchmark (`benches/xdp_cost.rs`) sets the program's per-packet cost against.
pub static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-floor"));

/// The name of the program in the object (its function's name).
const PROGRAM: &str = "wglb";
/// How many times a load the verifier gave up on (EAGAIN) is tried, as libbpf does.
const LOAD_ATTEMPTS: u32 = 5;

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
    /// Confirmed sessions the kernel keeps, least recently used first out.
    pub sessions: u32,
    /// Unconfirmed sessions the kernel keeps, least recently used first out.
    pub probation: u32,
    /// Maglev slots of all listeners together.
    pub maglev_slots: u32,
}

impl Limits {
    /// NAT entries: one per session of either kind, and as many again for entries whose session
    /// an LRU map pushed out, until a new session takes them over or the sweep removes them.
    fn nat_entries(&self) -> u32 {
        self.sessions
            .saturating_add(self.probation)
            .saturating_mul(2)
    }
}

/// Which of the program's session maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// SESSIONS: confirmed sessions.
    Confirmed,
    /// PROBATION: sessions whose gateway has not answered yet.
    Unconfirmed,
}

impl Table {
    pub fn standing(self) -> Standing {
        match self {
            Table::Confirmed => Standing::Confirmed,
            Table::Unconfirmed => Standing::Unconfirmed,
        }
    }

    fn map(self) -> &'static str {
        match self {
            Table::Confirmed => "SESSIONS",
            Table::Unconfirmed => "PROBATION",
        }
    }
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
            .map_max_entries("PROBATION", limits.probation)
            .map_max_entries("NAT", limits.nat_entries())
            .map_max_entries("PINS", limits.sessions)
            .map_max_entries("INDICES", limits.sessions)
            .map_max_entries("MAGLEV", limits.maglev_slots)
            .load(OBJECT)
            .context("loading the XDP object")?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .context("the object has no `wglb` program")?
            .try_into()?;
        // The verifier gives up with EAGAIN when the loading thread has a signal pending, after
        // doing all its work: libbpf loads again, a few times, and so does this.
        let mut attempts = 1;
        loop {
            match program.load() {
                Ok(()) => break,
                Err(ProgramError::LoadError { io_error, .. })
                    if io_error.raw_os_error() == Some(nix::errno::Errno::EAGAIN as i32)
                        && attempts < LOAD_ATTEMPTS =>
                {
                    attempts += 1;
                }
                Err(e) => return Err(e).context("the kernel's verifier refused the XDP program"),
            }
        }
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

    /// Stops recognising replies from gateway `index` and marks it as keeping no sessions (the
    /// program evicts them on their next packet, the fast path at its next sweep).
    pub fn clear_gateway(&mut self, index: u32, endpoint: Endpoint) -> anyhow::Result<()> {
        let mut gateways: Array<&mut MapData, Gateway> =
            Array::try_from(self.map_mut("GATEWAYS")?)?;
        let mut gateway = gateways.get(&index, 0)?;
        gateway.flags = 0;
        gateways.set(index, gateway, 0)?;
        let mut by_address: BpfHashMap<&mut MapData, Endpoint, u32> =
            BpfHashMap::try_from(self.map_mut("GATEWAY_INDEX")?)?;
        // Another index may have taken the address over since.
        if by_address.get(&endpoint, 0).ok() == Some(index) {
            by_address.remove(&endpoint)?;
        }
        Ok(())
    }

    /// Loads listener `index`'s placement: its Maglev table at `offset` in the MAGLEV array (at
    /// most `room` slots), and the addresses it answers on (concrete local ones). A placement
    /// with no gateway for new sessions loads as an empty table, which makes the program drop
    /// new clients, counted. Addresses in `gone` stop being the listener's.
    #[allow(clippy::too_many_arguments)]
    pub fn set_placement(
        &mut self,
        index: u32,
        addresses: &[SocketAddr],
        gone: &[SocketAddr],
        offset: u32,
        room: u32,
        placement: &Placement,
        admission: AdmissionLimits,
        gateway_index: impl Fn(&GatewayView) -> u32,
    ) -> anyhow::Result<()> {
        let entries = maglev_entries(placement, gateway_index);
        anyhow::ensure!(
            entries.len() as u32 <= room,
            "listener {index}: {} Maglev slots do not fit the {room} loaded",
            entries.len()
        );
        self.set_maglev_slots(offset, entries.iter().copied().enumerate())?;
        let info = ListenerInfo {
            index,
            maglev_offset: offset,
            maglev_size: entries.len() as u32,
            hash_port: (placement.hash_key() == HashKey::SourceIpPort) as u8,
            pad: [0; 3],
            admission,
        };
        self.set_listener(addresses, gone, info)
    }

    /// Writes Maglev slots (slot number within the table at `offset`, entry).
    pub fn set_maglev_slots(
        &mut self,
        offset: u32,
        slots: impl Iterator<Item = (usize, u32)>,
    ) -> anyhow::Result<()> {
        let mut maglev: Array<&mut MapData, u32> = Array::try_from(self.map_mut("MAGLEV")?)?;
        for (slot, entry) in slots {
            maglev.set(offset + slot as u32, entry, 0)?;
        }
        Ok(())
    }

    /// Listener `index`'s mac1 check (`Mac1Key::default()`: none).
    pub fn set_mac1(&mut self, index: u32, key: Mac1Key) -> anyhow::Result<()> {
        let mut keys: Array<&mut MapData, Mac1Key> = Array::try_from(self.map_mut("MAC1")?)?;
        keys.set(index, key, 0)?;
        Ok(())
    }

    /// Makes `addresses` the listener's (described by `info`), and `gone` no longer.
    pub fn set_listener(
        &mut self,
        addresses: &[SocketAddr],
        gone: &[SocketAddr],
        info: ListenerInfo,
    ) -> anyhow::Result<()> {
        let mut listeners: BpfHashMap<&mut MapData, Endpoint, ListenerInfo> =
            BpfHashMap::try_from(self.map_mut("LISTENERS")?)?;
        for &address in gone {
            let _ = listeners.remove(&endpoint_of(address));
        }
        for &address in addresses {
            listeners
                .insert(endpoint_of(address), info, 0)
                .with_context(|| format!("adding listener address {address}"))?;
        }
        Ok(())
    }

    /// The sessions the kernel holds in one of its tables.
    pub fn sessions(&self, table: Table) -> anyhow::Result<Vec<(FlowKey, Session)>> {
        let map = self.ebpf.map(table.map()).context("no session map")?;
        let sessions: BpfHashMap<&MapData, FlowKey, Session> = BpfHashMap::try_from(map)?;
        Ok(sessions.iter().collect::<Result<_, _>>()?)
    }

    /// The session of `key`, if the kernel holds one, and in which table.
    pub fn session(&self, key: &FlowKey) -> Option<(Table, Session)> {
        [Table::Confirmed, Table::Unconfirmed]
            .into_iter()
            .find_map(|table| {
                let map = self.ebpf.map(table.map())?;
                let sessions: BpfHashMap<&MapData, FlowKey, Session> =
                    BpfHashMap::try_from(map).ok()?;
                sessions.get(key, 0).ok().map(|session| (table, session))
            })
    }

    /// Forgets a session, and its NAT port if the port is still the session's own.
    pub fn remove_session(
        &mut self,
        table: Table,
        key: &FlowKey,
        session: &Session,
    ) -> anyhow::Result<()> {
        // The NAT entry first: while the session exists, the program takes its port from nobody.
        self.remove_nat_of(&nat_key(session), key)?;
        let mut sessions: BpfHashMap<&mut MapData, FlowKey, Session> =
            BpfHashMap::try_from(self.map_mut(table.map())?)?;
        // Gone already (the LRU or the program evicted it): nothing to do.
        let _ = sessions.remove(key);
        Ok(())
    }

    /// Writes a session (a new one, or one moved to another gateway) into `table`.
    pub fn set_session(
        &mut self,
        table: Table,
        key: &FlowKey,
        session: &Session,
    ) -> anyhow::Result<()> {
        let mut sessions: BpfHashMap<&mut MapData, FlowKey, Session> =
            BpfHashMap::try_from(self.map_mut(table.map())?)?;
        sessions.insert(key, session, 0)?;
        Ok(())
    }

    /// Every NAT entry: a gateway's port and the session it belongs to.
    pub fn nat_entries(&self) -> anyhow::Result<Vec<(NatKey, FlowKey)>> {
        let map = self.ebpf.map("NAT").context("no NAT map")?;
        let nat: BpfHashMap<&MapData, NatKey, FlowKey> = BpfHashMap::try_from(map)?;
        Ok(nat.iter().collect::<Result<_, _>>()?)
    }

    /// The session a NAT port belongs to now.
    pub fn nat_owner(&self, nat: &NatKey) -> Option<FlowKey> {
        let map = self.ebpf.map("NAT")?;
        let entries: BpfHashMap<&MapData, NatKey, FlowKey> = BpfHashMap::try_from(map).ok()?;
        entries.get(nat, 0).ok()
    }

    /// Removes a NAT entry if it (still) belongs to `owner`; true if it did.
    pub fn remove_nat_of(&mut self, nat: &NatKey, owner: &FlowKey) -> anyhow::Result<bool> {
        if self.nat_owner(nat) != Some(*owner) {
            return Ok(false);
        }
        let mut entries: BpfHashMap<&mut MapData, NatKey, FlowKey> =
            BpfHashMap::try_from(self.map_mut("NAT")?)?;
        Ok(entries.remove(nat).is_ok())
    }

    /// Gives `owner` its NAT entry back if nobody holds the port; true if it did.
    pub fn restore_nat(&mut self, nat: &NatKey, owner: &FlowKey) -> anyhow::Result<bool> {
        let mut entries: BpfHashMap<&mut MapData, NatKey, FlowKey> =
            BpfHashMap::try_from(self.map_mut("NAT")?)?;
        // BPF_NOEXIST: a port someone else took is not taken back.
        Ok(entries.insert(nat, owner, 1).is_ok())
    }

    /// The admission budgets of the client addresses the program has seen lately.
    pub fn sources(&self) -> anyhow::Result<Vec<(FlowKey, SourceBudget)>> {
        let map = self.ebpf.map("SOURCES").context("no SOURCES map")?;
        let sources: BpfHashMap<&MapData, FlowKey, SourceBudget> = BpfHashMap::try_from(map)?;
        Ok(sources.iter().collect::<Result<_, _>>()?)
    }

    /// Sets how many unconfirmed sessions a source has, keeping its tokens as the program left
    /// them. Only if the budget still exists.
    pub fn set_unconfirmed(&mut self, source: &FlowKey, unconfirmed: u32) -> anyhow::Result<()> {
        let mut sources: BpfHashMap<&mut MapData, FlowKey, SourceBudget> =
            BpfHashMap::try_from(self.map_mut("SOURCES")?)?;
        let Ok(mut budget) = sources.get(source, 0) else {
            return Ok(());
        };
        budget.unconfirmed = unconfirmed;
        // BPF_EXIST: a budget the LRU dropped meanwhile stays dropped.
        let _ = sources.insert(source, budget, 2);
        Ok(())
    }

    /// Every learned receiver index of listener `listener`.
    pub fn indices(&self, listener: u32) -> anyhow::Result<HashMap<u32, IndexEntry>> {
        let map = self.ebpf.map("INDICES").context("no INDICES map")?;
        let indices: BpfHashMap<&MapData, IndexKey, IndexEntry> = BpfHashMap::try_from(map)?;
        let mut of_listener = HashMap::new();
        for entry in indices.iter() {
            let (key, entry) = entry?;
            if key.listener == listener {
                of_listener.insert(key.index, entry);
            }
        }
        Ok(of_listener)
    }

    /// What is held for one receiver index.
    pub fn index(&self, key: &IndexKey) -> Option<IndexEntry> {
        let map = self.ebpf.map("INDICES")?;
        let indices: BpfHashMap<&MapData, IndexKey, IndexEntry> = BpfHashMap::try_from(map).ok()?;
        indices.get(key, 0).ok()
    }

    pub fn set_index(&mut self, key: &IndexKey, entry: &IndexEntry) -> anyhow::Result<()> {
        let mut indices: BpfHashMap<&mut MapData, IndexKey, IndexEntry> =
            BpfHashMap::try_from(self.map_mut("INDICES")?)?;
        indices.insert(key, entry, 0)?;
        Ok(())
    }

    /// Places `key`'s next new session on gateway `index` (a peer balancer's session).
    pub fn pin(&mut self, key: &FlowKey, index: u32) -> anyhow::Result<()> {
        let mut pins: BpfHashMap<&mut MapData, FlowKey, u32> =
            BpfHashMap::try_from(self.map_mut("PINS")?)?;
        pins.insert(key, index, 0)?;
        Ok(())
    }

    pub fn unpin(&mut self, key: &FlowKey) -> anyhow::Result<()> {
        let mut pins: BpfHashMap<&mut MapData, FlowKey, u32> =
            BpfHashMap::try_from(self.map_mut("PINS")?)?;
        // Used by the program already: nothing to do.
        let _ = pins.remove(key);
        Ok(())
    }

    /// The counters of the given listeners (and of packets of no listener), summed over CPUs.
    pub fn counters(&self, listeners: u32) -> anyhow::Result<Counters> {
        let map = self
            .ebpf
            .map("COUNTERS")
            .context("the object has no COUNTERS map")?;
        let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let slots = counter_slot(Some(listeners), false, XdpCounter::ALL[0]);
        let values = (0..slots)
            .map(|slot| Ok(counters.get(&slot, 0)?.iter().sum()))
            .collect::<anyhow::Result<_>>()?;
        Ok(Counters { values })
    }

    /// What the program forwarded for gateway `index`, summed over CPUs.
    pub fn traffic(&self, index: u32) -> anyhow::Result<GatewayTraffic> {
        let map = self.ebpf.map("TRAFFIC").context("no TRAFFIC map")?;
        let traffic: PerCpuArray<&MapData, GatewayTraffic> = PerCpuArray::try_from(map)?;
        Ok(traffic
            .get(&index, 0)?
            .iter()
            .fold(GatewayTraffic::default(), |sum, cpu| GatewayTraffic {
                packets_to_gateway: sum.packets_to_gateway + cpu.packets_to_gateway,
                bytes_to_gateway: sum.bytes_to_gateway + cpu.bytes_to_gateway,
                packets_to_client: sum.packets_to_client + cpu.packets_to_client,
                bytes_to_client: sum.bytes_to_client + cpu.bytes_to_client,
                initiations: sum.initiations + cpu.initiations,
                responses: sum.responses + cpu.responses,
                cookies: sum.cookies + cpu.cookies,
                sessions_created: sum.sessions_created + cpu.sessions_created,
                rtt_buckets: std::array::from_fn(|i| sum.rtt_buckets[i] + cpu.rtt_buckets[i]),
                unreachable: sum.unreachable + cpu.unreachable,
            }))
    }

    /// Zeroes gateway `index`'s traffic, before the index is given to another gateway.
    pub fn reset_traffic(&mut self, index: u32) -> anyhow::Result<()> {
        let cpus = nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let mut traffic: PerCpuArray<&mut MapData, GatewayTraffic> =
            PerCpuArray::try_from(self.map_mut("TRAFFIC")?)?;
        let zeros = PerCpuValues::try_from(vec![GatewayTraffic::default(); cpus])?;
        traffic.set(index, zeros, 0)?;
        Ok(())
    }

    /// Attaches the program to an interface. The link lives as long as this handle: dropping it,
    /// or the process dying, detaches the program (a BPF link, not a netlink attachment, on any
    /// kernel since 5.9).
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> anyhow::Result<()> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .context("the object has no `wglb` program")?
            .try_into()?;
        program.attach(interface, mode)?;
        Ok(())
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

/// A placement's Maglev table as the program reads it: gateway index + 1 per slot (0 would read
/// as "no gateway"); empty when no gateway takes new sessions.
pub fn maglev_entries(
    placement: &Placement,
    gateway_index: impl Fn(&GatewayView) -> u32,
) -> Vec<u32> {
    placement.slots().map(|g| gateway_index(g) + 1).collect()
}

/// The program's counters of some listeners, summed over CPUs.
pub struct Counters {
    values: Vec<u64>,
}

impl Counters {
    /// `counter` for packets of `listener` (`None`: of no listener) from its clients or gateways.
    pub fn get(&self, listener: Option<u32>, from_gateway: bool, counter: XdpCounter) -> u64 {
        let slot = counter_slot(listener, from_gateway, counter) as usize;
        self.values.get(slot).copied().unwrap_or(0)
    }

    /// Every slot's value, in `counter_slot` order.
    pub fn slots(&self) -> &[u64] {
        &self.values
    }

    /// `counter` over every row read.
    pub fn total(&self, counter: XdpCounter) -> u64 {
        self.values
            .iter()
            .skip(counter as usize)
            .step_by(XdpCounter::COUNT as usize)
            .sum()
    }
}

/// The NAT entry a session owns.
pub fn nat_key(session: &Session) -> NatKey {
    NatKey {
        gateway: session.gateway,
        nat_port: session.nat_port,
        pad: [0; 2],
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
