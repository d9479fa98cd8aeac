//! The commands that drive a running balancer through its API: `wglb status`, `gateways`,
//! `sessions`, `drain`, `undrain`, `gateway add|remove|set`, `evict`, `reload`, `events`.
//!
//! Output is a table for people and, with `--json`, one JSON document (or one per line for
//! `events`) for scripts. Exit codes are part of the interface: see [`ExitCode`].

mod render;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::api::pb;
use crate::config::DEFAULT_API_SOCKET;
use crate::pool::AdminState;
use wglb_proto::client::{read_token_file, with_causes, Connection, Target};

/// Exit codes a script can rely on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    /// The balancer refused or failed the request (unknown gateway, invalid value, ...).
    Refused = 1,
    /// Bad usage or a bad configuration file (clap also exits 2 on usage errors).
    Usage = 2,
    /// `drain --wait` gave up before the gateway's sessions were gone.
    TimedOut = 3,
    /// The balancer's API cannot be reached.
    Unreachable = 4,
    /// The API refused the credentials (token or client certificate).
    Denied = 5,
}

/// A failed command: what to print, and how to exit.
#[derive(Debug)]
pub struct CliError {
    pub code: ExitCode,
    pub message: String,
}

impl CliError {
    fn new(code: ExitCode, message: impl Into<String>) -> CliError {
        CliError {
            code,
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> CliError {
        // A connection that fails only at the first request (TLS refused, a plain-text client on
        // a TLS port) comes back as a status whose source is the transport error.
        let transport = std::error::Error::source(&status)
            .is_some_and(|source| source.is::<tonic::transport::Error>());
        let code = match status.code() {
            Code::Unavailable => ExitCode::Unreachable,
            Code::Unauthenticated | Code::PermissionDenied => ExitCode::Denied,
            _ if transport => ExitCode::Unreachable,
            _ => ExitCode::Refused,
        };
        let message = match code {
            ExitCode::Denied => format!("the API refused the credentials: {}", status.message()),
            ExitCode::Unreachable => format!(
                "the balancer's API is not available: {}",
                with_causes(
                    status.message().to_string(),
                    std::error::Error::source(&status)
                )
            ),
            _ => status.message().to_string(),
        };
        CliError::new(code, message)
    }
}

/// How to reach the balancer: shared by every client command.
#[derive(Args, Clone, Debug)]
pub struct ApiArgs {
    /// The balancer's API: its Unix socket, or http(s)://HOST:PORT.
    #[arg(long, global = true, env = "WGLB_API", default_value = DEFAULT_API_SOCKET)]
    pub api: String,
    /// Bearer token for a TCP API (prefer --token-file: arguments show in `ps`).
    #[arg(long, global = true, env = "WGLB_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token for a TCP API.
    #[arg(
        long,
        global = true,
        env = "WGLB_API_TOKEN_FILE",
        conflicts_with = "token"
    )]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify an https API with.
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// The balancer, its listeners and health sources.
    Status,
    /// Gateways with state, weight, health and sessions.
    Gateways {
        #[arg(long)]
        listener: Option<String>,
    },
    /// Sessions, in client-address order.
    Sessions {
        #[arg(long)]
        listener: Option<String>,
        /// Only sessions on this gateway.
        #[arg(long)]
        gateway: Option<String>,
        /// Only this client: IP, or IP:PORT.
        #[arg(long)]
        client: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100, conflicts_with = "all", value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
        /// Every session, however many.
        #[arg(long)]
        all: bool,
    },
    /// Stop placing new clients on a gateway; its sessions stay until they go idle. With --self,
    /// withdraw this balancer from the routers instead (active-active behind ECMP).
    Drain {
        #[arg(required_unless_present = "whole")]
        gateway: Option<String>,
        /// Withdraw every address this balancer announces: the routers send its flows to the
        /// other balancers (which hold its sessions through sync), while it forwards what still
        /// arrives. `wglb undrain --self` announces them again.
        #[arg(long = "self", id = "whole", conflicts_with_all = ["gateway", "listener", "move_sessions", "wait"])]
        whole: bool,
        /// Only in this listener (default: every listener with such a gateway).
        #[arg(long)]
        listener: Option<String>,
        /// Move its sessions now instead of waiting for them to go idle: each whose client key
        /// the gateway's agent reported goes to the gateway placement picks for it, whose agent
        /// makes it call the client (about a second, no lost session). The others stay.
        #[arg(long = "move")]
        move_sessions: bool,
        /// Return only once the gateway holds no session (exit 3 at the timeout).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, e.g. 10m.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
        timeout: Duration,
    },
    /// Put a drained (or down) gateway back into placement; with --self, announce this
    /// balancer's addresses again.
    Undrain {
        #[arg(required_unless_present = "whole")]
        gateway: Option<String>,
        #[arg(long)]
        listener: Option<String>,
        #[arg(long = "self", id = "whole", conflicts_with_all = ["gateway", "listener"])]
        whole: bool,
    },
    /// Add, remove or change a gateway at runtime.
    #[command(subcommand)]
    Gateway(GatewayCommand),
    /// Evict sessions: their clients re-handshake and are placed again.
    Evict {
        /// One client: IP (every port) or IP:PORT.
        #[arg(long, required_unless_present = "gateway", conflicts_with = "gateway")]
        client: Option<String>,
        /// Every session of this gateway.
        #[arg(long)]
        gateway: Option<String>,
        #[arg(long)]
        listener: Option<String>,
    },
    /// Set a listener's WireGuard public key (the location's, as `wg` prints it): initiations
    /// whose mac1 is wrong for it are dropped at the edge. Kept across reloads until the file
    /// changes the listener's `public_key`.
    Key {
        listener: String,
        #[arg(required_unless_present = "clear", conflicts_with = "clear")]
        public_key: Option<String>,
        /// Check no mac1 on this listener any more.
        #[arg(long)]
        clear: bool,
    },
    /// Re-read the configuration file.
    Reload,
    /// Follow state changes as they happen.
    Events,
}

