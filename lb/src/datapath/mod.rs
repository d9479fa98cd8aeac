//! The userspace datapath: a full-NAT UDP relay.
//!
//! Clients talk to the listener socket. Each session gets its own upstream socket, connected to
//! its gateway, so the gateway's replies identify the session by the socket they arrive on (a
//! shared socket could only tell clients apart by WireGuard index, which gateway-initiated
//! handshakes do not carry). Replies leave through the listener socket, from the address the
//! client sent to.
//!
//! A listener runs as shards (`shards`: one per core by default, each on a thread of its own
//! with its own socket on the listener's address, `steering` keeping a client on one). A
//! shard's task receives its clients' datagrams in batches (recvmmsg, and GRO where the kernel
//! offers it) and owns its part of the session table; one small task per session waits on its
//! upstream socket and relays replies, borrowing a per-thread batch buffer only while it
//! drains. Decisions come from the [`ListenerPlan`]; this module only executes them.
//!
//! The table also holds peers' sessions (session sync): standby entries with no socket, which
//! become forwarding sessions on the gateway they name when their client's traffic comes here.
//!
//! New sessions are admitted against their source address's budget and start unconfirmed, in a
//! bounded probation table of their own, until their gateway answers (`crate::admission`): a
//! flood of WireGuard-shaped datagrams costs at most the probation bound in sockets, and never
//! pushes a confirmed session out.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::IntGauge;
use quinn_udp::RecvMeta;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use wglb_common::admission::Refusal;
use wglb_common::index::{index_at, sender_offset};
use wglb_common::mac1::{Blake2sWork, Mac1Key};
use wglb_common::session::{confirms, on_client_datagram, ClientAction, Found};
use wglb_common::wireguard::{classify, MessageType};

mod endpoint;
mod shards;
mod steering;

use endpoint::{datagrams, RecvBuffers, UdpEndpoint};
pub use shards::{bind_shards, run_listener, ListenerLinks};
pub use steering::shard_of;

use crate::admission::Sources;
use crate::agents::Agents;
use crate::control::ListenerPlan;
use crate::events::{EventBus, EventKind};
use crate::lifecycle::{self, announce_due, fate, Evictions, Fate, Held, SessionStore, Standing};
use crate::metrics::{Direction, GatewayCounters, ListenerCounters, Metrics};
use crate::passive::{self, Board, Part, Waiting};
use crate::pool::{GatewayId, Placement};
use crate::query::{IndicesAfter, Moved, SessionRequest};
use crate::rebinding::{Indices, Learned, Routed, SessionIndex};
use crate::session::{now_ms, now_ns, Activity, EvictionReason, Session, SessionTable};
use crate::sync::{self, Resyncs, SyncOut};

/// How often idle sessions are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Receive batches handled before the listener task looks at plan changes and timers again.
const BATCHES_PER_TURN: usize = 16;

/// What the session table holds for a session besides its gateway.
enum Link {
    /// This balancer forwards the session.
    Forwarding(Forwarding),
    /// A peer's session, kept so that its client stays on its gateway should its traffic come
    /// here.
    Standby(Standby),
}

impl Link {
    fn standing(&self) -> Standing {
        match self {
            Link::Forwarding(_) => Standing::Confirmed,
            Link::Standby(_) => Standing::Standby,
        }
    }

    fn synced_from(&self) -> Option<&str> {
        match self {
            Link::Forwarding(_) => None,
            Link::Standby(standby) => Some(&standby.peer),
        }
    }

    fn index(&self) -> Option<u32> {
        match self {
            Link::Forwarding(forwarding) => forwarding.index,
            Link::Standby(standby) => standby.index,
        }
    }
}

/// A forwarding session's socket towards its gateway and the task relaying the replies.
struct Forwarding {
    upstream: Arc<UdpEndpoint>,
    replies: AbortHandle,
    counters: Arc<GatewayCounters>,
    /// Opened for a rebound tuple: the old tuple's session retires once this one is confirmed.
    rebinding: Option<Routed>,
    /// The receiver index its gateway chose last (`crate::rebinding`), for the peers.
    index: Option<u32>,
    /// The address the client sends to, which replies come from.
    reply_from: Option<IpAddr>,
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        self.replies.abort();
        self.counters.sessions.dec();
    }
}

struct Standby {
    peer: Arc<str>,
    /// The listener's count of standby entries.
    count: IntGauge,
    /// The receiver index the peer announced, for this balancer's own announcements once it
    /// takes the session over.
    index: Option<u32>,
}

