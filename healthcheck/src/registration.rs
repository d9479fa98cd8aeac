//! The probe peer as Defguard wants it: a network device of each location the sidecar probes,
//! registered through Core's REST API, which then pushes it to every gateway of the location
//! (and again after every reconfiguration, which a peer added by hand does not survive).
//!
//! Core refuses one public key for two devices, so each location gets a probe key of its own,
//! derived from the configured one and the location's id: no state to keep, the same key after
//! every restart, and a restarted sidecar finds its device again instead of adding another.
//! Shapes as Defguard 2.0.1 serves them (`crates/defguard_core/src/handlers/network_devices.rs`;
//! fixtures in `tests/fixtures/defguard-2.0.1/`).

use anyhow::bail;
use base64::Engine;
use blake2::digest::{FixedOutput, KeyInit, Update};
use boringtun::x25519::{PublicKey, StaticSecret};
use serde::{Deserialize, Serialize};

use crate::config::Core;
use crate::core_api::CoreApi;

/// Location `location_id`'s probe key, derived from the configured one (a keyed BLAKE2s: knowing
/// one location's key tells nothing of the configured key or of another location's).
pub fn location_key(probe: &StaticSecret, location_id: i64) -> StaticSecret {
    let mut mac = blake2::Blake2sMac256::new_from_slice(probe.as_bytes()).expect("a 32-byte key");
    mac.update(b"wglb-healthcheck probe peer of location ");
    mac.update(&location_id.to_le_bytes());
    let bytes: [u8; 32] = mac.finalize_fixed().into();
    StaticSecret::from(bytes)
}

/// A network device as `GET /api/v1/device/network` lists it (what the sidecar reads of it).
#[derive(Debug, Deserialize)]
pub struct NetworkDevice {
    pub id: i64,
    pub name: String,
    pub wireguard_pubkey: String,
    pub location: DeviceLocation,
}

#[derive(Debug, Deserialize)]
pub struct DeviceLocation {
    pub id: i64,
    pub name: String,
}

/// One page of a paginated listing.
#[derive(Debug, Deserialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub pagination: Pagination,
}

#[derive(Debug, Deserialize)]
pub struct Pagination {
    pub next_page: Option<u32>,
}

/// An address Core offers for a new device (`GET /api/v1/device/network/ip/{location}`), one per
/// address of the location.
#[derive(Debug, Deserialize)]
pub struct FreeAddress {
    pub ip: String,
}

/// `POST /api/v1/device/network`.
#[derive(Debug, Serialize)]
pub struct AddNetworkDevice<'a> {
    pub name: String,
    pub description: Option<&'a str>,
    pub location_id: i64,
    pub assigned_ips: Vec<String>,
    pub wireguard_pubkey: String,
}

const DESCRIPTION: &str = "The probe peer of wglb-healthcheck: its handshakes tell the balancers \
    whether each gateway's WireGuard works. Added and kept by wglb-healthcheck; without it the \
    handshake probe fails on every gateway of the location.";

/// Whether the device was there already.
#[derive(Debug, PartialEq, Eq)]
pub enum Registered {
    Found(i64),
    Added,
}

pub struct Registration {
    api: CoreApi,
    /// The device names: this sidecar's, per location.
    source: String,
}

impl Registration {
    pub fn new(core: Core, source: &str) -> anyhow::Result<Registration> {
        Ok(Registration {
            api: CoreApi::new(core)?,
            source: source.to_string(),
        })
    }

    /// The network device whose key is `key`, wherever it is.
    async fn find(&self, key: &str) -> anyhow::Result<Option<NetworkDevice>> {
        let mut page = 1;
        loop {
            let listed: Page<NetworkDevice> = self
                .api
                .get(&format!("/api/v1/device/network?page={page}&per_page=100"))
                .await?;
            if let Some(device) = listed.data.into_iter().find(|d| d.wireguard_pubkey == key) {
                return Ok(Some(device));
            }
            match listed.pagination.next_page {
                Some(next) if next > page => page = next,
                _ => return Ok(None),
            }
        }
    }

    /// Makes `key` a network device of location `location_id` (named `location`) unless it is
    /// one already.
    pub async fn ensure(
        &self,
        location_id: i64,
        location: &str,
        key: &PublicKey,
    ) -> anyhow::Result<Registered> {
        let key = base64::engine::general_purpose::STANDARD.encode(key.as_bytes());
        if let Some(device) = self.find(&key).await? {
            if device.location.id != location_id {
                bail!(
                    "the probe key of location `{location}` is device `{}` of location `{}` in Core: remove that device",
                    device.name,
                    device.location.name
                );
            }
            return Ok(Registered::Found(device.id));
        }
        let free: Vec<FreeAddress> = self
            .api
            .get(&format!("/api/v1/device/network/ip/{location_id}"))
            .await?;
        let request = AddNetworkDevice {
            name: format!("wglb-probe-{}", self.source),
            description: Some(DESCRIPTION),
            location_id,
            assigned_ips: free.into_iter().map(|a| a.ip).collect(),
            wireguard_pubkey: key.clone(),
        };
        let posted = self.api.post("/api/v1/device/network", &request).await;
        if posted.is_ok() {
            return Ok(Registered::Added);
        }
        // Another sidecar of the same key, or a retry after an answer that got lost.
        if let Some(device) = self.find(&key).await? {
            if device.location.id == location_id {
                return Ok(Registered::Found(device.id));
            }
        }
        posted.map(|()| Registered::Added)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_location_gets_a_key_of_its_own_the_same_every_time() {
        let probe = StaticSecret::from([7u8; 32]);
        let one = PublicKey::from(&location_key(&probe, 1));
        assert_eq!(one, PublicKey::from(&location_key(&probe, 1)));
        assert_ne!(one, PublicKey::from(&location_key(&probe, 2)));
        assert_ne!(one, PublicKey::from(&probe));
        let other = StaticSecret::from([8u8; 32]);
        assert_ne!(one, PublicKey::from(&location_key(&other, 1)));
    }

    #[test]
    fn core_2_0_1s_answers_parse() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/defguard-2.0.1");
        let read = |file: &str| std::fs::read_to_string(format!("{fixtures}/{file}")).unwrap();
        let page: Page<NetworkDevice> =
            serde_json::from_str(&read("device_network_list.json")).unwrap();
        assert_eq!(page.data.len(), 1);
        assert_eq!(page.data[0].location.id, 1);
        assert_eq!(page.pagination.next_page, None);
        let free: Vec<FreeAddress> = serde_json::from_str(&read("device_network_ip.json")).unwrap();
        assert_eq!(free[0].ip, "10.99.0.3");
    }
}
