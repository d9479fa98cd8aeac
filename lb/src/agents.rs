//! The gateway agents attached to this balancer: which client key each gateway's WireGuard
//! knows behind which of this balancer's upstream paths (what lets a dead gateway's sessions be
//! re-homed with a handshake the new gateway starts), and the way to send that gateway's agent
//! an order, paced.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::api::constant_time_eq;
use crate::config::AgentConfig;
use crate::metrics::Metrics;

/// Orders waiting for one gateway's agent beyond its pace; more are not sent (the sessions
/// then wait out WireGuard's own timer, as without an agent).
pub const ORDER_QUEUE: usize = 65_536;

/// How long a gateway's keys outlive its agent's stream: a host that dies takes its agent with
/// it, and the health checks that find it dead come seconds later; its sessions are re-homed by
/// what the agent reported last. Past this, sessions may have changed too much to trust it.
pub const KEYS_OUTLIVE_AGENT: Duration = Duration::from_secs(120);

/// One handshake order on its way to an agent.
#[derive(Clone, Debug)]
pub struct Order {
    pub id: u64,
    pub public_key: [u8; 32],
    /// This balancer's upstream path for the client, opened towards the new gateway.
    pub endpoint: SocketAddr,
    pub sent: Instant,
}

#[derive(Clone)]
pub struct Agents {
    inner: Arc<Mutex<Board>>,
    metrics: Metrics,
}

#[derive(Default)]
struct Board {
    configured: Vec<AgentConfig>,
    /// By (listener, gateway).
    attached: HashMap<(String, String), Attached>,
    /// The client key behind each of this balancer's upstream paths, as each gateway's agent
    /// reported last, and since when its agent is gone (if it is).
    keys: HashMap<(String, String), Known>,
    next_id: u64,
    /// Orders sent and not answered yet: (listener, gateway, sent).
    pending: HashMap<u64, (String, String, Instant)>,
}

struct Attached {
    /// Which attach holds it: a newer stream of the same agent replaces an older one.
    stream: u64,
    orders: mpsc::Sender<Order>,
}

#[derive(Default)]
struct Known {
    keys: HashMap<SocketAddr, [u8; 32]>,
    detached: Option<Instant>,
}

/// An attached agent's stream: dropped, it detaches (unless a newer stream replaced it).
pub struct Attachment {
    agents: Agents,
    pub listener: String,
    pub gateway: String,
    stream: u64,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let mut board = self.agents.lock();
        let key = (self.listener.clone(), self.gateway.clone());
        if board
            .attached
            .get(&key)
            .is_some_and(|a| a.stream == self.stream)
        {
            board.attached.remove(&key);
            if let Some(known) = board.keys.get_mut(&key) {
                known.detached = Some(Instant::now());
            }
            // Orders it had not answered will not be: the stream that would carry them is gone.
            board
                .pending
                .retain(|_, (listener, gateway, _)| (&*listener, &*gateway) != (&key.0, &key.1));
            self.agents
                .metrics
                .set_agent_attached(&self.listener, &self.gateway, false);
        }
    }
}

