//! `wglb-agent`: runs beside one WireGuard gateway (in its network namespace), tells every
//! balancer what the gateway's interface holds (its peers, their endpoints and handshakes, or
//! that it is gone), and carries out the balancers' orders to start a handshake towards a path
//! they opened for a client whose gateway died.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;
use wglb_proto::client::read_token_file;
use wglb_proto::v1::{AgentPeer, PeerReport};

use wglb_agent::link;
use wglb_agent::wireguard::{Backend, Interface};

/// Every option can come from the environment too (`WGLB_AGENT_*`), as the systemd unit and
/// container manifests give them.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The gateway's WireGuard interface.
    #[arg(long, env = "WGLB_AGENT_INTERFACE")]
    interface: String,
    /// How the gateway runs WireGuard.
    #[arg(long, value_enum, default_value = "kernel", env = "WGLB_AGENT_BACKEND")]
    backend: Backend,
    /// A balancer's TCP API (`http://` or `https://` URL); repeat for each balancer (or list
    /// them comma-separated in the environment).
    #[arg(
        long = "balancer",
        required = true,
        env = "WGLB_AGENT_BALANCERS",
        value_delimiter = ','
    )]
    balancers: Vec<String>,
    /// The token of this gateway's `[[agent]]` entry in the balancers' configuration: it names
    /// the gateway this agent speaks for.
    #[arg(long, env = "WGLB_AGENT_TOKEN_FILE")]
    token_file: PathBuf,
    /// CA to verify the balancers' certificates with (https).
    #[arg(long, env = "WGLB_AGENT_CA")]
    ca: Option<PathBuf>,
    /// How often the interface is read; a report goes out at once when it changed, and every
    /// second in any case.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration, env = "WGLB_AGENT_POLL")]
    poll: Duration,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, default_value = "info", env = "WGLB_AGENT_LOG")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .init();
    let token = read_token_file(&args.token_file)
        .with_context(|| format!("cannot read {}", args.token_file.display()))?;
    let interface = Arc::new(Interface::new(&args.interface, args.backend)?);
    let first = read(&interface).await;
    if !first.interface_up {
        // Balancers take no word from an agent about an interface it has never seen.
        tracing::warn!(interface = %args.interface, "cannot read the interface yet: {}", first.detail);
    }
    let (reports, latest) = watch::channel(first);
    for address in &args.balancers {
        let target = wglb_proto::client::Target {
            address: address.clone(),
            token: Some(token.clone()),
            ca: args.ca.clone(),
            identity: None,
        };
        tokio::spawn(link::run(target, latest.clone(), interface.clone()));
    }
    let mut ticks = tokio::time::interval(args.poll);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let report = read(&interface).await;
        reports.send_if_modified(|held| {
            let changed = *held != report;
            if changed {
                if held.interface_up != report.interface_up {
                    if report.interface_up {
                        tracing::info!(interface = %args.interface, "the interface is back");
                    } else {
                        tracing::warn!(interface = %args.interface, "the interface is gone: {}", report.detail);
                    }
                }
                *held = report;
            }
            changed
        });
    }
}

/// A failed read is tried once more this soon before the interface counts as gone: a gone
/// interface makes the balancers take the gateway down at once, a passing hiccup must not.
const RETRY_READ_AFTER: Duration = Duration::from_millis(50);

/// The interface as a report: its peers, or that it is gone.
async fn read(interface: &Arc<Interface>) -> PeerReport {
    let read_once = || {
        let interface = interface.clone();
        async move {
            tokio::task::spawn_blocking(move || interface.peers())
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("the reading task failed: {e}")))
        }
    };
    let peers = match read_once().await {
        Ok(peers) => Ok(peers),
        Err(_) => {
            tokio::time::sleep(RETRY_READ_AFTER).await;
            read_once().await
        }
    };
    match peers {
        Ok(peers) => PeerReport {
            interface_up: true,
            detail: String::new(),
            peers: peers
                .into_iter()
                .map(|peer| AgentPeer {
                    public_key: peer.public_key.to_vec(),
                    endpoint: peer.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                    latest_handshake_unix_ms: peer.latest_handshake_ms.unwrap_or(0),
                })
                .collect(),
        },
        Err(e) => PeerReport {
            interface_up: false,
            detail: format!("{e:#}"),
            peers: Vec::new(),
        },
    }
}