impl Standby {
    fn new(peer: Arc<str>, count: &IntGauge, index: Option<u32>) -> Standby {
        count.inc();
        Standby {
            peer,
            count: count.clone(),
            index,
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.count.dec();
    }
}

thread_local! {
    /// Reply tasks drain their socket synchronously, so one buffer set per worker thread serves
    /// every session: a quiet session holds no buffer at all.
    static REPLY_BUFFERS: RefCell<RecvBuffers> = RefCell::new(RecvBuffers::new());
}

/// Classifies every datagram of a batch once: counts and logs the ones that are not WireGuard
/// (and, from clients to a listener with the location's key, initiations whose mac1 is wrong),
/// and tallies the rest for the forwarding counters.
fn wireguard_datagrams(
    data: &[u8],
    stride: usize,
    direction: Direction,
    counters: &ListenerCounters,
    peer: SocketAddr,
    mac1: Option<&Mac1Key>,
) -> Batch {
    let mut batch = Batch::default();
    for (index, datagram) in datagrams(data, stride).enumerate() {
        let kind = classify(datagram);
        if kind == Ok(MessageType::HandshakeInitiation)
            && mac1.is_some_and(|key| !mac1_verifies(key, datagram))
        {
            counters.bad_mac1.inc();
            tracing::debug!(%peer, "dropped a handshake initiation whose mac1 is wrong");
            batch.reject(index);
            continue;
        }
        match kind {
            Ok(kind) => {
                batch.valid += 1;
                batch.valid_bytes += datagram.len() as u64;
                batch.confirming += confirms(kind) as u64;
                match kind {
                    MessageType::HandshakeInitiation => batch.initiations += 1,
                    MessageType::HandshakeResponse => batch.responses += 1,
                    MessageType::CookieReply => batch.cookies += 1,
                    MessageType::TransportData => {}
                }
            }
            Err(junk) => {
                counters.junk(direction, junk).inc();
                tracing::debug!(%peer, len = datagram.len(), reason = junk.as_str(), "dropped a datagram that is not WireGuard");
                batch.reject(index);
            }
        }
    }
    batch
}

fn mac1_verifies(key: &Mac1Key, datagram: &[u8]) -> bool {
    datagram
        .try_into()
        .is_ok_and(|initiation| key.verifies(initiation, &mut Blake2sWork::default()))
}

/// What the WireGuard filter found in a receive buffer.
#[derive(Clone, Copy, Default)]
struct Batch {
    valid: u64,
    valid_bytes: u64,
    /// Which datagrams of the buffer were dropped (not WireGuard, or a wrong mac1), by
    /// position: UDP GRO packs at most 64 (UDP_GRO_CNT_MAX) into one buffer.
    rejected: u64,
    initiations: u64,
    responses: u64,
    cookies: u64,
    /// Messages that confirm a session when a gateway sends them.
    confirming: u64,
}

impl Batch {
    fn reject(&mut self, index: usize) {
        self.rejected |= 1u64.checked_shl(index as u32).unwrap_or(0);
    }

    fn kept(&self, index: usize) -> bool {
        self.rejected & 1u64.checked_shl(index as u32).unwrap_or(0) == 0
    }
}

/// Counts a forwarded batch (its WireGuard datagrams) and the handshake messages in it.
fn count_forwarded(batch: Batch, direction: Direction, counters: &GatewayCounters) {
    match direction {
        Direction::ToGateway => {
            counters.packets_to_gateway.inc_by(batch.valid);
            counters.bytes_to_gateway.inc_by(batch.valid_bytes);
            counters.initiations.inc_by(batch.initiations);
        }
        Direction::ToClient => {
            counters.packets_to_client.inc_by(batch.valid);
            counters.bytes_to_client.inc_by(batch.valid_bytes);
            counters.responses.inc_by(batch.responses);
            counters.cookies.inc_by(batch.cookies);
        }
    }
}

/// Forwards `data` (one datagram, or a GRO batch of `stride`-sized ones) that passed the filter,
/// one datagram at a time when some of the batch was dropped.
fn forward(
    to: &UdpEndpoint,
    destination: SocketAddr,
    src_ip: Option<IpAddr>,
    data: &[u8],
    stride: usize,
    batch: Batch,
) -> io::Result<()> {
    if batch.rejected == 0 {
        return to.send(destination, src_ip, data, stride);
    }
    datagrams(data, stride)
        .enumerate()
        .filter(|(index, _)| batch.kept(*index))
        .try_for_each(|(_, d)| to.send_one(destination, src_ip, d, None))
}

struct ReplyPath {
    upstream: Arc<UdpEndpoint>,
    listener: Arc<UdpEndpoint>,
    client: SocketAddr,
    /// The address the client sent to, so replies come from the address it expects.
    reply_from: Option<IpAddr>,
    activity: Arc<Activity>,
    gateway: Arc<GatewayCounters>,
    counters: Arc<ListenerCounters>,
    /// Who the gateway is, and where the indices it chooses go (the listener's task).
    gateway_id: GatewayId,
    gateway_address: SocketAddr,
    learned: mpsc::Sender<Learned>,
}

impl ReplyPath {
    /// The indices the gateway chose in the handshake messages of a batch.
    fn learn_indices(&self, data: &[u8], stride: usize) {
        for datagram in datagrams(data, stride) {
            let (Ok(kind), Some(header)) = (classify(datagram), datagram.get(..12)) else {
                continue;
            };
            if let (Some(offset), Ok(header)) = (sender_offset(kind), header.try_into()) {
                // A full queue loses an index: the tuple then decides, as without one.
                let _ = self.learned.try_send(Learned {
                    index: index_at(header, offset),
                    client: self.client,
                    gateway: self.gateway_id,
                    address: self.gateway_address,
                });
            }
        }
    }

    async fn run(self) {
        loop {
            if self.upstream.io.readable().await.is_err() {
                return;
            }
            let busy = REPLY_BUFFERS.with_borrow_mut(|buffers| self.drain(buffers));
            if busy {
                // A gateway flooding one session must not starve the others on this thread.
                tokio::task::yield_now().await;
            }
        }
    }

    /// Relays what is queued; true when it stopped with more queued.
    fn drain(&self, buffers: &mut RecvBuffers) -> bool {
        for _ in 0..BATCHES_PER_TURN {
            let count = match self.upstream.recv_batch(buffers) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    // ICMP errors (port unreachable from a dead gateway) surface here, or at
                    // the next send towards it.
                    if e.kind() == io::ErrorKind::ConnectionRefused {
                        refused(&self.activity, &self.gateway);
                    }
                    tracing::debug!(client = %self.client, "upstream receive error: {e}");
                    continue;
                }
            };
            self.activity.touch(now_ms());
            for (meta, data) in buffers.meta[..count].iter().zip(&buffers.data) {
                let data = &data[..meta.len];
                let stride = meta.stride.max(1);
                let batch = wireguard_datagrams(
                    data,
                    stride,
                    Direction::ToClient,
                    &self.counters,
                    meta.addr,
                    None,
                );
                if batch.valid == 0 {
                    continue;
                }
                if batch.confirming > 0 {
                    self.activity.answer();
                }
                if batch.responses + batch.cookies > 0 {
                    if let Some(round_trip) = self.activity.handshake_answered(now_ns()) {
                        self.gateway.handshake_rtt.observe(round_trip.as_secs_f64());
                    }
                }
                if batch.responses + batch.initiations > 0 {
                    self.learn_indices(data, stride);
                }
                match forward(
                    &self.listener,
                    self.client,
                    self.reply_from,
                    data,
                    stride,
                    batch,
                ) {
                    Ok(()) => count_forwarded(batch, Direction::ToClient, &self.gateway),
                    Err(e) => {
                        self.counters.send_failed_to_client.inc_by(batch.valid);
                        tracing::debug!(client = %self.client, "dropped a reply: send failed: {e}");
                    }
                }
            }
        }
        true
    }
}

