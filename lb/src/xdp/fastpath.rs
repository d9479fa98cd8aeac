//! The XDP datapath at run time: `wglb run --datapath xdp`.
//!
//! The program handles what it can in the kernel; everything it passes (first packets to a gateway
//! whose MAC the kernel has not resolved yet, clients and gateways of different families, IP
//! options, fragments) reaches the userspace datapath, which keeps running behind it on the same
//! listener sockets. This module keeps the program's maps in step with the control plane:
//!
//! - each listener's plan becomes its gateways' entries (an index each, kept while the gateway
//!   keeps its id and address), its Maglev table (only changed slots are written) and its
//!   addresses (a wildcard listener answers on every local address of its family);
//! - every second it asks the kernel again how each gateway is reached (route and neighbour), reads
//!   the program's counters into the balancer's metrics, and sweeps the session table: sessions
//!   idle past the listener's timeout, and sessions of gateways that no longer keep theirs, go.
//!   A plan that takes a gateway's sessions away sweeps at once;
//! - it answers the API's session requests for the sessions the program holds, together with the
//!   userspace datapath's own.
//!
//! It runs on a thread of its own: map operations are system calls, and a sweep of a million
//! sessions takes seconds that must not stall the userspace datapath.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aya::programs::XdpMode as AttachMode;
use tokio::sync::{mpsc, oneshot, watch};
use wglb_common::admission::Refusal;
use wglb_common::xdp::{
    Endpoint, FlowKey, Gateway, GatewayTraffic, ListenerInfo, NatKey, Session, XdpCounter,
    GATEWAY_KEEPS, GATEWAY_READY, MAX_GATEWAYS,
};

use super::program::{endpoint_of, maglev_entries, nat_key, Limits, Table, XdpProgram};
use super::route::{Netlink, Path};
use crate::config::{Config, DatapathConfig, XdpMode};
use crate::control::ListenerPlan;
use crate::events::{EventBus, EventKind};
use crate::metrics::{Direction, DropReason, GatewayCounters, ListenerCounters, Metrics, NatDrift};
use crate::pool::{GatewayId, HashKey};
use crate::query::{self, SessionFilter, SessionInfo, SessionPage, SessionRequest};
use crate::session::{probation_idle, EvictionReason};
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
    /// Confirmed sessions told to peer balancers, and the gateway they were told of: kept here,
    /// not in the program's map, so that marking one never writes a stale copy back.
    announced: HashMap<FlowKey, u32>,
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
}

