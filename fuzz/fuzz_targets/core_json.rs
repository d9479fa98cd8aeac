//! Defguard Core's answers to the sidecar's discovery (`GET /api/v1/network`, `/api/v1/gateway`),
//! decoded as `Discovery::fetch` does (reqwest's `json()` is `serde_json::from_slice`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wglb_healthcheck::discovery::{CoreGateway, Network};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Vec<Network>>(data);
    let _ = serde_json::from_slice::<Vec<CoreGateway>>(data);
});