/// A shard's relay state, owned by its thread's task.
struct Relay {
    name: String,
    /// Which of the listener's shards this is.
    shard: usize,
    socket: Arc<UdpEndpoint>,
    source: Option<IpAddr>,
    plan: Arc<ListenerPlan>,
    /// Confirmed sessions (and peers' standby entries).
    sessions: SessionTable<Link>,
    /// Unconfirmed sessions: their gateway has not answered yet.
    probation: SessionTable<Forwarding>,
    shared: Shared,
    metrics: Metrics,
    counters: Arc<ListenerCounters>,
    gateway_counters: HashMap<GatewayId, Arc<GatewayCounters>>,
    events: EventBus,
    /// What happened since the last sweep, counted and announced as events once per sweep
    /// rather than once per packet of a flood: sessions that ended on a datagram's arrival
    /// (pushed out of a full table or of probation, their gateway gone), new sessions refused.
    ended: Evictions,
    refused: [u64; Refusal::ALL.len()],
    /// The probation table's size as last added to the listener's gauge (which the XDP fast
    /// path adds its own to).
    unconfirmed_counted: i64,
    sync: SyncOut,
    standby: IntGauge,
    resyncs: Resyncs,
    /// When forwarding sessions were last announced again to peers (ms, [`now_ms`]).
    refreshed_at: u64,
    board: Board,
    agents: Agents,
    /// Where reply paths send the indices they see gateways choose.
    learned: mpsc::Sender<Learned>,
}

/// What a listener's shards share, each behind a lock taken only off the path of a session's
/// datagrams (for a new tuple, a handshake, a sweep): one receiver index table, so that a client
/// whose NAT rebinding lands it on another shard is still routed by its index (and the XDP
/// program asks one table); one budget per source address, whichever shards its ports reach.
#[derive(Clone)]
struct Shared {
    indices: Arc<Mutex<Indices>>,
    sources: Arc<Mutex<Sources>>,
    /// Each shard's queue of [`Sibling`] messages, in shard order.
    siblings: Arc<[mpsc::Sender<Sibling>]>,
}

/// What one shard tells the shard holding a tuple.
enum Sibling {
    /// The gateway answered a rebound tuple on another shard: the old tuple's session goes.
    Retired { old: SocketAddr, gateway: GatewayId },
}

/// A shard's part of a table of `size` entries: the steering spreads tuples evenly.
fn share(size: NonZeroUsize, shards: usize) -> NonZeroUsize {
    NonZeroUsize::new(size.get().div_ceil(shards.max(1))).unwrap_or(NonZeroUsize::MIN)
}

impl Relay {
    fn shards(&self) -> usize {
        self.shared.siblings.len()
    }

