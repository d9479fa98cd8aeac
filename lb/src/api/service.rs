//! The API's services, answered from the control plane (gateways, health, configuration) and
//! from each listener's datapath (sessions). The API holds no state of its own.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::pb;
use crate::agents::Agents;
use crate::announce::{AnnounceHandle, RouteState};
use crate::api::serve::PeerIdentity;
use crate::config::{format_public_key, parse_public_key, ConfigFile, GatewayConfig};
use crate::control::{
    announce_refused_reload, ControlError, ControlRequest, GatewayStatus, ListenerStatus, Snapshot,
};
use crate::events::{Event, EventBus, EventKind};
use crate::health::Observation;
use crate::metrics::Metrics;
use crate::pool::{AdminState, Health};
use crate::query::{
    self, ClientMatch, Moved, SessionFilter, SessionPage, SessionRequest, SessionRequests,
};
use crate::sync;
use wglb_common::admission::Refusal;

/// Sessions per page when the client does not say, and the most it may ask for.
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;
/// Bounds on what a health reporter may make the balancer keep: a source name becomes a metric
/// label, a detail is kept per report and repeated in events.
const MAX_SOURCE_NAME: usize = 64;
const MAX_DETAIL: usize = 1024;

/// The API: cheap to clone, one per service.
#[derive(Clone)]
pub struct Api {
    control: mpsc::Sender<ControlRequest>,
    /// Each listener's datapath, by listener name (sorted: session pages go listener by listener).
    sessions: BTreeMap<String, SessionRequests>,
    events: EventBus,
    metrics: Metrics,
    started: Instant,
    config_file: Option<ConfigFile>,
    /// The `[[sync.peer]]` names: the only balancers whose sessions are taken.
    sync_peers: Arc<[String]>,
    agents: Agents,
    /// Set when some listener announces an address (`crate::announce`).
    announce: Option<AnnounceHandle>,
}

impl Api {
    pub fn new(
        control: mpsc::Sender<ControlRequest>,
        sessions: BTreeMap<String, SessionRequests>,
        events: EventBus,
        metrics: Metrics,
        config_file: Option<ConfigFile>,
        sync_peers: Arc<[String]>,
        agents: Agents,
    ) -> Api {
        Api {
            control,
            sessions,
            events,
            metrics,
            started: Instant::now(),
            config_file,
            sync_peers,
            agents,
            announce: None,
        }
    }

    pub fn with_announce(mut self, announce: Option<AnnounceHandle>) -> Api {
        self.announce = announce;
        self
    }

    pub(super) fn agents(&self) -> &Agents {
        &self.agents
    }

    pub(super) fn control(&self) -> &mpsc::Sender<ControlRequest> {
        &self.control
    }

