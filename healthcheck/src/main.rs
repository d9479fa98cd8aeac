//! `wglb-healthcheck`: probes every gateway of every location in its configuration (and, with a
//! `[core]` section, of every location Defguard Core lists) and reports a verdict per gateway to
//! one or more `wglb` balancers, whose pools it keeps in step with Core's list.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use boringtun::x25519::{PublicKey, StaticSecret};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use wglb_healthcheck::answers::{Answers, Verdict};
use wglb_healthcheck::checker::{spawn_gateway_checker, CoreView, Update};
use wglb_healthcheck::config::{Config, Location, Probes};
use wglb_healthcheck::discovery::Discovery;
use wglb_healthcheck::exposition::{notify_systemd, NotifyState};
use wglb_healthcheck::metrics::Metrics;
use wglb_healthcheck::pools::{sync_pools, Synced};
use wglb_healthcheck::registration::{location_key, Registered, Registration};
use wglb_healthcheck::report::{run_reporter, Latest};
use wglb_healthcheck::topology::{poll_balancer, Topology, TopologyService};
use wglb_proto::client::{read_token_file, Target};

#[derive(Parser)]
#[command(
    name = "wglb-healthcheck",
    version,
    about = "Probes WireGuard gateways and reports their health to wglb balancers"
)]
struct Cli {
    /// The configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// Log filter (tracing's env-filter syntax).
    #[arg(long, env = "WGLB_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
                eprintln!(
                    "wglb-healthcheck: bad --log filter `{}`: {e}; using info",
                    cli.log
                );
                tracing_subscriber::EnvFilter::new("info")
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("wglb-healthcheck: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("wglb-healthcheck: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wglb-healthcheck: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let probes = Arc::new(config.probes.clone());
    // Room for a slow round and a late tick before a report goes stale at the balancer.
    let ttl = 3 * (probes.interval + probes.timeout);
    let (updates_tx, mut updates) = mpsc::channel(1024);
    let metrics = Metrics::new();
    // Ready (for systemd and /ready) once probing; not once shutting down.
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(listen) = config.metrics_listen {
        let socket = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {listen}: {e}"))?;
        tracing::info!(%listen, "serving Prometheus metrics on /metrics");
        let registry = metrics.registry();
        let ready = ready.clone();
        // Losing the metrics endpoint must not stop the probes.
        tokio::spawn(async move {
            if let Err(e) = wglb_healthcheck::exposition::serve(socket, registry, ready).await {
                tracing::error!("the metrics server failed, metrics are no longer served: {e}");
            }
        });
    }
    let (latest_tx, latest) = watch::channel::<Latest>(Arc::default());
    let mut targets = Vec::new();
    for balancer in &config.balancers {
        let token = match &balancer.token_file {
            Some(path) => Some(
                read_token_file(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let target = Target {
            address: balancer.api.clone(),
            token,
            ca: balancer.ca.clone(),
            identity: None,
        };
        tokio::spawn(run_reporter(
            target.clone(),
            config.source.clone(),
            ttl,
            latest.clone(),
            metrics.clone(),
        ));
        targets.push(target);
    }
    let (health_reporter, health_server) = tonic_health::server::health_reporter();
    let (mut topology, snapshots) = Topology::new(config.source.clone(), health_reporter);
    if let Some(listen) = config.grpc_listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve gRPC on {listen}: {e}"))?;
        tracing::info!(%listen, "serving the topology and grpc.health.v1");
        let topology_server = TopologyService::server(snapshots);
        // A failing gRPC server must not stop the probes and reports.
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(topology_server)
                .add_service(health_server)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::error!("the gRPC server failed, the topology is no longer served: {e}");
            }
        });
    }
    let (views_tx, mut views) = mpsc::channel(16);
    for target in &targets {
        tokio::spawn(poll_balancer(
            target.clone(),
            probes.interval.max(Duration::from_secs(1)),
            views_tx.clone(),
        ));
    }
    drop(views_tx);
    let mut checkers = Checkers {
        running: HashMap::new(),
        probes: probes.clone(),
        updates: updates_tx,
        metrics: metrics.clone(),
    };
    checkers.reconcile(&config.locations).await;
    tracing::info!(source = %config.source, gateways = checkers.running.len(), balancers = targets.len(), "probing");
    let discovery = config.core.clone().map(Discovery::new).transpose()?;
    let registration = config
        .core
        .clone()
        .map(|core| Registration::new(core, &config.source))
        .transpose()?;
    // Core locations whose probe peer is a network device (found or added by this process).
    let mut registered: HashSet<i64> = HashSet::new();
    let mut poll = tokio::time::interval(
        config
            .core
            .as_ref()
            .map_or(Duration::from_secs(3600), |c| c.interval),
    );
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // What Core listed, as acted on; and each balancer's pools as last brought in line with it.
    let mut answers = Answers::new(config.core.as_ref().map_or(1, |c| c.confirm_drops));
    let mut synced: Vec<Synced> = targets.iter().map(|_| Synced::default()).collect();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    ready.store(true, Ordering::Relaxed);
    notify_systemd(&[NotifyState::Ready]);
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            Some(update) = updates.recv() => {
                match update {
                    Update::Verdict(report) => {
                        let previous = topology.verdict(report.clone()).await;
                        let verdict = report.verdict;
                        metrics.verdict(&report.location, &report.gateway, verdict, previous.is_some_and(|v| v != verdict));
                        if previous != Some(verdict) {
                            tracing::info!(location = %report.location, gateway = %report.gateway, verdict = %verdict.as_str(), detail = %report.detail, "verdict");
                        }
                    }
                    Update::Forget { location, gateway } => {
                        topology.forget(&location, &gateway).await;
                        metrics.forget(&location, &gateway);
                    }
                }
                latest_tx.send_replace(topology.latest());
            }
            Some(view) = views.recv() => topology.balancer(view),
            _ = poll.tick(), if discovery.is_some() => {
                let Some(discovery) = &discovery else { continue };
                // Core down: keep probing and reporting what it listed last.
                let found = match discovery.fetch().await {
                    Ok(found) => found,
                    Err(e) => {
                        tracing::warn!("cannot read Core's gateway list, keeping the last one: {e:#}");
                        continue;
                    }
                };
                match answers.answer(found) {
                    Verdict::Accept => {
                        if let (Some(registration), Some(probe)) = (&registration, &probes.private_key) {
                            register(registration, probe, answers.accepted(), &mut registered).await;
                        }
                        checkers.reconcile(&merge(&config.locations, answers.accepted())).await;
                    }
                    Verdict::Hold { location, dropped, had, seen } => {
                        tracing::warn!(%location, "Core's answer drops {dropped} of the location's {had} gateways at once: held until {} answers in a row say so ({seen} so far)", answers.confirm_drops());
                    }
                }
                for (target, synced) in targets.iter().zip(&mut synced) {
                    if let Err(e) = sync_pools(target, synced, answers.accepted()).await {
                        tracing::warn!(balancer = %target.address, "cannot bring the balancer's pools in line with Core, retried at the next poll: {e}");
                    }
                }
            }
        }
    }
    tracing::info!("shutting down");
    ready.store(false, Ordering::Relaxed);
    notify_systemd(&[NotifyState::Stopping]);
    Ok(())
}

