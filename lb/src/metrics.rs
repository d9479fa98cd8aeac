//! Prometheus metrics. Label values come only from configuration (listener and gateway names)
//! and fixed enums, never from clients, so cardinality is bounded. The datapath resolves label
//! sets once per gateway ([`GatewayCounters`]) and per listener ([`ListenerCounters`]) rather than
//! per packet.

use std::net::SocketAddr;

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};
use wglb_common::admission::Refusal;
use wglb_common::handshake::RTT_BOUNDS_US;
use wglb_common::wireguard::{Junk, MessageType};

use crate::pool::{AdminState, GatewayView, Health};
use crate::session::EvictionReason;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    packets: IntCounterVec,
    bytes: IntCounterVec,
    dropped: IntCounterVec,
    sessions: IntGaugeVec,
    sessions_created: IntCounterVec,
    evictions: IntCounterVec,
    handshakes: IntCounterVec,
    gateway_health: IntGaugeVec,
    gateway_state: IntGaugeVec,
    failing_open: IntGaugeVec,
    reloads: IntCounterVec,
    health_votes: IntGaugeVec,
    fail_static: IntGaugeVec,
    health_reports: IntCounterVec,
    datapath: IntGaugeVec,
    xdp_attached: IntGaugeVec,
    xdp_passed: IntCounterVec,
    xdp_ready: IntGaugeVec,
    xdp_listener_addresses: IntGaugeVec,
    sync_connected: IntGaugeVec,
    sync_queued: IntGaugeVec,
    sync_sent: IntCounterVec,
    sync_dropped: IntCounterVec,
    sync_resyncs: IntCounterVec,
    sync_lag: GaugeVec,
    sync_received: IntCounterVec,
    sync_standby: IntGaugeVec,
    unconfirmed: IntGaugeVec,
    confirmed: IntCounterVec,
    nat_drift: IntCounterVec,
    client_path_changes: IntCounterVec,
    index_collisions: IntCounterVec,
    handshake_rtt: HistogramVec,
    unreachable: IntCounterVec,
    passive_waiting: IntGaugeVec,
    passive_ejections: IntCounterVec,
    agents_attached: IntGaugeVec,
    agent_peers: IntGaugeVec,
    rehome_orders: IntCounterVec,
    rehome_order_seconds: HistogramVec,
    route_announced: IntGaugeVec,
}

/// What the fast path's sweep (or the program itself) found wrong between the XDP program's
/// session and NAT maps, and put right; the label values of `wglb_xdp_nat_drift_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatDrift {
    /// A NAT entry whose session was gone (pushed out of its LRU map): removed by the sweep.
    Orphaned,
    /// ... or taken over by the program for a new session.
    Reclaimed,
    /// A session without its NAT entry: given back.
    Missing,
    /// A session whose NAT port another session holds: evicted (its client is placed again).
    Conflict,
}

impl NatDrift {
    pub fn as_str(self) -> &'static str {
        match self {
            NatDrift::Orphaned => "orphaned",
            NatDrift::Reclaimed => "reclaimed",
            NatDrift::Missing => "missing",
            NatDrift::Conflict => "conflict",
        }
    }
}

/// Why the datapath dropped a packet; the label values of `wglb_dropped_packets_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    NotWireguard(Junk),
    /// No gateway may take a new session (all down with the drop policy, or all draining).
    NoGateway,
    /// The socket towards the gateway could not be opened (e.g. out of ports or descriptors).
    UpstreamUnavailable,
    /// The kernel refused the send (buffer full, no route), or the XDP redirect failed.
    SendFailed,
    /// The UDP length disagrees with the packet (XDP).
    Malformed,
    /// No free NAT port towards the gateway (XDP).
    NatPortsExhausted,
    /// A gateway's datagram to a NAT port whose session is gone (XDP).
    StaleSession,
    /// A new session its source's admission budget refused.
    Refused(Refusal),
    /// A handshake initiation whose mac1 is wrong for the listener's public key.
    BadMac1,
    /// From a source tuple whose session a rebinding retired (what was still in flight).
    RetiredTuple,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NotWireguard(Junk::Truncated) => "not_wireguard_truncated",
            DropReason::NotWireguard(Junk::UnknownType) => "not_wireguard_unknown_type",
            DropReason::NotWireguard(Junk::ReservedNotZero) => "not_wireguard_reserved_not_zero",
            DropReason::NotWireguard(Junk::BadLength) => "not_wireguard_bad_length",
            DropReason::NoGateway => "no_gateway",
            DropReason::UpstreamUnavailable => "upstream_unavailable",
            DropReason::SendFailed => "send_failed",
            DropReason::Malformed => "malformed",
            DropReason::NatPortsExhausted => "nat_ports_exhausted",
            DropReason::StaleSession => "stale_session",
            DropReason::Refused(refusal) => refusal.as_str(),
            DropReason::BadMac1 => "bad_mac1",
            DropReason::RetiredTuple => "retired_tuple",
        }
    }
}

