//! Session sync between the balancers of one site, in the spirit of IPVS's sync daemon and
//! conntrackd: each balancer pushes the sessions it forwards to every peer ([`peer`]), and keeps
//! what its peers push ([`receive`]) as standby entries pinned to the same gateway. A standby
//! entry costs no socket; it turns into a forwarding session when the client's traffic reaches
//! this balancer (the floating address moved, or ECMP rehashed), so the client stays on the
//! gateway that holds its WireGuard state even where this balancer's Maglev would place it
//! elsewhere (the gateway set changed since, or the gateway is draining).
//!
//! Only a balancer's own sessions are announced: an entry received from a peer is never sent on,
//! so changes cannot loop. Whoever forwarded a session last owns it; a peer's upsert makes the
//! receiver's copy a standby entry again.
//!
//! The datapaths publish through a [`SyncOut`] that never blocks: each peer has a bounded queue,
//! and a change that does not fit is dropped, counted, and repaired by a full resync of that peer
//! once it catches up.

pub mod peer;
pub mod receive;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, error::TrySendError};

use crate::metrics::PeerSyncMetrics;
use crate::rebinding::SessionIndex;

/// What happened to a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The session goes to this gateway, and has been idle this long: a new session, or the
    /// periodic refresh of a live one (idempotent either way).
    Upsert {
        gateway: String,
        address: SocketAddr,
        idle_ms: u64,
        /// The receiver index its gateway chose last, if known: the receiver routes the
        /// session's rebound tuples by it too.
        index: Option<SessionIndex>,
    },
    /// The session is gone.
    Evicted,
}

/// A change to one of this balancer's own sessions, queued for a peer.
#[derive(Clone, Debug)]
pub struct LocalChange {
    pub listener: Arc<str>,
    pub client: SocketAddr,
    pub change: Change,
    /// When it was queued: what the sync lag is measured from.
    pub at: Instant,
}

/// A change a peer sent about one of its sessions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerChange {
    pub client: SocketAddr,
    pub change: Change,
}

/// One step of a peer's stream, as a listener's datapath applies it.
#[derive(Clone, Debug)]
pub enum SyncStep {
    /// A full resync starts: what the peer sent before and does not repeat before the end goes,
    /// unless the peer restarted since (its `boot` changed): a restarted peer has lost its table,
    /// so what this balancer holds for it may be the only copy, and stays until it idles out or
    /// the peer announces it again.
    Begin {
        boot: u64,
    },
    Changes(Vec<PeerChange>),
    End,
}

/// How many changes of a step a datapath applied and refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub applied: u32,
    pub refused: u32,
}