/// Makes each Core location's probe key (MFA locations run no handshake probe) a network device
/// of the location, once per location and process; a failure is retried at the next poll.
async fn register(
    registration: &Registration,
    probe: &StaticSecret,
    locations: &[Location],
    registered: &mut HashSet<i64>,
) {
    for location in locations.iter().filter(|l| !l.mfa) {
        let Some(id) = location.core_id.filter(|id| !registered.contains(id)) else {
            continue;
        };
        let key = PublicKey::from(&location_key(probe, id));
        match registration.ensure(id, &location.name, &key).await {
            Ok(Registered::Found(device)) => {
                tracing::info!(location = %location.name, device, "the probe peer is a network device of the location in Core");
                registered.insert(id);
            }
            Ok(Registered::Added) => {
                tracing::info!(location = %location.name, "added the probe peer to the location as a network device: Core pushes it to every gateway");
                registered.insert(id);
            }
            Err(e) => {
                tracing::warn!(location = %location.name, "cannot register the probe peer in Core, retried at the next poll: {e:#}");
            }
        }
    }
}

/// A gateway's checker, the address and MFA mode it probes with, and Core's word on it.
struct Running {
    address: SocketAddr,
    mfa: bool,
    task: JoinHandle<()>,
    core: Arc<CoreView>,
}

/// The gateways being probed, by location and name.
struct Checkers {
    running: HashMap<(String, String), Running>,
    probes: Arc<Probes>,
    updates: mpsc::Sender<Update>,
    metrics: Metrics,
}

impl Checkers {
    /// Probes exactly the gateways of `locations`: new ones start, gone or moved ones stop, and
    /// those whose location turned MFA (or back) start over with the probes that fit.
    async fn reconcile(&mut self, locations: &[Location]) {
        let mut wanted = HashMap::new();
        for location in locations {
            for gateway in &location.gateways {
                wanted.insert(
                    (location.name.clone(), gateway.name.clone()),
                    (location, gateway),
                );
            }
        }
        let stale: Vec<(String, String)> = self
            .running
            .iter()
            .filter(|(key, running)| {
                wanted
                    .get(*key)
                    .is_none_or(|(l, g)| g.address != running.address || l.mfa != running.mfa)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(running) = self.running.remove(&key) {
                running.task.abort();
                tracing::info!(location = %key.0, gateway = %key.1, "no longer probed");
                let _ = self
                    .updates
                    .send(Update::Forget {
                        location: key.0,
                        gateway: key.1,
                    })
                    .await;
            }
        }
        for (key, (location, gateway)) in wanted {
            if let Some(running) = self.running.get(&key) {
                running.core.set(gateway.core_connected);
            }
            if let std::collections::hash_map::Entry::Vacant(entry) = self.running.entry(key) {
                if location.mfa {
                    tracing::info!(location = %location.name, gateway = %gateway.name, address = %gateway.address, "probing an MFA location: no handshake probe (its gateways carry only peers with a live MFA session); the port probe, /health and the balancers' passive health decide");
                } else {
                    tracing::info!(location = %location.name, gateway = %gateway.name, address = %gateway.address, "probing");
                }
                let view = Arc::new(CoreView::default());
                view.set(gateway.core_connected);
                let task = spawn_gateway_checker(
                    location,
                    gateway,
                    view.clone(),
                    self.probes.clone(),
                    self.updates.clone(),
                    self.metrics.clone(),
                );
                entry.insert(Running {
                    address: gateway.address,
                    mfa: location.mfa,
                    task,
                    core: view,
                });
            }
        }
    }
}

/// The file's locations with Core's added: a gateway the file names keeps the file's settings.
fn merge(file: &[Location], core: &[Location]) -> Vec<Location> {
    let mut merged = file.to_vec();
    for location in core {
        match merged.iter_mut().find(|l| l.name == location.name) {
            Some(known) => {
                known.public_key = known.public_key.or(location.public_key);
                known.mfa |= location.mfa;
                known.core_id = known.core_id.or(location.core_id);
                for gateway in &location.gateways {
                    if !known.gateways.iter().any(|g| g.name == gateway.name) {
                        known.gateways.push(gateway.clone());
                    }
                }
            }
            None => merged.push(location.clone()),
        }
    }
    merged
}
