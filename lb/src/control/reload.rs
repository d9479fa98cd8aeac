//! Reloads: what a new file may change in place, and the three-way merge with what the API
//! changed since.

use crate::config::{check_gateway, Config, GatewayConfig, ListenerConfig};
use crate::events::{EventBus, EventKind};
use crate::metrics::Metrics;

use super::ControlPlane;

impl ControlPlane {
    /// Replaces the file's configuration. Pools, states, weights, timeouts and health checks
    /// change in place; sessions stay pinned. A change to anything else (see
    /// [`Config::needs_restart`]) refuses the reload as a whole, so a reload never half-applies
    /// and never answers "ok" while ignoring part of the file.
    pub fn reload(&mut self, new: Config) -> Result<(), String> {
        let mut refused = self.config.needs_restart(&new).into_iter();
        if let Some(first) = refused.next() {
            return Err(match refused.count() {
                0 => first.to_string(),
                more => format!("{first} (and {more} more change(s) that need a restart)"),
            });
        }
        let merged = merge(&self.file, &new, &self.config)?;
        let before = std::mem::replace(&mut self.config, merged);
        self.file = new;
        for listener in self.config.listeners.clone() {
            let old = before.listener(&listener.name).expect("same names");
            self.announce_changes(old, &listener);
            self.forget_gone(&listener);
            self.publish(&listener.name);
        }
        self.sync_checkers();
        Ok(())
    }
}

/// Counts, logs and announces a reload that was refused, wherever it was refused (a file that
/// does not parse never reaches the control plane).
pub fn announce_refused_reload(metrics: &Metrics, events: &EventBus, why: &str) {
    metrics.reload(false);
    events.publish("", "", EventKind::ConfigRefused { why: why.into() });
    tracing::error!("configuration reload refused, keeping the running one: {why}");
}

