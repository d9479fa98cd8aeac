//! One verdict per gateway from its probes, by a fixed policy:
//!
//! - a required probe that fails (past its fall threshold) takes the gateway **down**, whatever the
//!   others say: a dead data plane is down even while `/health` answers 200;
//! - an advisory probe that fails marks it **degraded**, still in service: by default `/health`
//!   is advisory, so a 503 with a working data plane reads "degraded: Core detached", and a Core
//!   outage (which turns every gateway's `/health` 503) does not become a VPN outage;
//! - otherwise it is **up**.
//!
//! Why the data-plane probes are required and `/health` is not: Defguard gateways 2.0.2 and later
//! purge their WireGuard interface once Core has been gone for a grace period (30 s in 2.0.4)
//! while `/health` goes on answering 503; only the port and handshake probes see that.
//!
//! Balancers get "healthy" for up and degraded, and the detail says which.

use crate::config::Role;
use crate::thresholds::Thresholds;

/// The probe kinds, in the order details list them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    Handshake,
    Port,
    Health,
    /// Core's own view of its stream to the gateway (`connected` in its gateway list), for
    /// gateways with no health port to ask.
    Core,
}

impl Probe {
    pub const ALL: [Probe; 4] = [Probe::Handshake, Probe::Port, Probe::Health, Probe::Core];

    /// Successes in a row that bring the probe back. A refused port is proof, but silence is
    /// weak evidence: the gateway's kernel sends about one ICMP error per second to a source
    /// (net.ipv4.icmp_ratelimit), and the balancer's own traffic to a dead gateway uses them up.
    /// So the port probe needs three quiet rounds at least.
    fn rise(self, rise: u32) -> u32 {
        match self {
            Probe::Port => rise.max(3),
            Probe::Handshake | Probe::Health | Probe::Core => rise,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Probe::Handshake => "handshake",
            Probe::Port => "port",
            Probe::Health => "health",
            Probe::Core => "core",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Up,
    Degraded,
    Down,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Up => "up",
            Verdict::Degraded => "degraded",
            Verdict::Down => "down",
        }
    }
}

struct ProbeState {
    probe: Probe,
    role: Role,
    thresholds: Thresholds,
    /// The latest result that agrees with the thresholded state; empty until one does, and
    /// until then the state is only the starting assumption (up).
    detail: String,
}

/// A gateway's probes and what they have said.
pub struct GatewayHealth {
    probes: Vec<ProbeState>,
}

impl GatewayHealth {
    /// `roles` gives each probe kind the gateway runs (kinds that are off are left out).
    pub fn new(roles: &[(Probe, Role)], rise: u32, fall: u32) -> GatewayHealth {
        GatewayHealth {
            probes: roles
                .iter()
                .filter(|(_, role)| *role != Role::Off)
                .map(|&(probe, role)| ProbeState {
                    probe,
                    role,
                    thresholds: Thresholds::new(probe.rise(rise), fall),
                    detail: String::new(),
                })
                .collect(),
        }
    }

    /// Feeds one probe's result.
    pub fn record(&mut self, probe: Probe, result: Result<String, String>) {
        let Some(state) = self.probes.iter_mut().find(|s| s.probe == probe) else {
            return;
        };
        state.thresholds.record(result.is_ok());
        if result.is_ok() == state.thresholds.healthy() {
            state.detail = match result {
                Ok(detail) | Err(detail) => detail,
            };
        }
    }

    /// Whether a probe passes (past its thresholds); `None` when it does not run or has no
    /// result behind its state yet.
    pub fn passing(&self, probe: Probe) -> Option<bool> {
        self.probes
            .iter()
            .find(|s| s.probe == probe && !s.detail.is_empty())
            .map(|s| s.thresholds.healthy())
    }

