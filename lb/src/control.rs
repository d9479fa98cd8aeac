//! The control plane: turns configuration and health observations into one [`ListenerPlan`] per
//! listener and publishes it to that listener's datapath. Data flows one way: config and health
//! come in here, plans go out; the datapath never writes back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, HealthCheckConfig, ListenerConfig};
use crate::health::{spawn_http_checker, Observation};
use crate::metrics::Metrics;
use crate::pool::{GatewayId, GatewayView, Placement};

/// Everything a listener's datapath needs to decide, replaced whole on every change.
#[derive(Debug)]
pub struct ListenerPlan {
    pub placement: Placement,
    pub idle_timeout: Duration,
    pub table_size: NonZeroUsize,
}

#[derive(Default)]
struct ListenerState {
    /// Gateway ids by name; kept across reloads so sessions stay attached to the same gateway.
    ids: HashMap<String, GatewayId>,
    next_id: u32,
    /// Latest verdict by gateway name, with the address it is about.
    health: HashMap<String, (SocketAddr, bool)>,
}

struct Checker {
    target: (SocketAddr, u16),
    params: HealthCheckConfig,
    task: JoinHandle<()>,
}

pub struct ControlPlane {
    config: Config,
    metrics: Metrics,
    listeners: HashMap<String, ListenerState>,
    plans: HashMap<String, watch::Sender<Arc<ListenerPlan>>>,
    checkers: HashMap<(String, String), Checker>,
    observations: mpsc::Sender<Observation>,
}

/// Receivers of each listener's plans, by listener name.
pub type PlanReceivers = HashMap<String, watch::Receiver<Arc<ListenerPlan>>>;

