//! Questions to a listener's datapath about the sessions it holds, and orders to evict some. The
//! datapath owns its session table; the API asks through a [`SessionRequest`] channel and the
//! datapath answers between batches, so no lock is ever taken on the packet path.
//!
//! Listing is paged in client-address order, which stays stable while sessions come and go: a
//! page token is the last client returned, and the next page starts after it.

use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::rebinding::SessionIndex;
use crate::sync::{Applied, SyncStep};

/// Which sessions a request is about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionFilter {
    /// Pinned to the gateway of this name.
    pub gateway: Option<String>,
    pub client: Option<ClientMatch>,
}

/// A client address, or every port of a client IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientMatch {
    Ip(IpAddr),
    Exact(SocketAddr),
}

impl std::str::FromStr for ClientMatch {
    type Err = String;

    fn from_str(text: &str) -> Result<ClientMatch, String> {
        if let Ok(address) = text.parse::<SocketAddr>() {
            return Ok(ClientMatch::Exact(address));
        }
        text.parse::<IpAddr>()
            .map(ClientMatch::Ip)
            .map_err(|_| format!("`{text}` is neither an IP nor IP:PORT (IPv6 as [addr]:port)"))
    }
}

impl SessionFilter {
    /// Whether a session of `client` on `gateway` matches.
    pub fn matches(&self, client: &SocketAddr, gateway: &str) -> bool {
        let client_ok = match self.client {
            None => true,
            Some(ClientMatch::Ip(ip)) => client.ip() == ip,
            Some(ClientMatch::Exact(address)) => *client == address,
        };
        client_ok && self.gateway.as_deref().is_none_or(|g| g == gateway)
    }
}

/// One session as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub client: SocketAddr,
    pub gateway: String,
    pub gateway_address: SocketAddr,
    pub idle_ms: u64,
    /// The peer a standby entry was synced from; None for this balancer's own sessions.
    pub synced_from: Option<String>,
    /// The receiver index its gateway chose last, while it is the session's.
    pub index: Option<SessionIndex>,
    /// The userspace datapath's shard that holds it; None in the XDP program.
    pub shard: Option<usize>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct SessionPage {
    pub sessions: Vec<SessionInfo>,
    /// More matching sessions follow the last one returned.
    pub more: bool,
    /// Every matching session, across pages.
    pub total: u64,
}

pub enum SessionRequest {
    /// Sessions per gateway name.
    Count {
        reply: oneshot::Sender<HashMap<String, u64>>,
    },
    /// Up to `limit` matching sessions with client addresses after `after`, in order.
    List {
        filter: SessionFilter,
        after: Option<SocketAddr>,
        limit: usize,
        reply: oneshot::Sender<SessionPage>,
    },
    /// Every session this balancer forwards and has confirmed (what peers are told of), read in
    /// one pass: a resync at a million sessions must not read the table once per page.
    Snapshot {
        reply: oneshot::Sender<Vec<SessionInfo>>,
    },
    /// Evicts the matching sessions; answers how many.
    Evict {
        filter: SessionFilter,
        reply: oneshot::Sender<u64>,
    },
    /// Moves `gateway`'s sessions that can be moved (`crate::agents`) to where placement puts
    /// them now; answers how many moved and how many stayed.
    Move {
        gateway: String,
        reply: oneshot::Sender<Moved>,
    },
    /// Applies a step of a peer's session sync stream.
    Sync {
        peer: Arc<str>,
        step: SyncStep,
        reply: oneshot::Sender<Applied>,
    },
    /// The receiver indices the userspace datapath took in (from its reply paths, or from sync
    /// peers) after its mark `after` (0: all it holds), for the XDP program in front of it: a
    /// session it relayed is the program's from the client's next packet on, index included.
    Indices {
        after: u64,
        reply: oneshot::Sender<IndicesAfter>,
    },
}

