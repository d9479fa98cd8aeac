//! The XDP program's maps, as both sides see them: keys and values are `#[repr(C)]` with explicit
//! padding so the kernel, the program and userspace agree on every byte.

use crate::admission::{AdmissionLimits, Refusal};
use crate::handshake::{HandshakeWait, RTT_BUCKETS};
use crate::wireguard::Junk;

/// An address and port as the program matches them: IPv4 as an IPv4-mapped IPv6 address, the
/// port in network byte order, as on the wire. Keys listener addresses (a client's destination)
/// and gateways (a reply's source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: [u8; 16],
    pub port: [u8; 2],
    pub pad: [u8; 2],
}

/// Most listeners; a listener's index (its place in the configuration) keys its sessions and its
/// rows of counters.
pub const MAX_LISTENERS: u32 = 64;
/// Most listener addresses the program matches (a wildcard listener takes one per local address).
pub const MAX_LISTENER_ADDRS: u32 = 1024;
/// Most gateways over all listeners; a gateway's index in the GATEWAYS array is its identity in
/// sessions, NAT entries and Maglev slots.
pub const MAX_GATEWAYS: u32 = 4096;

/// What the program needs to know about a listener address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerInfo {
    /// The listener's index: part of every session key.
    pub index: u32,
    /// Where the listener's Maglev table starts in the MAGLEV array, and its size.
    pub maglev_offset: u32,
    pub maglev_size: u32,
    /// 1 when the source port counts for placement (`hash_key = "source-ip-port"`).
    pub hash_port: u8,
    pub pad: [u8; 3],
    /// New sessions per source address: see [`crate::admission`].
    pub admission: AdmissionLimits,
}

/// A client's session key: the listener and the client's address and port. With the port
/// zeroed, it keys the client address's admission budget in SOURCES.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub listener: u32,
    pub client: Endpoint,
}

impl FlowKey {
    /// The key of this client address's admission budget.
    #[inline(always)]
    pub fn source(&self) -> FlowKey {
        FlowKey {
            listener: self.listener,
            client: Endpoint {
                addr: self.client.addr,
                port: [0; 2],
                pad: [0; 2],
            },
        }
    }
}

/// Source addresses whose admission budgets the program keeps (least recently used first out: a
/// forgotten source starts again with a full bucket, which only a flood from more addresses than
/// this can arrange, and which the probation bound still holds).
pub const MAX_SOURCES: u32 = 65_536;

/// A session: where a client's datagrams go and how its replies find the way back. Unconfirmed
/// sessions (their gateway has not answered yet) live in PROBATION, confirmed ones in SESSIONS;
/// a session is in one of them, never both.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    /// Index in GATEWAYS.
    pub gateway: u32,
    /// The source port datagrams to the gateway leave from (network order); the NAT map leads
    /// replies to it back to this session. The session owns its NAT entry: only its own removal
    /// frees it.
    pub nat_port: [u8; 2],
    /// The client's (or its router's) MAC and ours, and the interface the client came in on, as
    /// of its latest packet: replies go back the same way.
    pub client_mac: [u8; 6],
    pub local_mac: [u8; 6],
    /// Non-zero once `index` holds the receiver index the gateway chose in its latest handshake
    /// message: announced to sync peers with the session, so that they route its rebound tuples
    /// too.
    pub indexed: u8,
    pub pad: u8,
    pub ifindex: u32,
    /// The address the client sent to, as of its latest packet: replies come from it.
    pub listener: Endpoint,
    pub index: u32,
    /// Last packet either way, to the second (bpf_ktime_get_coarse_ns, CLOCK_MONOTONIC_COARSE),
    /// for idle expiry by userspace.
    pub last_seen_ns: u64,
    /// The client's latest initiation and whether it waits for an answer, for passive health.
    pub handshake: HandshakeWait,
    /// Non-zero for a session opened by a rebinding: a new source tuple routed by its receiver
    /// index, `rebind_index`. Once its gateway answers, the old tuple's session is retired.
    pub rebinding: u32,
    pub rebind_index: u32,
}

/// A learned receiver index, by listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IndexKey {
    pub listener: u32,
    pub index: u32,
}

