//! `[announce]` and each listener's `announce`: the addresses this balancer announces through a
//! routing daemon while it forwards for them (active-active behind ECMP, `crate::announce`).

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{opt_duration, ConfigError, Origin};

/// The kernel routing table the routes go to when `[announce] table` is not set: no default of
/// iproute2 or Debian names it.
pub const DEFAULT_ANNOUNCE_TABLE: u32 = 200;
pub const DEFAULT_ANNOUNCE_DEVICE: &str = "wglb-announce";
/// Time for the routing daemon to tell the routers, and for them to move the flows elsewhere,
/// before a stopping balancer stops forwarding.
pub const DEFAULT_WITHDRAW_WAIT: Duration = Duration::from_secs(2);
const MAX_WITHDRAW_WAIT: Duration = Duration::from_secs(60);
/// A starting balancer's longest wait for its sync peers' sessions before it announces: a live
/// peer reconnects within 5 s (its backoff's bound) and resyncs in well under a second.
pub const DEFAULT_SYNC_WAIT: Duration = Duration::from_secs(10);
const MAX_SYNC_WAIT: Duration = Duration::from_secs(120);

/// Where the routes of the announced addresses go, for the routing daemon to export. Fixed for
/// the process's life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceConfig {
    pub table: u32,
    /// The interface the routes point at; wglb creates it and it goes with the process, routes
    /// and all, however the process ends.
    pub device: String,
    pub withdraw_wait: Duration,
    /// How long a starting balancer waits for every sync peer to push its sessions before it
    /// announces anyway (a dead peer never will).
    pub sync_wait: Duration,
}

impl Default for AnnounceConfig {
    fn default() -> Self {
        AnnounceConfig {
            table: DEFAULT_ANNOUNCE_TABLE,
            device: DEFAULT_ANNOUNCE_DEVICE.into(),
            withdraw_wait: DEFAULT_WITHDRAW_WAIT,
            sync_wait: DEFAULT_SYNC_WAIT,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnnounce {
    table: Option<u32>,
    device: Option<String>,
    #[serde(default, with = "opt_duration")]
    withdraw_wait: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    sync_wait: Option<Duration>,
}

pub(super) fn build_announce(
    raw: Option<Spanned<RawAnnounce>>,
    origin: &Origin<'_>,
) -> Result<AnnounceConfig, ConfigError> {
    let span = raw.as_ref().map(|r| r.span());
    let raw = raw.map(Spanned::into_inner).unwrap_or_default();
    let err = |field: &str, reason: &str| ConfigError {
        place: origin.place(span.clone(), "[announce]"),
        field: field.into(),
        reason: reason.into(),
    };
    let defaults = AnnounceConfig::default();
    let table = raw.table.unwrap_or(defaults.table);
    // 0 is "unspecified"; 253-255 are the kernel's default, main and local tables, whose routes
    // wglb must not take as its own (nor the daemon export them all).
    if table == 0 || (253..=255).contains(&table) {
        return Err(err(
            "table",
            "must be a table of wglb's own, not 0, default (253), main (254) or local (255)",
        ));
    }
    let device = raw.device.unwrap_or(defaults.device);
    if device.is_empty()
        || device.len() > 15
        || device
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(err(
            "device",
            "must be an interface name: 1 to 15 characters, no `/`, `:` or spaces",
        ));
    }
    let withdraw_wait = raw.withdraw_wait.unwrap_or(defaults.withdraw_wait);
    if withdraw_wait > MAX_WITHDRAW_WAIT {
        return Err(err(
            "withdraw_wait",
            "must be at most 60s (a stop waits that long)",
        ));
    }
    let sync_wait = raw.sync_wait.unwrap_or(defaults.sync_wait);
    if sync_wait > MAX_SYNC_WAIT {
        return Err(err(
            "sync_wait",
            "must be at most 120s (a balancer withholds its routes that long after a start)",
        ));
    }
    Ok(AnnounceConfig {
        table,
        device,
        withdraw_wait,
        sync_wait,
    })
}

/// Checks a listener's `announce` list against the address it listens on: an announced address
/// must reach this listener, or the routers would send its clients to a balancer that drops
/// them.
pub(super) fn check_listener_addresses(
    listen: std::net::SocketAddr,
    addresses: &[IpAddr],
) -> Result<(), String> {
    for (i, address) in addresses.iter().enumerate() {
        if address.is_unspecified() || address.is_loopback() || address.is_multicast() {
            return Err(format!(
                "{address} cannot be announced: it must be a unicast address routers can reach"
            ));
        }
        let covered = if listen.ip().is_unspecified() {
            listen.is_ipv4() == address.is_ipv4()
        } else {
            listen.ip() == *address
        };
        if !covered {
            return Err(format!(
                "{address} does not reach this listener, which listens on {listen}"
            ));
        }
        if addresses[..i].contains(address) {
            return Err(format!("{address} is listed twice"));
        }
    }
    Ok(())
}
