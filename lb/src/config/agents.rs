//! `[[agent]]`: the gateway agents that may attach to this balancer (`crate::agents`).

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{ApiConfig, ConfigError, ListenerConfig, Origin};

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    listener: String,
    gateway: String,
    token_file: PathBuf,
    orders_per_second: Option<u32>,
}

pub(super) fn build_agents(
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
