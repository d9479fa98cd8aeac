//! The shape check every datagram meets first, in both forms: `classify` (the userspace datapath)
//! and `classify_header` (the XDP program, which reads the four header bytes itself); then what
//! both datapaths read from a datagram that passed it: its receiver or sender index, and an
//! initiation's mac1.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wglb_common::index::{index_at, receiver_offset, sender_offset};
use wglb_common::mac1::{Blake2sWork, Mac1Key};
use wglb_common::wireguard::{
    classify, classify_header, Junk, MessageType, COOKIE_REPLY_LEN, HANDSHAKE_INITIATION_LEN,
    HANDSHAKE_RESPONSE_LEN, TRANSPORT_DATA_MIN_LEN,
};

fuzz_target!(|data: &[u8]| {
    let verdict = classify(data);
    match *data {
        [a, b, c, d, ..] => {
            // The two datapaths must drop and pass the same datagrams.
            assert_eq!(classify_header([a, b, c, d], data.len()), verdict);
            // Under four bytes the XDP program's header lies past the packet: it must not count.
            for len in 0..4 {
                assert_eq!(classify_header([a, b, c, d], len), Err(Junk::Truncated));
            }
        }
        _ => assert_eq!(verdict, Err(Junk::Truncated)),
    }
    if let Ok(kind) = verdict {
        assert_eq!(data[..4], [kind as u8, 0, 0, 0]);
        let len = data.len();
        assert!(match kind {
            MessageType::HandshakeInitiation => len == HANDSHAKE_INITIATION_LEN,
            MessageType::HandshakeResponse => len == HANDSHAKE_RESPONSE_LEN,
            MessageType::CookieReply => len == COOKIE_REPLY_LEN,
            MessageType::TransportData => len >= TRANSPORT_DATA_MIN_LEN,
        });
        // Every index a datapath reads lies within the first 12 bytes of a message that passed.
        let header: &[u8; 12] = data[..12].try_into().expect("12 bytes");
        for offset in [receiver_offset(kind), sender_offset(kind)].into_iter().flatten() {
            let index = index_at(header, offset);
            assert_eq!(index.to_le_bytes(), data[offset..offset + 4]);
        }
        if let Ok(initiation) = data.try_into() {
            let key = Mac1Key::new(&[7; 32]);
            let mut work = Blake2sWork::default();
            let verdict = key.verifies(initiation, &mut work);
            assert_eq!(key.verifies(initiation, &mut work), verdict, "mac1 is not deterministic");
        }
    }
});
