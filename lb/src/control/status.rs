//! What the API is shown: every gateway's configuration, health and where it came from.

use crate::config::{GatewayConfig, ListenerConfig};
use crate::pool::Health;
use crate::quorum::Vote;

use super::ControlPlane;

/// The control plane's view of everything, for the API.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub listeners: Vec<ListenerStatus>,
    /// Sources with a fresh report on some gateway.
    pub sources: Vec<String>,
    pub quorum: u32,
}

#[derive(Clone, Debug)]
pub struct ListenerStatus {
    pub config: ListenerConfig,
    pub failing_open: bool,
    pub gateways: Vec<GatewayStatus>,
}

#[derive(Clone, Debug)]
pub struct GatewayStatus {
    pub listener: String,
    pub config: GatewayConfig,
    pub health: Health,
    pub health_detail: String,
    pub votes: Vec<(String, Vote)>,
    pub fail_static: bool,
    pub added_at_runtime: bool,
    pub changed_at_runtime: bool,
}

impl ControlPlane {
    /// The status of every gateway `wanted(listener, gateway)` selects.
    pub(super) fn statuses(&self, wanted: impl Fn(&str, &str) -> bool) -> Vec<GatewayStatus> {
        let mut out = Vec::new();
        for listener in &self.config.listeners {
            let state = &self.listeners[&listener.name];
            let file = self.file.listener(&listener.name);
            for gateway in &listener.gateways {
                if !wanted(&listener.name, &gateway.name) {
                    continue;
                }
                let in_file = file.and_then(|l| l.gateways.iter().find(|g| g.name == gateway.name));
                let health = state
                    .health
                    .get(&gateway.name)
                    .filter(|h| h.address == gateway.address);
                out.push(GatewayStatus {
                    listener: listener.name.clone(),
                    config: gateway.clone(),
                    health: health.map_or(Health::Up, |h| h.health),
                    health_detail: health.map_or_else(
                        || "no health source reports on it".to_string(),
                        |h| h.detail.clone(),
                    ),
                    votes: health.map_or_else(Vec::new, |h| {
                        h.votes
                            .held()
                            .map(|(s, v)| (s.to_string(), v.clone()))
                            .collect()
                    }),
                    fail_static: health.is_some_and(|h| h.fail_static),
                    added_at_runtime: in_file.is_none(),
                    changed_at_runtime: in_file.is_some_and(|f| f != gateway),
                });
            }
        }
        out
    }

    pub fn snapshot(&self) -> Snapshot {
        let gateways = self.statuses(|_, _| true);
        Snapshot {
            listeners: self
                .config
                .listeners
                .iter()
                .map(|l| ListenerStatus {
                    config: l.clone(),
                    failing_open: self.plans[&l.name].borrow().placement.failing_open(),
                    gateways: gateways
                        .iter()
                        .filter(|g| g.listener == l.name)
                        .cloned()
                        .collect(),
                })
                .collect(),
            sources: self.sources().into_iter().collect(),
            quorum: self.config.health.quorum,
        }
    }
}
