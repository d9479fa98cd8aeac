//! The `wglb` command: runs the balancer, checks configurations, answers placement questions, and
//! drives a running balancer through its API.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use wglb::cli::{self, ApiArgs, ClientCommand};
use wglb::config::{
    Config, ConfigError, ConfigFile, DatapathKind, DatapathOverrides, ListenerFlags, XdpMode,
};
use wglb::control::initial_placement;
use wglb::pool::{AllDownPolicy, HashKey};

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
            runtime.block_on(wglb::balancer::run(config, file))
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
    out += &format!(
        "userspace datapath: {} shard(s) per listener, steered by client address and port\n",
        datapath.shards
    );
    for peer in &config.sync.peers {
        out += &format!(
            "session sync: node {} pushes its sessions to peer {} at {} (queue {})\n",
            config.sync.node, peer.name, peer.url, config.sync.queue
        );
    }
    let announced: Vec<String> = config
        .listeners
        .iter()
        .flat_map(|l| l.announce.iter().map(move |a| format!("{a} ({})", l.name)))
        .collect();
    if !announced.is_empty() {
        let announce = &config.announce;
        out += &format!(
            "announce: {} while they can forward, as routes in table {} through {} (withdrawn {:?} before a stop; after a start, up to {:?} for the sync peers' sessions)\n",
            announced.join(", "),
            announce.table,
            announce.device,
            announce.withdraw_wait,
            announce.sync_wait
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
            if let Some(agent) = config
                .agents
                .iter()
                .find(|a| a.listener == l.name && a.gateway == g.name)
            {
                out += &format!(
                    "    agent with the token in {}, up to {} handshake orders/s\n",
                    agent.token_file.display(),
                    agent.orders_per_second
                );
            }
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
