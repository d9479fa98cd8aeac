//! The control plane: turns configuration, runtime changes and health reports into one
//! [`ListenerPlan`] per listener and publishes it to that listener's datapath. Data flows one way:
//! config, API requests and health come in here, plans go out; the datapath never writes back.
//!
//! The running configuration is the file (or flags) plus what the API changed since. A reload is a
//! three-way merge: a gateway the file did not touch keeps what the API set (a drain survives an
//! unrelated reload), a gateway the file changed takes the file's word, and gateways added through
//! the API stay until the file defines one of the same name.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{check_gateway, Config, GatewayConfig, HealthCheckConfig, ListenerConfig};
use crate::events::{EventBus, EventKind};
use crate::health::{spawn_http_checker, Observation, BUILTIN_SOURCE};
use crate::metrics::Metrics;
use crate::pool::{AdminState, GatewayId, GatewayView, Health, Placement};
use crate::quorum::{Verdict, Vote, Votes};

/// Everything a listener's datapath needs to decide, replaced whole on every change.
#[derive(Debug)]
pub struct ListenerPlan {
    pub placement: Placement,
    pub idle_timeout: Duration,
    pub table_size: NonZeroUsize,
}

/// Most health sources tracked at once: source names come from API clients, and each costs
/// metric series.
pub const MAX_HEALTH_SOURCES: usize = 16;
/// Longest a single report counts: a source that asks for more would freeze its word.
pub const MAX_REPORT_TTL: Duration = Duration::from_secs(600);

#[derive(Default)]
struct ListenerState {
    /// Gateway ids by name; kept across reloads so sessions stay attached to the same gateway.
    ids: HashMap<String, GatewayId>,
    next_id: u32,
    /// Health by gateway name; absent means up and unwatched.
    health: HashMap<String, GatewayHealth>,
}

struct GatewayHealth {
    /// The address the reports are about: a gateway that moves starts over as up.
    address: SocketAddr,
    votes: Votes,
    health: Health,
    /// When it was last found down by quorum; a suspect turns down `eviction_delay` after.
    since: Instant,
    detail: String,
    /// Every source went silent and the last verdict is kept.
    fail_static: bool,
}

impl GatewayHealth {
    fn new(address: SocketAddr, now: Instant) -> GatewayHealth {
        GatewayHealth {
            address,
            votes: Votes::default(),
            health: Health::Up,
            since: now,
            detail: String::new(),
            fail_static: false,
        }
    }
}

