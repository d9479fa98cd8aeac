//! A session's life, decided once for both datapaths: when it ends and why ([`fate`]), when peers
//! are told of it ([`announce_due`]), how its end is counted and announced ([`Evictions`]), and
//! how the sessions a datapath holds are listed to the API ([`SessionStore`], [`list`],
//! [`snapshot`]). The userspace relay keeps its sessions in [`crate::session::SessionTable`]s
//! with their sockets, the XDP fast path in the program's maps; both ask these functions what to
//! do and do it with their own means.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::events::{EventBus, EventKind};
use crate::metrics::ListenerCounters;
use crate::query::{self, SessionFilter, SessionInfo, SessionPage};
use crate::rebinding::SessionIndex;
use crate::session::{probation_idle, EvictionReason};
use crate::sync::SyncOut;

/// Where a session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// This balancer forwards it and its gateway has answered.
    Confirmed,
    /// This balancer forwards it; its gateway has not answered yet (probation).
    Unconfirmed,
    /// A peer balancer's session, held in case its client's traffic comes here.
    Standby,
}

impl Standing {
    /// Only a balancer's own confirmed sessions are told to its peers: unconfirmed ones may be a
    /// flood's, and standby entries are the peers' own to announce.
    pub fn synced(self) -> bool {
        self == Standing::Confirmed
    }
}

/// What a sweep does with a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Keep,
    Evict(EvictionReason),
}

/// A session's fate at a sweep: it goes if its gateway no longer keeps sessions (down, moved or
/// removed), or once it has been idle for its idle timeout: the listener's for confirmed and
/// standby sessions, [`probation_idle`] for unconfirmed ones.
pub fn fate(standing: Standing, keeps: bool, idle: Duration, idle_timeout: Duration) -> Fate {
    if !keeps {
        return Fate::Evict(EvictionReason::GatewayGone);
    }
    match standing {
        Standing::Unconfirmed if idle >= probation_idle(idle_timeout) => {
            Fate::Evict(EvictionReason::Unconfirmed)
        }
        Standing::Confirmed | Standing::Standby if idle >= idle_timeout => {
            Fate::Evict(EvictionReason::Idle)
        }
        _ => Fate::Keep,
    }
}

/// Whether a session is announced to peers at this sweep: a confirmed session not announced yet
/// (or announced on another gateway), and one with traffic since the last refresh when a refresh
/// is due ([`crate::sync::refresh_interval`]), so that its standby copies do not expire while it
/// lives.
pub fn announce_due(
    standing: Standing,
    announced: bool,
    refresh_due: bool,
    active_since_refresh: bool,
) -> bool {
    standing.synced() && (!announced || refresh_due && active_since_refresh)
}

/// Sessions that ended, counted per gateway and reason, then told at once: to the listener's
/// eviction counters, as one event per gateway and reason, and to peers for the ones they were
/// told of.
#[derive(Default)]
pub struct Evictions {
    per_gateway: HashMap<(String, EvictionReason), u64>,
}

impl Evictions {
    /// `client`'s session on `gateway` ended for `reason`; `synced`: its peers hold a copy.
    pub fn record(
        &mut self,
        sync: &SyncOut,
        client: SocketAddr,
        gateway: &str,
        reason: EvictionReason,
        synced: bool,
    ) {
        if synced {
            sync.evicted(client);
        }
        *self
            .per_gateway
            .entry((gateway.to_string(), reason))
            .or_default() += 1;
    }

    /// How many were recorded.
    pub fn total(&self) -> u64 {
        self.per_gateway.values().sum()
    }

    /// Counts and announces what was recorded.
    pub fn publish(self, listener: &str, counters: &ListenerCounters, events: &EventBus) {
        for ((gateway, reason), count) in self.per_gateway {
            counters.eviction(reason).inc_by(count);
            events.publish(
                listener,
                &gateway,
                EventKind::SessionsEvicted { reason, count },
            );
        }
    }
}

/// One session as a datapath holds it, for the API.
pub struct Held<'a> {
    pub client: SocketAddr,
    pub gateway: &'a str,
    pub gateway_address: SocketAddr,
    pub idle_ms: u64,
    pub standing: Standing,
    /// The peer a standby entry came from.
    pub synced_from: Option<&'a str>,
    pub index: Option<SessionIndex>,
    /// The userspace datapath's shard that holds it; None in the XDP program.
    pub shard: Option<usize>,
}

impl Held<'_> {
    fn info(&self) -> SessionInfo {
        SessionInfo {
            client: self.client,
            gateway: self.gateway.to_string(),
            gateway_address: self.gateway_address,
            idle_ms: self.idle_ms,
            synced_from: self.synced_from.map(str::to_string),
            index: self.index,
            shard: self.shard,
        }
    }
}