#[derive(Subcommand, Debug)]
pub enum GatewayCommand {
    /// Add a gateway to a listener's pool.
    Add {
        #[arg(long)]
        listener: String,
        name: String,
        /// IP:PORT of its WireGuard endpoint.
        address: String,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65535))]
        weight: u32,
        #[arg(long, value_parser = parse_state, default_value = "active")]
        state: AdminState,
        /// Defguard's health port, for the built-in checker.
        #[arg(long)]
        health_port: Option<u16>,
    },
    /// Remove a gateway; its sessions are evicted.
    Remove {
        #[arg(long)]
        listener: String,
        name: String,
    },
    /// Set a gateway's state and/or weight.
    Set {
        name: String,
        #[arg(long)]
        listener: Option<String>,
        #[arg(long, value_parser = parse_state, required_unless_present = "weight")]
        state: Option<AdminState>,
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65535))]
        weight: Option<u32>,
    },
}

fn parse_state(text: &str) -> Result<AdminState, String> {
    AdminState::parse(text).ok_or_else(|| format!("`{text}` is not one of active, draining, down"))
}

fn state_message(state: AdminState) -> pb::GatewayState {
    match state {
        AdminState::Active => pb::GatewayState::Active,
        AdminState::Draining => pb::GatewayState::Draining,
        AdminState::Down => pb::GatewayState::Down,
    }
}

impl ApiArgs {
    async fn connect(&self) -> Result<Connection, CliError> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(path)) => Some(read_token_file(path).map_err(|e| {
                CliError::new(
                    ExitCode::Usage,
                    format!("cannot read the token file {}: {e}", path.display()),
                )
            })?),
            (None, None) => None,
        };
        let target = Target {
            address: self.api.clone(),
            token,
            ca: self.ca.clone(),
            identity: self.cert.clone().zip(self.key.clone()),
        };
        target.connect().await.map_err(|e| {
            let hint = if self.api == DEFAULT_API_SOCKET {
                " (is wglb running? as a user allowed to open its socket?)"
            } else {
                ""
            };
            CliError::new(ExitCode::Unreachable, format!("{e}{hint}"))
        })
    }
}