/// A peer's session, held as a pin in the program.
struct Pin {
    slot: u32,
    peer: Arc<str>,
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
        };
        for index in 0..fast.listeners.len() {
            let plan = fast.listeners[index].plan.clone();
            fast.apply(index, plan)?;
        }
        fast.refresh_paths()?;
        fast.refresh_addresses()?;
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
                    _ = tick.tick() => self.tick(),
                }
            }
        });
    }

    fn tick(&mut self) {
        if let Err(e) = self.refresh_paths() {
            tracing::warn!("cannot refresh the routes to gateways: {e:#}");
        }
        if let Err(e) = self.refresh_addresses() {
            tracing::warn!("cannot refresh the listeners' addresses: {e:#}");
        }
        if let Err(e) = self.read_counters() {
            tracing::warn!("cannot read the XDP program's counters: {e:#}");
        }
        if self.swept_at.elapsed() >= (self.last_sweep * 10).max(TICK) {
            self.sweep();
        }
    }

    /// Loads a listener's plan: its gateways' entries, then its Maglev table.
    fn apply(&mut self, index: usize, plan: Arc<ListenerPlan>) -> anyhow::Result<()> {
        self.listeners[index].plan = plan.clone();
        if !self.listeners[index].served {
            return Ok(());
        }
        let placement = &plan.placement;
        let mut current = HashMap::new();
        let mut lost_sessions = false;
        for gateway in placement.gateways() {
            // Retired slots are on their way out, whatever they held.
            let live = |slot_index: &u32| !self.retired.contains(slot_index);
            let slot = self.gateways.iter().find(|(slot_index, s)| {
                live(slot_index)
                    && s.listener == index
                    && s.id == gateway.id
                    && s.address == gateway.address
            });
            let slot_index = match slot {
                Some((&slot_index, _)) => slot_index,
                None => {
                    // Within a listener addresses are unique (the configuration sees to it); a
                    // slot of its own with this address belongs to a gateway that moved away.
                    if let Some(other) = self.gateways.iter().find_map(|(slot_index, s)| {
                        (live(slot_index) && s.listener != index && s.address == gateway.address)
                            .then_some(s)
                    }) {
                        bail!(
                            "gateway `{}` has the address {} of gateway `{}` of listener `{}`: the program tells gateways apart by address",
                            gateway.name,
                            gateway.address,
                            other.name,
                            self.listeners[other.listener].name
                        );
                    }
                    let slot_index = self
                        .free
                        .pop()
                        .with_context(|| format!("more than {MAX_GATEWAYS} gateways"))?;
                    self.gateways.insert(
                        slot_index,
                        GatewaySlot {
                            listener: index,
                            id: gateway.id,
                            name: gateway.name.clone(),
                            address: gateway.address,
                            keeps: false,
                            path: None,
                            next_hop_mac: None,
                            written: None,
                            counters: self
                                .metrics
                                .gateway(&self.listeners[index].name, &gateway.name),
                            traffic_seen: GatewayTraffic::default(),
                            sessions: 0,
                        },
                    );
                    self.refresh_path(slot_index, &HashMap::new());
                    slot_index
                }
            };
            let slot = self.gateways.get_mut(&slot_index).expect("just found");
            let keeps = placement.keeps(gateway.id, gateway.address);
            lost_sessions |= slot.keeps && !keeps;
            slot.keeps = keeps;
            slot.name = gateway.name.clone();
            current.insert(gateway.id, slot_index);
        }
        let gone: Vec<u32> = self
            .gateways
            .iter()
            .filter(|(slot_index, s)| {
                s.listener == index
                    && current.get(&s.id) != Some(slot_index)
                    && !self.retired.contains(slot_index)
            })
            .map(|(&slot_index, _)| slot_index)
            .collect();
        for slot_index in gone {
            lost_sessions = true;
            self.retire(slot_index)?;
        }
        for slot_index in current.values() {
            self.write_gateway(*slot_index)?;
        }
        let entries = maglev_entries(placement, |g| current[&g.id]);
        let listener = &mut self.listeners[index];
        if entries.len() as u32 > listener.maglev_room {
            bail!(
                "{} Maglev slots do not fit the {} loaded at start (restart to change maglev_size)",
                entries.len(),
                listener.maglev_room
            );
        }
        let changed = entries
            .iter()
            .enumerate()
            .filter(|(slot, entry)| listener.maglev.get(*slot) != Some(entry))
            .map(|(slot, entry)| (slot, *entry));
        self.program
            .set_maglev_slots(listener.maglev_offset, changed)?;
        listener.maglev = entries;
        let info = listener_info(index, listener);
        self.program.set_listener(&listener.addresses, &[], info)?;
        if lost_sessions {
            // Evicted at once, not at their next packet: the userspace datapath does the same.
            self.sweep();
        }
        Ok(())
    }

    /// Leaves a listener to the userspace datapath: the program stops matching its addresses,
    /// so its packets reach the listener socket; its gateways are retired, and the next sweep
    /// removes its sessions from the program's table (their clients go on through userspace).
    fn unserve(&mut self, index: usize, reason: &str) {
        let listener = &mut self.listeners[index];
        tracing::error!(listener = %listener.name, "the XDP program no longer serves this listener, the userspace datapath does: {reason}");
        listener.served = false;
        let gone = std::mem::take(&mut listener.addresses);
        let info = listener_info(index, listener);
        let mut result = self.program.set_listener(&[], &gone, info);
        let slots: Vec<u32> = self
            .gateways
            .iter()
            .filter(|(slot_index, s)| s.listener == index && !self.retired.contains(slot_index))
            .map(|(&slot_index, _)| slot_index)
            .collect();
        for slot_index in slots {
            result = result.and(self.retire(slot_index));
        }
        if let Err(e) = result {
            tracing::error!(listener = %self.listeners[index].name, "cannot take the listener out of the XDP program: {e:#}");
        }
    }

    /// Takes a gateway out of the program: its replies are no longer recognised and its sessions
    /// no longer kept; the next sweep removes them and frees its index.
    fn retire(&mut self, slot_index: u32) -> anyhow::Result<()> {
        let slot = self.gateways.get_mut(&slot_index).expect("a slot");
        slot.keeps = false;
        slot.written = None;
        self.retired.push(slot_index);
        self.program
            .clear_gateway(slot_index, endpoint_of(slot.address))
    }

    /// Writes a gateway's entry if it changed.
    fn write_gateway(&mut self, slot_index: u32) -> anyhow::Result<()> {
        let slot = self.gateways.get_mut(&slot_index).expect("a slot");
        let entry = slot.entry();
        if slot.written != Some(entry) {
            self.program.set_gateway(slot_index, entry)?;
            slot.written = Some(entry);
            let ready = entry.flags & GATEWAY_READY != 0;
            self.metrics.set_xdp_ready(
                &self.listeners[slot.listener].name,
                &slot.name,
                Some(ready),
            );
        }
        Ok(())
    }

    /// Asks the kernel how every gateway is reached now.
    fn refresh_paths(&mut self) -> anyhow::Result<()> {
        let neighbours = self.netlink.neighbours()?;
        let live: Vec<u32> = self
            .gateways
            .keys()
            .filter(|i| !self.retired.contains(i))
            .copied()
            .collect();
        for slot_index in live {
            self.refresh_path(slot_index, &neighbours);
            self.write_gateway(slot_index)?;
        }
        Ok(())
    }

    fn refresh_path(&mut self, slot_index: u32, neighbours: &HashMap<(u32, IpAddr), [u8; 6]>) {
        let slot = self.gateways.get_mut(&slot_index).expect("a slot");
        let source = self.listeners[slot.listener].source;
        match self.netlink.path_to(slot.address.ip(), source) {
            Ok(path) => {
                if slot
                    .path
                    .is_some_and(|p| (p.ifindex, p.next_hop) != (path.ifindex, path.next_hop))
                {
                    slot.next_hop_mac = None;
                }
                if slot.path != Some(path) {
                    tracing::info!(gateway = %slot.name, interface = path.ifindex, next_hop = %path.next_hop, source = %path.source, "route to the gateway");
                }
                slot.path = Some(path);
                // A neighbour entry that disappeared keeps its last MAC: the kernel forgets
                // entries that only XDP traffic uses.
                if let Some(mac) = neighbours.get(&(path.ifindex, path.next_hop)) {
                    slot.next_hop_mac = Some(*mac);
                }
            }
            Err(e) => {
                if slot.path.is_some() {
                    tracing::warn!(gateway = %slot.name, "no route to the gateway, its traffic goes through userspace: {e:#}");
                }
                slot.path = None;
            }
        }
    }

    /// The addresses each served listener answers on: its own, or for a wildcard every local
    /// address of its family.
    fn refresh_addresses(&mut self) -> anyhow::Result<()> {
        let local = local_addresses()?;
        for index in 0..self.listeners.len() {
            let listener = &self.listeners[index];
            if !listener.served {
                continue;
            }
            let wanted: Vec<SocketAddr> = if listener.listen.ip().is_unspecified() {
                local
                    .iter()
                    .filter(|ip| ip.is_ipv4() == listener.listen.is_ipv4())
                    .map(|ip| SocketAddr::new(*ip, listener.listen.port()))
                    .collect()
            } else {
                vec![listener.listen]
            };
            if wanted == listener.addresses {
                continue;
            }
            let gone: Vec<SocketAddr> = listener
                .addresses
                .iter()
                .filter(|a| !wanted.contains(a))
                .copied()
                .collect();
            tracing::info!(listener = %listener.name, addresses = ?wanted, "XDP listener addresses");
            let info = listener_info(index, listener);
            self.program.set_listener(&wanted, &gone, info)?;
            self.listeners[index].addresses = wanted;
        }
        Ok(())
    }

    /// Adds what the program counted since the last read to the balancer's metrics.
    fn read_counters(&mut self) -> anyhow::Result<()> {
        let counters = self.program.counters(self.listeners.len() as u32)?;
        let mut seen = std::mem::take(&mut self.counters_seen);
        seen.resize(counters.slots().len(), 0);
        for (slot, (&value, seen)) in counters.slots().iter().zip(seen.iter_mut()).enumerate() {
            let delta = value.saturating_sub(*seen);
            *seen = value;
            if delta > 0 {
                self.count(slot, delta);
            }
        }
        self.counters_seen = seen;
        for (slot_index, slot) in self.gateways.iter_mut() {
            let now = self.program.traffic(*slot_index)?;
            let before = std::mem::replace(&mut slot.traffic_seen, now);
            let c = &slot.counters;
            c.packets_to_gateway.inc_by(
                now.packets_to_gateway
                    .saturating_sub(before.packets_to_gateway),
            );
            c.bytes_to_gateway
                .inc_by(now.bytes_to_gateway.saturating_sub(before.bytes_to_gateway));
            c.packets_to_client.inc_by(
                now.packets_to_client
                    .saturating_sub(before.packets_to_client),
            );
            c.bytes_to_client
                .inc_by(now.bytes_to_client.saturating_sub(before.bytes_to_client));
            c.initiations
                .inc_by(now.initiations.saturating_sub(before.initiations));
            c.responses
                .inc_by(now.responses.saturating_sub(before.responses));
            c.cookies.inc_by(now.cookies.saturating_sub(before.cookies));
            c.sessions_created
                .inc_by(now.sessions_created.saturating_sub(before.sessions_created));
        }
        Ok(())
    }

    /// Counts `delta` of counter slot `slot` (see `counter_slot`) in the metric it belongs to.
    fn count(&self, slot: usize, delta: u64) {
        let row = slot / XdpCounter::COUNT as usize;
        let counter = XdpCounter::ALL[slot % XdpCounter::COUNT as usize];
        let (listener, direction) = match row {
            0 => (None, Direction::ToGateway),
            row => (
                self.listeners.get((row - 1) / 2),
                if (row - 1) % 2 == 0 {
                    Direction::ToGateway
                } else {
                    Direction::ToClient
                },
            ),
        };
        let name = listener.map_or("", |l| l.name.as_str());
        let drop = |reason: DropReason| self.metrics.dropped(name, direction, reason).inc_by(delta);
        use XdpCounter::*;
        match (counter, listener) {
            // Per gateway, from the traffic map.
            (ToGateway | ToClient | SessionCreated, _) => {}
            (JunkTruncated | JunkUnknownType | JunkReservedNotZero | JunkBadLength, Some(l)) => {
                let junk = wglb_common::wireguard::Junk::ALL
                    .into_iter()
                    .find(|j| XdpCounter::junk(*j) == counter)
                    .expect("a junk counter");
                l.counters.junk(direction, junk).inc_by(delta);
            }
            (Malformed, Some(_)) => drop(DropReason::Malformed),
            (SourceRate | SourceUnconfirmed, Some(l)) => {
                let refusal = Refusal::ALL
                    .into_iter()
                    .find(|r| XdpCounter::refusal(*r) == counter)
                    .expect("a refusal counter");
                l.counters.refused(refusal).inc_by(delta);
            }
            (SessionConfirmed, Some(l)) => l.counters.confirmed.inc_by(delta),
            (ClientPathChanged, Some(l)) => l.counters.client_path_changes.inc_by(delta),
            (NatReclaimed, _) => self.metrics.nat_drift(NatDrift::Reclaimed).inc_by(delta),
            (NoGateway, Some(l)) => l.counters.no_gateway.inc_by(delta),
            (NatPortsExhausted, Some(_)) => drop(DropReason::NatPortsExhausted),
            (StaleNat, Some(_)) => drop(DropReason::StaleSession),
            (RedirectFailed, Some(_)) => drop(DropReason::SendFailed),
            (GatewayGone, Some(l)) => l
                .counters
                .eviction(EvictionReason::GatewayGone)
                .inc_by(delta),
            (counter, _) => self
                .metrics
                .xdp_passed(name, counter.as_str())
                .inc_by(delta),
        }
    }

    /// Removes idle sessions and those of gateways that no longer keep theirs (unconfirmed ones
    /// sooner: [`probation_idle`]), counts the rest per gateway, announces confirmed sessions to
    /// peers (and those that went), puts right any drift between the session and NAT maps,
    /// recounts each source's unconfirmed sessions, and frees the indices of retired gateways.
    fn sweep(&mut self) {
        let started = Instant::now();
        // NAT first: an entry read here whose session the later reads do not find had lost it.
        let read = self.program.nat_entries().and_then(|nat| {
            Ok((
                nat,
                self.program.sessions(Table::Confirmed)?,
                self.program.sessions(Table::Unconfirmed)?,
            ))
        });
        let (nat, confirmed, unconfirmed) = match read {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!("cannot read the XDP session tables: {e:#}");
                return;
            }
        };
        let now = coarse_now_ns();
        let mut counts: HashMap<u32, i64> = HashMap::new();
        let mut evicted: HashMap<(usize, u32, EvictionReason), u64> = HashMap::new();
        let refresh_due: Vec<bool> = self
            .listeners
            .iter()
            .map(|l| {
                let every = sync::refresh_interval(l.plan.idle_timeout).as_nanos() as u64;
                l.sync.enabled() && now.saturating_sub(l.refreshed_at_ns) >= every
            })
            .collect();
        // Sessions that stay, with the NAT entry each owns.
        let mut live: HashMap<FlowKey, (Table, Session)> = HashMap::new();
        let mut unconfirmed_per_listener = vec![0i64; self.listeners.len()];
        let mut unconfirmed_per_source: HashMap<FlowKey, u32> = HashMap::new();
        let sessions = confirmed
            .iter()
            .map(|(key, session)| (Table::Confirmed, key, session))
            .chain(
                unconfirmed
                    .iter()
                    .map(|(key, session)| (Table::Unconfirmed, key, session)),
            );
        for (table, key, session) in sessions {
            let index = key.listener as usize;
            let Some(listener) = self.listeners.get(index) else {
                continue;
            };
            let slot = self
                .gateways
                .get(&session.gateway)
                .filter(|s| s.keeps && s.listener == index);
            let idle = now.saturating_sub(session.last_seen_ns);
            let idle_timeout = match table {
                Table::Confirmed => listener.plan.idle_timeout,
                Table::Unconfirmed => probation_idle(listener.plan.idle_timeout),
            };
            let client = address_of(key.client);
            let reason = match (slot, table) {
                (None, _) => EvictionReason::GatewayGone,
                (Some(_), Table::Confirmed) if idle > idle_timeout.as_nanos() as u64 => {
                    EvictionReason::Idle
                }
                (Some(_), Table::Unconfirmed) if idle > idle_timeout.as_nanos() as u64 => {
                    EvictionReason::Unconfirmed
                }
                (Some(slot), _) => {
                    *counts.entry(session.gateway).or_default() += 1;
                    live.insert(*key, (table, *session));
                    if table == Table::Unconfirmed {
                        unconfirmed_per_listener[index] += 1;
                        *unconfirmed_per_source.entry(key.source()).or_default() += 1;
                        continue;
                    }
                    // Announced when new (or moved to another gateway), then again with traffic
                    // once per refresh interval.
                    let fresh = self.announced.get(key) != Some(&session.gateway);
                    if listener.sync.enabled()
                        && (fresh
                            || refresh_due[index]
                                && session.last_seen_ns >= listener.refreshed_at_ns)
                    {
                        let idle_ms = idle / 1_000_000;
                        listener
                            .sync
                            .upsert(client, &slot.name, slot.address, idle_ms);
                        self.announced.insert(*key, session.gateway);
                    }
                    continue;
                }
            };
            if let Err(e) = self.program.remove_session(table, key, session) {
                tracing::warn!("cannot remove an XDP session: {e:#}");
                continue;
            }
            if self.announced.remove(key).is_some() {
                listener.sync.evicted(client);
            }
            *evicted.entry((index, session.gateway, reason)).or_default() += 1;
        }
        // Announced sessions gone without this sweep: pushed out of the LRU map, or evicted by
        // the program itself (their gateway stopped keeping them).
        let listeners = &self.listeners;
        self.announced.retain(|key, _| {
            let kept = live.get(key).is_some_and(|(t, _)| *t == Table::Confirmed);
            if !kept {
                if let Some(listener) = listeners.get(key.listener as usize) {
                    listener.sync.evicted(address_of(key.client));
                }
            }
            kept
        });
        for (listener, due) in self.listeners.iter_mut().zip(refresh_due) {
            if due {
                listener.refreshed_at_ns = now;
            }
        }
        for (listener, count) in self.listeners.iter().zip(unconfirmed_per_listener) {
            listener.counters.unconfirmed.set(count);
        }
        self.put_nat_right(&nat, &live);
        self.recount_sources(&unconfirmed_per_source);
        self.expire_pins(&live, now);
        for ((index, slot_index, reason), count) in evicted {
            let listener = &self.listeners[index];
            listener.counters.eviction(reason).inc_by(count);
            let gateway = self
                .gateways
                .get(&slot_index)
                .map_or("", |s| s.name.as_str());
            self.events.publish(
                &listener.name,
                gateway,
                EventKind::SessionsEvicted { reason, count },
            );
        }
        for (slot_index, slot) in self.gateways.iter_mut() {
            let count = counts.get(slot_index).copied().unwrap_or(0);
            slot.counters.sessions.add(count - slot.sessions);
            slot.sessions = count;
        }
        if !self.retired.is_empty() {
            // Their last traffic first: the indices are about to be reset.
            if let Err(e) = self.read_counters() {
                tracing::warn!("cannot read the XDP program's counters: {e:#}");
            }
        }
        for slot_index in std::mem::take(&mut self.retired) {
            if let Err(e) = self.program.reset_traffic(slot_index) {
                tracing::warn!("cannot reset a gateway's XDP traffic counters: {e:#}");
            }
            if let Some(slot) = self.gateways.remove(&slot_index) {
                let listener = &self.listeners[slot.listener].name;
                // Unless a gateway of the same name took over (a moved gateway).
                if !self
                    .gateways
                    .values()
                    .any(|s| s.listener == slot.listener && s.name == slot.name)
                {
                    self.metrics.set_xdp_ready(listener, &slot.name, None);
                }
            }
            self.free.push(slot_index);
        }
        self.last_sweep = started.elapsed();
        self.swept_at = Instant::now();
    }

    /// Holds the NAT map to the sessions: every NAT entry belongs to a live session that uses
    /// it, and every live session has its entry. `nat` was read before `live`; whatever looks
    /// wrong is read again before it is changed, since the program keeps working meanwhile.
    fn put_nat_right(
        &mut self,
        nat: &[(NatKey, FlowKey)],
        live: &HashMap<FlowKey, (Table, Session)>,
    ) {
        let uses = |owner: &FlowKey, entry: &NatKey, program: &XdpProgram| {
            let session = match live.get(owner) {
                Some((_, session)) => Some(*session),
                None => program.session(owner).map(|(_, session)| session),
            };
            session.is_some_and(|s| nat_key(&s) == *entry)
        };
        let mut owners: HashMap<NatKey, FlowKey> = HashMap::with_capacity(nat.len());
        for (entry, owner) in nat {
            if live.get(owner).is_some_and(|(_, s)| nat_key(s) == *entry) {
                owners.insert(*entry, *owner);
                continue;
            }
            if !uses(owner, entry, &self.program)
                && self.program.remove_nat_of(entry, owner).unwrap_or(false)
            {
                self.metrics.nat_drift(NatDrift::Orphaned).inc();
            }
        }
        for (key, (table, session)) in live {
            let entry = nat_key(session);
            if owners.get(&entry) == Some(key) {
                continue;
            }
            match self.program.nat_owner(&entry) {
                Some(owner) if owner == *key => {}
                None => {
                    if self.program.restore_nat(&entry, key).unwrap_or(false) {
                        self.metrics.nat_drift(NatDrift::Missing).inc();
                    }
                }
                Some(other) if uses(&other, &entry, &self.program) => {
                    // Two sessions on one port: the other's replies come to it. This one goes;
                    // its client's next packet places it again, on a port of its own.
                    if self.program.remove_session(*table, key, session).is_ok() {
                        self.metrics.nat_drift(NatDrift::Conflict).inc();
                        if self.announced.remove(key).is_some() {
                            if let Some(listener) = self.listeners.get(key.listener as usize) {
                                listener.sync.evicted(address_of(key.client));
                            }
                        }
                    }
                }
                Some(other) => {
                    // Held by a session that no longer uses it: ours again.
                    if self.program.remove_nat_of(&entry, &other).unwrap_or(false)
                        && self.program.restore_nat(&entry, key).unwrap_or(false)
                    {
                        self.metrics.nat_drift(NatDrift::Missing).inc();
                    }
                }
            }
        }
    }

    /// Sets every source's count of unconfirmed sessions to what PROBATION holds: the program
    /// cannot see the LRU push its sessions out, nor this sweep expire them.
    fn recount_sources(&mut self, unconfirmed: &HashMap<FlowKey, u32>) {
        let sources = match self.program.sources() {
            Ok(sources) => sources,
            Err(e) => {
                tracing::warn!("cannot read the XDP admission budgets: {e:#}");
                return;
            }
        };
        for (source, budget) in sources {
            let count = unconfirmed.get(&source).copied().unwrap_or(0);
            if budget.unconfirmed != count {
                if let Err(e) = self.program.set_unconfirmed(&source, count) {
                    tracing::warn!("cannot correct an XDP admission budget: {e:#}");
                }
            }
        }
    }

    /// Drops pins whose session exists now (the program used them), whose gateway no longer
    /// keeps sessions, or that have been idle for the listener's idle timeout.
    fn expire_pins(&mut self, live: &HashMap<FlowKey, (Table, Session)>, now: u64) {
        if self.listeners.iter().all(|l| l.pins.is_empty()) {
            return;
        }
        for (index, listener) in self.listeners.iter_mut().enumerate() {
            let idle_timeout = listener.plan.idle_timeout.as_nanos() as u64;
            let gateways = &self.gateways;
            let program = &mut self.program;
            listener.pins.retain(|client, pin| {
                let keep = !live.contains_key(&flow_key(index, *client))
                    && gateways
                        .get(&pin.slot)
                        .is_some_and(|s| s.keeps && s.listener == index)
                    && now.saturating_sub(pin.seen_ns) <= idle_timeout;
                if !keep {
                    let _ = program.unpin(&flow_key(index, *client));
                }
                keep
            });
        }
    }

    /// Drops `peer`'s pin of `client`, if it is `peer`'s.
    fn unpin(&mut self, index: usize, peer: &str, client: SocketAddr) {
        let pins = &mut self.listeners[index].pins;
        if pins.get(&client).is_some_and(|pin| &*pin.peer == peer) {
            pins.remove(&client);
            let _ = self.program.unpin(&flow_key(index, client));
        }
    }

    async fn answer(
        &mut self,
        index: usize,
        request: SessionRequest,
        slow_path: &mpsc::Sender<SessionRequest>,
    ) {
        match request {
            SessionRequest::Count { reply } => {
                let mut counts = ask(slow_path, |reply| SessionRequest::Count { reply })
                    .await
                    .unwrap_or_default();
                for slot in self.gateways.values().filter(|s| s.listener == index) {
                    *counts.entry(slot.name.clone()).or_default() += slot.sessions.max(0) as u64;
                }
                let _ = reply.send(counts);
            }
            SessionRequest::List {
                filter,
                after,
                limit,
                reply,
            } => {
                let slow = ask(slow_path, |reply| SessionRequest::List {
                    filter: filter.clone(),
                    after,
                    limit,
                    reply,
                })
                .await
                .unwrap_or_default();
                let now = coarse_now_ns();
                let sessions = self.matching(index, &filter);
                let (chosen, more, total) = query::page(
                    sessions
                        .iter()
                        .map(|(client, _, _, session)| (*client, session)),
                    after,
                    limit,
                );
                let fast = SessionPage {
                    sessions: chosen
                        .into_iter()
                        .map(|(client, session)| {
                            let slot = &self.gateways[&session.gateway];
                            SessionInfo {
                                client,
                                gateway: slot.name.clone(),
                                gateway_address: slot.address,
                                idle_ms: now.saturating_sub(session.last_seen_ns) / 1_000_000,
                                synced_from: None,
                            }
                        })
                        .collect(),
                    more,
                    total,
                };
                let _ = reply.send(query::merge_pages(fast, slow, limit));
            }
            SessionRequest::Evict { filter, reply } => {
                let slow = ask(slow_path, |reply| SessionRequest::Evict {
                    filter: filter.clone(),
                    reply,
                })
                .await
                .unwrap_or(0);
                let mut per_gateway: HashMap<u32, u64> = HashMap::new();
                for (client, key, table, session) in self.matching(index, &filter) {
                    if self.program.remove_session(table, &key, &session).is_ok() {
                        *per_gateway.entry(session.gateway).or_default() += 1;
                        if self.announced.remove(&key).is_some() {
                            self.listeners[index].sync.evicted(client);
                        }
                    }
                }
                let pinned: Vec<(SocketAddr, Arc<str>)> = self.listeners[index]
                    .pins
                    .iter()
                    .filter(|(client, pin)| {
                        let name = self.gateways.get(&pin.slot).map_or("", |s| s.name.as_str());
                        filter.matches(client, name)
                    })
                    .map(|(client, pin)| (*client, pin.peer.clone()))
                    .collect();
                for (client, peer) in pinned {
                    self.unpin(index, &peer, client);
                }
                let listener = &self.listeners[index];
                let mut total = slow;
                for (slot_index, count) in per_gateway {
                    total += count;
                    listener
                        .counters
                        .eviction(EvictionReason::Operator)
                        .inc_by(count);
                    let slot = &self.gateways[&slot_index];
                    self.events.publish(
                        &listener.name,
                        &slot.name,
                        EventKind::SessionsEvicted {
                            reason: EvictionReason::Operator,
                            count,
                        },
                    );
                }
                tracing::info!(listener = %listener.name, evicted = total, "XDP and userspace sessions evicted through the API");
                let _ = reply.send(total);
            }
            SessionRequest::Snapshot { reply } => {
                let mut own = ask(slow_path, |reply| SessionRequest::Snapshot { reply })
                    .await
                    .unwrap_or_default();
                match self.program.sessions(Table::Confirmed) {
                    Ok(sessions) => {
                        let now = coarse_now_ns();
                        own.extend(
                            sessions
                                .into_iter()
                                .filter(|(key, _)| key.listener as usize == index)
                                .filter_map(|(key, session)| {
                                    let slot = self.gateways.get(&session.gateway)?;
                                    Some(SessionInfo {
                                        client: address_of(key.client),
                                        gateway: slot.name.clone(),
                                        gateway_address: slot.address,
                                        idle_ms: now.saturating_sub(session.last_seen_ns)
                                            / 1_000_000,
                                        synced_from: None,
                                    })
                                }),
                        );
                    }
                    Err(e) => tracing::warn!("cannot read the XDP session table: {e:#}"),
                }
                let _ = reply.send(own);
            }
            SessionRequest::Sync { peer, step, reply } => {
                // The userspace datapath keeps them too, for clients the program passes to it
                // (one whose gateway's next hop is not resolved yet).
                let applied = sync::apply(&mut ListenerPins { fast: self, index }, &peer, &step);
                let _ = ask(slow_path, |reply| SessionRequest::Sync {
                    peer,
                    step,
                    reply,
                })
                .await;
                let _ = reply.send(applied);
            }
        }
    }

    /// The program's sessions (of both tables) of listener `index` that `filter` matches.
    fn matching(
        &self,
        index: usize,
        filter: &SessionFilter,
    ) -> Vec<(SocketAddr, FlowKey, Table, Session)> {
        let mut matching = Vec::new();
        for table in [Table::Confirmed, Table::Unconfirmed] {
            let sessions = match self.program.sessions(table) {
                Ok(sessions) => sessions,
                Err(e) => {
                    tracing::warn!("cannot read the XDP session table: {e:#}");
                    continue;
                }
            };
            matching.extend(
                sessions
                    .into_iter()
                    .filter(|(key, _)| key.listener as usize == index)
                    .filter_map(|(key, session)| {
                        let slot = self.gateways.get(&session.gateway)?;
                        let client = address_of(key.client);
                        filter
                            .matches(&client, &slot.name)
                            .then_some((client, key, table, session))
                    }),
            );
        }
        matching
    }
}

