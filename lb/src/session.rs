//! The session table: which gateway each client source tuple is pinned to.
//!
//! It is bounded (least recently used sessions make room for new ones), so a flood of spoofed
//! source tuples costs at most `capacity` entries; when a session ends otherwise (idle, its
//! gateway gone) is `crate::lifecycle`'s decision. What a session carries besides its gateway
//! (`L`, the link) is up to the datapath: the userspace datapath keeps its upstream socket there.
//!
//! Memory: an entry is the key (a `SocketAddr`, 32 bytes), a [`Session`] (gateway id, gateway
//! address, created time, activity pointer and the link) and the LRU's two list pointers plus a
//! hash slot; [`Session::<()>::BASE_SIZE`] documents the fixed part.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use lru::LruCache;
use wglb_common::handshake::HandshakeWait;

use crate::pool::GatewayId;

/// How long an unconfirmed session (its gateway has not answered yet) may go without a packet
/// before it leaves probation: longer than the 25 s persistent keepalive clients commonly send,
/// so a quiet client whose session was lost (a restarted balancer) keeps its upstream path; short
/// enough that a source's stale unconfirmed sessions free its budget soon. Never longer than the
/// listener's idle timeout.
pub fn probation_idle(idle_timeout: Duration) -> Duration {
    idle_timeout.min(Duration::from_secs(30))
}

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Milliseconds on a process-wide monotonic clock: cheap to store in an atomic.
pub fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Nanoseconds on the same clock, never 0 (which [`HandshakeWait`] reads as "not set").
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// Last time a packet of a session went either way, and whether its gateway has answered on it;
/// shared with whatever forwards its replies.
#[derive(Debug, Default)]
pub struct Activity {
    last_ms: AtomicU64,
    answered: AtomicBool,
    /// Touched only by handshake messages, a few per session every two minutes.
    handshake: Mutex<HandshakeWait>,
}

impl Activity {
    pub fn touch(&self, now_ms: u64) {
        self.last_ms.store(now_ms, Ordering::Relaxed);
    }

    pub fn last_ms(&self) -> u64 {
        self.last_ms.load(Ordering::Relaxed)
    }

    /// The gateway sent a message that confirms the session (`wglb_common::session::confirms`).
    pub fn answer(&self) {
        self.answered.store(true, Ordering::Relaxed);
    }

    pub fn answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    /// The client sent a handshake initiation.
    pub fn initiated(&self, now_ns: u64) {
        self.handshake().initiate(now_ns);
    }

    /// The gateway sent a handshake response or cookie reply: the round trip, if one was asked.
    pub fn handshake_answered(&self, now_ns: u64) -> Option<Duration> {
        self.handshake().answer(now_ns).map(Duration::from_nanos)
    }

    /// The gateway's port refused one of the session's datagrams (ICMP port unreachable).
    pub fn refused(&self, now_ns: u64) {
        self.handshake().refused(now_ns);
    }

    /// How long the client has waited for its gateway to answer an initiation, if it is waiting.
    pub fn waiting(&self, now_ns: u64) -> Option<Duration> {
        self.handshake().waiting(now_ns).map(Duration::from_nanos)
    }

    fn handshake(&self) -> std::sync::MutexGuard<'_, HandshakeWait> {
        // Plain data: a panic elsewhere cannot leave it half-written.
        self.handshake.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
pub struct Session<L> {
    pub gateway: GatewayId,
    /// The address the session was placed at; a gateway that moves loses its sessions.
    pub gateway_address: SocketAddr,
    pub activity: Arc<Activity>,
    pub link: L,
}

impl Session<()> {
    /// Bytes of an entry not counting the link and the shared activity cell.
    pub const BASE_SIZE: usize = std::mem::size_of::<(SocketAddr, Session<()>)>();
}

// Key, gateway id, gateway address, activity pointer: keep the fixed part small.
const _: () = assert!(Session::<()>::BASE_SIZE <= 80);

/// Why a session left the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EvictionReason {
    Idle,
    /// Its gateway went down (health or operator), moved, or was removed.
    GatewayGone,
    /// The table was full and it was the least recently used.
    TableFull,
    /// Evicted through the API.
    Operator,
    /// Its gateway never answered: it expired in probation, or a newer unconfirmed session
    /// pushed it out.
    Unconfirmed,
    /// Its client's NAT mapping changed: the gateway roamed to the new tuple's session, which
    /// took its place (`wglb_common::index`).
    Rebound,
}

impl EvictionReason {
    pub const ALL: [EvictionReason; 6] = [
        EvictionReason::Idle,
        EvictionReason::GatewayGone,
        EvictionReason::TableFull,
        EvictionReason::Operator,
        EvictionReason::Unconfirmed,
        EvictionReason::Rebound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EvictionReason::Idle => "idle",
            EvictionReason::GatewayGone => "gateway_gone",
            EvictionReason::TableFull => "table_full",
            EvictionReason::Operator => "operator",
            EvictionReason::Unconfirmed => "unconfirmed",
            EvictionReason::Rebound => "rebound",
        }
    }
}

pub struct SessionTable<L> {
    sessions: LruCache<SocketAddr, Session<L>>,
}

