//! The control plane: turns configuration and health observations into one [`ListenerPlan`] per
//! listener and publishes it to that listener's datapath. Data flows one way: config and health
//! come in here, plans go out; the datapath never writes back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, HealthCheckConfig, ListenerConfig};
use crate::health::{spawn_http_checker, Observation};
use crate::metrics::Metrics;
use crate::pool::{GatewayId, GatewayView, Health, Placement};

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
    /// Health by gateway name; absent means up.
    health: HashMap<String, GatewayHealth>,
}

struct GatewayHealth {
    /// The address the verdict is about: a gateway that moves starts over as up.
    address: SocketAddr,
    health: Health,
    /// When it was last reported down; a suspect turns down `eviction_delay` after.
    since: Instant,
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

    /// Applies one health verdict at `now`. An up verdict counts at once; a down one makes the
    /// gateway a suspect, and [`ControlPlane::settle`] turns it down after the eviction delay.
    /// Verdicts about unknown gateways or old addresses are ignored.
    pub fn observe(&mut self, observation: Observation, now: Instant) {
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
        let delay = self.config.health.eviction_delay;
        let listener = listener.clone();
        let state = self
            .listeners
            .get_mut(&listener.name)
            .expect("listener state");
        let current = state
            .health
            .get(&observation.gateway)
            .filter(|h| h.address == observation.address)
            .map_or(Health::Up, |h| h.health);
        let health = match (observation.healthy, current) {
            (true, _) => Health::Up,
            (false, Health::Up) if delay.is_zero() => Health::Down,
            (false, Health::Up) => Health::Suspect,
            (false, settled) => settled,
        };
        if health == current {
            return;
        }
        let (name, source, detail) = (
            &observation.gateway,
            &observation.source,
            &observation.detail,
        );
        match health {
            Health::Up => {
                tracing::info!(listener = %listener.name, gateway = %name, %source, "gateway is up: {detail}")
            }
            Health::Suspect => {
                tracing::warn!(listener = %listener.name, gateway = %name, %source, "gateway reported down: no new sessions for it, and its sessions go in {delay:?} unless every gateway is down by then: {detail}")
            }
            Health::Down => {
                tracing::warn!(listener = %listener.name, gateway = %name, %source, "gateway is down, evicting its sessions: {detail}")
            }
        }
        state.health.insert(
            observation.gateway,
            GatewayHealth {
                address: observation.address,
                health,
                since: now,
            },
        );
        let plan = build_plan(&listener, state, &self.metrics);
        self.plans[&listener.name].send_replace(Arc::new(plan));
    }

    /// Turns suspects reported down at least the eviction delay ago into down gateways; returns
    /// when to call again, if any suspect is left.
    pub fn settle(&mut self, now: Instant) -> Option<Instant> {
        let delay = self.config.health.eviction_delay;
        let mut next: Option<Instant> = None;
        for listener in self.config.listeners.clone() {
            let state = self
                .listeners
                .get_mut(&listener.name)
                .expect("listener state");
            let mut changed = false;
            for (name, health) in state.health.iter_mut() {
                if health.health != Health::Suspect {
                    continue;
                }
                let due = health.since + delay;
                if due <= now {
                    health.health = Health::Down;
                    changed = true;
                    tracing::warn!(listener = %listener.name, gateway = %name, "gateway still down after {delay:?}: its sessions are evicted unless every gateway is down");
                } else {
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
            }
            if changed {
                let plan = build_plan(&listener, state, &self.metrics);
                self.plans[&listener.name].send_replace(Arc::new(plan));
            }
        }
        next
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
        let mut next_settle: Option<Instant> = None;
        loop {
            let settle_timer = async {
                match next_settle {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(observation) = observations.recv() => self.observe(observation, Instant::now()),
                _ = settle_timer => {}
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
            next_settle = self.settle(Instant::now());
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
        let health = match state.health.get(&gateway.name) {
            Some(h) if h.address == gateway.address => h.health,
            _ => Health::Up,
        };
        let view = GatewayView {
            id,
            name: gateway.name.clone(),
            address: gateway.address,
            weight: gateway.weight,
            admin: gateway.state,
            health,
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
        tracing::warn!(listener = %listener.name, "no active gateway is up: failing open, health is ignored until one recovers");
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

        let health = |id| plan.borrow().placement.gateway(id).unwrap().health;
        let t0 = Instant::now();
        control.observe(observation("b", "10.0.0.2:51820", false), t0);
        assert_eq!(health(b), Health::Suspect);
        // A verdict about an address the gateway no longer has changes nothing.
        control.observe(observation("a", "10.9.9.9:51820", false), t0);
        assert_eq!(health(a), Health::Up);
        let due = control.settle(t0).expect("a suspect is pending");
        assert_eq!(due, t0 + Duration::from_secs(2));
        assert_eq!(control.settle(due), None);
        assert_eq!(health(b), Health::Down);

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
        assert_eq!(
            current.placement.gateway(b).unwrap().health,
            Health::Down,
            "health survives a reload"
        );
        control.observe(observation("b", "10.0.0.2:51820", true), t0);
        assert_eq!(health(b), Health::Up);
    }

    #[tokio::test]
    async fn gateways_failing_together_fail_open_instead_of_evicting() {
        let (tx, _rx) = mpsc::channel(1);
        let (mut control, receivers) = ControlPlane::new(config(""), Metrics::new(), tx);
        let plan = receivers["l"].clone();
        let t0 = Instant::now();
        // Core goes away: both gateways' /health turn 503, a second apart.
        control.observe(observation("a", "10.0.0.1:51820", false), t0);
        let t1 = t0 + Duration::from_secs(1);
        control.observe(observation("b", "10.0.0.2:51820", false), t1);
        control.settle(t1 + Duration::from_secs(5));
        let placement = &plan.borrow().placement;
        assert!(placement.failing_open());
        for g in placement.gateways() {
            assert!(
                placement.keeps(g.id, g.address),
                "{} lost its sessions",
                g.name
            );
        }
    }

    #[tokio::test]
    async fn a_zero_eviction_delay_evicts_at_once() {
        let (tx, _rx) = mpsc::channel(1);
        let mut config = config("");
        config.health.eviction_delay = Duration::ZERO;
        let (mut control, receivers) = ControlPlane::new(config, Metrics::new(), tx);
        control.observe(observation("a", "10.0.0.1:51820", false), Instant::now());
        let placement = &receivers["l"].borrow().placement;
        assert_eq!(placement.gateways()[0].health, Health::Down);
        assert_eq!(control.settle(Instant::now()), None);
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
