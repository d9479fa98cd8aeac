//! The sidecar's Prometheus metrics. Labels come from its configuration and Core's gateway list,
//! never from the network.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::verdict::{Probe, Verdict};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    probes: IntCounterVec,
    durations: HistogramVec,
    verdicts: IntGaugeVec,
    changes: IntCounterVec,
    balancers: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(vec.clone()))
                .expect("unique metric");
            vec
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let vec = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(vec.clone()))
                .expect("unique metric");
            vec
        };
        let probes = counter(
            "wglb_healthcheck_probes_total",
            "Probes run, by gateway, kind and result.",
            &["location", "gateway", "probe", "result"],
        );
        let verdicts = gauge(
            "wglb_healthcheck_verdict",
            "1 for each gateway's current verdict (up, degraded, down).",
            &["location", "gateway", "verdict"],
        );
        let changes = counter(
            "wglb_healthcheck_verdict_changes_total",
            "Times a gateway's verdict changed.",
            &["location", "gateway"],
        );
        let balancers = gauge(
            "wglb_healthcheck_balancer_connected",
            "1 while the sidecar's report stream to the balancer is open.",
            &["balancer"],
        );
        // Handshakes take a round trip plus two Curve25519 operations: sub-millisecond on a LAN,
        // up to the timeout for a gateway far away or struggling.
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "wglb_healthcheck_probe_duration_seconds",
                "How long probes took, successful or not, by kind.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["probe"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(durations.clone()))
            .expect("unique metric");
        Metrics {
            registry,
            probes,
            durations,
            verdicts,
            changes,
            balancers,
        }
    }

    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    pub fn probe(&self, location: &str, gateway: &str, probe: Probe, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "fail" };
        self.probes
            .with_label_values(&[location, gateway, probe.as_str(), result])
            .inc();
        self.durations
            .with_label_values(&[probe.as_str()])
            .observe(took.as_secs_f64());
    }

    /// Sets a gateway's verdict; `changed` when it differs from the one before.
    pub fn verdict(&self, location: &str, gateway: &str, verdict: Verdict, changed: bool) {
        for v in [Verdict::Up, Verdict::Degraded, Verdict::Down] {
            self.verdicts
                .with_label_values(&[location, gateway, v.as_str()])
                .set((v == verdict) as i64);
        }
        if changed {
            self.changes.with_label_values(&[location, gateway]).inc();
        }
    }

    pub fn forget(&self, location: &str, gateway: &str) {
        for v in [Verdict::Up, Verdict::Degraded, Verdict::Down] {
            let _ = self
                .verdicts
                .remove_label_values(&[location, gateway, v.as_str()]);
        }
    }

    pub fn balancer(&self, address: &str, connected: bool) {
        self.balancers
            .with_label_values(&[address])
            .set(connected as i64);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