    fn indices(&self) -> MutexGuard<'_, Indices> {
        self.shared
            .indices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn sources(&self) -> MutexGuard<'_, Sources> {
        self.shared
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&mut self, plan: Arc<ListenerPlan>) {
        let before = std::mem::replace(&mut self.plan, plan);
        let shards = self.shards();
        for (client, session) in self
            .sessions
            .set_capacity(share(self.plan.table_size, shards))
        {
            self.push_out(client, &session);
        }
        self.sources().set_limits(self.plan.admission.limits());
        for (client, session) in self
            .probation
            .set_capacity(share(self.plan.admission.probation_size, shards))
        {
            self.left_probation(client, session.gateway, EvictionReason::Unconfirmed);
        }
        // Sessions of gateways that no longer keep theirs move where their gateway's agent can
        // make the new gateway call their client, or go at once, named as the plan they were
        // placed under had them (a removed gateway is not in the new one).
        // Looking is worth it only when some gateway can be ordered (as in the XDP fast path).
        if self.agents.any_attached(&self.name) {
            let plan = self.plan.clone();
            self.rehome(&before.placement, |s| {
                !plan.placement.keeps(s.gateway, s.gateway_address)
            });
        }
        self.end_sessions(&before.placement);
        let placement = &self.plan.placement;
        self.gateway_counters
            .retain(|id, _| placement.gateway(*id).is_some());
        self.counters
            .failing_open
            .set(placement.failing_open() as i64);
    }

    fn gateway_name(&self, id: GatewayId) -> &str {
        self.plan.placement.gateway(id).map_or("", |g| &g.name)
    }

    /// A session pushed out of a full table.
    fn push_out(&mut self, client: SocketAddr, session: &Session<Link>) {
        self.ended_between_sweeps(client, session, EvictionReason::TableFull);
    }

    /// A session that ended on a datagram's arrival: counted and announced at the next sweep. A
    /// standby entry goes silently: it was a peer's.
    fn ended_between_sweeps(
        &mut self,
        client: SocketAddr,
        session: &Session<Link>,
        reason: EvictionReason,
    ) {
        let standing = session.link.standing();
        if standing != Standing::Standby {
            let name = self.gateway_name(session.gateway).to_string();
            self.ended
                .record(&self.sync, client, &name, reason, standing.synced());
        }
    }

    /// An unconfirmed session of `client` on `gateway` left probation without being confirmed
    /// (pushed out, or evicted through the API): its source may open another.
    fn left_probation(&mut self, client: SocketAddr, gateway: GatewayId, reason: EvictionReason) {
        self.sources().settled(client.ip());
        let name = self.gateway_name(gateway).to_string();
        self.ended.record(&self.sync, client, &name, reason, false);
    }

    /// Ends the sessions of both tables whose [`fate`] says so, and counts and announces them at
    /// once. Gateways are named by the current plan, or `previous` for one it no longer has.
    fn end_sessions(&mut self, previous: &Placement) {
        let now = now_ms();
        let placement = &self.plan.placement;
        let idle_timeout = self.plan.idle_timeout;
        let fate_of =
            |standing: Standing, gateway: GatewayId, address: SocketAddr, last_ms: u64| {
                let idle = Duration::from_millis(now.saturating_sub(last_ms));
                fate(
                    standing,
                    placement.keeps(gateway, address),
                    idle,
                    idle_timeout,
                )
            };
        let name_of = |id: GatewayId| {
            placement
                .gateway(id)
                .or_else(|| previous.gateway(id))
                .map_or("", |g| g.name.as_str())
        };
        let mut ended = Evictions::default();
        let gone = self.sessions.evict_where(|_, s| {
            fate_of(
                s.link.standing(),
                s.gateway,
                s.gateway_address,
                s.activity.last_ms(),
            ) != Fate::Keep
        });
        for (client, session) in gone {
            let standing = session.link.standing();
            let last = session.activity.last_ms();
            // Standby entries go silently: their peers announce their own.
            if let (Fate::Evict(reason), false) = (
                fate_of(standing, session.gateway, session.gateway_address, last),
                standing == Standing::Standby,
            ) {
                let name = name_of(session.gateway);
                ended.record(&self.sync, client, name, reason, standing.synced());
            }
        }
        let unconfirmed = Standing::Unconfirmed;
        let gone = self.probation.evict_where(|_, s| {
            fate_of(
                unconfirmed,
                s.gateway,
                s.gateway_address,
                s.activity.last_ms(),
            ) != Fate::Keep
        });
        for (client, session) in gone {
            self.sources().settled(client.ip());
            let last = session.activity.last_ms();
            if let Fate::Evict(reason) =
                fate_of(unconfirmed, session.gateway, session.gateway_address, last)
            {
                ended.record(&self.sync, client, name_of(session.gateway), reason, false);
            }
        }
        if ended.total() > 0 {
            tracing::debug!(listener = %self.name, ended = ended.total(), "sessions ended: gateways gone, or idle");
        }
        ended.publish(&self.name, &self.counters, &self.events);
    }

    /// Moves each forwarded session that is `leaving` its gateway, and whose client's key that
    /// gateway's agent reported, to the gateway placement picks now, when that one is another
    /// and has an agent: the session's path to the new gateway is opened at once and its agent
    /// is ordered to start a handshake over it, so the client is called instead of waiting out
    /// its own 15 s timer. The others stay as they are (to [`Relay::end_sessions`], when their
    /// gateway no longer keeps them). Gateways are named by the current plan, or `previous`.
    fn rehome(&mut self, previous: &Placement, leaving: impl Fn(&Session<Link>) -> bool) -> Moved {
        let plan = self.plan.clone();
        let placement = &plan.placement;
        let name_of = |id: GatewayId| {
            placement
                .gateway(id)
                .or_else(|| previous.gateway(id))
                .map(|g| g.name.to_string())
        };
        let mut moves = Vec::new();
        let mut outcome = Moved::default();
        let mut moved_from: HashMap<String, u64> = HashMap::new();
        for (client, session) in self.sessions.iter() {
            let Link::Forwarding(link) = &session.link else {
                continue;
            };
            if !leaving(session) {
                continue;
            }
            outcome.stayed += 1;
            let Some(old) = name_of(session.gateway) else {
                continue;
            };
            let key = link
                .upstream
                .io
                .local_addr()
                .ok()
                .and_then(|path| self.agents.key_behind(&self.name, &old, path));
            let Some(key) = key else {
                continue;
            };
            let Some(new) = placement.place(*client) else {
                continue;
            };
            if new.id != session.gateway && self.agents.takes_orders(&self.name, &new.name) {
                moves.push((
                    old,
                    *client,
                    link.reply_from,
                    key,
                    new.id,
                    new.name.to_string(),
                    new.address,
                ));
            }
        }
        for (from, client, reply_from, key, id, name, address) in moves {
            let activity = Arc::new(Activity::default());
            activity.touch(now_ms());
            let Some(link) = self.forward(
                client,
                reply_from,
                id,
                &name,
                address,
                &activity,
                Batch::default(),
            ) else {
                continue;
            };
            let Ok(path) = link.upstream.io.local_addr() else {
                continue;
            };
            let Some(session) = self.sessions.peek_mut(&client) else {
                continue;
            };
            *session = Session {
                gateway: id,
                gateway_address: address,
                activity,
                link: Link::Forwarding(link),
            };
            self.agents.order(&self.name, &name, key, path);
            outcome.moved += 1;
            outcome.stayed -= 1;
            *moved_from.entry(from).or_default() += 1;
            tracing::info!(listener = %self.name, %client, gateway = %name, %path, "re-homed a session: its new gateway's agent is to call the client");
            self.announce(client, 0);
        }
        for (gateway, count) in moved_from {
            self.events
                .publish(&self.name, &gateway, EventKind::SessionsMoved { count });
        }
        outcome
    }

    /// Moves `client`'s session from probation to the table of confirmed sessions, and tells
    /// peers about it: only confirmed sessions are synced.
    fn confirm(&mut self, client: SocketAddr) {
        let Some(session) = self.probation.remove(&client) else {
            return;
        };
        self.sources().settled(client.ip());
        self.counters.confirmed.inc();
        let session = Session {
            gateway: session.gateway,
            gateway_address: session.gateway_address,
            activity: session.activity,
            link: Link::Forwarding(session.link),
        };
        let rebinding = match &session.link {
            Link::Forwarding(link) => link.rebinding,
            Link::Standby(_) => None,
        };
        if let Some((evicted, session)) = self.sessions.insert(client, session) {
            self.push_out(evicted, &session);
            tracing::debug!(listener = %self.name, client = %evicted, "session table full: evicted the least recently used session");
        }
        // Retired first: a rebound tuple's index is its own from then on.
        if let Some(rebinding) = rebinding {
            self.retire(client, &rebinding);
        }
        self.announce(client, 0);
    }

    /// Tells peers of `client`'s session (forwarded by this balancer), idle for `idle_ms`.
    fn announce(&self, client: SocketAddr, idle_ms: u64) {
        let Some(session) = self.sessions.peek(&client) else {
            return;
        };
        let name = self
            .plan
            .placement
            .gateway(session.gateway)
            .map_or("", |g| &g.name);
        let index = self.session_index(client, session.link.index());
        self.sync
            .upsert(client, name, session.gateway_address, idle_ms, index);
    }

    /// `client`'s receiver index `index`, if it still routes the session.
    fn session_index(&self, client: SocketAddr, index: Option<u32>) -> Option<SessionIndex> {
        self.indices().of_session(index?, client, now_ns())
    }

    /// The gateway answered the rebound tuple `client`: it roamed there, so the old tuple's
    /// session goes.
    fn retire(&mut self, client: SocketAddr, rebinding: &Routed) {
        self.indices().retire(rebinding, client, now_ns());
        let old = rebinding.learned_on;
        let holder = steering::shard_of(old, self.shards());
        if holder == self.shard {
            self.retired(old, rebinding.gateway);
            return;
        }
        let retired = Sibling::Retired {
            old,
            gateway: rebinding.gateway,
        };
        // A full queue leaves the old tuple's session to idle out; its datagrams are dropped
        // as a retired tuple's meanwhile.
        if self.shared.siblings[holder].try_send(retired).is_err() {
            tracing::debug!(listener = %self.name, %old, "could not tell the old tuple's shard of a rebinding");
        }
    }

    /// The rebound tuple of `old`'s session on `gateway` was confirmed: `old`'s session goes.
    fn retired(&mut self, old: SocketAddr, gateway: GatewayId) {
        let on_its_gateway = self
            .sessions
            .peek(&old)
            .is_some_and(|s| s.gateway == gateway);
        if on_its_gateway {
            if let Some(gone) = self.sessions.remove(&old) {
                self.ended_between_sweeps(old, &gone, EvictionReason::Rebound);
                tracing::debug!(listener = %self.name, %old, "the client's NAT mapping changed: its gateway roamed to a new tuple");
            }
        }
    }

    fn told(&mut self, message: Sibling) {
        match message {
            Sibling::Retired { old, gateway } => self.retired(old, gateway),
        }
    }

    /// An index a gateway chose, seen by a reply path: the session's from now on, unless another
    /// gateway claims it too. Peers hear of a confirmed session's new index at once, so that they
    /// route its rebound tuples from the moment they would forward it.
    fn learn(&mut self, learned: Learned) {
        let now = now_ns();
        if !self.indices().learn(learned, now, now, &self.counters) {
            return;
        }
        let client = learned.client;
        if let Some(session) = self.probation.peek_mut(&client) {
            if session.gateway == learned.gateway {
                session.link.index = Some(learned.index);
            }
            return;
        }
        let Some(session) = self.sessions.peek_mut(&client) else {
            return;
        };
        let Link::Forwarding(link) = &mut session.link else {
            return;
        };
        if session.gateway != learned.gateway || link.index == Some(learned.index) {
            return;
        }
        link.index = Some(learned.index);
        let idle = now_ms().saturating_sub(session.activity.last_ms());
        self.announce(client, idle);
    }

    fn answer(&mut self, request: SessionRequest) {
        let placement = &self.plan.placement;
        let name_of = |id: GatewayId| placement.gateway(id).map_or("", |g| g.name.as_str());
        match request {
            SessionRequest::Count { reply } => {
                // The per-gateway gauges count sessions as links come and go: no table scan.
                let counts = self
                    .gateway_counters
                    .iter()
                    .map(|(id, c)| (name_of(*id).to_string(), c.sessions.get().max(0) as u64))
                    .collect();
                let _ = reply.send(counts);
            }
            SessionRequest::List {
                filter,
                after,
                limit,
                reply,
            } => {
                let _ = reply.send(lifecycle::list(self, &filter, after, limit));
            }
            SessionRequest::Evict { filter, reply } => {
                let mut ended = Evictions::default();
                let own = self
                    .sessions
                    .evict_where(|c, s| filter.matches(c, name_of(s.gateway)));
                let unconfirmed = self
                    .probation
                    .evict_where(|c, s| filter.matches(c, name_of(s.gateway)));
                let count = own.len() + unconfirmed.len();
                for (client, session) in own {
                    let standing = session.link.standing();
                    if standing != Standing::Standby {
                        let name = name_of(session.gateway);
                        let reason = EvictionReason::Operator;
                        ended.record(&self.sync, client, name, reason, standing.synced());
                    }
                }
                for (client, session) in unconfirmed {
                    self.sources().settled(client.ip());
                    let name = name_of(session.gateway);
                    ended.record(&self.sync, client, name, EvictionReason::Operator, false);
                }
                tracing::info!(listener = %self.name, evicted = count, "sessions evicted through the API");
                ended.publish(&self.name, &self.counters, &self.events);
                let _ = reply.send(count as u64);
            }
            SessionRequest::Snapshot { reply } => {
                let _ = reply.send(lifecycle::snapshot(self));
            }
            SessionRequest::Move { gateway, reply } => {
                let plan = self.plan.clone();
                let id = plan.placement.gateways().iter().find(|g| g.name == gateway);
                let moved = match id.map(|g| g.id) {
                    Some(id) => self.rehome(&plan.placement, |s| s.gateway == id),
                    None => Moved::default(),
                };
                let _ = reply.send(moved);
            }
            SessionRequest::Sync { peer, step, reply } => {
                let _ = reply.send(sync::apply(self, &peer, &step));
            }
            SessionRequest::Indices { reply, .. } => {
                // The shards share one index table, which their front answers from.
                let _ = reply.send(IndicesAfter::default());
            }
        }
    }

    fn counters_for(&mut self, id: GatewayId, name: &str) -> Arc<GatewayCounters> {
        let metrics = &self.metrics;
        let listener = &self.name;
        self.gateway_counters
            .entry(id)
            .or_insert_with(|| Arc::new(metrics.gateway(listener, name)))
            .clone()
    }

    /// Handles up to [`BATCHES_PER_TURN`] batches of client datagrams already queued.
    fn receive(&mut self, socket: &UdpEndpoint, buffers: &mut RecvBuffers) {
        for _ in 0..BATCHES_PER_TURN {
            let count = match socket.recv_batch(buffers) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!(listener = %self.name, "receive error: {e}");
                    continue;
                }
            };
            for (meta, data) in buffers.meta[..count].iter().zip(&buffers.data) {
                self.handle_client_datagram(meta, &data[..meta.len]);
            }
        }
    }

    /// The once-a-second sweep: answered sessions are confirmed, sessions whose fate says so go,
    /// what was pushed out and refused since the last sweep is announced, and confirmed sessions
    /// with traffic since the last refresh are announced to peers again.
    fn sweep(&mut self) {
        let now = now_ms();
        let refresh = sync::refresh_interval(self.plan.idle_timeout).as_millis() as u64;
        let refresh_due = now.saturating_sub(self.refreshed_at) >= refresh;
        if self.sync.enabled() && refresh_due {
            for (client, session) in self.sessions.iter() {
                let last = session.activity.last_ms();
                let standing = session.link.standing();
                // Confirmed sessions were announced when they were confirmed.
                if announce_due(standing, true, refresh_due, last >= self.refreshed_at) {
                    self.announce(*client, now.saturating_sub(last));
                }
            }
            self.refreshed_at = now;
        }
        // Answered since their last datagram from the client (a quiet client's session is
        // confirmed here rather than at its next datagram).
        let answered: Vec<SocketAddr> = self
            .probation
            .iter()
            .filter(|(_, s)| s.activity.answered())
            .map(|(client, _)| *client)
            .collect();
        for client in answered {
            self.confirm(client);
        }
        let plan = self.plan.clone();
        self.end_sessions(&plan.placement);
        self.post_waiting();
        let unconfirmed = self.probation.len() as i64;
        self.counters
            .unconfirmed
            .add(unconfirmed - std::mem::replace(&mut self.unconfirmed_counted, unconfirmed));
        std::mem::take(&mut self.ended).publish(&self.name, &self.counters, &self.events);
        for (reason, count) in Refusal::ALL
            .into_iter()
            .zip(std::mem::take(&mut self.refused))
        {
            if count > 0 {
                self.events
                    .publish(&self.name, "", EventKind::SessionsRefused { reason, count });
            }
        }
    }

    /// Tells passive health which clients wait for their gateway to answer a handshake.
    fn post_waiting(&self) {
        let now = now_ns();
        let mut waiting = Waiting::new();
        let sessions = self
            .sessions
            .iter()
            .map(|(c, s)| (c, s.gateway, &s.activity));
        let unconfirmed = self
            .probation
            .iter()
            .map(|(c, s)| (c, s.gateway, &s.activity));
        for (client, gateway, activity) in sessions.chain(unconfirmed) {
            if let (Some(waited), Some(gateway)) =
                (activity.waiting(now), self.plan.placement.gateway(gateway))
            {
                passive::note(&mut waiting, &gateway.name, client.ip(), waited);
            }
        }
        self.board
            .post(&self.name, Part::Userspace(self.shard), waiting);
    }

    fn handle_client_datagram(&mut self, meta: &RecvMeta, data: &[u8]) {
        let client = meta.addr;
        let stride = meta.stride.max(1);
        let mac1 = self.plan.mac1.as_ref();
        let batch = wireguard_datagrams(
            data,
            stride,
            Direction::ToGateway,
            &self.counters,
            client,
            mac1,
        );
        if batch.valid == 0 {
            return;
        }
        let now = now_ms();
        let placement = &self.plan.placement;
        let found = if let Some(session) = self.sessions.lookup(&client, now) {
            let found = Found {
                keeps: placement.keeps(session.gateway, session.gateway_address),
                standby: session.link.standing() == Standing::Standby,
                confirmed: true,
                answered: false,
            };
            // The common case, forwarded on its first lookup: no second one per datagram.
            let action = on_client_datagram(found);
            if let (ClientAction::Forward, Link::Forwarding(link)) = (action, &session.link) {
                let upstream = Upstream {
                    link,
                    address: session.gateway_address,
                    activity: &session.activity,
                };
                to_gateway(upstream, &self.counters, client, data, stride, batch);
                return;
            }
            Some(found)
        } else {
            self.probation.lookup(&client, now).map(|session| Found {
                keeps: placement.keeps(session.gateway, session.gateway_address),
                standby: false,
                confirmed: false,
                answered: session.activity.answered(),
            })
        };
        match found.map(on_client_datagram) {
            Some(ClientAction::Forward) => {
                self.forward_held(client, data, stride, batch);
                return;
            }
            Some(ClientAction::Confirm) => {
                self.confirm(client);
                self.forward_held(client, data, stride, batch);
                return;
            }
            // A peer's session whose traffic comes here now: on to the gateway it had.
            Some(ClientAction::TakeOver) => {
                if self.take_over(client, meta.dst_ip, batch) {
                    self.forward_held(client, data, stride, batch);
                }
                return;
            }
            Some(ClientAction::Replace) => {
                if let Some(session) = self.sessions.remove(&client) {
                    self.ended_between_sweeps(client, &session, EvictionReason::GatewayGone);
                } else if let Some(gone) = self.probation.remove(&client) {
                    self.left_probation(client, gone.gateway, EvictionReason::GatewayGone);
                }
                tracing::debug!(listener = %self.name, %client, "session's gateway is gone; placing it again");
            }
            None => {}
        }
        let now_ns = now_ns();
        let indices = self.indices();
        if indices.retired(&client, now_ns) {
            drop(indices);
            self.counters.retired_tuple.inc_by(batch.valid);
            return;
        }
        let (sessions, shard, shards) = (&self.sessions, self.shard, self.shards());
        // Another shard's tuple is taken for alive while its index routes: a shard cannot look
        // into another's table.
        let alive = |old: SocketAddr, gateway: GatewayId| {
            steering::shard_of(old, shards) != shard
                || sessions.peek(&old).is_some_and(|s| {
                    s.gateway == gateway && s.link.standing() == Standing::Confirmed
                })
        };
        let first = datagrams(data, stride).next().unwrap_or_default();
        let routed = indices.route(client, first, &self.plan.placement, now_ns, alive);
        drop(indices);
        if self.open_session(client, meta.dst_ip, now, batch, routed) {
            self.forward_held(client, data, stride, batch);
        }
    }

    /// Forwards to the gateway of the session `client` has, confirmed or not.
    fn forward_held(&self, client: SocketAddr, data: &[u8], stride: usize, batch: Batch) {
        let upstream = match self.sessions.peek(&client) {
            Some(Session {
                link: Link::Forwarding(link),
                gateway_address,
                activity,
                ..
            }) => Some(Upstream {
                link,
                address: *gateway_address,
                activity,
            }),
            Some(_) => None,
            None => self.probation.peek(&client).map(|s| Upstream {
                link: &s.link,
                address: s.gateway_address,
                activity: &s.activity,
            }),
        };
        if let Some(upstream) = upstream {
            to_gateway(upstream, &self.counters, client, data, stride, batch);
        }
    }

    /// Places a new, unconfirmed session if its source's budget admits it; false when it cannot
    /// be, with `batch` counted as dropped.
    fn open_session(
        &mut self,
        client: SocketAddr,
        reply_from: Option<IpAddr>,
        now: u64,
        batch: Batch,
        routed: Option<Routed>,
    ) -> bool {
        let placement = &self.plan.placement;
        let gateway = match routed {
            Some(routed) => placement.gateway(routed.gateway),
            None => placement.place(client),
        };
        let Some(gateway) = gateway else {
            self.counters.no_gateway.inc_by(batch.valid);
            tracing::debug!(listener = %self.name, %client, "dropped: no gateway takes new sessions");
            return false;
        };
        let (id, name, address) = (gateway.id, gateway.name.clone(), gateway.address);
        let admitted = self.sources().admit(client.ip(), now * 1_000_000);
        if let Err(refusal) = admitted {
            self.counters.refused(refusal).inc_by(batch.valid);
            if let Some(slot) = Refusal::ALL.iter().position(|r| *r == refusal) {
                self.refused[slot] += 1;
            }
            tracing::debug!(listener = %self.name, %client, reason = refusal.as_str(), "dropped: new session refused");
            return false;
        }
        let activity = Arc::new(Activity::default());
        activity.touch(now);
        let Some(mut link) = self.forward(client, reply_from, id, &name, address, &activity, batch)
        else {
            self.sources().settled(client.ip());
            return false;
        };
        link.rebinding = routed.filter(|r| r.rebinds(client));
        link.index = routed.map(|r| r.index);
        tracing::debug!(listener = %self.name, %client, gateway = %name, routed = ?routed, "new session");
        let session = Session {
            gateway: id,
            gateway_address: address,
            activity,
            link,
        };
        if let Some((evicted, pushed)) = self.probation.insert(client, session) {
            self.left_probation(evicted, pushed.gateway, EvictionReason::Unconfirmed);
            tracing::debug!(listener = %self.name, client = %evicted, "probation full: evicted the least recently used unconfirmed session");
        }
        true
    }

    /// Turns a peer's standby entry into a session this balancer forwards, on the gateway the
    /// peer had it on; false when it cannot, with `batch` counted as dropped.
    fn take_over(&mut self, client: SocketAddr, reply_from: Option<IpAddr>, batch: Batch) -> bool {
        let Some(session) = self.sessions.peek(&client) else {
            return false;
        };
        let (id, address, activity) = (
            session.gateway,
            session.gateway_address,
            session.activity.clone(),
        );
        let Some(name) = self.plan.placement.gateway(id).map(|g| g.name.clone()) else {
            return false;
        };
        let Some(mut link) = self.forward(client, reply_from, id, &name, address, &activity, batch)
        else {
            return false;
        };
        if let Some(session) = self.sessions.peek_mut(&client) {
            link.index = session.link.index();
            let Link::Standby(standby) =
                std::mem::replace(&mut session.link, Link::Forwarding(link))
            else {
                unreachable!("only standby entries are taken over")
            };
            tracing::debug!(listener = %self.name, %client, gateway = %name, peer = %standby.peer, "took over a peer's session");
        }
        self.announce(client, 0);
        true
    }

    /// Opens a session's socket towards its gateway and starts relaying the replies.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        client: SocketAddr,
        reply_from: Option<IpAddr>,
        id: GatewayId,
        name: &str,
        address: SocketAddr,
        activity: &Arc<Activity>,
        batch: Batch,
    ) -> Option<Forwarding> {
        let upstream = match UdpEndpoint::upstream(address, self.source) {
            Ok(upstream) => Arc::new(upstream),
            Err(e) => {
                self.counters.upstream_unavailable.inc_by(batch.valid);
                tracing::debug!(listener = %self.name, %client, gateway = %name, "dropped: cannot open a socket towards the gateway: {e}");
                return None;
            }
        };
        let counters = self.counters_for(id, name);
        let replies = tokio::spawn(
            ReplyPath {
                upstream: upstream.clone(),
                listener: self.socket.clone(),
                client,
                reply_from,
                activity: activity.clone(),
                gateway: counters.clone(),
                counters: self.counters.clone(),
                gateway_id: id,
                gateway_address: address,
                learned: self.learned.clone(),
            }
            .run(),
        )
        .abort_handle();
        counters.sessions.inc();
        counters.sessions_created.inc();
        Some(Forwarding {
            upstream,
            replies,
            counters,
            rebinding: None,
            index: None,
            reply_from,
        })
    }
}