/// How long one request may take before the balancer counts as unreachable (a hung control
/// plane must not hang scripts).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Awaits one request's answer, within [`REQUEST_TIMEOUT`].
async fn answer<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CliError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(response) => Ok(response?.into_inner()),
        Err(_) => Err(CliError::new(
            ExitCode::Unreachable,
            format!(
                "the balancer did not answer within {}",
                humantime::format_duration(REQUEST_TIMEOUT)
            ),
        )),
    }
}

/// Runs one client command to completion, printing its result.
pub async fn execute(args: &ApiArgs, command: ClientCommand) -> Result<(), CliError> {
    let mut api = args.connect().await?;
    let json = args.json;
    match command {
        ClientCommand::Status => {
            let status = answer(api.control.status(pb::StatusRequest {})).await?;
            render::status(&status, json);
        }
        ClientCommand::Gateways { listener } => {
            let gateways = answer(api.control.list_gateways(pb::ListGatewaysRequest {
                listener: listener.unwrap_or_default(),
            }))
            .await?
            .gateways;
            render::gateways(&gateways, json);
        }
        ClientCommand::Sessions {
            listener,
            gateway,
            client,
            limit,
            all,
        } => {
            let mut request = pb::ListSessionsRequest {
                listener: listener.unwrap_or_default(),
                gateway: gateway.unwrap_or_default(),
                client: client.unwrap_or_default(),
                ..Default::default()
            };
            let wanted = if all { u64::MAX } else { limit };
            let mut sessions = Vec::new();
            let mut total = 0;
            while (sessions.len() as u64) < wanted {
                request.page_size = (wanted - sessions.len() as u64).min(10_000) as u32;
                let page = answer(api.control.list_sessions(request.clone())).await?;
                total = page.total;
                sessions.extend(page.sessions);
                if page.next_page_token.is_empty() {
                    break;
                }
                request.page_token = page.next_page_token;
            }
            render::sessions(&sessions, total, json);
        }
        // clap asks for a gateway unless --self is given.
        ClientCommand::Drain { gateway: None, .. }
        | ClientCommand::Undrain { gateway: None, .. } => {
            let drained = matches!(command, ClientCommand::Drain { .. });
            let routes = api
                .control
                .drain_self(pb::DrainSelfRequest { drained })
                .await?
                .into_inner();
            render::routes(&routes, json);
        }
        ClientCommand::Drain {
            gateway: Some(gateway),
            listener,
            move_sessions,
            wait,
            timeout,
            ..
        } => {
            let changed = set(
                &mut api,
                &gateway,
                listener.as_deref(),
                Some(AdminState::Draining),
                None,
            )
            .await?;
            if move_sessions {
                let moved = api
                    .control
                    .move_sessions(pb::MoveSessionsRequest {
                        listener: listener.clone().unwrap_or_default(),
                        gateway: gateway.clone(),
                    })
                    .await?
                    .into_inner();
                render::moved(&gateway, &moved, json);
            } else if !wait {
                render::gateways(&changed, json);
            }
            if !wait {
                return Ok(());
            }
            wait_drained(&mut api, &gateway, listener.as_deref(), timeout, json).await?;
        }
        ClientCommand::Undrain {
            gateway: Some(gateway),
            listener,
            ..
        } => {
            let changed = set(
                &mut api,
                &gateway,
                listener.as_deref(),
                Some(AdminState::Active),
                None,
            )
            .await?;
            render::gateways(&changed, json);
        }
        ClientCommand::Gateway(GatewayCommand::Add {
            listener,
            name,
            address,
            weight,
            state,
            health_port,
        }) => {
            let mut request = pb::AddGatewayRequest {
                listener,
                name,
                address,
                weight,
                health_port: health_port.map_or(0, u32::from),
                ..Default::default()
            };
            request.set_state(state_message(state));
            let changed = answer(api.control.add_gateway(request)).await?;
            render::gateways(&changed.gateways, json);
        }
        ClientCommand::Gateway(GatewayCommand::Remove { listener, name }) => {
            let changed = answer(
                api.control
                    .remove_gateway(pb::RemoveGatewayRequest { listener, name }),
            )
            .await?;
            render::gateways(&changed.gateways, json);
        }
        ClientCommand::Gateway(GatewayCommand::Set {
            name,
            listener,
            state,
            weight,
        }) => {
            let changed = set(&mut api, &name, listener.as_deref(), state, weight).await?;
            render::gateways(&changed, json);
        }
        ClientCommand::Evict {
            client,
            gateway,
            listener,
        } => {
            use pb::evict_sessions_request::Target;
            let target = match (client, gateway) {
                (Some(client), _) => Target::Client(client),
                (None, Some(gateway)) => Target::Gateway(gateway),
                (None, None) => unreachable!("clap requires one"),
            };
            let evicted = answer(api.control.evict_sessions(pb::EvictSessionsRequest {
                listener: listener.unwrap_or_default(),
                target: Some(target),
            }))
            .await?
            .evicted;
            render::evicted(evicted, json);
        }
        ClientCommand::Key {
            listener,
            public_key,
            clear: _,
        } => {
            let changed = answer(api.control.set_listener_key(pb::SetListenerKeyRequest {
                listener,
                public_key: public_key.unwrap_or_default(),
            }))
            .await?;
            render::listener_key(&changed, json);
        }
        ClientCommand::Reload => {
            let reloaded = answer(api.control.reload(pb::ReloadRequest {})).await?;
            render::reloaded(&reloaded.path, json);
        }
        ClientCommand::Events => {
            let mut events = answer(api.events.watch(pb::WatchRequest {})).await?;
            while let Some(event) = events.next().await {
                render::event(&event?, json);
            }
            return Err(CliError::new(
                ExitCode::Unreachable,
                "the balancer closed the event stream",
            ));
        }
    }
    Ok(())
}

