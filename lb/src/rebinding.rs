//! The userspace datapath's receiver indices (`wglb_common::index` decides; the XDP program
//! keeps the same in its INDICES and RETIRED maps): which gateway and session chose each index,
//! and the source tuples a rebinding retired.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::num::NonZeroUsize;

use lru::LruCache;
use wglb_common::index::{index_at, learn, receiver_offset, routes, Held, Learn};
use wglb_common::wireguard::classify;
use wglb_common::xdp::RETIRED_FOR_NS;

use crate::metrics::ListenerCounters;
use crate::pool::{GatewayId, Placement};

/// An index a gateway chose, as a session's reply path saw it go by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Learned {
    pub index: u32,
    pub client: SocketAddr,
    pub gateway: GatewayId,
    pub address: SocketAddr,
}

/// A session's receiver index (the latest its gateway chose) and how long ago the gateway chose
/// it, as sync peers are told of it: they route the session's rebound tuples by it too, should
/// its traffic come to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionIndex {
    pub index: u32,
    pub age_ms: u64,
}

impl SessionIndex {
    /// `index`, held as `held`, if it still routes the session (`owned`: it was learned on this
    /// session's tuple): a collided or expired index is not worth telling.
    pub fn of(index: u32, owned: bool, held: Held, now_ns: u64) -> Option<SessionIndex> {
        (owned && routes(held, true, now_ns)).then(|| SessionIndex {
            index,
            age_ms: now_ns.saturating_sub(held.learned_ns) / 1_000_000,
        })
    }

    /// When the gateway chose it, on a clock that reads `now_ns` now.
    pub fn learned_ns(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.age_ms.saturating_mul(1_000_000))
    }
}

/// Whose an index is.
#[derive(Clone, Copy, Debug)]
struct Owner {
    client: SocketAddr,
    gateway: GatewayId,
    address: SocketAddr,
    collided: bool,
    learned_ns: u64,
    /// When it was taken in, in the order of [`Indices::learn`] calls.
    mark: u64,
}

impl Owner {
    fn held(&self) -> Held {
        Held {
            gateway: self.gateway.0,
            collided: self.collided,
            learned_ns: self.learned_ns,
        }
    }
}

/// A source tuple without a session routed by the index its datagram carries: to the gateway of
/// the session that learned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routed {
    pub index: u32,
    /// The tuple whose session learned the index: another one (a rebinding: retired once the
    /// gateway answers the new one), or this very tuple (its session left the table: pushed out,
    /// or evicted, while its WireGuard session lives on at the gateway).
    pub learned_on: SocketAddr,
    pub gateway: GatewayId,
    pub address: SocketAddr,
}

impl Routed {
    /// Whether `client` is a new tuple of another tuple's session.
    pub fn rebinds(&self, client: SocketAddr) -> bool {
        self.learned_on != client
    }
}

/// How many indices taken in the journal holds between two questions before it gives up and the
/// next question scans the whole table instead; a second's worth at a few thousand handshakes a
/// second.
const JOURNAL_ROOM: usize = 1 << 16;

pub struct Indices {
    owners: LruCache<u32, Owner>,
    /// The mark of the latest index taken in.
    mark: u64,
    /// The indices taken in since the last question of [`Indices::learned_after`] (whose answer
    /// was the mark held here), with their marks, so that a question costs what changed and not
    /// the whole table (which holds every sync peer's indices too). `None` until the first
    /// question (nobody asks in userspace-only mode) and after an overflow: the next question
    /// scans the table, as does one asked after another mark than the last answer.
    journal: Option<(u64, VecDeque<(u64, u32)>)>,
    /// Retired tuples, and when (ns, `crate::session::now_ns`).
    retired: LruCache<SocketAddr, u64>,
}

impl Indices {
    /// Room for `sessions` sessions' indices (a session has one or two live at a time).
    pub fn new(sessions: NonZeroUsize) -> Indices {
        let retired = NonZeroUsize::new(wglb_common::xdp::MAX_RETIRED as usize).expect("non-zero");
        Indices {
            owners: LruCache::new(sessions.saturating_mul(NonZeroUsize::new(2).expect("non-zero"))),
            mark: 0,
            journal: None,
            retired: LruCache::new(retired),
        }
    }

