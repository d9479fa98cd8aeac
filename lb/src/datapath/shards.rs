//! A listener on every core: one shard per socket of a reuse-port group, each a whole relay of
//! its own (its sessions, their sockets and reply tasks) on a thread of its own with a
//! single-threaded runtime, steered so that a client's datagrams always reach the shard that
//! holds its session (`steering`). A shard's datagrams, timers and reply tasks never wake
//! another thread: a multi-threaded runtime's work stealing cost more CPU per packet than it
//! saved at moderate rates. In front of them a small task answers the API, the XDP program
//! and sync peers as one listener: it asks every shard and merges, and hands a peer's sessions
//! to the shard their clients' datagrams reach; it going away stops the shards.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use socket2::Socket;
use tokio::sync::{mpsc, oneshot, watch};
use wglb_common::admission::Refusal;

use super::endpoint::{RecvBuffers, UdpEndpoint};
use super::steering::{self, shard_of};
use super::{Relay, Shared, Sibling, SWEEP_INTERVAL};
use crate::admission::Sources;
use crate::agents::Agents;
use crate::config::ListenerConfig;
use crate::control::ListenerPlan;
use crate::events::EventBus;
use crate::lifecycle::Evictions;
use crate::metrics::Metrics;
use crate::passive::Board;
use crate::query::{self, IndicesAfter, KnownIndex, Moved, SessionRequest};
use crate::rebinding::Indices;
use crate::session::{now_ms, now_ns, SessionTable};
use crate::sync::{Applied, PeerChange, Resyncs, SyncOut, SyncStep};

/// Indices learned by reply paths and not yet taken in by their shard: a handshake per client
/// every two minutes, so a burst of 4,096 is a lot.
const LEARNED_QUEUE: usize = 4096;
/// Rebindings told to another shard and not yet taken in.
const SIBLING_QUEUE: usize = 4096;

/// What a listener's datapath is connected to besides its sockets.
pub struct ListenerLinks {
    pub plans: watch::Receiver<Arc<ListenerPlan>>,
    pub requests: mpsc::Receiver<SessionRequest>,
    pub metrics: Metrics,
    pub events: EventBus,
    pub sync: SyncOut,
    /// The control plane's board for passive health.
    pub board: Board,
    /// The gateway agents: the client keys behind this balancer's upstream paths, and their
    /// gateways' handshake orders.
    pub agents: Agents,
}

/// Binds a listener's `shards` sockets, in shard order, and steers the group. Bound by the
/// caller of [`run_listener`], so that a bad address fails the start and not a task.
///
/// Another process's sockets on the same address (a new balancer started before the old one
/// stops) join the group too and shift the order the program counts in: datagrams then reach
/// another shard than `shard_of` says, which opens its own session on the same gateway (the
/// gateway follows the client's new source port, as it follows any roaming).
pub fn bind_shards(address: SocketAddr, buffer: usize, shards: usize) -> io::Result<Vec<Socket>> {
    let sockets = (0..shards.max(1))
        .map(|_| UdpEndpoint::bind_listener(address, buffer))
        .collect::<io::Result<Vec<_>>>()?;
    if sockets.len() > 1 {
        steering::steer(&sockets[0], address.is_ipv6(), sockets.len())?;
    }
    Ok(sockets)
}

