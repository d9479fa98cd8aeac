//! The control plane: turns configuration, runtime changes and health reports into one
//! [`ListenerPlan`] per listener and publishes it to that listener's datapath. Data flows one way:
//! config, API requests and health come in here, plans go out; the datapath never writes back.
//!
//! The running configuration is the file (or flags) plus what the API changed since. A reload is a
//! three-way merge: a gateway the file did not touch keeps what the API set (a drain survives an
//! unrelated reload), a gateway the file changed takes the file's word, and gateways added through
//! the API stay until the file defines one of the same name.
//!
//! One file per idea: gateway health from the sources' reports ([`health`]), runtime edits of the
//! pools ([`edits`]), the reload's merge ([`reload`]), the built-in checkers' lifecycle
//! ([`checkers`]) and what the API is shown ([`status`]).

mod checkers;
mod edits;
mod health;
mod passive;
mod reload;
mod status;
#[cfg(test)]
mod testing;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{AdmissionConfig, Config, GatewayConfig, ListenerConfig};
use crate::events::{EventBus, EventKind};
use crate::health::Observation;
use crate::metrics::Metrics;
use crate::passive::{Board, Judge};
use crate::pool::{AdminState, GatewayId, GatewayView, Health, Placement};
use wglb_common::mac1::Mac1Key;

use checkers::Checker;
use health::GatewayHealth;
pub use health::{MAX_HEALTH_SOURCES, MAX_REPORT_TTL};
pub use reload::announce_refused_reload;
pub use status::{GatewayStatus, ListenerStatus, Snapshot};

/// Everything a listener's datapath needs to decide, replaced whole on every change.
#[derive(Debug)]
pub struct ListenerPlan {
    pub placement: Placement,
    pub idle_timeout: Duration,
    pub table_size: NonZeroUsize,
    pub admission: AdmissionConfig,
    /// The listener's mac1 check, if it has the location's public key.
    pub mac1: Option<Mac1Key>,
}

#[derive(Default)]
struct ListenerState {
    /// Gateway ids by name; kept across reloads so sessions stay attached to the same gateway.
    ids: HashMap<String, GatewayId>,
    next_id: u32,
    /// Health by gateway name; absent means up and unwatched.
    health: HashMap<String, GatewayHealth>,
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
}

type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