    /// Takes in an index a gateway chose at `learned_ns` (now, or as long ago as a sync peer
    /// says); true if it is its session's from now on, false if another gateway claims it too.
    pub fn learn(
        &mut self,
        learned: Learned,
        learned_ns: u64,
        now_ns: u64,
        counters: &ListenerCounters,
    ) -> bool {
        let held = self.owners.peek(&learned.index).map(Owner::held);
        let collided = match learn(held, learned.gateway.0, now_ns) {
            Learn::Take => false,
            Learn::Collided => return false,
            Learn::Collide => {
                counters.index_collisions.inc();
                true
            }
        };
        self.mark += 1;
        self.owners.put(
            learned.index,
            Owner {
                client: learned.client,
                gateway: learned.gateway,
                address: learned.address,
                collided,
                learned_ns,
                mark: self.mark,
            },
        );
        if let Some((_, journal)) = &mut self.journal {
            if journal.len() < JOURNAL_ROOM {
                journal.push_back((self.mark, learned.index));
            } else {
                self.journal = None;
            }
        }
        !collided
    }

    /// The indices taken in after `mark` that still route their session, and the mark to ask
    /// after next time. Meant for one asker, whose `mark` only grows.
    pub fn learned_after(&mut self, mark: u64, now_ns: u64) -> (u64, Vec<(Learned, SessionIndex)>) {
        let told = |index: u32, owner: &Owner| {
            let held = SessionIndex::of(index, true, owner.held(), now_ns)?;
            let learned = Learned {
                index,
                client: owner.client,
                gateway: owner.gateway,
                address: owner.address,
            };
            Some((learned, held))
        };
        let learned = match self.journal.replace((self.mark, VecDeque::new())) {
            // Only an index's latest mark tells it: one taken in twice since is told once.
            Some((answered, journal)) if answered == mark => journal
                .into_iter()
                .filter_map(|(at, index)| {
                    let owner = self.owners.peek(&index).filter(|owner| owner.mark == at)?;
                    told(index, owner)
                })
                .collect(),
            _ => self
                .owners
                .iter()
                .filter(|(_, owner)| owner.mark > mark)
                .filter_map(|(index, owner)| told(*index, owner))
                .collect(),
        };
        (self.mark, learned)
    }

    /// `client`'s session index `index`, if it is still worth telling peers.
    pub fn of_session(&self, index: u32, client: SocketAddr, now_ns: u64) -> Option<SessionIndex> {
        let owner = self.owners.peek(&index)?;
        SessionIndex::of(index, owner.client == client, owner.held(), now_ns)
    }

    /// Where a datagram from `client`, which has no session, goes by the index it carries, if
    /// anywhere: `alive(tuple, gateway)` says whether the session of another tuple the index was
    /// learned on still lives on that gateway.
    pub fn route(
        &self,
        client: SocketAddr,
        datagram: &[u8],
        placement: &Placement,
        now_ns: u64,
        alive: impl Fn(SocketAddr, GatewayId) -> bool,
    ) -> Option<Routed> {
        let offset = receiver_offset(classify(datagram).ok()?)?;
        let header: &[u8; 12] = datagram.get(..12)?.try_into().ok()?;
        let index = index_at(header, offset);
        let owner = self.owners.peek(&index)?;
        let keeps = placement.keeps(owner.gateway, owner.address);
        let routed = Routed {
            index,
            learned_on: owner.client,
            gateway: owner.gateway,
            address: owner.address,
        };
        (routes(owner.held(), keeps, now_ns)
            && (!routed.rebinds(client) || alive(owner.client, owner.gateway)))
        .then_some(routed)
    }

    /// The rebound tuple `client` is confirmed: the index is its own from now on, and what
    /// still comes from the old tuple is dropped for a while.
    pub fn retire(&mut self, rebinding: &Routed, client: SocketAddr, now_ns: u64) {
        if let Some(owner) = self.owners.peek_mut(&rebinding.index) {
            if owner.client == rebinding.learned_on {
                owner.client = client;
            }
        }
        self.retired.put(rebinding.learned_on, now_ns);
    }

