//! The `wglb` command: runs the balancer, checks configurations, answers placement questions, and
//! drives a running balancer through its API.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use wglb::api::serve::ApiServer;
use wglb::api::service::Api;
use wglb::cli::{self, ApiArgs, ClientCommand};
use wglb::config::{
    Config, ConfigError, ConfigFile, DatapathKind, DatapathOverrides, ListenerFlags, XdpMode,
};
use wglb::control::{announce_refused_reload, initial_placement, ControlPlane, ControlRequest};
use wglb::datapath::{run_listener, ListenerLinks, UdpEndpoint};
use wglb::events::EventBus;
use wglb::metrics::{self, Metrics};
use wglb::pool::{AllDownPolicy, HashKey};
use wglb::sync::{self, PeerQueue, SyncOut};
use wglb::xdp::fastpath::{FastPath, FastPathLinks};
use wglb_healthcheck::exposition::{notify_systemd, NotifyState};
use wglb_proto::client::{read_token_file, Target};

/// How long a stopping balancer waits for its peers to take its last session changes.
const SYNC_FLUSH_WAIT: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(name = "wglb", version, about = "A WireGuard-aware UDP load balancer")]
struct Cli {
    /// Log filter (tracing's env-filter syntax), e.g. `info` or `wglb=debug`.
    #[arg(long, global = true, env = "WGLB_LOG", default_value = "info")]
    log: String,
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the balancer (SIGHUP reloads the configuration file).
    Run(RunArgs),
    /// Validate a configuration file and print what it sets up.
    CheckConfig { config: PathBuf },
    /// Print the gateway a client would be placed on when every gateway is healthy.
    Place {
        #[arg(long, short)]
        config: PathBuf,
        /// The listener to ask (default: the first).
        #[arg(long)]
        listener: Option<String>,
        /// The client's source address and port.
        client: SocketAddr,
    },
    #[command(flatten)]
    Client(ClientCommand),
    /// Print a shell completion script, e.g. `wglb completions bash > /etc/bash_completion.d/wglb`.
    Completions { shell: clap_complete::Shell },
}

#[derive(Args)]
struct RunArgs {
    /// A TOML configuration file.
    #[arg(long, short, conflicts_with_all = ["listen", "gateways"])]
    config: Option<PathBuf>,
    /// Address to receive WireGuard clients on (instead of a file; one listener).
    #[arg(long, requires = "gateways")]
    listen: Option<SocketAddr>,
    /// A gateway: NAME=ADDRESS:PORT[,weight=N][,state=active|draining|down][,health-port=P]
    #[arg(long = "gateway", value_name = "SPEC")]
    gateways: Vec<String>,
    /// source-ip or source-ip-port.
    #[arg(long)]
    hash_key: Option<HashKey>,
    /// Forget a session after this long without a packet either way, e.g. 180s.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Most sessions kept at once.
    #[arg(long)]
    table_size: Option<usize>,
    /// fail-open or drop, when no gateway is healthy.
    #[arg(long)]
    all_down: Option<AllDownPolicy>,
    /// Address to send to gateways from.
    #[arg(long)]
    source: Option<IpAddr>,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Serve the API on this Unix socket (default /run/wglb/api.sock).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Which datapath forwards (overrides [datapath] kind; default userspace).
    #[arg(long, value_enum)]
    datapath: Option<DatapathKind>,
    /// How the XDP program attaches (overrides [datapath] xdp_mode; default auto).
    #[arg(long, value_enum)]
    xdp_mode: Option<XdpMode>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
                eprintln!("wglb: bad --log filter `{}`: {e}; using info", cli.log);
                tracing_subscriber::EnvFilter::new("info")
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Run(args) => load(&args).and_then(|(config, file)| {
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(run(config, file))
        }),
        Command::CheckConfig { config } => {
            Config::load(&config).map(|c| print!("{}", describe(&c)))
        }
        Command::Place {
            config,
            listener,
            client,
        } => place(&config, listener.as_deref(), client),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "wglb", &mut std::io::stdout());
            Ok(())
        }
        Command::Client(command) => {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")
                .map(|runtime| runtime.block_on(cli::execute(&cli.api, command)));
            return match outcome {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(e)) => {
                    eprintln!("wglb: {}", e.message);
                    ExitCode::from(e.code as u8)
                }
                Err(e) => {
                    eprintln!("wglb: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wglb: {e:#}");
            ExitCode::from(if e.is::<ConfigError>() { 2 } else { 1 })
        }
    }
}

