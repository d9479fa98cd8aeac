//! The balancer's configuration: a TOML file or command-line flags, both validated by the same
//! code so a mistake is refused the same way wherever it was made. Errors name the place (the
//! file line or the flag), the field and the reason.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

mod announce;

pub use announce::AnnounceConfig;
use announce::{build_announce, check_listener_addresses, RawAnnounce};

use crate::passive::{PassiveConfig, PassiveRole};
use crate::pool::{AdminState, AllDownPolicy, HashKey};
use wglb_common::xdp::MAX_LISTENERS;

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

/// A validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    pub health: HealthCheckConfig,
    pub metrics_listen: Option<SocketAddr>,
    pub api: ApiConfig,
    pub datapath: DatapathConfig,
    pub sync: SyncConfig,
    /// The gateway agents that may attach (`[[agent]]`); fixed for the process's life.
    pub agents: Vec<AgentConfig>,
    pub announce: AnnounceConfig,
    pub places: Places,
}

/// Where each section and setting of a configuration was written, so that a setting valid on
/// its own but refused later (a reload that changes what only a restart can apply) is named by
/// its line. Not part of equality: two configurations that say the same thing are the same,
/// wherever the file says it (the reload's merge compares gateways by value, and a gateway that
/// merely moved down the file did not change).
#[derive(Clone, Debug, Default)]
pub struct Places {
    /// The file's name, or "command line": names the settings written nowhere (defaults).
    source: String,
    /// By section ("[api]", "listener `office`") and field ("" for the section itself).
    written: HashMap<(String, String), String>,
}

impl PartialEq for Places {
    fn eq(&self, _: &Places) -> bool {
        true
    }
}

impl Places {
    /// Where `field` of `section` was written: its own line, else its section's, else the file.
    pub fn of(&self, section: &str, field: &str) -> String {
        let written = |field: &str| {
            self.written
                .get(&(section.to_string(), field.to_string()))
                .cloned()
        };
        written(field)
            .or_else(|| written(""))
            .unwrap_or_else(|| unplaced(&self.source, section))
    }
}

/// A setting that may be absent, for messages.
fn shown(value: Option<impl fmt::Display>) -> String {
    value.map_or_else(|| "unset".into(), |v| v.to_string())
}

fn unplaced(source: &str, what: &str) -> String {
    format!("{source} ({what})")
}

/// The file a balancer was started from, with the command-line settings that override it: a
/// reload reads the file as the start did, so an override is not a change.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub overrides: DatapathOverrides,
}

impl ConfigFile {
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(&self.path)?;
        self.overrides.apply(&mut config);
        Ok(config)
    }
}

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

/// Session sync with peer balancers. Fixed for the process's life: a reload does not change it.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncConfig {
    /// This balancer's name among its peers (default: the host name).
    pub node: String,
    pub peers: Vec<SyncPeerConfig>,
    /// Changes queued per peer; beyond it they are dropped (counted) and the peer is resynced.
    pub queue: usize,
}

/// A gateway's agent (`wglb-agent`): the token it attaches with names the gateway it speaks for.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    pub listener: String,
    pub gateway: String,
    /// Read at each attach, so that a rotated token needs no restart.
    pub token_file: PathBuf,
    /// Most handshake orders a second to this gateway: a gateway handed thousands of clients
    /// at once would otherwise fall into WireGuard's under-load mode (cookie replies).
    pub orders_per_second: u32,
}

pub const DEFAULT_AGENT_ORDERS_PER_SECOND: u32 = 200;

/// A peer balancer this one pushes its sessions to, through the peer's TCP API.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncPeerConfig {
    pub name: String,
    /// `http://` or `https://` URL of the peer's `[api] tcp`.
    pub url: String,
    /// The bearer token this balancer presents to the peer's API.
    pub token_file: Option<PathBuf>,
    /// The token the peer presents when it pushes its sessions here: its identity. Without one,
    /// the peer is whoever holds this balancer's API credentials and says it is this peer.
    pub accept_token_file: Option<PathBuf>,
    /// CA to verify the peer's certificate with.
    pub ca: Option<PathBuf>,
    /// Client certificate and key, when the peer asks for mutual TLS.
    pub identity: Option<TlsFiles>,
}

pub const DEFAULT_SYNC_QUEUE: usize = 65_536;

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
}

/// Default NAT ports: below Linux's default ephemeral range (32768-60999).
pub const DEFAULT_NAT_PORTS: RangeInclusive<u16> = 16384..=32767;

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            kind: DatapathKind::Userspace,
            xdp_mode: XdpMode::Auto,
            interfaces: Vec::new(),
            nat_ports: DEFAULT_NAT_PORTS,
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

/// Where the gRPC API is served. The Unix socket is always on (its file mode decides who may
/// drive the balancer); TCP only when configured, and then only authenticated unless
/// `allow_unauthenticated` says otherwise.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiConfig {
    pub socket: PathBuf,
    pub socket_mode: u32,
    /// The group that owns the socket, so its members may use the CLI without root.
    pub socket_group: Option<String>,
    pub tcp: Option<SocketAddr>,
    /// A file holding the bearer token TCP clients must present.
    pub token_file: Option<PathBuf>,
    /// Server certificate and key (PEM) for TLS on TCP.
    pub tls: Option<TlsFiles>,
    /// CA (PEM) that client certificates must chain to: mutual TLS.
    pub client_ca: Option<PathBuf>,
    pub allow_unauthenticated: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where the API listens unless configured otherwise, and where the CLI looks for it.
