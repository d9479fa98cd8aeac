//! WireGuard message shapes, as the whitepaper and wireguard-go define them. A balancer holds no
//! keys, but every legitimate message has a fixed type byte, three zero reserved bytes and a size
//! that depends only on its type, so anything else can be dropped at the edge.

/// The four WireGuard message types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    HandshakeInitiation = 1,
    HandshakeResponse = 2,
    CookieReply = 3,
    TransportData = 4,
}

/// Why a datagram is not WireGuard. The variants are stable metric label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Junk {
    /// Shorter than the 4-byte message header.
    Truncated,
    /// Type byte outside 1..=4.
    UnknownType,
    /// One of the three reserved bytes is not zero.
    ReservedNotZero,
    /// Length does not match the size its type requires.
    BadLength,
}

impl Junk {
    pub const ALL: [Junk; 4] = [
        Junk::Truncated,
        Junk::UnknownType,
        Junk::ReservedNotZero,
        Junk::BadLength,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Junk::Truncated => "truncated",
            Junk::UnknownType => "unknown_type",
            Junk::ReservedNotZero => "reserved_not_zero",
            Junk::BadLength => "bad_length",
        }
    }
}

pub const HANDSHAKE_INITIATION_LEN: usize = 148;
pub const HANDSHAKE_RESPONSE_LEN: usize = 92;
pub const COOKIE_REPLY_LEN: usize = 64;
/// Header (16 bytes) plus the Poly1305 tag (16 bytes): an empty keepalive. Longer messages have
/// no fixed alignment: senders pad the plaintext to 16 bytes but never beyond the tunnel's MTU
/// (wireguard-go's and the kernel's padding rule), so a full-MTU packet under the default MTU of
/// 1420 makes a 1452-byte message.
pub const TRANSPORT_DATA_MIN_LEN: usize = 32;

impl MessageType {
    pub const fn as_str(self) -> &'static str {
        match self {
            MessageType::HandshakeInitiation => "handshake_initiation",
            MessageType::HandshakeResponse => "handshake_response",
            MessageType::CookieReply => "cookie_reply",
            MessageType::TransportData => "transport_data",
        }
    }
}

/// Classifies a UDP payload. Only the length and the first four bytes are read.
pub fn classify(payload: &[u8]) -> Result<MessageType, Junk> {
    match payload {
        [a, b, c, d, ..] => classify_header([*a, *b, *c, *d], payload.len()),
        _ => Err(Junk::Truncated),
    }
}

/// Classifies a payload of `len` bytes that starts with `header`: the form the XDP program can
/// use, which reads the four bytes itself, bounds-checked against the packet end. A `len` below 4
/// is truncated whatever `header` holds.
#[inline(always)]
pub fn classify_header(header: [u8; 4], len: usize) -> Result<MessageType, Junk> {
    if len < 4 {
        return Err(Junk::Truncated);
    }
    let kind = match header[0] {
        1 => MessageType::HandshakeInitiation,
        2 => MessageType::HandshakeResponse,
        3 => MessageType::CookieReply,
        4 => MessageType::TransportData,
        _ => return Err(Junk::UnknownType),
    };
    if header[1] | header[2] | header[3] != 0 {
        return Err(Junk::ReservedNotZero);
    }
    let well_sized = match kind {
        MessageType::HandshakeInitiation => len == HANDSHAKE_INITIATION_LEN,
        MessageType::HandshakeResponse => len == HANDSHAKE_RESPONSE_LEN,
        MessageType::CookieReply => len == COOKIE_REPLY_LEN,
        MessageType::TransportData => len >= TRANSPORT_DATA_MIN_LEN,
    };
    if well_sized {
        Ok(kind)
    } else {
        Err(Junk::BadLength)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8) -> [u8; 1500] {
        let mut buf = [0u8; 1500];
        buf[0] = kind;
        buf
    }

    #[test]
    fn accepts_every_well_formed_shape() {
        let cases = [
            (1, 148, MessageType::HandshakeInitiation),
            (2, 92, MessageType::HandshakeResponse),
            (3, 64, MessageType::CookieReply),
            (4, 32, MessageType::TransportData),
            (4, 48, MessageType::TransportData),
            (4, 32 + 16 * 14, MessageType::TransportData),
            // A full 1420-byte packet under MTU 1420: padding stops at the MTU.
            (4, 32 + 1420, MessageType::TransportData),
        ];
        for (kind, len, want) in cases {
            assert_eq!(classify(&message(kind)[..len]), Ok(want), "{kind}/{len}");
        }
    }

    #[test]
    fn rejects_every_kind_of_junk() {
        assert_eq!(classify(&[]), Err(Junk::Truncated));
        assert_eq!(classify(&[1, 0, 0]), Err(Junk::Truncated));
        assert_eq!(classify(&message(0)[..148]), Err(Junk::UnknownType));
        assert_eq!(classify(&message(5)[..148]), Err(Junk::UnknownType));
        let mut reserved = message(1);
        reserved[2] = 1;
        assert_eq!(classify(&reserved[..148]), Err(Junk::ReservedNotZero));
        for (kind, len) in [(1, 147), (1, 149), (2, 91), (2, 93), (3, 63), (3, 65)] {
            assert_eq!(
                classify(&message(kind)[..len]),
                Err(Junk::BadLength),
                "{kind}/{len}"
            );
        }
        for len in [4, 16, 31] {
            assert_eq!(
                classify(&message(4)[..len]),
                Err(Junk::BadLength),
                "4/{len}"
            );
        }
    }
}