async fn set(
    api: &mut Connection,
    gateway: &str,
    listener: Option<&str>,
    state: Option<AdminState>,
    weight: Option<u32>,
) -> Result<Vec<pb::Gateway>, CliError> {
    let mut request = pb::SetGatewayRequest {
        listener: listener.unwrap_or_default().to_string(),
        name: gateway.to_string(),
        weight: weight.unwrap_or(0),
        ..Default::default()
    };
    if let Some(state) = state {
        request.set_state(state_message(state));
    }
    Ok(answer(api.control.set_gateway(request)).await?.gateways)
}

/// Polls until the drained gateway holds no session, printing progress to stderr.
async fn wait_drained(
    api: &mut Connection,
    gateway: &str,
    listener: Option<&str>,
    timeout: Duration,
    json: bool,
) -> Result<(), CliError> {
    let started = Instant::now();
    let mut last: Option<u64> = None;
    loop {
        let gateways = answer(api.control.list_gateways(pb::ListGatewaysRequest {
            listener: listener.unwrap_or_default().to_string(),
        }))
        .await?
        .gateways;
        let ours: Vec<pb::Gateway> = gateways.into_iter().filter(|g| g.name == gateway).collect();
        if ours.is_empty() {
            // Removed while draining: nothing left to wait for.
            render::drained(gateway, started.elapsed(), json);
            return Ok(());
        }
        if ours.iter().any(|g| g.state() != pb::GatewayState::Draining) {
            return Err(CliError::new(
                ExitCode::Refused,
                format!("gateway `{gateway}` is no longer draining (someone changed its state)"),
            ));
        }
        let left: u64 = ours.iter().map(|g| g.sessions).sum();
        if left == 0 {
            render::drained(gateway, started.elapsed(), json);
            return Ok(());
        }
        if last != Some(left) {
            eprintln!(
                "draining {gateway}: {left} session(s) left after {}s",
                started.elapsed().as_secs()
            );
            last = Some(left);
        }
        if started.elapsed() >= timeout {
            return Err(CliError::new(
                ExitCode::TimedOut,
                format!(
                    "gateway `{gateway}` still holds {left} session(s) after {}; it stays draining",
                    humantime::format_duration(timeout)
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500).min(timeout)).await;
    }
}
