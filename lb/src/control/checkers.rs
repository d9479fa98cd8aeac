//! The built-in health checkers' lifecycle: one per gateway with a health port, restarted only
//! when what it probes changes.

use std::collections::HashMap;
use std::net::SocketAddr;

use tokio::task::JoinHandle;

use crate::config::HealthCheckConfig;
use crate::health::spawn_http_checker;

use super::ControlPlane;

pub(super) struct Checker {
    target: (SocketAddr, u16),
    params: HealthCheckConfig,
    pub(super) task: JoinHandle<()>,
}

impl ControlPlane {
    /// Starts, restarts or stops built-in checkers to match the configuration.
    pub(super) fn sync_checkers(&mut self) {
        let mut wanted = HashMap::new();
        for listener in &self.config.listeners {
            for gateway in &listener.gateways {
                if let Some(port) = gateway.health_port {
                    wanted.insert(
                        (listener.name.clone(), gateway.name.clone()),
                        (gateway.address, port),
                    );
                }
            }
        }
        self.checkers.retain(|key, checker| {
            let keep = wanted.get(key) == Some(&checker.target)
                && checker.params.probes_alike(&self.config.health);
            if !keep {
                checker.task.abort();
            }
            keep
        });
        for (key, target) in wanted {
            if self.checkers.contains_key(&key) {
                continue;
            }
            let params = self.config.health.clone();
            let task = spawn_http_checker(
                key.0.clone(),
                key.1.clone(),
                target.0,
                target.1,
                params.clone(),
                self.observations.clone(),
            );
            self.checkers.insert(
                key,
                Checker {
                    target,
                    params,
                    task,
                },
            );
        }
    }
}
