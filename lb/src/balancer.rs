//! Starting and stopping a balancer: `wglb run`. The parts are built in the order that lets a
//! restarted balancer go on at once (the XDP program before the sockets), connected so that data
//! flows one way (configuration and health -> control plane -> plans -> datapaths), and stopped
//! in the order that loses nothing (the fast path announces its last sessions, peers get the last
//! changes while the datapaths still answer, then the API and the listeners go).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use wglb_probe::exposition::{notify_systemd, NotifyState};
use wglb_proto::client::{read_token_file, Target};

use crate::agents::Agents;
use crate::announce::Announcer;
use crate::api::serve::ApiServer;
use crate::api::service::Api;
use crate::config::{Config, ConfigFile, DatapathKind};
use crate::control::{announce_refused_reload, ControlPlane, ControlRequest, ListenerPlan};
use crate::datapath::{bind_shards, run_listener, ListenerLinks};
use crate::events::EventBus;
use crate::metrics::{self, Metrics};
use crate::sync::{self, PeerQueue, SyncOut};
use crate::xdp::fastpath::{FastPath, FastPathLinks};

/// How long a stopping balancer waits for its peers to take its last session changes.
const SYNC_FLUSH_WAIT: Duration = Duration::from_secs(5);

/// Runs a balancer until SIGTERM or SIGINT (reloading on SIGHUP), or until a listener fails.
pub async fn run(config: Config, file: Option<ConfigFile>) -> anyhow::Result<()> {
    raise_limits(&config);
    let mut balancer = Balancer::start(config, file).await?;
    let outcome = balancer.serve().await;
    balancer.stop(outcome.is_ok()).await;
    outcome
}

/// What a running balancer is made of: each part's task, and how to stop it.
struct Balancer {
    file: Option<ConfigFile>,
    metrics: Metrics,
    events: EventBus,
    requests: mpsc::Sender<ControlRequest>,
    control: tokio::task::JoinHandle<()>,
    listeners: JoinSet<anyhow::Result<()>>,
    fast_path: Option<std::thread::JoinHandle<()>>,
    stop_fast_path: oneshot::Sender<()>,
    sync_peers: JoinSet<()>,
    stop_sync: watch::Sender<bool>,
    api: tokio::task::JoinHandle<()>,
    /// The route announcement, if some listener has addresses to announce: told to stop, it
    /// withdraws them and says whether any was announced.
    announcer: Option<(tokio::task::JoinHandle<bool>, watch::Sender<bool>)>,
    withdraw_wait: Duration,
    /// What `/ready` says.
    ready: Arc<std::sync::atomic::AtomicBool>,
}

