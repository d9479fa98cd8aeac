//! State changes, published as they happen for whoever follows them (the API's event stream).
//! Publishing never waits: with nobody listening an event is simply dropped, and a follower that
//! falls behind is told how many it missed instead of slowing the balancer down.

use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::pool::{AdminState, Health};
use crate::session::EvictionReason;
use wglb_common::admission::Refusal;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    GatewayHealth {
        health: Health,
        source: String,
        detail: String,
    },
    GatewayState {
        state: AdminState,
        weight: u32,
    },
    GatewayAdded,
    GatewayRemoved,
    SessionsEvicted {
        reason: EvictionReason,
        count: u64,
    },
    /// New sessions that admission refused since the last such event (at most one a second per
    /// listener and reason).
    SessionsRefused {
        reason: Refusal,
        count: u64,
    },
    /// `count` sessions of the gateway moved to other gateways, whose agents were ordered to
    /// call their clients (`crate::agents`).
    SessionsMoved {
        count: u64,
    },
    ConfigReloaded,
    ConfigRefused {
        why: String,
    },
    /// Every source reporting on a gateway went silent (`active`), or one came back.
    FailStatic {
        active: bool,
    },
    /// No active gateway of a listener is up and health is ignored (`active`), or one is again.
    FailingOpen {
        active: bool,
    },
    /// This balancer started or stopped announcing `address` to the routers (`crate::announce`).
    Route {
        address: std::net::IpAddr,
        announced: bool,
        why: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub at: SystemTime,
    /// Empty for balancer-wide events (reloads).
    pub listener: String,
    /// Empty for listener-wide events.
    pub gateway: String,
    pub kind: EventKind,
}

/// How many events a slow follower may fall behind before it starts missing some.
const BACKLOG: usize = 4096;

#[derive(Clone)]
pub struct EventBus {
    sender: broadcast::Sender<Event>,
}

impl EventBus {
    pub fn new() -> EventBus {
        EventBus {
            sender: broadcast::channel(BACKLOG).0,
        }
    }

    pub fn publish(&self, listener: &str, gateway: &str, kind: EventKind) {
        // An error only means nobody follows right now.
        let _ = self.sender.send(Event {
            at: SystemTime::now(),
            listener: listener.to_string(),
            gateway: gateway.to_string(),
            kind,
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new()
    }
}
