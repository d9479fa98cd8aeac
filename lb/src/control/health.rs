//! A gateway's health: the sources' fresh reports combined by quorum, the suspect stage before
//! eviction, and fail static when every source goes silent.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::events::EventKind;
use crate::health::{Observation, BUILTIN_SOURCE};
use crate::pool::Health;
use crate::quorum::{Verdict, Votes};

use super::ControlPlane;

/// Most health sources tracked at once: source names come from API clients, and each costs
/// metric series.
pub const MAX_HEALTH_SOURCES: usize = 16;
/// Longest a single report counts: a source that asks for more would freeze its word.
pub const MAX_REPORT_TTL: Duration = Duration::from_secs(600);

pub(super) struct GatewayHealth {
    /// The address the reports are about: a gateway that moves starts over as up.
    pub(super) address: SocketAddr,
    pub(super) votes: Votes,
    pub(super) health: Health,
    /// When it was last found down by quorum; a suspect turns down `eviction_delay` after.
    pub(super) since: Instant,
    pub(super) detail: String,
    /// Every source went silent and the last verdict is kept.
    pub(super) fail_static: bool,
}

impl GatewayHealth {
    fn new(address: SocketAddr, now: Instant) -> GatewayHealth {
        GatewayHealth {
            address,
            votes: Votes::default(),
            health: Health::Up,
            since: now,
            detail: String::new(),
            fail_static: false,
        }
    }
}

impl ControlPlane {
    /// Records one source's report at `now` and re-judges the gateway. Reports about unknown
    /// gateways, or about an address the gateway no longer has, are refused.
    pub fn observe(&mut self, observation: Observation, now: Instant) -> Result<(), String> {
        let listener = self
            .config
            .listener(&observation.listener)
            .ok_or_else(|| format!("no listener `{}`", observation.listener))?;
        let gateway = listener
            .gateways
            .iter()
            .find(|g| g.name == observation.gateway)
            .ok_or_else(|| {
                format!(
                    "listener `{}` has no gateway `{}`",
                    listener.name, observation.gateway
                )
            })?;
        if let Some(address) = observation.address {
            if address != gateway.address {
                return Err(format!(
                    "gateway `{}` is at {} now, not {address}",
                    gateway.name, gateway.address
                ));
            }
        }
        // The built-in checker is not counted: API clients must not be able to crowd it out.
        let sources = self.sources();
        if observation.source != BUILTIN_SOURCE
            && !sources.contains(&observation.source)
            && sources.iter().filter(|s| *s != BUILTIN_SOURCE).count() >= MAX_HEALTH_SOURCES
        {
            return Err(format!(
                "already {MAX_HEALTH_SOURCES} health sources report; `{}` is one too many",
                observation.source
            ));
        }
        let address = gateway.address;
        let (listener, name) = (listener.name.clone(), gateway.name.clone());
        let state = self.listeners.get_mut(&listener).expect("listener state");
        // A gateway's health about an older address was dropped when it moved (`forget_gone`).
        let entry = state
            .health
            .entry(name.clone())
            .or_insert_with(|| GatewayHealth::new(address, now));
        let ttl = match observation.ttl {
            Duration::ZERO => self.config.health.report_ttl,
            ttl => ttl.min(MAX_REPORT_TTL),
        };
        if observation.gone {
            entry
                .votes
                .record_gone(&observation.source, observation.detail, now, ttl);
        } else {
            entry.votes.record(
                &observation.source,
                observation.healthy,
                observation.detail,
                now,
                ttl,
            );
        }
        self.metrics.set_health_vote(
            &listener,
            &name,
            &observation.source,
            Some(observation.healthy),
        );
        self.judge(&listener, &name, now);
        Ok(())
    }

    /// Sources with a fresh report on any gateway.
    pub(super) fn sources(&self) -> BTreeSet<String> {
        self.listeners
            .values()
            .flat_map(|l| l.health.values())
            .flat_map(|h| h.votes.held().map(|(s, _)| s.to_string()))
            .collect()
    }

