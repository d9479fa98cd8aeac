//! The hashes both datapaths use to place a flow, and the control plane uses to build Maglev
//! permutations. They must never change between releases: several balancer instances (and a
//! restarted one) agree on placement only because they hash identically. MurmurHash3 (x86, 32-bit)
//! is used because it is well studied, has a fixed published output, and needs nothing but
//! multiplications and rotations, which the eBPF verifier accepts in a bounded loop.

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
fn mix_block(h: u32, block: u32) -> u32 {
    let k = block.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finalize(mut h: u32, len: usize) -> u32 {
    h ^= len as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// MurmurHash3_x86_32 of `data` with `seed`.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        h = mix_block(
            h,
            u32::from_le_bytes([block[0], block[1], block[2], block[3]]),
        );
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, byte) in tail.iter().enumerate() {
            k |= (*byte as u32) << (8 * i);
        }
        h ^= k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    }
    finalize(h, data.len())
}

/// Seed of the flow hash. Changing it re-places every session on every balancer.
pub const FLOW_HASH_SEED: u32 = 0x7767_6c62; // "wglb"

/// Length of a flow key: an IPv6 address (IPv4 as v4-mapped) and a port.
pub const FLOW_KEY_LEN: usize = 18;

/// Builds the bytes hashed for a client. IPv4 clients are written as v4-mapped IPv6 addresses so
/// both families go through one code path; `port` is 0 when the listener hashes by address only.
pub fn flow_key(ip: [u8; 16], port: u16) -> [u8; FLOW_KEY_LEN] {
    let mut key = [0u8; FLOW_KEY_LEN];
    key[..16].copy_from_slice(&ip);
    key[16..].copy_from_slice(&port.to_be_bytes());
    key
}

/// The hash that picks a client's Maglev slot (`flow_hash(..) % table_size`).
pub fn flow_hash(ip: [u8; 16], port: u16) -> u32 {
    murmur3_32(&flow_key(ip, port), FLOW_HASH_SEED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_published_murmur3_vectors() {
        // Reference values of MurmurHash3_x86_32 from its author's test suite and SMHasher.
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(b"", 0xffff_ffff), 0x81f1_6f39);
        assert_eq!(murmur3_32(&[0, 0, 0, 0], 0), 0x2362_f9de);
        assert_eq!(murmur3_32(b"aaaa", 0x9747_b28c), 0x5a97_808a);
        assert_eq!(murmur3_32(b"abc", 0), 0xb3dd_93fa);
        assert_eq!(murmur3_32(b"Hello, world!", 1234), 0xfaf6_cdb3);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog", 0x9747_b28c),
            0x2fa8_26cd
        );
    }

    #[test]
    fn port_matters_only_when_hashed() {
        let ip = [0u8; 16];
        assert_ne!(flow_hash(ip, 1), flow_hash(ip, 2));
        assert_eq!(flow_hash(ip, 0), flow_hash(ip, 0));
    }
}
