//! The XDP datapath at run time: `wglb run --datapath xdp`.
//!
//! The program handles what it can in the kernel; everything it passes (first packets to a gateway
//! whose MAC the kernel has not resolved yet, clients and gateways of different families, IP
//! options, fragments) reaches the userspace datapath, which keeps running behind it on the same
//! listener sockets. This module keeps the program's maps in step with the control plane:
//!
//! - each listener's plan becomes its gateways' entries (an index each, kept while the gateway
//!   keeps its id and address), its Maglev table (only changed slots are written) and its
//!   addresses (a wildcard listener answers on every local address of its family) (`plans`);
//! - every second it asks the kernel again how each gateway is reached (route and neighbour),
//!   reads the program's counters into the balancer's metrics (`counters`), and sweeps the session
//!   maps (`sweep`): sessions go as `crate::lifecycle` decides, peers are told, and the NAT map and
//!   the admission budgets are held to the sessions. A plan that takes a gateway's sessions away
//!   sweeps at once;
//! - it answers the API's session requests for the sessions the program holds, together with the
//!   userspace datapath's own (`answers`), and keeps peers' sessions as pins (`pins`).
//!
//! It runs on a thread of its own: map operations are system calls, and a sweep of a million
//! sessions takes seconds that must not stall the userspace datapath.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aya::programs::XdpMode as AttachMode;
use tokio::sync::{mpsc, oneshot, watch};
use wglb_common::admission::Refusal;
use wglb_common::xdp::{
    Endpoint, FlowKey, Gateway, GatewayTraffic, IndexEntry, IndexKey, ListenerInfo, NatKey,
    Session, XdpCounter, GATEWAY_KEEPS, GATEWAY_READY, MAX_GATEWAYS,
};

mod answers;
mod counters;
mod indices;
mod pins;
mod plans;
mod rehome;
mod sweep;

use super::program::{endpoint_of, maglev_entries, nat_key, Limits, Table, XdpProgram};
use super::route::Path;
use crate::agents::Agents;
use crate::config::{Config, DatapathConfig, XdpMode};
use crate::control::ListenerPlan;
use crate::events::EventBus;
use crate::host::local_addresses;
use crate::host::Netlink;
use crate::metrics::{Direction, DropReason, GatewayCounters, ListenerCounters, Metrics, NatDrift};
use crate::passive::{self, Board, Part, Waiting};
use crate::pool::{GatewayId, HashKey};
use crate::query::{self, SessionRequest};
use crate::rebinding::SessionIndex;
use crate::session::EvictionReason;
use crate::sync::{self, Resyncs, SyncOut};

/// How often routes, counters and idle sessions are looked at.
const TICK: Duration = Duration::from_secs(1);
/// ARPHRD_ETHER: the program parses Ethernet frames, so only Ethernet interfaces get it.
const ARPHRD_ETHER: u32 = 1;

/// What the fast path is connected to. Per listener, in configuration order.
pub struct FastPathLinks {
    pub plans: Vec<watch::Receiver<Arc<ListenerPlan>>>,
    /// The API's session requests, which the fast path answers.
    pub requests: Vec<mpsc::Receiver<SessionRequest>>,
    /// The userspace datapaths', asked for the sessions they hold.
    pub slow_paths: Vec<mpsc::Sender<SessionRequest>>,
    /// Where the program's sessions are announced to peer balancers.
    pub syncs: Vec<SyncOut>,
    /// The control plane's board for passive health.
    pub board: Board,
    /// The gateway agents, for re-homing the program's sessions of a gateway that went.
    pub agents: Agents,
}

/// The loaded, attached program and the state that keeps its maps in step.
pub struct FastPath {
    program: XdpProgram,
    netlink: Netlink,
    listeners: Vec<Listener>,
    gateways: HashMap<u32, GatewaySlot>,
    free: Vec<u32>,
    /// Indices of gateways gone from their plan: cleared in the map, given out again once a sweep
    /// has removed their sessions.
    retired: Vec<u32>,
    counters_seen: Vec<u64>,
    metrics: Metrics,
    events: EventBus,
    /// How long the last sweep took: sweeps are spaced to cost at most a tenth of a core.
    last_sweep: Duration,
    swept_at: Instant,
    /// Confirmed sessions told to peer balancers, and the gateway and receiver index they were
    /// told of: kept here, not in the program's map, so that marking one never writes a stale
    /// copy back.
    announced: HashMap<FlowKey, (u32, Option<u32>)>,
    /// Where the sweep posts handshakes left waiting, for passive health.
    board: Board,
    /// The gateway agents (`rehome`); none attach before `run`.
    agents: Agents,
    /// The ports the program gives sessions towards gateways ([datapath] nat_ports).
    nat_ports: std::ops::RangeInclusive<u16>,
}