    /// Combines a gateway's fresh reports into its health, publishing the plan when it changed.
    fn judge(&mut self, listener: &str, gateway: &str, now: Instant) {
        let quorum = self.config.health.quorum;
        let delay = self.config.health.eviction_delay;
        let state = self.listeners.get_mut(listener).expect("listener state");
        let Some(entry) = state.health.get_mut(gateway) else {
            return;
        };
        let verdict = entry.votes.verdict(now, quorum);
        let silent = verdict == Verdict::Silent;
        if silent != entry.fail_static {
            entry.fail_static = silent;
            self.metrics.set_fail_static(listener, gateway, silent);
            if silent {
                tracing::warn!(%listener, %gateway, health = entry.health.as_str(), "every health source went silent: keeping the last verdict (fail static)");
            } else {
                tracing::info!(%listener, %gateway, "a health source reports again");
            }
            self.events
                .publish(listener, gateway, EventKind::FailStatic { active: silent });
        }
        let (health, detail) = match verdict {
            Verdict::Healthy | Verdict::Unwatched => {
                let fresh = entry.votes.held().count();
                (
                    Health::Up,
                    format!("{fresh} fresh report(s), fewer than {quorum} say down"),
                )
            }
            Verdict::Unhealthy(why) => {
                let health = match entry.health {
                    Health::Up if delay.is_zero() => Health::Down,
                    Health::Up => Health::Suspect,
                    settled => settled,
                };
                (health, why)
            }
            // Its data plane is gone: waiting out a suspect stage would only delay moving its
            // clients.
            Verdict::Gone(why) => (Health::Down, why),
            Verdict::Undecided(why) => (
                entry.health,
                format!("kept as {}: {why}", entry.health.as_str()),
            ),
            Verdict::Silent => (
                entry.health,
                format!(
                    "no fresh report: kept as {} (fail static)",
                    entry.health.as_str()
                ),
            ),
        };
        entry.detail = detail;
        if health == entry.health {
            return;
        }
        let previous = entry.health;
        entry.health = health;
        if previous == Health::Up {
            entry.since = now;
        }
        let detail = entry.detail.clone();
        match health {
            Health::Up => tracing::info!(%listener, %gateway, "gateway is up: {detail}"),
            Health::Suspect => {
                tracing::warn!(%listener, %gateway, "gateway reported down: no new sessions for it, and its sessions go in {delay:?} unless every gateway is down by then: {detail}")
            }
            Health::Down => {
                tracing::warn!(%listener, %gateway, "gateway is down, evicting its sessions: {detail}")
            }
        }
        let source = entry
            .votes
            .held()
            .filter(|(_, v)| v.healthy == (health == Health::Up))
            .map(|(s, _)| s.to_string())
            .collect::<Vec<_>>()
            .join(",");
        self.events.publish(
            listener,
            gateway,
            EventKind::GatewayHealth {
                health,
                source,
                detail,
            },
        );
        self.publish(listener);
    }

