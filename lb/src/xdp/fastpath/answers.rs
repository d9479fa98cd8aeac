//! The API's questions about the program's sessions, answered together with the userspace
//! datapath behind it (`crate::lifecycle` lists both the same way).

use super::pins::ListenerPins;
use super::*;
use crate::lifecycle::{self, Evictions, Held, SessionStore};
use crate::query::ask;

impl FastPath {
    pub(super) async fn answer(
        &mut self,
        index: usize,
        request: SessionRequest,
        slow_path: &mpsc::Sender<SessionRequest>,
    ) {
        match request {
            SessionRequest::Count { reply } => {
                let mut counts = ask(slow_path, |reply| SessionRequest::Count { reply })
                    .await
                    .unwrap_or_default();
                for slot in self.gateways.values().filter(|s| s.listener == index) {
                    *counts.entry(slot.name.clone()).or_default() += slot.sessions.max(0) as u64;
                }
                let _ = reply.send(counts);
            }
            SessionRequest::List {
                filter,
                after,
                limit,
                reply,
            } => {
                let slow = ask(slow_path, |reply| SessionRequest::List {
                    filter: filter.clone(),
                    after,
                    limit,
                    reply,
                })
                .await
                .unwrap_or_default();
                let fast = lifecycle::list(&self.read(index), &filter, after, limit);
                let _ = reply.send(query::merge_pages(fast, slow, limit));
            }
            SessionRequest::Evict { filter, reply } => {
                let slow = ask(slow_path, |reply| SessionRequest::Evict {
                    filter: filter.clone(),
                    reply,
                })
                .await
                .unwrap_or(0);
                let matching: Vec<(Table, FlowKey, Session)> = self
                    .read(index)
                    .sessions
                    .into_iter()
                    .filter(|(_, key, session)| {
                        let name = self
                            .gateways
                            .get(&session.gateway)
                            .map_or("", |s| s.name.as_str());
                        filter.matches(&address_of(key.client), name)
                    })
                    .collect();
                let mut ended = Evictions::default();
                for (table, key, session) in matching {
                    if self.program.remove_session(table, &key, &session).is_ok() {
                        let name = self
                            .gateways
                            .get(&session.gateway)
                            .map_or("", |s| s.name.as_str());
                        let synced = self.announced.remove(&key).is_some();
                        let listener = &self.listeners[index];
                        let client = address_of(key.client);
                        ended.record(
                            &listener.sync,
                            client,
                            name,
                            EvictionReason::Operator,
                            synced,
                        );
                    }
                }
                let pinned: Vec<(SocketAddr, Option<Arc<str>>)> = self.listeners[index]
                    .pins
                    .iter()
                    .filter(|(client, pin)| {
                        let name = self.gateways.get(&pin.slot).map_or("", |s| s.name.as_str());
                        filter.matches(client, name)
                    })
                    .map(|(client, pin)| (*client, pin.peer.clone()))
                    .collect();
                for (client, peer) in pinned {
                    self.unpin(index, peer.as_deref(), client);
                }
                let listener = &self.listeners[index];
                let total = slow + ended.total();
                ended.publish(&listener.name, &listener.counters, &self.events);
                tracing::info!(listener = %listener.name, evicted = total, "XDP and userspace sessions evicted through the API");
                let _ = reply.send(total);
            }
            SessionRequest::Snapshot { reply } => {
                let mut own = ask(slow_path, |reply| SessionRequest::Snapshot { reply })
                    .await
                    .unwrap_or_default();
                own.extend(lifecycle::snapshot(&self.read(index)));
                let _ = reply.send(own);
            }
            SessionRequest::Indices { after, reply } => {
                // The userspace datapath's own question: only the program asks it.
                let answer = ask(slow_path, |reply| SessionRequest::Indices { after, reply }).await;
                let _ = reply.send(answer.unwrap_or_default());
            }
            SessionRequest::Move { gateway, reply } => {
                let mut moved = ask(slow_path, |reply| SessionRequest::Move {
                    gateway: gateway.clone(),
                    reply,
                })
                .await
                .unwrap_or_default();
                let slots: Vec<u32> = self
                    .gateways
                    .iter()
                    .filter(|(slot, s)| {
                        s.listener == index && s.name == gateway && !self.retired.contains(slot)
                    })
                    .map(|(&slot, _)| slot)
                    .collect();
                moved += self.rehome(index, &slots);
                let _ = reply.send(moved);
            }
            SessionRequest::Sync { peer, step, reply } => {
                // The userspace datapath keeps them too, for clients the program passes to it
                // (one whose gateway's next hop is not resolved yet).
                let applied = sync::apply(&mut ListenerPins { fast: self, index }, &peer, &step);
                let _ = ask(slow_path, |reply| SessionRequest::Sync {
                    peer,
                    step,
                    reply,
                })
                .await;
                let _ = reply.send(applied);
            }
        }
    }

    /// Listener `index`'s sessions as the program holds them now, both tables read once.
    pub(super) fn read(&self, index: usize) -> MapRead<'_> {
        let mut sessions = Vec::new();
        for table in [Table::Confirmed, Table::Unconfirmed] {
            match self.program.sessions(table) {
                Ok(read) => sessions.extend(
                    read.into_iter()
                        .filter(|(key, _)| key.listener as usize == index)
                        .map(|(key, session)| (table, key, session)),
                ),
                Err(e) => tracing::warn!("cannot read the XDP session table: {e:#}"),
            }
        }
        let indices = self.program.indices(index as u32).unwrap_or_else(|e| {
            tracing::warn!("cannot read the XDP receiver indices: {e:#}");
            HashMap::new()
        });
        MapRead {
            sessions,
            indices,
            gateways: &self.gateways,
            now_ns: coarse_now_ns(),
        }
    }
}

/// A read of the program's sessions of one listener, as the API's answers list them.
pub(super) struct MapRead<'a> {
    sessions: Vec<(Table, FlowKey, Session)>,
    /// The listener's receiver indices.
    indices: HashMap<u32, IndexEntry>,
    gateways: &'a HashMap<u32, GatewaySlot>,
    now_ns: u64,
}

impl SessionStore for MapRead<'_> {
    fn held(&self) -> Box<dyn Iterator<Item = Held<'_>> + '_> {
        Box::new(self.sessions.iter().filter_map(|(table, key, session)| {
            let slot = self.gateways.get(&session.gateway)?;
            Some(Held {
                client: address_of(key.client),
                gateway: &slot.name,
                gateway_address: slot.address,
                idle_ms: self.now_ns.saturating_sub(session.last_seen_ns) / 1_000_000,
                standing: table.standing(),
                synced_from: None,
                index: session_index(key, session, self.indices.get(&session.index), self.now_ns),
                shard: None,
            })
        }))
    }
}