impl SessionStore for Relay {
    fn held(&self) -> Box<dyn Iterator<Item = Held<'_>> + '_> {
        let now = now_ms();
        let name_of = |id: GatewayId| {
            self.plan
                .placement
                .gateway(id)
                .map_or("", |g| g.name.as_str())
        };
        let confirmed = self.sessions.iter().map(move |(client, s)| Held {
            client: *client,
            gateway: name_of(s.gateway),
            gateway_address: s.gateway_address,
            idle_ms: now.saturating_sub(s.activity.last_ms()),
            standing: s.link.standing(),
            synced_from: s.link.synced_from(),
            index: self.session_index(*client, s.link.index()),
            shard: Some(self.shard),
        });
        let unconfirmed = self.probation.iter().map(move |(client, s)| Held {
            client: *client,
            gateway: name_of(s.gateway),
            gateway_address: s.gateway_address,
            idle_ms: now.saturating_sub(s.activity.last_ms()),
            standing: Standing::Unconfirmed,
            synced_from: None,
            index: self.session_index(*client, s.link.index),
            shard: Some(self.shard),
        });
        Box::new(confirmed.chain(unconfirmed))
    }
}

impl sync::Standbys for Relay {
    fn held_for(&self, peer: &str) -> Vec<SocketAddr> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.link.synced_from() == Some(peer))
            .map(|(client, _)| *client)
            .collect()
    }

    /// Keeps a peer's session as a standby entry on the gateway it names; false if this balancer
    /// has no such gateway, or has it down. The peer forwarded it last, so it takes the place of
    /// this balancer's own session of the client, if any.
    fn hold(
        &mut self,
        peer: &Arc<str>,
        client: SocketAddr,
        gateway: &str,
        address: SocketAddr,
        idle_ms: u64,
        index: Option<SessionIndex>,
    ) -> bool {
        let Some(id) = self.plan.placement.keeper(gateway, address) else {
            return false;
        };
        let activity = Arc::new(Activity::default());
        activity.touch(now_ms().saturating_sub(idle_ms));
        let now = now_ns();
        let index = index.filter(|index| {
            let learned = Learned {
                index: index.index,
                client,
                gateway: id,
                address,
            };
            self.indices()
                .learn(learned, index.learned_ns(now), now, &self.counters)
        });
        let standby = Standby::new(peer.clone(), &self.standby, index.map(|i| i.index));
        let session = Session {
            gateway: id,
            gateway_address: address,
            activity,
            link: Link::Standby(standby),
        };
        // Replacing the client's own session is not an eviction: its traffic went elsewhere.
        if self.probation.remove(&client).is_some() {
            self.sources().settled(client.ip());
        }
        if let Some(mine) = self.sessions.remove(&client) {
            if let Link::Forwarding(_) = mine.link {
                tracing::debug!(listener = %self.name, %client, %peer, "a peer forwards this session now");
            }
        }
        if let Some((pushed, session)) = self.sessions.insert(client, session) {
            self.push_out(pushed, &session);
        }
        true
    }

    fn release(&mut self, peer: &str, client: SocketAddr) {
        let theirs = self
            .sessions
            .peek(&client)
            .is_some_and(|s| s.link.synced_from() == Some(peer));
        if theirs {
            self.sessions.remove(&client);
        }
    }

    fn resyncs(&mut self) -> &mut Resyncs {
        &mut self.resyncs
    }
}

