//! Re-homing the program's sessions of gateways that stop keeping them (`crate::agents`): each
//! session whose client's key the old gateway's agent reported moves, in the program's own
//! table, to the gateway placement picks now, with a NAT port of its own there, and that
//! gateway's agent is ordered to start a handshake to the session's new path. The userspace
//! datapath does the same for the sessions it holds (`crate::datapath`).

use super::*;
use crate::events::EventKind;
use crate::query::Moved;

/// NAT ports tried for a moved session, from one derived from the client onwards: the program
/// itself tries [`wglb_common::xdp::NAT_PROBES`]; a port taken meanwhile only costs one more try.
const PORT_TRIES: u32 = 64;

impl FastPath {
    /// Moves listener `index`'s confirmed sessions on `losing` (slots about to stop keeping
    /// their sessions, or drained ones whose sessions are to move) where their clients can be
    /// called, to a gateway other than their own.
    pub(super) fn rehome(&mut self, index: usize, losing: &[u32]) -> Moved {
        let mut outcome = Moved::default();
        if losing.is_empty() {
            return outcome;
        }
        let sessions = match self.program.sessions(Table::Confirmed) {
            Ok(sessions) => sessions,
            Err(e) => {
                tracing::warn!("cannot read the XDP session table to re-home sessions: {e:#}");
                return outcome;
            }
        };
        let listener = &self.listeners[index];
        let name = listener.name.clone();
        let plan = listener.plan.clone();
        let mut moved_from: HashMap<String, u64> = HashMap::new();
        for (key, session) in sessions {
            if key.listener as usize != index || !losing.contains(&session.gateway) {
                continue;
            }
            outcome.stayed += 1;
            let Some(old) = self.gateways.get(&session.gateway) else {
                continue;
            };
            let old_name = old.name.clone();
            let Some(old_path) = old.path else {
                continue;
            };
            let endpoint = SocketAddr::new(old_path.source, u16::from_be_bytes(session.nat_port));
            let Some(public_key) = self.agents.key_behind(&name, &old.name, endpoint) else {
                continue;
            };
            let client = address_of(key.client);
            let Some(new) = plan.placement.place(client) else {
                continue;
            };
            let slot = self.gateways.iter().find(|(slot_index, s)| {
                s.listener == index
                    && s.id == new.id
                    && s.address == new.address
                    && !self.retired.contains(slot_index)
            });
            let Some((&new_slot, new_gateway)) = slot.filter(|(&s, _)| s != session.gateway) else {
                continue;
            };
            let Some(new_path) = new_gateway.path else {
                continue;
            };
            if !self.agents.takes_orders(&name, &new_gateway.name) {
                continue;
            }
            let new_name = new_gateway.name.clone();
            let Some(port) = self.take_nat_port(new_slot, &key) else {
                tracing::warn!(listener = %name, %client, gateway = %new_name, "no free NAT port to re-home a session on");
                continue;
            };
            let moved = Session {
                gateway: new_slot,
                nat_port: port.to_be_bytes(),
                indexed: 0,
                index: 0,
                last_seen_ns: coarse_now_ns(),
                handshake: Default::default(),
                rebinding: 0,
                rebind_index: 0,
                ..session
            };
            // The old port first: while the session exists, the program takes its port from
            // nobody, and once the session has moved it is no longer the port's owner.
            let written = self
                .program
                .remove_nat_of(&nat_key(&session), &key)
                .and_then(|_| self.program.set_session(Table::Confirmed, &key, &moved));
            if let Err(e) = written {
                tracing::warn!(listener = %name, %client, "cannot move an XDP session: {e:#}");
                let _ = self.program.remove_nat_of(&nat_key(&moved), &key);
                continue;
            }
            let path = SocketAddr::new(new_path.source, port);
            self.agents.order(&name, &new_name, public_key, path);
            outcome.moved += 1;
            outcome.stayed -= 1;
            *moved_from.entry(old_name).or_default() += 1;
            tracing::info!(listener = %name, %client, gateway = %new_name, %path, "re-homed an XDP session: its new gateway's agent is to call the client");
        }
        for (gateway, count) in moved_from {
            self.events
                .publish(&name, &gateway, EventKind::SessionsMoved { count });
        }
        outcome
    }

    /// A NAT port of gateway `slot` for session `key`, taken in the NAT map (which the program
    /// then leaves alone), or None if every port tried is someone else's.
    fn take_nat_port(&mut self, slot: u32, key: &FlowKey) -> Option<u16> {
        let first = u32::from(*self.nat_ports.start());
        let count = u32::from(*self.nat_ports.end()) - first + 1;
        let start = u32::from(u16::from_be_bytes(key.client.port)) % count;
        (0..PORT_TRIES.min(count)).find_map(|try_| {
            let port = (first + (start + try_) % count) as u16;
            let nat = NatKey {
                gateway: slot,
                nat_port: port.to_be_bytes(),
                pad: [0; 2],
            };
            matches!(self.program.restore_nat(&nat, key), Ok(true)).then_some(port)
        })
    }
}
