//! One balancer's link: a `GatewayAgents/Attach` stream kept open (opened again a second after
//! it breaks), reports up, orders down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use wglb_proto::client::{error_chain, Target};
use wglb_proto::v1::{agent_message, AgentMessage, HandshakeOrder, OrderResult, PeerReport};

use crate::wireguard::Interface;

/// A balancer hears from the agent at least this often, so it can tell a silent agent from one
/// with nothing new to say.
const REPORT_EVERY: Duration = Duration::from_secs(1);
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

pub async fn run(
    target: Target,
    mut reports: watch::Receiver<PeerReport>,
    interface: Arc<Interface>,
) {
    loop {
        match attach(&target, &mut reports, &interface).await {
            Ok(()) => tracing::warn!(balancer = %target.address, "the balancer closed the stream"),
            Err(e) => tracing::warn!(balancer = %target.address, "{e:#}"),
        }
        tokio::time::sleep(RECONNECT_AFTER).await;
    }
}

async fn attach(
    target: &Target,
    reports: &mut watch::Receiver<PeerReport>,
    interface: &Arc<Interface>,
) -> anyhow::Result<()> {
    let mut connection = target.connect().await?;
    let (up, outgoing) = mpsc::channel(64);
    let report = |report: PeerReport| AgentMessage {
        kind: Some(agent_message::Kind::Report(report)),
    };
    let first = reports.borrow_and_update().clone();
    up.send(report(first)).await?;
    let mut orders = connection
        .agents
        .attach(ReceiverStream::new(outgoing))
        .await
        .map_err(|status| anyhow::anyhow!("the balancer refused the agent: {}", status.message()))?
        .into_inner();
    tracing::info!(balancer = %target.address, "attached");
    let mut ticks = tokio::time::interval(REPORT_EVERY);
    loop {
        tokio::select! {
            changed = reports.changed() => {
                changed.context("the interface reader stopped")?;
                let latest = reports.borrow_and_update().clone();
                up.send(report(latest)).await?;
            }
            _ = ticks.tick() => {
                let latest = reports.borrow().clone();
                up.send(report(latest)).await?;
            }
            order = orders.message() => {
                let Some(order) = order.map_err(|e| anyhow::anyhow!("the stream broke: {}", error_chain(&e)))? else {
                    return Ok(());
                };
                // Each order on a blocking thread of its own, off the stream's task: it waits up
                // to seconds for the client's answer, and the balancer paces how many come.
                let (interface, up) = (interface.clone(), up.clone());
                tokio::spawn(async move {
                    let id = order.id;
                    let error = match tokio::task::spawn_blocking(move || carry_out(&interface, &order)).await {
                        Ok(Ok(())) => String::new(),
                        Ok(Err(e)) => format!("{e:#}"),
                        Err(e) => format!("the order's task failed: {e}"),
                    };
                    if !error.is_empty() {
                        tracing::warn!(order = id, "order refused: {error}");
                    }
                    let result = AgentMessage {
                        kind: Some(agent_message::Kind::Result(OrderResult { id, error })),
                    };
                    let _ = up.send(result).await;
                });
            }
        }
    }
}

/// How long the client has to answer the gateway's handshake: WireGuard's REKEY_TIMEOUT (5 s,
/// when the gateway would send its initiation again) and then some.
const ANSWER_WITHIN: Duration = Duration::from_secs(7);
const ANSWER_POLL: Duration = Duration::from_millis(50);

/// Starts the handshake, then waits for the client to complete it (the peer's latest handshake
/// moves past the order): the balancer learns that its session continues, not only that the
/// gateway sent an initiation.
fn carry_out(interface: &Interface, order: &HandshakeOrder) -> anyhow::Result<()> {
    let key: [u8; 32] = order
        .public_key
        .as_slice()
        .try_into()
        .context("a public key is 32 bytes")?;
    let endpoint: SocketAddr = order
        .endpoint
        .parse()
        .with_context(|| format!("`{}` is not an ip:port", order.endpoint))?;
    // Whole seconds: wireguard-go keeps handshake times to the second in places.
    let ordered_ms = unix_ms().saturating_sub(1_000);
    interface.start_handshake(&key, endpoint)?;
    tracing::info!(order = order.id, %endpoint, "started a handshake");
    let deadline = std::time::Instant::now() + ANSWER_WITHIN;
    loop {
        let answered = interface
            .peers()?
            .into_iter()
            .find(|peer| peer.public_key == key)
            .and_then(|peer| peer.latest_handshake_ms)
            .is_some_and(|at| at >= ordered_ms);
        if answered {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the client did not answer the gateway's handshake within {ANSWER_WITHIN:?}"
            );
        }
        std::thread::sleep(ANSWER_POLL);
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
