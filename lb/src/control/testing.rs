//! What the control plane's tests share: a small configuration and a control plane over it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::events::EventBus;
use crate::health::Observation;
use crate::metrics::Metrics;
use crate::pool::Health;

use super::{ControlPlane, ListenerPlan};

pub(super) fn config(extra: &str) -> Config {
    config_with("", extra)
}

/// Listener `l` with gateways `a` and `b`; `top` goes first (top-level sections), `extra`
/// into the listener's table, at line 4 after `top`.
pub(super) fn config_with(top: &str, extra: &str) -> Config {
    Config::parse(&text_with(top, extra), "test").unwrap()
}

pub(super) fn text_with(top: &str, extra: &str) -> String {
    format!(
        "{top}[[listener]]\nname = \"l\"\nlisten = \"0.0.0.0:51820\"\n{extra}\n\
             [[listener.gateway]]\nname = \"a\"\naddress = \"10.0.0.1:51820\"\n\n\
             [[listener.gateway]]\nname = \"b\"\naddress = \"10.0.0.2:51820\"\n"
    )
}

pub(super) fn observation(gateway: &str, address: &str, healthy: bool) -> Observation {
    report("test", gateway, Some(address), healthy)
}

pub(super) fn report(
    source: &str,
    gateway: &str,
    address: Option<&str>,
    healthy: bool,
) -> Observation {
    Observation {
        listener: "l".into(),
        gateway: gateway.into(),
        address: address.map(|a| a.parse().unwrap()),
        source: source.into(),
        healthy,
        gone: false,
        detail: String::new(),
        ttl: Duration::from_secs(3),
    }
}

pub(super) fn control(config: Config) -> (ControlPlane, watch::Receiver<Arc<ListenerPlan>>) {
    let (tx, _rx) = mpsc::channel(1);
    let (control, receivers) = ControlPlane::new(config, Metrics::new(), EventBus::new(), tx);
    (control, receivers["l"].clone())
}

pub(super) fn health_of(plan: &watch::Receiver<Arc<ListenerPlan>>, name: &str) -> Health {
    let plan = plan.borrow();
    let gateway = plan.placement.gateways().iter().find(|g| g.name == name);
    gateway.unwrap().health
}
