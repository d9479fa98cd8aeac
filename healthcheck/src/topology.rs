//! The HA topology as the front door sees it (`wglb.v1.Topology`), and each gateway's liveness as
//! standard `grpc.health.v1` (service `wglb.gateway/LOCATION/GATEWAY`: SERVING unless the
//! verdict is down), so that Core, Kubernetes or any gRPC tool can follow a gateway.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use wglb_proto::client::Target;
use wglb_proto::v1::topology_server::{Topology as TopologyApi, TopologyServer};
use wglb_proto::v1::{
    BalancerGateway, CoreAttachment, ListGatewaysRequest, StatusRequest, TopologyBalancer,
    TopologyGateway, TopologyLocation, TopologyRequest, TopologySnapshot, Verdict as PbVerdict,
};

use crate::checker::Report;
use crate::report::Latest;
use crate::verdict::Verdict;

/// The grpc.health.v1 service name of a gateway.
pub fn health_service(location: &str, gateway: &str) -> String {
    format!("wglb.gateway/{location}/{gateway}")
}

/// What a balancer said when last asked.
#[derive(Clone, Debug, Default)]
pub struct BalancerView {
    pub address: String,
    pub reachable: bool,
    pub version: String,
    pub health_sources: Vec<String>,
    /// (listener, gateway) -> its state there.
    pub gateways: BTreeMap<(String, String), BalancerGateway>,
}

/// Holds the latest report of every gateway (numbered, for the reporters), builds the snapshot
/// from them and what the balancer pollers say, and keeps the grpc.health.v1 statuses in step.
pub struct Topology {
    source: String,
    gateways: BTreeMap<(String, String), (u64, Report)>,
    /// The number of the latest report.
    round: u64,
    balancers: BTreeMap<String, BalancerView>,
    snapshots: watch::Sender<Arc<TopologySnapshot>>,
    health: HealthReporter,
}

impl Topology {
    pub fn new(
        source: String,
        health: HealthReporter,
    ) -> (Topology, watch::Receiver<Arc<TopologySnapshot>>) {
        let (snapshots, receiver) = watch::channel(Arc::default());
        let topology = Topology {
            source,
            gateways: BTreeMap::new(),
            round: 0,
            balancers: BTreeMap::new(),
            snapshots,
            health,
        };
        topology.publish();
        (topology, receiver)
    }

    /// Takes a gateway's new report; returns the verdict it had before, if any.
    pub async fn verdict(&mut self, report: Report) -> Option<Verdict> {
        let key = (report.location.clone(), report.gateway.clone());
        let old = self.gateways.get(&key).map(|(_, old)| old);
        let previous = old.map(|old| old.verdict);
        let changed = previous != Some(report.verdict);
        if changed {
            let status = match report.verdict {
                Verdict::Down => ServingStatus::NotServing,
                Verdict::Up | Verdict::Degraded => ServingStatus::Serving,
            };
            self.health
                .set_service_status(health_service(&key.0, &key.1), status)
                .await;
        }
        let publish = changed
            || self.gateways.get(&key).is_none_or(|(_, old)| {
                (&old.detail, old.core_attached, old.data_plane_up)
                    != (&report.detail, report.core_attached, report.data_plane_up)
            });
        self.round += 1;
        self.gateways.insert(key, (self.round, report));
        if publish {
            self.publish();
        }
        previous
    }

    /// Every gateway's latest report, as the reporters send them.
    pub fn latest(&self) -> Latest {
        Arc::new(self.gateways.clone())
    }

    pub async fn forget(&mut self, location: &str, gateway: &str) {
        self.gateways
            .remove(&(location.to_string(), gateway.to_string()));
        self.health
            .clear_service_status(&health_service(location, gateway))
            .await;
        self.publish();
    }

    pub fn balancer(&mut self, view: BalancerView) {
        let changed = self.balancers.get(&view.address).is_none_or(|old| {
            (old.reachable, &old.gateways, &old.health_sources)
                != (view.reachable, &view.gateways, &view.health_sources)
        });
        self.balancers.insert(view.address.clone(), view);
        if changed {
            self.publish();
        }
    }

