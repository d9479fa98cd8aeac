//! A full resync of a million sessions, as a balancer sends one to a peer on every (re)connection:
//! the sender's own code (`wglb::sync::peer`: one snapshot of the listener's table, streamed in
//! acknowledged batches over HTTP/2) against a peer on loopback that parses every change as a
//! balancer does (`wglb::sync::receive::parse`) and acknowledges each batch. The listener's
//! snapshot is taken by `wglb::lifecycle::snapshot` over a million sessions, the same pass the
//! datapaths make. No root, no namespaces.
//!
//! Run: `cargo bench -p wglb-benches --bench resync`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use wglb::lifecycle::{self, Held, SessionStore, Standing};
use wglb::metrics::Metrics;
use wglb::query::SessionRequest;
use wglb::rebinding::SessionIndex;
use wglb::sync::{peer, PeerQueue};
use wglb_proto::client::Target;
use wglb_proto::v1::session_sync_server::{SessionSync, SessionSyncServer};
use wglb_proto::v1::{SyncAck, SyncBatch};

const SESSIONS: u32 = 1_000_000;

/// A listener's table of a million confirmed sessions on three gateways.
struct Table(Vec<(SocketAddr, usize)>);

const GATEWAYS: [&str; 3] = ["gw0", "gw1", "gw2"];

impl SessionStore for Table {
    fn held(&self) -> Box<dyn Iterator<Item = Held<'_>> + '_> {
        Box::new(self.0.iter().map(|&(client, gateway)| Held {
            client,
            gateway: GATEWAYS[gateway],
            gateway_address: SocketAddr::from(([10, 202, gateway as u8, 2], 51820)),
            idle_ms: 1_000,
            standing: Standing::Confirmed,
            synced_from: None,
            shard: None,
            index: Some(SessionIndex {
                index: u32::from(client.port()) << 16 | gateway as u32,
                age_ms: 30_000,
            }),
        }))
    }
}

/// The receiving peer: parses and acknowledges, and notes when the resync ended.
#[derive(Clone, Default)]
struct Peer {
    changes: Arc<AtomicU64>,
    ended: Arc<Mutex<Option<Instant>>>,
}

#[tonic::async_trait]
impl SessionSync for Peer {
    type PushStream = ReceiverStream<Result<SyncAck, Status>>;

    async fn push(
        &self,
        request: Request<Streaming<SyncBatch>>,
    ) -> Result<Response<Self::PushStream>, Status> {
        let mut batches = request.into_inner();
        let (acks, stream) = mpsc::channel(16);
        let peer = self.clone();
        tokio::spawn(async move {
            while let Some(Ok(batch)) = batches.next().await {
                let parsed = batch
                    .changes
                    .iter()
                    .filter(|c| wglb::sync::receive::parse(c).is_some())
                    .count();
                peer.changes.fetch_add(parsed as u64, Ordering::Relaxed);
                if batch.resync_end {
                    *peer.ended.lock().unwrap() = Some(Instant::now());
                }
                let ack = SyncAck {
                    sequence: batch.sequence,
                    applied: parsed as u32,
                    refused: 0,
                };
                if acks.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let table = Table(
        (0..SESSIONS)
            .map(|k| {
                let client =
                    SocketAddr::from(([10, 100 + (k >> 16) as u8, (k >> 8) as u8, k as u8], 51820));
                (client, k as usize % GATEWAYS.len())
            })
            .collect(),
    );
    let started = Instant::now();
    let snapshot = lifecycle::snapshot(&table);
    let snapshot_time = started.elapsed();
    assert_eq!(snapshot.len(), SESSIONS as usize);

    let runtime = tokio::runtime::Runtime::new()?;
    let (resync_time, received) = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let receiver = Peer::default();
        let server = tonic::transport::Server::builder()
            .add_service(SessionSyncServer::new(receiver.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);

        // The listener's datapath, as the sender asks it: one snapshot, handed over whole.
        let (requests, mut asked) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(request) = asked.recv().await {
                if let SessionRequest::Snapshot { reply } = request {
                    let _ = reply.send(snapshot.clone());
                }
            }
        });
        let metrics = Metrics::new();
        let (queue, changes) = PeerQueue::new("peer", 65_536, metrics.sync_peer("peer"));
        let (stop, stopping) = watch::channel(false);
        let target = Target {
            address: format!("http://{address}"),
            token: None,
            ca: None,
            identity: None,
        };
        let started = Instant::now();
        let sender = tokio::spawn(peer::run(
            queue,
            changes,
            target,
            "bench".into(),
            BTreeMap::from([("office".to_string(), requests)]),
            stopping,
        ));
        let ended = loop {
            if let Some(ended) = *receiver.ended.lock().unwrap() {
                break ended;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "the resync did not end within 10 minutes"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let _ = stop.send(true);
        let _ = sender.await;
        anyhow::Ok((ended - started, receiver.changes.load(Ordering::Relaxed)))
    })?;
    anyhow::ensure!(
        received == SESSIONS as u64,
        "the peer parsed {received} changes of {SESSIONS}"
    );
    println!("resync of {SESSIONS} sessions (sender and a parsing peer on loopback, same run)");
    println!("  snapshot of the table (one pass):       {snapshot_time:>10.1?}");
    println!("  connect, stream, parse, acknowledge:    {resync_time:>10.1?}");
    println!(
        "  {:.0} sessions/s (a standby copy lasts the idle timeout, 180 s by default)",
        SESSIONS as f64 / resync_time.as_secs_f64()
    );
    Ok(())
}