/// Asks for the open files the sessions need, and warns where the local ports will not do.
fn raise_limits(config: &Config) {
    // Every session, confirmed or not, holds a socket towards its gateway.
    let wanted: u64 = config
        .listeners
        .iter()
        .map(|l| (l.table_size.get() + l.admission.probation_size.get()) as u64 + 64)
        .sum();
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => tracing::warn!(
            limit,
            wanted,
            "the open-file limit is below the session table sizes; sessions beyond it are dropped"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
    // Each session's socket takes a local port of its source address.
    if let Some(ports) = local_port_range() {
        for listener in config
            .listeners
            .iter()
            .filter(|l| l.table_size.get() > ports)
        {
            tracing::warn!(
                listener = %listener.name,
                table_size = listener.table_size.get(),
                ports,
                "table_size exceeds net.ipv4.ip_local_port_range: sessions beyond the free ports are dropped (widen the range or set a smaller table_size)"
            );
        }
    }
}

impl Balancer {
    /// Builds and starts every part; fails, before anything serves, on a bad address, a taken
    /// port or an XDP datapath that `kind = "xdp"` demands and cannot run.
    async fn start(config: Config, file: Option<ConfigFile>) -> anyhow::Result<Balancer> {
        let metrics = Metrics::new();
        let metrics_socket = match config.metrics_listen {
            Some(address) => Some(
                tokio::net::TcpListener::bind(address)
                    .await
                    .with_context(|| format!("cannot serve metrics on {address}"))?,
            ),
            None => None,
        };
        let api_server = ApiServer::bind(&config.api, &config.sync.peers).await?;
        let events = EventBus::new();
        let (observations_tx, observations) = mpsc::channel(1024);
        let (requests_tx, requests) = mpsc::channel(64);
        let (control, mut plans) = ControlPlane::new(
            config.clone(),
            metrics.clone(),
            events.clone(),
            observations_tx,
        );
        let board = control.passive_board();
        let agents = Agents::new(config.agents.clone(), metrics.clone());
        let listener_plans: Vec<_> = config
            .listeners
            .iter()
            .map(|l| plans.remove(&l.name).expect("a plan per listener"))
            .collect();
        // The program before the sockets: a restarted balancer's clients then go on through the
        // program at once rather than through userspace until it attaches.
        let fast_path = start_fast_path(&config, &listener_plans, &metrics, &events)?;
        let announcer = Announcer::start(&config, &listener_plans, &metrics, &events)
            .context("cannot announce the listeners' addresses")?;
        let mut sockets = Vec::new();
        for listener in &config.listeners {
            let shards = config.datapath.shards;
            let socket = bind_shards(listener.listen, listener.socket_buffer, shards)
                .with_context(|| {
                    format!(
                        "listener `{}`: cannot listen on {}",
                        listener.name, listener.listen
                    )
                })?;
            sockets.push((listener.clone(), socket));
        }
        let mut fast_links = FastPathLinks {
            plans: listener_plans.clone(),
            requests: Vec::new(),
            slow_paths: Vec::new(),
            syncs: Vec::new(),
            board: board.clone(),
            agents: agents.clone(),
        };
        let mut sync_peers = Vec::new();
        let mut sync_queues = Vec::new();
        for peer in &config.sync.peers {
            let (queue, changes) =
                PeerQueue::new(&peer.name, config.sync.queue, metrics.sync_peer(&peer.name));
            sync_queues.push(queue.clone());
            sync_peers.push((peer, queue, changes));
        }
        let sync_queues: Arc<[Arc<PeerQueue>]> = sync_queues.into();
        let mut tasks = JoinSet::new();
        let mut datapaths = BTreeMap::new();
        for ((listener, socket), plans) in sockets.into_iter().zip(listener_plans) {
            let (session_requests, requests) = mpsc::channel(16);
            if fast_path.is_some() {
                // The API asks the fast path, which asks the userspace datapath in turn.
                let (api_requests, fast_requests) = mpsc::channel(16);
                datapaths.insert(listener.name.clone(), api_requests);
                fast_links.requests.push(fast_requests);
                fast_links.slow_paths.push(session_requests);
            } else {
                datapaths.insert(listener.name.clone(), session_requests);
            }
            let links = ListenerLinks {
                plans,
                requests,
                metrics: metrics.clone(),
                events: events.clone(),
                sync: SyncOut::new(&listener.name, sync_queues.clone()),
                board: board.clone(),
                agents: agents.clone(),
            };
            if fast_path.is_some() {
                fast_links
                    .syncs
                    .push(SyncOut::new(&listener.name, sync_queues.clone()));
            }
            tracing::info!(listener = %listener.name, listen = %listener.listen, gateways = listener.gateways.len(), "listening");
            tasks.spawn(async move {
                run_listener(&listener, socket, links)
                    .await
                    .with_context(|| format!("listener `{}` failed", listener.name))
            });
        }
        let control = tokio::spawn(control.run(observations, requests));
        let (stop_fast_path, fast_path_stopped) = oneshot::channel();
        let fast_path = fast_path.map(|fast_path| {
            std::thread::Builder::new()
                .name("wglb-xdp".into())
                .spawn(move || fast_path.run(fast_links, fast_path_stopped))
        });
        let fast_path = fast_path
            .transpose()
            .context("cannot start the XDP fast path's thread")?;
        // Ready (for systemd and /ready) once everything above is up; not once shutting down.
        let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(socket) = metrics_socket {
            tracing::info!(listen = %socket.local_addr()?, "serving Prometheus metrics on /metrics and readiness on /ready");
            let metrics = metrics.clone();
            let ready = ready.clone();
            // Losing the metrics endpoint must not stop the traffic: log it and go on.
            tokio::spawn(async move {
                if let Err(e) = metrics::serve(socket, metrics, ready).await {
                    tracing::error!("metrics server failed, metrics are no longer served: {e}");
                }
            });
        }
        tracing::info!(socket = %api_server.socket_path().display(), tcp = ?api_server.tcp_address(), "serving the API");
        let (stop_sync, sync_stopping) = watch::channel(false);
        let mut sync_tasks = JoinSet::new();
        for (peer, queue, changes) in sync_peers {
            let token = match &peer.token_file {
                Some(path) => Some(read_token_file(path).with_context(|| {
                    format!("sync peer `{}`: cannot read {}", peer.name, path.display())
                })?),
                None => None,
            };
            let target = Target {
                address: peer.url.clone(),
                token,
                ca: peer.ca.clone(),
                identity: peer
                    .identity
                    .as_ref()
                    .map(|t| (t.cert.clone(), t.key.clone())),
            };
            tracing::info!(peer = %peer.name, url = %peer.url, node = %config.sync.node, "syncing sessions with a peer");
            sync_tasks.spawn(sync::peer::run(
                queue,
                changes,
                target,
                config.sync.node.clone(),
                datapaths.clone(),
                sync_stopping.clone(),
            ));
        }
        // Announced once everything that forwards is up.
        let (announce_handle, announcer) = match announcer {
            Some((announcer, handle)) => {
                let (stop, stopped) = watch::channel(false);
                let task = tokio::spawn(announcer.run(stopped));
                (Some(handle), Some((task, stop)))
            }
            None => (None, None),
        };
        let api = Api::new(
            requests_tx.clone(),
            datapaths,
            events.clone(),
            metrics.clone(),
            file.clone(),
            config.sync.peers.iter().map(|p| p.name.clone()).collect(),
            agents,
        )
        .with_announce(announce_handle);
        // Nor the API: the balancer goes on with what it was last told.
        let api_task = tokio::spawn(async move {
            if let Err(e) = api_server.run(api).await {
                tracing::error!("the API server failed, the API is no longer served: {e:#}");
            }
        });
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        notify_systemd(&[NotifyState::Ready]);
        Ok(Balancer {
            file,
            metrics,
            events,
            requests: requests_tx,
            control,
            listeners: tasks,
            fast_path,
            stop_fast_path,
            sync_peers: sync_tasks,
            stop_sync,
            api: api_task,
            announcer,
            withdraw_wait: config.announce.withdraw_wait,
            ready,
        })
    }

    /// Serves until SIGTERM or SIGINT (Ok), reloading on SIGHUP, or until a listener fails (Err).
    async fn serve(&mut self) -> anyhow::Result<()> {
        let mut hangup = signal(SignalKind::hangup())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        loop {
            tokio::select! {
                _ = hangup.recv() => match &self.file {
                    Some(file) => match file.load() {
                        Ok(config) => {
                            tracing::info!(path = %file.path.display(), "SIGHUP: reloading the configuration");
                            // The control plane logs and counts the outcome. Never wait here: this
                            // loop also watches signals and listeners.
                            let (reply, _) = oneshot::channel();
                            if self.requests.try_send(ControlRequest::Reload { config: Box::new(config), reply }).is_err() {
                                announce_refused_reload(&self.metrics, &self.events, "SIGHUP: the control plane is busy or gone; try again");
                            }
                        }
                        Err(e) => announce_refused_reload(&self.metrics, &self.events, &format!("SIGHUP: {e:#}")),
                    },
                    None => tracing::warn!("SIGHUP: started from flags, there is no file to reload"),
                },
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                Some(ended) = self.listeners.join_next() => {
                    return Err(match ended {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => anyhow::anyhow!("a listener stopped"),
                        Err(e) => anyhow::anyhow!("a task died: {e}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Stops every part in the order that loses nothing; `clean` when asked to, not when a
    /// listener failed.
    async fn stop(self, clean: bool) {
        let Balancer {
            control,
            mut listeners,
            fast_path,
            stop_fast_path,
            mut sync_peers,
            stop_sync,
            api,
            announcer,
            withdraw_wait,
            ready,
            ..
        } = self;
        // The routers first: they move this balancer's flows to its peers while it still
        // forwards.
        let announcing = match announcer {
            Some((task, stop)) => {
                let _ = stop.send(true);
                task.await.unwrap_or(false)
            }
            None => false,
        };
        if !clean {
            api.abort();
            return;
        }
        tracing::info!("shutting down");
        ready.store(false, std::sync::atomic::Ordering::Relaxed);
        notify_systemd(&[NotifyState::Stopping]);
        if announcing {
            tracing::info!(wait = ?withdraw_wait, "routes withdrawn; forwarding on while the routers move the flows");
            tokio::time::sleep(withdraw_wait).await;
        }
        // The fast path first: it announces the sessions its last sweep has not, and its end detaches
        // the program (its links go with it); the userspace datapath takes what still comes.
        let _ = stop_fast_path.send(());
        if let Some(thread) = fast_path {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        // Peers get this balancer's last changes while its datapaths still answer; its sessions stay
        // on them as standby entries (a stop is not an eviction).
        let _ = stop_sync.send(true);
        let flushed = async { while sync_peers.join_next().await.is_some() {} };
        if tokio::time::timeout(SYNC_FLUSH_WAIT, flushed)
            .await
            .is_err()
        {
            tracing::warn!("session sync: a peer did not take the last changes in time");
        }
        // The API (its socket file goes with it), then listeners, so none mistakes the control plane's
        // end for a failure.
        api.abort();
        let _ = api.await;
        listeners.shutdown().await;
        control.abort();
    }
}

/// The XDP fast path if the configuration asks for it and it can run; with `auto`, the reason it
/// cannot is logged and the userspace datapath carries on alone.
fn start_fast_path(
    config: &Config,
    plans: &[watch::Receiver<Arc<ListenerPlan>>],
    metrics: &Metrics,
    events: &EventBus,
) -> anyhow::Result<Option<FastPath>> {
    let started = match config.datapath.kind {
        DatapathKind::Userspace => None,
        DatapathKind::Xdp => Some(FastPath::start(config, plans, metrics, events).context(
            "the XDP datapath cannot run (--datapath auto would fall back to userspace)",
        )?),
        DatapathKind::Auto => match FastPath::start(config, plans, metrics, events) {
            Ok(fast_path) => Some(fast_path),
            Err(e) => {
                tracing::warn!("the XDP datapath cannot run, forwarding in userspace only: {e:#}");
                None
            }
        },
    };
    if started.is_none() {
        metrics.set_datapath("userspace");
    }
    Ok(started)
}

/// How many ephemeral ports a source address has (Linux's ip_local_port_range).
fn local_port_range() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut bounds = text.split_whitespace().map(|v| v.parse::<usize>());
    let (low, high) = (bounds.next()?.ok()?, bounds.next()?.ok()?);
    Some(high.saturating_sub(low) + 1)
}