    fn publish(&self) {
        let mut locations: BTreeMap<&str, (bool, Vec<TopologyGateway>)> = BTreeMap::new();
        for ((location, name), (_, report)) in &self.gateways {
            let balancers = self
                .balancers
                .values()
                .filter_map(|b| b.gateways.get(&(location.clone(), name.clone())).cloned())
                .collect();
            let (mfa, gateways) = locations.entry(location).or_default();
            *mfa |= report.mfa;
            gateways.push(TopologyGateway {
                name: name.clone(),
                address: report.address.to_string(),
                origin: if report.core_id.is_some() {
                    "core"
                } else {
                    "file"
                }
                .into(),
                core_id: report.core_id.unwrap_or(0),
                verdict: match report.verdict {
                    Verdict::Up => PbVerdict::Up,
                    Verdict::Degraded => PbVerdict::Degraded,
                    Verdict::Down => PbVerdict::Down,
                } as i32,
                detail: report.detail.clone(),
                core: match report.core_attached {
                    Some(true) => CoreAttachment::Attached,
                    Some(false) => CoreAttachment::Detached,
                    None => CoreAttachment::Unknown,
                } as i32,
                data_plane_up: report.data_plane_up,
                handshake_ms: report
                    .handshake_rtt
                    .map_or(0.0, |rtt| rtt.as_secs_f64() * 1000.0),
                balancers,
            });
        }
        let snapshot = TopologySnapshot {
            source: self.source.clone(),
            generated_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            locations: locations
                .into_iter()
                .map(|(name, (mfa, gateways))| TopologyLocation {
                    name: name.to_string(),
                    gateways,
                    mfa,
                })
                .collect(),
            balancers: self
                .balancers
                .values()
                .map(|b| TopologyBalancer {
                    address: b.address.clone(),
                    reachable: b.reachable,
                    version: b.version.clone(),
                    health_sources: b.health_sources.clone(),
                })
                .collect(),
        };
        self.snapshots.send_replace(Arc::new(snapshot));
    }
}

/// Asks a balancer for its status and gateways every `interval`, forever.
pub async fn poll_balancer(target: Target, interval: Duration, views: mpsc::Sender<BalancerView>) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let view = match ask_balancer(&target).await {
            Ok(view) => view,
            Err(why) => {
                tracing::debug!(balancer = %target.address, "cannot read the balancer's state: {why}");
                BalancerView {
                    address: target.address.clone(),
                    ..BalancerView::default()
                }
            }
        };
        if views.send(view).await.is_err() {
            return;
        }
    }
}

async fn ask_balancer(target: &Target) -> Result<BalancerView, String> {
    let mut control = target.connect().await.map_err(|e| e.to_string())?.control;
    let status = control
        .status(StatusRequest {})
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let gateways = control
        .list_gateways(ListGatewaysRequest::default())
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner()
        .gateways;
    Ok(BalancerView {
        address: target.address.clone(),
        reachable: true,
        version: status.version,
        health_sources: status.health_sources,
        gateways: gateways
            .into_iter()
            .map(|g| {
                (
                    (g.listener.clone(), g.name.clone()),
                    BalancerGateway {
                        balancer: target.address.clone(),
                        state: g.state,
                        health: g.health,
                        sessions: g.sessions,
                    },
                )
            })
            .collect(),
    })
}

/// `wglb.v1.Topology` over the snapshots [`Topology`] publishes.
pub struct TopologyService {
    snapshots: watch::Receiver<Arc<TopologySnapshot>>,
}

impl TopologyService {
    pub fn server(snapshots: watch::Receiver<Arc<TopologySnapshot>>) -> TopologyServer<Self> {
        TopologyServer::new(TopologyService { snapshots })
    }
}

#[tonic::async_trait]
impl TopologyApi for TopologyService {
    async fn snapshot(
        &self,
        _: Request<TopologyRequest>,
    ) -> Result<Response<TopologySnapshot>, Status> {
        Ok(Response::new(self.snapshots.borrow().as_ref().clone()))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<TopologySnapshot, Status>> + Send>>;

    async fn watch(
        &self,
        _: Request<TopologyRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let stream =
            WatchStream::new(self.snapshots.clone()).map(|snapshot| Ok(snapshot.as_ref().clone()));
        Ok(Response::new(Box::pin(stream)))
    }
}
