//! What a sync peer sends: a protobuf `SyncBatch`, then each of its changes as the receiving
//! balancer reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use wglb::sync::{receive::parse, Change};
use wglb_proto::v1::{session_change::Kind, SyncBatch};

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = SyncBatch::decode(data) else {
        return;
    };
    for change in &batch.changes {
        if let Some(parsed) = parse(change) {
            let kind = match parsed.change {
                Change::Upsert { .. } => Kind::Upsert,
                Change::Evicted => Kind::Evicted,
            };
            assert_eq!(change.kind, kind as i32);
        }
    }
});
