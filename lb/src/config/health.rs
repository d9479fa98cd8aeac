//! `[health]`: the built-in checker's probes and thresholds, and how health sources combine.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{opt_duration, ConfigError, Origin};
use crate::passive::{PassiveConfig, PassiveRole};

/// The built-in checker's timing. Defaults are Defguard's Envoy example: 1 s interval and
/// timeout, one result to change state either way.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// How long a gateway reported down keeps its sessions (taking no new ones) before they are
    /// evicted. Gateways reported failing together within it (a health source cut off from all
    /// of them) are seen as all down and fail open instead of losing their sessions one by one. A moved client cannot re-handshake before ~15 s anyway, so a delay
    /// well below that adds nothing to failover time.
    pub eviction_delay: Duration,
    /// How many fresh sources must report a gateway down before it is taken down. A source that
    /// has not reported within its report's time to live no longer counts.
    pub quorum: u32,
    /// How long a report from the API counts when the reporter gives no time to live.
    pub report_ttl: Duration,
    /// Gateways judged by the handshakes they answer (`crate::passive`).
    pub passive: PassiveConfig,
}

impl HealthCheckConfig {
    /// Whether two settings probe alike: only these need a checker restarted (a restarted
    /// checker knows nothing yet, so restarting one for nothing loses what it knew).
    pub fn probes_alike(&self, other: &HealthCheckConfig) -> bool {
        (
            &self.path,
            self.interval,
            self.timeout,
            self.rise,
            self.fall,
        ) == (
            &other.path,
            other.interval,
            other.timeout,
            other.rise,
            other.fall,
        )
    }
}

/// Longest eviction delay: beyond it, the delay would add to WireGuard's ~15 s failover floor.
pub const MAX_EVICTION_DELAY: Duration = Duration::from_secs(10);

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise: 1,
            fall: 1,
            eviction_delay: Duration::from_secs(2),
            quorum: 1,
            report_ttl: Duration::from_secs(10),
            passive: PassiveConfig::default(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    path: Option<String>,
    #[serde(default, with = "opt_duration")]
    interval: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    timeout: Option<Duration>,
    rise: Option<u32>,
    fall: Option<u32>,
    #[serde(default, with = "opt_duration")]
    eviction_delay: Option<Duration>,
    quorum: Option<u32>,
    #[serde(default, with = "opt_duration")]
    report_ttl: Option<Duration>,
    passive: Option<String>,
    passive_clients: Option<usize>,
    #[serde(default, with = "opt_duration")]
    passive_window: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    passive_eject_for: Option<Duration>,
}

/// `[health]`, checked.
pub(super) fn build_health(
    raw: Option<Spanned<RawHealth>>,
    origin: &Origin<'_>,
) -> Result<HealthCheckConfig, ConfigError> {
    let defaults = HealthCheckConfig::default();
    let health_span = raw.as_ref().map(|h| h.span());
    let raw_health = raw.map(Spanned::into_inner).unwrap_or_default();
    let mut health = HealthCheckConfig {
        path: raw_health.path.unwrap_or(defaults.path),
        interval: raw_health.interval.unwrap_or(defaults.interval),
        timeout: raw_health.timeout.unwrap_or(defaults.timeout),
        rise: raw_health.rise.unwrap_or(defaults.rise),
        fall: raw_health.fall.unwrap_or(defaults.fall),
        eviction_delay: raw_health.eviction_delay.unwrap_or(defaults.eviction_delay),
        quorum: raw_health.quorum.unwrap_or(defaults.quorum),
        report_ttl: raw_health.report_ttl.unwrap_or(defaults.report_ttl),
        passive: PassiveConfig {
            role: defaults.passive.role,
            clients: raw_health
                .passive_clients
                .unwrap_or(defaults.passive.clients),
            window: raw_health.passive_window.unwrap_or(defaults.passive.window),
            eject_for: raw_health
                .passive_eject_for
                .unwrap_or(defaults.passive.eject_for),
        },
    };
    let health_err = |field: &str, reason: &str| ConfigError {
        place: origin.place(health_span.clone(), "[health]"),
        field: field.into(),
        reason: reason.into(),
    };
    if let Some(role) = &raw_health.passive {
        health.passive.role = PassiveRole::parse(role)
            .ok_or_else(|| health_err("passive", "must be \"vote\", \"watch\" or \"off\""))?;
    }
    if health.passive.clients == 0 {
        return Err(health_err("passive_clients", "must be at least 1"));
    }
    if health.passive.window < Duration::from_secs(1) {
        return Err(health_err(
            "passive_window",
            "must be at least 1s (the datapaths look once a second)",
        ));
    }
    if health.passive.eject_for.is_zero() {
        return Err(health_err("passive_eject_for", "must be greater than zero"));
    }
    if !health.path.starts_with('/') {
        return Err(health_err("path", "must start with `/`"));
    }
    if health.interval.is_zero() {
        return Err(health_err("interval", "must be greater than zero"));
    }
    if health.timeout.is_zero() {
        return Err(health_err("timeout", "must be greater than zero"));
    }
    if health.eviction_delay > MAX_EVICTION_DELAY {
        return Err(health_err(
            "eviction_delay",
            "must be at most 10s, or it adds to WireGuard's 15 s failover",
        ));
    }
    if health.quorum == 0 {
        return Err(health_err("quorum", "must be at least 1"));
    }
    if health.report_ttl.is_zero() {
        return Err(health_err("report_ttl", "must be greater than zero"));
    }
    if health.rise == 0 || health.fall == 0 {
        return Err(health_err(
            if health.rise == 0 { "rise" } else { "fall" },
            "must be at least 1",
        ));
    }
    Ok(health)
}
