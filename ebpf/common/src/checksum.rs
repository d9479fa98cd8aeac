//! The Internet checksum arithmetic the XDP program uses when it rewrites addresses and ports:
//! incremental updates (RFC 1624) rather than a sum over the payload, which the program cannot
//! afford per packet. Here so that a property test can hold the incremental update to a full
//! recompute on the host.

/// Folds a 32-bit one's-complement sum into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Updates a one's-complement sum for the 16-bit words of `old` (a source then a destination of
/// equal length) becoming `source` then `destination`. `old` has an even length, twice that of
/// `source` and `destination`.
#[inline(always)]
pub fn replace(mut sum: u32, old: &[u8], source: &[u8], destination: &[u8]) -> u32 {
    let half = old.len() / 2;
    let mut i = 0;
    while i + 1 < old.len() {
        let before = u16::from_be_bytes([old[i], old[i + 1]]);
        let after = if i < half {
            u16::from_be_bytes([source[i], source[i + 1]])
        } else {
            u16::from_be_bytes([destination[i - half], destination[i - half + 1]])
        };
        sum += !before as u32;
        sum += after as u32;
        i += 2;
    }
    fold(sum) as u32
}

pub const IPV4_HLEN: usize = 20;

/// Recomputes an IPv4 header checksum (20 bytes, no options).
#[inline(always)]
pub fn ipv4_header(ip: &mut [u8; IPV4_HLEN]) {
    ip[10] = 0;
    ip[11] = 0;
    let mut sum = 0u32;
    let mut i = 0;
    while i < IPV4_HLEN {
        sum += u16::from_be_bytes([ip[i], ip[i + 1]]) as u32;
        i += 2;
    }
    let checksum = !fold(sum);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
}

/// The UDP checksum a rewrite leaves: `old` is the datagram's checksum field, `addresses` and
/// `ports` the (old, new) source+destination bytes. An IPv4 datagram sent without a checksum (0)
/// stays without one; a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
pub fn udp_after_rewrite(
    old: u16,
    ipv4: bool,
    addresses: (&[u8], &[u8], &[u8]),
    ports: (&[u8], &[u8], &[u8]),
) -> u16 {
    if ipv4 && old == 0 {
        return 0;
    }
    let mut sum = !old as u32;
    sum = replace(sum, addresses.0, addresses.1, addresses.2);
    sum = replace(sum, ports.0, ports.1, ports.2);
    match !fold(sum) {
        0 => 0xffff,
        checksum => checksum,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// The UDP checksum over the pseudo-header and the datagram, from scratch.
    fn udp_full(source: &[u8], destination: &[u8], udp: &[u8]) -> u16 {
        let mut data: Vec<u8> = Vec::new();
        data.extend_from_slice(source);
        data.extend_from_slice(destination);
        if source.len() == 4 {
            data.extend_from_slice(&[0, 17]);
            data.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        } else {
            data.extend_from_slice(&(udp.len() as u32).to_be_bytes());
            data.extend_from_slice(&[0, 0, 0, 17]);
        }
        let mut zeroed = udp.to_vec();
        zeroed[6] = 0;
        zeroed[7] = 0;
        data.extend_from_slice(&zeroed);
        if data.len() % 2 == 1 {
            data.push(0);
        }
        let mut sum = 0u32;
        for word in data.chunks(2) {
            sum += u16::from_be_bytes([word[0], word[1]]) as u32;
            sum = (sum & 0xffff) + (sum >> 16);
        }
        match !fold(sum) {
            0 => 0xffff,
            checksum => checksum,
        }
    }

    proptest::proptest! {
        /// Rewriting addresses and ports with the incremental update gives the checksum a full
        /// recompute gives, for IPv4 and IPv6 and any payload.
        #[test]
        fn incremental_update_matches_a_full_recompute(
            v6 in proptest::bool::ANY,
            old_addresses in proptest::collection::vec(proptest::num::u8::ANY, 32),
            new_addresses in proptest::collection::vec(proptest::num::u8::ANY, 32),
            old_ports in proptest::array::uniform4(proptest::num::u8::ANY),
            new_ports in proptest::array::uniform4(proptest::num::u8::ANY),
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
        ) {
            let width = if v6 { 16 } else { 4 };
            let (old_src, old_dst) = (&old_addresses[..width], &old_addresses[16..16 + width]);
            let (new_src, new_dst) = (&new_addresses[..width], &new_addresses[16..16 + width]);
            let mut udp = Vec::new();
            udp.extend_from_slice(&old_ports);
            udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            udp.extend_from_slice(&[0, 0]);
            udp.extend_from_slice(&payload);
            let before = udp_full(old_src, old_dst, &udp);
            let mut old_pair = Vec::new();
            old_pair.extend_from_slice(old_src);
            old_pair.extend_from_slice(old_dst);
            let updated = udp_after_rewrite(
                before,
                !v6,
                (&old_pair, new_src, new_dst),
                (&old_ports, &new_ports[..2], &new_ports[2..]),
            );
            udp[..4].copy_from_slice(&new_ports);
            proptest::prop_assert_eq!(updated, udp_full(new_src, new_dst, &udp));
        }

        /// A header whose checksum was recomputed sums to all ones, as a receiver checks it.
        #[test]
        fn ipv4_header_checksum_verifies(header in proptest::array::uniform20(proptest::num::u8::ANY)) {
            let mut header = header;
            ipv4_header(&mut header);
            let sum: u32 = header
                .chunks(2)
                .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
                .sum();
            proptest::prop_assert_eq!(fold(sum), 0xffff);
        }
    }

    #[test]
    fn a_datagram_without_a_checksum_stays_without_one() {
        let a = [10, 0, 0, 1, 10, 0, 0, 2];
        let b = [192, 0, 2, 1];
        let ports = [0, 1, 0, 2];
        assert_eq!(
            udp_after_rewrite(0, true, (&a, &b, &b), (&ports, &ports[..2], &ports[2..])),
            0
        );
    }
}
