//! The XDP fast path. For each frame: parse Ethernet, IPv4/IPv6 and UDP; drop what is not
//! WireGuard with the same shape check the userspace datapath applies
//! (`wglb_common::wireguard::classify_header`); then either
//! - a client's datagram to a listener: find its session (or place it by the listener's Maglev
//!   table, which userspace computes, admit it against its source's budget and take a NAT
//!   port), rewrite it to go from our address and the session's NAT port to its gateway, and send
//!   it on; or
//! - a gateway's reply to one of our NAT ports: find the session (confirming it if it was still
//!   unconfirmed), rewrite it to come from the address the client sent to, and send it back the
//!   way the client's latest packet came.
//!
//! New sessions start unconfirmed in PROBATION, a bounded LRU map of their own, and move to
//! SESSIONS when their gateway answers (`wglb_common::admission`): a flood of shaped datagrams
//! from spoofed sources churns PROBATION and never pushes a confirmed session out.
//!
//! Everything else (not IP, not UDP, IPv4 options, IPv6 extension headers, fragments, other
//! ports, clients and gateways of different families) goes on to the kernel, counted. Policy
//! (which gateway may take or keep sessions) is in the maps userspace fills; this program only
//! executes it.

use core::mem::size_of;

use aya_ebpf::bindings::{xdp_action, BPF_EXIST, BPF_F_NO_PREALLOC, BPF_NOEXIST};
use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_redirect};
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray};
use aya_ebpf::programs::XdpContext;
use wglb_common::admission::SourceBudget;
use wglb_common::checksum::{ipv4_header, udp_after_rewrite};
use wglb_common::handshake::{rtt_bucket, HandshakeWait};
use wglb_common::hash::flow_hash;
use wglb_common::index::{index_at, learn, receiver_offset, routes, sender_offset, Learn};
use wglb_common::mac1::{Blake2sWork, Mac1Key, INITIATION_LEN};
use wglb_common::session::{confirms, needs_admission, on_client_datagram, ClientAction, Found};
use wglb_common::wireguard::{classify_header, MessageType};
use wglb_common::xdp::{
    counter_slot, Endpoint, FlowKey, Gateway, GatewayTraffic, IndexEntry, IndexKey, ListenerInfo,
    NatKey, Session, XdpCounter, CONFIG_LEN, CONFIG_NAT_FIRST_PORT, CONFIG_NAT_PORTS, COUNTER_ROWS,
    GATEWAY_KEEPS, GATEWAY_READY, MAX_GATEWAYS, MAX_LISTENERS, MAX_LISTENER_ADDRS, MAX_RETIRED,
    MAX_SOURCES, NAT_PROBES, RETIRED_FOR_NS,
};

#[map]
static LISTENERS: HashMap<Endpoint, ListenerInfo> =
    HashMap::with_max_entries(MAX_LISTENER_ADDRS, 0);

/// Gateways by index; sessions, NAT entries and Maglev slots refer to them by it.
#[map]
static GATEWAYS: Array<Gateway> = Array::with_max_entries(MAX_GATEWAYS, 0);

/// Gateway index by address, to recognise replies.
#[map]
static GATEWAY_INDEX: HashMap<Endpoint, u32> = HashMap::with_max_entries(MAX_GATEWAYS, 0);

/// Every listener's Maglev table, one after the other: gateway index + 1, 0 for no gateway.
/// Userspace sizes it at load time.
#[map]
static MAGLEV: Array<u32> = Array::with_max_entries(1, 0);

/// Confirmed sessions by client; sized by userspace from the table size. When full, a newly
/// confirmed session pushes out the least recently used confirmed one.
#[map]
static SESSIONS: LruHashMap<FlowKey, Session> = LruHashMap::with_max_entries(1, 0);

/// Unconfirmed sessions by client; sized by userspace from the probation size. Only other
/// unconfirmed sessions compete for it.
#[map]
static PROBATION: LruHashMap<FlowKey, Session> = LruHashMap::with_max_entries(1, 0);

/// Where a new session is put together before it is stored: on the stack it would take a sixth
/// of the 512 bytes the program's calls share.
#[map]
static NEW_SESSION: PerCpuArray<Session> = PerCpuArray::with_max_entries(1, 0);

/// Admission budgets by listener and client address (`FlowKey::source`).
#[map]
static SOURCES: LruHashMap<FlowKey, SourceBudget> = LruHashMap::with_max_entries(MAX_SOURCES, 0);

/// Gateway index by client, for clients whose session a peer balancer forwarded (session sync):
/// a client without a session here is placed on its pinned gateway instead of by Maglev, and the
/// pin goes once the session exists. Sized by userspace like SESSIONS, but allocated as pins come
/// (most balancers hold few or none), not up front.
#[map]
static PINS: HashMap<FlowKey, u32> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

/// Which session a NAT port of a gateway belongs to. Not an LRU map: nothing may evict a live
/// session's entry. Its owner removes it; an entry whose owner is gone (pushed out of its LRU
/// map) is taken over by the next session that probes that port, or removed by userspace's
/// sweep. Userspace sizes it with room for those.
#[map]
static NAT: HashMap<NatKey, FlowKey> = HashMap::with_max_entries(1, 0);

/// Receiver indices learned from gateways' handshakes, by listener and index
/// (`wglb_common::index`). Sized by userspace like SESSIONS.
#[map]
static INDICES: LruHashMap<IndexKey, IndexEntry> = LruHashMap::with_max_entries(1, 0);