/// Passive health's raw material: the session's client asked for a handshake.
fn note_initiations(activity: &Activity, batch: Batch) {
    if batch.initiations > 0 {
        activity.initiated(now_ns());
    }
}

/// ... or the gateway's port refused a datagram of the session (ICMP port unreachable).
fn refused(activity: &Activity, counters: &GatewayCounters) {
    activity.refused(now_ns());
    counters.unreachable.inc();
}

/// Where a session's client datagrams go: its socket towards its gateway.
struct Upstream<'a> {
    link: &'a Forwarding,
    address: SocketAddr,
    activity: &'a Activity,
}

fn to_gateway(
    upstream: Upstream<'_>,
    counters: &ListenerCounters,
    client: SocketAddr,
    data: &[u8],
    stride: usize,
    batch: Batch,
) {
    let Upstream {
        link,
        address,
        activity,
    } = upstream;
    note_initiations(activity, batch);
    match forward(&link.upstream, address, None, data, stride, batch) {
        Ok(()) => count_forwarded(batch, Direction::ToGateway, &link.counters),
        Err(e) => {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                refused(activity, &link.counters);
            }
            counters.send_failed_to_gateway.inc_by(batch.valid);
            tracing::debug!(%client, "dropped a datagram: send to gateway failed: {e}");
        }
    }
}
