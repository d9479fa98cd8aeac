//! Peers' sessions, pinned in the program: the sync layer's [`sync::Standbys`] for the XDP
//! datapath.

use super::*;

impl FastPath {
    /// Drops `peer`'s pin of `client`, if it is `peer`'s.
    pub(super) fn unpin(&mut self, index: usize, peer: &str, client: SocketAddr) {
        let pins = &mut self.listeners[index].pins;
        if pins.get(&client).is_some_and(|pin| &*pin.peer == peer) {
            pins.remove(&client);
            let _ = self.program.unpin(&flow_key(index, client));
        }
    }
}

/// One listener's pins, as the sync layer applies a peer's stream to them.
pub(super) struct ListenerPins<'a> {
    pub(super) fast: &'a mut FastPath,
    pub(super) index: usize,
}

impl sync::Standbys for ListenerPins<'_> {
    fn held_for(&self, peer: &str) -> Vec<SocketAddr> {
        self.fast.listeners[self.index]
            .pins
            .iter()
            .filter(|(_, pin)| &*pin.peer == peer)
            .map(|(client, _)| *client)
            .collect()
    }

    /// Pins a peer's session; false if no gateway of this name and address keeps sessions here.
    /// The peer forwarded it last, so the program's own session of the client, if any, goes.
    fn hold(
        &mut self,
        peer: &Arc<str>,
        client: SocketAddr,
        gateway: &str,
        address: SocketAddr,
        idle_ms: u64,
        // The userspace datapath behind the program takes it in too, and the program adopts it
        // from there (`super::indices`).
        _index: Option<SessionIndex>,
    ) -> bool {
        let Some(slot) = self
            .fast
            .gateways
            .iter()
            .find(|(_, s)| {
                s.listener == self.index && s.keeps && s.name == gateway && s.address == address
            })
            .map(|(slot, _)| *slot)
        else {
            return false;
        };
        let key = flow_key(self.index, client);
        if let Some((table, session)) = self.fast.program.session(&key) {
            let _ = self.fast.program.remove_session(table, &key, &session);
            self.fast.announced.remove(&key);
        }
        if let Err(e) = self.fast.program.pin(&key, slot) {
            tracing::warn!("cannot pin a peer's session in the XDP program: {e:#}");
            return false;
        }
        let pin = Pin {
            slot,
            peer: peer.clone(),
            seen_ns: coarse_now_ns().saturating_sub(idle_ms * 1_000_000),
        };
        self.fast.listeners[self.index].pins.insert(client, pin);
        true
    }

    fn release(&mut self, peer: &str, client: SocketAddr) {
        self.fast.unpin(self.index, peer, client);
    }

    fn resyncs(&mut self) -> &mut Resyncs {
        &mut self.fast.listeners[self.index].resyncs
    }
}