/// What [`SessionRequest::Move`] answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    pub moved: u64,
    pub stayed: u64,
}

impl std::ops::AddAssign for Moved {
    fn add_assign(&mut self, other: Moved) {
        self.moved += other.moved;
        self.stayed += other.stayed;
    }
}

/// Asks a listener's datapath (or whatever answers for it); `None` if it is gone.
pub async fn ask<T>(
    datapath: &mpsc::Sender<SessionRequest>,
    request: impl FnOnce(oneshot::Sender<T>) -> SessionRequest,
) -> Option<T> {
    let (reply, answer) = oneshot::channel();
    datapath.send(request(reply)).await.ok()?;
    answer.await.ok()
}

/// What [`SessionRequest::Indices`] answers.
#[derive(Debug, Default)]
pub struct IndicesAfter {
    /// The mark to ask after next time.
    pub mark: u64,
    pub indices: Vec<KnownIndex>,
}

/// A receiver index and the session that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownIndex {
    pub client: SocketAddr,
    pub gateway: String,
    pub gateway_address: SocketAddr,
    pub index: SessionIndex,
}

pub type SessionRequests = mpsc::Sender<SessionRequest>;

/// One page of matching sessions, chosen without sorting them all: a bounded heap keeps the
/// `limit + 1` smallest client addresses after the cursor, so a page of a million-session table
/// costs one pass, `limit` entries of memory, and nothing for sessions that do not make the page
/// (callers filter before and describe only the page after). Returns the page in order, whether
/// more follow, and how many entries there were.
pub fn page<T>(
    entries: impl Iterator<Item = (SocketAddr, T)>,
    after: Option<SocketAddr>,
    limit: usize,
) -> (Vec<(SocketAddr, T)>, bool, u64) {
    let mut total = 0u64;
    let mut smallest: BinaryHeap<ByClient<T>> = BinaryHeap::with_capacity(limit + 1);
    for (client, entry) in entries {
        total += 1;
        if after.is_some_and(|cursor| client <= cursor) {
            continue;
        }
        // Keep one more than a page, to know whether another page follows. Once the heap is
        // full most entries are beyond its largest and cost one comparison.
        if smallest.len() > limit {
            if smallest.peek().is_some_and(|top| client >= top.0) {
                continue;
            }
            smallest.pop();
        }
        smallest.push(ByClient(client, entry));
    }
    let mut chosen: Vec<(SocketAddr, T)> = smallest.into_iter().map(|e| (e.0, e.1)).collect();
    chosen.sort_by_key(|(client, _)| *client);
    let more = chosen.len() > limit;
    chosen.truncate(limit);
    (chosen, more, total)
}

/// Orders entries by client address, largest first, so the heap's top is the one to drop.
/// One page out of two pages of the same request to two holders of sessions (the XDP program's
/// table and the userspace datapath's): the first `limit` in client order. A client in both
/// (briefly, while the program takes over from userspace) is listed once, as `first` has it, but
/// counts twice in the total.
pub fn merge_pages(first: SessionPage, second: SessionPage, limit: usize) -> SessionPage {
    let mut sessions = first.sessions;
    let known: std::collections::HashSet<SocketAddr> = sessions.iter().map(|s| s.client).collect();
    sessions.extend(
        second
            .sessions
            .into_iter()
            .filter(|s| !known.contains(&s.client)),
    );
    sessions.sort_by_key(|s| s.client);
    let more = first.more || second.more || sessions.len() > limit;
    sessions.truncate(limit);
    SessionPage {
        sessions,
        more,
        total: first.total + second.total,
    }
}

struct ByClient<T>(SocketAddr, T);

