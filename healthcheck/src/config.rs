//! The sidecar's configuration file: what to probe (locations and their gateways), how, and which
//! balancers to report to. A mistake is refused with the file's line and the field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use boringtun::x25519::{PublicKey, StaticSecret};
use serde::Deserialize;
use toml::Spanned;

use crate::handshake::parse_key;

/// How much a probe kind counts in a gateway's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Failing it takes the gateway down.
    Required,
    /// Failing it marks the gateway degraded, still in service.
    Advisory,
    Off,
}

#[derive(Clone)]
pub struct Config {
    /// The name the balancers know this sidecar's reports by.
    pub source: String,
    pub probes: Probes,
    pub balancers: Vec<Balancer>,
    /// Locations and gateways from the file; Core's are added when `core` is set.
    pub locations: Vec<Location>,
    pub core: Option<Core>,
    /// Where to serve the topology and grpc.health.v1 (plain gRPC: keep it on a trusted network).
    pub grpc_listen: Option<SocketAddr>,
    /// Where to serve Prometheus metrics.
    pub metrics_listen: Option<SocketAddr>,
}

/// Where Defguard Core's REST API is, to follow its gateway list.
#[derive(Clone, Debug)]
pub struct Core {
    pub url: String,
    pub token: String,
    pub interval: Duration,
    /// Defguard's gateway health port (Core does not say; 55003 in Defguard's examples).
    pub health_port: Option<u16>,
    /// How many answers in a row must agree before one that drops most of a location's gateways
    /// at once is acted on (`crate::answers`).
    pub confirm_drops: u32,
    /// Gateways (by Core's name) whose WireGuard endpoint is not the address Core dials their
    /// gRPC at (a management address, a name of another network).
    pub endpoints: BTreeMap<String, SocketAddr>,
}

#[derive(Clone)]
pub struct Probes {
    pub interval: Duration,
    pub timeout: Duration,
    /// Each gateway's probes start at a random point within this, so that many gateways are
    /// not all probed at the same instant.
    pub jitter: Duration,
    pub rise: u32,
    pub fall: u32,
    /// The WireGuard handshake from the probe peer (off without a private key).
    pub handshake: Role,
    /// ICMP port unreachable on the gateway's WireGuard port.
    pub port: Role,
    /// Defguard's `GET /health` (on gateways that have a health port).
    pub health: Role,
    /// Core's `connected` for gateways Core lists that have no health port: what `/health`
    /// would have said.
    pub core: Role,
    pub health_path: String,
    /// The probe peer's private key; its public key must be a peer on every gateway.
    pub private_key: Option<StaticSecret>,
}