    pub fn retired(&self, client: &SocketAddr, now_ns: u64) -> bool {
        self.retired
            .peek(client)
            .is_some_and(|at| now_ns.saturating_sub(*at) < RETIRED_FOR_NS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_peers_index_routes_for_what_is_left_of_its_lifetime() {
        let counters = Metrics::new().listener("test");
        let mut indices = Indices::new(NonZeroUsize::new(8).expect("non-zero"));
        let client: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let other: SocketAddr = "192.0.2.2:1000".parse().unwrap();
        let learned = |client, gateway| Learned {
            index: 7,
            client,
            gateway: GatewayId(gateway),
            address: "10.0.0.1:51820".parse().unwrap(),
        };
        let now = 1_000 * S;
        let told = SessionIndex {
            index: 7,
            age_ms: 150_000,
        };
        assert!(indices.learn(learned(client, 1), told.learned_ns(now), now, &counters));
        assert_eq!(indices.of_session(7, client, now), Some(told));
        assert_eq!(
            indices.of_session(7, client, now + 10 * S),
            Some(SessionIndex {
                index: 7,
                age_ms: 160_000
            })
        );
        assert_eq!(indices.of_session(7, other, now), None, "not its session's");
        assert_eq!(
            indices.of_session(7, client, now + 30 * S),
            None,
            "expired 180 s after its gateway chose it, not after it was told"
        );
        // Another gateway claims it while it lives: nobody's, counted once.
        assert!(!indices.learn(learned(other, 2), now, now, &counters));
        assert!(!indices.learn(learned(other, 2), now, now, &counters));
        assert_eq!(indices.of_session(7, other, now), None);
        assert_eq!(counters.index_collisions.get(), 1);
    }

    #[test]
    fn the_indices_taken_in_since_a_mark_are_told_once() {
        let counters = Metrics::new().listener("test");
        let mut indices = Indices::new(NonZeroUsize::new(8).expect("non-zero"));
        let learned = |index, port| Learned {
            index,
            client: SocketAddr::from(([192, 0, 2, 1], port)),
            gateway: GatewayId(1),
            address: "10.0.0.1:51820".parse().unwrap(),
        };
        let now = 1_000 * S;
        assert_eq!(indices.learned_after(0, now), (0, Vec::new()));
        indices.learn(learned(1, 1000), now - 10 * S, now, &counters);
        indices.learn(learned(2, 1001), now, now, &counters);
        let (mark, mut all) = indices.learned_after(0, now);
        all.sort_by_key(|(l, _)| l.index);
        let told = |index, age_ms| SessionIndex { index, age_ms };
        assert_eq!(
            all,
            vec![
                (learned(1, 1000), told(1, 10_000)),
                (learned(2, 1001), told(2, 0))
            ]
        );
        assert_eq!(indices.learned_after(mark, now), (mark, Vec::new()));
        // Learned again (a refresh) or anew: told again, the rest not.
        indices.learn(learned(2, 1001), now, now, &counters);
        let (next, again) = indices.learned_after(mark, now);
        assert_eq!(again, vec![(learned(2, 1001), told(2, 0))]);
        assert!(next > mark);
        // An index that no longer routes (collided, or expired) is not told.
        indices.learn(learned(3, 1002), now - 200 * S, now, &counters);
        let (last, none) = indices.learned_after(next, now);
        assert_eq!(none, Vec::new());
        // Taken in twice since: told once. Asked after an older mark (a restarted asker): the
        // whole table answers, not only what the journal holds.
        indices.learn(learned(4, 1003), now, now, &counters);
        indices.learn(learned(4, 1003), now, now, &counters);
        let (_, twice) = indices.learned_after(last, now);
        assert_eq!(twice, vec![(learned(4, 1003), told(4, 0))]);
        let (_, mut everything) = indices.learned_after(0, now);
        everything.sort_by_key(|(l, _)| l.index);
        let indices_told: Vec<u32> = everything.iter().map(|(l, _)| l.index).collect();
        assert_eq!(indices_told, vec![1, 2, 4]);
    }

    #[test]
    fn a_journal_that_overflows_gives_way_to_one_scan() {
        let counters = Metrics::new().listener("test");
        let mut indices = Indices::new(NonZeroUsize::new(JOURNAL_ROOM).expect("non-zero"));
        let now = 1_000 * S;
        let (mark, _) = indices.learned_after(0, now);
        for index in 0..=JOURNAL_ROOM as u32 {
            let learned = Learned {
                index,
                client: SocketAddr::from(([192, 0, 2, 1], 1)),
                gateway: GatewayId(1),
                address: "10.0.0.1:51820".parse().unwrap(),
            };
            indices.learn(learned, now, now, &counters);
        }
        assert!(indices.journal.is_none());
        let (_, all) = indices.learned_after(mark, now);
        assert_eq!(all.len(), JOURNAL_ROOM + 1);
        assert!(indices.journal.is_some());
    }
}