struct Checker {
    target: (SocketAddr, u16),
    params: HealthCheckConfig,
    task: JoinHandle<()>,
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
    Snapshot {
        reply: oneshot::Sender<Snapshot>,
    },
}

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

    /// Records one source's report at `now` and re-judges the gateway. Reports about unknown
    /// gateways, or about an address the gateway no longer has, are refused.
    pub fn observe(&mut self, observation: Observation, now: Instant) -> Result<(), String> {
        let listener = self
            .config
            .listener(&observation.listener)
            .ok_or_else(|| format!("no listener `{}`", observation.listener))?;
        let gateway = listener
            .gateways
            .iter()
            .find(|g| g.name == observation.gateway)
            .ok_or_else(|| {
                format!(
                    "listener `{}` has no gateway `{}`",
                    listener.name, observation.gateway
                )
            })?;
        if let Some(address) = observation.address {
            if address != gateway.address {
                return Err(format!(
                    "gateway `{}` is at {} now, not {address}",
                    gateway.name, gateway.address
                ));
            }
        }
        // The built-in checker is not counted: API clients must not be able to crowd it out.
        let sources = self.sources();
        if observation.source != BUILTIN_SOURCE
            && !sources.contains(&observation.source)
            && sources.iter().filter(|s| *s != BUILTIN_SOURCE).count() >= MAX_HEALTH_SOURCES
        {
            return Err(format!(
                "already {MAX_HEALTH_SOURCES} health sources report; `{}` is one too many",
                observation.source
            ));
        }
        let address = gateway.address;
        let (listener, name) = (listener.name.clone(), gateway.name.clone());
        let state = self.listeners.get_mut(&listener).expect("listener state");
        // A gateway's health about an older address was dropped when it moved (`forget_gone`).
        let entry = state
            .health
            .entry(name.clone())
            .or_insert_with(|| GatewayHealth::new(address, now));
        let ttl = match observation.ttl {
            Duration::ZERO => self.config.health.report_ttl,
            ttl => ttl.min(MAX_REPORT_TTL),
        };
        entry.votes.record(
            &observation.source,
            observation.healthy,
            observation.detail,
            now,
            ttl,
        );
        self.metrics.set_health_vote(
            &listener,
            &name,
            &observation.source,
            Some(observation.healthy),
        );
        self.judge(&listener, &name, now);
        Ok(())
    }

    /// Sources with a fresh report on any gateway.
    fn sources(&self) -> BTreeSet<String> {
        self.listeners
            .values()
            .flat_map(|l| l.health.values())
            .flat_map(|h| h.votes.held().map(|(s, _)| s.to_string()))
            .collect()
    }

    /// Combines a gateway's fresh reports into its health, publishing the plan when it changed.
    fn judge(&mut self, listener: &str, gateway: &str, now: Instant) {
        let quorum = self.config.health.quorum;
        let delay = self.config.health.eviction_delay;
        let state = self.listeners.get_mut(listener).expect("listener state");
        let Some(entry) = state.health.get_mut(gateway) else {
            return;
        };
        let verdict = entry.votes.verdict(now, quorum);
        let silent = verdict == Verdict::Silent;
        if silent != entry.fail_static {
            entry.fail_static = silent;
            self.metrics.set_fail_static(listener, gateway, silent);
            if silent {
                tracing::warn!(%listener, %gateway, health = entry.health.as_str(), "every health source went silent: keeping the last verdict (fail static)");
            } else {
                tracing::info!(%listener, %gateway, "a health source reports again");
            }
            self.events
                .publish(listener, gateway, EventKind::FailStatic { active: silent });
        }
        let (health, detail) = match verdict {
            Verdict::Healthy | Verdict::Unwatched => {
                let fresh = entry.votes.held().count();
                (
                    Health::Up,
                    format!("{fresh} fresh report(s), fewer than {quorum} say down"),
                )
            }
            Verdict::Unhealthy(why) => {
                let health = match entry.health {
                    Health::Up if delay.is_zero() => Health::Down,
                    Health::Up => Health::Suspect,
                    settled => settled,
                };
                (health, why)
            }
            Verdict::Undecided(why) => (
                entry.health,
                format!("kept as {}: {why}", entry.health.as_str()),
            ),
            Verdict::Silent => (
                entry.health,
                format!(
                    "no fresh report: kept as {} (fail static)",
                    entry.health.as_str()
                ),
            ),
        };
        entry.detail = detail;
        if health == entry.health {
            return;
        }
        let previous = entry.health;
        entry.health = health;
        if previous == Health::Up {
            entry.since = now;
        }
        let detail = entry.detail.clone();
        match health {
            Health::Up => tracing::info!(%listener, %gateway, "gateway is up: {detail}"),
            Health::Suspect => {
                tracing::warn!(%listener, %gateway, "gateway reported down: no new sessions for it, and its sessions go in {delay:?} unless every gateway is down by then: {detail}")
            }
            Health::Down => {
                tracing::warn!(%listener, %gateway, "gateway is down, evicting its sessions: {detail}")
            }
        }
        let source = entry
            .votes
            .held()
            .filter(|(_, v)| v.healthy == (health == Health::Up))
            .map(|(s, _)| s.to_string())
            .collect::<Vec<_>>()
            .join(",");
        self.events.publish(
            listener,
            gateway,
            EventKind::GatewayHealth {
                health,
                source,
                detail,
            },
        );
        self.publish(listener);
    }

    /// Forgets reports past their time to live and turns suspects reported down at least the
    /// eviction delay ago into down gateways; returns when to call again, if ever.
    pub fn settle(&mut self, now: Instant) -> Option<Instant> {
        let delay = self.config.health.eviction_delay;
        let mut next: Option<Instant> = None;
        let mut soonest = |at: Instant| next = Some(next.map_or(at, |n: Instant| n.min(at)));
        let mut to_judge = Vec::new();
        let mut to_publish = Vec::new();
        for (listener, state) in self.listeners.iter_mut() {
            let mut changed = false;
            for (name, health) in state.health.iter_mut() {
                let expired = health.votes.expire(now);
                for source in &expired {
                    tracing::info!(%listener, gateway = %name, %source, "health source went silent: its last report no longer counts");
                    self.metrics.set_health_vote(listener, name, source, None);
                }
                if !expired.is_empty() {
                    to_judge.push((listener.clone(), name.clone()));
                }
                if let Some(at) = health.votes.next_expiry() {
                    soonest(at);
                }
                if health.health != Health::Suspect {
                    continue;
                }
                let due = health.since + delay;
                if due <= now {
                    health.health = Health::Down;
                    changed = true;
                    tracing::warn!(%listener, gateway = %name, "gateway still down after {delay:?}: its sessions are evicted unless every gateway is down");
                    self.events.publish(
                        listener,
                        name,
                        EventKind::GatewayHealth {
                            health: Health::Down,
                            source: String::new(),
                            detail: health.detail.clone(),
                        },
                    );
                } else {
                    soonest(due);
                }
            }
            if changed {
                to_publish.push(listener.clone());
            }
        }
        for listener in to_publish {
            self.publish(&listener);
        }
        for (listener, gateway) in to_judge {
            self.judge(&listener, &gateway, now);
        }
        next
    }

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

    /// Publishes events (and drops metric series) for what changed between two versions of a
    /// listener's pool.
    fn announce_changes(&self, before: &ListenerConfig, after: &ListenerConfig) {
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
    fn forget_gone(&mut self, listener: &ListenerConfig) {
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

    /// The status of every gateway `wanted(listener, gateway)` selects.
    fn statuses(&self, wanted: impl Fn(&str, &str) -> bool) -> Vec<GatewayStatus> {
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
/// now defines their name.
fn merge(old_file: &Config, new_file: &Config, running: &Config) -> Result<Config, String> {
    let mut merged = new_file.clone();
    for listener in &mut merged.listeners {
        let old = old_file.listener(&listener.name);
        let run = running.listener(&listener.name);
        let find = |l: Option<&ListenerConfig>, name: &str| {
            l.and_then(|l| l.gateways.iter().find(|g| g.name == name).cloned())
        };
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        config_with("", extra)
    }

    /// Listener `l` with gateways `a` and `b`; `top` goes first (top-level sections), `extra`
    /// into the listener's table, at line 4 after `top`.
    fn config_with(top: &str, extra: &str) -> Config {
        Config::parse(&text_with(top, extra), "test").unwrap()
    }

    fn text_with(top: &str, extra: &str) -> String {
        format!(
            "{top}[[listener]]\nname = \"l\"\nlisten = \"0.0.0.0:51820\"\n{extra}\n\
             [[listener.gateway]]\nname = \"a\"\naddress = \"10.0.0.1:51820\"\n\n\
             [[listener.gateway]]\nname = \"b\"\naddress = \"10.0.0.2:51820\"\n"
        )
    }

    fn observation(gateway: &str, address: &str, healthy: bool) -> Observation {
        report("test", gateway, Some(address), healthy)
    }

    fn report(source: &str, gateway: &str, address: Option<&str>, healthy: bool) -> Observation {
        Observation {
            listener: "l".into(),
            gateway: gateway.into(),
            address: address.map(|a| a.parse().unwrap()),
            source: source.into(),
            healthy,
            detail: String::new(),
            ttl: Duration::from_secs(3),
        }
    }

    fn control(config: Config) -> (ControlPlane, watch::Receiver<Arc<ListenerPlan>>) {
        let (tx, _rx) = mpsc::channel(1);
        let (control, receivers) = ControlPlane::new(config, Metrics::new(), EventBus::new(), tx);
        (control, receivers["l"].clone())
    }

    fn health_of(plan: &watch::Receiver<Arc<ListenerPlan>>, name: &str) -> Health {
        let plan = plan.borrow();
        let gateway = plan.placement.gateways().iter().find(|g| g.name == name);
        gateway.unwrap().health
    }

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
    async fn gateways_failing_together_fail_open_instead_of_evicting() {
        let (mut control, plan) = control(config(""));
        let t0 = Instant::now();
        // Both gateways are reported down a second apart (say, a sidecar's probes fail on both).
        control
            .observe(observation("a", "10.0.0.1:51820", false), t0)
            .unwrap();
        let t1 = t0 + Duration::from_secs(1);
        control
            .observe(observation("b", "10.0.0.2:51820", false), t1)
            .unwrap();
        control.settle(t1 + Duration::from_secs(2));
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
        let mut config = config("");
        config.health.eviction_delay = Duration::ZERO;
        let (mut control, plan) = control(config);
        control
            .observe(observation("a", "10.0.0.1:51820", false), Instant::now())
            .unwrap();
        assert_eq!(health_of(&plan, "a"), Health::Down);
    }

    #[tokio::test]
    async fn a_quorum_of_fresh_sources_decides_and_silence_keeps_the_last_state() {
        let mut config = config("");
        config.health.quorum = 2;
        config.health.eviction_delay = Duration::ZERO;
        let (mut control, plan) = control(config);
        let t0 = Instant::now();
        control.observe(report("s1", "a", None, false), t0).unwrap();
        control.observe(report("s2", "a", None, true), t0).unwrap();
        assert_eq!(health_of(&plan, "a"), Health::Up, "one of two is no quorum");
        let t1 = t0 + Duration::from_secs(1);
        control.observe(report("s2", "a", None, false), t1).unwrap();
        assert_eq!(health_of(&plan, "a"), Health::Down, "two of two");
        // s1's report runs out at t0 + 3 s: one fresh source saying down backs no verdict with a
        // quorum of two, so a stays down rather than coming back because its watchers die.
        let t3 = t0 + Duration::from_secs(3);
        assert_eq!(control.settle(t3), Some(t1 + Duration::from_secs(3)));
        assert_eq!(health_of(&plan, "a"), Health::Down);
        // s1 comes back saying up: one down of two fresh is no quorum.
        control.observe(report("s1", "a", None, true), t3).unwrap();
        assert_eq!(health_of(&plan, "a"), Health::Up);
        control.observe(report("s1", "a", None, false), t3).unwrap();
        assert_eq!(health_of(&plan, "a"), Health::Down);
        // Both fall silent: the gateway stays down (fail static) instead of coming back.
        control.settle(t3 + Duration::from_secs(10));
        assert_eq!(health_of(&plan, "a"), Health::Down);
        let snapshot = control.snapshot();
        let a = &snapshot.listeners[0].gateways[0];
        assert!(a.fail_static && a.votes.is_empty(), "{a:?}");
        assert!(snapshot.sources.is_empty());
    }

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
    async fn health_sources_are_bounded() {
        let (mut control, _plan) = control(config(""));
        let now = Instant::now();
        for i in 0..MAX_HEALTH_SOURCES {
            control
                .observe(report(&format!("s{i}"), "a", None, true), now)
                .unwrap();
        }
        let refused = control.observe(report("one-more", "a", None, true), now);
        assert!(refused.unwrap_err().contains("too many"));
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