/// Which way a packet went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ToGateway,
    ToClient,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToGateway => "to_gateway",
            Direction::ToClient => "to_client",
        }
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(vec.clone()))
                .expect("unique metric");
            vec
        }
        fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
            let vec = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(vec.clone()))
                .expect("unique metric");
            vec
        }
        let build_info = gauge(
            &registry,
            "wglb_build_info",
            "Always 1; labels carry the build.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let r = &registry;
        Metrics {
            packets: counter(r, "wglb_packets_total", "Packets forwarded.", &["listener", "gateway", "direction"]),
            bytes: counter(r, "wglb_bytes_total", "UDP payload bytes forwarded.", &["listener", "gateway", "direction"]),
            dropped: counter(r, "wglb_dropped_packets_total", "Packets dropped, by reason.", &["listener", "direction", "reason"]),
            sessions: gauge(r, "wglb_sessions", "Sessions pinned to a gateway now.", &["listener", "gateway"]),
            sessions_created: counter(r, "wglb_sessions_created_total", "Sessions placed on a gateway.", &["listener", "gateway"]),
            evictions: counter(r, "wglb_session_evictions_total", "Sessions removed, by reason.", &["listener", "reason"]),
            handshakes: counter(
                r,
                "wglb_handshake_messages_total",
                "WireGuard handshake messages forwarded (initiations to gateways, responses and cookies to clients).",
                &["listener", "gateway", "message"],
            ),
            gateway_health: gauge(r, "wglb_gateway_health", "1 for the gateway's settled health (up, suspect, down).", &["listener", "gateway", "state"]),
            gateway_state: gauge(r, "wglb_gateway_admin_state", "1 for the gateway's configured state.", &["listener", "gateway", "state"]),
            failing_open: gauge(r, "wglb_failing_open", "1 while no active gateway is up and health is ignored.", &["listener"]),
            reloads: counter(r, "wglb_config_reloads_total", "Configuration reloads, by result.", &["result"]),
            health_votes: gauge(r, "wglb_health_report_up", "Each health source's fresh verdict on a gateway: 1 up, 0 down; absent once the source is silent.", &["listener", "gateway", "source"]),
            fail_static: gauge(r, "wglb_health_fail_static", "1 while every source that reported on the gateway is silent and its last health is kept.", &["listener", "gateway"]),
            health_reports: counter(r, "wglb_health_reports_total", "Health reports received through the API, by result.", &["result"]),
            datapath: gauge(r, "wglb_datapath", "1 for the datapath in use: xdp (with the userspace one behind it) or userspace.", &["datapath"]),
            xdp_attached: gauge(r, "wglb_xdp_attached", "1 for each interface the XDP program is attached to, and how.", &["interface", "mode"]),
            xdp_listener_addresses: gauge(r, "wglb_xdp_listener_address", "1 for each address the XDP program answers a listener's clients on (a wildcard listener: every local address of its family, a floating address from the program's next look, once a second, after it arrives); until then its packets reach the userspace datapath.", &["listener", "address"]),
            xdp_ready: gauge(r, "wglb_xdp_gateway_ready", "1 while the XDP program forwards to the gateway itself; 0 while it passes the gateway's traffic to userspace (no route, or the next hop's MAC not known yet).", &["listener", "gateway"]),
            xdp_passed: counter(r, "wglb_xdp_passed_packets_total", "Packets the XDP program left to the kernel (and so to the userspace datapath), by reason; listener is empty for packets of none.", &["listener", "reason"]),
            sync_connected: gauge(r, "wglb_sync_peer_connected", "1 while the sync stream to the peer is up.", &["peer"]),
            sync_queued: gauge(r, "wglb_sync_queued_changes", "Session changes waiting to be sent to the peer.", &["peer"]),
            sync_sent: counter(r, "wglb_sync_changes_sent_total", "Session changes sent to the peer, resyncs included.", &["peer"]),
            sync_dropped: counter(r, "wglb_sync_changes_dropped_total", "Session changes dropped because the peer's queue was full (a resync follows).", &["peer"]),
            sync_resyncs: counter(r, "wglb_sync_resyncs_total", "Full resyncs sent to the peer (on connect and after drops).", &["peer"]),
            sync_lag: {
                let vec = GaugeVec::new(Opts::new("wglb_sync_lag_seconds", "For the last batch the peer acknowledged: time from its oldest change to the ack."), &["peer"]).expect("valid metric");
                r.register(Box::new(vec.clone())).expect("unique metric");
                vec
            },
            sync_received: counter(r, "wglb_sync_changes_received_total", "Session changes received from the peer, by result (applied; refused: unknown listener, or a gateway this balancer does not have or has down).", &["peer", "result"]),
            sync_standby: gauge(r, "wglb_sync_standby_sessions", "Peers' sessions held as standby entries, forwarded if their traffic comes here.", &["listener"]),
            unconfirmed: gauge(r, "wglb_unconfirmed_sessions", "Sessions whose gateway has not answered yet (in probation), included in wglb_sessions.", &["listener"]),
            confirmed: counter(r, "wglb_sessions_confirmed_total", "Sessions confirmed: their gateway answered (a handshake response or data), so they left probation.", &["listener"]),
            nat_drift: counter(r, "wglb_xdp_nat_drift_total", "Inconsistencies between the XDP program's session and NAT maps found and put right, by kind.", &["kind"]),
            client_path_changes: counter(r, "wglb_xdp_client_path_changes_total", "Sessions whose client came by another MAC, interface or listener address than before; replies follow it.", &["listener"]),
            index_collisions: counter(r, "wglb_index_collisions_total", "Receiver indices two gateways chose at once: they route no rebound client (its source tuple alone decides).", &["listener"]),
            handshake_rtt: {
                // The program's buckets (`wglb_common::handshake`): the XDP datapath counts
                // round trips per bucket and adds each at its bucket's bound, so under XDP the
                // counts are exact and the sum is an upper bound.
                let buckets = RTT_BOUNDS_US.iter().map(|us| *us as f64 / 1e6).collect();
                let opts = HistogramOpts::new("wglb_handshake_rtt_seconds", "From a client's latest handshake initiation to its gateway's response or cookie reply, as the balancer sees them (under XDP the sum is counted at bucket bounds).").buckets(buckets);
                let vec = HistogramVec::new(opts, &["listener", "gateway"]).expect("valid metric");
                r.register(Box::new(vec.clone())).expect("unique metric");
                vec
            },
            unreachable: counter(r, "wglb_gateway_unreachable_total", "ICMP port unreachable from the gateway's WireGuard port for a session's datagram: nothing listens there.", &["listener", "gateway"]),
            passive_waiting: gauge(r, "wglb_passive_waiting_clients", "Client addresses whose handshake initiations the gateway has left unanswered for at least the passive health window.", &["listener", "gateway"]),
            passive_ejections: counter(r, "wglb_passive_ejections_total", "Times passive health found the gateway answering no one's handshakes and reported it down.", &["listener", "gateway"]),
            route_announced: gauge(r, "wglb_route_announced", "1 while this balancer announces the address (its route is in the announcement table), 0 while it withholds it.", &["address"]),
            agents_attached: gauge(r, "wglb_agent_attached", "1 while the gateway's agent holds a stream to this balancer.", &["listener", "gateway"]),
            agent_peers: gauge(r, "wglb_agent_peers", "Peers the gateway's agent reported last, each with the endpoint its gateway sends to.", &["listener", "gateway"]),
            rehome_orders: counter(r, "wglb_rehome_orders_total", "Handshake orders for clients re-homed onto the gateway (their own gateway died), by result: sent to its agent, completed (the gateway started the handshake and the client completed it), failed (the agent refused the order, or the client did not answer), unsent (no agent attached, or its queue was full).", &["listener", "gateway", "result"]),
            rehome_order_seconds: {
                let opts = HistogramOpts::new("wglb_rehome_order_seconds", "From a handshake order's sending to its agent's answer (the client completed the handshake, or did not), pacing included: how long a re-homed client went without service after its session moved.").buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
                let vec = HistogramVec::new(opts, &["listener", "gateway"]).expect("valid metric");
                r.register(Box::new(vec.clone())).expect("unique metric");
                vec
            },
            registry,
        }
    }

    pub fn set_route_announced(&self, address: std::net::IpAddr, announced: bool) {
        self.route_announced
            .with_label_values(&[&address.to_string()])
            .set(announced as i64);
    }

    pub fn set_agent_attached(&self, listener: &str, gateway: &str, attached: bool) {
        self.agents_attached
            .with_label_values(&[listener, gateway])
            .set(attached as i64);
    }

    pub fn set_agent_peers(&self, listener: &str, gateway: &str, peers: usize) {
        self.agent_peers
            .with_label_values(&[listener, gateway])
            .set(peers as i64);
    }

    /// `result`: sent, completed, failed or unsent (see the metric's help).
    pub fn rehome_order(&self, listener: &str, gateway: &str, result: &str) {
        self.rehome_orders
            .with_label_values(&[listener, gateway, result])
            .inc();
    }

    pub fn rehome_order_answered(&self, listener: &str, gateway: &str, seconds: f64) {
        self.rehome_order_seconds
            .with_label_values(&[listener, gateway])
            .observe(seconds);
    }

    /// The sending side's metrics for one peer.
    pub fn sync_peer(&self, peer: &str) -> PeerSyncMetrics {
        PeerSyncMetrics {
            connected: self.sync_connected.with_label_values(&[peer]),
            queued: self.sync_queued.with_label_values(&[peer]),
            sent: self.sync_sent.with_label_values(&[peer]),
            dropped: self.sync_dropped.with_label_values(&[peer]),
            resyncs: self.sync_resyncs.with_label_values(&[peer]),
            lag: self.sync_lag.with_label_values(&[peer]),
        }
    }

    /// Counts what a peer's batch did here.
    pub fn sync_received(&self, peer: &str, applied: u32, refused: u32) {
        self.sync_received
            .with_label_values(&[peer, "applied"])
            .inc_by(applied as u64);
        self.sync_received
            .with_label_values(&[peer, "refused"])
            .inc_by(refused as u64);
    }

    /// The gauge of a listener's standby entries.
    pub fn sync_standby(&self, listener: &str) -> IntGauge {
        self.sync_standby.with_label_values(&[listener])
    }

    pub fn render(&self) -> String {
        wglb_probe::exposition::render(&self.registry)
    }

    pub fn listener(&self, listener: &str) -> ListenerCounters {
        let dropped = |direction: Direction, reason: DropReason| {
            self.dropped
                .with_label_values(&[listener, direction.as_str(), reason.as_str()])
        };
        ListenerCounters {
            junk_from_client: Junk::ALL
                .map(|j| dropped(Direction::ToGateway, DropReason::NotWireguard(j))),
            junk_from_gateway: Junk::ALL
                .map(|j| dropped(Direction::ToClient, DropReason::NotWireguard(j))),
            no_gateway: dropped(Direction::ToGateway, DropReason::NoGateway),
            upstream_unavailable: dropped(Direction::ToGateway, DropReason::UpstreamUnavailable),
            bad_mac1: dropped(Direction::ToGateway, DropReason::BadMac1),
            send_failed_to_gateway: dropped(Direction::ToGateway, DropReason::SendFailed),
            send_failed_to_client: dropped(Direction::ToClient, DropReason::SendFailed),
            evictions: EvictionReason::ALL
                .map(|r| self.evictions.with_label_values(&[listener, r.as_str()])),
            refused: Refusal::ALL.map(|r| dropped(Direction::ToGateway, DropReason::Refused(r))),
            failing_open: self.failing_open.with_label_values(&[listener]),
            unconfirmed: self.unconfirmed.with_label_values(&[listener]),
            confirmed: self.confirmed.with_label_values(&[listener]),
            client_path_changes: self.client_path_changes.with_label_values(&[listener]),
            index_collisions: self.index_collisions.with_label_values(&[listener]),
            retired_tuple: dropped(Direction::ToGateway, DropReason::RetiredTuple),
        }
    }

    /// A listener's admission figures as its counters hold them now (both datapaths add to them).
    pub fn admission(&self, listener: &str) -> AdmissionFigures {
        let refused = Refusal::ALL.map(|r| {
            self.dropped
                .with_label_values(&[listener, Direction::ToGateway.as_str(), r.as_str()])
                .get()
        });
        AdmissionFigures {
            unconfirmed: self.unconfirmed.with_label_values(&[listener]).get().max(0) as u64,
            refused,
        }
    }

    pub fn nat_drift(&self, drift: NatDrift) -> IntCounter {
        self.nat_drift.with_label_values(&[drift.as_str()])
    }

    pub fn gateway(&self, listener: &str, gateway: &str) -> GatewayCounters {
        let labels = |direction: Direction| [listener, gateway, direction.as_str()];
        let handshake = |message: MessageType| {
            self.handshakes
                .with_label_values(&[listener, gateway, message.as_str()])
        };
        GatewayCounters {
            packets_to_gateway: self
                .packets
                .with_label_values(&labels(Direction::ToGateway)),
            packets_to_client: self.packets.with_label_values(&labels(Direction::ToClient)),
            bytes_to_gateway: self.bytes.with_label_values(&labels(Direction::ToGateway)),
            bytes_to_client: self.bytes.with_label_values(&labels(Direction::ToClient)),
            initiations: handshake(MessageType::HandshakeInitiation),
            responses: handshake(MessageType::HandshakeResponse),
            cookies: handshake(MessageType::CookieReply),
            sessions: self.sessions.with_label_values(&[listener, gateway]),
            sessions_created: self
                .sessions_created
                .with_label_values(&[listener, gateway]),
            handshake_rtt: self.handshake_rtt.with_label_values(&[listener, gateway]),
            unreachable: self.unreachable.with_label_values(&[listener, gateway]),
        }
    }

    pub fn passive_waiting(&self, listener: &str, gateway: &str) -> IntGauge {
        self.passive_waiting.with_label_values(&[listener, gateway])
    }

    pub fn passive_ejections(&self, listener: &str, gateway: &str) -> IntCounter {
        self.passive_ejections
            .with_label_values(&[listener, gateway])
    }

    /// Mirrors a gateway's health and configured state.
    pub fn set_gateway(&self, listener: &str, gateway: &GatewayView) {
        for health in Health::ALL {
            self.gateway_health
                .with_label_values(&[listener, &gateway.name, health.as_str()])
                .set((gateway.health == health) as i64);
        }
        for state in [AdminState::Active, AdminState::Draining, AdminState::Down] {
            self.gateway_state
                .with_label_values(&[listener, &gateway.name, state.as_str()])
                .set((gateway.admin == state) as i64);
        }
    }

    /// Removes the series of a gateway that left the configuration.
    pub fn forget_gateway(&self, listener: &str, gateway: &str) {
        let _ = self.sessions.remove_label_values(&[listener, gateway]);
        for health in Health::ALL {
            let _ = self
                .gateway_health
                .remove_label_values(&[listener, gateway, health.as_str()]);
        }
        for state in [AdminState::Active, AdminState::Draining, AdminState::Down] {
            let _ = self
                .gateway_state
                .remove_label_values(&[listener, gateway, state.as_str()]);
        }
    }

    /// Mirrors one source's fresh verdict on a gateway; `None` when the source went silent.
    pub fn set_health_vote(&self, listener: &str, gateway: &str, source: &str, up: Option<bool>) {
        let labels = [listener, gateway, source];
        match up {
            Some(up) => self.health_votes.with_label_values(&labels).set(up as i64),
            None => {
                let _ = self.health_votes.remove_label_values(&labels);
            }
        }
    }

    pub fn set_fail_static(&self, listener: &str, gateway: &str, active: bool) {
        self.fail_static
            .with_label_values(&[listener, gateway])
            .set(active as i64);
    }

    pub fn forget_fail_static(&self, listener: &str, gateway: &str) {
        let _ = self.fail_static.remove_label_values(&[listener, gateway]);
    }

    pub fn health_report(&self, accepted: bool) {
        self.health_reports
            .with_label_values(&[if accepted { "accepted" } else { "refused" }])
            .inc();
    }

    pub fn dropped(&self, listener: &str, direction: Direction, reason: DropReason) -> IntCounter {
        self.dropped
            .with_label_values(&[listener, direction.as_str(), reason.as_str()])
    }

    pub fn set_datapath(&self, datapath: &str) {
        self.datapath.with_label_values(&[datapath]).set(1);
    }

    pub fn set_xdp_attached(&self, interface: &str, mode: &str) {
        self.xdp_attached
            .with_label_values(&[interface, mode])
            .set(1);
    }

    /// The XDP program answers `listener`'s clients on `address`, or no longer does.
    pub fn set_xdp_listener_address(&self, listener: &str, address: SocketAddr, served: bool) {
        let address = address.to_string();
        let labels = [listener, address.as_str()];
        if served {
            self.xdp_listener_addresses
                .with_label_values(&labels)
                .set(1);
        } else {
            let _ = self.xdp_listener_addresses.remove_label_values(&labels);
        }
    }

    pub fn set_xdp_ready(&self, listener: &str, gateway: &str, ready: Option<bool>) {
        let labels = [listener, gateway];
        match ready {
            Some(ready) => self.xdp_ready.with_label_values(&labels).set(ready as i64),
            None => {
                let _ = self.xdp_ready.remove_label_values(&labels);
            }
        }
    }

    pub fn xdp_passed(&self, listener: &str, reason: &str) -> IntCounter {
        self.xdp_passed.with_label_values(&[listener, reason])
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Session sync towards one peer.
#[derive(Clone)]
pub struct PeerSyncMetrics {
    pub connected: IntGauge,
    pub queued: IntGauge,
    pub sent: IntCounter,
    pub dropped: IntCounter,
    pub resyncs: IntCounter,
    pub lag: Gauge,
}

/// What `wglb status` shows of a listener's admission.
pub struct AdmissionFigures {
    pub unconfirmed: u64,
    /// Datagrams of refused new sessions, by [`Refusal::ALL`].
    refused: [u64; Refusal::ALL.len()],
}

impl AdmissionFigures {
    pub fn refused(&self, refusal: Refusal) -> u64 {
        Refusal::ALL
            .iter()
            .position(|r| *r == refusal)
            .map_or(0, |i| self.refused[i])
    }
}

pub struct ListenerCounters {
    junk_from_client: [IntCounter; 4],
    junk_from_gateway: [IntCounter; 4],
    pub no_gateway: IntCounter,
    pub upstream_unavailable: IntCounter,
    pub bad_mac1: IntCounter,
    pub send_failed_to_gateway: IntCounter,
    pub send_failed_to_client: IntCounter,
    evictions: [IntCounter; EvictionReason::ALL.len()],
    refused: [IntCounter; Refusal::ALL.len()],
    pub failing_open: IntGauge,
    pub unconfirmed: IntGauge,
    pub confirmed: IntCounter,
    pub client_path_changes: IntCounter,
    pub index_collisions: IntCounter,
    pub retired_tuple: IntCounter,
}

impl ListenerCounters {
    pub fn junk(&self, direction: Direction, junk: Junk) -> &IntCounter {
        let index = Junk::ALL.iter().position(|j| *j == junk).expect("listed");
        match direction {
            Direction::ToGateway => &self.junk_from_client[index],
            Direction::ToClient => &self.junk_from_gateway[index],
        }
    }

    pub fn refused(&self, refusal: Refusal) -> &IntCounter {
        &self.refused[Refusal::ALL
            .iter()
            .position(|r| *r == refusal)
            .expect("listed")]
    }

    pub fn eviction(&self, reason: EvictionReason) -> &IntCounter {
        &self.evictions[EvictionReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("listed")]
    }
}

pub struct GatewayCounters {
    pub packets_to_gateway: IntCounter,
    pub packets_to_client: IntCounter,
    pub bytes_to_gateway: IntCounter,
    pub bytes_to_client: IntCounter,
    pub initiations: IntCounter,
    pub responses: IntCounter,
    pub cookies: IntCounter,
    pub sessions: IntGauge,
    pub sessions_created: IntCounter,
    pub handshake_rtt: Histogram,
    pub unreachable: IntCounter,
}

/// Serves `GET /metrics` in Prometheus' text format, and `GET /ready`, on a bound socket.
pub async fn serve(
    socket: tokio::net::TcpListener,
    metrics: Metrics,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<()> {
    wglb_probe::exposition::serve(socket, metrics.registry, ready).await
}
