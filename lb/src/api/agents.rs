//! The `GatewayAgents` service: a gateway agent attaches with its own token (not the API's),
//! which names the gateway it speaks for; its reports become the gateway's peer keys and a
//! health vote (decisive when the interface is gone), and its stream carries the gateway's
//! handshake orders, paced.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::pb;
use super::serve::bearer;
use super::service::Api;
use crate::agents::ORDER_QUEUE;
use crate::control::ControlRequest;
use crate::health::Observation;

/// The health source an agent's reports vote as.
pub const AGENT_SOURCE: &str = "agent";
/// An agent reports every second: three missed reports and its word no longer counts (an agent
/// that dies is no evidence about its gateway).
const REPORT_TTL: Duration = Duration::from_secs(3);

#[tonic::async_trait]
impl pb::gateway_agents_server::GatewayAgents for Api {
    type AttachStream = ReceiverStream<Result<pb::HandshakeOrder, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let given = bearer(&request).ok_or_else(|| {
            Status::unauthenticated(
                "an agent attaches with its gateway's token (authorization: Bearer ...)",
            )
        })?;
        let agents = self.agents().clone();
        let agent = agents.authenticate(given).ok_or_else(|| {
            Status::unauthenticated("no [[agent]] of this balancer has this token")
        })?;
        let (orders_in, mut orders) = mpsc::channel(ORDER_QUEUE);
        let (down, stream) = mpsc::channel(64);
        let attachment = agents.attach(&agent, orders_in);
        tracing::info!(listener = %agent.listener, gateway = %agent.gateway, "a gateway agent attached");
        // Orders leave at the gateway's pace, one stream per agent.
        let pace = Duration::from_secs_f64(1.0 / f64::from(agent.orders_per_second));
        tokio::spawn(async move {
            while let Some(order) = orders.recv().await {
                let order = pb::HandshakeOrder {
                    id: order.id,
                    public_key: order.public_key.to_vec(),
                    endpoint: order.endpoint.to_string(),
                };
                if down.send(Ok(order)).await.is_err() {
                    return;
                }
                tokio::time::sleep(pace).await;
            }
        });
        let mut messages = request.into_inner();
        let api = self.clone();
        tokio::spawn(async move {
            let mut up = None;
            // Only an interface this agent has seen is evidence when it goes: an agent pointed
            // at the wrong interface, or started before it, must not take its gateway down.
            let mut seen_up = false;
            while let Some(Ok(message)) = messages.next().await {
                match message.kind {
                    Some(pb::agent_message::Kind::Report(report)) => {
                        seen_up |= report.interface_up;
                        // A gone interface has no peers to tell, but the keys it had are what
                        // its sessions are re-homed by: they stay.
                        if report.interface_up {
                            let peers = report.peers.iter().filter_map(|peer| {
                                let endpoint: SocketAddr = peer.endpoint.parse().ok()?;
                                let key = peer.public_key.as_slice().try_into().ok()?;
                                Some((endpoint, key, peer.latest_handshake_unix_ms))
                            });
                            agents.report(&attachment, peers);
                        }
                        // Every report refreshes the vote (taken in before the next message);
                        // a change is logged once, after.
                        if seen_up {
                            api.agent_vote(&attachment.listener, &attachment.gateway, &report)
                                .await;
                        }
                        if up != Some(report.interface_up) {
                            up = Some(report.interface_up);
                            tracing::info!(listener = %attachment.listener, gateway = %attachment.gateway, interface_up = report.interface_up, detail = %report.detail, "agent report");
                        }
                    }
                    Some(pb::agent_message::Kind::Result(result)) => {
                        agents.answered(result.id, &result.error);
                    }
                    None => {}
                }
            }
            tracing::info!(listener = %attachment.listener, gateway = %attachment.gateway, "a gateway agent detached");
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }
}

impl Api {
    async fn agent_vote(&self, listener: &str, gateway: &str, report: &pb::PeerReport) {
        let observation = Observation {
            listener: listener.to_string(),
            gateway: gateway.to_string(),
            address: None,
            source: AGENT_SOURCE.to_string(),
            healthy: report.interface_up,
            gone: !report.interface_up,
            detail: if report.interface_up {
                "the WireGuard interface answers".to_string()
            } else {
                report.detail.clone()
            },
            ttl: REPORT_TTL,
        };
        let (reply, taken) = tokio::sync::oneshot::channel();
        let sent = self
            .control()
            .send(ControlRequest::Report { observation, reply })
            .await;
        if sent.is_ok() {
            if let Ok(Err(why)) = taken.await {
                tracing::warn!(%listener, %gateway, "an agent's report was refused: {why}");
            }
        }
    }
}
