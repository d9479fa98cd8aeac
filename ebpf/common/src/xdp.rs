//! The XDP program's maps, as both sides see them: keys and values are `#[repr(C)]` with explicit
//! padding so the kernel, the program and userspace agree on every byte.

use crate::wireguard::Junk;

/// A listener's address as the program matches it: the destination address (IPv4 as an
/// IPv4-mapped IPv6 address) and port of a client's datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub addr: [u8; 16],
    /// Network byte order, as on the wire.
    pub port: [u8; 2],
    pub pad: [u8; 2],
}

/// Most listener addresses the program matches (a wildcard listener takes one per local address).
pub const MAX_LISTENER_ADDRS: u32 = 1024;

/// What the program counted, one slot of a per-CPU array each. The order is the map layout.
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
    /// WireGuard to a listener: passed to the userspace datapath.
    WireguardPassed,
}

impl XdpCounter {
    pub const COUNT: u32 = 11;
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
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // Plain bytes with no padding left implicit: safe to copy to and from the kernel.
    unsafe impl aya::Pod for super::ListenerKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_list_matches_the_layout() {
        for (index, counter) in XdpCounter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, index);
        }
        assert_eq!(core::mem::size_of::<ListenerKey>(), 20);
    }
}