/// The running configuration after the file went from `old_file` to `new_file` while the API
/// changed `running`: gateways the file did not touch keep their runtime form (or stay removed),
/// gateways it changed or added take the file's form, and runtime additions stay unless the file
/// now defines their name; a listener's public key set at runtime stays unless the file changed
/// it.
fn merge(old_file: &Config, new_file: &Config, running: &Config) -> Result<Config, String> {
    let mut merged = new_file.clone();
    for listener in &mut merged.listeners {
        let old = old_file.listener(&listener.name);
        let run = running.listener(&listener.name);
        let find = |l: Option<&ListenerConfig>, name: &str| {
            l.and_then(|l| l.gateways.iter().find(|g| g.name == name).cloned())
        };
        // A key the API set stays until the file changes the listener's own.
        if let (Some(old), Some(run)) = (old, run) {
            if old.public_key == listener.public_key {
                listener.public_key = run.public_key;
            }
        }
        let mut gateways: Vec<GatewayConfig> = Vec::new();
        for gateway in &listener.gateways {
            let untouched = find(old, &gateway.name).as_ref() == Some(gateway);
            match (untouched, find(run, &gateway.name)) {
                (true, Some(runtime)) => gateways.push(runtime),
                (true, None) => {} // removed through the API, and the file did not change it
                (false, _) => gateways.push(gateway.clone()),
            }
        }
        for runtime in run.map_or(&[][..], |l| &l.gateways[..]) {
            let from_file = find(old, &runtime.name).is_some()
                || listener.gateways.iter().any(|g| g.name == runtime.name);
            if !from_file {
                gateways.push(runtime.clone());
            }
        }
        let mut checked: Vec<GatewayConfig> = Vec::new();
        for gateway in gateways {
            check_gateway(listener.source, &checked, &gateway).map_err(|(field, reason)| {
                format!(
                    "listener `{}`: gateway `{}` (with the gateways added through the API): field `{field}`: {reason}",
                    listener.name, gateway.name
                )
            })?;
            checked.push(gateway);
        }
        if checked.len() > listener.maglev_size as usize {
            return Err(format!(
                "listener `{}`: {} Maglev slots cannot hold {} gateways (with the gateways added through the API)",
                listener.name,
                listener.maglev_size,
                checked.len()
            ));
        }
        listener.gateways = checked;
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::testing::*;
    use crate::control::{ControlError, ListenerPlan};
    use crate::pool::{AdminState, Health};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::sync::{mpsc, watch};
    use wglb_common::mac1::Mac1Key;

    #[tokio::test]
    async fn a_moved_gateway_starts_over_as_up_with_no_reports() {
        let mut config = config("");
        config.health.eviction_delay = Duration::ZERO;
        let (mut control, plan) = control(config.clone());
        let now = Instant::now();
        control
            .observe(report("s1", "b", None, false), now)
            .unwrap();
        assert_eq!(health_of(&plan, "b"), Health::Down);
        config.listeners[0].gateways[1].address = "10.0.0.9:51820".parse().unwrap();
        control.reload(config).unwrap();
        assert_eq!(health_of(&plan, "b"), Health::Up);
        let snapshot = control.snapshot();
        let b = &snapshot.listeners[0].gateways[1];
        assert!(b.votes.is_empty() && !b.fail_static, "{b:?}");
        // Nothing about the old address is left to settle later.
        assert_eq!(control.settle(now + Duration::from_secs(60)), None);
        assert_eq!(health_of(&plan, "b"), Health::Up);
    }

    #[tokio::test]
    async fn a_key_set_through_the_api_stays_until_the_file_changes_the_listeners_own() {
        let key = |byte: u8| {
            let text = crate::config::format_public_key(&[byte; 32]);
            config(&format!("public_key = \"{text}\""))
        };
        let (mut control, plan) = control(key(1));
        let checks = |plan: &watch::Receiver<Arc<ListenerPlan>>, byte: u8| {
            plan.borrow().mac1 == Some(Mac1Key::new(&[byte; 32]))
        };
        assert!(checks(&plan, 1));
        control.set_listener_key("l", Some([2; 32])).unwrap();
        assert!(checks(&plan, 2));
        control.reload(key(1)).unwrap();
        assert!(checks(&plan, 2), "the file did not change its key");
        control.reload(key(3)).unwrap();
        assert!(checks(&plan, 3), "the file changed it");
        control.set_listener_key("l", None).unwrap();
        assert!(plan.borrow().mac1.is_none());
        assert!(matches!(
            control.set_listener_key("nope", None),
            Err(ControlError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn reloads_that_need_a_restart_are_refused_whole_naming_the_line() {
        let api = "[api]\nsocket = \"/run/a.sock\"\n";
        let mut elsewhere = config("");
        elsewhere.listeners[0].listen = "0.0.0.0:51821".parse().unwrap();
        let cases = [
            // (running, reloaded, the refusal)
            (
                config("maglev_size = 65537"),
                config("maglev_size = 251"),
                "test line 4 (listener `l`): field `maglev_size`: changed from 65537 to 251; that needs a restart",
            ),
            // A setting dropped from the file is named by its section's line.
            (
                config("maglev_size = 251"),
                config(""),
                "test line 1 (listener `l`): field `maglev_size`: changed from 251 to 65537",
            ),
            (
                elsewhere,
                config(""),
                "test line 3 (listener `l`): field `listen`: changed from 0.0.0.0:51821 to 0.0.0.0:51820",
            ),
            (
                config(""),
                config("source = \"10.0.0.9\""),
                "test line 4 (listener `l`): field `source`: changed from unset to 10.0.0.9",
            ),
            (
                config(""),
                config("socket_buffer = 1048576"),
                "test line 4 (listener `l`): field `socket_buffer`: changed from 4194304 to 1048576",
            ),
            (
                config(""),
                config_with("[metrics]\nlisten = \"127.0.0.1:9638\"\n", ""),
                "test line 2 ([metrics]): field `listen`: changed from unset to 127.0.0.1:9638",
            ),
            (
                config_with(api, ""),
                config_with(
                    "[api]\nsocket_mode = \"0600\"\nsocket = \"/run/b.sock\"\n",
                    "",
                ),
                "test line 3 ([api]): field `socket`: changed from /run/a.sock to /run/b.sock",
            ),
            (
                config(""),
                config_with("[datapath]\nkind = \"xdp\"\n", ""),
                "test line 2 ([datapath]): field `kind`: changed from userspace to xdp",
            ),
            (
                config_with("[datapath]\nnat_ports = \"20000-21000\"\n", ""),
                config(""),
                "test ([datapath]): field `nat_ports`: changed from 20000-21000 to 16384-32767",
            ),
            (
                config_with("[sync]\nnode = \"lb-a\"\n", ""),
                config_with("[sync]\nnode = \"lb-b\"\n", ""),
                "test line 2 ([sync]): field `node`: changed from lb-a to lb-b",
            ),
            (
                config(""),
                config_with("[sync]\nqueue = 128\n", ""),
                "test line 2 ([sync]): field `queue`: changed from 65536 to 128",
            ),
            // The XDP program's session maps are sized at load.
            (
                config_with("[datapath]\nkind = \"auto\"\n", ""),
                config_with("[datapath]\nkind = \"auto\"\n", "probation_size = 64"),
                "field `probation_size`: changed from 4096 to 64",
            ),
        ];
        for (running, mut reloaded, refusal) in cases {
            let (mut control, _plan) = control(running.clone());
            // Beside the refused change, one the reload could apply: it must not apply either.
            reloaded.listeners[0].gateways[0].state = AdminState::Down;
            let why = control.reload(reloaded).unwrap_err();
            assert!(
                why.contains(refusal) && why.contains("that needs a restart"),
                "{why}"
            );
            assert_eq!(control.config(), &running, "{refusal}");
            assert_eq!(control.file, running, "{refusal}");
        }
    }

    #[tokio::test]
    async fn adding_or_removing_a_listener_is_refused_naming_it() {
        let second = "\n[[listener]]\nname = \"m\"\nlisten = \"0.0.0.0:51821\"\n\
                      [[listener.gateway]]\nname = \"c\"\naddress = \"10.0.0.3:51820\"\n";
        let parse = |text: String| Config::parse(&text, "test").unwrap();
        let one = parse(text_with("", ""));
        let two = parse(text_with("", "") + second);
        let (mut control, _plan) = control(one.clone());
        let why = control.reload(two.clone()).unwrap_err();
        assert!(
            why.starts_with("test line 14 (listener `m`): field `name`: changed from no such listener to m; that needs a restart"),
            "{why}"
        );
        assert_eq!(control.config(), &one);

        let (tx, _rx) = mpsc::channel(1);
        let (mut control, _plans) = ControlPlane::new(two, Metrics::new(), EventBus::new(), tx);
        let why = control.reload(one).unwrap_err();
        assert!(
            why.starts_with("test (listener `m`): field `name`: changed from m to no such listener; that needs a restart"),
            "{why}"
        );
    }
}
