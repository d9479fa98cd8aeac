//! Sessions pinned in the program, so that it places their clients on the gateway their
//! WireGuard session is on rather than where its own placement would: peers' sessions (the sync
//! layer's [`sync::Standbys`] for the XDP datapath), and the sessions the userspace datapath
//! relayed before the program served their address.

use super::plans::wanted_addresses;
use super::*;
use crate::query::{ask, SessionRequest};

impl FastPath {
    /// Drops `peer`'s pin of `client` (`None`: a relayed session's), if it is `peer`'s.
    pub(super) fn unpin(&mut self, index: usize, peer: Option<&str>, client: SocketAddr) {
        let pins = &mut self.listeners[index].pins;
        if pins
            .get(&client)
            .is_some_and(|pin| pin.peer.as_deref() == peer)
        {
            pins.remove(&client);
            let _ = self.program.unpin(&flow_key(index, client));
        }
    }

    /// Pins the sessions the userspace datapath forwards for each listener about to be served on
    /// an address it was not (a floating address that just arrived): until then userspace
    /// relayed its clients, and the program would place each anew at its next packet, where a
    /// gateway that joined meanwhile moves some (to a gateway without their WireGuard session).
    pub(super) async fn pin_relayed_sessions(
        &mut self,
        slow_paths: &[mpsc::Sender<SessionRequest>],
        local: &[IpAddr],
    ) {
        for (index, slow_path) in slow_paths.iter().enumerate() {
            let Some(listener) = self.listeners.get(index) else {
                continue;
            };
            let gaining = listener.served
                && wanted_addresses(listener, local)
                    .iter()
                    .any(|a| !listener.addresses.contains(a));
            if !gaining {
                continue;
            }
            let Some(relayed) = ask(slow_path, |reply| SessionRequest::Snapshot { reply }).await
            else {
                continue;
            };
            let now = coarse_now_ns();
            let mut pinned = 0;
            for session in relayed {
                let key = flow_key(index, session.client);
                if self.listeners[index].pins.contains_key(&session.client)
                    || self.program.session(&key).is_some()
                {
                    continue;
                }
                let slot = self.gateways.iter().find(|(_, s)| {
                    s.listener == index
                        && s.keeps
                        && s.name == session.gateway
                        && s.address == session.gateway_address
                });
                let Some((&slot, _)) = slot else {
                    continue;
                };
                if let Err(e) = self.program.pin(&key, slot) {
                    tracing::warn!("cannot pin a relayed session in the XDP program: {e:#}");
                    continue;
                }
                let pin = Pin {
                    slot,
                    peer: None,
                    seen_ns: now.saturating_sub(session.idle_ms * 1_000_000),
                };
                self.listeners[index].pins.insert(session.client, pin);
                pinned += 1;
            }
            if pinned > 0 {
                tracing::info!(listener = %self.listeners[index].name, pinned, "pinned the sessions userspace relayed on their gateways before the program serves a new address");
            }
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
            .filter(|(_, pin)| pin.peer.as_deref() == Some(peer))
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
            peer: Some(peer.clone()),
            seen_ns: coarse_now_ns().saturating_sub(idle_ms * 1_000_000),
        };
        self.fast.listeners[self.index].pins.insert(client, pin);
        true
    }

    fn release(&mut self, peer: &str, client: SocketAddr) {
        self.fast.unpin(self.index, Some(peer), client);
    }

    fn resyncs(&mut self) -> &mut Resyncs {
        &mut self.fast.listeners[self.index].resyncs
    }
}
