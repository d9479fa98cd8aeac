//! Receiver indices the userspace datapath behind the program took in (from handshakes it
//! relayed, before the program served a client's address or reached its gateway, and from sync
//! peers), adopted into the program's INDICES map: a session the program takes over from
//! userspace, or from a peer's pin, keeps its index (`crate::rebinding`).

use wglb_common::index::{learn, Learn};

use super::*;
use crate::query::ask;

impl FastPath {
    /// Takes in what each served listener's userspace datapath learned since last asked.
    pub(super) async fn adopt_relayed_indices(
        &mut self,
        slow_paths: &[mpsc::Sender<SessionRequest>],
    ) {
        for (index, slow_path) in slow_paths.iter().enumerate() {
            if !self.listeners.get(index).is_some_and(|l| l.served) {
                continue;
            }
            let after = self.listeners[index].relayed_indices_mark;
            let Some(answer) =
                ask(slow_path, |reply| SessionRequest::Indices { after, reply }).await
            else {
                continue;
            };
            self.listeners[index].relayed_indices_mark = answer.mark;
            for known in answer.indices {
                let slot = self.gateways.iter().find(|(_, s)| {
                    s.listener == index
                        && s.name == known.gateway
                        && s.address == known.gateway_address
                });
                if let Some((&slot, _)) = slot {
                    self.adopt_index(flow_key(index, known.client), slot, known.index);
                }
            }
        }
    }

    /// Session `key` on gateway `slot` holds `index`: the program routes by it as if it had
    /// learned it itself.
    fn adopt_index(&mut self, key: FlowKey, slot: u32, index: SessionIndex) {
        let at = IndexKey {
            listener: key.listener,
            index: index.index,
        };
        let now = coarse_now_ns();
        let held = self.program.index(&at).map(|e| e.held());
        let collided = match learn(held, slot, now) {
            Learn::Take => false,
            Learn::Collide => {
                let listener = &self.listeners[key.listener as usize];
                listener.counters.index_collisions.inc();
                true
            }
            Learn::Collided => return,
        };
        let entry = IndexEntry {
            client: key,
            gateway: slot,
            collided: collided as u32,
            learned_ns: index.learned_ns(now),
        };
        if let Err(e) = self.program.set_index(&at, &entry) {
            tracing::warn!("cannot add a receiver index to the XDP program: {e:#}");
        }
    }
}