impl<L> SessionTable<L> {
    pub fn new(capacity: NonZeroUsize) -> SessionTable<L> {
        SessionTable {
            sessions: LruCache::new(capacity),
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Changes the bound; returns the least recently used sessions that no longer fit.
    pub fn set_capacity(&mut self, capacity: NonZeroUsize) -> Vec<(SocketAddr, Session<L>)> {
        let mut evicted = Vec::new();
        while self.sessions.len() > capacity.get() {
            evicted.extend(self.sessions.pop_lru());
        }
        self.sessions.resize(capacity);
        evicted
    }

    /// Looks a client up, marking it as recently used and active now.
    pub fn lookup(&mut self, client: &SocketAddr, now_ms: u64) -> Option<&Session<L>> {
        let session = self.sessions.get(client)?;
        session.activity.touch(now_ms);
        Some(session)
    }

    /// Adds a session; returns the one it pushed out if the table was full.
    pub fn insert(
        &mut self,
        client: SocketAddr,
        session: Session<L>,
    ) -> Option<(SocketAddr, Session<L>)> {
        match self.sessions.push(client, session) {
            Some((evicted, _)) if evicted == client => None,
            other => other,
        }
    }

    /// Looks a client up without marking it used or active.
    pub fn peek(&self, client: &SocketAddr) -> Option<&Session<L>> {
        self.sessions.peek(client)
    }

    /// The session of a client, to change, without marking it used or active.
    pub fn peek_mut(&mut self, client: &SocketAddr) -> Option<&mut Session<L>> {
        self.sessions.peek_mut(client)
    }

    pub fn remove(&mut self, client: &SocketAddr) -> Option<Session<L>> {
        self.sessions.pop(client)
    }

    /// Removes every session for which `evict` says so, without changing the order of the rest.
    pub fn evict_where(
        &mut self,
        mut evict: impl FnMut(&SocketAddr, &Session<L>) -> bool,
    ) -> Vec<(SocketAddr, Session<L>)> {
        let doomed: Vec<SocketAddr> = self
            .sessions
            .iter()
            .filter(|(c, s)| evict(c, s))
            .map(|(c, _)| *c)
            .collect();
        doomed
            .into_iter()
            .filter_map(|c| self.sessions.pop_entry(&c))
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&SocketAddr, &Session<L>)> {
        self.sessions.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(gateway: u32, now: u64) -> Session<()> {
        let activity = Arc::new(Activity::default());
        activity.touch(now);
        Session {
            gateway: GatewayId(gateway),
            gateway_address: "10.0.0.1:51820".parse().unwrap(),
            activity,
            link: (),
        }
    }

    fn client(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn stays_bounded_under_a_flood_and_evicts_the_least_recent() {
        let mut table = SessionTable::new(NonZeroUsize::new(100).unwrap());
        table.insert(client(1), session(1, 0));
        for port in 2..=1000 {
            // client 1 keeps talking, so the flood pushes out only the flood.
            assert!(table.lookup(&client(1), port as u64).is_some());
            let evicted = table.insert(client(port), session(2, 0));
            assert_eq!(evicted.is_some(), port > 100);
            if let Some((evicted, _)) = evicted {
                assert_ne!(evicted, client(1));
            }
            assert!(table.len() <= 100);
        }
        assert_eq!(table.lookup(&client(1), 0).unwrap().gateway, GatewayId(1));
    }

    #[test]
    fn reinserting_a_client_is_not_an_eviction() {
        let mut table = SessionTable::new(NonZeroUsize::new(2).unwrap());
        assert!(table.insert(client(1), session(1, 0)).is_none());
        assert!(table.insert(client(1), session(2, 0)).is_none());
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn lookups_and_replies_count_as_activity() {
        let mut table = SessionTable::new(NonZeroUsize::new(10).unwrap());
        table.insert(client(1), session(1, 0));
        table.insert(client(2), session(1, 0));
        table.insert(client(3), session(1, 0));
        table.lookup(&client(1), 100_000);
        // a reply to client 2, which does not go through lookup
        table
            .iter()
            .find(|(c, _)| **c == client(2))
            .unwrap()
            .1
            .activity
            .touch(150_000);
        let idle_since = |table: &mut SessionTable<()>, since: u64| -> Vec<SocketAddr> {
            table
                .evict_where(|_, s| s.activity.last_ms() <= since)
                .into_iter()
                .map(|(c, _)| c)
                .collect()
        };
        assert_eq!(idle_since(&mut table, 0), vec![client(3)]);
        assert_eq!(idle_since(&mut table, 100_000), vec![client(1)]);
        assert_eq!(table.len(), 1);
    }

    proptest::proptest! {
        /// Whatever clients come and go, the table never outgrows its bound, and a client it
        /// was given is either still there with its gateway or was reported evicted.
        #[test]
        fn bounded_and_never_loses_a_session_silently(
            capacity in 1usize..32,
            ops in proptest::collection::vec((0u16..64, proptest::bool::ANY), 1..400),
        ) {
            let mut table = SessionTable::new(NonZeroUsize::new(capacity).unwrap());
            let mut expected = std::collections::HashMap::new();
            for (port, insert) in ops {
                if insert {
                    let gateway = port as u32 % 5;
                    if let Some((evicted, _)) = table.insert(client(port), session(gateway, 0)) {
                        proptest::prop_assert!(expected.remove(&evicted).is_some());
                    }
                    expected.insert(client(port), gateway);
                } else {
                    let found = table.lookup(&client(port), 0).map(|s| s.gateway.0);
                    proptest::prop_assert_eq!(found, expected.get(&client(port)).copied());
                }
                proptest::prop_assert!(table.len() <= capacity);
                proptest::prop_assert_eq!(table.len(), expected.len());
            }
        }
    }

    #[test]
    fn evicts_by_gateway() {
        let mut table = SessionTable::new(NonZeroUsize::new(10).unwrap());
        for port in 0..6 {
            table.insert(client(port), session(port as u32 % 2, 0));
        }
        let evicted = table.evict_where(|_, s| s.gateway == GatewayId(1));
        assert_eq!(evicted.len(), 3);
        assert!(table.iter().all(|(_, s)| s.gateway == GatewayId(0)));
    }
}