/// Source tuples whose session a rebinding retired, and when.
#[map]
static RETIRED: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(MAX_RETIRED, 0);

/// Each listener's mac1 key, by listener index: initiations whose mac1 is wrong are dropped.
#[map]
static MAC1: Array<Mac1Key> = Array::with_max_entries(MAX_LISTENERS, 0);

/// The mac1 check's BLAKE2s state, per CPU.
#[map]
static MAC1_WORK: PerCpuArray<Blake2sWork> = PerCpuArray::with_max_entries(1, 0);

#[map]
static CONFIG: Array<u32> = Array::with_max_entries(CONFIG_LEN, 0);

/// [`XdpCounter`]s by listener and direction (`counter_slot`).
#[map]
static COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(COUNTER_ROWS * XdpCounter::COUNT, 0);

/// What was forwarded, by gateway index.
#[map]
static TRAFFIC: PerCpuArray<GatewayTraffic> = PerCpuArray::with_max_entries(MAX_GATEWAYS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_HLEN: usize = wglb_common::checksum::IPV4_HLEN;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
const IPPROTO_UDP: u8 = 17;
/// IPv6 next-header values that are extension headers rather than a transport.
const IPV6_FRAGMENT: u8 = 44;
const IPV6_EXTENSIONS: [u8; 6] = [0, 43, 50, 51, 60, 135];

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;
const TX: u32 = xdp_action::XDP_TX;

/// Not an XDP action: `decide`'s answer for an initiation to a listener that checks mac1, which
/// the entry point checks before deciding again.
const CHECK_MAC1: u32 = u32::MAX;
/// Nor this: `decide`'s answer for a datagram to no listener, which may be a gateway's reply.
const NOT_A_CLIENTS: u32 = u32::MAX - 1;

/// The entry point keeps a small stack frame and makes the calls: a client's datagram
/// (`decide`), a gateway's (`reply`), the BLAKE2s of the mac1 check, each in a call of its own
/// beside the others, never on top of another's frame (the kernel allows 512 bytes for the
/// deepest chain of calls, and each of the two paths needs most of it).
#[xdp]
pub fn wglb(ctx: XdpContext) -> u32 {
    let (mut verdict, mut counter, mut row) = unpack(decide(&ctx, false));
    if verdict == NOT_A_CLIENTS {
        (verdict, counter, row) = unpack(reply(&ctx));
    }
    if counter == XdpCounter::NotUdp {
        // Still the kernel's: only noted.
        note_refusal(ctx.ctx as usize);
    }
    if verdict == CHECK_MAC1 {
        (verdict, counter) = if mac1_verifies(&ctx, row.listener.unwrap_or(0)) {
            let (verdict, counter, _) = unpack(decide(&ctx, true));
            (verdict, counter)
        } else {
            (DROP, XdpCounter::BadMac1)
        };
    }
    count(row, counter);
    verdict
}

/// `decide`'s answer in one register: BPF functions return one.
#[inline(always)]
fn pack(verdict: u32, counter: XdpCounter, row: Row) -> u64 {
    let listener = match row.listener {
        Some(index) => (index as u64) << 1 | 1,
        None => 0,
    };
    verdict as u64 | (counter as u64) << 32 | listener << 40 | (row.from_gateway as u64) << 63
}

#[inline(always)]
fn unpack(packed: u64) -> (u32, XdpCounter, Row) {
    let counter = (packed >> 32) as u8 as usize;
    let listener = (packed >> 40) as u32 & 0x7f_ffff;
    let row = Row {
        listener: (listener & 1 != 0).then_some(listener >> 1),
        from_gateway: packed >> 63 != 0,
    };
    let counter = XdpCounter::ALL
        .get(counter)
        .copied()
        .unwrap_or(XdpCounter::Malformed);
    (packed as u32, counter, row)
}

/// Whose counters a packet moves: a listener's (from its clients or its gateways), or none.
#[derive(Clone, Copy)]
struct Row {
    listener: Option<u32>,
    from_gateway: bool,
}

const NO_LISTENER: Row = Row {
    listener: None,
    from_gateway: false,
};

/// `N` bytes at `offset`, if the packet has them: the check the verifier wants before a read.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<*mut [u8; N]> {
    let start = ctx.data();
    if start + offset + N > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut [u8; N])
}

/// Where a frame's headers are, once parsed.
struct Headers {
    /// IPv4 (else IPv6); the IP header is right after Ethernet's.
    ipv4: bool,
    udp: usize,
    /// The UDP header's length field.
    udp_len: usize,
    source: Endpoint,
    destination: Endpoint,
}

#[inline(always)]
fn endpoint(addr: [u8; 16], port: [u8; 2]) -> Endpoint {
    Endpoint {
        addr,
        port,
        pad: [0; 2],
    }
}

#[inline(always)]
fn mapped(v4: &[u8]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12] = v4[0];
    addr[13] = v4[1];
    addr[14] = v4[2];
    addr[15] = v4[3];
    addr
}

