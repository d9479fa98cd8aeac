//! Combining health reports from several sources (the built-in checker, one or more sidecars)
//! into one verdict per gateway. Every report counts for its time to live only, so a source that
//! dies stops counting instead of freezing its last word; a gateway goes down only when a quorum
//! of fresh sources says so; and when the fresh sources cannot decide (every one is silent, or
//! some say down but fewer sources are left than the quorum) the caller keeps the last verdict
//! rather than guessing. Without that last rule, sources going silent one after another would
//! bring a dead gateway back: the first to expire breaks the quorum that took it down.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One source's latest report on one gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vote {
    pub healthy: bool,
    pub detail: String,
    pub at: Instant,
    pub expires: Instant,
    /// The gateway's own agent found its data plane gone: no quorum or delay is waited for.
    pub decisive: bool,
}

/// What the fresh reports on a gateway add up to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No fresh source reports it down, or a quorum of sources is fresh and fewer than a quorum
    /// of them report it down.
    Healthy,
    /// At least a quorum of fresh sources report it down; the detail is theirs.
    Unhealthy(String),
    /// A fresh decisive report (the gateway's agent: its WireGuard interface is gone) says
    /// down, whatever the others say.
    Gone(String),
    /// Some fresh sources report it down, but fewer sources are fresh than the quorum: neither
    /// verdict is backed, so the last one stands.
    Undecided(String),
    /// Sources have reported on it, but none is fresh now.
    Silent,
    /// No source ever reported on it: nothing to go by, so it is taken as up.
    Unwatched,
}

/// The reports on one gateway, by source.
#[derive(Clone, Debug, Default)]
pub struct Votes {
    by_source: BTreeMap<String, Vote>,
    /// Some source has reported at some point (so silence now means "lost sight", not
    /// "never watched").
    ever: bool,
}

impl Votes {
    pub fn record(
        &mut self,
        source: &str,
        healthy: bool,
        detail: String,
        now: Instant,
        ttl: Duration,
    ) {
        self.insert(source, healthy, detail, now, ttl, false);
    }

    /// A report of a gateway's data plane gone, from a source that sees it first hand.
    pub fn record_gone(&mut self, source: &str, detail: String, now: Instant, ttl: Duration) {
        self.insert(source, false, detail, now, ttl, true);
    }

    fn insert(
        &mut self,
        source: &str,
        healthy: bool,
        detail: String,
        now: Instant,
        ttl: Duration,
        decisive: bool,
    ) {
        self.ever = true;
        self.by_source.insert(
            source.to_string(),
            Vote {
                healthy,
                detail,
                at: now,
                expires: now + ttl,
                decisive,
            },
        );
    }

