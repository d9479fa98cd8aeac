//! mac1 at the edge: every handshake initiation carries mac1 = MAC(HASH(LABEL_MAC1 || the
//! responder's static public key), the message up to mac1), keyed BLAKE2s with a 16-byte output.
//! The gateways' public key is public, so the balancer checks it without any secret and drops
//! forged or stray initiations before they reach a gateway. Written once for both datapaths:
//! the XDP program runs the same code over the packet (two BLAKE2s compressions per initiation,
//! the key's block being compressed once by userspace into [`Mac1Key`]).

/// BLAKE2s's initialisation vector (SHA-256's).
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];

/// WireGuard's label for mac1 keys.
pub const LABEL_MAC1: &[u8; 8] = b"mac1----";
/// Where mac1 sits in an initiation, and the message length it covers.
pub const MAC1_OFFSET: usize = 116;
pub const INITIATION_LEN: usize = 148;

/// BLAKE2s's working state for one block: the program keeps it in a per-CPU map, as its stack
/// frame has no room for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Blake2sWork {
    v: [u32; 16],
    m: [u32; 16],
}

/// A listener's mac1 key, after its key block: what the program needs per listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mac1Key {
    /// Non-zero when the listener checks mac1.
    pub enabled: u32,
    pub state: [u32; 8],
}

#[inline(always)]
fn mix(v: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize, x: u32, y: u32) {
    v[a] = v[a].wrapping_add(v[b]).wrapping_add(x);
    v[d] = (v[d] ^ v[a]).rotate_right(16);
    v[c] = v[c].wrapping_add(v[d]);
    v[b] = (v[b] ^ v[c]).rotate_right(12);
    v[a] = v[a].wrapping_add(v[b]).wrapping_add(y);
    v[d] = (v[d] ^ v[a]).rotate_right(8);
    v[c] = v[c].wrapping_add(v[d]);
    v[b] = (v[b] ^ v[c]).rotate_right(7);
}

/// One round, its message schedule (BLAKE2s's SIGMA row) written out: literal indices leave the
/// eBPF program no table to load and no bound to check.
macro_rules! round {
    ($v:ident, $m:ident, [$s0:literal, $s1:literal, $s2:literal, $s3:literal, $s4:literal, $s5:literal, $s6:literal, $s7:literal, $s8:literal, $s9:literal, $s10:literal, $s11:literal, $s12:literal, $s13:literal, $s14:literal, $s15:literal]) => {
        mix($v, 0, 4, 8, 12, $m[$s0], $m[$s1]);
        mix($v, 1, 5, 9, 13, $m[$s2], $m[$s3]);
        mix($v, 2, 6, 10, 14, $m[$s4], $m[$s5]);
        mix($v, 3, 7, 11, 15, $m[$s6], $m[$s7]);
        mix($v, 0, 5, 10, 15, $m[$s8], $m[$s9]);
        mix($v, 1, 6, 11, 12, $m[$s10], $m[$s11]);
        mix($v, 2, 7, 8, 13, $m[$s12], $m[$s13]);
        mix($v, 3, 4, 9, 14, $m[$s14], $m[$s15]);
    };
}

