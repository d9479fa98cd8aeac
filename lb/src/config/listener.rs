//! `[[listener]]` and its `[[listener.gateway]]`s: what a listener serves, and the checks a
//! gateway passes wherever it comes from (file, flags, API).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::announce::check_listener_addresses;
use super::{opt_duration, ConfigError, Origin, Written};
use crate::pool::{AdminState, AllDownPolicy, HashKey};

/// Maglev's usual table size: prime, and more than 100 slots per gateway for up to 655 gateways.
pub const DEFAULT_MAGLEV_SIZE: u32 = 65_537;
/// At least REJECT_AFTER_TIME (180 s): a shorter idle timeout would re-place quiet but live
/// sessions on another gateway, which cannot decrypt them.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(180);
/// Each session holds a socket and an ephemeral port of the source address (28232 by default on
/// Linux), so the default stays well below both limits.
pub const DEFAULT_TABLE_SIZE: usize = 16_384;
pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;
/// Unconfirmed sessions at once: a handshake's round trip is milliseconds, so this is room for
/// thousands of clients arriving together (after a gateway failure) while a flood churns it.
pub const DEFAULT_PROBATION_SIZE: usize = 4096;
/// New sessions per second per source address, and how many a quiet source may open at once:
/// enough for a carrier-grade NAT's clients to come back after a failover within seconds.
pub const DEFAULT_SOURCE_RATE: u32 = 20;
pub const DEFAULT_SOURCE_BURST: u32 = 40;
/// Unconfirmed sessions per source address at once.
pub const DEFAULT_SOURCE_UNCONFIRMED: u32 = 32;

/// One front door (one VPN location) and its gateway pool.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// Address the balancer sends to gateways from; the unspecified address of the gateways'
    /// family when absent, so the kernel picks by route.
    pub source: Option<IpAddr>,
    pub hash_key: HashKey,
    pub idle_timeout: Duration,
    pub table_size: NonZeroUsize,
    pub maglev_size: u32,
    pub all_down: AllDownPolicy,
    pub socket_buffer: usize,
    pub admission: AdmissionConfig,
    /// The location's WireGuard public key: initiations whose mac1 is wrong for it are dropped.
    pub public_key: Option<[u8; 32]>,
    /// Addresses announced (`crate::announce`) while this listener can forward.
    pub announce: Vec<IpAddr>,
    pub gateways: Vec<GatewayConfig>,
}

/// How new sessions are admitted (`wglb_common::admission`): a session is unconfirmed until its
/// gateway answers, and unconfirmed sessions have a bounded part of the table of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Unconfirmed sessions at once, over all sources; beyond it the oldest unconfirmed goes.
    pub probation_size: NonZeroUsize,
    /// New sessions per second per source address.
    pub source_rate: u32,
    /// New sessions a quiet source address may open at once.
    pub source_burst: u32,
    /// Unconfirmed sessions per source address at once.
    pub source_unconfirmed: u32,
}

