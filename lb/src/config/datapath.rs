//! `[datapath]`: which datapath forwards, and how the XDP one is set up; and the command
//! line's overrides of it.

use std::ops::RangeInclusive;

use serde::Deserialize;

use super::{Config, ConfigError};

/// `wglb run --datapath` and `--xdp-mode`, which win over [datapath].
#[derive(Clone, Copy, Debug, Default)]
pub struct DatapathOverrides {
    pub kind: Option<DatapathKind>,
    pub xdp_mode: Option<XdpMode>,
}

impl DatapathOverrides {
    pub fn apply(&self, config: &mut Config) {
        if let Some(kind) = self.kind {
            config.datapath.kind = kind;
        }
        if let Some(mode) = self.xdp_mode {
            config.datapath.xdp_mode = mode;
        }
    }
}

/// Which datapath forwards, and how the XDP one is set up. Fixed for the process's life: a
/// reload does not change it.
#[derive(Clone, Debug, PartialEq)]
pub struct DatapathConfig {
    pub kind: DatapathKind,
    pub xdp_mode: XdpMode,
    /// Interfaces to attach the XDP program to; empty: every interface that is up, except
    /// loopback.
    pub interfaces: Vec<String>,
    /// The source ports the XDP program sends to gateways from. They must be nobody else's:
    /// outside net.ipv4.ip_local_port_range (checked at start) and unbound.
    pub nat_ports: RangeInclusive<u16>,
    /// Sockets (and tasks) each listener's userspace datapath is spread over
    /// (`crate::datapath::shards`).
    pub shards: usize,
}

/// The most shards a listener takes.
const MAX_SHARDS: usize = 256;

/// Default NAT ports: below Linux's default ephemeral range (32768-60999).
pub const DEFAULT_NAT_PORTS: RangeInclusive<u16> = 16384..=32767;

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            kind: DatapathKind::Userspace,
            xdp_mode: XdpMode::Auto,
            interfaces: Vec::new(),
            nat_ports: DEFAULT_NAT_PORTS,
            // One per core: the shards' tasks run on the runtime's threads, one per core too.
            shards: std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_SHARDS)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DatapathKind {
    /// XDP where it attaches, else userspace (the reason is logged).
    Auto,
    /// XDP, or refuse to start.
    Xdp,
    Userspace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum XdpMode {
    /// Native per interface where the driver has it, generic elsewhere.
    Auto,
    /// In the driver: fastest; refuse interfaces without it.
    Native,
    /// In the kernel's network stack: works on any interface.
    Generic,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatapath {
    kind: Option<DatapathKind>,
    xdp_mode: Option<XdpMode>,
    interfaces: Option<Vec<String>>,
    /// "FIRST-LAST".
    nat_ports: Option<String>,
    shards: Option<usize>,
}

pub(super) fn build_datapath(raw: RawDatapath, place: &str) -> Result<DatapathConfig, ConfigError> {
    let err = |field: &str, reason: &str| ConfigError {
        place: place.into(),
        field: field.into(),
        reason: reason.into(),
    };
    let defaults = DatapathConfig::default();
    let nat_ports = match raw.nat_ports {
        Some(text) => parse_port_range(&text).ok_or_else(|| {
            err(
                "nat_ports",
                "expected FIRST-LAST, two ports from 1024 to 65535, e.g. \"16384-32767\"",
            )
        })?,
        None => defaults.nat_ports,
    };
    let interfaces = raw.interfaces.unwrap_or_default();
    if let Some(bad) = interfaces
        .iter()
        .find(|name| name.is_empty() || name.len() > 15 || name.contains(['/', ' ']))
    {
        return Err(err(
            "interfaces",
            &format!("`{bad}` is not an interface name"),
        ));
    }
    let shards = match raw.shards {
        Some(shards) if !(1..=MAX_SHARDS).contains(&shards) => {
            return Err(err(
                "shards",
                &format!("expected 1 to {MAX_SHARDS} (leave it out for one per core)"),
            ))
        }
        shards => shards.unwrap_or(defaults.shards),
    };
    Ok(DatapathConfig {
        kind: raw.kind.unwrap_or(defaults.kind),
        xdp_mode: raw.xdp_mode.unwrap_or(defaults.xdp_mode),
        interfaces,
        nat_ports,
        shards,
    })
}

/// "FIRST-LAST", unprivileged ports only.
fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let (first, last) = text.split_once('-')?;
    let first: u16 = first.trim().parse().ok()?;
    let last: u16 = last.trim().parse().ok()?;
    (1024 <= first && first <= last).then_some(first..=last)
}