fn load(args: &RunArgs) -> anyhow::Result<(Config, Option<ConfigFile>)> {
    let overrides = DatapathOverrides {
        kind: args.datapath,
        xdp_mode: args.xdp_mode,
    };
    if let Some(path) = &args.config {
        let file = ConfigFile {
            path: path.clone(),
            overrides,
        };
        return Ok((file.load()?, Some(file)));
    }
    let Some(listen) = args.listen else {
        return Err(ConfigError {
            place: "command line".into(),
            field: String::new(),
            reason: "give --config FILE, or --listen ADDRESS and --gateway NAME=ADDRESS:PORT"
                .into(),
        }
        .into());
    };
    let flags = ListenerFlags {
        name: "default".into(),
        listen,
        source: args.source,
        gateways: args.gateways.clone(),
        hash_key: args.hash_key,
        idle_timeout: args.idle_timeout,
        table_size: args.table_size,
        all_down: args.all_down,
        metrics_listen: args.metrics_listen,
        api_socket: args.api_socket.clone(),
    };
    let mut config = Config::from_flags(&flags)?;
    overrides.apply(&mut config);
    Ok((config, None))
}

async fn run(config: Config, file: Option<ConfigFile>) -> anyhow::Result<()> {
    // Every session holds a socket towards its gateway.
    let wanted: u64 = config
        .listeners
        .iter()
        .map(|l| l.table_size.get() as u64 + 64)
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
    let listener_plans: Vec<_> = config
        .listeners
        .iter()
        .map(|l| plans.remove(&l.name).expect("a plan per listener"))
        .collect();
    // The program before the sockets: a restarted balancer's clients then go on through the
    // program at once rather than through userspace until it attaches.
    let fast_path = start_fast_path(&config, &listener_plans, &metrics, &events)?;
    let mut sockets = Vec::new();
    for listener in &config.listeners {
        let socket =
            UdpEndpoint::listen(listener.listen, listener.socket_buffer).with_context(|| {
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
    let api = Api::new(
        requests_tx.clone(),
        datapaths,
        events.clone(),
        metrics.clone(),
        file.clone(),
        config.sync.peers.iter().map(|p| p.name.clone()).collect(),
    );
    // Nor the API: the balancer goes on with what it was last told.
    let api_task = tokio::spawn(async move {
        if let Err(e) = api_server.run(api).await {
            tracing::error!("the API server failed, the API is no longer served: {e:#}");
        }
    });
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    notify_systemd(&[NotifyState::Ready]);
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hangup.recv() => match &file {
                Some(file) => match file.load() {
                    Ok(config) => {
                        tracing::info!(path = %file.path.display(), "SIGHUP: reloading the configuration");
                        // The control plane logs and counts the outcome. Never wait here: this
                        // loop also watches signals and listeners.
                        let (reply, _) = oneshot::channel();
                        if requests_tx.try_send(ControlRequest::Reload { config: Box::new(config), reply }).is_err() {
                            announce_refused_reload(&metrics, &events, "SIGHUP: the control plane is busy or gone; try again");
                        }
                    }
                    Err(e) => announce_refused_reload(&metrics, &events, &format!("SIGHUP: {e:#}")),
                },
                None => tracing::warn!("SIGHUP: started from flags, there is no file to reload"),
            },
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            Some(ended) = tasks.join_next() => {
                api_task.abort();
                return Err(match ended {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => anyhow::anyhow!("a listener stopped"),
                    Err(e) => anyhow::anyhow!("a task died: {e}"),
                });
            }
        }
    }
    tracing::info!("shutting down");
    ready.store(false, std::sync::atomic::Ordering::Relaxed);
    notify_systemd(&[NotifyState::Stopping]);
    // The fast path first: it announces the sessions its last sweep has not, and its end detaches
    // the program (its links go with it); the userspace datapath takes what still comes.
    let _ = stop_fast_path.send(());
    if let Some(thread) = fast_path {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    // Peers get this balancer's last changes while its datapaths still answer; its sessions stay
    // on them as standby entries (a stop is not an eviction).
    let _ = stop_sync.send(true);
    let flushed = async { while sync_tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(SYNC_FLUSH_WAIT, flushed)
        .await
        .is_err()
    {
        tracing::warn!("session sync: a peer did not take the last changes in time");
    }
    // The API (its socket file goes with it), then listeners, so none mistakes the control plane's
    // end for a failure.
    api_task.abort();
    let _ = api_task.await;
    tasks.shutdown().await;
    control.abort();
    Ok(())
}

/// The XDP fast path if the configuration asks for it and it can run; with `auto`, the reason it
/// cannot is logged and the userspace datapath carries on alone.
fn start_fast_path(
    config: &Config,
    plans: &[tokio::sync::watch::Receiver<std::sync::Arc<wglb::control::ListenerPlan>>],
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

fn describe(config: &Config) -> String {
    let mut out = String::new();
    let health = &config.health;
    out += &format!(
        "health checks: GET {} every {:?}, timeout {:?}, rise {}, fall {}, eviction delay {:?}\n",
        health.path,
        health.interval,
        health.timeout,
        health.rise,
        health.fall,
        health.eviction_delay
    );
    out += &format!(
        "health sources combined: quorum {}, API reports count for {:?} unless they give a ttl\n",
        health.quorum, health.report_ttl
    );
    if let Some(metrics) = config.metrics_listen {
        out += &format!("metrics: http://{metrics}/metrics\n");
    }
    let api = &config.api;
    out += &format!(
        "api: unix socket {} (mode {:04o})",
        api.socket.display(),
        api.socket_mode
    );
    if let Some(tcp) = api.tcp {
        let mut auth = Vec::new();
        if api.token_file.is_some() {
            auth.push("bearer token");
        }
        if api.client_ca.is_some() {
            auth.push("client certificates");
        } else if api.tls.is_some() {
            auth.push("TLS");
        }
        if auth.is_empty() {
            auth.push("NO authentication");
        }
        out += &format!(", tcp {tcp} with {}", auth.join(" and "));
    }
    out += "\n";
    let datapath = &config.datapath;
    out += &match datapath.kind {
        DatapathKind::Userspace => "datapath: userspace\n".to_string(),
        kind => format!(
            "datapath: {} (XDP mode {:?} on {}, NAT ports {}-{})\n",
            if kind == DatapathKind::Xdp {
                "xdp"
            } else {
                "auto: xdp where it attaches, else userspace"
            },
            datapath.xdp_mode,
            if datapath.interfaces.is_empty() {
                "every Ethernet interface that is up".to_string()
            } else {
                datapath.interfaces.join(", ")
            },
            datapath.nat_ports.start(),
            datapath.nat_ports.end()
        ),
    };
    for peer in &config.sync.peers {
        out += &format!(
            "session sync: node {} pushes its sessions to peer {} at {} (queue {})\n",
            config.sync.node, peer.name, peer.url, config.sync.queue
        );
    }
    for l in &config.listeners {
        out += &format!(
            "listener {} on {}: hash {}, idle timeout {:?}, up to {} sessions, Maglev {} slots, all down: {}\n",
            l.name,
            l.listen,
            l.hash_key.as_str(),
            l.idle_timeout,
            l.table_size,
            l.maglev_size,
            l.all_down.as_str()
        );
        for g in &l.gateways {
            let check = g.health_port.map_or("no health check".to_string(), |p| {
                format!("health port {p}")
            });
            out += &format!(
                "  gateway {} at {}: {}, weight {}, {check}\n",
                g.name,
                g.address,
                g.state.as_str(),
                g.weight
            );
        }
    }
    out
}

fn place(path: &std::path::Path, listener: Option<&str>, client: SocketAddr) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let listener = match listener {
        Some(name) => config
            .listener(name)
            .with_context(|| format!("no listener `{name}` in {}", path.display()))?,
        None => &config.listeners[0],
    };
    let placement = initial_placement(listener);
    match placement.place(client) {
        Some(g) => println!("{} {}", g.name, g.address),
        None => anyhow::bail!(
            "no gateway of listener `{}` takes new sessions",
            listener.name
        ),
    }
    Ok(())
}

/// How many ephemeral ports a source address has (Linux's ip_local_port_range).
fn local_port_range() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut bounds = text.split_whitespace().map(|v| v.parse::<usize>());
    let (low, high) = (bounds.next()?.ok()?, bounds.next()?.ok()?);
    Some(high.saturating_sub(low) + 1)
}