/// Runs one listener until a shard's socket fails; dropping the future stops its shards.
/// Should the control plane go away, traffic keeps flowing on the last plan it published.
pub async fn run_listener(
    config: &ListenerConfig,
    sockets: Vec<Socket>,
    links: ListenerLinks,
) -> io::Result<()> {
    let ListenerLinks {
        plans,
        mut requests,
        metrics,
        events,
        sync,
        board,
        agents,
    } = links;
    let plan = plans.borrow().clone();
    let (siblings, told): (Vec<_>, Vec<_>) = (0..sockets.len())
        .map(|_| mpsc::channel(SIBLING_QUEUE))
        .unzip();
    let shared = Shared {
        indices: Arc::new(Mutex::new(Indices::new(plan.table_size))),
        sources: Arc::new(Mutex::new(Sources::new(plan.admission.limits()))),
        siblings: siblings.into(),
    };
    let counters = Arc::new(metrics.listener(&config.name));
    let standby = metrics.sync_standby(&config.name);
    let mut shards = Vec::new();
    let (ended_tx, mut ended) = mpsc::unbounded_channel();
    for (shard, (socket, told)) in sockets.into_iter().zip(told).enumerate() {
        let (learned_tx, learned) = mpsc::channel(LEARNED_QUEUE);
        let (name, source, plan, shared) = (
            config.name.clone(),
            config.source,
            plan.clone(),
            shared.clone(),
        );
        let (counters, standby, metrics, events) = (
            counters.clone(),
            standby.clone(),
            metrics.clone(),
            events.clone(),
        );
        let (sync, board, agents) = (sync.clone(), board.clone(), agents.clone());
        // Built on the shard's thread, around the socket it registers with its runtime there.
        let relay = move |socket| Relay {
            name,
            shard,
            socket,
            source,
            sessions: SessionTable::new(super::share(plan.table_size, shared.siblings.len())),
            probation: SessionTable::new(super::share(
                plan.admission.probation_size,
                shared.siblings.len(),
            )),
            shared,
            counters,
            standby,
            metrics,
            plan,
            gateway_counters: HashMap::new(),
            events,
            ended: Evictions::default(),
            refused: [0; Refusal::ALL.len()],
            unconfirmed_counted: 0,
            sync,
            resyncs: Resyncs::default(),
            refreshed_at: now_ms(),
            board,
            agents,
            learned: learned_tx,
        };
        let (asks, asked) = mpsc::channel(16);
        shards.push(asks);
        let inbox = Inbox {
            plans: plans.clone(),
            requests: asked,
            learned,
            told,
        };
        let ended = ended_tx.clone();
        std::thread::Builder::new()
            .name(format!("wglb-shard-{shard}"))
            .spawn(move || {
                // A panic ends the listener as a failed socket would, not a shard in silence.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async move {
                        let socket = Arc::new(UdpEndpoint::listener(socket)?);
                        run_shard(relay(socket), inbox).await
                    })
                }));
                let outcome = outcome
                    .unwrap_or_else(|_| Err(io::Error::other(format!("shard {shard} panicked"))));
                let _ = ended.send(outcome);
            })?;
    }
    let front = Front {
        shards,
        plans,
        indices: shared.indices,
    };
    loop {
        tokio::select! {
            Some(outcome) = ended.recv() => return outcome,
            Some(request) = requests.recv() => front.answer(request).await,
        }
    }
}

/// What reaches a shard besides its socket's datagrams.
struct Inbox {
    plans: watch::Receiver<Arc<ListenerPlan>>,
    requests: mpsc::Receiver<SessionRequest>,
    learned: mpsc::Receiver<crate::rebinding::Learned>,
    told: mpsc::Receiver<Sibling>,
}

/// One shard's loop: its datagrams, and between batches plan changes, its sweep, and what the
/// front and the other shards ask of it.
async fn run_shard(mut relay: Relay, mut inbox: Inbox) -> io::Result<()> {
    let plan = inbox.plans.borrow_and_update().clone();
    relay.apply(plan);
    let mut buffers = RecvBuffers::new();
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let socket = relay.socket.clone();
    let mut control_plane_alive = true;
    loop {
        tokio::select! {
            biased;
            changed = inbox.plans.changed(), if control_plane_alive => match changed {
                Ok(()) => {
                    let plan = inbox.plans.borrow_and_update().clone();
                    relay.apply(plan);
                }
                Err(_) => {
                    if relay.shard == 0 {
                        tracing::error!(listener = %relay.name, "the control plane is gone: forwarding on its last plan");
                    }
                    control_plane_alive = false;
                }
            },
            _ = sweep.tick() => relay.sweep(),
            Some(index) = inbox.learned.recv() => relay.learn(index),
            Some(message) = inbox.told.recv() => relay.told(message),
            request = inbox.requests.recv() => {
                // The front is gone: the listener stops.
                let Some(request) = request else {
                    return Ok(());
                };
                relay.answer(request);
                // A long answer (a page of a big table) must not be followed by another while
                // datagrams wait: drain what queued up before looking at requests again.
                relay.receive(&socket, &mut buffers);
            }
            ready = socket.io.readable() => {
                ready?;
                relay.receive(&socket, &mut buffers);
            }
        }
    }
}

