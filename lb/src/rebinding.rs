//! The userspace datapath's receiver indices (`wglb_common::index` decides; the XDP program
//! keeps the same in its INDICES and RETIRED maps): which gateway and session chose each index,
//! and the source tuples a rebinding retired.

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

/// Whose an index is.
#[derive(Clone, Copy, Debug)]
struct Owner {
    client: SocketAddr,
    gateway: GatewayId,
    address: SocketAddr,
    collided: bool,
    learned_ns: u64,
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

/// A new source tuple routed by the index its datagram carries: to that session's gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rebinding {
    pub index: u32,
    /// The tuple whose session learned the index, retired once the gateway answers the new one.
    pub old: SocketAddr,
    pub gateway: GatewayId,
    pub address: SocketAddr,
}

pub struct Indices {
    owners: LruCache<u32, Owner>,
    /// Retired tuples, and when (ns, `crate::session::now_ns`).
    retired: LruCache<SocketAddr, u64>,
}

impl Indices {
    /// Room for `sessions` sessions' indices (a session has one or two live at a time).
    pub fn new(sessions: NonZeroUsize) -> Indices {
        let retired = NonZeroUsize::new(wglb_common::xdp::MAX_RETIRED as usize).expect("non-zero");
        Indices {
            owners: LruCache::new(sessions.saturating_mul(NonZeroUsize::new(2).expect("non-zero"))),
            retired: LruCache::new(retired),
        }
    }

    pub fn learn(&mut self, learned: Learned, now_ns: u64, counters: &ListenerCounters) {
        let held = self.owners.peek(&learned.index).map(Owner::held);
        let collided = match learn(held, learned.gateway.0, now_ns) {
            Learn::Take => false,
            Learn::Collide if held.is_some_and(|h| h.collided) => return,
            Learn::Collide => {
                counters.index_collisions.inc();
                true
            }
        };
        self.owners.put(
            learned.index,
            Owner {
                client: learned.client,
                gateway: learned.gateway,
                address: learned.address,
                collided,
                learned_ns: now_ns,
            },
        );
    }

    /// Where a datagram from `client`, which has no session, goes by the index it carries, if
    /// anywhere: `alive(old, gateway)` says whether the session the index was learned on still
    /// lives on that gateway.
    pub fn route(
        &self,
        client: SocketAddr,
        datagram: &[u8],
        placement: &Placement,
        now_ns: u64,
        alive: impl Fn(SocketAddr, GatewayId) -> bool,
    ) -> Option<Rebinding> {
        let offset = receiver_offset(classify(datagram).ok()?)?;
        let header: &[u8; 12] = datagram.get(..12)?.try_into().ok()?;
        let index = index_at(header, offset);
        let owner = self.owners.peek(&index)?;
        let keeps = placement.keeps(owner.gateway, owner.address);
        (owner.client != client
            && routes(owner.held(), keeps, now_ns)
            && alive(owner.client, owner.gateway))
        .then_some(Rebinding {
            index,
            old: owner.client,
            gateway: owner.gateway,
            address: owner.address,
        })
    }

    /// The rebound tuple `client` is confirmed: the index is its own from now on, and what
    /// still comes from the old tuple is dropped for a while.
    pub fn retire(&mut self, rebinding: &Rebinding, client: SocketAddr, now_ns: u64) {
        if let Some(owner) = self.owners.peek_mut(&rebinding.index) {
            if owner.client == rebinding.old {
                owner.client = client;
            }
        }
        self.retired.put(rebinding.old, now_ns);
    }

    pub fn retired(&self, client: &SocketAddr, now_ns: u64) -> bool {
        self.retired
            .peek(client)
            .is_some_and(|at| now_ns.saturating_sub(*at) < RETIRED_FOR_NS)
    }
}