/// What the API asks of the control plane.
pub enum ControlRequest {
    /// A health report that wants an answer (from the API's health ingestion).
    Report {
        observation: Observation,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Reload {
        // Boxed: a configuration is large next to the other requests.
        config: Box<Config>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    AddGateway {
        listener: String,
        gateway: GatewayConfig,
        reply: Reply<Vec<GatewayStatus>>,
    },
    RemoveGateway {
        listener: String,
        name: String,
        reply: Reply<Vec<GatewayStatus>>,
    },
    /// Sets state and/or weight of the gateway `name` in `listener`, or in every listener that
    /// has one of that name.
    SetGateway {
        listener: Option<String>,
        name: String,
        state: Option<AdminState>,
        weight: Option<u32>,
        reply: Reply<Vec<GatewayStatus>>,
    },
    /// Sets or clears a listener's WireGuard public key (its mac1 check).
    SetListenerKey {
        listener: String,
        public_key: Option<[u8; 32]>,
        reply: Reply<()>,
    },
    Snapshot {
        reply: oneshot::Sender<Snapshot>,
    },
}

pub struct ControlPlane {
    /// The configuration as the file (or the flags) last gave it.
    file: Config,
    /// What runs: the file plus runtime changes.
    config: Config,
    metrics: Metrics,
    events: EventBus,
    listeners: HashMap<String, ListenerState>,
    plans: HashMap<String, watch::Sender<Arc<ListenerPlan>>>,
    checkers: HashMap<(String, String), Checker>,
    observations: mpsc::Sender<Observation>,
    /// What the datapaths post for passive health, and its judge per (listener, gateway).
    board: Board,
    judges: HashMap<(String, String), Judge>,
}

/// Receivers of each listener's plans, by listener name.
pub type PlanReceivers = HashMap<String, watch::Receiver<Arc<ListenerPlan>>>;

impl ControlPlane {
    /// Builds the first plans. Health checkers start with [`ControlPlane::run`]; observations from
    /// the built-in checkers go into `observations`.
    pub fn new(
        config: Config,
        metrics: Metrics,
        events: EventBus,
        observations: mpsc::Sender<Observation>,
    ) -> (ControlPlane, PlanReceivers) {
        let mut control = ControlPlane {
            file: config.clone(),
            config,
            metrics,
            events,
            listeners: HashMap::new(),
            plans: HashMap::new(),
            checkers: HashMap::new(),
            observations,
            board: Board::default(),
            judges: HashMap::new(),
        };
        let mut receivers = HashMap::new();
        for listener in control.config.listeners.clone() {
            let mut state = ListenerState::default();
            let plan = build_plan(&listener, &mut state, &control.metrics);
            let (sender, receiver) = watch::channel(Arc::new(plan));
            receivers.insert(listener.name.clone(), receiver);
            control.plans.insert(listener.name.clone(), sender);
            control.listeners.insert(listener.name.clone(), state);
        }
        (control, receivers)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where the datapaths post what passive health needs.
    pub fn passive_board(&self) -> Board {
        self.board.clone()
    }

    /// Rebuilds and publishes one listener's plan.
    fn publish(&mut self, listener: &str) {
        let config = self.config.listener(listener).expect("known listener");
        let state = self.listeners.get_mut(listener).expect("listener state");
        let plan = build_plan(config, state, &self.metrics);
        let failing_open = plan.placement.failing_open();
        let previous = self.plans[listener].send_replace(Arc::new(plan));
        if failing_open != previous.placement.failing_open() {
            if failing_open {
                tracing::warn!(%listener, "no active gateway is up: failing open, health is ignored until one recovers");
            } else {
                tracing::info!(%listener, "a gateway is up again: health counts again");
            }
            self.events.publish(
                listener,
                "",
                EventKind::FailingOpen {
                    active: failing_open,
                },
            );
        }
    }

    fn handle(&mut self, request: ControlRequest) {
        match request {
            ControlRequest::Report { observation, reply } => {
                let result = self.observe(observation, Instant::now());
                self.metrics.health_report(result.is_ok());
                let _ = reply.send(result);
            }
            ControlRequest::Reload { config, reply } => {
                let result = self.reload(*config);
                match &result {
                    Ok(()) => {
                        self.metrics.reload(true);
                        self.events.publish("", "", EventKind::ConfigReloaded);
                        tracing::info!("configuration reloaded");
                    }
                    Err(why) => announce_refused_reload(&self.metrics, &self.events, why),
                }
                let _ = reply.send(result);
            }
            ControlRequest::AddGateway {
                listener,
                gateway,
                reply,
            } => {
                let _ = reply.send(self.add_gateway(&listener, gateway));
            }
            ControlRequest::RemoveGateway {
                listener,
                name,
                reply,
            } => {
                let _ = reply.send(self.remove_gateway(&listener, &name));
            }
            ControlRequest::SetGateway {
                listener,
                name,
                state,
                weight,
                reply,
            } => {
                let _ = reply.send(self.set_gateway(listener.as_deref(), &name, state, weight));
            }
            ControlRequest::SetListenerKey {
                listener,
                public_key,
                reply,
            } => {
                let _ = reply.send(self.set_listener_key(&listener, public_key));
            }
            ControlRequest::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
        }
    }

    /// Runs until the request channel closes.
    pub async fn run(
        mut self,
        mut observations: mpsc::Receiver<Observation>,
        mut requests: mpsc::Receiver<ControlRequest>,
    ) {
        self.sync_checkers();
        let mut next_settle: Option<Instant> = None;
        let mut looks = tokio::time::interval(Duration::from_secs(1));
        looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let settle_timer = async {
                match next_settle {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(observation) = observations.recv() => {
                    if let Err(why) = self.observe(observation, Instant::now()) {
                        tracing::debug!("built-in health report ignored: {why}");
                    }
                }
                _ = settle_timer => {}
                _ = looks.tick() => self.look_passively(Instant::now()),
                request = requests.recv() => match request {
                    Some(request) => self.handle(request),
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
    ListenerPlan {
        placement,
        idle_timeout: listener.idle_timeout,
        table_size: listener.table_size,
        admission: listener.admission,
        mac1: listener.public_key.as_ref().map(Mac1Key::new),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::testing::*;

    #[tokio::test]
    async fn health_and_reloads_reach_the_plan_and_ids_stay() {
        let (mut control, plan) = control(config(""));
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

        let t0 = Instant::now();
        control
            .observe(observation("b", "10.0.0.2:51820", false), t0)
            .unwrap();
        assert_eq!(health_of(&plan, "b"), Health::Suspect);
        // A verdict about an address the gateway no longer has is refused.
        let stale = control.observe(observation("a", "10.9.9.9:51820", false), t0);
        assert!(stale.unwrap_err().contains("10.0.0.1:51820"));
        assert_eq!(health_of(&plan, "a"), Health::Up);
        let due = control.settle(t0).expect("a suspect is pending");
        assert_eq!(due, t0 + Duration::from_secs(2));
        control.settle(due);
        assert_eq!(health_of(&plan, "b"), Health::Down);

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
        control
            .observe(observation("b", "10.0.0.2:51820", true), due)
            .unwrap();
        assert_eq!(health_of(&plan, "b"), Health::Up);
    }

    #[tokio::test]
    async fn a_reload_through_the_control_loop_announces_its_refusal() {
        let (tx, _rx) = mpsc::channel(1);
        let events = EventBus::new();
        let metrics = Metrics::new();
        let (mut control, _plans) =
            ControlPlane::new(config(""), metrics.clone(), events.clone(), tx);
        let mut watched = events.subscribe();
        let (reply, answer) = oneshot::channel();
        control.handle(ControlRequest::Reload {
            config: Box::new(config("maglev_size = 251")),
            reply,
        });
        let why = answer.await.unwrap().unwrap_err();
        assert!(why.contains("needs a restart"), "{why}");
        let event = watched.try_recv().unwrap();
        assert!(
            matches!(&event.kind, EventKind::ConfigRefused { why: w } if *w == why),
            "{event:?}"
        );
    }
}