/// Whose a learned receiver index is: the gateway that chose it and the session it was learned
/// on (`crate::index`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub client: FlowKey,
    pub gateway: u32,
    /// Non-zero: two gateways claimed it.
    pub collided: u32,
    /// Coarse ns.
    pub learned_ns: u64,
}

impl IndexEntry {
    /// What the shared decisions (`crate::index`) read of it.
    #[inline(always)]
    pub fn held(&self) -> crate::index::Held {
        crate::index::Held {
            gateway: self.gateway,
            collided: self.collided != 0,
            learned_ns: self.learned_ns,
        }
    }
}

/// Source tuples retired by a rebinding that the program remembers (what still arrives from
/// them is dropped for [`RETIRED_FOR_NS`]).
pub const MAX_RETIRED: u32 = 65_536;
/// Long enough for what was in flight on the old mapping.
pub const RETIRED_FOR_NS: u64 = 10_000_000_000;

/// A gateway as the program forwards to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gateway {
    pub endpoint: Endpoint,
    /// Our address towards the gateway (the NAT source address).
    pub source: [u8; 16],
    /// The next hop's MAC and ours on the interface towards it.
    pub next_hop_mac: [u8; 6],
    pub local_mac: [u8; 6],
    pub ifindex: u32,
    /// [`GATEWAY_KEEPS`] while its sessions may continue (active or draining, and up or
    /// failing open); without it, its sessions are evicted and placed again.
    /// [`GATEWAY_READY`] once userspace knows the next hop's MAC: until then the program passes
    /// the gateway's traffic to the userspace datapath, whose sends make the kernel resolve it.
    pub flags: u32,
}

pub const GATEWAY_KEEPS: u32 = 1;
pub const GATEWAY_READY: u32 = 2;

/// What the program forwarded for one gateway, per CPU: the same figures the userspace datapath
/// counts per gateway, read into the same metrics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayTraffic {
    pub packets_to_gateway: u64,
    /// UDP payload bytes, as userspace counts them.
    pub bytes_to_gateway: u64,
    pub packets_to_client: u64,
    pub bytes_to_client: u64,
    pub initiations: u64,
    pub responses: u64,
    pub cookies: u64,
    pub sessions_created: u64,
    /// Handshake round trips by [`crate::handshake::rtt_bucket`].
    pub rtt_buckets: [u64; RTT_BUCKETS],
    /// ICMP port unreachable from the gateway for a session's datagram.
    pub unreachable: u64,
}

/// A NAT entry's key: a gateway and the source port its datagrams leave from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub gateway: u32,
    pub nat_port: [u8; 2],
    pub pad: [u8; 2],
}

/// Indices in the CONFIG array.
pub const CONFIG_NAT_FIRST_PORT: u32 = 0;
pub const CONFIG_NAT_PORTS: u32 = 1;
pub const CONFIG_LEN: u32 = 2;
/// NAT ports tried for a new session before giving up (linear probing from the flow's hash).
pub const NAT_PROBES: u32 = 8;

/// Rows of the COUNTERS array: row 0 for packets of no listener, then two per listener, for
/// packets from its clients and from its gateways.
pub const COUNTER_ROWS: u32 = 1 + 2 * MAX_LISTENERS;

/// The COUNTERS slot of `counter` for packets of `listener` (`None`: of no listener) in a
/// direction.
#[inline(always)]
pub const fn counter_slot(listener: Option<u32>, from_gateway: bool, counter: XdpCounter) -> u32 {
    let row = match listener {
        None => 0,
        Some(index) => 1 + 2 * index + from_gateway as u32,
    };
    row * XdpCounter::COUNT + counter as u32
}

