//! Pushing this balancer's sessions to one peer: a `wglb.v1.SessionSync/Push` stream to the peer's API
//! that starts with a full resync and then carries changes in batches as they are queued.
//! Reconnects with backoff, and resyncs on every connection: whatever the peer missed while
//! apart (a partition, its restart, dropped changes) converges.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use wglb_proto::client::{error_chain, Target};
use wglb_proto::v1::{session_change, SessionChange, SyncAck, SyncBatch};

use super::{Change, LocalChange, PeerQueue};
use crate::query::{SessionRequest, SessionRequests};

/// Changes per batch: large enough to amortise a round trip, small enough to ack quickly.
const MAX_BATCH: usize = 1024;
/// Batches sent and not yet acknowledged; the sender waits beyond it, so a slow peer backs up
/// into the bounded queue (and from there into drops and a resync), never into memory.
const MAX_IN_FLIGHT: usize = 8;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a stopping balancer waits for the peer to acknowledge its last changes.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs until `stop` turns true: then sends what is queued, waits for the acks (briefly), and
/// returns.
pub async fn run(
    queue: Arc<PeerQueue>,
    mut changes: mpsc::Receiver<LocalChange>,
    target: Target,
    node: String,
    datapaths: BTreeMap<String, SessionRequests>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut last_error = String::new();
    loop {
        if *stop.borrow() {
            return;
        }
        let started = Instant::now();
        let outcome = stream(&queue, &mut changes, &target, &node, &datapaths, &mut stop).await;
        queue.metrics.connected.set(0);
        match outcome {
            Ok(()) => return,
            Err(e) => {
                let error = format!("{e:#}");
                // Once per kind of failure, not once per retry.
                if error != last_error {
                    tracing::warn!(peer = %queue.name, "session sync: {error}; retrying");
                    last_error = error;
                }
            }
        }
        if started.elapsed() > BACKOFF_MAX * 2 {
            backoff = BACKOFF_MIN;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One stream: Ok when stopped, Err when the connection failed.
async fn stream(
    queue: &PeerQueue,
    changes: &mut mpsc::Receiver<LocalChange>,
    target: &Target,
    node: &str,
    datapaths: &BTreeMap<String, SessionRequests>,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let connection = target.connect().await?;
    let (batches, outgoing) = mpsc::channel(MAX_IN_FLIGHT);
    let acks = connection
        .sync
        .clone()
        .push(ReceiverStream::new(outgoing))
        .await
        .map_err(|status| {
            anyhow::anyhow!("the peer refused the sync stream: {}", status.message())
        })?
        .into_inner();
    let mut sender = Sender {
        queue,
        node,
        batches,
        acks,
        sequence: 0,
        in_flight: VecDeque::new(),
    };
    queue.metrics.connected.set(1);
    tracing::info!(peer = %queue.name, url = %target.address, "session sync: connected; resyncing");
    resync(&mut sender, changes, datapaths).await?;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return sender.flush(changes).await,
            ack = sender.acks.message() => sender.acked(ack)?,
            first = changes.recv() => {
                let Some(first) = first else { return Ok(()) };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match changes.try_recv() {
                        Ok(change) => batch.push(change),
                        Err(_) => break,
                    }
                }
                queue.metrics.queued.sub(batch.len() as i64);
                sender.send_changes(batch).await?;
            }
        }
        if queue.take_resync_due() {
            tracing::info!(peer = %queue.name, "session sync: changes were dropped (queue full); resyncing");
            resync(&mut sender, changes, datapaths).await?;
        }
    }
}

/// Sends every session this balancer forwards, framed by resync markers. What was queued before
/// is dropped: the resync says it with the state as it is now, and what changes during the
/// resync is queued behind it.
async fn resync(
    sender: &mut Sender<'_>,
    changes: &mut mpsc::Receiver<LocalChange>,
    datapaths: &BTreeMap<String, SessionRequests>,
) -> anyhow::Result<()> {
    let mut discarded = 0;
    while changes.try_recv().is_ok() {
        discarded += 1;
    }
    sender.queue.metrics.queued.sub(discarded);
    sender.queue.metrics.resyncs.inc();
    sender.send(true, false, Vec::new(), Instant::now()).await?;
    for (listener, requests) in datapaths {
        let (reply, snapshot) = oneshot::channel();
        if requests
            .send(SessionRequest::Snapshot { reply })
            .await
            .is_err()
        {
            bail!("listener `{listener}` is gone");
        }
        let sessions = snapshot
            .await
            .with_context(|| format!("listener `{listener}` did not answer"))?;
        for chunk in sessions.chunks(MAX_BATCH) {
            let batch = chunk
                .iter()
                .map(|s| {
                    let change = Change::Upsert {
                        gateway: s.gateway.clone(),
                        address: s.gateway_address,
                        idle_ms: s.idle_ms,
                        index: s.index,
                    };
                    to_proto(listener, s.client, change)
                })
                .collect();
            sender.send(false, false, batch, Instant::now()).await?;
        }
    }
    sender.send(false, true, Vec::new(), Instant::now()).await
}