impl Agents {
    pub fn new(configured: Vec<AgentConfig>, metrics: Metrics) -> Agents {
        Agents {
            inner: Arc::new(Mutex::new(Board {
                configured,
                ..Board::default()
            })),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The configured agent whose token `given` is, read from its file now (a rotated token
    /// needs no restart).
    pub fn authenticate(&self, given: &str) -> Option<AgentConfig> {
        let configured = self.lock().configured.clone();
        configured.into_iter().find(|agent| {
            std::fs::read_to_string(&agent.token_file).is_ok_and(|token| {
                let token = token.trim();
                token.len() >= 16 && constant_time_eq(token.as_bytes(), given.as_bytes())
            })
        })
    }

    /// Registers `agent`'s stream; orders for its gateway go to `orders` from now on.
    pub fn attach(&self, agent: &AgentConfig, orders: mpsc::Sender<Order>) -> Attachment {
        let mut board = self.lock();
        board.next_id += 1;
        let stream = board.next_id;
        board.attached.insert(
            (agent.listener.clone(), agent.gateway.clone()),
            Attached { stream, orders },
        );
        self.metrics
            .set_agent_attached(&agent.listener, &agent.gateway, true);
        Attachment {
            agents: self.clone(),
            listener: agent.listener.clone(),
            gateway: agent.gateway.clone(),
            stream,
        }
    }

    /// The gateway's peers as its agent reported them last: (endpoint, key, latest handshake in
    /// unix ms). Two peers at one endpoint (a device that rotated its key leaves its old peer
    /// behind until Core removes it) resolve to the one with the latest handshake: the other's
    /// session is not the one this path carries.
    pub fn report(
        &self,
        attachment: &Attachment,
        peers: impl Iterator<Item = (SocketAddr, [u8; 32], u64)>,
    ) {
        let mut latest: HashMap<SocketAddr, ([u8; 32], u64)> = HashMap::new();
        for (endpoint, key, handshake) in peers {
            let held = latest.entry(endpoint).or_insert((key, handshake));
            if handshake > held.1 {
                *held = (key, handshake);
            }
        }
        let mut board = self.lock();
        let slot = (attachment.listener.clone(), attachment.gateway.clone());
        if board
            .attached
            .get(&slot)
            .is_none_or(|attached| attached.stream != attachment.stream)
        {
            return;
        }
        let keys: HashMap<SocketAddr, [u8; 32]> =
            latest.into_iter().map(|(e, (k, _))| (e, k)).collect();
        let known = board.keys.entry(slot).or_default();
        for (path, key) in &keys {
            if known.keys.get(path) != Some(key) {
                let key = crate::config::format_public_key(key);
                tracing::debug!(listener = %attachment.listener, gateway = %attachment.gateway, %path, %key, "the client key behind a path");
            }
        }
        self.metrics
            .set_agent_peers(&attachment.listener, &attachment.gateway, keys.len());
        *known = Known {
            keys,
            detached: None,
        };
    }

    /// The client key the gateway knows behind `endpoint` (one of this balancer's upstream
    /// paths), if its agent reported one, and not longer than [`KEYS_OUTLIVE_AGENT`] before it
    /// went.
    pub fn key_behind(
        &self,
        listener: &str,
        gateway: &str,
        endpoint: SocketAddr,
    ) -> Option<[u8; 32]> {
        let mut board = self.lock();
        let slot = (listener.to_string(), gateway.to_string());
        let known = board.keys.get(&slot)?;
        if known
            .detached
            .is_some_and(|at| at.elapsed() > KEYS_OUTLIVE_AGENT)
        {
            board.keys.remove(&slot);
            return None;
        }
        known.keys.get(&endpoint).copied()
    }

    /// Whether any gateway of `listener` has an agent attached (to take orders): without one, no
    /// session of it can be re-homed, and a datapath need not look.
    pub fn any_attached(&self, listener: &str) -> bool {
        self.lock().attached.keys().any(|(l, _)| l == listener)
    }

    /// Whether `gateway` has an agent to take orders.
    pub fn takes_orders(&self, listener: &str, gateway: &str) -> bool {
        self.lock()
            .attached
            .contains_key(&(listener.to_string(), gateway.to_string()))
    }

    /// Queues an order for `gateway`'s agent to start a handshake with the peer of `public_key`
    /// at `endpoint`; false if it has no agent or its queue is full.
    pub fn order(
        &self,
        listener: &str,
        gateway: &str,
        public_key: [u8; 32],
        endpoint: SocketAddr,
    ) -> bool {
        let mut board = self.lock();
        board.next_id += 1;
        let id = board.next_id;
        let sent = Instant::now();
        let queued = board
            .attached
            .get(&(listener.to_string(), gateway.to_string()))
            .is_some_and(|attached| {
                attached
                    .orders
                    .try_send(Order {
                        id,
                        public_key,
                        endpoint,
                        sent,
                    })
                    .is_ok()
            });
        let result = if queued {
            board
                .pending
                .insert(id, (listener.to_string(), gateway.to_string(), sent));
            "sent"
        } else {
            "unsent"
        };
        self.metrics.rehome_order(listener, gateway, result);
        queued
    }

    /// The agent's answer to order `id`: `error` empty when the client completed the handshake
    /// its new gateway started.
    pub fn answered(&self, id: u64, error: &str) {
        let Some((listener, gateway, sent)) = self.lock().pending.remove(&id) else {
            return;
        };
        let result = if error.is_empty() {
            "completed"
        } else {
            "failed"
        };
        self.metrics.rehome_order(&listener, &gateway, result);
        self.metrics
            .rehome_order_answered(&listener, &gateway, sent.elapsed().as_secs_f64());
        if !error.is_empty() {
            tracing::warn!(%listener, %gateway, order = id, "a re-homed client was not called back: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(gateway: &str) -> AgentConfig {
        AgentConfig {
            listener: "l".into(),
            gateway: gateway.into(),
            token_file: "/nonexistent".into(),
            orders_per_second: 10,
        }
    }

    #[test]
    fn a_path_shared_by_two_peers_belongs_to_the_one_that_handshook_last() {
        let agents = Agents::new(vec![agent("a")], Metrics::new());
        let (orders, _queued) = mpsc::channel(4);
        let attachment = agents.attach(&agent("a"), orders);
        let path: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let (old, new) = ([1; 32], [2; 32]);
        agents.report(
            &attachment,
            [(path, new, 2_000), (path, old, 1_000)].into_iter(),
        );
        assert_eq!(agents.key_behind("l", "a", path), Some(new));
        agents.report(
            &attachment,
            [(path, old, 1_000), (path, new, 2_000)].into_iter(),
        );
        assert_eq!(agents.key_behind("l", "a", path), Some(new));
        assert_eq!(agents.key_behind("l", "b", path), None);
    }

    #[test]
    fn a_gone_agents_keys_still_re_home_its_gateways_sessions() {
        let agents = Agents::new(vec![agent("a")], Metrics::new());
        let (orders, _queued) = mpsc::channel(4);
        let attachment = agents.attach(&agent("a"), orders);
        let path: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        agents.report(&attachment, [(path, [1; 32], 1_000)].into_iter());
        // The host dies, its agent with it.
        drop(attachment);
        assert!(!agents.takes_orders("l", "a"));
        assert_eq!(agents.key_behind("l", "a", path), Some([1; 32]));
        // Until it is too old to trust.
        agents.lock().keys.values_mut().for_each(|k| {
            k.detached = Instant::now().checked_sub(KEYS_OUTLIVE_AGENT + Duration::from_secs(1));
        });
        assert_eq!(agents.key_behind("l", "a", path), None);
    }

    #[test]
    fn orders_reach_the_latest_stream_and_stop_when_it_goes() {
        let agents = Agents::new(vec![agent("a")], Metrics::new());
        let path: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        assert!(!agents.order("l", "a", [1; 32], path), "no agent attached");
        let (first, mut first_queue) = mpsc::channel(4);
        let older = agents.attach(&agent("a"), first);
        let (second, mut second_queue) = mpsc::channel(4);
        let newer = agents.attach(&agent("a"), second);
        assert!(agents.order("l", "a", [1; 32], path));
        let order = second_queue.try_recv().expect("the newer stream has it");
        assert_eq!((order.public_key, order.endpoint), ([1; 32], path));
        assert!(first_queue.try_recv().is_err());
        // The older stream ending detaches nothing; the newer one's does.
        drop(older);
        assert!(agents.takes_orders("l", "a"));
        agents.answered(order.id, "");
        drop(newer);
        assert!(!agents.takes_orders("l", "a"));
        assert!(!agents.order("l", "a", [1; 32], path));
    }

    #[test]
    fn an_agent_is_known_by_its_token_file_read_at_attach() {
        let dir = std::env::temp_dir().join(format!("wglb-agents-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.token");
        let agent = AgentConfig {
            token_file: file.clone(),
            ..agent("a")
        };
        let agents = Agents::new(vec![agent], Metrics::new());
        let token = "a-token-of-at-least-16-chars";
        assert!(agents.authenticate(token).is_none(), "no file yet");
        std::fs::write(&file, format!("{token}\n")).unwrap();
        assert_eq!(
            agents.authenticate(token).map(|a| a.gateway),
            Some("a".into())
        );
        assert!(agents
            .authenticate("a-token-of-at-least-16-charx")
            .is_none());
        std::fs::write(&file, "short\n").unwrap();
        assert!(
            agents.authenticate("short").is_none(),
            "too short to be a token"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