impl ControlPlane {
    /// Builds the first plans. Health checkers start with [`ControlPlane::run`]; observations from
    /// any source go into `observations`.
    pub fn new(
        config: Config,
        metrics: Metrics,
        observations: mpsc::Sender<Observation>,
    ) -> (ControlPlane, PlanReceivers) {
        let mut control = ControlPlane {
            config,
            metrics,
            listeners: HashMap::new(),
            plans: HashMap::new(),
            checkers: HashMap::new(),
            observations,
        };
        let mut receivers = HashMap::new();
        for listener in control.config.listeners.clone() {
            let mut state = ListenerState::default();
            let (plan, receiver) = watch::channel(Arc::new(build_plan(
                &listener,
                &mut state,
                &control.metrics,
            )));
            receivers.insert(listener.name.clone(), receiver);
            control.plans.insert(listener.name.clone(), plan);
            control.listeners.insert(listener.name.clone(), state);
        }
        (control, receivers)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Applies one health verdict. Verdicts about unknown gateways or old addresses are ignored.
    pub fn observe(&mut self, observation: Observation) {
        let Some(listener) = self.config.listener(&observation.listener) else {
            return;
        };
        let Some(gateway) = listener
            .gateways
            .iter()
            .find(|g| g.name == observation.gateway)
        else {
            return;
        };
        if gateway.address != observation.address {
            return;
        }
        if observation.healthy {
            tracing::info!(listener = %observation.listener, gateway = %observation.gateway, source = %observation.source, "gateway is up: {}", observation.detail);
        } else {
            tracing::warn!(listener = %observation.listener, gateway = %observation.gateway, source = %observation.source, "gateway is down, evicting its sessions: {}", observation.detail);
        }
        let listener = listener.clone();
        let state = self
            .listeners
            .get_mut(&listener.name)
            .expect("listener state");
        state.health.insert(
            observation.gateway,
            (observation.address, observation.healthy),
        );
        let plan = build_plan(&listener, state, &self.metrics);
        self.plans[&listener.name].send_replace(Arc::new(plan));
    }

    /// Replaces the configuration. Pools, states, weights, timeouts and health checks change in
    /// place; sessions stay pinned. Changes that need new sockets (listeners, their addresses and
    /// socket options) are refused as a whole so a reload never half-applies.
    pub fn reload(&mut self, new: Config) -> Result<(), String> {
        let old = &self.config;
        let names = |c: &Config| {
            let mut v: Vec<String> = c.listeners.iter().map(|l| l.name.clone()).collect();
            v.sort();
            v
        };
        if names(old) != names(&new) {
            return Err(format!(
                "the set of listeners changed ({:?} -> {:?}); that needs a restart",
                names(old),
                names(&new)
            ));
        }
        for listener in &new.listeners {
            let before = old.listener(&listener.name).expect("same names");
            if (before.listen, before.source, before.socket_buffer)
                != (listener.listen, listener.source, listener.socket_buffer)
            {
                return Err(format!(
                    "listener `{}`: listen, source or socket_buffer changed; that needs a restart",
                    listener.name
                ));
            }
        }
        if old.metrics_listen != new.metrics_listen {
            return Err("[metrics] listen changed; that needs a restart".into());
        }
        for before in &old.listeners {
            let after = new.listener(&before.name).expect("same names");
            for gone in before
                .gateways
                .iter()
                .filter(|g| !after.gateways.iter().any(|a| a.name == g.name))
            {
                self.metrics.forget_gateway(&before.name, &gone.name);
            }
        }
        self.config = new;
        for listener in self.config.listeners.clone() {
            let state = self
                .listeners
                .get_mut(&listener.name)
                .expect("listener state");
            state
                .ids
                .retain(|name, _| listener.gateways.iter().any(|g| &g.name == name));
            state
                .health
                .retain(|name, _| listener.gateways.iter().any(|g| &g.name == name));
            let plan = build_plan(&listener, state, &self.metrics);
            self.plans[&listener.name].send_replace(Arc::new(plan));
        }
        self.sync_checkers();
        Ok(())
    }

    /// Starts, restarts or stops built-in checkers to match the configuration.
    fn sync_checkers(&mut self) {
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
            let keep =
                wanted.get(key) == Some(&checker.target) && checker.params == self.config.health;
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

    /// Runs until every input closes: health observations, and new configurations to apply.
    pub async fn run(
        mut self,
        mut observations: mpsc::Receiver<Observation>,
        mut reloads: mpsc::Receiver<Config>,
    ) {
        self.sync_checkers();
        loop {
            tokio::select! {
                Some(observation) = observations.recv() => self.observe(observation),
                reload = reloads.recv() => match reload {
                    Some(config) => match self.reload(config) {
                        Ok(()) => {
                            self.metrics.reload(true);
                            tracing::info!("configuration reloaded");
                        }
                        Err(why) => {
                            self.metrics.reload(false);
                            tracing::error!("configuration reload refused, keeping the running one: {why}");
                        }
                    },
                    None => break,
                },
            }
        }
        for checker in self.checkers.values() {
            checker.task.abort();
        }
    }
}

/// The placement a freshly started balancer uses for `listener`, every gateway healthy: what
/// `wglb place` answers, and what tests predict clients' gateways with.
pub fn initial_placement(listener: &ListenerConfig) -> Placement {
    build_plan(listener, &mut ListenerState::default(), &Metrics::new()).placement
}

fn build_plan(
    listener: &ListenerConfig,
    state: &mut ListenerState,
    metrics: &Metrics,
) -> ListenerPlan {
    let mut gateways = Vec::with_capacity(listener.gateways.len());
    for gateway in &listener.gateways {
        let id = *state.ids.entry(gateway.name.clone()).or_insert_with(|| {
            state.next_id += 1;
            GatewayId(state.next_id)
        });
        let healthy = match state.health.get(&gateway.name) {
            Some((address, healthy)) if *address == gateway.address => *healthy,
            _ => true,
        };
        let view = GatewayView {
            id,
            name: gateway.name.clone(),
            address: gateway.address,
            weight: gateway.weight,
            admin: gateway.state,
            healthy,
        };
        metrics.set_gateway(&listener.name, &view);
        gateways.push(view);
    }
    let placement = Placement::new(
        gateways,
        listener.hash_key,
        listener.all_down,
        listener.maglev_size,
    );
    if placement.failing_open() {
        tracing::warn!(listener = %listener.name, "no gateway is healthy: failing open, health is ignored until one recovers");
    }
    ListenerPlan {
        placement,
        idle_timeout: listener.idle_timeout,
        table_size: listener.table_size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::AdminState;

    fn config(extra: &str) -> Config {
        let text = format!(
            "[[listener]]\nname = \"l\"\nlisten = \"0.0.0.0:51820\"\n{extra}\n\
             [[listener.gateway]]\nname = \"a\"\naddress = \"10.0.0.1:51820\"\n\n\
             [[listener.gateway]]\nname = \"b\"\naddress = \"10.0.0.2:51820\"\n"
        );
        Config::parse(&text, "test").unwrap()
    }

    fn observation(gateway: &str, address: &str, healthy: bool) -> Observation {
        Observation {
            listener: "l".into(),
            gateway: gateway.into(),
            address: address.parse().unwrap(),
            source: "test".into(),
            healthy,
            detail: String::new(),
        }
    }

    #[tokio::test]
    async fn health_and_reloads_reach_the_plan_and_ids_stay() {
        let (tx, _rx) = mpsc::channel(1);
        let (mut control, receivers) = ControlPlane::new(config(""), Metrics::new(), tx);
        let plan = receivers["l"].clone();
        let id_of = |name: &str| {
            plan.borrow()
                .placement
                .gateways()
                .iter()
                .find(|g| g.name == name)
                .unwrap()
                .id
        };
        let (a, b) = (id_of("a"), id_of("b"));
        assert_ne!(a, b);

        control.observe(observation("b", "10.0.0.2:51820", false));
        assert!(!plan.borrow().placement.gateway(b).unwrap().healthy);
        // A verdict about an address the gateway no longer has changes nothing.
        control.observe(observation("a", "10.9.9.9:51820", false));
        assert!(plan.borrow().placement.gateway(a).unwrap().healthy);

        let mut drained = config("idle_timeout = \"10s\"");
        drained.listeners[0].gateways[0].state = AdminState::Draining;
        control.reload(drained).unwrap();
        let current = plan.borrow().clone();
        assert_eq!(current.idle_timeout, Duration::from_secs(10));
        assert_eq!(
            current.placement.gateway(a).unwrap().admin,
            AdminState::Draining
        );
        assert_eq!(id_of("a"), a, "ids survive a reload");
        assert!(
            !current.placement.gateway(b).unwrap().healthy,
            "health survives a reload"
        );
    }

    #[tokio::test]
    async fn reloads_that_need_new_sockets_are_refused_whole() {
        let (tx, _rx) = mpsc::channel(1);
        let (mut control, _receivers) = ControlPlane::new(config(""), Metrics::new(), tx);
        let mut moved = config("");
        moved.listeners[0].listen = "0.0.0.0:51821".parse().unwrap();
        moved.listeners[0].gateways[0].state = AdminState::Down;
        assert!(control.reload(moved).unwrap_err().contains("restart"));
        assert_eq!(
            control.config().listeners[0].gateways[0].state,
            AdminState::Active
        );
    }
}