#[inline(always)]
fn is_mapped(addr: &[u8; 16]) -> bool {
    addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Headers, XdpCounter> {
    let eth = unsafe { &*bytes::<ETH_HLEN>(ctx, 0).ok_or(XdpCounter::NotIp)? };
    let (ipv4, source, destination) = match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => {
            let ip = unsafe { &*bytes::<IPV4_HLEN>(ctx, ETH_HLEN).ok_or(XdpCounter::NotIp)? };
            if ip[0] != 0x45 {
                return Err(XdpCounter::IpOptions);
            }
            // More-fragments flag or a fragment offset.
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
                return Err(XdpCounter::Fragment);
            }
            if ip[9] != IPPROTO_UDP {
                return Err(XdpCounter::NotUdp);
            }
            (true, mapped(&ip[12..16]), mapped(&ip[16..20]))
        }
        ETH_P_IPV6 => {
            let ip = unsafe { &*bytes::<IPV6_HLEN>(ctx, ETH_HLEN).ok_or(XdpCounter::NotIp)? };
            match ip[6] {
                IPPROTO_UDP => {}
                IPV6_FRAGMENT => return Err(XdpCounter::Fragment),
                next if IPV6_EXTENSIONS.contains(&next) => return Err(XdpCounter::IpOptions),
                _ => return Err(XdpCounter::NotUdp),
            }
            let mut source = [0u8; 16];
            source.copy_from_slice(&ip[8..24]);
            let mut destination = [0u8; 16];
            destination.copy_from_slice(&ip[24..40]);
            (false, source, destination)
        }
        _ => return Err(XdpCounter::NotIp),
    };
    let udp_offset = ETH_HLEN + if ipv4 { IPV4_HLEN } else { IPV6_HLEN };
    let udp = unsafe { &*bytes::<UDP_HLEN>(ctx, udp_offset).ok_or(XdpCounter::NotUdp)? };
    Ok(Headers {
        ipv4,
        udp: udp_offset,
        udp_len: u16::from_be_bytes([udp[4], udp[5]]) as usize,
        source: endpoint(source, [udp[0], udp[1]]),
        destination: endpoint(destination, [udp[2], udp[3]]),
    })
}

/// Drops what is not WireGuard, counted by kind; the UDP length, not the frame's, is the
/// payload's (short frames carry Ethernet padding).
#[inline(always)]
fn check_wireguard(ctx: &XdpContext, headers: &Headers) -> Result<MessageType, XdpCounter> {
    let udp_len = headers.udp_len;
    if udp_len < UDP_HLEN || ctx.data() + headers.udp + udp_len > ctx.data_end() {
        return Err(XdpCounter::Malformed);
    }
    let header = match bytes::<4>(ctx, headers.udp + UDP_HLEN) {
        Some(header) => unsafe { *header },
        None => [0; 4],
    };
    classify_header(header, udp_len - UDP_HLEN).map_err(XdpCounter::junk)
}

/// A client's datagram to a listener (see `wglb`). `mac1_checked`: an initiation's mac1 has been
/// verified.
#[inline(never)]
fn decide(ctx: &XdpContext, mac1_checked: bool) -> u64 {
    let (verdict, counter, row) = decide_inline(ctx, mac1_checked);
    pack(verdict, counter, row)
}

#[inline(always)]
fn decide_inline(ctx: &XdpContext, mac1_checked: bool) -> (u32, XdpCounter, Row) {
    let headers = match parse(ctx) {
        Ok(headers) => headers,
        Err(counter) => return (PASS, counter, NO_LISTENER),
    };
    let Some(listener) = (unsafe { LISTENERS.get(&headers.destination) }) else {
        return (NOT_A_CLIENTS, XdpCounter::NotListener, NO_LISTENER);
    };
    let listener = *listener;
    let row = Row {
        listener: Some(listener.index),
        from_gateway: false,
    };
    let (verdict, counter) = match check_wireguard(ctx, &headers) {
        Ok(MessageType::HandshakeInitiation)
            if !mac1_checked && MAC1.get(listener.index).is_some_and(|k| k.enabled != 0) =>
        {
            (CHECK_MAC1, XdpCounter::BadMac1)
        }
        Ok(kind) => from_client(ctx, &headers, &listener, kind, row),
        Err(junk) => (DROP, junk),
    };
    (verdict, counter, row)
}

/// A datagram to no listener: a gateway's reply to one of our NAT ports, or someone else's (see
/// `wglb`).
#[inline(never)]
fn reply(ctx: &XdpContext) -> u64 {
    let (verdict, counter, row) = reply_inline(ctx);
    pack(verdict, counter, row)
}

#[inline(always)]
fn reply_inline(ctx: &XdpContext) -> (u32, XdpCounter, Row) {
    let headers = match parse(ctx) {
        Ok(headers) => headers,
        Err(counter) => return (PASS, counter, NO_LISTENER),
    };
    if let Some(&index) = unsafe { GATEWAY_INDEX.get(&headers.source) } {
        // Only what a gateway sends to our own address towards it is a reply of ours: the same
        // port on another local address (or routed through us) belongs to someone else.
        let ours = gateway(index).is_some_and(|g| g.source == headers.destination.addr);
        if !ours {
            return (PASS, XdpCounter::ReplyOtherDestination, NO_LISTENER);
        }
        let nat = NatKey {
            gateway: index,
            nat_port: headers.destination.port,
            pad: [0; 2],
        };
        let Some(flow) = (unsafe { NAT.get(&nat) }) else {
            return (PASS, XdpCounter::ReplyNoSession, NO_LISTENER);
        };
        let flow = *flow;
        let row = Row {
            listener: Some(flow.listener),
            from_gateway: true,
        };
        let (verdict, counter) = match check_wireguard(ctx, &headers) {
            Ok(kind) => from_gateway(ctx, &headers, &nat, &flow, kind, row),
            Err(junk) => (DROP, junk),
        };
        return (verdict, counter, row);
    }
    (PASS, XdpCounter::NotListener, NO_LISTENER)
}