pub const DEFAULT_API_SOCKET: &str = "/run/wglb/api.sock";

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: PathBuf::from(DEFAULT_API_SOCKET),
            socket_mode: 0o660,
            socket_group: None,
            tcp: None,
            token_file: None,
            tls: None,
            client_ca: None,
            allow_unauthenticated: false,
        }
    }
}

/// A refused configuration: where, which field, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub place: String,
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.place, self.reason)
        } else {
            write!(f, "{}: field `{}`: {}", self.place, self.field, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

// ---- the TOML file ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    health: Option<Spanned<RawHealth>>,
    metrics: Option<RawMetrics>,
    api: Option<Spanned<RawApi>>,
    datapath: Option<Spanned<RawDatapath>>,
    sync: Option<Spanned<RawSync>>,
    announce: Option<Spanned<RawAnnounce>>,
    #[serde(default)]
    listener: Vec<Spanned<RawListener>>,
    #[serde(default)]
    agent: Vec<Spanned<RawAgent>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    listener: String,
    gateway: String,
    token_file: PathBuf,
    orders_per_second: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSync {
    node: Option<String>,
    queue: Option<usize>,
    #[serde(default)]
    peer: Vec<Spanned<RawSyncPeer>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSyncPeer {
    name: String,
    url: String,
    token_file: Option<PathBuf>,
    accept_token_file: Option<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDatapath {
    kind: Option<DatapathKind>,
    xdp_mode: Option<XdpMode>,
    interfaces: Option<Vec<String>>,
    /// "FIRST-LAST".
    nat_ports: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
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

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    socket: Option<PathBuf>,
    /// Octal, as a string: "0660".
    socket_mode: Option<String>,
    socket_group: Option<String>,
    tcp: Option<SocketAddr>,
    token_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    allow_unauthenticated: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: SocketAddr,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Option<String>,
    listen: Option<SocketAddr>,
    source: Option<IpAddr>,
    hash_key: Option<HashKey>,
    #[serde(default, with = "opt_duration")]
    idle_timeout: Option<Duration>,
    table_size: Option<usize>,
    maglev_size: Option<u32>,
    all_down: Option<AllDownPolicy>,
    socket_buffer: Option<usize>,
    probation_size: Option<usize>,
    source_rate: Option<u32>,
    source_burst: Option<u32>,
    source_unconfirmed: Option<u32>,
    public_key: Option<String>,
    #[serde(default)]
    announce: Vec<IpAddr>,
    #[serde(default)]
    gateway: Vec<Spanned<RawGateway>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    name: String,
    address: SocketAddr,
    weight: Option<u32>,
    state: Option<AdminState>,
    health_port: Option<u16>,
}

mod opt_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{text}` is not a duration ({e}); write e.g. \"1s\" or \"500ms\""
            ))
        })
    }
}

/// Where a piece of configuration came from, for error messages.
#[derive(Clone, Copy)]
enum Origin<'a> {
    File { path: &'a str, text: &'a str },
    Flags,
}

impl Origin<'_> {
    fn place(&self, span: Option<Range<usize>>, what: &str) -> String {
        match (self, span) {
            (Origin::File { path, text }, Some(span)) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                if what.is_empty() {
                    format!("{path} line {line}")
                } else {
                    format!("{path} line {line} ({what})")
                }
            }
            (Origin::File { path, .. }, None) => unplaced(path, what),
            (Origin::Flags, _) => unplaced("command line", what),
        }
    }

    fn source(&self) -> &str {
        match self {
            Origin::File { path, .. } => path,
            Origin::Flags => "command line",
        }
    }
}

/// A section's span and the spans of the keys written in it.
type Written = (Range<usize>, Vec<(String, Range<usize>)>);

/// What the document writes where: each top-level table by name, and each `[[listener]]`.
#[derive(Default)]
struct Layout {
    tables: HashMap<String, Written>,
    listeners: Vec<Written>,
}

impl Layout {
    fn of(document: &DeTable) -> Layout {
        let written = |value: &Spanned<DeValue>| {
            let keys = match value.get_ref() {
                DeValue::Table(table) => table
                    .iter()
                    .map(|(key, _)| (key.get_ref().to_string(), key.span()))
                    .collect(),
                _ => Vec::new(),
            };
            (value.span(), keys)
        };
        let mut layout = Layout::default();
        for (key, value) in document.iter() {
            match (key.get_ref().as_ref(), value.get_ref()) {
                ("listener", DeValue::Array(listeners)) => {
                    layout.listeners = listeners.iter().map(written).collect()
                }
                (name, _) => {
                    layout.tables.insert(name.to_string(), written(value));
                }
            }
        }
        layout
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        Ok(Config::parse(&text, &path.display().to_string())?)
    }

    /// Parses and validates TOML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let origin = Origin::File { path, text };
        let refused = |e: toml::de::Error| ConfigError {
            place: origin.place(e.span(), ""),
            field: String::new(),
            reason: e.message().trim().to_string(),
        };
        let document = DeTable::parse(text).map_err(refused)?;
        let layout = Layout::of(document.get_ref());
        let raw =
            RawConfig::deserialize(toml::de::Deserializer::from(document)).map_err(refused)?;
        build(raw, origin, layout)
    }

    /// Builds a configuration with one listener from command-line values.
    pub fn from_flags(flags: &ListenerFlags) -> Result<Config, ConfigError> {
        let mut gateways = Vec::new();
        for spec in &flags.gateways {
            gateways.push(Spanned::new(0..0, parse_gateway_flag(spec)?));
        }
        let listener = RawListener {
            name: Some(flags.name.clone()),
            listen: Some(flags.listen),
            source: flags.source,
            hash_key: flags.hash_key,
            idle_timeout: flags.idle_timeout,
            table_size: flags.table_size,
            maglev_size: None,
            all_down: flags.all_down,
            gateway: gateways,
            ..RawListener::default()
        };
        let raw = RawConfig {
            health: None,
            metrics: flags.metrics_listen.map(|listen| RawMetrics { listen }),
            api: flags.api_socket.clone().map(|socket| {
                Spanned::new(
                    0..0,
                    RawApi {
                        socket: Some(socket),
                        ..RawApi::default()
                    },
                )
            }),
            datapath: None,
            sync: None,
            announce: None,
            listener: vec![Spanned::new(0..0, listener)],
            agent: Vec::new(),
        };
        build(raw, Origin::Flags, Layout::default())
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// What `new` changes that only a restart can apply: the set of listeners and their sockets
    /// (`listen`, `source`, `socket_buffer`), their Maglev table sizes, [metrics], [api],
    /// [datapath] and [sync]. Each is named where `new` writes it (or would).
    pub fn needs_restart(&self, new: &Config) -> Vec<ConfigError> {
        let mut changes = Vec::new();
        let mut compare = |section: &str, field: &str, old: String, now: String| {
            if old != now {
                changes.push(ConfigError {
                    place: new.places.of(section, field),
                    field: field.into(),
                    reason: format!("changed from {old} to {now}; that needs a restart"),
                });
            }
        };
        for listener in &new.listeners {
            let section = format!("listener `{}`", listener.name);
            let Some(old) = self.listener(&listener.name) else {
                compare(
                    &section,
                    "name",
                    "no such listener".into(),
                    listener.name.clone(),
                );
                continue;
            };
            compare(
                &section,
                "listen",
                old.listen.to_string(),
                listener.listen.to_string(),
            );
            compare(
                &section,
                "source",
                shown(old.source),
                shown(listener.source),
            );
            compare(
                &section,
                "socket_buffer",
                old.socket_buffer.to_string(),
                listener.socket_buffer.to_string(),
            );
            compare(
                &section,
                "maglev_size",
                old.maglev_size.to_string(),
                listener.maglev_size.to_string(),
            );
            compare(
                &section,
                "announce",
                format!("{:?}", old.announce),
                format!("{:?}", listener.announce),
            );
            // The XDP program's session maps are sized at load; the userspace tables resize.
            if self.datapath.kind != DatapathKind::Userspace {
                compare(
                    &section,
                    "table_size",
                    old.table_size.to_string(),
                    listener.table_size.to_string(),
                );
                compare(
                    &section,
                    "probation_size",
                    old.admission.probation_size.to_string(),
                    listener.admission.probation_size.to_string(),
                );
            }
        }
        for old in &self.listeners {
            if new.listener(&old.name).is_none() {
                let section = format!("listener `{}`", old.name);
                compare(
                    &section,
                    "name",
                    old.name.clone(),
                    "no such listener".into(),
                );
            }
        }
        compare(
            "[metrics]",
            "listen",
            shown(self.metrics_listen),
            shown(new.metrics_listen),
        );
        let (old, now) = (&self.announce, &new.announce);
        compare(
            "[announce]",
            "table",
            old.table.to_string(),
            now.table.to_string(),
        );
        compare(
            "[announce]",
            "device",
            old.device.clone(),
            now.device.clone(),
        );
        compare(
            "[announce]",
            "withdraw_wait",
            humantime::format_duration(old.withdraw_wait).to_string(),
            humantime::format_duration(now.withdraw_wait).to_string(),
        );
        compare(
            "[announce]",
            "sync_wait",
            humantime::format_duration(old.sync_wait).to_string(),
            humantime::format_duration(now.sync_wait).to_string(),
        );
        let (old, now) = (&self.api, &new.api);
        let path = |p: Option<&Path>| shown(p.map(Path::display));
        compare(
            "[api]",
            "socket",
            path(Some(&old.socket)),
            path(Some(&now.socket)),
        );
        compare(
            "[api]",
            "socket_mode",
            format!("{:04o}", old.socket_mode),
            format!("{:04o}", now.socket_mode),
        );
        compare(
            "[api]",
            "socket_group",
            shown(old.socket_group.as_ref()),
            shown(now.socket_group.as_ref()),
        );
        compare("[api]", "tcp", shown(old.tcp), shown(now.tcp));
        compare(
            "[api]",
            "token_file",
            path(old.token_file.as_deref()),
            path(now.token_file.as_deref()),
        );
        compare(
            "[api]",
            "tls_cert",
            path(old.tls.as_ref().map(|t| t.cert.as_path())),
            path(now.tls.as_ref().map(|t| t.cert.as_path())),
        );
        compare(
            "[api]",
            "tls_key",
            path(old.tls.as_ref().map(|t| t.key.as_path())),
            path(now.tls.as_ref().map(|t| t.key.as_path())),
        );
        compare(
            "[api]",
            "client_ca",
            path(old.client_ca.as_deref()),
            path(now.client_ca.as_deref()),
        );
        compare(
            "[api]",
            "allow_unauthenticated",
            old.allow_unauthenticated.to_string(),
            now.allow_unauthenticated.to_string(),
        );
        let (old, now) = (&self.datapath, &new.datapath);
        let named = |value: &dyn fmt::Debug| format!("{value:?}").to_lowercase();
        compare("[datapath]", "kind", named(&old.kind), named(&now.kind));
        compare(
            "[datapath]",
            "xdp_mode",
            named(&old.xdp_mode),
            named(&now.xdp_mode),
        );
        compare(
            "[datapath]",
            "interfaces",
            format!("[{}]", old.interfaces.join(", ")),
            format!("[{}]", now.interfaces.join(", ")),
        );
        let ports = |p: &RangeInclusive<u16>| format!("{}-{}", p.start(), p.end());
        compare(
            "[datapath]",
            "nat_ports",
            ports(&old.nat_ports),
            ports(&now.nat_ports),
        );
        let (old, now) = (&self.sync, &new.sync);
        compare("[sync]", "node", old.node.clone(), now.node.clone());
        compare(
            "[sync]",
            "queue",
            old.queue.to_string(),
            now.queue.to_string(),
        );
        let peers = |sync: &SyncConfig| {
            let shown: Vec<String> = sync
                .peers
                .iter()
                .map(|p| {
                    let files = [
                        ("token_file", p.token_file.as_deref()),
                        ("ca", p.ca.as_deref()),
                        ("cert", p.identity.as_ref().map(|i| i.cert.as_path())),
                        ("key", p.identity.as_ref().map(|i| i.key.as_path())),
                    ];
                    let files: String = files
                        .iter()
                        .filter_map(|(field, file)| {
                            file.map(|f| format!(" {field} {}", f.display()))
                        })
                        .collect();
                    format!("{} at {}{files}", p.name, p.url)
                })
                .collect();
            format!("[{}]", shown.join(", "))
        };
        compare("[sync]", "peer", peers(old), peers(now));
        let agents = |agents: &[AgentConfig]| {
            let shown: Vec<String> = agents
                .iter()
                .map(|a| {
                    format!(
                        "{}/{} token_file {} at {}/s",
                        a.listener,
                        a.gateway,
                        a.token_file.display(),
                        a.orders_per_second
                    )
                })
                .collect();
            format!("[{}]", shown.join(", "))
        };
        compare(
            "[[agent]]",
            "gateway",
            agents(&self.agents),
            agents(&new.agents),
        );
        changes
    }
}

/// The single-listener form of the configuration, as `wglb run` flags give it.
#[derive(Clone, Debug)]
pub struct ListenerFlags {
    pub name: String,
    pub listen: SocketAddr,
    pub source: Option<IpAddr>,
    pub gateways: Vec<String>,
    pub hash_key: Option<HashKey>,
    pub idle_timeout: Option<Duration>,
    pub table_size: Option<usize>,
    pub all_down: Option<AllDownPolicy>,
    pub metrics_listen: Option<SocketAddr>,
    pub api_socket: Option<PathBuf>,
}

/// `NAME=ADDR:PORT[,weight=N][,state=S][,health-port=P]`
fn parse_gateway_flag(spec: &str) -> Result<RawGateway, ConfigError> {
    let err = |field: &str, reason: String| ConfigError {
        place: format!("command line (--gateway {spec})"),
        field: field.into(),
        reason,
    };
    let (name, rest) = spec.split_once('=').ok_or_else(|| {
        err(
            "gateway",
            "expected NAME=ADDRESS:PORT[,weight=N][,state=active|draining|down][,health-port=P]"
                .into(),
        )
    })?;
    let mut parts = rest.split(',');
    let address = parts.next().unwrap_or_default();
    let address: SocketAddr = address.parse().map_err(|e| {
        err(
            "address",
            format!("`{address}` is not ADDRESS:PORT ({e}); IPv6 as [::1]:51820"),
        )
    })?;
    let mut gateway = RawGateway {
        name: name.to_string(),
        address,
        weight: None,
        state: None,
        health_port: None,
    };
    for option in parts {
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| err(option, "expected KEY=VALUE".into()))?;
        match key {
            "weight" => {
                gateway.weight = Some(
                    value
                        .parse()
                        .map_err(|e| err("weight", format!("`{value}`: {e}")))?,
                )
            }
            "state" => {
                gateway.state = Some(AdminState::parse(value).ok_or_else(|| {
                    err(
                        "state",
                        format!("`{value}` is not one of active, draining, down"),
                    )
                })?)
            }
            "health-port" => {
                gateway.health_port = Some(
                    value
                        .parse()
                        .map_err(|e| err("health-port", format!("`{value}`: {e}")))?,
                )
            }
            other => {
                return Err(err(
                    other,
                    "unknown option; known: weight, state, health-port".into(),
                ))
            }
        }
    }
    Ok(gateway)
}

fn build(raw: RawConfig, origin: Origin<'_>, layout: Layout) -> Result<Config, ConfigError> {
    let mut places = Places {
        source: origin.source().to_string(),
        written: HashMap::new(),
    };
    let mut record = |what: &str, (span, keys): &Written| {
        let mut written = |field: &str, span: &Range<usize>| {
            let place = origin.place(Some(span.clone()), what);
            places
                .written
                .insert((what.to_string(), field.to_string()), place);
        };
        written("", span);
        for (field, span) in keys {
            written(field, span);
        }
    };
    for (name, table) in &layout.tables {
        record(&format!("[{name}]"), table);
    }
    let defaults = HealthCheckConfig::default();
    let health_span = raw.health.as_ref().map(|h| h.span());
    let raw_health = raw.health.map(Spanned::into_inner).unwrap_or_default();
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

    if raw.listener.is_empty() {
        return Err(ConfigError {
            place: origin.place(None, "top level"),
            field: "listener".into(),
            reason: "no [[listener]] configured; a balancer needs at least one".into(),
        });
    }
    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    for (index, spanned) in raw.listener.into_iter().enumerate() {
        let span = spanned.span();
        let listener = spanned.into_inner();
        let what = format!(
            "listener {}",
            listener
                .name
                .as_deref()
                .map_or(format!("#{}", index + 1), |n| format!("`{n}`"))
        );
        if let Some(written) = layout.listeners.get(index) {
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
    let api = match raw.api {
        Some(spanned) => {
            let span = spanned.span();
            build_api(spanned.into_inner(), &origin.place(Some(span), "[api]"))?
        }
        None => ApiConfig::default(),
    };
    let datapath = match raw.datapath {
        Some(spanned) => {
            let span = spanned.span();
            build_datapath(
                spanned.into_inner(),
                &origin.place(Some(span), "[datapath]"),
            )?
        }
        None => DatapathConfig::default(),
    };
    if datapath.kind != DatapathKind::Userspace && listeners.len() > MAX_LISTENERS as usize {
        return Err(ConfigError {
            place: origin.place(None, "[datapath]"),
            field: "kind".into(),
            reason: format!("the XDP datapath serves at most {MAX_LISTENERS} listeners"),
        });
    }
    let sync = build_sync(raw.sync, &api, origin)?;
    let agents = build_agents(raw.agent, &listeners, &api, origin)?;
    let announce = build_announce(raw.announce, &origin)?;
    Ok(Config {
        listeners,
        health,
        metrics_listen: raw.metrics.map(|m| m.listen),
        api,
        datapath,
        sync,
        agents,
        announce,
        places,
    })
}

fn build_agents(
    raw: Vec<Spanned<RawAgent>>,
    listeners: &[ListenerConfig],
    api: &ApiConfig,
    origin: Origin<'_>,
) -> Result<Vec<AgentConfig>, ConfigError> {
    let mut agents: Vec<AgentConfig> = Vec::new();
    for spanned in raw {
        let span = Some(spanned.span());
        let agent = spanned.into_inner();
        let err = |field: &str, reason: String| ConfigError {
            place: origin.place(span.clone(), "[[agent]]"),
            field: field.into(),
            reason,
        };
        if api.tcp.is_none() {
            return Err(err(
                "listener",
                "agents attach to this balancer's TCP API: set [api] tcp".into(),
            ));
        }
        let Some(listener) = listeners.iter().find(|l| l.name == agent.listener) else {
            return Err(err("listener", format!("no listener `{}`", agent.listener)));
        };
        if !listener.gateways.iter().any(|g| g.name == agent.gateway) {
            return Err(err(
                "gateway",
                format!(
                    "listener `{}` has no gateway `{}`",
                    listener.name, agent.gateway
                ),
            ));
        }
        if agents
            .iter()
            .any(|a| a.listener == agent.listener && a.gateway == agent.gateway)
        {
            return Err(err(
                "gateway",
                format!("gateway `{}` has two agents", agent.gateway),
            ));
        }
        let orders_per_second = agent
            .orders_per_second
            .unwrap_or(DEFAULT_AGENT_ORDERS_PER_SECOND);
        if !(1..=100_000).contains(&orders_per_second) {
            return Err(err("orders_per_second", "must be from 1 to 100000".into()));
        }
        agents.push(AgentConfig {
            listener: agent.listener,
            gateway: agent.gateway,
            token_file: agent.token_file,
            orders_per_second,
        });
    }
    Ok(agents)
}

fn build_sync(
    raw: Option<Spanned<RawSync>>,
    api: &ApiConfig,
    origin: Origin<'_>,
) -> Result<SyncConfig, ConfigError> {
    let span = raw.as_ref().map(|r| r.span());
    let raw = raw.map(Spanned::into_inner).unwrap_or_default();
    let err = |span: Option<Range<usize>>, what: &str, field: &str, reason: &str| ConfigError {
        place: origin.place(span, what),
        field: field.into(),
        reason: reason.into(),
    };
    let node = match raw.node {
        Some(node) => node,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .unwrap_or_else(|_| "wglb".into()),
    };
    if node.is_empty() || node.len() > 64 {
        return Err(err(span, "[sync]", "node", "must be 1 to 64 characters"));
    }
    let queue = raw.queue.unwrap_or(DEFAULT_SYNC_QUEUE);
    if !(64..=16_777_216).contains(&queue) {
        return Err(err(
            span,
            "[sync]",
            "queue",
            "must be from 64 to 16777216 changes",
        ));
    }
    if !raw.peer.is_empty() && api.tcp.is_none() {
        return Err(err(
            span,
            "[sync]",
            "peer",
            "peers push their sessions to this balancer's TCP API too: set [api] tcp (with a \
             token_file or client_ca) on every balancer of the group",
        ));
    }
    let mut peers: Vec<SyncPeerConfig> = Vec::new();
    for spanned in raw.peer {
        let span = Some(spanned.span());
        let peer = spanned.into_inner();
        let err = |field: &str, reason: &str| err(span.clone(), "[[sync.peer]]", field, reason);
        if peer.name.is_empty() || peer.name == node {
            return Err(err(
                "name",
                "must be set and differ from this balancer's node name",
            ));
        }
        if peers.iter().any(|p| p.name == peer.name) {
            return Err(err(
                "name",
                &format!("peer `{}` is defined twice", peer.name),
            ));
        }
        let https = peer.url.starts_with("https://");
        if !https && !peer.url.starts_with("http://") {
            return Err(err(
                "url",
                "expected the peer's API as http://HOST:PORT or https://HOST:PORT",
            ));
        }
        let identity = match (peer.cert, peer.key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => return Err(err("cert", "cert and key go together")),
        };
        if (identity.is_some() || peer.ca.is_some()) && !https {
            return Err(err(
                "url",
                "a CA or client certificate needs an https:// URL",
            ));
        }
        peers.push(SyncPeerConfig {
            name: peer.name,
            url: peer.url,
            token_file: peer.token_file,
            accept_token_file: peer.accept_token_file,
            ca: peer.ca,
            identity,
        });
    }
    Ok(SyncConfig { node, peers, queue })
}

fn build_datapath(raw: RawDatapath, place: &str) -> Result<DatapathConfig, ConfigError> {
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
    Ok(DatapathConfig {
        kind: raw.kind.unwrap_or(defaults.kind),
        xdp_mode: raw.xdp_mode.unwrap_or(defaults.xdp_mode),
        interfaces,
        nat_ports,
    })
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

/// "FIRST-LAST", unprivileged ports only.
fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let (first, last) = text.split_once('-')?;
    let first: u16 = first.trim().parse().ok()?;
    let last: u16 = last.trim().parse().ok()?;
    (1024 <= first && first <= last).then_some(first..=last)
}

fn build_api(raw: RawApi, place: &str) -> Result<ApiConfig, ConfigError> {
    let err = |field: &str, reason: &str| ConfigError {
        place: place.into(),
        field: field.into(),
        reason: reason.into(),
    };
    let defaults = ApiConfig::default();
    let socket_mode = match raw.socket_mode {
        Some(text) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
            .ok()
            .filter(|mode| *mode <= 0o777)
            .ok_or_else(|| {
                err(
                    "socket_mode",
                    "expected an octal file mode such as \"0660\"",
                )
            })?,
        None => defaults.socket_mode,
    };
    let tls = match (raw.tls_cert, raw.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (None, None) => None,
        _ => return Err(err("tls_cert", "tls_cert and tls_key go together")),
    };
    if raw.client_ca.is_some() && tls.is_none() {
        return Err(err(
            "client_ca",
            "client certificates need TLS: set tls_cert and tls_key too",
        ));
    }
    let allow_unauthenticated = raw.allow_unauthenticated.unwrap_or(false);
    if raw.tcp.is_some()
        && raw.token_file.is_none()
        && raw.client_ca.is_none()
        && !allow_unauthenticated
    {
        return Err(err(
            "tcp",
            "a TCP API needs a token_file or client_ca (mutual TLS); anyone reaching the port could \
             otherwise drive the balancer (set allow_unauthenticated = true to accept that)",
        ));
    }
    let socket = raw.socket.unwrap_or(defaults.socket);
    if socket.as_os_str().is_empty() {
        return Err(err("socket", "must not be empty"));
    }
    if raw.socket_group.as_deref() == Some("") {
        return Err(err("socket_group", "must not be empty"));
    }
    Ok(ApiConfig {
        socket,
        socket_mode,
        socket_group: raw.socket_group,
        tcp: raw.tcp,
        token_file: raw.token_file,
        tls,
        client_ca: raw.client_ca,
        allow_unauthenticated,
    })
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

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n as u64)
            .all(|d| !(n as u64).is_multiple_of(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[health]
interval = "500ms"
fall = 2

[metrics]
listen = "127.0.0.1:9638"

[[listener]]
name = "office"
listen = "0.0.0.0:51820"
hash_key = "source-ip-port"
idle_timeout = "5m"

[[listener.gateway]]
name = "gw1"
address = "10.0.0.2:51820"
health_port = 55003

[[listener.gateway]]
name = "gw2"
address = "10.0.0.3:51820"
weight = 3
state = "draining"

[[listener]]
name = "lab6"
listen = "[::]:51821"
all_down = "drop"

[[listener.gateway]]
name = "v6"
address = "[fd00::2]:51820"
"#;

    #[test]
    fn parses_a_full_file() {
        let config = Config::parse(GOOD, "wglb.toml").unwrap();
        assert_eq!(config.health.interval, Duration::from_millis(500));
        assert_eq!(config.health.fall, 2);
        assert_eq!(config.health.rise, 1);
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9638".parse().unwrap())
        );
        let office = config.listener("office").unwrap();
        assert_eq!(office.hash_key, HashKey::SourceIpPort);
        assert_eq!(office.idle_timeout, Duration::from_secs(300));
        assert_eq!(office.table_size.get(), DEFAULT_TABLE_SIZE);
        assert_eq!(office.gateways[1].weight, 3);
        assert_eq!(office.gateways[1].state, AdminState::Draining);
        assert_eq!(office.gateways[0].health_port, Some(55003));
        let lab6 = config.listener("lab6").unwrap();
        assert_eq!(lab6.hash_key, HashKey::SourceIp);
        assert_eq!(lab6.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(lab6.all_down, AllDownPolicy::Drop);
        assert!(lab6.gateways[0].address.is_ipv6());
    }

    fn refused(text: &str) -> String {
        Config::parse(text, "wglb.toml").unwrap_err().to_string()
    }

    #[test]
    fn names_line_field_and_reason() {
        let duplicate = GOOD.replace("name = \"gw2\"", "name = \"gw1\"");
        let msg = refused(&duplicate);
        assert!(msg.starts_with("wglb.toml line 20"), "{msg}");
        assert!(
            msg.contains("field `name`") && msg.contains("used twice"),
            "{msg}"
        );

        let msg = refused(&GOOD.replace("weight = 3", "weight = 0"));
        assert!(
            msg.contains("line 20") && msg.contains("field `weight`") && msg.contains("draining"),
            "{msg}"
        );

        let msg = refused(&GOOD.replace("\"10.0.0.3:51820\"", "\"10.0.0.3\""));
        assert!(
            msg.contains("line 22") && msg.contains("invalid socket address"),
            "{msg}"
        );

        let msg = refused(&GOOD.replace("state = \"draining\"", "state = \"sleepy\""));
        assert!(msg.contains("line 24") && msg.contains("sleepy"), "{msg}");

        let msg = refused(&GOOD.replace("idle_timeout = \"5m\"", "idle_timeout = \"soon\""));
        assert!(
            msg.contains("line 13") && msg.contains("not a duration"),
            "{msg}"
        );

        let msg = refused(&GOOD.replace("hash_key = \"source-ip-port\"", "hash_key = \"dest\""));
        assert!(msg.contains("line 12") && msg.contains("dest"), "{msg}");

        let msg = refused(&GOOD.replace("health_port = 55003", "helth_port = 55003"));
        assert!(
            msg.contains("line 18") && msg.contains("helth_port"),
            "{msg}"
        );

        let msg = refused(&GOOD.replace("listen = \"[::]:51821\"", "listen = \"0.0.0.0:51820\""));
        assert!(
            msg.contains("line 26")
                && msg.contains("field `listen`")
                && msg.contains("another listener"),
            "{msg}"
        );

        let msg = refused(&GOOD.replace(
            "all_down = \"drop\"",
            "all_down = \"drop\"\nmaglev_size = 65536",
        ));
        assert!(
            msg.contains("line 26") && msg.contains("not prime"),
            "{msg}"
        );

        let msg = refused(&GOOD.replace("fall = 2", "eviction_delay = \"20s\""));
        assert!(
            msg.contains("line 2 ([health])") && msg.contains("eviction_delay"),
            "{msg}"
        );
        for (line, field) in [
            ("passive = \"maybe\"", "passive"),
            ("passive_clients = 0", "passive_clients"),
            ("passive_window = \"500ms\"", "passive_window"),
        ] {
            let msg = refused(&GOOD.replace("fall = 2", line));
            assert!(
                msg.contains("line 2 ([health])") && msg.contains(field),
                "{msg}"
            );
        }
        let msg = refused(&GOOD.replace("idle_timeout = \"5m\"", "public_key = \"c2hvcnQ=\""));
        assert!(
            msg.contains("line 9 (listener `office`)") && msg.contains("public_key"),
            "{msg}"
        );
        let key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        let keyed = Config::parse(
            &GOOD.replace("idle_timeout = \"5m\"", &format!("public_key = \"{key}\"")),
            "wglb.toml",
        )
        .expect("valid");
        assert!(keyed.listeners[0].public_key.is_some() && keyed.listeners[1].public_key.is_none());
        let watching = Config::parse(
            &GOOD.replace("fall = 2", "passive = \"watch\""),
            "wglb.toml",
        )
        .expect("valid");
        assert_eq!(watching.health.passive.role, PassiveRole::Watch);

        let msg = refused(&format!("[datapath]\nnat_ports = \"40000-30000\"\n{GOOD}"));
        assert!(
            msg.contains("line 1 ([datapath])") && msg.contains("field `nat_ports`"),
            "{msg}"
        );
        let msg = refused(&format!("[datapath]\nkind = \"kernel\"\n{GOOD}"));
        assert!(msg.contains("line 2") && msg.contains("kernel"), "{msg}");
        let msg = refused(&format!("[datapath]\ninterfaces = [\"\"]\n{GOOD}"));
        assert!(msg.contains("field `interfaces`"), "{msg}");

        let msg = refused(&GOOD.replace("fall = 2", "fall = 0"));
        assert!(
            msg.contains("[health]") && msg.contains("field `fall`"),
            "{msg}"
        );

        let msg = refused("[health]\n");
        assert!(msg.contains("no [[listener]]"), "{msg}");

        let msg = refused("[[listener]]\nname = \"x\"\nlisten = \"0.0.0.0:1\"\n");
        assert!(
            msg.contains("line 1") && msg.contains("no [[listener.gateway]]"),
            "{msg}"
        );
    }

    #[test]
    fn refuses_mixed_families_with_a_source() {
        let text = "[[listener]]\nname = \"x\"\nlisten = \"0.0.0.0:1\"\nsource = \"10.0.0.1\"\n\n[[listener.gateway]]\nname = \"g\"\naddress = \"[fd00::1]:51820\"\n";
        let msg = refused(text);
        assert!(msg.contains("line 6") && msg.contains("family"), "{msg}");
    }

    #[test]
    fn refuses_an_unauthenticated_tcp_api_and_bad_health_quorums() {
        let listener = "[[listener]]\nname = \"l\"\nlisten = \"0.0.0.0:51820\"\n\
                        [[listener.gateway]]\nname = \"g\"\naddress = \"10.0.0.2:51820\"\n";
        let open = format!("[api]\ntcp = \"0.0.0.0:9639\"\n{listener}");
        let msg = refused(&open);
        assert!(
            msg.contains("line 1 ([api])")
                && msg.contains("field `tcp`")
                && msg.contains("token_file"),
            "{msg}"
        );
        let allowed =
            format!("[api]\ntcp = \"0.0.0.0:9639\"\nallow_unauthenticated = true\n{listener}");
        assert!(
            Config::parse(&allowed, "t.toml")
                .unwrap()
                .api
                .allow_unauthenticated
        );
        let tokened = format!(
            "[api]\nsocket = \"/tmp/a.sock\"\nsocket_mode = \"0600\"\ntcp = \"0.0.0.0:9639\"\ntoken_file = \"/etc/wglb/token\"\n{listener}"
        );
        let api = Config::parse(&tokened, "t.toml").unwrap().api;
        assert_eq!((api.socket_mode, api.tcp.is_some()), (0o600, true));
        let msg = refused(&format!("[api]\nsocket_mode = \"rw-rw----\"\n{listener}"));
        assert!(msg.contains("field `socket_mode`"), "{msg}");
        let msg = refused(&format!("[api]\nclient_ca = \"/ca.pem\"\n{listener}"));
        assert!(msg.contains("need TLS"), "{msg}");
        let msg = refused(&format!("[health]\nquorum = 0\n{listener}"));
        assert!(msg.contains("field `quorum`"), "{msg}");
    }

    #[test]
    fn sync_peers_need_a_tcp_api_and_distinct_names() {
        let api = "[api]\ntcp = \"127.0.0.1:7443\"\ntoken_file = \"/etc/wglb/token\"\n";
        let sync = "[sync]\nnode = \"lb-a\"\n[[sync.peer]]\nname = \"lb-b\"\nurl = \"http://10.0.0.2:7443\"\ntoken_file = \"/etc/wglb/token\"\n";
        let config = Config::parse(&format!("{api}{sync}{GOOD}"), "wglb.toml").unwrap();
        assert_eq!(config.sync.node, "lb-a");
        assert_eq!(config.sync.peers[0].url, "http://10.0.0.2:7443");
        assert_eq!(config.sync.queue, DEFAULT_SYNC_QUEUE);

        let msg = refused(&format!("{sync}{GOOD}"));
        assert!(msg.contains("line 1") && msg.contains("[api] tcp"), "{msg}");
        let msg = refused(&format!("{api}{}{GOOD}", sync.replace("lb-b", "lb-a")));
        assert!(
            msg.contains("line 6") && msg.contains("field `name`"),
            "{msg}"
        );
        let msg = refused(&format!("{api}{}{GOOD}", sync.replace("http://", "ftp://")));
        assert!(
            msg.contains("line 6") && msg.contains("field `url`"),
            "{msg}"
        );
        let msg = refused(&format!(
            "{api}{}{GOOD}",
            sync.replace("node = \"lb-a\"", "queue = 1")
        ));
        assert!(
            msg.contains("line 4") && msg.contains("field `queue`"),
            "{msg}"
        );
    }

    #[test]
    fn builds_from_flags() {
        let flags = ListenerFlags {
            name: "default".into(),
            listen: "0.0.0.0:51820".parse().unwrap(),
            gateways: vec![
                "gw1=10.0.0.2:51820".into(),
                "gw2=[fd00::3]:51820,weight=2,state=down,health-port=55003".into(),
            ],
            source: None,
            hash_key: None,
            idle_timeout: None,
            table_size: None,
            all_down: None,
            metrics_listen: None,
            api_socket: Some("/tmp/wglb-flags.sock".into()),
        };
        let config = Config::from_flags(&flags).unwrap();
        assert_eq!(config.api.socket, PathBuf::from("/tmp/wglb-flags.sock"));
        let gateways = &config.listeners[0].gateways;
        assert_eq!(gateways[0].weight, 1);
        assert_eq!(gateways[1].weight, 2);
        assert_eq!(gateways[1].state, AdminState::Down);
        assert_eq!(gateways[1].health_port, Some(55003));

        let bad = ListenerFlags {
            gateways: vec!["gw1=10.0.0.2:51820,speed=9".into()],
            ..flags.clone()
        };
        let msg = Config::from_flags(&bad).unwrap_err().to_string();
        assert!(
            msg.contains("--gateway gw1=10.0.0.2:51820,speed=9") && msg.contains("speed"),
            "{msg}"
        );
        let bad = ListenerFlags {
            gateways: vec![],
            ..flags
        };
        let msg = Config::from_flags(&bad).unwrap_err().to_string();
        assert!(
            msg.contains("command line") && msg.contains("gateway"),
            "{msg}"
        );
    }

    #[test]
    fn announce_is_checked_against_the_listeners_and_the_kernel() {
        let announcing = |line: &str| {
            GOOD.replace(
                "hash_key = \"source-ip-port\"\n",
                &format!("hash_key = \"source-ip-port\"\n{line}\n"),
            )
        };
        let config = Config::parse(&announcing("announce = [\"203.0.113.10\"]"), "wglb.toml")
            .expect("an IPv4 address on a 0.0.0.0 listener");
        assert_eq!(
            config.listeners[0].announce,
            ["203.0.113.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(config.announce, AnnounceConfig::default());

        let msg = refused(&announcing("announce = [\"2001:db8::1\"]"));
        assert!(
            msg.contains("line 9")
                && msg.contains("field `announce`")
                && msg.contains("does not reach"),
            "{msg}"
        );
        let msg = refused(&announcing(
            "announce = [\"203.0.113.10\", \"203.0.113.10\"]",
        ));
        assert!(msg.contains("listed twice"), "{msg}");
        let msg = refused(&announcing("announce = [\"127.0.0.1\"]"));
        assert!(msg.contains("unicast address routers can reach"), "{msg}");

        let msg = refused(&format!("[announce]\ntable = 254\n{GOOD}"));
        assert!(
            msg.contains("line 1") && msg.contains("field `table`") && msg.contains("main (254)"),
            "{msg}"
        );
        let msg = refused(&format!(
            "[announce]\ndevice = \"much-too-long-name\"\n{GOOD}"
        ));
        assert!(msg.contains("field `device`"), "{msg}");
        let msg = refused(&format!("[announce]\nwithdraw_wait = \"2m\"\n{GOOD}"));
        assert!(msg.contains("field `withdraw_wait`"), "{msg}");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../../deploy/wglb.example.toml");
        let config = Config::parse(text, "wglb.example.toml").unwrap();
        assert_eq!(config.listeners.len(), 2);
        assert_eq!(config.listeners[0].gateways[1].state, AdminState::Draining);
        let text = include_str!("../../deploy/keepalived/wglb-ha.example.toml");
        let config = Config::parse(text, "wglb-ha.example.toml").unwrap();
        assert_eq!(config.sync.peers[0].name, "lb-b");
    }

    #[test]
    fn primes() {
        assert!(is_prime(65_537) && is_prime(2) && is_prime(251));
        assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(0) && !is_prime(65_535));
    }
}