    /// Sends a request to the control plane and waits for its answer.
    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<T>) -> ControlRequest,
    ) -> Result<T, Status> {
        let (reply, answer) = oneshot::channel();
        self.control
            .send(request(reply))
            .await
            .map_err(|_| Status::unavailable("the control plane has stopped"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the control plane has stopped"))
    }

    /// Asks for a change to a pool; answers the changed gateways as they are after it.
    async fn change(
        &self,
        request: impl FnOnce(
            oneshot::Sender<Result<Vec<GatewayStatus>, ControlError>>,
        ) -> ControlRequest,
    ) -> Result<Vec<GatewayStatus>, Status> {
        self.ask(request).await?.map_err(control_status)
    }

    async fn snapshot(&self) -> Result<Snapshot, Status> {
        self.ask(|reply| ControlRequest::Snapshot { reply }).await
    }

    /// A listener as `Status` describes it.
    async fn listener_message(&self, listener: ListenerStatus) -> Result<pb::Listener, Status> {
        let sessions = self.session_counts(&listener.config.name).await?;
        let config = listener.config;
        let admission = self.metrics.admission(&config.name);
        Ok(pb::Listener {
            unconfirmed: admission.unconfirmed,
            probation_size: config.admission.probation_size.get() as u64,
            refused_source_rate: admission.refused(Refusal::SourceRate),
            refused_source_unconfirmed: admission.refused(Refusal::SourceUnconfirmed),
            listen: config.listen.to_string(),
            hash_key: config.hash_key.as_str().into(),
            idle_timeout_seconds: config.idle_timeout.as_secs(),
            table_size: config.table_size.get() as u64,
            sessions: sessions.values().sum(),
            failing_open: listener.failing_open,
            all_down: config.all_down.as_str().into(),
            gateways: config.gateways.len() as u32,
            public_key: config
                .public_key
                .as_ref()
                .map(format_public_key)
                .unwrap_or_default(),
            name: config.name,
        })
    }

    fn datapath(&self, listener: &str) -> Result<&SessionRequests, Status> {
        self.sessions
            .get(listener)
            .ok_or_else(|| unknown_listener(listener))
    }

    /// The listeners a request is about: one by name, or all when the name is empty.
    fn listeners(&self, name: &str) -> Result<Vec<&String>, Status> {
        if name.is_empty() {
            return Ok(self.sessions.keys().collect());
        }
        let (listener, _) = self
            .sessions
            .get_key_value(name)
            .ok_or_else(|| unknown_listener(name))?;
        Ok(vec![listener])
    }

    async fn ask_datapath<T>(
        &self,
        listener: &str,
        request: impl FnOnce(oneshot::Sender<T>) -> SessionRequest,
    ) -> Result<T, Status> {
        query::ask(self.datapath(listener)?, request)
            .await
            .ok_or_else(|| Status::unavailable(format!("listener `{listener}` has stopped")))
    }

    /// Sessions per gateway name of one listener.
    async fn session_counts(&self, listener: &str) -> Result<HashMap<String, u64>, Status> {
        self.ask_datapath(listener, |reply| SessionRequest::Count { reply })
            .await
    }

    async fn gateways(&self, statuses: Vec<GatewayStatus>) -> Result<Vec<pb::Gateway>, Status> {
        let mut counts: HashMap<String, HashMap<String, u64>> = HashMap::new();
        let mut out = Vec::with_capacity(statuses.len());
        for status in statuses {
            if !counts.contains_key(&status.listener) {
                let listener_counts = self.session_counts(&status.listener).await?;
                counts.insert(status.listener.clone(), listener_counts);
            }
            let sessions = counts[&status.listener]
                .get(&status.config.name)
                .copied()
                .unwrap_or(0);
            out.push(gateway_message(status, sessions));
        }
        Ok(out)
    }
}

fn unknown_listener(name: &str) -> Status {
    Status::not_found(format!("no listener `{name}`"))
}

fn control_status(error: ControlError) -> Status {
    match error {
        ControlError::NotFound(m) => Status::not_found(m),
        ControlError::Invalid(m) => Status::invalid_argument(m),
    }
}

fn admin_state(state: AdminState) -> pb::GatewayState {
    match state {
        AdminState::Active => pb::GatewayState::Active,
        AdminState::Draining => pb::GatewayState::Draining,
        AdminState::Down => pb::GatewayState::Down,
    }
}

fn requested_state(state: pb::GatewayState) -> Option<AdminState> {
    match state {
        pb::GatewayState::Unspecified => None,
        pb::GatewayState::Active => Some(AdminState::Active),
        pb::GatewayState::Draining => Some(AdminState::Draining),
        pb::GatewayState::Down => Some(AdminState::Down),
    }
}

fn health(health: Health) -> pb::Health {
    match health {
        Health::Up => pb::Health::Up,
        Health::Suspect => pb::Health::Suspect,
        Health::Down => pb::Health::Down,
    }
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis().try_into().unwrap_or(u64::MAX)
}

fn gateway_message(status: GatewayStatus, sessions: u64) -> pb::Gateway {
    let now = Instant::now();
    let mut message = pb::Gateway {
        listener: status.listener,
        name: status.config.name,
        address: status.config.address.to_string(),
        weight: status.config.weight,
        sessions,
        health_port: status.config.health_port.map_or(0, u32::from),
        added_at_runtime: status.added_at_runtime,
        changed_at_runtime: status.changed_at_runtime,
        votes: status
            .votes
            .into_iter()
            .map(|(source, vote)| pb::HealthVote {
                source,
                healthy: vote.healthy,
                detail: vote.detail,
                age_ms: millis(now.saturating_duration_since(vote.at)),
                expires_in_ms: millis(vote.expires.saturating_duration_since(now)),
            })
            .collect(),
        fail_static: status.fail_static,
        health_detail: status.health_detail,
        ..Default::default()
    };
    message.set_state(admin_state(status.config.state));
    message.set_health(health(status.health));
    message
}

fn event_message(event: Event) -> pb::Event {
    use pb::event::Kind;
    let mut message = pb::Event {
        unix_ms: event.at.duration_since(UNIX_EPOCH).map_or(0, millis),
        listener: event.listener,
        gateway: event.gateway,
        ..Default::default()
    };
    let kind = match event.kind {
        EventKind::GatewayHealth {
            health: h,
            source,
            detail,
        } => {
            message.set_health(health(h));
            message.source = source;
            message.detail = detail;
            Kind::GatewayHealth
        }
        EventKind::GatewayState { state, weight } => {
            message.set_state(admin_state(state));
            message.weight = weight;
            Kind::GatewayState
        }
        EventKind::GatewayAdded => Kind::GatewayAdded,
        EventKind::GatewayRemoved => Kind::GatewayRemoved,
        EventKind::SessionsEvicted { reason, count } => {
            message.reason = reason.as_str().into();
            message.count = count;
            Kind::SessionsEvicted
        }
        EventKind::SessionsRefused { reason, count } => {
            message.reason = reason.as_str().into();
            message.count = count;
            Kind::SessionsRefused
        }
        EventKind::SessionsMoved { count } => {
            message.count = count;
            Kind::SessionsMoved
        }
        EventKind::ConfigReloaded => Kind::ConfigReloaded,
        EventKind::ConfigRefused { why } => {
            message.detail = why;
            Kind::ConfigRefused
        }
        EventKind::FailStatic { active } => {
            message.active = active;
            Kind::FailStatic
        }
        EventKind::FailingOpen { active } => {
            message.active = active;
            Kind::FailingOpen
        }
        EventKind::Route {
            address,
            announced,
            why,
        } => {
            message.source = address.to_string();
            message.active = announced;
            message.detail = why;
            Kind::Route
        }
    };
    message.set_kind(kind);
    message
}

fn session_filter(gateway: &str, client: &str) -> Result<SessionFilter, Status> {
    Ok(SessionFilter {
        gateway: (!gateway.is_empty()).then(|| gateway.to_string()),
        client: if client.is_empty() {
            None
        } else {
            Some(
                client
                    .parse::<ClientMatch>()
                    .map_err(Status::invalid_argument)?,
            )
        },
    })
}

/// A page token: the last client returned, and its listener. Clients have no `@`.
fn page_token(listener: &str, client: SocketAddr) -> String {
    format!("{client}@{listener}")
}

fn parse_page_token(token: &str) -> Result<Option<(String, SocketAddr)>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Status::invalid_argument(format!("`{token}` is not a page token of this API"));
    let (client, listener) = token.split_once('@').ok_or_else(bad)?;
    Ok(Some((
        listener.to_string(),
        client.parse().map_err(|_| bad())?,
    )))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl pb::control_server::Control for Api {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let snapshot = self.snapshot().await?;
        let mut listeners = Vec::new();
        for listener in snapshot.listeners {
            listeners.push(self.listener_message(listener).await?);
        }
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: self.started.elapsed().as_secs(),
            config_path: self
                .config_file
                .as_ref()
                .map(|f| f.path.display().to_string())
                .unwrap_or_default(),
            listeners,
            health_sources: snapshot.sources,
            health_quorum: snapshot.quorum,
            routes: self
                .announce
                .as_ref()
                .map(|a| route_messages(a.routes()))
                .unwrap_or_default(),
            drained: self.announce.as_ref().is_some_and(AnnounceHandle::drained),
        }))
    }

    async fn list_gateways(
        &self,
        request: Request<pb::ListGatewaysRequest>,
    ) -> Result<Response<pb::ListGatewaysResponse>, Status> {
        let wanted = request.into_inner().listener;
        self.listeners(&wanted)?;
        let statuses = self
            .snapshot()
            .await?
            .listeners
            .into_iter()
            .filter(|l| wanted.is_empty() || l.config.name == wanted)
            .flat_map(|l| l.gateways)
            .collect();
        Ok(Response::new(pb::ListGatewaysResponse {
            gateways: self.gateways(statuses).await?,
        }))
    }

    async fn add_gateway(
        &self,
        request: Request<pb::AddGatewayRequest>,
    ) -> Result<Response<pb::GatewaysChanged>, Status> {
        let request = request.into_inner();
        let address = request.address.parse().map_err(|e| {
            Status::invalid_argument(format!(
                "address `{}` is not IP:PORT ({e}); IPv6 as [addr]:port",
                request.address
            ))
        })?;
        let health_port = match request.health_port {
            0 => None,
            port => Some(u16::try_from(port).map_err(|_| {
                Status::invalid_argument(format!("health_port {port} is not a port"))
            })?),
        };
        let gateway = GatewayConfig {
            state: requested_state(request.state()).unwrap_or(AdminState::Active),
            name: request.name,
            address,
            weight: request.weight.max(1),
            health_port,
        };
        let listener = request.listener;
        let changed = self
            .change(|reply| ControlRequest::AddGateway {
                listener,
                gateway,
                reply,
            })
            .await?;
        Ok(Response::new(pb::GatewaysChanged {
            gateways: self.gateways(changed).await?,
        }))
    }

    async fn remove_gateway(
        &self,
        request: Request<pb::RemoveGatewayRequest>,
    ) -> Result<Response<pb::GatewaysChanged>, Status> {
        let request = request.into_inner();
        let changed = self
            .change(|reply| ControlRequest::RemoveGateway {
                listener: request.listener,
                name: request.name,
                reply,
            })
            .await?;
        // It has no sessions any more: they went with it.
        Ok(Response::new(pb::GatewaysChanged {
            gateways: changed
                .into_iter()
                .map(|status| gateway_message(status, 0))
                .collect(),
        }))
    }

    async fn set_gateway(
        &self,
        request: Request<pb::SetGatewayRequest>,
    ) -> Result<Response<pb::GatewaysChanged>, Status> {
        let request = request.into_inner();
        let state = requested_state(request.state());
        let weight = (request.weight != 0).then_some(request.weight);
        if state.is_none() && weight.is_none() {
            return Err(Status::invalid_argument(
                "nothing to change: give a state, a weight or both",
            ));
        }
        let changed = self
            .change(|reply| ControlRequest::SetGateway {
                listener: (!request.listener.is_empty()).then_some(request.listener),
                name: request.name,
                state,
                weight,
                reply,
            })
            .await?;
        Ok(Response::new(pb::GatewaysChanged {
            gateways: self.gateways(changed).await?,
        }))
    }

    async fn set_listener_key(
        &self,
        request: Request<pb::SetListenerKeyRequest>,
    ) -> Result<Response<pb::Listener>, Status> {
        let request = request.into_inner();
        let public_key = match request.public_key.as_str() {
            "" => None,
            text => Some(parse_public_key(text).ok_or_else(|| {
                Status::invalid_argument(
                    "`public_key` is not a WireGuard key (32 bytes in base64, as `wg` prints it)",
                )
            })?),
        };
        let listener = request.listener;
        self.ask(|reply| ControlRequest::SetListenerKey {
            listener: listener.clone(),
            public_key,
            reply,
        })
        .await?
        .map_err(control_status)?;
        let snapshot = self.snapshot().await?;
        let changed = snapshot
            .listeners
            .into_iter()
            .find(|l| l.config.name == listener)
            .ok_or_else(|| unknown_listener(&listener))?;
        Ok(Response::new(self.listener_message(changed).await?))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let request = request.into_inner();
        let filter = session_filter(&request.gateway, &request.client)?;
        let page_size = match request.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let cursor = parse_page_token(&request.page_token)?;
        let mut sessions = Vec::new();
        let mut total = 0;
        let mut more = false;
        for listener in self.listeners(&request.listener)? {
            let (after, limit) = match &cursor {
                // Pages before the cursor's listener were served already: count them only.
                Some((at, _)) if listener < at => (None, 0),
                Some((at, client)) if listener == at => (Some(*client), page_size - sessions.len()),
                _ => (None, page_size - sessions.len()),
            };
            let filter = filter.clone();
            let page: SessionPage = self
                .ask_datapath(listener, |reply| SessionRequest::List {
                    filter,
                    after,
                    limit,
                    reply,
                })
                .await?;
            total += page.total;
            let before_cursor = cursor.as_ref().is_some_and(|(at, _)| listener < at);
            more |= page.more && !before_cursor;
            sessions.extend(page.sessions.into_iter().map(|s| pb::Session {
                listener: listener.clone(),
                client: s.client.to_string(),
                gateway: s.gateway,
                gateway_address: s.gateway_address.to_string(),
                idle_ms: s.idle_ms,
                synced_from: s.synced_from.unwrap_or_default(),
                receiver_index: s.index.map(|i| i.index),
                shard: s.shard.map(|shard| shard as u32),
            }));
        }
        let next_page_token = match sessions.last() {
            Some(last) if more => page_token(
                &last.listener,
                last.client.parse().expect("a client address we printed"),
            ),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListSessionsResponse {
            sessions,
            next_page_token,
            total,
        }))
    }

    async fn evict_sessions(
        &self,
        request: Request<pb::EvictSessionsRequest>,
    ) -> Result<Response<pb::EvictSessionsResponse>, Status> {
        use pb::evict_sessions_request::Target;
        let request = request.into_inner();
        let filter = match &request.target {
            Some(Target::Client(client)) if !client.is_empty() => session_filter("", client)?,
            Some(Target::Gateway(gateway)) if !gateway.is_empty() => {
                let snapshot = self.snapshot().await?;
                let known = snapshot.listeners.iter().any(|l| {
                    (request.listener.is_empty() || l.config.name == request.listener)
                        && l.gateways.iter().any(|g| &g.config.name == gateway)
                });
                if !known {
                    return Err(Status::not_found(format!("no gateway `{gateway}`")));
                }
                session_filter(gateway, "")?
            }
            _ => {
                return Err(Status::invalid_argument(
                    "say whose sessions to evict: a client or a gateway",
                ))
            }
        };
        let mut evicted = 0;
        for listener in self.listeners(&request.listener)? {
            let filter = filter.clone();
            evicted += self
                .ask_datapath(listener, |reply| SessionRequest::Evict { filter, reply })
                .await?;
        }
        Ok(Response::new(pb::EvictSessionsResponse { evicted }))
    }

    async fn move_sessions(
        &self,
        request: Request<pb::MoveSessionsRequest>,
    ) -> Result<Response<pb::MoveSessionsResponse>, Status> {
        let request = request.into_inner();
        let snapshot = self.snapshot().await?;
        let known = snapshot.listeners.iter().any(|l| {
            (request.listener.is_empty() || l.config.name == request.listener)
                && l.gateways.iter().any(|g| g.config.name == request.gateway)
        });
        if !known {
            return Err(Status::not_found(format!(
                "no gateway `{}`",
                request.gateway
            )));
        }
        let mut moved = Moved::default();
        for listener in self.listeners(&request.listener)? {
            let gateway = request.gateway.clone();
            moved += self
                .ask_datapath(listener, |reply| SessionRequest::Move { gateway, reply })
                .await?;
        }
        tracing::info!(gateway = %request.gateway, moved = moved.moved, stayed = moved.stayed, "sessions moved through the API");
        Ok(Response::new(pb::MoveSessionsResponse {
            moved: moved.moved,
            stayed: moved.stayed,
        }))
    }

    async fn reload(
        &self,
        _: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let Some(file) = &self.config_file else {
            return Err(Status::failed_precondition(
                "the balancer was started from flags: there is no file to reload",
            ));
        };
        let config = match file.load() {
            Ok(config) => config,
            Err(e) => {
                let why = format!("{e:#}");
                announce_refused_reload(&self.metrics, &self.events, &why);
                return Err(Status::invalid_argument(why));
            }
        };
        self.ask(|reply| ControlRequest::Reload {
            config: Box::new(config),
            reply,
        })
        .await?
        .map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::ReloadResponse {
            path: file.path.display().to_string(),
        }))
    }

    async fn drain_self(
        &self,
        request: Request<pb::DrainSelfRequest>,
    ) -> Result<Response<pb::DrainSelfResponse>, Status> {
        let Some(announce) = &self.announce else {
            return Err(Status::failed_precondition(
                "this balancer announces no address (no listener has `announce`): there is nothing to withdraw",
            ));
        };
        let routes = announce.set_drained(request.into_inner().drained).await;
        Ok(Response::new(pb::DrainSelfResponse {
            routes: route_messages(routes),
        }))
    }
}