#[inline(always)]
fn gateway(index: u32) -> Option<Gateway> {
    GATEWAYS.get(index).copied()
}

#[inline(always)]
fn config(index: u32) -> u32 {
    CONFIG.get(index).copied().unwrap_or(0)
}

#[inline(always)]
fn nat_key(session: &Session) -> NatKey {
    NatKey {
        gateway: session.gateway,
        nat_port: session.nat_port,
        pad: [0; 2],
    }
}

/// Removes a session's NAT entry if it is still the session's own.
#[inline(always)]
fn release_nat(key: &FlowKey, session: &Session) {
    let nat = nat_key(session);
    if unsafe { NAT.get(&nat) }.is_some_and(|owner| owner == key) {
        let _ = NAT.remove(&nat);
    }
}

/// Whether a NAT entry's session still holds it: the NAT key of `owner`'s session, in either map.
#[inline(always)]
fn holds(owner: &FlowKey, nat: &NatKey) -> bool {
    let session = match unsafe { SESSIONS.get(owner) } {
        Some(session) => Some(session),
        None => unsafe { PROBATION.get(owner) },
    };
    session.is_some_and(|s| s.gateway == nat.gateway && s.nat_port == nat.nat_port)
}

/// An unconfirmed session leaves probation: its source may open another.
#[inline(always)]
fn settle(key: &FlowKey) {
    if let Some(budget) = SOURCES.get_ptr_mut(&key.source()) {
        unsafe { (*budget).settled() };
    }
}

/// Follows the client's latest packet: the MACs and interface it came by, and the address it was
/// sent to, so replies go back the way it comes now (another router after a failover upstream,
/// another interface, another address of a wildcard listener).
#[inline(always)]
fn follow(ctx: &XdpContext, headers: &Headers, session: &mut Session, row: Row) {
    let Some(eth) = bytes::<12>(ctx, 0) else {
        return;
    };
    let eth = unsafe { &*eth };
    let ifindex = ctx.ingress_ifindex() as u32;
    if eth[6..12] == session.client_mac
        && eth[0..6] == session.local_mac
        && ifindex == session.ifindex
        && headers.destination == session.listener
    {
        return;
    }
    session.client_mac.copy_from_slice(&eth[6..12]);
    session.local_mac.copy_from_slice(&eth[0..6]);
    session.ifindex = ifindex;
    session.listener = headers.destination;
    count(row, XdpCounter::ClientPathChanged);
}