struct Listener {
    name: String,
    listen: SocketAddr,
    source: Option<IpAddr>,
    plan: Arc<ListenerPlan>,
    maglev_offset: u32,
    maglev_room: u32,
    /// The Maglev entries loaded now.
    maglev: Vec<u32>,
    addresses: Vec<SocketAddr>,
    /// False while the program leaves this listener to userspace (see [`FastPath::unserve`]).
    served: bool,
    counters: ListenerCounters,
    sync: SyncOut,
    /// Peers' sessions pinned in the program, by client: the program places such a client on
    /// the pinned gateway, and drops the pin once the session exists.
    pins: HashMap<SocketAddr, Pin>,
    resyncs: Resyncs,
    /// When the listener's sessions with traffic were last announced again (coarse ns).
    refreshed_at_ns: u64,
    /// Unconfirmed sessions as last added to the listener's gauge.
    unconfirmed_counted: i64,
    /// The userspace datapath's mark of the last receiver index the program took from it.
    relayed_indices_mark: u64,
}

/// A peer's session, held as a pin in the program.
struct Pin {
    slot: u32,
    /// The peer whose session it is; `None`: this balancer's userspace datapath relayed it
    /// (`pins::relayed`).
    peer: Option<Arc<str>>,
    /// Its last packet on the peer (coarse ns): pins expire as sessions do.
    seen_ns: u64,
}

struct GatewaySlot {
    listener: usize,
    id: GatewayId,
    name: String,
    address: SocketAddr,
    keeps: bool,
    path: Option<Path>,
    next_hop_mac: Option<[u8; 6]>,
    /// The entry in the map now.
    written: Option<Gateway>,
    counters: GatewayCounters,
    traffic_seen: GatewayTraffic,
    /// Sessions counted at the last sweep (and added to the sessions gauge).
    sessions: i64,
}

impl GatewaySlot {
    fn entry(&self) -> Gateway {
        let ready = self.path.is_some() && self.next_hop_mac.is_some();
        let path = self.path.unwrap_or(Path {
            ifindex: 0,
            local_mac: [0; 6],
            next_hop: self.address.ip(),
            source: self.address.ip(),
        });
        Gateway {
            endpoint: endpoint_of(self.address),
            source: endpoint_of(SocketAddr::new(path.source, 0)).addr,
            next_hop_mac: self.next_hop_mac.unwrap_or([0; 6]),
            local_mac: path.local_mac,
            ifindex: path.ifindex,
            flags: if self.keeps { GATEWAY_KEEPS } else { 0 }
                | if ready { GATEWAY_READY } else { 0 },
        }
    }
}

impl FastPath {
    /// Loads the program with maps sized from `config`, loads the plans into them, and attaches
    /// it. Any failure (no CAP_BPF or CAP_NET_ADMIN, an old kernel, an interface that refuses)
    /// comes back as the reason the XDP datapath cannot run.
    pub fn start(
        config: &Config,
        plans: &[watch::Receiver<Arc<ListenerPlan>>],
        metrics: &Metrics,
        events: &EventBus,
    ) -> anyhow::Result<FastPath> {
        let datapath = &config.datapath;
        check_nat_ports(datapath)?;
        let sessions: usize = config.listeners.iter().map(|l| l.table_size.get()).sum();
        let probation: usize = config
            .listeners
            .iter()
            .map(|l| l.admission.probation_size.get())
            .sum();
        let maglev_slots: u32 = config.listeners.iter().map(|l| l.maglev_size).sum();
        let mut program = XdpProgram::load(Limits {
            sessions: u32::try_from(sessions).context("table sizes too large for the kernel")?,
            probation: u32::try_from(probation)
                .context("probation sizes too large for the kernel")?,
            maglev_slots,
        })?;
        let ports = datapath.nat_ports.clone();
        program.set_nat_ports(*ports.start(), ports.end() - ports.start() + 1)?;
        let nat_ports = ports.clone();
        let mut offset = 0;
        let mut listeners = Vec::new();
        for (listener, plans) in config.listeners.iter().zip(plans) {
            listeners.push(Listener {
                name: listener.name.clone(),
                listen: listener.listen,
                source: listener.source,
                plan: plans.borrow().clone(),
                maglev_offset: offset,
                maglev_room: listener.maglev_size,
                maglev: Vec::new(),
                addresses: Vec::new(),
                served: true,
                counters: metrics.listener(&listener.name),
                sync: SyncOut::none(&listener.name),
                pins: HashMap::new(),
                resyncs: Resyncs::default(),
                refreshed_at_ns: coarse_now_ns(),
                unconfirmed_counted: 0,
                relayed_indices_mark: 0,
            });
            offset += listener.maglev_size;
        }
        let mut fast = FastPath {
            program,
            netlink: Netlink::open().context("opening a route netlink socket")?,
            listeners,
            gateways: HashMap::new(),
            free: (0..MAX_GATEWAYS).rev().collect(),
            retired: Vec::new(),
            counters_seen: Vec::new(),
            metrics: metrics.clone(),
            events: events.clone(),
            last_sweep: Duration::ZERO,
            swept_at: Instant::now(),
            announced: HashMap::new(),
            board: Board::default(),
            agents: Agents::new(Vec::new(), metrics.clone()),
            nat_ports,
        };
        for index in 0..fast.listeners.len() {
            let plan = fast.listeners[index].plan.clone();
            fast.apply(index, plan)?;
        }
        fast.refresh_paths()?;
        fast.refresh_addresses(&local_addresses()?)?;
        fast.attach(datapath)?;
        metrics.set_datapath("xdp");
        Ok(fast)
    }

