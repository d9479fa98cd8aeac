//! Runtime edits of a listener's pool through the API: add, remove, set a gateway; and what
//! any change of a pool announces and forgets.

use crate::config::{check_gateway, GatewayConfig, ListenerConfig};
use crate::events::EventKind;
use crate::pool::AdminState;

use super::{ControlError, ControlPlane, GatewayHealth, GatewayStatus};

impl ControlPlane {
    /// Publishes events (and drops metric series) for what changed between two versions of a
    /// listener's pool.
    pub(super) fn announce_changes(&self, before: &ListenerConfig, after: &ListenerConfig) {
        let listener = &after.name;
        for gone in before
            .gateways
            .iter()
            .filter(|g| !after.gateways.iter().any(|a| a.name == g.name))
        {
            self.metrics.forget_gateway(listener, &gone.name);
            self.events
                .publish(listener, &gone.name, EventKind::GatewayRemoved);
        }
        for gateway in &after.gateways {
            match before.gateways.iter().find(|g| g.name == gateway.name) {
                None => self
                    .events
                    .publish(listener, &gateway.name, EventKind::GatewayAdded),
                Some(old) if old.address != gateway.address => {
                    // A moved gateway is a new one for WireGuard's purposes.
                    self.events
                        .publish(listener, &gateway.name, EventKind::GatewayRemoved);
                    self.events
                        .publish(listener, &gateway.name, EventKind::GatewayAdded);
                }
                Some(old) if (old.state, old.weight) != (gateway.state, gateway.weight) => {
                    self.events.publish(
                        listener,
                        &gateway.name,
                        EventKind::GatewayState {
                            state: gateway.state,
                            weight: gateway.weight,
                        },
                    )
                }
                Some(_) => {}
            }
        }
    }

    /// Drops the ids of gateways no longer in `listener`'s pool, and the health (with its
    /// metrics) of gateways gone or moved: reports about an old address say nothing of the new.
    pub(super) fn forget_gone(&mut self, listener: &ListenerConfig) {
        let state = self
            .listeners
            .get_mut(&listener.name)
            .expect("listener state");
        state
            .ids
            .retain(|name, _| listener.gateways.iter().any(|g| &g.name == name));
        let current = |name: &String, health: &GatewayHealth| {
            listener
                .gateways
                .iter()
                .any(|g| &g.name == name && g.address == health.address)
        };
        for (name, health) in state.health.iter().filter(|(n, h)| !current(n, h)) {
            for (source, _) in health.votes.held() {
                self.metrics
                    .set_health_vote(&listener.name, name, source, None);
            }
            self.metrics.forget_fail_static(&listener.name, name);
        }
        state.health.retain(|name, health| current(name, health));
    }

    /// Applies a change to one listener's pool: validates the result, publishes it, announces it.
    fn change_pool(
        &mut self,
        listener: &str,
        change: impl FnOnce(&mut Vec<GatewayConfig>) -> Result<(), ControlError>,
    ) -> Result<(), ControlError> {
        let before = self
            .config
            .listener(listener)
            .ok_or_else(|| ControlError::NotFound(format!("no listener `{listener}`")))?
            .clone();
        let mut after = before.clone();
        change(&mut after.gateways)?;
        if after.gateways.len() > after.maglev_size as usize {
            return Err(ControlError::Invalid(format!(
                "listener `{listener}`: {} Maglev slots cannot hold {} gateways",
                after.maglev_size,
                after.gateways.len()
            )));
        }
        self.announce_changes(&before, &after);
        self.forget_gone(&after);
        *self
            .config
            .listeners
            .iter_mut()
            .find(|l| l.name == listener)
            .expect("known listener") = after;
        self.publish(listener);
        self.sync_checkers();
        Ok(())
    }

    /// Sets or clears `listener`'s public key: its plan's mac1 check follows at once.
    pub fn set_listener_key(
        &mut self,
        listener: &str,
        public_key: Option<[u8; 32]>,
    ) -> Result<(), ControlError> {
        let config = self
            .config
            .listeners
            .iter_mut()
            .find(|l| l.name == listener)
            .ok_or_else(|| ControlError::NotFound(format!("no listener `{listener}`")))?;
        if config.public_key != public_key {
            config.public_key = public_key;
            self.publish(listener);
            tracing::info!(%listener, checked = public_key.is_some(), "the listener's public key (its mac1 check) was set through the API");
        }
        Ok(())
    }