#[derive(Clone, Debug)]
pub struct Balancer {
    /// A Unix socket path, or an `http://` / `https://` URL.
    pub api: String,
    pub token_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

/// A VPN location: a listener of the balancers, and the gateways behind it.
#[derive(Clone, Debug)]
pub struct Location {
    pub name: String,
    /// The gateways' WireGuard public key (every gateway of a location has the same).
    pub public_key: Option<PublicKey>,
    /// Core's MFA mode is on: its gateways carry only peers with a live MFA session (and a
    /// preshared key made for it), so the handshake probe cannot work there and does not run.
    pub mfa: bool,
    pub gateways: Vec<Gateway>,
    /// Defguard Core's id for it; `None` for a location from the file only. Core's locations get
    /// a probe key of their own, registered as a network device (`crate::registration`).
    pub core_id: Option<i64>,
}

#[derive(Clone, Debug)]
pub struct Gateway {
    pub name: String,
    pub address: SocketAddr,
    pub health_port: Option<u16>,
    /// Defguard Core's id for it; `None` for a gateway from the file.
    pub core_id: Option<i64>,
    /// Whether Core had its stream to the gateway at its latest answer; `None` when Core did
    /// not say (a gateway from the file).
    pub core_connected: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    source: Option<String>,
    #[serde(default)]
    probes: Option<Spanned<RawProbes>>,
    #[serde(default)]
    balancer: Vec<Spanned<RawBalancer>>,
    #[serde(default)]
    location: Vec<Spanned<RawLocation>>,
    core: Option<Spanned<RawCore>>,
    grpc: Option<RawListen>,
    metrics: Option<RawListen>,
}

/// Where a server of the sidecar listens ([grpc], [metrics]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    listen: SocketAddr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCore {
    url: String,
    token_file: PathBuf,
    interval: Option<String>,
    /// 0 for none.
    health_port: Option<u16>,
    confirm_drops: Option<u32>,
    endpoints: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProbes {
    interval: Option<String>,
    timeout: Option<String>,
    jitter: Option<String>,
    rise: Option<u32>,
    fall: Option<u32>,
    handshake: Option<Role>,
    port: Option<Role>,
    health: Option<Role>,
    core: Option<Role>,
    health_path: Option<String>,
    private_key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBalancer {
    api: String,
    token_file: Option<PathBuf>,
    ca: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocation {
    name: String,
    public_key: Option<String>,
    #[serde(default)]
    mfa: bool,
    #[serde(default)]
    gateway: Vec<Spanned<RawGateway>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    name: String,
    address: SocketAddr,
    health_port: Option<u16>,
}

/// A refused file: where and why.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text, &path.display().to_string(), path.parent())
    }

    /// Parses `text` (from `name`); relative key files are read from `dir`.
    pub fn parse(text: &str, name: &str, dir: Option<&Path>) -> Result<Config, ConfigError> {
        let at = |span: Option<Range<usize>>, what: &str, why: String| {
            let line = span.map_or(0, |s| {
                text[..s.start.min(text.len())].matches('\n').count() + 1
            });
            ConfigError(format!("{name} line {line} ({what}): {why}"))
        };
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| at(e.span(), "syntax", e.message().trim().to_string()))?;
        let probes_span = raw.probes.as_ref().map(|p| p.span());
        let raw_probes = raw.probes.map(Spanned::into_inner).unwrap_or_default();
        let probes_err = |why: String| at(probes_span.clone(), "[probes]", why);
        let duration = |value: Option<String>, default: Duration, field: &str| match value {
            None => Ok(default),
            Some(text) => humantime::parse_duration(&text).map_err(|e| {
                probes_err(format!("field `{field}`: `{text}` is not a duration ({e})"))
            }),
        };
        // Defguard's Envoy example: every second, one result either way.
        let interval = duration(raw_probes.interval, Duration::from_secs(1), "interval")?;
        let timeout = duration(raw_probes.timeout, Duration::from_secs(1), "timeout")?;
        let jitter = duration(raw_probes.jitter, Duration::from_millis(100), "jitter")?;
        if interval.is_zero() || timeout.is_zero() {
            return Err(probes_err(
                "interval and timeout must be greater than zero".into(),
            ));
        }
        let (rise, fall) = (raw_probes.rise.unwrap_or(1), raw_probes.fall.unwrap_or(1));
        if rise == 0 || fall == 0 {
            return Err(probes_err("rise and fall must be at least 1".into()));
        }
        let private_key = match &raw_probes.private_key_file {
            Some(file) => {
                let path = dir.map_or(file.clone(), |d| d.join(file));
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    probes_err(format!(
                        "field `private_key_file`: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                let key = parse_key(&text).map_err(|e| {
                    probes_err(format!("field `private_key_file`: {}: {e}", path.display()))
                })?;
                Some(StaticSecret::from(key))
            }
            None => None,
        };
        let handshake = match (raw_probes.handshake, &private_key) {
            (Some(Role::Off), _) | (None, None) => Role::Off,
            (Some(_), None) => return Err(probes_err(
                "field `handshake`: the handshake probe needs the probe peer's private_key_file"
                    .into(),
            )),
            (Some(role), Some(_)) => role,
            (None, Some(_)) => Role::Required,
        };
        let probes = Probes {
            interval,
            timeout,
            jitter,
            rise,
            fall,
            handshake,
            port: raw_probes.port.unwrap_or(Role::Required),
            // A Core outage turns every /health 503 while WireGuard works: by default that only
            // degrades a gateway, it must not become a VPN outage.
            health: raw_probes.health.unwrap_or(Role::Advisory),
            core: raw_probes.core.unwrap_or(Role::Advisory),
            health_path: raw_probes.health_path.unwrap_or_else(|| "/health".into()),
            private_key,
        };
        if raw.balancer.is_empty() {
            return Err(at(None, "[[balancer]]", "no balancer to report to".into()));
        }
        let balancers = raw
            .balancer
            .into_iter()
            .map(|b| {
                let b = b.into_inner();
                Balancer {
                    api: b.api,
                    token_file: b.token_file,
                    ca: b.ca,
                }
            })
            .collect();
        let mut locations = Vec::new();
        for spanned in raw.location {
            let span = spanned.span();
            let raw_location = spanned.into_inner();
            let what = format!("location `{}`", raw_location.name);
            let public_key =
                match raw_location.public_key {
                    Some(text) => Some(PublicKey::from(parse_key(&text).map_err(|e| {
                        at(
                            Some(span.clone()),
                            &what,
                            format!("field `public_key`: {e}"),
                        )
                    })?)),
                    None if handshake != Role::Off => return Err(at(
                        Some(span),
                        &what,
                        "field `public_key`: the handshake probe needs the gateways' public key"
                            .into(),
                    )),
                    None => None,
                };
            let mut gateways: Vec<Gateway> = Vec::new();
            for gateway in raw_location.gateway {
                let span = gateway.span();
                let gateway = gateway.into_inner();
                if gateways.iter().any(|g| g.name == gateway.name) {
                    return Err(at(
                        Some(span),
                        &what,
                        format!("gateway `{}` appears twice", gateway.name),
                    ));
                }
                gateways.push(Gateway {
                    name: gateway.name,
                    address: gateway.address,
                    health_port: gateway.health_port,
                    core_id: None,
                    core_connected: None,
                });
            }
            locations.push(Location {
                name: raw_location.name,
                public_key,
                mfa: raw_location.mfa,
                gateways,
                core_id: None,
            });
        }
        let core = match raw.core {
            Some(spanned) => {
                let span = spanned.span();
                let raw_core = spanned.into_inner();
                let core_err = |why: String| at(Some(span.clone()), "[core]", why);
                if !(raw_core.url.starts_with("http://") || raw_core.url.starts_with("https://")) {
                    return Err(core_err(format!(
                        "field `url`: `{}` is not an http(s) URL",
                        raw_core.url
                    )));
                }
                let path = dir.map_or(raw_core.token_file.clone(), |d| {
                    d.join(&raw_core.token_file)
                });
                let token = std::fs::read_to_string(&path)
                    .map_err(|e| {
                        core_err(format!(
                            "field `token_file`: cannot read {}: {e}",
                            path.display()
                        ))
                    })?
                    .trim()
                    .to_string();
                let interval = match raw_core.interval {
                    Some(text) => humantime::parse_duration(&text).map_err(|e| {
                        core_err(format!(
                            "field `interval`: `{text}` is not a duration ({e})"
                        ))
                    })?,
                    None => Duration::from_secs(10),
                };
                let confirm_drops = raw_core.confirm_drops.unwrap_or(3);
                if confirm_drops == 0 {
                    return Err(core_err(
                        "field `confirm_drops`: 0 answers cannot confirm anything (1 acts on every answer)".into(),
                    ));
                }
                let mut endpoints = BTreeMap::new();
                for (gateway, text) in raw_core.endpoints.unwrap_or_default() {
                    let endpoint = text.parse().map_err(|_| {
                        core_err(format!(
                            "field `endpoints`: gateway `{gateway}`: `{text}` is not IP:PORT"
                        ))
                    })?;
                    endpoints.insert(gateway, endpoint);
                }
                Some(Core {
                    url: raw_core.url,
                    token,
                    confirm_drops,
                    endpoints,
                    interval: interval.max(Duration::from_millis(100)),
                    health_port: match raw_core.health_port {
                        Some(0) => None,
                        Some(port) => Some(port),
                        None => Some(55003),
                    },
                })
            }
            None => None,
        };
        let source = raw.source.unwrap_or_else(|| {
            let host = nix_hostname().unwrap_or_else(|| "localhost".into());
            format!("healthcheck@{host}")
        });
        Ok(Config {
            source,
            probes,
            balancers,
            locations,
            core,
            grpc_listen: raw.grpc.map(|g| g.listen),
            metrics_listen: raw.metrics.map(|m| m.listen),
        })
    }
}

