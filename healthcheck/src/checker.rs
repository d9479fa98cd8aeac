//! Probes one gateway forever: every interval, all its probes at once, then its verdict.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{Gateway, Location, Probes, Role};
use crate::handshake::probe_handshake;
use crate::http::probe_http;
use crate::metrics::Metrics;
use crate::port::{probe_port, PortState};
use crate::registration::location_key;
use crate::verdict::{GatewayHealth, Probe, Verdict};

/// What the checkers tell the reporters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// A gateway's verdict after a round of probes.
    Verdict(Report),
    /// A gateway is no longer probed.
    Forget { location: String, gateway: String },
}

/// A gateway's verdict after one round of probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub location: String,
    pub gateway: String,
    pub address: SocketAddr,
    pub core_id: Option<i64>,
    pub verdict: Verdict,
    pub detail: String,
    /// What `/health` says about Core's stream to the gateway, when it is probed.
    pub core_attached: Option<bool>,
    /// The data-plane probes (handshake, port) that run all pass.
    pub data_plane_up: bool,
    /// The latest handshake's round trip.
    pub handshake_rtt: Option<Duration>,
    /// Its location is an MFA location (no handshake probe).
    pub mfa: bool,
}

/// Core's latest word on its stream to a gateway, as the last answer of its gateway list had it:
/// discovery writes it, the gateway's checker reads it every round (the `core` probe).
#[derive(Debug, Default)]
pub struct CoreView(AtomicU8);

impl CoreView {
    pub fn set(&self, connected: Option<bool>) {
        let value = match connected {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        };
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<bool> {
        match self.0.load(Ordering::Relaxed) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }
}

pub fn spawn_gateway_checker(
    location: &Location,
    gateway: &Gateway,
    core_view: Arc<CoreView>,
    probes: Arc<Probes>,
    updates: mpsc::Sender<Update>,
    metrics: Metrics,
) -> JoinHandle<()> {
    let roles = [
        (
            Probe::Handshake,
            if location.mfa {
                Role::Off
            } else {
                probes.handshake
            },
        ),
        (Probe::Port, probes.port),
        (
            Probe::Health,
            if gateway.health_port.is_some() {
                probes.health
            } else {
                Role::Off
            },
        ),
        // What `/health` would have said, for a gateway Core lists without a health port.
        (
            Probe::Core,
            if gateway.health_port.is_none() && gateway.core_id.is_some() {
                probes.core
            } else {
                Role::Off
            },
        ),
    ];
    let mut health = GatewayHealth::new(&roles, probes.rise, probes.fall);
    let mut handshake_rtt = None;
    let (public_key, mfa) = (location.public_key, location.mfa);
    // A Core location's probe peer is its own network device, which Core pushes to the gateways
    // a moment after the sidecar registers it: until the handshake has worked once, its failures
    // say nothing about the gateway.
    let probe_key = match location.core_id {
        Some(id) => probes.private_key.as_ref().map(|key| location_key(key, id)),
        None => probes.private_key.clone(),
    };
    let mut handshake_proven = location.core_id.is_none();
    let location = location.name.clone();
    let gateway = gateway.clone();
    tokio::spawn(async move {
        let offset = probes.jitter.mul_f64(rand_fraction());
        tokio::time::sleep(offset).await;
        let mut ticks = tokio::time::interval(probes.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let on = |probe: Probe| {
                roles
                    .iter()
                    .any(|(p, role)| *p == probe && *role != Role::Off)
            };
            let handshake = timed(async {
                match (&probe_key, public_key) {
                    (Some(key), Some(public)) if on(Probe::Handshake) => {
                        Some(probe_handshake(gateway.address, key, &public, probes.timeout).await)
                    }
                    _ => None,
                }
            });
            let port = timed(async {
                if !on(Probe::Port) {
                    return None;
                }
                Some(match probe_port(gateway.address, probes.timeout).await {
                    Ok(PortState::NotRefused) => Ok(format!("{} not refused", gateway.address)),
                    Ok(PortState::Closed) => Err(format!(
                        "{} port unreachable: nothing listens",
                        gateway.address
                    )),
                    Err(e) => Err(format!("cannot probe {}: {e}", gateway.address)),
                })
            });
            let http = timed(async {
                let port = gateway.health_port.filter(|_| on(Probe::Health))?;
                let target = SocketAddr::new(gateway.address.ip(), port);
                let path = &probes.health_path;
                Some(match probe_http(target, path, probes.timeout).await {
                    Ok(200) => Ok(format!("GET {target}{path} 200")),
                    Ok(code) => Err(format!("GET {target}{path} {code}")),
                    Err(why) => Err(format!("GET {target}{path}: {why}")),
                })
            });
            let ((handshake, handshake_took), (port, port_took), (http, http_took)) =
                tokio::join!(handshake, port, http);
            let core = core_view
                .get()
                .filter(|_| on(Probe::Core))
                .map(|connected| {
                    if connected {
                        Ok("Core has its stream to the gateway".to_string())
                    } else {
                        Err("Core reports no stream to the gateway".to_string())
                    }
                });
            if let Some(Ok(done)) = &handshake {
                handshake_rtt = Some(done.rtt);
                handshake_proven = true;
            }
            let handshake = handshake.map(|result| {
                result
                    .map(|done| {
                        let cookie = if done.after_cookie {
                            " after a cookie reply"
                        } else {
                            ""
                        };
                        format!("handshake in {}{cookie}", millis(done.rtt))
                    })
                    .map_err(|failure| failure.to_string())
            });
            for (probe, result, took) in [
                (Probe::Handshake, handshake, handshake_took),
                (Probe::Port, port, port_took),
                (Probe::Health, http, http_took),
                (Probe::Core, core, Duration::ZERO),
            ] {
                if let Some(result) = result {
                    metrics.probe(&location, &gateway.name, probe, result.is_ok(), took);
                    if let Err(why) = &result {
                        tracing::debug!(%location, gateway = %gateway.name, probe = probe.as_str(), "probe failed: {why}");
                    }
                    if probe == Probe::Handshake && !handshake_proven {
                        continue;
                    }
                    health.record(probe, result);
                }
            }
            let Some((verdict, detail)) = health.verdict() else {
                continue;
            };
            let report = Report {
                location: location.clone(),
                gateway: gateway.name.clone(),
                address: gateway.address,
                core_id: gateway.core_id,
                verdict,
                detail,
                core_attached: health
                    .passing(Probe::Health)
                    .or(health.passing(Probe::Core)),
                data_plane_up: [Probe::Handshake, Probe::Port]
                    .into_iter()
                    .all(|p| health.passing(p) != Some(false)),
                handshake_rtt,
                mfa,
            };
            if updates.send(Update::Verdict(report)).await.is_err() {
                return;
            }
        }
    })
}

/// A probe's result and how long it took.
async fn timed<T>(probe: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = std::time::Instant::now();
    let result = probe.await;
    (result, started.elapsed())
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A number in [0, 1), for the start offset.
fn rand_fraction() -> f64 {
    use rand_core::RngCore;
    rand_core::OsRng.next_u32() as f64 / (u32::MAX as f64 + 1.0)
}
