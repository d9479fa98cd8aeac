//! The program's per-CPU counters, read into the same metrics the userspace datapath feeds.

use super::*;
use crate::events::EventKind;
use wglb_common::handshake::{RTT_BOUNDS_US, RTT_BUCKETS};

impl FastPath {
    /// Adds what the program counted since the last read to the balancer's metrics.
    pub(super) fn read_counters(&mut self) -> anyhow::Result<()> {
        let counters = self.program.counters(self.listeners.len() as u32)?;
        let mut seen = std::mem::take(&mut self.counters_seen);
        seen.resize(counters.slots().len(), 0);
        for (slot, (&value, seen)) in counters.slots().iter().zip(seen.iter_mut()).enumerate() {
            let delta = value.saturating_sub(*seen);
            *seen = value;
            if delta > 0 {
                self.count(slot, delta);
            }
        }
        self.counters_seen = seen;
        for (slot_index, slot) in self.gateways.iter_mut() {
            let now = self.program.traffic(*slot_index)?;
            let before = std::mem::replace(&mut slot.traffic_seen, now);
            let c = &slot.counters;
            c.packets_to_gateway.inc_by(
                now.packets_to_gateway
                    .saturating_sub(before.packets_to_gateway),
            );
            c.bytes_to_gateway
                .inc_by(now.bytes_to_gateway.saturating_sub(before.bytes_to_gateway));
            c.packets_to_client.inc_by(
                now.packets_to_client
                    .saturating_sub(before.packets_to_client),
            );
            c.bytes_to_client
                .inc_by(now.bytes_to_client.saturating_sub(before.bytes_to_client));
            c.initiations
                .inc_by(now.initiations.saturating_sub(before.initiations));
            c.responses
                .inc_by(now.responses.saturating_sub(before.responses));
            c.cookies.inc_by(now.cookies.saturating_sub(before.cookies));
            c.sessions_created
                .inc_by(now.sessions_created.saturating_sub(before.sessions_created));
            c.unreachable
                .inc_by(now.unreachable.saturating_sub(before.unreachable));
            for bucket in 0..RTT_BUCKETS {
                // The last bucket has no bound: its round trips count past the last one.
                let bound_us = RTT_BOUNDS_US.get(bucket).copied().unwrap_or(u64::MAX);
                let at =
                    (bound_us as f64 / 1e6).min(2.0 * RTT_BOUNDS_US[RTT_BUCKETS - 2] as f64 / 1e6);
                for _ in 0..now.rtt_buckets[bucket].saturating_sub(before.rtt_buckets[bucket]) {
                    c.handshake_rtt.observe(at);
                }
            }
        }
        Ok(())
    }

    /// Counts `delta` of counter slot `slot` (see `counter_slot`) in the metric it belongs to.
    pub(super) fn count(&self, slot: usize, delta: u64) {
        let row = slot / XdpCounter::COUNT as usize;
        let counter = XdpCounter::ALL[slot % XdpCounter::COUNT as usize];
        let (listener, direction) = match row {
            0 => (None, Direction::ToGateway),
            row => (
                self.listeners.get((row - 1) / 2),
                if (row - 1) % 2 == 0 {
                    Direction::ToGateway
                } else {
                    Direction::ToClient
                },
            ),
        };
        let name = listener.map_or("", |l| l.name.as_str());
        let drop = |reason: DropReason| self.metrics.dropped(name, direction, reason).inc_by(delta);
        use XdpCounter::*;
        match (counter, listener) {
            // Per gateway, from the traffic map.
            (ToGateway | ToClient | SessionCreated, _) => {}
            (JunkTruncated | JunkUnknownType | JunkReservedNotZero | JunkBadLength, Some(l)) => {
                let junk = wglb_common::wireguard::Junk::ALL
                    .into_iter()
                    .find(|j| XdpCounter::junk(*j) == counter)
                    .expect("a junk counter");
                l.counters.junk(direction, junk).inc_by(delta);
            }
            (Malformed, Some(_)) => drop(DropReason::Malformed),
            (BadMac1, Some(_)) => drop(DropReason::BadMac1),
            (RetiredTuple, Some(l)) => l.counters.retired_tuple.inc_by(delta),
            (IndexCollision, Some(l)) => l.counters.index_collisions.inc_by(delta),
            (Rebound, Some(l)) => l.counters.eviction(EvictionReason::Rebound).inc_by(delta),
            (SourceRate | SourceUnconfirmed, Some(l)) => {
                let refusal = Refusal::ALL
                    .into_iter()
                    .find(|r| XdpCounter::refusal(*r) == counter)
                    .expect("a refusal counter");
                l.counters.refused(refusal).inc_by(delta);
                // Counters are read once a second: one event per reason at most as often.
                let event = EventKind::SessionsRefused {
                    reason: refusal,
                    count: delta,
                };
                self.events.publish(&l.name, "", event);
            }
            (SessionConfirmed, Some(l)) => l.counters.confirmed.inc_by(delta),
            (ClientPathChanged, Some(l)) => l.counters.client_path_changes.inc_by(delta),
            (NatReclaimed, _) => self.metrics.nat_drift(NatDrift::Reclaimed).inc_by(delta),
            (NoGateway, Some(l)) => l.counters.no_gateway.inc_by(delta),
            (NatPortsExhausted, Some(_)) => drop(DropReason::NatPortsExhausted),
            (StaleNat, Some(_)) => drop(DropReason::StaleSession),
            (RedirectFailed, Some(_)) => drop(DropReason::SendFailed),
            (GatewayGone, Some(l)) => l
                .counters
                .eviction(EvictionReason::GatewayGone)
                .inc_by(delta),
            (counter, _) => self
                .metrics
                .xdp_passed(name, counter.as_str())
                .inc_by(delta),
        }
    }
}