/// The sending half of a stream and what it has in flight.
struct Sender<'a> {
    queue: &'a PeerQueue,
    node: &'a str,
    batches: mpsc::Sender<SyncBatch>,
    acks: Streaming<SyncAck>,
    sequence: u64,
    /// Sequence numbers sent and not acknowledged, with when their oldest change was queued.
    in_flight: VecDeque<(u64, Instant)>,
}

impl Sender<'_> {
    async fn send_changes(&mut self, changes: Vec<LocalChange>) -> anyhow::Result<()> {
        let oldest = changes
            .iter()
            .map(|c| c.at)
            .min()
            .unwrap_or_else(Instant::now);
        let changes = changes
            .into_iter()
            .map(|c| to_proto(&c.listener, c.client, c.change))
            .collect();
        self.send(false, false, changes, oldest).await
    }

    async fn send(
        &mut self,
        resync_begin: bool,
        resync_end: bool,
        changes: Vec<SessionChange>,
        oldest: Instant,
    ) -> anyhow::Result<()> {
        while self.in_flight.len() >= MAX_IN_FLIGHT {
            let ack = self.acks.message().await;
            self.acked(ack)?;
        }
        self.sequence += 1;
        let count = changes.len() as u64;
        let batch = SyncBatch {
            sequence: self.sequence,
            node: self.node.to_string(),
            resync_begin,
            resync_end,
            changes,
            boot_id: super::boot_id(),
        };
        if self.batches.send(batch).await.is_err() {
            bail!("the stream to the peer closed");
        }
        self.queue.metrics.sent.inc_by(count);
        self.in_flight.push_back((self.sequence, oldest));
        Ok(())
    }

    fn acked(&mut self, ack: Result<Option<SyncAck>, tonic::Status>) -> anyhow::Result<()> {
        let ack = match ack {
            Ok(Some(ack)) => ack,
            Ok(None) => bail!("the peer ended the stream"),
            Err(status) => bail!("the stream broke: {}", error_chain(&status)),
        };
        while let Some(&(sequence, oldest)) = self.in_flight.front() {
            if sequence > ack.sequence {
                break;
            }
            self.in_flight.pop_front();
            if sequence == ack.sequence {
                self.queue.metrics.lag.set(oldest.elapsed().as_secs_f64());
            }
        }
        if ack.refused > 0 {
            tracing::debug!(peer = %self.queue.name, refused = ack.refused, "the peer refused some changes (gateways it does not have, or has down)");
        }
        Ok(())
    }

    /// Sends what is queued and waits for the acks, for at most [`FLUSH_TIMEOUT`].
    async fn flush(mut self, changes: &mut mpsc::Receiver<LocalChange>) -> anyhow::Result<()> {
        let flush = async {
            let mut batch = Vec::new();
            while let Ok(change) = changes.try_recv() {
                batch.push(change);
                if batch.len() == MAX_BATCH {
                    self.queue.metrics.queued.sub(batch.len() as i64);
                    self.send_changes(std::mem::take(&mut batch)).await?;
                }
            }
            if !batch.is_empty() {
                self.queue.metrics.queued.sub(batch.len() as i64);
                self.send_changes(batch).await?;
            }
            while !self.in_flight.is_empty() {
                let ack = self.acks.message().await;
                self.acked(ack)?;
            }
            anyhow::Ok(())
        };
        match tokio::time::timeout(FLUSH_TIMEOUT, flush).await {
            Ok(Ok(())) => tracing::info!(peer = %self.queue.name, "session sync: flushed"),
            Ok(Err(e)) => {
                tracing::warn!(peer = %self.queue.name, "session sync: cannot flush: {e:#}")
            }
            Err(_) => {
                tracing::warn!(peer = %self.queue.name, "session sync: the peer did not acknowledge the last changes in time")
            }
        }
        Ok(())
    }
}

fn to_proto(listener: &str, client: SocketAddr, change: Change) -> SessionChange {
    let mut proto = SessionChange {
        listener: listener.to_string(),
        client: client.to_string(),
        ..SessionChange::default()
    };
    match change {
        Change::Upsert {
            gateway,
            address,
            idle_ms,
            index,
        } => {
            proto.set_kind(session_change::Kind::Upsert);
            proto.gateway = gateway;
            proto.gateway_address = address.to_string();
            proto.idle_ms = idle_ms;
            proto.receiver_index = index.map(|i| i.index);
            proto.receiver_index_age_ms = index.map_or(0, |i| i.age_ms);
        }
        Change::Evicted => proto.set_kind(session_change::Kind::Evicted),
    }
    proto
}