/// Where a datapath keeps its sessions, as the API's answers read them: the userspace relay's
/// tables, a read of the XDP program's maps.
pub trait SessionStore {
    /// Every session held, in no particular order.
    fn held(&self) -> Box<dyn Iterator<Item = Held<'_>> + '_>;
}

/// A page of the sessions `filter` matches, in client-address order after `after`; only the
/// page's sessions are described (a table may hold a million).
pub fn list(
    store: &impl SessionStore,
    filter: &SessionFilter,
    after: Option<SocketAddr>,
    limit: usize,
) -> SessionPage {
    let matching = store
        .held()
        .filter(|held| filter.matches(&held.client, held.gateway))
        .map(|held| (held.client, held));
    let (chosen, more, total) = query::page(matching, after, limit);
    SessionPage {
        sessions: chosen.iter().map(|(_, held)| held.info()).collect(),
        more,
        total,
    }
}

/// Every session this balancer tells its peers of (its own, confirmed), in one pass.
pub fn snapshot(store: &impl SessionStore) -> Vec<SessionInfo> {
    store
        .held()
        .filter(|held| held.standing.synced())
        .map(|held| held.info())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn a_sessions_fate() {
        let idle_timeout = 3 * MINUTE;
        for standing in [
            Standing::Confirmed,
            Standing::Unconfirmed,
            Standing::Standby,
        ] {
            assert_eq!(
                fate(standing, false, Duration::ZERO, idle_timeout),
                Fate::Evict(EvictionReason::GatewayGone)
            );
            assert_eq!(
                fate(standing, true, Duration::ZERO, idle_timeout),
                Fate::Keep
            );
        }
        // Unconfirmed sessions leave probation after 30 s without a packet; others last the
        // idle timeout.
        let half_minute = Duration::from_secs(30);
        assert_eq!(
            fate(Standing::Unconfirmed, true, half_minute, idle_timeout),
            Fate::Evict(EvictionReason::Unconfirmed)
        );
        assert_eq!(
            fate(Standing::Confirmed, true, half_minute, idle_timeout),
            Fate::Keep
        );
        assert_eq!(
            fate(Standing::Standby, true, idle_timeout, idle_timeout),
            Fate::Evict(EvictionReason::Idle)
        );
        // Never longer in probation than the idle timeout.
        let short = Duration::from_secs(5);
        assert_eq!(
            fate(Standing::Unconfirmed, true, short, short),
            Fate::Evict(EvictionReason::Unconfirmed)
        );
    }

    #[test]
    fn only_own_confirmed_sessions_are_announced_new_and_then_when_refreshed() {
        assert!(announce_due(Standing::Confirmed, false, false, false));
        assert!(!announce_due(Standing::Confirmed, true, false, true));
        assert!(announce_due(Standing::Confirmed, true, true, true));
        assert!(!announce_due(Standing::Confirmed, true, true, false));
        for standing in [Standing::Unconfirmed, Standing::Standby] {
            assert!(!announce_due(standing, false, true, true));
        }
    }

    struct Fixed(Vec<(u16, &'static str, Standing)>);

    impl SessionStore for Fixed {
        fn held(&self) -> Box<dyn Iterator<Item = Held<'_>> + '_> {
            Box::new(self.0.iter().map(|&(port, gateway, standing)| Held {
                client: SocketAddr::from(([192, 0, 2, 1], port)),
                gateway,
                gateway_address: "10.0.0.1:51820".parse().unwrap(),
                idle_ms: 0,
                standing,
                synced_from: (standing == Standing::Standby).then_some("lb-b"),
                index: None,
                shard: None,
            }))
        }
    }

    #[test]
    fn listed_in_order_and_snapshots_hold_only_what_peers_are_told() {
        let store = Fixed(vec![
            (3, "gw1", Standing::Confirmed),
            (1, "gw2", Standing::Unconfirmed),
            (2, "gw1", Standing::Standby),
            (4, "gw2", Standing::Confirmed),
        ]);
        let page = list(&store, &SessionFilter::default(), None, 2);
        let ports: Vec<u16> = page.sessions.iter().map(|s| s.client.port()).collect();
        assert_eq!((ports, page.more, page.total), (vec![1, 2], true, 4));
        assert_eq!(page.sessions[1].synced_from.as_deref(), Some("lb-b"));
        let on_gw2 = SessionFilter {
            gateway: Some("gw2".into()),
            ..SessionFilter::default()
        };
        let after_first = Some(SocketAddr::from(([192, 0, 2, 1], 1)));
        let page = list(&store, &on_gw2, after_first, 10);
        assert_eq!(page.sessions.len(), 1);
        assert_eq!((page.sessions[0].client.port(), page.total), (4, 2));
        let own: Vec<u16> = snapshot(&store).iter().map(|s| s.client.port()).collect();
        assert_eq!(own, vec![3, 4]);
    }
}