    /// Forgets the reports whose time to live has run out; returns their sources.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let stale: Vec<String> = self
            .by_source
            .iter()
            .filter(|(_, v)| v.expires <= now)
            .map(|(s, _)| s.clone())
            .collect();
        for source in &stale {
            self.by_source.remove(source);
        }
        stale
    }

    /// When the next report runs out, if any is held.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.by_source.values().map(|v| v.expires).min()
    }

    /// The reports held: fresh ones, and stale ones until [`Votes::expire`] drops them (the
    /// control plane calls it at every expiry, so stale ones are held only for an instant).
    pub fn held(&self) -> impl Iterator<Item = (&str, &Vote)> {
        self.by_source.iter().map(|(s, v)| (s.as_str(), v))
    }

    /// Combines the reports that are fresh at `now` (expire first to drop the others).
    pub fn verdict(&self, now: Instant, quorum: u32) -> Verdict {
        let fresh: Vec<(&str, &Vote)> = self.held().filter(|(_, v)| v.expires > now).collect();
        if fresh.is_empty() {
            return if self.ever {
                Verdict::Silent
            } else {
                Verdict::Unwatched
            };
        }
        if let Some((source, vote)) = fresh.iter().find(|(_, v)| v.decisive) {
            return Verdict::Gone(format!("{source}: {}", vote.detail));
        }
        let down: Vec<String> = fresh
            .iter()
            .filter(|(_, v)| !v.healthy)
            .map(|(source, v)| format!("{source}: {}", v.detail))
            .collect();
        let quorum = quorum as usize;
        if down.len() >= quorum {
            Verdict::Unhealthy(down.join("; "))
        } else if down.is_empty() || fresh.len() >= quorum {
            Verdict::Healthy
        } else {
            Verdict::Undecided(format!(
                "{} of {} fresh source(s) say down, and the quorum is {quorum}: {}",
                down.len(),
                fresh.len(),
                down.join("; ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    #[test]
    fn one_dissenter_does_not_make_a_quorum_of_two() {
        let t0 = Instant::now();
        let mut votes = Votes::default();
        assert_eq!(votes.verdict(t0, 2), Verdict::Unwatched);
        votes.record("sidecar-a", false, "handshake timed out".into(), t0, TTL);
        votes.record("sidecar-b", true, "ok".into(), t0, TTL);
        assert_eq!(votes.verdict(t0, 2), Verdict::Healthy);
        assert_eq!(
            votes.verdict(t0, 1),
            Verdict::Unhealthy("sidecar-a: handshake timed out".into())
        );
        votes.record("sidecar-b", false, "no response".into(), t0, TTL);
        assert_eq!(
            votes.verdict(t0, 2),
            Verdict::Unhealthy("sidecar-a: handshake timed out; sidecar-b: no response".into())
        );
    }

    #[test]
    fn too_few_fresh_sources_decide_nothing() {
        let t0 = Instant::now();
        let mut votes = Votes::default();
        votes.record("a", false, "down".into(), t0, TTL);
        assert!(matches!(votes.verdict(t0, 2), Verdict::Undecided(d) if d.contains("1 of 1")));
        votes.record("a", true, "up".into(), t0, TTL);
        assert_eq!(votes.verdict(t0, 2), Verdict::Healthy, "nobody says down");
    }

    #[test]
    fn a_silent_source_expires_instead_of_freezing_its_last_word() {
        let t0 = Instant::now();
        let mut votes = Votes::default();
        votes.record("a", false, "down".into(), t0, TTL);
        votes.record("b", true, "up".into(), t0 + Duration::from_secs(2), TTL);
        assert_eq!(votes.next_expiry(), Some(t0 + TTL));
        // a's report is stale at t0 + 3 s even before it is expired explicitly.
        let later = t0 + Duration::from_secs(3);
        assert_eq!(votes.verdict(later, 1), Verdict::Healthy);
        assert_eq!(votes.expire(later), vec!["a".to_string()]);
        assert_eq!(votes.held().count(), 1);
        // Then b falls silent too: that is silence, not health.
        let silent = t0 + Duration::from_secs(5);
        assert_eq!(votes.expire(silent), vec!["b".to_string()]);
        assert_eq!(votes.verdict(silent, 1), Verdict::Silent);
        assert_eq!(votes.next_expiry(), None);
    }

    #[test]
    fn a_decisive_report_needs_no_quorum_and_counts_while_fresh() {
        let t0 = Instant::now();
        let mut votes = Votes::default();
        votes.record("builtin-http", true, "200".into(), t0, TTL);
        votes.record_gone("agent", "interface gone".into(), t0, TTL);
        assert_eq!(
            votes.verdict(t0, 2),
            Verdict::Gone("agent: interface gone".into())
        );
        // The agent sees the interface again: an ordinary vote, counted as such.
        votes.record("agent", true, "up".into(), t0, TTL);
        assert_eq!(votes.verdict(t0, 2), Verdict::Healthy);
        votes.record_gone("agent", "interface gone".into(), t0, TTL);
        votes.record("builtin-http", true, "200".into(), t0 + TTL, TTL);
        assert_eq!(votes.verdict(t0 + TTL, 2), Verdict::Healthy, "stale");
    }
}