    fn attach(&mut self, datapath: &DatapathConfig) -> anyhow::Result<()> {
        let interfaces = if datapath.interfaces.is_empty() {
            ethernet_interfaces_up()?
        } else {
            datapath.interfaces.clone()
        };
        if interfaces.is_empty() {
            bail!("no Ethernet interface is up to attach to");
        }
        let mut attached = Vec::new();
        for interface in &interfaces {
            let mode = match datapath.xdp_mode {
                XdpMode::Native => self
                    .program
                    .attach(interface, AttachMode::Driver)
                    .map(|()| "native"),
                XdpMode::Generic => self
                    .program
                    .attach(interface, AttachMode::Skb)
                    .map(|()| "generic"),
                XdpMode::Auto => match self.program.attach(interface, AttachMode::Driver) {
                    Ok(()) => Ok("native"),
                    Err(e) => {
                        tracing::info!(%interface, "no native XDP ({e:#}); attaching in generic mode");
                        self.program
                            .attach(interface, AttachMode::Skb)
                            .map(|()| "generic")
                    }
                },
            }
            .with_context(|| format!("attaching the XDP program to {interface}"))?;
            tracing::info!(%interface, mode, "XDP program attached");
            attached.push((interface, mode));
        }
        // Only once every interface took it: a failure detaches them all.
        for (interface, mode) in attached {
            self.metrics.set_xdp_attached(interface, mode);
        }
        Ok(())
    }

    /// Runs until `shutdown` fires or its sender goes; the program is detached when the fast
    /// path is dropped at the end.
    pub fn run(mut self, links: FastPathLinks, mut shutdown: oneshot::Receiver<()>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!("the XDP fast path cannot start its runtime: {e}; its maps are no longer updated");
                return;
            }
        };
        for (listener, sync) in self.listeners.iter_mut().zip(links.syncs) {
            listener.sync = sync;
        }
        self.board = links.board;
        self.agents = links.agents;
        runtime.block_on(async move {
            // Many sources, one loop: small tasks forward each into one channel.
            let (changed_tx, mut changed) = mpsc::channel(64);
            for (index, mut plans) in links.plans.into_iter().enumerate() {
                let changed_tx = changed_tx.clone();
                tokio::spawn(async move {
                    while plans.changed().await.is_ok() {
                        let plan = plans.borrow_and_update().clone();
                        if changed_tx.send((index, plan)).await.is_err() {
                            return;
                        }
                    }
                });
            }
            let (requests_tx, mut requests) = mpsc::channel(16);
            for (index, mut receiver) in links.requests.into_iter().enumerate() {
                let requests_tx = requests_tx.clone();
                tokio::spawn(async move {
                    while let Some(request) = receiver.recv().await {
                        if requests_tx.send((index, request)).await.is_err() {
                            return;
                        }
                    }
                });
            }
            drop((changed_tx, requests_tx));
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut shutdown => {
                        // Sessions created since the last sweep reach the peers before the
                        // balancer's sync flushes.
                        if self.listeners.iter().any(|l| l.sync.enabled()) {
                            self.sweep();
                        }
                        break;
                    }
                    Some((index, plan)) = changed.recv() => {
                        if let Err(e) = self.apply(index, plan) {
                            self.unserve(index, &format!("{e:#}"));
                        }
                    }
                    Some((index, request)) = requests.recv() => {
                        self.answer(index, request, &links.slow_paths[index]).await;
                    }
                    _ = tick.tick() => {
                        // Before the addresses are looked at: a session relayed until the
                        // program serves its address comes with its index, and on its gateway.
                        self.adopt_relayed_indices(&links.slow_paths).await;
                        match local_addresses() {
                            Ok(local) => {
                                self.pin_relayed_sessions(&links.slow_paths, &local).await;
                                self.tick(Some(&local));
                            }
                            Err(e) => {
                                tracing::warn!("cannot read the local addresses: {e:#}");
                                self.tick(None);
                            }
                        }
                    }
                }
            }
        });
    }

    /// A look at the world once a second; the listeners' addresses only if the local ones
    /// could be read.
    fn tick(&mut self, local: Option<&[IpAddr]>) {
        if let Err(e) = self.refresh_paths() {
            tracing::warn!("cannot refresh the routes to gateways: {e:#}");
        }
        if let Some(local) = local {
            if let Err(e) = self.refresh_addresses(local) {
                tracing::warn!("cannot refresh the listeners' addresses: {e:#}");
            }
        }
        if let Err(e) = self.read_counters() {
            tracing::warn!("cannot read the XDP program's counters: {e:#}");
        }
        if self.swept_at.elapsed() >= (self.last_sweep * 10).max(TICK) {
            self.sweep();
        }
    }
}