fn route_messages(routes: Vec<RouteState>) -> Vec<pb::Route> {
    routes
        .into_iter()
        .map(|route| pb::Route {
            address: route.address.to_string(),
            announced: route.held.is_none(),
            held: route.held.map(|h| h.to_string()).unwrap_or_default(),
        })
        .collect()
}

#[tonic::async_trait]
impl pb::health_ingest_server::HealthIngest for Api {
    type ReportStream = ReceiverStream<Result<pb::HealthReportAck, Status>>;

    async fn report(
        &self,
        request: Request<Streaming<pb::HealthReport>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let mut reports = request.into_inner();
        let (acks, stream) = mpsc::channel(16);
        let api = self.clone();
        tokio::spawn(async move {
            while let Some(report) = reports.next().await {
                let ack = match report {
                    Ok(report) => api.ingest(report).await,
                    Err(status) => {
                        tracing::debug!("health report stream ended: {status}");
                        return;
                    }
                };
                if acks.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }
}

impl Api {
    async fn ingest(&self, report: pb::HealthReport) -> pb::HealthReportAck {
        let refused = |error: String| {
            self.metrics.health_report(false);
            pb::HealthReportAck {
                accepted: false,
                error,
            }
        };
        if report.source.is_empty() || report.source.len() > MAX_SOURCE_NAME {
            return refused(format!(
                "a report needs a source name of 1 to {MAX_SOURCE_NAME} bytes"
            ));
        }
        let mut detail = report.detail;
        if detail.len() > MAX_DETAIL {
            let mut end = MAX_DETAIL;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
        }
        let address = match report.address.as_str() {
            "" => None,
            text => match text.parse() {
                Ok(address) => Some(address),
                Err(e) => return refused(format!("address `{text}` is not IP:PORT ({e})")),
            },
        };
        let observation = Observation {
            listener: report.listener,
            gateway: report.gateway,
            address,
            source: report.source,
            healthy: report.healthy,
            gone: false,
            detail,
            ttl: Duration::from_millis(report.ttl_ms),
        };
        match self
            .ask(|reply| ControlRequest::Report { observation, reply })
            .await
        {
            // The control plane counted it.
            Ok(Ok(())) => pb::HealthReportAck {
                accepted: true,
                error: String::new(),
            },
            Ok(Err(why)) => pb::HealthReportAck {
                accepted: false,
                error: why,
            },
            Err(status) => refused(status.message().to_string()),
        }
    }
}

#[tonic::async_trait]
impl pb::events_server::Events for Api {
    type WatchStream = EventStream;

    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let stream = BroadcastStream::new(self.events.subscribe()).map(|item| {
            Ok(match item {
                Ok(event) => event_message(event),
                Err(BroadcastStreamRecvError::Lagged(missed)) => {
                    let mut lagged = pb::Event {
                        unix_ms: SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, millis),
                        count: missed,
                        ..Default::default()
                    };
                    lagged.set_kind(pb::event::Kind::Lagged);
                    lagged
                }
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl pb::session_sync_server::SessionSync for Api {
    type PushStream = ReceiverStream<Result<pb::SyncAck, Status>>;

    async fn push(
        &self,
        request: Request<Streaming<pb::SyncBatch>>,
    ) -> Result<Response<Self::PushStream>, Status> {
        let credential = request
            .extensions()
            .get::<PeerIdentity>()
            .map(|identity| identity.0.clone());
        let mut batches = request.into_inner();
        let (acks, stream) = mpsc::channel(16);
        let api = self.clone();
        tokio::spawn(async move {
            while let Some(batch) = batches.next().await {
                let ack = match batch {
                    Ok(batch) => {
                        let peer =
                            sync::receive::peer_of(&batch, credential.as_ref(), &api.sync_peers);
                        let resync_end = batch.resync_end;
                        match peer {
                            Ok(peer) => {
                                let applied =
                                    sync::receive::apply(&peer, batch, &api.sessions, &api.metrics)
                                        .await;
                                if let (Ok(_), true, Some(announce)) =
                                    (&applied, resync_end, &api.announce)
                                {
                                    announce.peer_resynced(&peer);
                                }
                                applied
                            }
                            Err(bad) => Err(bad),
                        }
                        .map_err(|bad| Status::permission_denied(bad.0))
                    }
                    Err(status) => {
                        tracing::debug!("session sync stream ended: {status}");
                        return;
                    }
                };
                let refused = ack.is_err();
                if acks.send(ack).await.is_err() || refused {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip() {
        let client: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        let token = page_token("office@berlin", client);
        assert_eq!(
            parse_page_token(&token).unwrap(),
            Some(("office@berlin".to_string(), client))
        );
        assert!(parse_page_token("garbage").is_err());
        assert_eq!(parse_page_token("").unwrap(), None);
    }
}