impl<T> PartialEq for ByClient<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl<T> Eq for ByClient<T> {}
impl<T> PartialOrd for ByClient<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for ByClient<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(n: u16) -> Vec<SessionInfo> {
        // Deliberately out of order.
        (0..n)
            .rev()
            .map(|i| SessionInfo {
                client: SocketAddr::from(([192, 0, 2, (i % 7) as u8], 1000 + i)),
                gateway: format!("gw{}", i % 3),
                gateway_address: "10.0.0.1:51820".parse().unwrap(),
                idle_ms: 0,
                synced_from: None,
                index: None,
                shard: None,
            })
            .collect()
    }

    fn matching<'a>(
        all: &'a [SessionInfo],
        filter: &'a SessionFilter,
    ) -> impl Iterator<Item = (SocketAddr, &'a SessionInfo)> {
        all.iter()
            .filter(|s| filter.matches(&s.client, &s.gateway))
            .map(|s| (s.client, s))
    }

    #[test]
    fn pages_cover_every_session_once_in_order() {
        let all = sessions(100);
        let filter = SessionFilter::default();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (chosen, more, total) = page(matching(&all, &filter), after, 7);
            assert_eq!(total, 100);
            seen.extend(chosen.iter().map(|(client, _)| *client));
            if !more {
                break;
            }
            after = chosen.last().map(|(client, _)| *client);
        }
        let mut expected: Vec<SocketAddr> = all.iter().map(|s| s.client).collect();
        expected.sort();
        assert_eq!(seen, expected);
    }

    #[test]
    fn filters_by_gateway_and_client() {
        let all = sessions(30);
        let by_gateway = SessionFilter {
            gateway: Some("gw1".into()),
            ..SessionFilter::default()
        };
        let (chosen, _, total) = page(matching(&all, &by_gateway), None, 100);
        assert_eq!(total, 10);
        assert!(chosen.iter().all(|(_, s)| s.gateway == "gw1"));
        let ip: IpAddr = "192.0.2.3".parse().unwrap();
        let by_ip = SessionFilter {
            client: Some(ClientMatch::Ip(ip)),
            ..SessionFilter::default()
        };
        let (chosen, _, total) = page(matching(&all, &by_ip), None, 100);
        assert!(total > 0 && chosen.iter().all(|(client, _)| client.ip() == ip));
        let exact: ClientMatch = "192.0.2.3:1003".parse().unwrap();
        let one = SessionFilter {
            client: Some(exact),
            ..SessionFilter::default()
        };
        assert_eq!(page(matching(&all, &one), None, 100).2, 1);
        assert!("nonsense".parse::<ClientMatch>().is_err());
    }

    #[test]
    fn merged_pages_list_each_client_once_in_order() {
        let all = sessions(30);
        let filter = SessionFilter::default();
        let (xdp, user): (Vec<_>, Vec<_>) = all.iter().partition(|s| s.client.port() % 2 == 0);
        // One client held by both: listed once, as the first holder has it.
        let mut user: Vec<&SessionInfo> = user;
        let mut twin = xdp[0].clone();
        twin.gateway = "elsewhere".into();
        user.push(&twin);
        let page_of = |held: &[&SessionInfo], after, limit| {
            let (chosen, more, total) = page(
                held.iter()
                    .filter(|s| filter.matches(&s.client, &s.gateway))
                    .map(|s| (s.client, (*s).clone())),
                after,
                limit,
            );
            SessionPage {
                sessions: chosen.into_iter().map(|(_, s)| s).collect(),
                more,
                total,
            }
        };
        let mut expected: Vec<SocketAddr> = all.iter().map(|s| s.client).collect();
        expected.sort();
        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let merged = merge_pages(page_of(&xdp, after, 7), page_of(&user, after, 7), 7);
            assert_eq!(merged.total, 31);
            assert!(merged.sessions.len() <= 7);
            for s in &merged.sessions {
                if s.client == twin.client {
                    assert_ne!(s.gateway, "elsewhere");
                }
            }
            listed.extend(merged.sessions.iter().map(|s| s.client));
            if !merged.more {
                break;
            }
            after = listed.last().copied();
        }
        assert_eq!(listed, expected);
    }
}