/// One listener's pins, as the sync layer applies a peer's stream to them.
struct ListenerPins<'a> {
    fast: &'a mut FastPath,
    index: usize,
}

impl sync::Standbys for ListenerPins<'_> {
    fn held_for(&self, peer: &str) -> Vec<SocketAddr> {
        self.fast.listeners[self.index]
            .pins
            .iter()
            .filter(|(_, pin)| &*pin.peer == peer)
            .map(|(client, _)| *client)
            .collect()
    }

    /// Pins a peer's session; false if no gateway of this name and address keeps sessions here.
    /// The peer forwarded it last, so the program's own session of the client, if any, goes.
    fn hold(
        &mut self,
        peer: &Arc<str>,
        client: SocketAddr,
        gateway: &str,
        address: SocketAddr,
        idle_ms: u64,
    ) -> bool {
        let Some(slot) = self
            .fast
            .gateways
            .iter()
            .find(|(_, s)| {
                s.listener == self.index && s.keeps && s.name == gateway && s.address == address
            })
            .map(|(slot, _)| *slot)
        else {
            return false;
        };
        let key = flow_key(self.index, client);
        if let Some((table, session)) = self.fast.program.session(&key) {
            let _ = self.fast.program.remove_session(table, &key, &session);
            self.fast.announced.remove(&key);
        }
        if let Err(e) = self.fast.program.pin(&key, slot) {
            tracing::warn!("cannot pin a peer's session in the XDP program: {e:#}");
            return false;
        }
        let pin = Pin {
            slot,
            peer: peer.clone(),
            seen_ns: coarse_now_ns().saturating_sub(idle_ms * 1_000_000),
        };
        self.fast.listeners[self.index].pins.insert(client, pin);
        true
    }

    fn release(&mut self, peer: &str, client: SocketAddr) {
        self.fast.unpin(self.index, peer, client);
    }

    fn resyncs(&mut self) -> &mut Resyncs {
        &mut self.fast.listeners[self.index].resyncs
    }
}

/// Asks the userspace datapath; `None` if it is gone.
async fn ask<T>(
    slow_path: &mpsc::Sender<SessionRequest>,
    request: impl FnOnce(oneshot::Sender<T>) -> SessionRequest,
) -> Option<T> {
    let (reply, answer) = oneshot::channel();
    slow_path.send(request(reply)).await.ok()?;
    answer.await.ok()
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
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE)
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
fn local_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let mut addresses: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .context("listing local addresses")?
        .filter_map(|interface| {
            let address = interface.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .filter(|ip| !ip.is_loopback())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    addresses.sort();
    Ok(addresses)
}

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