/// Answers for a listener's shards as one.
struct Front {
    shards: Vec<mpsc::Sender<SessionRequest>>,
    plans: watch::Receiver<Arc<ListenerPlan>>,
    indices: Arc<Mutex<Indices>>,
}

impl Front {
    /// Asks every shard at once; the answers of those still running.
    async fn ask_all<T>(&self, request: impl Fn(oneshot::Sender<T>) -> SessionRequest) -> Vec<T> {
        let mut answers = Vec::with_capacity(self.shards.len());
        for shard in &self.shards {
            let (reply, answer) = oneshot::channel();
            if shard.send(request(reply)).await.is_ok() {
                answers.push(answer);
            }
        }
        let mut answered = Vec::with_capacity(answers.len());
        for answer in answers {
            if let Ok(answer) = answer.await {
                answered.push(answer);
            }
        }
        answered
    }

    async fn answer(&self, request: SessionRequest) {
        match request {
            SessionRequest::Count { reply } => {
                // Every shard reads the same per-gateway gauges; each knows the gateways it
                // opened sessions on.
                let mut counts = HashMap::new();
                for answer in self.ask_all(|reply| SessionRequest::Count { reply }).await {
                    counts.extend(answer);
                }
                let _ = reply.send(counts);
            }
            SessionRequest::List {
                filter,
                after,
                limit,
                reply,
            } => {
                let pages = self
                    .ask_all(|reply| SessionRequest::List {
                        filter: filter.clone(),
                        after,
                        limit,
                        reply,
                    })
                    .await;
                let page = pages
                    .into_iter()
                    .fold(query::SessionPage::default(), |merged, page| {
                        query::merge_pages(merged, page, limit)
                    });
                let _ = reply.send(page);
            }
            SessionRequest::Snapshot { reply } => {
                let snapshots = self
                    .ask_all(|reply| SessionRequest::Snapshot { reply })
                    .await;
                let _ = reply.send(snapshots.into_iter().flatten().collect());
            }
            SessionRequest::Evict { filter, reply } => {
                let evicted = self
                    .ask_all(|reply| SessionRequest::Evict {
                        filter: filter.clone(),
                        reply,
                    })
                    .await;
                let _ = reply.send(evicted.into_iter().sum());
            }
            SessionRequest::Move { gateway, reply } => {
                let answers = self
                    .ask_all(|reply| SessionRequest::Move {
                        gateway: gateway.clone(),
                        reply,
                    })
                    .await;
                let mut moved = Moved::default();
                for answer in answers {
                    moved += answer;
                }
                let _ = reply.send(moved);
            }
            SessionRequest::Sync { peer, step, reply } => {
                let mut applied = Applied::default();
                let mut add = |part: Applied| {
                    applied.applied += part.applied;
                    applied.refused += part.refused;
                };
                match step {
                    SyncStep::Changes(changes) => {
                        // Each change to the shard its client's datagrams reach.
                        let mut parts: Vec<Vec<PeerChange>> = vec![Vec::new(); self.shards.len()];
                        for change in changes {
                            parts[shard_of(change.client, self.shards.len())].push(change);
                        }
                        for (shard, part) in parts.into_iter().enumerate() {
                            if part.is_empty() {
                                continue;
                            }
                            let step = SyncStep::Changes(part);
                            let peer = peer.clone();
                            let answer = query::ask(&self.shards[shard], |reply| {
                                SessionRequest::Sync { peer, step, reply }
                            })
                            .await;
                            add(answer.unwrap_or_default());
                        }
                    }
                    step => {
                        let answers = self
                            .ask_all(|reply| SessionRequest::Sync {
                                peer: peer.clone(),
                                step: step.clone(),
                                reply,
                            })
                            .await;
                        answers.into_iter().for_each(&mut add);
                    }
                }
                let _ = reply.send(applied);
            }
            SessionRequest::Indices { after, reply } => {
                let plan = self.plans.borrow().clone();
                let (mark, learned) = self
                    .indices
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .learned_after(after, now_ns());
                let indices = learned
                    .into_iter()
                    .map(|(learned, index)| KnownIndex {
                        client: learned.client,
                        gateway: plan
                            .placement
                            .gateway(learned.gateway)
                            .map_or("", |g| g.name.as_str())
                            .to_string(),
                        gateway_address: learned.address,
                        index,
                    })
                    .collect();
                let _ = reply.send(IndicesAfter { mark, indices });
            }
        }
    }
}