/// What the program counted: one row of these per listener and direction in a per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XdpCounter {
    /// Not IPv4 or IPv6 (ARP, VLAN-tagged, ...): passed to the kernel.
    NotIp,
    /// IP but not UDP: passed.
    NotUdp,
    /// IPv4 options or IPv6 extension headers: passed, for the kernel or userspace to handle.
    IpOptions,
    /// A fragment: passed, for the kernel to reassemble.
    Fragment,
    /// UDP to no listener: passed.
    NotListener,
    /// UDP to a listener whose length field disagrees with the packet: dropped.
    Malformed,
    JunkTruncated,
    JunkUnknownType,
    JunkReservedNotZero,
    JunkBadLength,
    /// WireGuard to a listener that the program does not forward (client and gateway of
    /// different families): passed to the userspace datapath.
    WireguardPassed,
    /// Forwarded to a gateway.
    ToGateway,
    /// A reply forwarded to a client.
    ToClient,
    SessionCreated,
    /// A session whose gateway no longer keeps sessions, evicted and placed again.
    GatewayGone,
    /// No gateway takes new sessions: dropped.
    NoGateway,
    /// No free NAT port within the probes: dropped.
    NatPortsExhausted,
    /// From a gateway to a port with no session: passed (the kernel or userspace may own it).
    ReplyNoSession,
    /// A NAT entry whose session is gone: removed, the datagram dropped.
    StaleNat,
    /// The next hop is another interface, and the redirect helper refused: dropped.
    RedirectFailed,
    /// WireGuard for a gateway whose next hop's MAC userspace does not know yet: passed to the
    /// userspace datapath.
    NextHopUnknown,
    /// A new session refused: its source opened new sessions faster than its rate. Dropped.
    SourceRate,
    /// A new session refused: its source has its cap of unconfirmed sessions. Dropped.
    SourceUnconfirmed,
    /// An unconfirmed session's gateway answered: the session moved to SESSIONS.
    SessionConfirmed,
    /// A NAT port whose session had gone (pushed out of its LRU map) was taken by a new session.
    NatReclaimed,
    /// A client's MAC, interface or listener address changed: its replies follow the new one.
    ClientPathChanged,
    /// From a gateway to a NAT port, but not to our address towards that gateway: passed.
    ReplyOtherDestination,
    /// A handshake initiation whose mac1 is wrong for the listener's public key: dropped.
    BadMac1,
    /// A gateway chose an index another gateway holds: it routes nothing.
    IndexCollision,
    /// A rebound tuple's session was confirmed: the old tuple's session retired.
    Rebound,
    /// From a tuple retired by a rebinding: dropped.
    RetiredTuple,
}

impl XdpCounter {
    pub const COUNT: u32 = 31;
    pub const ALL: [XdpCounter; Self::COUNT as usize] = [
        XdpCounter::NotIp,
        XdpCounter::NotUdp,
        XdpCounter::IpOptions,
        XdpCounter::Fragment,
        XdpCounter::NotListener,
        XdpCounter::Malformed,
        XdpCounter::JunkTruncated,
        XdpCounter::JunkUnknownType,
        XdpCounter::JunkReservedNotZero,
        XdpCounter::JunkBadLength,
        XdpCounter::WireguardPassed,
        XdpCounter::ToGateway,
        XdpCounter::ToClient,
        XdpCounter::SessionCreated,
        XdpCounter::GatewayGone,
        XdpCounter::NoGateway,
        XdpCounter::NatPortsExhausted,
        XdpCounter::ReplyNoSession,
        XdpCounter::StaleNat,
        XdpCounter::RedirectFailed,
        XdpCounter::NextHopUnknown,
        XdpCounter::SourceRate,
        XdpCounter::SourceUnconfirmed,
        XdpCounter::SessionConfirmed,
        XdpCounter::NatReclaimed,
        XdpCounter::ClientPathChanged,
        XdpCounter::ReplyOtherDestination,
        XdpCounter::BadMac1,
        XdpCounter::IndexCollision,
        XdpCounter::Rebound,
        XdpCounter::RetiredTuple,
    ];

    /// The counter of a kind of junk: the same kinds the userspace filter counts.
    #[inline(always)]
    pub const fn junk(junk: Junk) -> XdpCounter {
        match junk {
            Junk::Truncated => XdpCounter::JunkTruncated,
            Junk::UnknownType => XdpCounter::JunkUnknownType,
            Junk::ReservedNotZero => XdpCounter::JunkReservedNotZero,
            Junk::BadLength => XdpCounter::JunkBadLength,
        }
    }