#[inline(always)]
fn from_client(
    ctx: &XdpContext,
    headers: &Headers,
    listener: &ListenerInfo,
    kind: MessageType,
    row: Row,
) -> (u32, XdpCounter) {
    let key = FlowKey {
        listener: listener.index,
        client: headers.source,
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut evicted = false;
    let (found, confirmed) = match SESSIONS.get_ptr_mut(&key) {
        Some(session) => (Some(session), true),
        None => (PROBATION.get_ptr_mut(&key), false),
    };
    if let Some(session) = found {
        let session = unsafe { &mut *session };
        let gateway = gateway(session.gateway);
        let keeps = gateway.is_some_and(|g| g.flags & GATEWAY_KEEPS != 0);
        // The program holds no peers' sessions (those are pins) and confirms on replies.
        let found = Found {
            keeps,
            standby: false,
            confirmed,
            answered: false,
        };
        match (on_client_datagram(found), gateway) {
            (ClientAction::Replace, _) | (_, None) => {
                release_nat(&key, session);
                if confirmed {
                    let _ = SESSIONS.remove(&key);
                } else {
                    let _ = PROBATION.remove(&key);
                    settle(&key);
                }
                evicted = true;
            }
            (_, Some(gateway)) => {
                if gateway.flags & GATEWAY_READY == 0 {
                    return (PASS, XdpCounter::NextHopUnknown);
                }
                touch(session, now);
                follow(ctx, headers, session, row);
                if kind == MessageType::HandshakeInitiation {
                    session.handshake.initiate(unsafe { bpf_ktime_get_ns() });
                }
                return to_gateway(
                    ctx,
                    headers,
                    session.gateway,
                    &gateway,
                    session.nat_port,
                    kind,
                );
            }
        }
    }
    if unsafe { RETIRED.get(&key) }.is_some_and(|at| now.wrapping_sub(*at) < RETIRED_FOR_NS) {
        return (DROP, XdpCounter::RetiredTuple);
    }
    let hash_port = if listener.hash_port != 0 {
        u16::from_be_bytes(headers.source.port)
    } else {
        0
    };
    let hash = flow_hash(headers.source.addr, hash_port);
    // A pinned client goes where its peer-forwarded session went, even to a gateway that takes
    // no new sessions (draining), as long as it keeps its own.
    let pinned = unsafe { PINS.get(&key) }
        .copied()
        .and_then(|index| gateway(index).map(|g| (index, g)))
        .filter(|(_, g)| g.flags & GATEWAY_KEEPS != 0);
    // A datagram whose receiver index is known goes to that index's gateway: a new tuple of a
    // live session (a rebinding), or this tuple's own session, gone from the table (pushed out,
    // or relayed by userspace until now).
    let carried = receiver_offset(kind).and_then(|offset| {
        let header = bytes::<12>(ctx, headers.udp + UDP_HLEN)?;
        Some(index_at(unsafe { &*header }, offset))
    });
    let known = carried.map_or(0, |index| known_index(&key, index, now));
    let (index, gateway) = match pinned {
        Some(pinned) => pinned,
        None if known != 0 => match gateway(known_gateway(known)) {
            Some(gateway) => (known_gateway(known), gateway),
            None => return (DROP, XdpCounter::NoGateway),
        },
        None => {
            if listener.maglev_size == 0 {
                return (DROP, XdpCounter::NoGateway);
            }
            let slot = listener.maglev_offset + hash % listener.maglev_size;
            let entry = MAGLEV.get(slot).copied().unwrap_or(0);
            let Some(placed) = entry
                .checked_sub(1)
                .and_then(|index| gateway(index).map(|g| (index, g)))
            else {
                return (DROP, XdpCounter::NoGateway);
            };
            placed
        }
    };
    if headers.ipv4 != is_mapped(&gateway.endpoint.addr) {
        // Rewriting between families means resizing headers: the userspace datapath does it.
        return (PASS, XdpCounter::WireguardPassed);
    }
    if gateway.flags & GATEWAY_READY == 0 {
        return (PASS, XdpCounter::NextHopUnknown);
    }
    // A peer balancer's session was confirmed there: it skips probation. Anything else is a new
    // session that must be admitted against its source's budget first.
    // A pinned client's session is its own: another tuple's index does not rebind it.
    let rebinds = known & KNOWN_REBOUND != 0;
    let indexed = known != 0 && known_gateway(known) == index && !(rebinds && pinned.is_some());
    let rebound = indexed && rebinds;
    let Some(session) = NEW_SESSION.get_ptr_mut(0) else {
        return (PASS, XdpCounter::WireguardPassed);
    };
    let session = unsafe { &mut *session };
    let admitted = needs_admission(pinned.is_some());
    if admitted {
        if let Err(refused) = admit(&key, listener, now) {
            return (DROP, refused);
        }
    }
    let Some(nat_port) = take_nat_port(&key, index, hash, row) else {
        if admitted {
            settle(&key);
        }
        return (DROP, XdpCounter::NatPortsExhausted);
    };
    let Some(eth) = bytes::<12>(ctx, 0) else {
        return (PASS, XdpCounter::NotIp);
    };
    let eth = unsafe { &*eth };
    session.gateway = index;
    session.nat_port = nat_port;
    session.client_mac.copy_from_slice(&eth[6..12]);
    session.local_mac.copy_from_slice(&eth[0..6]);
    session.indexed = indexed as u8;
    session.pad = 0;
    session.ifindex = ctx.ingress_ifindex() as u32;
    session.listener = headers.destination;
    session.index = if indexed { known as u32 } else { 0 };
    session.last_seen_ns = now;
    session.handshake = HandshakeWait::default();
    if kind == MessageType::HandshakeInitiation {
        session.handshake.initiate(unsafe { bpf_ktime_get_ns() });
    }
    session.rebinding = rebound as u32;
    session.rebind_index = if rebound { known as u32 } else { 0 };
    let stored = if admitted {
        PROBATION.insert(&key, &*session, 0)
    } else {
        SESSIONS.insert(&key, &*session, 0)
    };
    if stored.is_err() {
        release_nat(&key, session);
        if admitted {
            settle(&key);
        }
        return (DROP, XdpCounter::NatPortsExhausted);
    }
    if pinned.is_some() {
        let _ = PINS.remove(&key);
    }
    let (verdict, counter) = to_gateway(ctx, headers, index, &gateway, nat_port, kind);
    if counter == XdpCounter::ToGateway {
        // The forward counts as a forward; a new session and an eviction are counted here.
        count(row, XdpCounter::SessionCreated);
        if let Some(traffic) = TRAFFIC.get_ptr_mut(index) {
            unsafe { (*traffic).sessions_created += 1 };
        }
        if evicted {
            count(row, XdpCounter::GatewayGone);
        }
    }
    (verdict, counter)
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const ICMP_HLEN: usize = 8;

/// An ICMP port unreachable from a gateway about a datagram one of our sessions sent it: nothing
/// listens on its WireGuard port, and the session's client waits in vain (passive health). A
/// call of its own (see `wglb`), given the context as a number: given a reference, the compiler
/// passes the packet's bounds instead, which the verifier then refuses to widen.
#[inline(never)]
fn note_refusal(ctx: usize) {
    let ctx = &XdpContext::new(ctx as *mut _);
    let Some(eth) = bytes::<ETH_HLEN>(ctx, 0) else {
        return;
    };
    let eth = unsafe { &*eth };
    // The ICMP header's offset, and the quoted datagram's source and destination.
    let (icmp, ours, theirs, udp) = match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => {
            let Some(ip) = bytes::<IPV4_HLEN>(ctx, ETH_HLEN) else {
                return;
            };
            let ip = unsafe { &*ip };
            if ip[0] != 0x45 || ip[9] != IPPROTO_ICMP {
                return;
            }
            let icmp = ETH_HLEN + IPV4_HLEN;
            let Some(quoted) = bytes::<IPV4_HLEN>(ctx, icmp + ICMP_HLEN) else {
                return;
            };
            let quoted = unsafe { &*quoted };
            if quoted[0] != 0x45 || quoted[9] != IPPROTO_UDP {
                return;
            }
            let udp = icmp + ICMP_HLEN + IPV4_HLEN;
            (icmp, mapped(&quoted[12..16]), mapped(&quoted[16..20]), udp)
        }
        ETH_P_IPV6 => {
            let Some(ip) = bytes::<IPV6_HLEN>(ctx, ETH_HLEN) else {
                return;
            };
            if unsafe { (*ip)[6] } != IPPROTO_ICMPV6 {
                return;
            }
            let icmp = ETH_HLEN + IPV6_HLEN;
            let Some(quoted) = bytes::<IPV6_HLEN>(ctx, icmp + ICMP_HLEN) else {
                return;
            };
            let quoted = unsafe { &*quoted };
            if quoted[6] != IPPROTO_UDP {
                return;
            }
            let mut ours = [0u8; 16];
            ours.copy_from_slice(&quoted[8..24]);
            let mut theirs = [0u8; 16];
            theirs.copy_from_slice(&quoted[24..40]);
            (icmp, ours, theirs, icmp + ICMP_HLEN + IPV6_HLEN)
        }
        _ => return,
    };
    // Destination unreachable, port unreachable: ICMP 3/3, ICMPv6 1/4.
    let Some(kind) = bytes::<2>(ctx, icmp) else {
        return;
    };
    let kind = unsafe { *kind };
    if kind != [3, 3] && kind != [1, 4] {
        return;
    }
    let Some(ports) = bytes::<4>(ctx, udp) else {
        return;
    };
    let ports = unsafe { *ports };
    let Some(&index) = (unsafe { GATEWAY_INDEX.get(&endpoint(theirs, [ports[2], ports[3]])) })
    else {
        return;
    };
    if !gateway(index).is_some_and(|g| g.source == ours) {
        return;
    }
    let nat = NatKey {
        gateway: index,
        nat_port: [ports[0], ports[1]],
        pad: [0; 2],
    };
    let Some(flow) = (unsafe { NAT.get(&nat) }) else {
        return;
    };
    let session = match SESSIONS.get_ptr_mut(flow) {
        Some(session) => Some(session),
        None => PROBATION.get_ptr_mut(flow),
    };
    let Some(session) = session else {
        return;
    };
    let session = unsafe { &mut *session };
    if session.gateway != nat.gateway || session.nat_port != nat.nat_port {
        return;
    }
    session.handshake.refused(unsafe { bpf_ktime_get_ns() });
    if let Some(traffic) = TRAFFIC.get_ptr_mut(index) {
        // Per-CPU: no other CPU writes this entry.
        unsafe { (*traffic).unreachable += 1 };
    }
}

/// Whether an initiation to `listener` passes its mac1 check. A call of its own (see `wglb`).
#[inline(never)]
fn mac1_verifies(ctx: &XdpContext, listener: u32) -> bool {
    let (Ok(headers), Some(key), Some(work)) =
        (parse(ctx), MAC1.get(listener), MAC1_WORK.get_ptr_mut(0))
    else {
        return false;
    };
    match bytes::<INITIATION_LEN>(ctx, headers.udp + UDP_HLEN) {
        Some(initiation) => key.verifies(unsafe { &*initiation }, unsafe { &mut *work }),
        None => false,
    }
}

/// [`known_index`]'s answer, in one register: 0 for none, else this bit, the index in the low
/// half and the gateway (< MAX_GATEWAYS) above it.
const KNOWN: u64 = 1 << 63;
/// Learned on another tuple, whose session still lives on that gateway: a rebinding. Else
/// learned on this very tuple.
const KNOWN_REBOUND: u64 = 1 << 62;

#[inline(always)]
fn known_gateway(known: u64) -> u32 {
    (known >> 32) as u32 & 0xffff
}

/// For a datagram from a tuple without a session, carrying receiver index `index`: where the
/// index leads (packed, see [`KNOWN`]; 0 for nowhere), if it routes (`wglb_common::index::routes`)
/// and was learned on this tuple, or on another whose session still lives on the index's
/// gateway.
#[inline(always)]
fn known_index(key: &FlowKey, index: u32, now: u64) -> u64 {
    let listener = key.listener;
    let Some(entry) = (unsafe { INDICES.get(&IndexKey { listener, index }) }) else {
        return 0;
    };
    let keeps = gateway(entry.gateway).is_some_and(|g| g.flags & GATEWAY_KEEPS != 0);
    if !routes(entry.held(), keeps, now) {
        return 0;
    }
    let rebound = entry.client != *key;
    if rebound
        && unsafe { SESSIONS.get(&entry.client) }.is_none_or(|old| old.gateway != entry.gateway)
    {
        return 0;
    }
    let rebound = if rebound { KNOWN_REBOUND } else { 0 };
    KNOWN | rebound | (entry.gateway as u64) << 32 | index as u64
}

/// A gateway's handshake message carries the index it chose for this session: learned, unless
/// another gateway holds it. The index, if the session holds it now.
#[inline(always)]
fn learn_index(
    ctx: &XdpContext,
    headers: &Headers,
    flow: &FlowKey,
    gateway: u32,
    offset: usize,
    row: Row,
) -> Option<u32> {
    let header = bytes::<12>(ctx, headers.udp + UDP_HLEN)?;
    let key = IndexKey {
        listener: flow.listener,
        index: index_at(unsafe { &*header }, offset),
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let held = unsafe { INDICES.get(&key) }.map(IndexEntry::held);
    let taken = match learn(held, gateway, now) {
        Learn::Take => true,
        Learn::Collide => {
            count(row, XdpCounter::IndexCollision);
            false
        }
        Learn::Collided => return None,
    };
    let entry = IndexEntry {
        client: *flow,
        gateway,
        collided: !taken as u32,
        learned_ns: now,
    };
    let _ = INDICES.insert(&key, &entry, 0);
    taken.then_some(key.index)
}

/// A rebound tuple's session is confirmed (its gateway roamed to it): the old tuple's session
/// goes, what still comes from the old tuple is dropped for a while, and the index is the new
/// tuple's.
#[inline(always)]
fn retire_rebound(flow: &FlowKey, session: &Session, row: Row) {
    let key = IndexKey {
        listener: flow.listener,
        index: session.rebind_index,
    };
    let Some(entry) = INDICES.get_ptr_mut(&key) else {
        return;
    };
    let entry = unsafe { &mut *entry };
    if entry.client == *flow || entry.gateway != session.gateway {
        return;
    }
    let old = entry.client;
    entry.client = *flow;
    if let Some(gone) = unsafe { SESSIONS.get(&old) } {
        if gone.gateway == session.gateway {
            release_nat(&old, gone);
            let _ = SESSIONS.remove(&old);
            let now = unsafe { bpf_ktime_get_coarse_ns() };
            let _ = RETIRED.insert(&old, &now, 0);
            count(row, XdpCounter::Rebound);
        }
    }
}

/// Takes a token of the client address's budget for a new unconfirmed session.
#[inline(always)]
fn admit(key: &FlowKey, listener: &ListenerInfo, now: u64) -> Result<(), XdpCounter> {
    let source = key.source();
    let limits = &listener.admission;
    if let Some(budget) = SOURCES.get_ptr_mut(&source) {
        return unsafe { (*budget).admit(now, limits) }.map_err(XdpCounter::refusal);
    }
    let mut budget = SourceBudget::new(now, limits);
    budget.admit(now, limits).map_err(XdpCounter::refusal)?;
    // Another CPU may have added it meanwhile: either copy will do.
    let _ = SOURCES.insert(&source, &budget, 0);
    Ok(())
}

/// A NAT port of gateway `index` for the session of `key`: the first of a few ports, probed from
/// a point that depends on the client, that is free or whose owner is gone.
#[inline(always)]
fn take_nat_port(key: &FlowKey, index: u32, hash: u32, row: Row) -> Option<[u8; 2]> {
    let first = config(CONFIG_NAT_FIRST_PORT);
    let ports = config(CONFIG_NAT_PORTS);
    if ports == 0 {
        return None;
    }
    // From a point that depends on the client's port too: with `hash_key = "source-ip"` every
    // client behind one address has the same placement hash, and would otherwise contend for
    // the same few ports.
    let start = hash ^ (u16::from_be_bytes(key.client.port) as u32).wrapping_mul(0x9e37_79b1);
    for probe in 0..NAT_PROBES {
        let port = (first + start.wrapping_add(probe) % ports) as u16;
        let nat = NatKey {
            gateway: index,
            nat_port: port.to_be_bytes(),
            pad: [0; 2],
        };
        // NOEXIST: a port another session holds is not taken from it.
        if NAT.insert(&nat, key, BPF_NOEXIST as u64).is_ok() {
            return Some(nat.nat_port);
        }
        let orphaned = unsafe { NAT.get(&nat) }.is_some_and(|owner| !holds(owner, &nat));
        if orphaned && NAT.insert(&nat, key, BPF_EXIST as u64).is_ok() {
            count(row, XdpCounter::NatReclaimed);
            return Some(nat.nat_port);
        }
    }
    None
}

#[inline(always)]
fn from_gateway(
    ctx: &XdpContext,
    headers: &Headers,
    nat: &NatKey,
    flow: &FlowKey,
    kind: MessageType,
    row: Row,
) -> (u32, XdpCounter) {
    let (found, confirmed) = match SESSIONS.get_ptr_mut(flow) {
        Some(session) => (Some(session), true),
        None => (PROBATION.get_ptr_mut(flow), false),
    };
    // A port whose session is gone, or that its session no longer uses: the entry waits for
    // the next session to take it over, or for userspace's sweep.
    let Some(session) = found else {
        return (DROP, XdpCounter::StaleNat);
    };
    let session = unsafe { &mut *session };
    if session.gateway != nat.gateway || session.nat_port != nat.nat_port {
        return (DROP, XdpCounter::StaleNat);
    }
    touch(session, unsafe { bpf_ktime_get_coarse_ns() });
    let round_trip = match kind {
        MessageType::HandshakeResponse | MessageType::CookieReply => {
            session.handshake.answer(unsafe { bpf_ktime_get_ns() })
        }
        _ => None,
    };
    let to = Rewrite {
        source: session.listener,
        destination: flow.client,
        source_mac: session.local_mac,
        destination_mac: session.client_mac,
    };
    let ifindex = session.ifindex;
    // A handshake response or data from the gateway confirms the session: the gateway holds
    // keys for this client. A cookie reply does not: gateways under load send one to any
    // initiation with a valid mac1, which anyone who knows the public key can compute.
    if let Some(offset) = sender_offset(kind) {
        if let Some(index) = learn_index(ctx, headers, flow, nat.gateway, offset, row) {
            session.index = index;
            session.indexed = 1;
        }
    }
    if !confirmed && confirms(kind) {
        let mut copy = *session;
        copy.rebinding = 0;
        if SESSIONS.insert(flow, &copy, BPF_NOEXIST as u64).is_ok() {
            let _ = PROBATION.remove(flow);
            settle(flow);
            count(row, XdpCounter::SessionConfirmed);
            if session.rebinding != 0 {
                retire_rebound(flow, session, row);
            }
        }
    }
    let sent = send(ctx, headers, &to, ifindex, XdpCounter::ToClient);
    if sent.1 == XdpCounter::ToClient {
        if let Some(traffic) = TRAFFIC.get_ptr_mut(nat.gateway) {
            // Per-CPU: no other CPU writes this entry.
            let traffic = unsafe { &mut *traffic };
            traffic.packets_to_client += 1;
            traffic.bytes_to_client += (headers.udp_len - UDP_HLEN) as u64;
            match kind {
                MessageType::HandshakeResponse => traffic.responses += 1,
                MessageType::CookieReply => traffic.cookies += 1,
                _ => {}
            }
            if let Some(ns) = round_trip {
                if let Some(bucket) = traffic.rtt_buckets.get_mut(rtt_bucket(ns)) {
                    *bucket += 1;
                }
            }
        }
    }
    sent
}

/// Notes activity for idle expiry. Idle timeouts are minutes, so a write per second is plenty,
/// and skipping the rest keeps a busy session's cache line clean across CPUs.
#[inline(always)]
fn touch(session: &mut Session, now: u64) {
    if now.wrapping_sub(session.last_seen_ns) > 1_000_000_000 {
        session.last_seen_ns = now;
    }
}

#[inline(always)]
fn count(row: Row, counter: XdpCounter) {
    let slot = counter_slot(row.listener, row.from_gateway, counter);
    if let Some(count) = COUNTERS.get_ptr_mut(slot) {
        // Per-CPU: no other CPU writes this slot.
        unsafe { *count += 1 };
    }
}

/// What a frame's addresses become.
struct Rewrite {
    source: Endpoint,
    destination: Endpoint,
    source_mac: [u8; 6],
    destination_mac: [u8; 6],
}

#[inline(always)]
fn to_gateway(
    ctx: &XdpContext,
    headers: &Headers,
    index: u32,
    gateway: &Gateway,
    nat_port: [u8; 2],
    kind: MessageType,
) -> (u32, XdpCounter) {
    let to = Rewrite {
        source: endpoint(gateway.source, nat_port),
        destination: gateway.endpoint,
        source_mac: gateway.local_mac,
        destination_mac: gateway.next_hop_mac,
    };
    let sent = send(ctx, headers, &to, gateway.ifindex, XdpCounter::ToGateway);
    if sent.1 == XdpCounter::ToGateway {
        if let Some(traffic) = TRAFFIC.get_ptr_mut(index) {
            // Per-CPU: no other CPU writes this entry.
            let traffic = unsafe { &mut *traffic };
            traffic.packets_to_gateway += 1;
            traffic.bytes_to_gateway += (headers.udp_len - UDP_HLEN) as u64;
            if kind == MessageType::HandshakeInitiation {
                traffic.initiations += 1;
            }
        }
    }
    sent
}

/// Rewrites the frame's MACs, addresses and ports with checksums updated, and sends it out of
/// `ifindex`: back out of the interface it came in on (XDP_TX), or redirected to another.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    headers: &Headers,
    to: &Rewrite,
    ifindex: u32,
    counter: XdpCounter,
) -> (u32, XdpCounter) {
    let Some(eth) = bytes::<12>(ctx, 0) else {
        return (PASS, XdpCounter::NotIp);
    };
    let eth = unsafe { &mut *eth };
    eth[0..6].copy_from_slice(&to.destination_mac);
    eth[6..12].copy_from_slice(&to.source_mac);
    let Some(udp) = bytes::<UDP_HLEN>(ctx, headers.udp) else {
        return (PASS, XdpCounter::NotUdp);
    };
    let udp = unsafe { &mut *udp };
    let old_checksum = u16::from_be_bytes([udp[6], udp[7]]);
    let ports = (&udp[0..4], &to.source.port[..], &to.destination.port[..]);
    let checksum = if headers.ipv4 {
        let Some(ip) = bytes::<IPV4_HLEN>(ctx, ETH_HLEN) else {
            return (PASS, XdpCounter::NotIp);
        };
        let ip = unsafe { &mut *ip };
        let checksum = udp_after_rewrite(
            old_checksum,
            true,
            (
                &ip[12..20],
                &to.source.addr[12..16],
                &to.destination.addr[12..16],
            ),
            ports,
        );
        ip[12..16].copy_from_slice(&to.source.addr[12..16]);
        ip[16..20].copy_from_slice(&to.destination.addr[12..16]);
        ipv4_header(ip);
        checksum
    } else {
        let Some(ip) = bytes::<IPV6_HLEN>(ctx, ETH_HLEN) else {
            return (PASS, XdpCounter::NotIp);
        };
        let ip = unsafe { &mut *ip };
        let checksum = udp_after_rewrite(
            old_checksum,
            false,
            (&ip[8..40], &to.source.addr, &to.destination.addr),
            ports,
        );
        ip[8..24].copy_from_slice(&to.source.addr);
        ip[24..40].copy_from_slice(&to.destination.addr);
        checksum
    };
    udp[0..2].copy_from_slice(&to.source.port);
    udp[2..4].copy_from_slice(&to.destination.port);
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
    if ifindex == ctx.ingress_ifindex() as u32 {
        return (TX, counter);
    }
    let verdict = unsafe { bpf_redirect(ifindex, 0) } as u32;
    if verdict == xdp_action::XDP_REDIRECT {
        (verdict, counter)
    } else {
        (DROP, XdpCounter::RedirectFailed)
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves the program never gets here.
    loop {}
}

// The program's license: GPL-compatible, so it may use every helper.
#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

const _: () = assert!(size_of::<Endpoint>() == 20);
