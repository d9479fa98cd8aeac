//! The floors the XDP program's per-packet cost is measured against (`benches/xdp_cost.rs`).
//! `floor`: the least any full-NAT XDP balancer does to a packet. It parses Ethernet, IPv4 and
//! UDP, rewrites the MACs, destination address and port with an incremental checksum update,
//! and sends the frame back out (XDP_TX), with no lookups at all. `floor_session`: the same
//! plus what any balancer that keeps sessions adds, one lookup of the client's session in an
//! LRU hash map keyed and valued as wglb's, and a touch of its last-seen time.
//! `floor_listener_session`: the same after a lookup of the destination in a hash map of
//! listener addresses, as wglb finds the listener (whose index is part of the session key).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod floor {
    use aya_ebpf::bindings::xdp_action;
    use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
    use aya_ebpf::macros::{map, xdp};
    use aya_ebpf::maps::{HashMap, LruHashMap};
    use aya_ebpf::programs::XdpContext;
    use wglb_common::xdp::{Endpoint, FlowKey, ListenerInfo, Session, MAX_LISTENER_ADDRS};

    const NEW_ADDRESS: [u8; 4] = [10, 202, 0, 2];
    const NEW_PORT: [u8; 2] = 51820u16.to_be_bytes();

    /// As large as the benchmark makes wglb's SESSIONS.
    #[map]
    static FLOOR_SESSIONS: LruHashMap<FlowKey, Session> = LruHashMap::with_max_entries(65_536, 0);

    #[map]
    static FLOOR_LISTENERS: HashMap<Endpoint, ListenerInfo> =
        HashMap::with_max_entries(MAX_LISTENER_ADDRS, 0);

    #[xdp]
    pub fn floor(ctx: XdpContext) -> u32 {
        match udp_frame(&ctx) {
            Some(frame) => rewrite(frame),
            None => xdp_action::XDP_PASS,
        }
    }

    #[xdp]
    pub fn floor_session(ctx: XdpContext) -> u32 {
        match udp_frame(&ctx) {
            Some(frame) => session(frame, 0),
            None => xdp_action::XDP_PASS,
        }
    }

    #[xdp]
    pub fn floor_listener_session(ctx: XdpContext) -> u32 {
        let Some(frame) = udp_frame(&ctx) else {
            return xdp_action::XDP_PASS;
        };
        let listener = endpoint(&frame[30..34], [frame[36], frame[37]]);
        match unsafe { FLOOR_LISTENERS.get(&listener) } {
            Some(info) => session(frame, info.index),
            None => xdp_action::XDP_PASS,
        }
    }

    /// An IPv4 address and port as wglb keys them: the address mapped into IPv6.
    #[inline(always)]
    fn endpoint(v4: &[u8], port: [u8; 2]) -> Endpoint {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..16].copy_from_slice(v4);
        Endpoint {
            addr,
            port,
            pad: [0; 2],
        }
    }

    /// Finds and touches the client's session of `listener`, then forwards.
    #[inline(always)]
    fn session(frame: &mut [u8; 42], listener: u32) -> u32 {
        let key = FlowKey {
            listener,
            client: endpoint(&frame[26..30], [frame[34], frame[35]]),
        };
        let Some(session) = FLOOR_SESSIONS.get_ptr_mut(&key) else {
            return xdp_action::XDP_PASS;
        };
        unsafe { (*session).last_seen_ns = bpf_ktime_get_coarse_ns() };
        rewrite(frame)
    }

    /// Ethernet, IPv4 without options, UDP.
    #[inline(always)]
    fn udp_frame(ctx: &XdpContext) -> Option<&mut [u8; 42]> {
        let start = ctx.data();
        if start + 14 + 20 + 8 > ctx.data_end() {
            return None;
        }
        let frame = unsafe { &mut *(start as *mut [u8; 42]) };
        if frame[12..14] != [0x08, 0x00] || frame[14] != 0x45 || frame[23] != 17 {
            return None;
        }
        Some(frame)
    }

    #[inline(always)]
    fn rewrite(frame: &mut [u8; 42]) -> u32 {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&frame[0..6]);
        frame.copy_within(6..12, 0);
        frame[6..12].copy_from_slice(&mac);
        let mut sum = !u16::from_be_bytes([frame[40], frame[41]]) as u32;
        for i in [0usize, 2] {
            sum += !u16::from_be_bytes([frame[30 + i], frame[31 + i]]) as u32;
            sum += u16::from_be_bytes([NEW_ADDRESS[i], NEW_ADDRESS[i + 1]]) as u32;
        }
        sum += !u16::from_be_bytes([frame[36], frame[37]]) as u32;
        sum += u16::from_be_bytes(NEW_PORT) as u32;
        frame[30..34].copy_from_slice(&NEW_ADDRESS);
        frame[36..38].copy_from_slice(&NEW_PORT);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        frame[40..42].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        // The IPv4 header checksum, recomputed.
        frame[24] = 0;
        frame[25] = 0;
        let mut ip = 0u32;
        let mut i = 14;
        while i < 34 {
            ip += u16::from_be_bytes([frame[i], frame[i + 1]]) as u32;
            i += 2;
        }
        ip = (ip & 0xffff) + (ip >> 16);
        ip = (ip & 0xffff) + (ip >> 16);
        frame[24..26].copy_from_slice(&(!(ip as u16)).to_be_bytes());
        xdp_action::XDP_TX
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(no_mangle)]
    #[unsafe(link_section = "license")]
    pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
