//! The first stage of the XDP fast path: parse Ethernet, IPv4/IPv6 and UDP, match the datagram
//! to a listener, and drop what is not WireGuard before it costs the kernel and userspace
//! anything, with the same shape check the userspace datapath applies
//! (`wglb_common::wireguard::classify_header`). What the program does not handle (not IP, not
//! UDP, IPv4 options, IPv6 extension headers, fragments, other ports) goes on to the kernel,
//! counted; WireGuard to a listener goes on to the userspace datapath.
//!
//! Sessions, placement and NAT in the kernel are the next stage (issue 4).

use core::mem::size_of;

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::{HashMap, PerCpuArray};
use aya_ebpf::programs::XdpContext;
use wglb_common::wireguard::classify_header;
use wglb_common::xdp::{ListenerKey, XdpCounter, MAX_LISTENER_ADDRS};

#[map]
static LISTENERS: HashMap<ListenerKey, u32> = HashMap::with_max_entries(MAX_LISTENER_ADDRS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(XdpCounter::COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
const IPPROTO_UDP: u8 = 17;
/// IPv6 next-header values that are extension headers rather than a transport.
const IPV6_FRAGMENT: u8 = 44;
const IPV6_EXTENSIONS: [u8; 6] = [0, 43, 50, 51, 60, 135];

#[xdp]
pub fn wglb(ctx: XdpContext) -> u32 {
    let (verdict, counter) = decide(&ctx);
    if let Some(count) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU: no other CPU writes this slot.
        unsafe { *count += 1 };
    }
    verdict
}

/// A pointer to `len` bytes at `offset`, if the packet has them: the check the verifier wants
/// before every read.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&[u8; N]> {
    let start = ctx.data();
    if start + offset + N > ctx.data_end() {
        return None;
    }
    Some(unsafe { &*((start + offset) as *const [u8; N]) })
}

#[inline(always)]
fn decide(ctx: &XdpContext) -> (u32, XdpCounter) {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;
    let Some(eth) = bytes::<ETH_HLEN>(ctx, 0) else {
        return (PASS, XdpCounter::NotIp);
    };
    let mut addr = [0u8; 16];
    let udp_offset = match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => {
            let Some(ip) = bytes::<IPV4_HLEN>(ctx, ETH_HLEN) else {
                return (PASS, XdpCounter::NotIp);
            };
            if ip[0] != 0x45 {
                return (PASS, XdpCounter::IpOptions);
            }
            // More-fragments flag or a fragment offset.
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
                return (PASS, XdpCounter::Fragment);
            }
            if ip[9] != IPPROTO_UDP {
                return (PASS, XdpCounter::NotUdp);
            }
            addr[10] = 0xff;
            addr[11] = 0xff;
            addr[12..16].copy_from_slice(&ip[16..20]);
            ETH_HLEN + IPV4_HLEN
        }
        ETH_P_IPV6 => {
            let Some(ip) = bytes::<IPV6_HLEN>(ctx, ETH_HLEN) else {
                return (PASS, XdpCounter::NotIp);
            };
            match ip[6] {
                IPPROTO_UDP => {}
                IPV6_FRAGMENT => return (PASS, XdpCounter::Fragment),
                next if IPV6_EXTENSIONS.contains(&next) => return (PASS, XdpCounter::IpOptions),
                _ => return (PASS, XdpCounter::NotUdp),
            }
            addr.copy_from_slice(&ip[24..40]);
            ETH_HLEN + IPV6_HLEN
        }
        _ => return (PASS, XdpCounter::NotIp),
    };
    let Some(udp) = bytes::<UDP_HLEN>(ctx, udp_offset) else {
        return (PASS, XdpCounter::NotUdp);
    };
    let key = ListenerKey {
        addr,
        port: [udp[2], udp[3]],
        pad: [0; 2],
    };
    if unsafe { LISTENERS.get(&key) }.is_none() {
        return (PASS, XdpCounter::NotListener);
    }
    // The UDP length, not the frame's: short frames carry Ethernet padding.
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    let payload = udp_offset + UDP_HLEN;
    if udp_len < UDP_HLEN || ctx.data() + udp_offset + udp_len > ctx.data_end() {
        return (DROP, XdpCounter::Malformed);
    }
    let len = udp_len - UDP_HLEN;
    let header = match bytes::<4>(ctx, payload) {
        Some(header) => *header,
        None => [0; 4],
    };
    match classify_header(header, len) {
        Ok(_) => (PASS, XdpCounter::WireguardPassed),
        Err(junk) => (DROP, XdpCounter::junk(junk)),
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

const _: () = assert!(size_of::<ListenerKey>() == 20);