    /// The counter of a refused new session.
    #[inline(always)]
    pub const fn refusal(refusal: Refusal) -> XdpCounter {
        match refusal {
            Refusal::SourceRate => XdpCounter::SourceRate,
            Refusal::SourceUnconfirmed => XdpCounter::SourceUnconfirmed,
        }
    }

    /// The label of the metric the counter is read into: the same label the userspace datapath
    /// counts the same event under.
    pub const fn as_str(self) -> &'static str {
        match self {
            XdpCounter::NotIp => "not_ip",
            XdpCounter::NotUdp => "not_udp",
            XdpCounter::IpOptions => "ip_options",
            XdpCounter::Fragment => "fragment",
            XdpCounter::NotListener => "not_listener",
            XdpCounter::Malformed => "malformed",
            XdpCounter::JunkTruncated => "not_wireguard_truncated",
            XdpCounter::JunkUnknownType => "not_wireguard_unknown_type",
            XdpCounter::JunkReservedNotZero => "not_wireguard_reserved_not_zero",
            XdpCounter::JunkBadLength => "not_wireguard_bad_length",
            XdpCounter::WireguardPassed => "wireguard_passed",
            XdpCounter::ToGateway => "to_gateway",
            XdpCounter::ToClient => "to_client",
            XdpCounter::SessionCreated => "session_created",
            XdpCounter::GatewayGone => "gateway_gone",
            XdpCounter::NoGateway => "no_gateway",
            XdpCounter::NatPortsExhausted => "nat_ports_exhausted",
            XdpCounter::ReplyNoSession => "reply_no_session",
            XdpCounter::StaleNat => "stale_session",
            XdpCounter::RedirectFailed => "send_failed",
            XdpCounter::NextHopUnknown => "next_hop_unknown",
            XdpCounter::SourceRate => Refusal::SourceRate.as_str(),
            XdpCounter::SourceUnconfirmed => Refusal::SourceUnconfirmed.as_str(),
            XdpCounter::SessionConfirmed => "session_confirmed",
            XdpCounter::NatReclaimed => "nat_reclaimed",
            XdpCounter::ClientPathChanged => "client_path_changed",
            XdpCounter::ReplyOtherDestination => "reply_other_destination",
            XdpCounter::BadMac1 => "bad_mac1",
            XdpCounter::IndexCollision => "index_collision",
            XdpCounter::Rebound => "rebound",
            XdpCounter::RetiredTuple => "retired_tuple",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // Plain bytes with no padding left implicit: safe to copy to and from the kernel.
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::ListenerInfo {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Session {}
    unsafe impl aya::Pod for super::Gateway {}
    unsafe impl aya::Pod for super::NatKey {}
    unsafe impl aya::Pod for super::GatewayTraffic {}
    unsafe impl aya::Pod for crate::admission::SourceBudget {}
    unsafe impl aya::Pod for crate::mac1::Mac1Key {}
    unsafe impl aya::Pod for super::IndexKey {}
    unsafe impl aya::Pod for super::IndexEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_list_matches_the_layout() {
        for (index, counter) in XdpCounter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, index);
        }
        // No implicit padding: every byte is a field.
        assert_eq!(core::mem::size_of::<Endpoint>(), 20);
        assert_eq!(core::mem::size_of::<ListenerInfo>(), 32);
        assert_eq!(core::mem::size_of::<FlowKey>(), 24);
        assert_eq!(core::mem::size_of::<Session>(), 80);
        assert_eq!(core::mem::size_of::<Gateway>(), 56);
        assert_eq!(core::mem::size_of::<NatKey>(), 8);
        assert_eq!(core::mem::size_of::<GatewayTraffic>(), 224);
        assert_eq!(core::mem::size_of::<crate::admission::SourceBudget>(), 24);
        assert_eq!(core::mem::size_of::<crate::mac1::Mac1Key>(), 36);
        assert_eq!(core::mem::size_of::<IndexEntry>(), 40);
        assert_eq!(
            counter_slot(Some(MAX_LISTENERS - 1), true, XdpCounter::RetiredTuple),
            COUNTER_ROWS * XdpCounter::COUNT - 1
        );
    }
}