    pub fn add_gateway(
        &mut self,
        listener: &str,
        gateway: GatewayConfig,
    ) -> Result<Vec<GatewayStatus>, ControlError> {
        let source = self.config.listener(listener).and_then(|l| l.source);
        let name = gateway.name.clone();
        self.change_pool(listener, |gateways| {
            check_gateway(source, gateways, &gateway).map_err(|(field, reason)| {
                ControlError::Invalid(format!("gateway `{name}`: field `{field}`: {reason}"))
            })?;
            gateways.push(gateway);
            Ok(())
        })?;
        tracing::info!(%listener, gateway = %name, "gateway added through the API");
        Ok(self.statuses(|l, g| l == listener && g == name))
    }

    pub fn remove_gateway(
        &mut self,
        listener: &str,
        name: &str,
    ) -> Result<Vec<GatewayStatus>, ControlError> {
        let removed = self.statuses(|l, g| l == listener && g == name);
        self.change_pool(listener, |gateways| {
            let count = gateways.len();
            gateways.retain(|g| g.name != name);
            if gateways.len() == count {
                return Err(ControlError::NotFound(format!(
                    "listener `{listener}` has no gateway `{name}`"
                )));
            }
            Ok(())
        })?;
        tracing::info!(%listener, gateway = %name, "gateway removed through the API: its sessions are evicted");
        Ok(removed)
    }

    pub fn set_gateway(
        &mut self,
        listener: Option<&str>,
        name: &str,
        state: Option<AdminState>,
        weight: Option<u32>,
    ) -> Result<Vec<GatewayStatus>, ControlError> {
        if let Some(weight) = weight {
            if weight == 0 || weight > u16::MAX as u32 {
                return Err(ControlError::Invalid(format!(
                    "weight {weight} is outside 1..=65535"
                )));
            }
        }
        let targets: Vec<String> = self
            .config
            .listeners
            .iter()
            .filter(|l| listener.is_none_or(|wanted| l.name == wanted))
            .filter(|l| l.gateways.iter().any(|g| g.name == name))
            .map(|l| l.name.clone())
            .collect();
        if targets.is_empty() {
            return Err(ControlError::NotFound(match listener {
                Some(listener) => format!("listener `{listener}` has no gateway `{name}`"),
                None => format!("no listener has a gateway `{name}`"),
            }));
        }
        for target in &targets {
            self.change_pool(target, |gateways| {
                let gateway = gateways
                    .iter_mut()
                    .find(|g| g.name == name)
                    .expect("checked");
                gateway.state = state.unwrap_or(gateway.state);
                gateway.weight = weight.unwrap_or(gateway.weight);
                Ok(())
            })?;
            tracing::info!(listener = %target, gateway = %name, state = ?state, weight = ?weight, "gateway changed through the API");
        }
        Ok(self.statuses(|l, g| targets.iter().any(|t| t == l) && g == name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::testing::*;
    use crate::control::ListenerPlan;
    use std::sync::Arc;
    use tokio::sync::watch;

    #[tokio::test]
    async fn runtime_changes_survive_reloads_that_do_not_touch_them() {
        let (mut control, plan) = control(config(""));
        control
            .set_gateway(None, "a", Some(AdminState::Draining), None)
            .unwrap();
        let added = GatewayConfig {
            name: "c".into(),
            address: "10.0.0.3:51820".parse().unwrap(),
            weight: 2,
            state: AdminState::Active,
            health_port: None,
        };
        let status = control.add_gateway("l", added.clone()).unwrap();
        assert!(status[0].added_at_runtime);
        let dup = control.add_gateway("l", added.clone()).unwrap_err();
        assert!(matches!(dup, ControlError::Invalid(m) if m.contains("used twice")));
        control.remove_gateway("l", "b").unwrap();
        assert!(matches!(
            control.remove_gateway("l", "b"),
            Err(ControlError::NotFound(_))
        ));

        // An unrelated reload (idle timeout) keeps the drain, the addition and the removal.
        control.reload(config("idle_timeout = \"200s\"")).unwrap();
        let names = |plan: &watch::Receiver<Arc<ListenerPlan>>| {
            plan.borrow()
                .placement
                .gateways()
                .iter()
                .map(|g| (g.name.clone(), g.admin))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(&plan),
            vec![
                ("a".to_string(), AdminState::Draining),
                ("c".to_string(), AdminState::Active)
            ]
        );
        // A file that now says something about `a` wins.
        let mut edited = config("idle_timeout = \"200s\"");
        edited.listeners[0].gateways[0].weight = 3;
        control.reload(edited).unwrap();
        assert_eq!(names(&plan)[0], ("a".to_string(), AdminState::Active));
        // A file gateway that takes a runtime gateway's address is refused.
        let mut clash = config("idle_timeout = \"200s\"");
        clash.listeners[0].gateways[1].address = "10.0.0.3:51820".parse().unwrap();
        assert!(control.reload(clash).unwrap_err().contains("also gateway"));
    }
}