impl AdmissionConfig {
    pub fn limits(&self) -> wglb_common::admission::AdmissionLimits {
        wglb_common::admission::AdmissionLimits {
            rate: self.source_rate,
            burst: self.source_burst,
            unconfirmed: self.source_unconfirmed,
            pad: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct GatewayConfig {
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
    pub state: AdminState,
    /// Port of Defguard's `GET /health` on the gateway's address; no built-in check without it.
    pub health_port: Option<u16>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) name: Option<String>,
    pub(super) listen: Option<SocketAddr>,
    pub(super) source: Option<IpAddr>,
    pub(super) hash_key: Option<HashKey>,
    #[serde(default, with = "opt_duration")]
    pub(super) idle_timeout: Option<Duration>,
    pub(super) table_size: Option<usize>,
    pub(super) maglev_size: Option<u32>,
    pub(super) all_down: Option<AllDownPolicy>,
    pub(super) socket_buffer: Option<usize>,
    pub(super) probation_size: Option<usize>,
    pub(super) source_rate: Option<u32>,
    pub(super) source_burst: Option<u32>,
    pub(super) source_unconfirmed: Option<u32>,
    pub(super) public_key: Option<String>,
    #[serde(default)]
    pub(super) announce: Vec<IpAddr>,
    #[serde(default)]
    pub(super) gateway: Vec<Spanned<RawGateway>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
    pub(super) name: String,
    pub(super) address: SocketAddr,
    pub(super) weight: Option<u32>,
    pub(super) state: Option<AdminState>,
    pub(super) health_port: Option<u16>,
}

/// Every `[[listener]]`, checked; `record` notes where each one's settings were written.
pub(super) fn build_listeners(
    raw: Vec<Spanned<RawListener>>,
    origin: &Origin<'_>,
    layout: &[Written],
    record: &mut dyn FnMut(&str, &Written),
) -> Result<Vec<ListenerConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError {
            place: origin.place(None, "top level"),
            field: "listener".into(),
            reason: "no [[listener]] configured; a balancer needs at least one".into(),
        });
    }
    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    for (index, spanned) in raw.into_iter().enumerate() {
        let span = spanned.span();
        let listener = spanned.into_inner();
        let what = format!(
            "listener {}",
            listener
                .name
                .as_deref()
                .map_or(format!("#{}", index + 1), |n| format!("`{n}`"))
        );
        if let Some(written) = layout.get(index) {
            record(&what, written);
        }
        let place = origin.place(Some(span.clone()), &what);
        let err = |field: &str, reason: String| ConfigError {
            place: place.clone(),
            field: field.into(),
            reason,
        };
        let name = listener.name.ok_or_else(|| err("name", "missing".into()))?;
        if name.is_empty() {
            return Err(err("name", "must not be empty".into()));
        }
        if !names.insert(name.clone()) {
            return Err(err("name", format!("listener name `{name}` is used twice")));
        }
        let listen = listener
            .listen
            .ok_or_else(|| err("listen", "missing (e.g. \"0.0.0.0:51820\")".into()))?;
        if listen.port() == 0 {
            return Err(err("listen", "port must not be 0".into()));
        }
        if !addresses.insert(listen) {
            return Err(err(
                "listen",
                format!("{listen} is used by another listener"),
            ));
        }
        let table_size = listener.table_size.unwrap_or(DEFAULT_TABLE_SIZE);
        let table_size = NonZeroUsize::new(table_size)
            .ok_or_else(|| err("table_size", "must be at least 1".into()))?;
        let maglev_size = listener.maglev_size.unwrap_or(DEFAULT_MAGLEV_SIZE);
        if !is_prime(maglev_size) {
            return Err(err(
                "maglev_size",
                format!(
                    "{maglev_size} is not prime; Maglev needs a prime (65537 is the usual choice)"
                ),
            ));
        }
        let idle_timeout = listener.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        if idle_timeout.is_zero() {
            return Err(err("idle_timeout", "must be greater than zero".into()));
        }
        let socket_buffer = listener.socket_buffer.unwrap_or(DEFAULT_SOCKET_BUFFER);
        let probation_size = listener
            .probation_size
            .unwrap_or(DEFAULT_PROBATION_SIZE.min(table_size.get()));
        let probation_size = NonZeroUsize::new(probation_size)
            .ok_or_else(|| err("probation_size", "must be at least 1".into()))?;
        let positive = |field: &str, value: Option<u32>, default: u32| match value {
            Some(0) => Err(err(field, "must be at least 1".into())),
            value => Ok(value.unwrap_or(default)),
        };
        let admission = AdmissionConfig {
            probation_size,
            source_rate: positive("source_rate", listener.source_rate, DEFAULT_SOURCE_RATE)?,
            source_burst: positive("source_burst", listener.source_burst, DEFAULT_SOURCE_BURST)?,
            source_unconfirmed: positive(
                "source_unconfirmed",
                listener.source_unconfirmed,
                DEFAULT_SOURCE_UNCONFIRMED,
            )?,
        };
        let public_key = match &listener.public_key {
            Some(text) => Some(parse_public_key(text).ok_or_else(|| {
                err(
                    "public_key",
                    format!("`{text}` is not a WireGuard public key (32 bytes in base64)"),
                )
            })?),
            None => None,
        };
        check_listener_addresses(listen, &listener.announce)
            .map_err(|reason| err("announce", reason))?;
        if listener.gateway.is_empty() {
            return Err(err("gateway", "no [[listener.gateway]] configured".into()));
        }
        if (maglev_size as usize) < listener.gateway.len() {
            return Err(err(
                "maglev_size",
                format!(
                    "{maglev_size} slots cannot hold {} gateways",
                    listener.gateway.len()
                ),
            ));
        }
        let mut gateways: Vec<GatewayConfig> = Vec::new();
        for spanned in listener.gateway {
            let span = spanned.span();
            let gateway = spanned.into_inner();
            let place = origin.place(Some(span), &format!("{what}, gateway `{}`", gateway.name));
            let err = |field: &str, reason: String| ConfigError {
                place: place.clone(),
                field: field.into(),
                reason,
            };
            let weight = gateway.weight.unwrap_or(1);
            let gateway = GatewayConfig {
                name: gateway.name,
                address: gateway.address,
                weight,
                state: gateway.state.unwrap_or(AdminState::Active),
                health_port: gateway.health_port,
            };
            check_gateway(listener.source, &gateways, &gateway)
                .map_err(|(field, reason)| err(field, reason))?;
            gateways.push(gateway);
        }
        listeners.push(ListenerConfig {
            name,
            listen,
            source: listener.source,
            hash_key: listener.hash_key.unwrap_or(HashKey::SourceIp),
            idle_timeout,
            table_size,
            maglev_size,
            all_down: listener.all_down.unwrap_or(AllDownPolicy::FailOpen),
            socket_buffer,
            admission,
            public_key,
            announce: listener.announce,
            gateways,
        });
    }
    Ok(listeners)
}

