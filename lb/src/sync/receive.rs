//! Applying a peer's batches: each change goes to its listener's datapath, which keeps it as a
//! standby entry (or drops the entry, for an eviction) between its own batches of packets.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;
use wglb_proto::v1::{session_change, SyncAck, SyncBatch};

use super::{Applied, Change, PeerChange, SyncStep};
use crate::metrics::Metrics;
use crate::query::{SessionRequest, SessionRequests};

/// Why a batch was refused as a whole (the stream ends with it).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadBatch(pub String);

/// Applies one batch and says what came of it. Waits for each datapath, so the ack (and so the
/// sender's lag) covers applying, and a slow receiver slows its peer's stream rather than
/// queueing without bound.
pub async fn apply(
    batch: SyncBatch,
    datapaths: &BTreeMap<String, SessionRequests>,
    metrics: &Metrics,
) -> Result<SyncAck, BadBatch> {
    if batch.node.is_empty() || batch.node.len() > 64 {
        return Err(BadBatch(
            "a sync batch needs its sender's node name (1 to 64 characters)".into(),
        ));
    }
    let peer: Arc<str> = batch.node.as_str().into();
    let mut outcome = Applied::default();
    if batch.resync_begin {
        for requests in datapaths.values() {
            step(requests, &peer, SyncStep::Begin).await;
        }
    }
    let mut per_listener: HashMap<String, Vec<PeerChange>> = HashMap::new();
    for change in batch.changes {
        match parse(&change) {
            Some(parsed) if datapaths.contains_key(&change.listener) => per_listener
                .entry(change.listener)
                .or_default()
                .push(parsed),
            _ => outcome.refused += 1,
        }
    }
    for (listener, changes) in per_listener {
        let applied = step(&datapaths[&listener], &peer, SyncStep::Changes(changes)).await;
        outcome.applied += applied.applied;
        outcome.refused += applied.refused;
    }
    if batch.resync_end {
        for requests in datapaths.values() {
            step(requests, &peer, SyncStep::End).await;
        }
    }
    metrics.sync_received(&peer, outcome.applied, outcome.refused);
    Ok(SyncAck {
        sequence: batch.sequence,
        applied: outcome.applied,
        refused: outcome.refused,
    })
}

async fn step(requests: &SessionRequests, peer: &Arc<str>, step: SyncStep) -> Applied {
    let (reply, applied) = oneshot::channel();
    let request = SessionRequest::Sync {
        peer: peer.clone(),
        step,
        reply,
    };
    if requests.send(request).await.is_err() {
        return Applied::default();
    }
    applied.await.unwrap_or_default()
}

/// A change as the datapath takes it; None if it does not parse. Public for the fuzz targets.
pub fn parse(change: &wglb_proto::v1::SessionChange) -> Option<PeerChange> {
    let client: SocketAddr = change.client.parse().ok()?;
    let change = match session_change::Kind::try_from(change.kind).ok()? {
        session_change::Kind::Upsert => Change::Upsert {
            gateway: change.gateway.clone(),
            address: change.gateway_address.parse().ok()?,
            idle_ms: change.idle_ms,
        },
        session_change::Kind::Evicted => Change::Evicted,
        session_change::Kind::Unspecified => return None,
    };
    Some(PeerChange { client, change })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use wglb_proto::v1::SessionChange;

    #[tokio::test]
    async fn changes_reach_their_listener_and_bad_ones_are_refused() {
        let (office, mut requests) = mpsc::channel(4);
        let datapaths = BTreeMap::from([("office".to_string(), office)]);
        let change = |listener: &str, client: &str, kind: session_change::Kind| SessionChange {
            kind: kind.into(),
            listener: listener.into(),
            client: client.into(),
            gateway: "gw1".into(),
            gateway_address: "10.0.0.1:51820".into(),
            idle_ms: 5,
        };
        let batch = SyncBatch {
            sequence: 7,
            node: "lb-a".into(),
            resync_begin: true,
            resync_end: false,
            changes: vec![
                change("office", "192.0.2.1:1000", session_change::Kind::Upsert),
                change("office", "192.0.2.2:1000", session_change::Kind::Evicted),
                change("lab", "192.0.2.3:1000", session_change::Kind::Upsert),
                change("office", "not an address", session_change::Kind::Upsert),
                change(
                    "office",
                    "192.0.2.4:1000",
                    session_change::Kind::Unspecified,
                ),
            ],
        };
        let datapath = tokio::spawn(async move {
            let mut steps = Vec::new();
            while let Some(SessionRequest::Sync { peer, step, reply }) = requests.recv().await {
                assert_eq!(&*peer, "lb-a");
                let applied = match &step {
                    SyncStep::Changes(changes) => changes.len() as u32,
                    _ => 0,
                };
                steps.push(step);
                let _ = reply.send(Applied {
                    applied,
                    refused: 0,
                });
            }
            steps
        });
        let metrics = Metrics::new();
        let ack = apply(batch, &datapaths, &metrics).await.unwrap();
        assert_eq!((ack.sequence, ack.applied, ack.refused), (7, 2, 3));
        drop(datapaths);
        let steps = datapath.await.unwrap();
        assert!(matches!(steps[0], SyncStep::Begin));
        let SyncStep::Changes(changes) = &steps[1] else {
            panic!("{steps:?}")
        };
        assert_eq!(changes[1].change, Change::Evicted);
        assert_eq!(steps.len(), 2);
        let text = metrics.render();
        assert!(
            text.contains("wglb_sync_changes_received_total{peer=\"lb-a\",result=\"refused\"} 3"),
            "{text}"
        );

        let nameless = SyncBatch::default();
        assert!(apply(nameless, &BTreeMap::new(), &metrics).await.is_err());
    }
}
