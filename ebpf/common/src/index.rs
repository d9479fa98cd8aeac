//! Receiver indices: following a client whose NAT mapping changed. Each side of a WireGuard
//! session picks a random 32-bit index, and the client's messages carry the one its gateway
//! picked, which the balancer learns from the gateway's handshake response (or from an
//! initiation the gateway starts). A datagram from a source tuple without a session whose
//! receiver index is known goes to that index's gateway, on a new upstream path of its own; the
//! balancer moves nothing because of it: if it authenticates, the gateway roams to the new path
//! and its answers confirm it (see ../shared/notes/wireguard.md, "Roaming"). Decided here once
//! for the userspace relay and the XDP program.

use crate::wireguard::MessageType;

/// REJECT_AFTER_TIME: no keypair, so no index, is used longer after its handshake.
pub const INDEX_LIFETIME_NS: u64 = 180_000_000_000;

/// Where a client's message carries the receiver index (its gateway's), if it has one. An
/// initiation has none: a new handshake is placed like a new client.
#[inline(always)]
pub fn receiver_offset(kind: MessageType) -> Option<usize> {
    match kind {
        MessageType::TransportData | MessageType::CookieReply => Some(4),
        MessageType::HandshakeResponse => Some(8),
        MessageType::HandshakeInitiation => None,
    }
}

/// Where a gateway's message carries its own (sender) index, if it has one.
#[inline(always)]
pub fn sender_offset(kind: MessageType) -> Option<usize> {
    match kind {
        MessageType::HandshakeResponse | MessageType::HandshakeInitiation => Some(4),
        _ => None,
    }
}

/// What is held for an index, as the decisions below see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub gateway: u32,
    pub collided: bool,
    pub learned_ns: u64,
}

/// What learning an index from `gateway` at `now` does to what is held for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learn {
    /// Held for this gateway and session from now on.
    Take,
    /// Another gateway holds it, still live: marked collided (and counted), it routes nothing
    /// until both expire (the source tuple alone decides).
    Collide,
    /// Marked collided already: nothing changes.
    Collided,
}

#[inline(always)]
pub fn learn(held: Option<Held>, gateway: u32, now: u64) -> Learn {
    match held {
        Some(held) if now.saturating_sub(held.learned_ns) >= INDEX_LIFETIME_NS => Learn::Take,
        Some(held) if held.collided => Learn::Collided,
        Some(held) if held.gateway != gateway => Learn::Collide,
        _ => Learn::Take,
    }
}

/// Whether a held index routes a datagram from a source tuple that has no session: not claimed
/// by two gateways, not expired, and its gateway still keeps sessions.
#[inline(always)]
pub fn routes(held: Held, keeps: bool, now: u64) -> bool {
    !held.collided && keeps && now.saturating_sub(held.learned_ns) < INDEX_LIFETIME_NS
}

/// The little-endian index at `offset` of a message's first 12 bytes.
#[inline(always)]
pub fn index_at(header: &[u8; 12], offset: usize) -> u32 {
    if offset == 8 {
        u32::from_le_bytes([header[8], header[9], header[10], header[11]])
    } else {
        u32::from_le_bytes([header[4], header[5], header[6], header[7]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn indices_sit_where_wireguard_puts_them() {
        assert_eq!(receiver_offset(MessageType::TransportData), Some(4));
        assert_eq!(receiver_offset(MessageType::HandshakeResponse), Some(8));
        assert_eq!(receiver_offset(MessageType::HandshakeInitiation), None);
        assert_eq!(sender_offset(MessageType::HandshakeResponse), Some(4));
        assert_eq!(sender_offset(MessageType::HandshakeInitiation), Some(4));
        assert_eq!(sender_offset(MessageType::TransportData), None);
        let header = [4, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(index_at(&header, 4), 0x0403_0201);
        assert_eq!(index_at(&header, 8), 0x0807_0605);
    }

    #[test]
    fn an_index_two_gateways_claim_routes_nothing_until_it_expires() {
        assert_eq!(learn(None, 1, 0), Learn::Take);
        let held = Held {
            gateway: 1,
            collided: false,
            learned_ns: 10 * S,
        };
        assert_eq!(learn(Some(held), 1, 20 * S), Learn::Take, "a refresh");
        assert_eq!(learn(Some(held), 2, 20 * S), Learn::Collide);
        let collided = Held {
            collided: true,
            ..held
        };
        assert_eq!(learn(Some(collided), 1, 20 * S), Learn::Collided);
        assert_eq!(learn(Some(collided), 2, 20 * S), Learn::Collided);
        assert!(!routes(collided, true, 20 * S));
        assert_eq!(
            learn(Some(collided), 2, 10 * S + INDEX_LIFETIME_NS),
            Learn::Take,
            "expired: a new owner"
        );
        assert!(routes(held, true, 20 * S));
        assert!(
            !routes(held, false, 20 * S),
            "its gateway keeps no sessions"
        );
        assert!(!routes(held, true, 10 * S + INDEX_LIFETIME_NS));
    }
}