/// A WireGuard key as `wg` prints it.
pub fn parse_public_key(text: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?;
    bytes.try_into().ok()
}

/// A WireGuard key as `wg` prints it.
pub fn format_public_key(key: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Checks one gateway against the listener it joins: what the file, the flags and the runtime
/// API all refuse. Returns the field at fault and why.
pub fn check_gateway(
    source: Option<IpAddr>,
    others: &[GatewayConfig],
    gateway: &GatewayConfig,
) -> Result<(), (&'static str, String)> {
    if gateway.name.is_empty() {
        return Err(("name", "must not be empty".into()));
    }
    if others.iter().any(|g| g.name == gateway.name) {
        return Err((
            "name",
            format!(
                "gateway name `{}` is used twice in this listener",
                gateway.name
            ),
        ));
    }
    if gateway.address.port() == 0 || gateway.address.ip().is_unspecified() {
        return Err((
            "address",
            format!("{} is not a gateway address", gateway.address),
        ));
    }
    if let Some(other) = others.iter().find(|g| g.address == gateway.address) {
        return Err((
            "address",
            format!("{} is also gateway `{}`", gateway.address, other.name),
        ));
    }
    if let Some(source) = source {
        if source.is_ipv4() != gateway.address.is_ipv4() {
            return Err((
                "address",
                format!(
                    "{} is not of the family of the listener's source {source}",
                    gateway.address
                ),
            ));
        }
    }
    if gateway.weight == 0 || gateway.weight > u16::MAX as u32 {
        return Err(("weight", format!("{} is outside 1..=65535; to take a gateway out of placement set state = \"draining\"", gateway.weight)));
    }
    if gateway.health_port == Some(0) {
        return Err(("health_port", "must not be 0".into()));
    }
    Ok(())
}

pub(super) fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n as u64)
            .all(|d| !(n as u64).is_multiple_of(d))
}
