//! The balancer's configuration: a TOML file or command-line flags, both validated by the same
//! code so a mistake is refused the same way wherever it was made. Errors name the place (the
//! file line or the flag), the field and the reason.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

// One module per section: its settings, their defaults, its raw TOML form and its checks.
mod agents;
mod announce;
mod api;
mod datapath;
mod health;
mod listener;
mod sync;

pub use agents::{AgentConfig, DEFAULT_AGENT_ORDERS_PER_SECOND};
pub use announce::AnnounceConfig;
pub use api::{ApiConfig, TlsFiles, DEFAULT_API_SOCKET};
pub use datapath::{DatapathConfig, DatapathKind, DatapathOverrides, XdpMode, DEFAULT_NAT_PORTS};
pub use health::{HealthCheckConfig, MAX_EVICTION_DELAY};
pub use listener::{
    check_gateway, format_public_key, parse_public_key, AdmissionConfig, GatewayConfig,
    ListenerConfig, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAGLEV_SIZE, DEFAULT_PROBATION_SIZE,
    DEFAULT_SOCKET_BUFFER, DEFAULT_SOURCE_BURST, DEFAULT_SOURCE_RATE, DEFAULT_SOURCE_UNCONFIRMED,
    DEFAULT_TABLE_SIZE,
};
pub use sync::{SyncConfig, SyncPeerConfig, DEFAULT_SYNC_QUEUE};

use agents::{build_agents, RawAgent};
use announce::{build_announce, RawAnnounce};
use api::{build_api, RawApi};
use datapath::{build_datapath, RawDatapath};
use health::{build_health, RawHealth};
use listener::{build_listeners, RawGateway, RawListener};
use sync::{build_sync, RawSync};

use crate::pool::{AdminState, AllDownPolicy, HashKey};
use wglb_common::xdp::MAX_LISTENERS;

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
struct RawMetrics {
    listen: SocketAddr,
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
        compare(
            "[datapath]",
            "shards",
            old.shards.to_string(),
            now.shards.to_string(),
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
    let health = build_health(raw.health, &origin)?;
    let listeners = build_listeners(raw.listener, &origin, &layout.listeners, &mut record)?;
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

#[cfg(test)]
mod tests {
    use super::listener::is_prime;
    use super::*;
    use crate::passive::PassiveRole;

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