    /// The verdict and what it rests on; `None` until every probe's state is backed by a result
    /// (a sidecar started in front of a dead gateway must not report it up meanwhile), unless a
    /// required probe already fails: that decides whatever the others will say.
    pub fn verdict(&self) -> Option<(Verdict, String)> {
        let failing = |role: Role| {
            self.probes
                .iter()
                .filter(move |s| s.role == role && !s.detail.is_empty() && !s.thresholds.healthy())
        };
        if self.probes.iter().any(|s| s.detail.is_empty())
            && failing(Role::Required).next().is_none()
        {
            return None;
        }
        let verdict = if failing(Role::Required).next().is_some() {
            Verdict::Down
        } else if failing(Role::Advisory).next().is_some() {
            Verdict::Degraded
        } else {
            Verdict::Up
        };
        let mut detail = verdict.as_str().to_string();
        let detached = |s: &ProbeState| {
            s.probe == Probe::Health && s.detail.contains("503") || s.probe == Probe::Core
        };
        if verdict == Verdict::Degraded && failing(Role::Advisory).any(detached) {
            detail += ": Core detached";
        }
        let parts: Vec<String> = self
            .probes
            .iter()
            .map(|s| format!("{}: {}", s.probe.as_str(), s.detail))
            .collect();
        detail += &format!(" ({})", parts.join("; "));
        Some((verdict, detail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway() -> GatewayHealth {
        GatewayHealth::new(
            &[
                (Probe::Handshake, Role::Required),
                (Probe::Port, Role::Required),
                (Probe::Health, Role::Advisory),
            ],
            1,
            1,
        )
    }

    #[test]
    fn a_dead_data_plane_is_down_though_health_says_200() {
        let mut g = gateway();
        g.record(Probe::Handshake, Err("no handshake response".into()));
        g.record(Probe::Port, Ok("not refused".into()));
        g.record(Probe::Health, Ok("GET /health 200".into()));
        let (verdict, detail) = g.verdict().unwrap();
        assert_eq!(verdict, Verdict::Down);
        assert!(detail.contains("no handshake response"), "{detail}");
    }

    #[test]
    fn core_detached_with_a_working_data_plane_is_degraded() {
        let mut g = gateway();
        g.record(Probe::Handshake, Ok("handshake in 2 ms".into()));
        g.record(Probe::Port, Ok("not refused".into()));
        g.record(Probe::Health, Err("GET /health 503".into()));
        let (verdict, detail) = g.verdict().unwrap();
        assert_eq!(verdict, Verdict::Degraded);
        assert!(detail.starts_with("degraded: Core detached"), "{detail}");
        g.record(Probe::Health, Ok("GET /health 200".into()));
        assert_eq!(g.verdict().unwrap().0, Verdict::Up);
    }

    #[test]
    fn says_nothing_until_every_probe_has_a_result_behind_it() {
        let mut g = GatewayHealth::new(&[(Probe::Port, Role::Required)], 1, 3);
        // Starting from up, two failures below `fall` do not back "up".
        g.record(Probe::Port, Err("refused".into()));
        g.record(Probe::Port, Err("refused".into()));
        assert_eq!(g.verdict(), None);
        g.record(Probe::Port, Err("refused".into()));
        assert_eq!(g.verdict().unwrap().0, Verdict::Down);
    }

    #[test]
    fn a_failing_required_probe_decides_before_the_others_have_results() {
        let mut g = gateway();
        // The handshake has said nothing yet (a probe peer not yet on the gateways).
        g.record(Probe::Port, Err("port unreachable".into()));
        assert_eq!(g.verdict().map(|(v, _)| v), Some(Verdict::Down));
        // A passing one does not: the handshake may still fail.
        let mut g = gateway();
        g.record(Probe::Port, Ok("not refused".into()));
        g.record(Probe::Health, Ok("200".into()));
        assert_eq!(g.verdict(), None);
    }

    #[test]
    fn cores_word_on_a_gateway_without_a_health_port_only_degrades() {
        let mut g = GatewayHealth::new(
            &[(Probe::Port, Role::Required), (Probe::Core, Role::Advisory)],
            1,
            1,
        );
        g.record(Probe::Port, Ok("not refused".into()));
        g.record(
            Probe::Core,
            Err("Core reports no stream to the gateway".into()),
        );
        let (verdict, detail) = g.verdict().unwrap();
        assert_eq!(verdict, Verdict::Degraded);
        assert!(detail.starts_with("degraded: Core detached"), "{detail}");
    }

    #[test]
    fn probes_that_are_off_do_not_count() {
        let mut g = GatewayHealth::new(
            &[(Probe::Port, Role::Required), (Probe::Health, Role::Off)],
            1,
            1,
        );
        g.record(Probe::Health, Err("503".into()));
        g.record(Probe::Port, Ok("not refused".into()));
        assert_eq!(g.verdict().unwrap().0, Verdict::Up);
    }
}