fn nix_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
source = "hc-a"

[probes]
interval = "500ms"
fall = 2

[[balancer]]
api = "/run/wglb/api.sock"

[[location]]
name = "office"

[[location.gateway]]
name = "gw1"
address = "10.0.0.2:51820"
health_port = 55003
"#;

    #[test]
    fn reads_a_file_with_defaults() {
        let config = Config::parse(GOOD, "hc.toml", None).unwrap();
        assert_eq!(config.source, "hc-a");
        assert_eq!(config.probes.interval, Duration::from_millis(500));
        assert_eq!(config.probes.timeout, Duration::from_secs(1));
        assert_eq!((config.probes.rise, config.probes.fall), (1, 2));
        // No probe key: no handshake probe; a Core outage only degrades.
        assert_eq!(config.probes.handshake, Role::Off);
        assert_eq!(config.probes.port, Role::Required);
        assert_eq!(config.probes.health, Role::Advisory);
        assert_eq!(config.locations[0].gateways[0].health_port, Some(55003));
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/wglb-healthcheck.example.toml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        // Its key file is a deployment's; a key of our own stands in for it.
        let dir = std::env::temp_dir().join(format!("wglb-hc-example-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("probe.key"),
            "YOdlS0GwLFoX5bRhvGtb0ovfsuRoxQbLpAbqqV5qz2Q=\n",
        )
        .unwrap();
        let text = text.replace("/etc/wglb-healthcheck/probe.key", "probe.key");
        let config = Config::parse(&text, path, Some(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        let config = config.unwrap();
        assert_eq!(config.locations[0].gateways.len(), 2);
        assert_eq!(config.probes.handshake, Role::Required);
        assert!(config.grpc_listen.is_some() && config.metrics_listen.is_some());
    }

    #[test]
    fn refuses_mistakes_with_the_line() {
        let refused = |text: &str| match Config::parse(text, "hc.toml", None) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.0,
        };
        let e = refused(&GOOD.replace("fall = 2", "fall = 0"));
        assert!(e.contains("line 4 ([probes])") && e.contains("fall"), "{e}");
        let e = refused(&GOOD.replace("10.0.0.2:51820", "10.0.0.2"));
        assert!(e.contains("line 16") && e.contains("socket address"), "{e}");
        let e = refused(&GOOD.replace("fall = 2", "handshake = \"required\""));
        assert!(e.contains("private_key_file"), "{e}");
        let e = refused(&GOOD.replace("api = ", "apy = "));
        assert!(e.contains("apy"), "{e}");
        let e = refused(&format!(
            "{GOOD}\n[[location.gateway]]\nname = \"gw1\"\naddress = \"10.0.0.3:51820\"\n"
        ));
        assert!(e.contains("twice") && e.contains("line 19"), "{e}");
        let token = std::env::temp_dir().join(format!("hc-core-token-{}", std::process::id()));
        std::fs::write(&token, "t").unwrap();
        let e = refused(&format!(
            "{GOOD}\n[core]\nurl = \"http://core\"\ntoken_file = \"{}\"\nconfirm_drops = 0\n",
            token.display()
        ));
        assert!(e.contains("[core]") && e.contains("confirm_drops"), "{e}");
        let e = refused(&format!(
            "{GOOD}\n[core]\nurl = \"http://core\"\ntoken_file = \"{}\"\nendpoints = {{ gw1 = \"gw1.example:51820\" }}\n",
            token.display()
        ));
        assert!(
            e.contains("endpoints") && e.contains("gw1") && e.contains("IP:PORT"),
            "{e}"
        );
        let _ = std::fs::remove_file(&token);
    }

    #[test]
    fn core_endpoints_override_where_core_dials() {
        let token = std::env::temp_dir().join(format!("hc-core-token2-{}", std::process::id()));
        std::fs::write(&token, "t").unwrap();
        let config = Config::parse(
            &format!(
                "{GOOD}\n[core]\nurl = \"http://core\"\ntoken_file = \"{}\"\n\
                 [core.endpoints]\ngw2 = \"203.0.113.5:51820\"\n",
                token.display()
            ),
            "hc.toml",
            None,
        );
        let _ = std::fs::remove_file(&token);
        let core = config.unwrap().core.unwrap();
        assert_eq!(
            core.endpoints.get("gw2"),
            Some(&"203.0.113.5:51820".parse().unwrap())
        );
    }
}
