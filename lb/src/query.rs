//! Questions to a listener's datapath about the sessions it holds, and orders to evict some. The
//! datapath owns its session table; the API asks through a [`SessionRequest`] channel and the
//! datapath answers between batches, so no lock is ever taken on the packet path.
//!
//! Listing is paged in client-address order, which stays stable while sessions come and go: a
//! page token is the last client returned, and the next page starts after it.

use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};

use tokio::sync::{mpsc, oneshot};

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
    /// Evicts the matching sessions; answers how many.
    Evict {
        filter: SessionFilter,
        reply: oneshot::Sender<u64>,
    },
}

pub type SessionRequests = mpsc::Sender<SessionRequest>;

/// Selects one page from `sessions` (in any order) without sorting them all: a bounded heap keeps
/// the `limit + 1` smallest client addresses after the cursor, so a page of a million-session
/// table costs one pass and `limit` entries of memory.
pub fn page(
    sessions: impl Iterator<Item = SessionInfo>,
    filter: &SessionFilter,
    after: Option<SocketAddr>,
    limit: usize,
) -> SessionPage {
    let mut total = 0u64;
    let mut smallest: BinaryHeap<HeapEntry> = BinaryHeap::with_capacity(limit + 1);
    for session in sessions {
        if !filter.matches(&session.client, &session.gateway) {
            continue;
        }
        total += 1;
        if after.is_some_and(|cursor| session.client <= cursor) {
            continue;
        }
        smallest.push(HeapEntry(session));
        // Keep one more than a page, to know whether another page follows.
        if smallest.len() > limit + 1 {
            smallest.pop();
        }
    }
    let mut sessions: Vec<SessionInfo> = smallest.into_iter().map(|e| e.0).collect();
    sessions.sort_by_key(|s| s.client);
    let more = sessions.len() > limit;
    sessions.truncate(limit);
    SessionPage {
        sessions,
        more,
        total,
    }
}

/// Orders sessions by client address, largest first, so the heap's top is the one to drop.
struct HeapEntry(SessionInfo);

impl PartialEq for HeapEntry {
    fn eq(&self, other: &Self) -> bool {
        self.0.client == other.0.client
    }
}
impl Eq for HeapEntry {}
impl PartialOrd for HeapEntry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HeapEntry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.client.cmp(&other.0.client)
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
            })
            .collect()
    }

    #[test]
    fn pages_cover_every_session_once_in_order() {
        let all = sessions(100);
        let filter = SessionFilter::default();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = page(all.iter().cloned(), &filter, after, 7);
            assert_eq!(page.total, 100);
            seen.extend(page.sessions.iter().map(|s| s.client));
            if !page.more {
                break;
            }
            after = page.sessions.last().map(|s| s.client);
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
            client: None,
        };
        let page1 = page(all.iter().cloned(), &by_gateway, None, 100);
        assert_eq!(page1.total, 10);
        assert!(page1.sessions.iter().all(|s| s.gateway == "gw1"));
        let ip: IpAddr = "192.0.2.3".parse().unwrap();
        let by_ip = SessionFilter {
            gateway: None,
            client: Some(ClientMatch::Ip(ip)),
        };
        let page2 = page(all.iter().cloned(), &by_ip, None, 100);
        assert!(page2.total > 0 && page2.sessions.iter().all(|s| s.client.ip() == ip));
        let exact: ClientMatch = "192.0.2.3:1003".parse().unwrap();
        let one = SessionFilter {
            gateway: None,
            client: Some(exact),
        };
        assert_eq!(page(all.into_iter(), &one, None, 100).total, 1);
        assert!("nonsense".parse::<ClientMatch>().is_err());
    }
}