fn listener_info(index: usize, listener: &Listener) -> ListenerInfo {
    ListenerInfo {
        index: index as u32,
        maglev_offset: listener.maglev_offset,
        maglev_size: listener.maglev.len() as u32,
        hash_port: (listener.plan.placement.hash_key() == HashKey::SourceIpPort) as u8,
        pad: [0; 3],
        admission: listener.plan.admission.limits(),
    }
}

/// An endpoint of the program's maps as an address: IPv4-mapped IPv6 back to IPv4.
/// Listener `index`'s session key of `client`.
/// `session`'s receiver index (`indexed` holds what INDICES has for it), as peers are told of
/// it: while it still routes the session.
fn session_index(
    key: &FlowKey,
    session: &Session,
    indexed: Option<&IndexEntry>,
    now_ns: u64,
) -> Option<SessionIndex> {
    let entry = indexed.filter(|_| session.indexed != 0)?;
    SessionIndex::of(session.index, entry.client == *key, entry.held(), now_ns)
}

fn flow_key(index: usize, client: SocketAddr) -> FlowKey {
    FlowKey {
        listener: index as u32,
        client: endpoint_of(client),
    }
}

fn address_of(endpoint: Endpoint) -> SocketAddr {
    let ip = std::net::Ipv6Addr::from(endpoint.addr);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    SocketAddr::new(ip, u16::from_be_bytes(endpoint.port))
}

/// CLOCK_MONOTONIC_COARSE, the clock of the program's `bpf_ktime_get_coarse_ns`.
fn coarse_now_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
}

/// The program's `bpf_ktime_get_ns` clock, which times handshakes.
fn monotonic_now_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_MONOTONIC)
}

fn clock_ns(clock: nix::time::ClockId) -> u64 {
    nix::time::clock_gettime(clock)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// NAT ports must not be the kernel's ephemeral ports: replies to a socket of the userspace
/// datapath on the same port would be taken for the program's.
fn check_nat_ports(datapath: &DatapathConfig) -> anyhow::Result<()> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .context("reading net.ipv4.ip_local_port_range")?;
    let mut bounds = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(low)), Some(Ok(high))) = (bounds.next(), bounds.next()) else {
        bail!(
            "cannot parse net.ipv4.ip_local_port_range `{}`",
            text.trim()
        );
    };
    let ports = &datapath.nat_ports;
    if *ports.start() <= high && low <= *ports.end() {
        bail!(
            "[datapath] nat_ports {}-{} overlap net.ipv4.ip_local_port_range {low}-{high}: choose ports outside it",
            ports.start(),
            ports.end()
        );
    }
    Ok(())
}

/// Interfaces that are up and speak Ethernet.
fn ethernet_interfaces_up() -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir("/sys/class/net").context("listing /sys/class/net")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let read = |file: &str| std::fs::read_to_string(format!("/sys/class/net/{name}/{file}"));
        let kind = read("type").ok().and_then(|t| t.trim().parse::<u32>().ok());
        let flags = read("flags")
            .ok()
            .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok());
        // IFF_UP
        if kind == Some(ARPHRD_ETHER) && flags.is_some_and(|f| f & 1 != 0) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Every address of this host but loopback ones, in a stable order.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_read_back_as_addresses() {
        for address in ["10.0.0.1:51820", "[fd00::1]:443", "[::ffff:10.0.0.1]:1"] {
            let address: SocketAddr = address.parse().unwrap();
            let expected = match address.ip() {
                IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .map_or(address, |v4| SocketAddr::new(v4.into(), address.port())),
                IpAddr::V4(_) => address,
            };
            assert_eq!(address_of(endpoint_of(address)), expected);
        }
    }
}