    /// Forgets reports past their time to live and turns suspects reported down at least the
    /// eviction delay ago into down gateways; returns when to call again, if ever.
    pub fn settle(&mut self, now: Instant) -> Option<Instant> {
        let delay = self.config.health.eviction_delay;
        let mut next: Option<Instant> = None;
        let mut soonest = |at: Instant| next = Some(next.map_or(at, |n: Instant| n.min(at)));
        let mut to_judge = Vec::new();
        let mut to_publish = Vec::new();
        for (listener, state) in self.listeners.iter_mut() {
            let mut changed = false;
            for (name, health) in state.health.iter_mut() {
                let expired = health.votes.expire(now);
                for source in &expired {
                    tracing::info!(%listener, gateway = %name, %source, "health source went silent: its last report no longer counts");
                    self.metrics.set_health_vote(listener, name, source, None);
                }
                if !expired.is_empty() {
                    to_judge.push((listener.clone(), name.clone()));
                }
                if let Some(at) = health.votes.next_expiry() {
                    soonest(at);
                }
                if health.health != Health::Suspect {
                    continue;
                }
                let due = health.since + delay;
                if due <= now {
                    health.health = Health::Down;
                    changed = true;
                    tracing::warn!(%listener, gateway = %name, "gateway still down after {delay:?}: its sessions are evicted unless every gateway is down");
                    self.events.publish(
                        listener,
                        name,
                        EventKind::GatewayHealth {
                            health: Health::Down,
                            source: String::new(),
                            detail: health.detail.clone(),
                        },
                    );
                } else {
                    soonest(due);
                }
            }
            if changed {
                to_publish.push(listener.clone());
            }
        }
        for listener in to_publish {
            self.publish(&listener);
        }
        for (listener, gateway) in to_judge {
            self.judge(&listener, &gateway, now);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::testing::*;

    #[tokio::test]
    async fn gateways_failing_together_fail_open_instead_of_evicting() {
        let (mut control, plan) = control(config(""));
        let t0 = Instant::now();
        // Both gateways are reported down a second apart (say, a sidecar's probes fail on both).
        control
            .observe(observation("a", "10.0.0.1:51820", false), t0)
            .unwrap();
        let t1 = t0 + Duration::from_secs(1);
        control
            .observe(observation("b", "10.0.0.2:51820", false), t1)
            .unwrap();
        control.settle(t1 + Duration::from_secs(2));
        let placement = &plan.borrow().placement;
        assert!(placement.failing_open());
        for g in placement.gateways() {
            assert!(
                placement.keeps(g.id, g.address),
                "{} lost its sessions",
                g.name
            );
        }
    }

    #[tokio::test]
    async fn a_zero_eviction_delay_evicts_at_once() {
        let mut config = config("");
        config.health.eviction_delay = Duration::ZERO;
        let (mut control, plan) = control(config);
        control
            .observe(observation("a", "10.0.0.1:51820", false), Instant::now())
            .unwrap();
        assert_eq!(health_of(&plan, "a"), Health::Down);
    }

    #[tokio::test]
    async fn a_quorum_of_fresh_sources_decides_and_silence_keeps_the_last_state() {
        let mut config = config("");
        config.health.quorum = 2;
        config.health.eviction_delay = Duration::ZERO;
        let (mut control, plan) = control(config);
        let t0 = Instant::now();
        control.observe(report("s1", "a", None, false), t0).unwrap();
        control.observe(report("s2", "a", None, true), t0).unwrap();
        assert_eq!(health_of(&plan, "a"), Health::Up, "one of two is no quorum");
        let t1 = t0 + Duration::from_secs(1);
        control.observe(report("s2", "a", None, false), t1).unwrap();
        assert_eq!(health_of(&plan, "a"), Health::Down, "two of two");
        // s1's report runs out at t0 + 3 s: one fresh source saying down backs no verdict with a
        // quorum of two, so a stays down rather than coming back because its watchers die.
        let t3 = t0 + Duration::from_secs(3);
        assert_eq!(control.settle(t3), Some(t1 + Duration::from_secs(3)));
        assert_eq!(health_of(&plan, "a"), Health::Down);
        // s1 comes back saying up: one down of two fresh is no quorum.
        control.observe(report("s1", "a", None, true), t3).unwrap();
        assert_eq!(health_of(&plan, "a"), Health::Up);
        control.observe(report("s1", "a", None, false), t3).unwrap();
        assert_eq!(health_of(&plan, "a"), Health::Down);
        // Both fall silent: the gateway stays down (fail static) instead of coming back.
        control.settle(t3 + Duration::from_secs(10));
        assert_eq!(health_of(&plan, "a"), Health::Down);
        let snapshot = control.snapshot();
        let a = &snapshot.listeners[0].gateways[0];
        assert!(a.fail_static && a.votes.is_empty(), "{a:?}");
        assert!(snapshot.sources.is_empty());
    }

    #[tokio::test]
    async fn health_sources_are_bounded() {
        let (mut control, _plan) = control(config(""));
        let now = Instant::now();
        for i in 0..MAX_HEALTH_SOURCES {
            control
                .observe(report(&format!("s{i}"), "a", None, true), now)
                .unwrap();
        }
        let refused = control.observe(report("one-more", "a", None, true), now);
        assert!(refused.unwrap_err().contains("too many"));
    }
}
