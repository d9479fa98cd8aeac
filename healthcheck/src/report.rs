//! Reports verdicts to one balancer over its health ingestion API (`wglb.v1.HealthIngest`): one
//! long-lived stream, every new verdict sent as it comes, each with a time to live so that a
//! sidecar that stops reporting stops counting. The stream is reopened with backoff when the
//! balancer goes away; several sidecars may report to the same balancer, whose quorum decides.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use wglb_proto::client::Target;
use wglb_proto::v1::HealthReport;

use crate::checker::Report;
use crate::metrics::Metrics;
use crate::verdict::Verdict;

/// (location, gateway) -> the latest report and its round number.
pub type Latest = Arc<BTreeMap<(String, String), (u64, Report)>>;

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub async fn run_reporter(
    target: Target,
    source: String,
    ttl: Duration,
    mut latest: watch::Receiver<Latest>,
    metrics: Metrics,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let result = report_until_error(&target, &source, ttl, &mut latest, &metrics).await;
        metrics.balancer(&target.address, false);
        match result {
            Ok(()) => return,
            Err(why) => {
                tracing::warn!(balancer = %target.address, "reporting stopped, retrying in {backoff:?}: {why}");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Streams reports until the connection fails (Err) or the checkers are gone (Ok).
async fn report_until_error(
    target: &Target,
    source: &str,
    ttl: Duration,
    latest: &mut watch::Receiver<Latest>,
    metrics: &Metrics,
) -> Result<(), String> {
    let connection = target.connect().await.map_err(|e| e.to_string())?;
    let mut client = connection.health;
    let (sender, outgoing) = mpsc::channel(256);
    let mut acks = client
        .report(ReceiverStream::new(outgoing))
        .await
        .map_err(|status| format!("opening the stream: {}", status.message()))?
        .into_inner();
    tracing::info!(balancer = %target.address, "reporting");
    metrics.balancer(&target.address, true);
    // What this stream has sent, by gateway: a reconnect sends everything again.
    let mut sent: HashMap<(String, String), u64> = HashMap::new();
    // The latest refusal per gateway, so a refused report is logged once, not every round.
    let mut refused: HashMap<(String, String), String> = HashMap::new();
    let mut in_flight: std::collections::VecDeque<(String, String)> = Default::default();
    loop {
        let snapshot = latest.borrow_and_update().clone();
        for (key, (round, report)) in snapshot.iter() {
            if sent.get(key) == Some(round) {
                continue;
            }
            let message = HealthReport {
                source: source.to_string(),
                listener: report.location.clone(),
                gateway: report.gateway.clone(),
                address: report.address.to_string(),
                healthy: report.verdict != Verdict::Down,
                detail: report.detail.clone(),
                ttl_ms: ttl.as_millis() as u64,
            };
            sender
                .send(message)
                .await
                .map_err(|_| "the stream closed".to_string())?;
            sent.insert(key.clone(), *round);
            in_flight.push_back(key.clone());
        }
        tokio::select! {
            changed = latest.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            ack = acks.next() => match ack {
                Some(Ok(ack)) => {
                    let Some(key) = in_flight.pop_front() else { continue };
                    if ack.accepted {
                        refused.remove(&key);
                    } else if refused.get(&key) != Some(&ack.error) {
                        tracing::warn!(balancer = %target.address, location = %key.0, gateway = %key.1, "report refused: {}", ack.error);
                        refused.insert(key, ack.error);
                    }
                }
                Some(Err(status)) => return Err(status.message().to_string()),
                None => return Err("the balancer closed the stream".into()),
            },
        }
    }
}
