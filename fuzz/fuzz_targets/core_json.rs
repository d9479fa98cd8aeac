//! Defguard Core's answers to the sidecar (`GET /api/v1/network`, `/api/v1/gateway`, and the
//! network device listings of its probe peer's registration), decoded as the sidecar does
//! (reqwest's `json()` is `serde_json::from_slice`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wglb_healthcheck::discovery::{CoreGateway, Network};
use wglb_healthcheck::registration::{FreeAddress, NetworkDevice, Page};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Vec<Network>>(data);
    let _ = serde_json::from_slice::<Vec<CoreGateway>>(data);
    let _ = serde_json::from_slice::<Page<NetworkDevice>>(data);
    let _ = serde_json::from_slice::<Vec<FreeAddress>>(data);
});
