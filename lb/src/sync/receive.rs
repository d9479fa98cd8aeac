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
use crate::rebinding::SessionIndex;

/// Why a batch was refused as a whole (the stream ends with it).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadBatch(pub String);

/// Whose sessions a batch carries: the peer its credential names (`credential`, from a peer's own
/// token), which the batch must not contradict; without one, the node the batch names, which
/// must be one of the configured `peers`. A name is never taken from a batch alone: it keys the
/// standby entries and labels metrics.
pub fn peer_of(
    batch: &SyncBatch,
    credential: Option<&Arc<str>>,
    peers: &[String],
) -> Result<Arc<str>, BadBatch> {
    match credential {
        Some(peer) if batch.node == **peer => Ok(peer.clone()),
        Some(peer) => Err(BadBatch(format!(
            "the batch says it comes from `{}`, but its credential is peer `{peer}`'s",
            batch.node
        ))),
        None if peers.contains(&batch.node) => Ok(batch.node.as_str().into()),
        None => Err(BadBatch(format!(
            "`{}` is not a [[sync.peer]] of this balancer",
            batch.node.chars().take(64).collect::<String>()
        ))),
    }
}

/// Applies one batch of `peer`'s and says what came of it. Waits for each datapath, so the ack
/// (and so the sender's lag) covers applying, and a slow receiver slows its peer's stream rather
/// than queueing without bound.
pub async fn apply(
    peer: &Arc<str>,
    batch: SyncBatch,
    datapaths: &BTreeMap<String, SessionRequests>,
    metrics: &Metrics,
) -> Result<SyncAck, BadBatch> {
    let peer = peer.clone();
    let mut outcome = Applied::default();
    if batch.resync_begin {
        for requests in datapaths.values() {
            step(
                requests,
                &peer,
                SyncStep::Begin {
                    boot: batch.boot_id,
                },
            )
            .await;
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

/// A change as the datapath takes it; None if it does not parse. Public for the fuzz targets and
/// the resync benchmark.
pub fn parse(change: &wglb_proto::v1::SessionChange) -> Option<PeerChange> {
    let client: SocketAddr = change.client.parse().ok()?;
    let change = match session_change::Kind::try_from(change.kind).ok()? {
        session_change::Kind::Upsert => Change::Upsert {
            gateway: change.gateway.clone(),
            address: change.gateway_address.parse().ok()?,
            idle_ms: change.idle_ms,
            index: change.receiver_index.map(|index| SessionIndex {
                index,
                age_ms: change.receiver_index_age_ms,
            }),
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
            receiver_index: Some(0xdead_beef),
            receiver_index_age_ms: 1_500,
        };
        let batch = SyncBatch {
            sequence: 7,
            node: "lb-a".into(),
            resync_begin: true,
            resync_end: false,
            boot_id: 42,
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
        let peer = peer_of(&batch, None, &["lb-a".to_string()]).unwrap();
        let ack = apply(&peer, batch, &datapaths, &metrics).await.unwrap();
        assert_eq!((ack.sequence, ack.applied, ack.refused), (7, 2, 3));
        drop(datapaths);
        let steps = datapath.await.unwrap();
        assert!(matches!(steps[0], SyncStep::Begin { boot: 42 }));
        let SyncStep::Changes(changes) = &steps[1] else {
            panic!("{steps:?}")
        };
        assert_eq!(
            changes[0].change,
            Change::Upsert {
                gateway: "gw1".into(),
                address: "10.0.0.1:51820".parse().unwrap(),
                idle_ms: 5,
                index: Some(SessionIndex {
                    index: 0xdead_beef,
                    age_ms: 1_500
                }),
            }
        );
        assert_eq!(changes[1].change, Change::Evicted);
        assert_eq!(steps.len(), 2);
        let text = metrics.render();
        assert!(
            text.contains("wglb_sync_changes_received_total{peer=\"lb-a\",result=\"refused\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn the_sender_is_who_its_credential_says_or_a_configured_peer() {
        let batch = |node: &str| SyncBatch {
            node: node.into(),
            ..SyncBatch::default()
        };
        let peers = ["lb-a".to_string(), "lb-b".to_string()];
        let lb_a: Arc<str> = "lb-a".into();
        assert_eq!(
            &*peer_of(&batch("lb-a"), Some(&lb_a), &peers).unwrap(),
            "lb-a"
        );
        // A peer's token does not let it speak for another.
        let err = peer_of(&batch("lb-b"), Some(&lb_a), &peers).unwrap_err();
        assert!(err.0.contains("credential is peer `lb-a`'s"), "{err}");
        // With the API's own credential: only configured names, never made up ones.
        assert_eq!(&*peer_of(&batch("lb-b"), None, &peers).unwrap(), "lb-b");
        assert!(peer_of(&batch("intruder"), None, &peers).is_err());
        assert!(peer_of(&batch(""), None, &peers).is_err());
    }
}
