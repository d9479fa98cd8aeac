//! The sweep: the program's sessions through their lifecycle (`crate::lifecycle`): what ends,
//! what peers are told, and the maps held to each other (NAT entries, admission budgets, pins).

use super::*;
use crate::lifecycle::{announce_due, fate, Evictions, Fate, Standing};

impl FastPath {
    /// Ends the sessions whose [`fate`] says so, counts the rest per gateway, announces
    /// confirmed sessions to peers (and those that went), puts right any drift between the
    /// session and NAT maps, recounts each source's unconfirmed sessions, and frees the indices
    /// of retired gateways.
    pub(super) fn sweep(&mut self) {
        let started = Instant::now();
        // NAT first: an entry read here whose session the later reads do not find had lost it.
        let read = self.program.nat_entries().and_then(|nat| {
            Ok((
                nat,
                self.program.sessions(Table::Confirmed)?,
                self.program.sessions(Table::Unconfirmed)?,
            ))
        });
        let (nat, confirmed, unconfirmed) = match read {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!("cannot read the XDP session tables: {e:#}");
                return;
            }
        };
        let now = coarse_now_ns();
        let handshake_now = monotonic_now_ns();
        let mut waiting: Vec<Waiting> = self.listeners.iter().map(|_| Waiting::new()).collect();
        let mut counts: HashMap<u32, i64> = HashMap::new();
        let mut ended: Vec<Evictions> = self
            .listeners
            .iter()
            .map(|_| Evictions::default())
            .collect();
        let refresh_due: Vec<bool> = self
            .listeners
            .iter()
            .map(|l| {
                let every = sync::refresh_interval(l.plan.idle_timeout).as_nanos() as u64;
                l.sync.enabled() && now.saturating_sub(l.refreshed_at_ns) >= every
            })
            .collect();
        // Sessions that stay, with the NAT entry each owns.
        let mut live: HashMap<FlowKey, (Table, Session)> = HashMap::new();
        let mut unconfirmed_per_listener = vec![0i64; self.listeners.len()];
        let mut unconfirmed_per_source: HashMap<FlowKey, u32> = HashMap::new();
        let sessions = confirmed
            .iter()
            .map(|(key, session)| (Table::Confirmed, key, session))
            .chain(
                unconfirmed
                    .iter()
                    .map(|(key, session)| (Table::Unconfirmed, key, session)),
            );
        for (table, key, session) in sessions {
            let index = key.listener as usize;
            let Some(listener) = self.listeners.get(index) else {
                continue;
            };
            let slot = self
                .gateways
                .get(&session.gateway)
                .filter(|s| s.listener == index);
            let keeps = slot.is_some_and(|s| s.keeps);
            let idle = Duration::from_nanos(now.saturating_sub(session.last_seen_ns));
            let standing = table.standing();
            let client = address_of(key.client);
            match (
                fate(standing, keeps, idle, listener.plan.idle_timeout),
                slot,
            ) {
                (Fate::Keep, Some(slot)) => {
                    *counts.entry(session.gateway).or_default() += 1;
                    if let Some(waited) = session.handshake.waiting(handshake_now) {
                        let waited = Duration::from_nanos(waited);
                        passive::note(&mut waiting[index], &slot.name, client.ip(), waited);
                    }
                    live.insert(*key, (table, *session));
                    if standing == Standing::Unconfirmed {
                        unconfirmed_per_listener[index] += 1;
                        *unconfirmed_per_source.entry(key.source()).or_default() += 1;
                        continue;
                    }
                    // Told of on another gateway, or with another index, counts as not told:
                    // a new index reaches the peers at the next sweep.
                    let told = (
                        session.gateway,
                        (session.indexed != 0).then_some(session.index),
                    );
                    let announced = self.announced.get(key) == Some(&told);
                    let active = session.last_seen_ns >= listener.refreshed_at_ns;
                    if listener.sync.enabled()
                        && announce_due(standing, announced, refresh_due[index], active)
                    {
                        let idle_ms = idle.as_millis() as u64;
                        let indexed = told.1.and_then(|index| {
                            self.program.index(&IndexKey {
                                listener: key.listener,
                                index,
                            })
                        });
                        let index = session_index(key, session, indexed.as_ref(), now);
                        listener
                            .sync
                            .upsert(client, &slot.name, slot.address, idle_ms, index);
                        self.announced.insert(*key, told);
                    }
                }
                (fate, slot) => {
                    let reason = match fate {
                        Fate::Evict(reason) => reason,
                        Fate::Keep => EvictionReason::GatewayGone,
                    };
                    if let Err(e) = self.program.remove_session(table, key, session) {
                        tracing::warn!("cannot remove an XDP session: {e:#}");
                        continue;
                    }
                    let synced = self.announced.remove(key).is_some();
                    let name = slot.map_or("", |s| s.name.as_str());
                    ended[index].record(&listener.sync, client, name, reason, synced);
                }
            }
        }
        // Announced sessions gone without this sweep: pushed out of the LRU map, or evicted by
        // the program itself (their gateway stopped keeping them).
        let listeners = &self.listeners;
        self.announced.retain(|key, _| {
            let kept = live.get(key).is_some_and(|(t, _)| *t == Table::Confirmed);
            if !kept {
                if let Some(listener) = listeners.get(key.listener as usize) {
                    listener.sync.evicted(address_of(key.client));
                }
            }
            kept
        });
        for (listener, due) in self.listeners.iter_mut().zip(refresh_due) {
            if due {
                listener.refreshed_at_ns = now;
            }
        }
        // Added, not set: the userspace datapath behind the program adds its own.
        for (listener, count) in self.listeners.iter_mut().zip(unconfirmed_per_listener) {
            let before = std::mem::replace(&mut listener.unconfirmed_counted, count);
            listener.counters.unconfirmed.add(count - before);
        }
        self.put_nat_right(&nat, &live);
        self.recount_sources(&unconfirmed_per_source);
        self.expire_pins(&live, now);
        for ((listener, ended), waiting) in self.listeners.iter().zip(ended).zip(waiting) {
            ended.publish(&listener.name, &listener.counters, &self.events);
            self.board.post(&listener.name, Part::Xdp, waiting);
        }
        for (slot_index, slot) in self.gateways.iter_mut() {
            let count = counts.get(slot_index).copied().unwrap_or(0);
            slot.counters.sessions.add(count - slot.sessions);
            slot.sessions = count;
        }
        if !self.retired.is_empty() {
            // Their last traffic first: the indices are about to be reset.
            if let Err(e) = self.read_counters() {
                tracing::warn!("cannot read the XDP program's counters: {e:#}");
            }
        }
        for slot_index in std::mem::take(&mut self.retired) {
            if let Err(e) = self.program.reset_traffic(slot_index) {
                tracing::warn!("cannot reset a gateway's XDP traffic counters: {e:#}");
            }
            if let Some(slot) = self.gateways.remove(&slot_index) {
                let listener = &self.listeners[slot.listener].name;
                // Unless a gateway of the same name took over (a moved gateway).
                if !self
                    .gateways
                    .values()
                    .any(|s| s.listener == slot.listener && s.name == slot.name)
                {
                    self.metrics.set_xdp_ready(listener, &slot.name, None);
                }
            }
            self.free.push(slot_index);
        }
        self.last_sweep = started.elapsed();
        self.swept_at = Instant::now();
    }

    /// Holds the NAT map to the sessions: every NAT entry belongs to a live session that uses
    /// it, and every live session has its entry. `nat` was read before `live`; whatever looks
    /// wrong is read again before it is changed, since the program keeps working meanwhile.
    pub(super) fn put_nat_right(
        &mut self,
        nat: &[(NatKey, FlowKey)],
        live: &HashMap<FlowKey, (Table, Session)>,
    ) {
        let uses = |owner: &FlowKey, entry: &NatKey, program: &XdpProgram| {
            let session = match live.get(owner) {
                Some((_, session)) => Some(*session),
                None => program.session(owner).map(|(_, session)| session),
            };
            session.is_some_and(|s| nat_key(&s) == *entry)
        };
        let mut owners: HashMap<NatKey, FlowKey> = HashMap::with_capacity(nat.len());
        for (entry, owner) in nat {
            if live.get(owner).is_some_and(|(_, s)| nat_key(s) == *entry) {
                owners.insert(*entry, *owner);
                continue;
            }
            if !uses(owner, entry, &self.program)
                && self.program.remove_nat_of(entry, owner).unwrap_or(false)
            {
                self.metrics.nat_drift(NatDrift::Orphaned).inc();
            }
        }
        for (key, (table, session)) in live {
            let entry = nat_key(session);
            if owners.get(&entry) == Some(key) {
                continue;
            }
            match self.program.nat_owner(&entry) {
                Some(owner) if owner == *key => {}
                None => {
                    if self.program.restore_nat(&entry, key).unwrap_or(false) {
                        self.metrics.nat_drift(NatDrift::Missing).inc();
                    }
                }
                Some(other) if uses(&other, &entry, &self.program) => {
                    // Two sessions on one port: the other's replies come to it. This one goes;
                    // its client's next packet places it again, on a port of its own.
                    if self.program.remove_session(*table, key, session).is_ok() {
                        self.metrics.nat_drift(NatDrift::Conflict).inc();
                        if self.announced.remove(key).is_some() {
                            if let Some(listener) = self.listeners.get(key.listener as usize) {
                                listener.sync.evicted(address_of(key.client));
                            }
                        }
                    }
                }
                Some(other) => {
                    // Held by a session that no longer uses it: ours again.
                    if self.program.remove_nat_of(&entry, &other).unwrap_or(false)
                        && self.program.restore_nat(&entry, key).unwrap_or(false)
                    {
                        self.metrics.nat_drift(NatDrift::Missing).inc();
                    }
                }
            }
        }
    }

    /// Sets every source's count of unconfirmed sessions to what PROBATION holds: the program
    /// cannot see the LRU push its sessions out, nor this sweep expire them.
    pub(super) fn recount_sources(&mut self, unconfirmed: &HashMap<FlowKey, u32>) {
        let sources = match self.program.sources() {
            Ok(sources) => sources,
            Err(e) => {
                tracing::warn!("cannot read the XDP admission budgets: {e:#}");
                return;
            }
        };
        for (source, budget) in sources {
            let count = unconfirmed.get(&source).copied().unwrap_or(0);
            if budget.unconfirmed != count {
                if let Err(e) = self.program.set_unconfirmed(&source, count) {
                    tracing::warn!("cannot correct an XDP admission budget: {e:#}");
                }
            }
        }
    }

    /// Drops pins whose session exists now (the program used them), whose gateway no longer
    /// keeps sessions, or that have been idle for the listener's idle timeout.
    pub(super) fn expire_pins(&mut self, live: &HashMap<FlowKey, (Table, Session)>, now: u64) {
        if self.listeners.iter().all(|l| l.pins.is_empty()) {
            return;
        }
        for (index, listener) in self.listeners.iter_mut().enumerate() {
            let idle_timeout = listener.plan.idle_timeout.as_nanos() as u64;
            let gateways = &self.gateways;
            let program = &mut self.program;
            listener.pins.retain(|client, pin| {
                let keep = !live.contains_key(&flow_key(index, *client))
                    && gateways
                        .get(&pin.slot)
                        .is_some_and(|s| s.keeps && s.listener == index)
                    && now.saturating_sub(pin.seen_ns) <= idle_timeout;
                if !keep {
                    let _ = program.unpin(&flow_key(index, *client));
                }
                keep
            });
        }
    }
}
