//! The shape check every datagram meets first, in both forms: `classify` (the userspace datapath)
//! and `classify_header` (the XDP program, which reads the four header bytes itself).
#![no_main]

use libfuzzer_sys::fuzz_target;
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
    }
});