/// How often a forwarding session with traffic is announced again, so that its standby copies
/// do not expire while it lives: three times per idle timeout, at most once a minute.
pub fn refresh_interval(idle_timeout: Duration) -> Duration {
    (idle_timeout / 3).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// One peer's queue of changes.
pub struct PeerQueue {
    pub name: String,
    changes: mpsc::Sender<LocalChange>,
    /// A change was dropped: the peer needs a full resync.
    resync_due: AtomicBool,
    metrics: PeerSyncMetrics,
}

impl PeerQueue {
    /// A queue of `capacity` changes and its receiving end, for the peer's [`peer::run`] task.
    pub fn new(
        name: &str,
        capacity: usize,
        metrics: PeerSyncMetrics,
    ) -> (Arc<PeerQueue>, mpsc::Receiver<LocalChange>) {
        let (changes, receiver) = mpsc::channel(capacity);
        let queue = PeerQueue {
            name: name.into(),
            changes,
            resync_due: AtomicBool::new(false),
            metrics,
        };
        (Arc::new(queue), receiver)
    }

    fn push(&self, change: LocalChange) {
        match self.changes.try_send(change) {
            Ok(()) => self.metrics.queued.inc(),
            Err(TrySendError::Full(_)) => {
                self.metrics.dropped.inc();
                self.resync_due.store(true, Ordering::Relaxed);
            }
            // The peer's task ended with the process.
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// Whether a resync is due, clearing the flag.
    fn take_resync_due(&self) -> bool {
        self.resync_due.swap(false, Ordering::Relaxed)
    }
}

/// Where a listener's datapath publishes changes to its own sessions. Cheap to clone; never
/// blocks; does nothing without peers.
#[derive(Clone)]
pub struct SyncOut {
    listener: Arc<str>,
    peers: Arc<[Arc<PeerQueue>]>,
}

impl SyncOut {
    pub fn new(listener: &str, peers: Arc<[Arc<PeerQueue>]>) -> SyncOut {
        SyncOut {
            listener: listener.into(),
            peers,
        }
    }

    /// A listener with no peers to tell.
    pub fn none(listener: &str) -> SyncOut {
        SyncOut::new(listener, Arc::new([]))
    }

    pub fn enabled(&self) -> bool {
        !self.peers.is_empty()
    }

    pub fn upsert(
        &self,
        client: SocketAddr,
        gateway: &str,
        address: SocketAddr,
        idle_ms: u64,
        index: Option<SessionIndex>,
    ) {
        if self.enabled() {
            self.publish(
                client,
                Change::Upsert {
                    gateway: gateway.into(),
                    address,
                    idle_ms,
                    index,
                },
            );
        }
    }

    pub fn evicted(&self, client: SocketAddr) {
        if self.enabled() {
            self.publish(client, Change::Evicted);
        }
    }

    fn publish(&self, client: SocketAddr, change: Change) {
        let at = Instant::now();
        for peer in self.peers.iter() {
            peer.push(LocalChange {
                listener: self.listener.clone(),
                client,
                change: change.clone(),
                at,
            });
        }
    }
}

/// Where a datapath keeps its peers' sessions: the userspace table's standby entries, or the XDP
/// program's pins. [`apply`] runs a peer's sync steps against them.
pub trait Standbys {
    /// The clients `peer`'s entries are for.
    fn held_for(&self, peer: &str) -> Vec<SocketAddr>;
    /// Keeps `peer`'s session of `client` on the gateway it names, with its receiver index if
    /// one is known; false if it cannot be kept (no such gateway here, or it is down).
    fn hold(
        &mut self,
        peer: &Arc<str>,
        client: SocketAddr,
        gateway: &str,
        address: SocketAddr,
        idle_ms: u64,
        index: Option<SessionIndex>,
    ) -> bool;
    /// Drops `peer`'s entry for `client`, if there is one and it is `peer`'s.
    fn release(&mut self, peer: &str, client: SocketAddr);
    fn resyncs(&mut self) -> &mut Resyncs;
}

/// Applies one step of `peer`'s stream.
pub fn apply(standbys: &mut impl Standbys, peer: &Arc<str>, step: &SyncStep) -> Applied {
    let mut outcome = Applied::default();
    match step {
        SyncStep::Begin { boot } => {
            let held = standbys.held_for(peer);
            standbys
                .resyncs()
                .begin(peer.clone(), *boot, held.into_iter());
        }
        SyncStep::End => {
            for client in standbys.resyncs().end(peer) {
                standbys.release(peer, client);
            }
        }
        SyncStep::Changes(changes) => {
            for PeerChange { client, change } in changes {
                let applied = match change {
                    Change::Upsert {
                        gateway,
                        address,
                        idle_ms,
                        index,
                    } => {
                        standbys.resyncs().seen(peer, client);
                        standbys.hold(peer, *client, gateway, *address, *idle_ms, *index)
                    }
                    Change::Evicted => {
                        standbys.release(peer, *client);
                        true
                    }
                };
                if applied {
                    outcome.applied += 1;
                } else {
                    outcome.refused += 1;
                }
            }
        }
    }
    outcome
}

/// Which of a peer's standby entries a resync in progress has not repeated yet: what is left at
/// its end the peer no longer has. And each peer's boot, to tell its restart from a reconnect.
#[derive(Default)]
pub struct Resyncs {
    unseen: HashMap<Arc<str>, HashSet<SocketAddr>>,
    boots: HashMap<Arc<str>, u64>,
}

impl Resyncs {
    /// A resync by `peer` (in its boot `boot`) starts while these of its entries are held. After
    /// a restart of the peer none of them is taken for gone.
    pub fn begin(&mut self, peer: Arc<str>, boot: u64, held: impl Iterator<Item = SocketAddr>) {
        let restarted = self
            .boots
            .insert(peer.clone(), boot)
            .is_some_and(|before| before != boot);
        if restarted {
            tracing::info!(%peer, "session sync: the peer restarted; its sessions held here stay until they idle out or it announces them");
            self.unseen.remove(&peer);
            return;
        }
        self.unseen.insert(peer, held.collect());
    }

    /// The resync in progress repeated `client`.
    pub fn seen(&mut self, peer: &str, client: &SocketAddr) {
        if let Some(unseen) = self.unseen.get_mut(peer) {
            unseen.remove(client);
        }
    }

    /// The resync ended: the entries it did not repeat (none if it never began here, or began
    /// after the peer restarted).
    pub fn end(&mut self, peer: &str) -> HashSet<SocketAddr> {
        self.unseen.remove(peer).unwrap_or_default()
    }
}

/// This process's boot id ([`SyncStep::Begin`]): random, chosen once.
pub fn boot_id() -> u64 {
    static BOOT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BOOT.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the operating system's randomness once per process.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        hasher.finish()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn client(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn a_full_queue_drops_and_asks_for_a_resync_without_blocking() {
        let metrics = Metrics::new();
        let (queue, mut receiver) = PeerQueue::new("b", 64, metrics.sync_peer("b"));
        let out = SyncOut::new("office", Arc::new([queue.clone()]));
        let gateway: SocketAddr = "10.0.0.1:51820".parse().unwrap();
        for port in 0..100 {
            let index = (port == 0).then_some(SessionIndex {
                index: 7,
                age_ms: 3,
            });
            out.upsert(client(port), "gw1", gateway, 0, index);
        }
        assert!(queue.take_resync_due());
        assert!(!queue.take_resync_due(), "the flag clears once taken");
        let text = metrics.render();
        assert!(
            text.contains("wglb_sync_changes_dropped_total{peer=\"b\"} 36"),
            "{text}"
        );
        let first = receiver.try_recv().unwrap();
        assert_eq!(&*first.listener, "office");
        assert_eq!(first.client, client(0));
        assert_eq!(
            first.change,
            Change::Upsert {
                gateway: "gw1".into(),
                address: gateway,
                idle_ms: 0,
                index: Some(SessionIndex {
                    index: 7,
                    age_ms: 3
                }),
            }
        );
    }

    #[test]
    fn a_resync_leaves_what_it_did_not_repeat() {
        let mut resyncs = Resyncs::default();
        resyncs.begin("a".into(), 7, [client(1), client(2), client(3)].into_iter());
        resyncs.begin("b".into(), 8, [client(1)].into_iter());
        resyncs.seen("a", &client(2));
        resyncs.seen("a", &client(9));
        assert_eq!(resyncs.end("a"), HashSet::from([client(1), client(3)]));
        assert_eq!(resyncs.end("a"), HashSet::new(), "ended once");
        assert_eq!(resyncs.end("b"), HashSet::from([client(1)]));
        assert_eq!(resyncs.end("never"), HashSet::new());
        // Reconnected, same boot: what it does not repeat goes, as before.
        resyncs.begin("a".into(), 7, [client(4)].into_iter());
        assert_eq!(resyncs.end("a"), HashSet::from([client(4)]));
    }

    #[test]
    fn a_restarted_peers_resync_erases_nothing() {
        let mut resyncs = Resyncs::default();
        resyncs.begin("a".into(), 7, [client(1)].into_iter());
        assert_eq!(resyncs.end("a"), HashSet::from([client(1)]));
        // Restarted with an empty table: its earlier sessions held here may be the only copy.
        resyncs.begin("a".into(), 9, [client(2), client(3)].into_iter());
        assert_eq!(resyncs.end("a"), HashSet::new());
        // From then on, its resyncs converge again.
        resyncs.begin("a".into(), 9, [client(2)].into_iter());
        assert_eq!(resyncs.end("a"), HashSet::from([client(2)]));
        assert_ne!(boot_id(), 0);
        assert_eq!(boot_id(), boot_id(), "one per process");
    }

    #[test]
    fn refreshes_come_often_enough_to_outlive_the_idle_timeout() {
        assert_eq!(
            refresh_interval(Duration::from_secs(180)),
            Duration::from_secs(60)
        );
        assert_eq!(
            refresh_interval(Duration::from_secs(9)),
            Duration::from_secs(3)
        );
        assert_eq!(
            refresh_interval(Duration::from_millis(600)),
            Duration::from_secs(1)
        );
    }
}
