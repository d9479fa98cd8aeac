//! Following Defguard Core's gateway list through its REST API (`Authorization: Bearer` with an
//! API token): `GET /api/v1/network` gives the locations (a location's WireGuard port and public
//! key), `GET /api/v1/gateway` the gateways adopted into them (`location_id`, `name`, `address`,
//! `enabled`). A location becomes a balancer listener of the same name, an enabled gateway one of
//! its gateways at the gateway's address and the location's WireGuard port.

use anyhow::Context;
use boringtun::x25519::PublicKey;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use crate::config::{Core, Gateway, Location};
use crate::core_api::CoreApi;
use crate::handshake::parse_key;

/// A location as `GET /api/v1/network` lists it (public so the fuzz targets parse Core's JSON
/// into the very types the sidecar does).
#[derive(Deserialize)]
pub struct Network {
    id: i64,
    name: String,
    /// The location's WireGuard listen port, the same on every gateway.
    port: u16,
    #[serde(default)]
    pubkey: Option<String>,
    /// Defguard 1.5 and later: "disabled", "internal" or "external" (1, 2, 3 in its database).
    #[serde(default)]
    location_mfa_mode: Option<MfaMode>,
    /// Before 1.5.
    #[serde(default)]
    mfa_enabled: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MfaMode {
    Name(String),
    Number(i64),
}

impl Network {
    /// Whether its gateways carry only peers with a live MFA session.
    fn mfa(&self) -> bool {
        let mode = match &self.location_mfa_mode {
            Some(MfaMode::Name(name)) => !name.eq_ignore_ascii_case("disabled"),
            Some(MfaMode::Number(number)) => *number != 1,
            None => false,
        };
        mode || self.mfa_enabled
    }
}

/// A gateway as `GET /api/v1/gateway` lists it.
#[derive(Deserialize)]
pub struct CoreGateway {
    id: i64,
    location_id: i64,
    name: String,
    /// A host name or an IP, as entered at adoption.
    address: String,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
    /// Core's own view of its gRPC stream to the gateway.
    #[serde(default)]
    connected: Option<bool>,
}

fn enabled_by_default() -> bool {
    true
}

pub struct Discovery {
    api: CoreApi,
}

impl Discovery {
    pub fn new(core: Core) -> anyhow::Result<Discovery> {
        Ok(Discovery {
            api: CoreApi::new(core)?,
        })
    }

    /// The locations and enabled gateways Core has now.
    pub async fn fetch(&self) -> anyhow::Result<Vec<Location>> {
        let networks: Vec<Network> = self.api.get("/api/v1/network").await?;
        let gateways: Vec<CoreGateway> = self.api.get("/api/v1/gateway").await?;
        let mut locations: BTreeMap<i64, Location> = BTreeMap::new();
        let mut ports = BTreeMap::new();
        for network in networks {
            let public_key = match network.pubkey.as_deref().map(parse_key) {
                Some(Ok(key)) => Some(PublicKey::from(key)),
                Some(Err(e)) => {
                    tracing::warn!(location = %network.name, "Core gives a public key that is not one: {e}");
                    None
                }
                None => None,
            };
            ports.insert(network.id, network.port);
            let mfa = network.mfa();
            locations.insert(
                network.id,
                Location {
                    name: network.name,
                    public_key,
                    mfa,
                    gateways: Vec::new(),
                    core_id: Some(network.id),
                },
            );
        }
        for gateway in gateways.into_iter().filter(|g| g.enabled) {
            let (Some(location), Some(&port)) = (
                locations.get_mut(&gateway.location_id),
                ports.get(&gateway.location_id),
            ) else {
                tracing::warn!(gateway = %gateway.name, location = gateway.location_id, "Core lists a gateway of a location it does not list");
                continue;
            };
            // Core's address is where it dials the gateway's gRPC: the file says where the
            // WireGuard endpoint is when that is elsewhere.
            let address = match self.api.core().endpoints.get(&gateway.name) {
                Some(endpoint) => *endpoint,
                None => match resolve(&gateway.address, port).await {
                    Ok(address) => address,
                    Err(e) => {
                        tracing::warn!(gateway = %gateway.name, "skipped: {e:#}");
                        continue;
                    }
                },
            };
            location.gateways.push(Gateway {
                name: gateway.name,
                address,
                health_port: self.api.core().health_port,
                core_id: Some(gateway.id),
                core_connected: gateway.connected,
            });
        }
        Ok(locations.into_values().collect())
    }
}

/// A gateway's WireGuard endpoint from the address Core holds (an IP, an IP:port whose port is
/// the gateway's gRPC one, or a host name) and the location's WireGuard port.
async fn resolve(address: &str, port: u16) -> anyhow::Result<SocketAddr> {
    if let Ok(ip) = address.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if let Ok(with_port) = address.parse::<SocketAddr>() {
        return Ok(SocketAddr::new(with_port.ip(), port));
    }
    let host = address.split(':').next().unwrap_or(address);
    tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving `{address}`"))?
        .next()
        .with_context(|| format!("`{address}` has no address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stand-in for Core answering `GET /api/v1/network` and `/api/v1/gateway` with `networks`
    /// and `gateways`, and 401 to a request without the token.
    async fn stand_in(networks: &'static str, gateways: &'static str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let read = stream.read(&mut request).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&request[..read]).to_string();
                let (status, body) = if !request.contains("Bearer dg-token") {
                    ("401 Unauthorized", "{}")
                } else if request.starts_with("GET /api/v1/network ") {
                    ("200 OK", networks)
                } else if request.starts_with("GET /api/v1/gateway ") {
                    ("200 OK", gateways)
                } else {
                    ("404 Not Found", "{}")
                };
                let _ = stream
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes())
                    .await;
            }
        });
        address
    }

    fn core(address: SocketAddr, token: &str) -> Core {
        Core {
            url: format!("http://{address}"),
            token: token.into(),
            interval: Duration::from_secs(10),
            health_port: None,
            confirm_drops: 3,
            endpoints: [("gw2".to_string(), "203.0.113.5:51820".parse().unwrap())].into(),
        }
    }

    #[tokio::test]
    async fn gateways_are_where_the_file_says_when_core_dials_elsewhere_and_carry_cores_word() {
        let address = stand_in(
            r#"[{"id":1,"name":"office","port":51820,"pubkey":null}]"#,
            r#"[{"id":1,"location_id":1,"name":"gw1","address":"10.0.0.2","enabled":true,"connected":true},
                {"id":2,"location_id":1,"name":"gw2","address":"10.9.9.9:50066","enabled":true,"connected":false}]"#,
        )
        .await;
        let locations = Discovery::new(core(address, "dg-token"))
            .unwrap()
            .fetch()
            .await
            .unwrap();
        let gateways = &locations[0].gateways;
        assert_eq!(locations[0].core_id, Some(1));
        assert_eq!(gateways[0].address, "10.0.0.2:51820".parse().unwrap());
        assert_eq!(gateways[0].core_connected, Some(true));
        // Core dials gw2's gRPC at 10.9.9.9; its WireGuard endpoint is elsewhere.
        assert_eq!(gateways[1].address, "203.0.113.5:51820".parse().unwrap());
        assert_eq!(gateways[1].core_connected, Some(false));
    }

    #[tokio::test]
    async fn a_refused_token_says_what_core_needs() {
        let address = stand_in("[]", "[]").await;
        let discovery = Discovery::new(core(address, "a user's token")).unwrap();
        let error = format!("{:#}", discovery.fetch().await.unwrap_err());
        assert!(
            error.contains("401")
                && error.contains("admin user")
                && error.contains("Business licence"),
            "{error}"
        );
    }
}