/// BLAKE2s's compression of the block in `work.m`, `t` bytes in so far. In the eBPF program a
/// function of its own, called twice.
#[cfg_attr(target_arch = "bpf", inline(never))]
fn compress(h: &mut [u32; 8], work: &mut Blake2sWork, t: u32, last: bool) {
    let Blake2sWork { v, m } = work;
    // Messages here are far below 4 GiB: the counter's high word stays 0.
    *v = [
        h[0],
        h[1],
        h[2],
        h[3],
        h[4],
        h[5],
        h[6],
        h[7],
        IV[0],
        IV[1],
        IV[2],
        IV[3],
        IV[4] ^ t,
        IV[5],
        if last { !IV[6] } else { IV[6] },
        IV[7],
    ];
    round!(v, m, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
    round!(v, m, [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3]);
    round!(v, m, [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4]);
    round!(v, m, [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8]);
    round!(v, m, [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13]);
    round!(v, m, [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9]);
    round!(v, m, [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11]);
    round!(v, m, [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10]);
    round!(v, m, [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5]);
    round!(v, m, [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0]);
    h[0] ^= v[0] ^ v[8];
    h[1] ^= v[1] ^ v[9];
    h[2] ^= v[2] ^ v[10];
    h[3] ^= v[3] ^ v[11];
    h[4] ^= v[4] ^ v[12];
    h[5] ^= v[5] ^ v[13];
    h[6] ^= v[6] ^ v[14];
    h[7] ^= v[7] ^ v[15];
}

/// Word `i` of a block that starts at `bytes[start]`, zero past `end` (BLAKE2s pads with zeros).
#[inline(always)]
fn word(bytes: &[u8], start: usize, end: usize, i: usize) -> u32 {
    let mut w = [0u8; 4];
    for (k, b) in w.iter_mut().enumerate() {
        let at = start + 4 * i + k;
        if at < end {
            *b = bytes.get(at).copied().unwrap_or(0);
        }
    }
    u32::from_le_bytes(w)
}

#[inline(always)]
fn block(m: &mut [u32; 16], bytes: &[u8], start: usize, end: usize) {
    for (i, w) in m.iter_mut().enumerate() {
        *w = word(bytes, start, end, i);
    }
}

/// BLAKE2s-256 of the concatenation of `parts` (at most 64 bytes in all): WireGuard's HASH for the
/// mac1 key.
fn hash_short(parts: &[&[u8]]) -> [u8; 32] {
    let mut buffer = [0u8; 64];
    let mut len = 0;
    for part in parts {
        buffer[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    let mut h = IV;
    h[0] ^= 0x0101_0000 ^ 32;
    let mut work = Blake2sWork::default();
    block(&mut work.m, &buffer, 0, len);
    compress(&mut h, &mut work, len as u32, true);
    let mut out = [0u8; 32];
    for (i, word) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&word.to_le_bytes());
    }
    out
}

impl Mac1Key {
    /// The mac1 key of a responder whose static public key is `public_key`, its key block
    /// compressed.
    pub fn new(public_key: &[u8; 32]) -> Mac1Key {
        let key = hash_short(&[LABEL_MAC1, public_key]);
        let mut state = IV;
        // Keyed (32-byte key), 16-byte output.
        state[0] ^= 0x0101_0000 ^ (32 << 8) ^ 16;
        let mut work = Blake2sWork::default();
        block(&mut work.m, &key, 0, 32);
        compress(&mut state, &mut work, 64, false);
        Mac1Key { enabled: 1, state }
    }

    /// The mac1 an initiation (its first [`MAC1_OFFSET`] bytes) must carry under this key, as
    /// little-endian words; `work` is scratch space.
    #[inline(always)]
    pub fn mac1(&self, initiation: &[u8; INITIATION_LEN], work: &mut Blake2sWork) -> [u32; 4] {
        let mut h = self.state;
        block(&mut work.m, initiation, 0, 64);
        compress(&mut h, work, 128, false);
        block(&mut work.m, initiation, 64, MAC1_OFFSET);
        compress(&mut h, work, 64 + MAC1_OFFSET as u32, true);
        [h[0], h[1], h[2], h[3]]
    }

    /// Whether an initiation's mac1 is right for this key.
    #[inline(always)]
    pub fn verifies(&self, initiation: &[u8; INITIATION_LEN], work: &mut Blake2sWork) -> bool {
        let h = self.mac1(initiation, work);
        block(&mut work.m, initiation, MAC1_OFFSET, MAC1_OFFSET + 16);
        let m = &work.m;
        (h[0] ^ m[0]) | (h[1] ^ m[1]) | (h[2] ^ m[2]) | (h[3] ^ m[3]) == 0
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use blake2::digest::{FixedOutput, KeyInit, Update};
    use blake2::{Blake2s256, Blake2sMac, Digest};
    use proptest::prelude::*;

    /// mac1 as the RustCrypto BLAKE2s computes it.
    fn reference(public_key: &[u8; 32], message: &[u8]) -> [u8; 16] {
        let key = Blake2s256::new()
            .chain_update(LABEL_MAC1)
            .chain_update(public_key)
            .finalize();
        let mut mac = Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(&key).unwrap();
        mac.update(message);
        mac.finalize_fixed().into()
    }

    fn with_mac1(key: &[u8; 32], body: &[u8; MAC1_OFFSET]) -> [u8; INITIATION_LEN] {
        let mut initiation = [0u8; INITIATION_LEN];
        initiation[..MAC1_OFFSET].copy_from_slice(body);
        initiation[MAC1_OFFSET..MAC1_OFFSET + 16].copy_from_slice(&reference(key, body));
        initiation
    }

    proptest! {
        #[test]
        fn agrees_with_a_reference_blake2s(key in any::<[u8; 32]>(), body in proptest::collection::vec(any::<u8>(), MAC1_OFFSET)) {
            let body: [u8; MAC1_OFFSET] = body.try_into().unwrap();
            let initiation = with_mac1(&key, &body);
            let mac1 = Mac1Key::new(&key);
            prop_assert!(mac1.verifies(&initiation, &mut Blake2sWork::default()));
            // Any flipped bit of the message or of mac1 fails it; mac2 is not covered.
            for at in [0, 4, 63, 64, 115, 116, 131] {
                let mut forged = initiation;
                forged[at] ^= 1;
                prop_assert!(!mac1.verifies(&forged, &mut Blake2sWork::default()), "bit flipped at {}", at);
            }
            let mut mac2 = initiation;
            mac2[140] ^= 1;
            prop_assert!(mac1.verifies(&mac2, &mut Blake2sWork::default()));
            let mut other = key;
            other[0] ^= 1;
            prop_assert!(!Mac1Key::new(&other).verifies(&initiation, &mut Blake2sWork::default()));
        }
    }

    #[test]
    fn hashes_like_blake2s_256() {
        let data = b"wglb";
        let expected: [u8; 32] = Blake2s256::digest(data).into();
        assert_eq!(hash_short(&[data]), expected);
    }
}
