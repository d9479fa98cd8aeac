//! Passive health's looks: once a second, every gateway's evidence (the datapaths' posts and
//! the gateway's counters) goes to its judge (`crate::passive`), whose reports count like any
//! other source's.

use std::time::{Duration, Instant};

use crate::health::Observation;
use crate::passive::{Evidence, Judge, PassiveRole, Said, PASSIVE_SOURCE};

use super::ControlPlane;

/// How recently another gateway must have answered for "others answer" to hold.
const OTHERS_ANSWERED_WITHIN: Duration = Duration::from_secs(60);

impl ControlPlane {
    pub(super) fn look_passively(&mut self, now: Instant) {
        let config = self.config.health.passive.clone();
        if config.role == PassiveRole::Off {
            self.judges.clear();
            return;
        }
        let mut reports = Vec::new();
        for listener in &self.config.listeners {
            let looks: Vec<_> = listener
                .gateways
                .iter()
                .map(|gateway| {
                    let counters = self.metrics.gateway(&listener.name, &gateway.name);
                    let waiting =
                        self.board
                            .waiting(&listener.name, &gateway.name, config.window, now);
                    self.metrics
                        .passive_waiting(&listener.name, &gateway.name)
                        .set(waiting as i64);
                    let answers = counters.responses.get() + counters.cookies.get();
                    let returned = counters.packets_to_client.get();
                    (gateway, waiting, answers, returned)
                })
                .collect();
            for &(gateway, waiting, answers, returned) in &looks {
                let others_answer = looks.iter().any(|(other, ..)| {
                    other.name != gateway.name
                        && self
                            .judges
                            .get(&(listener.name.clone(), other.name.clone()))
                            .is_some_and(|j| j.answered_within(now, OTHERS_ANSWERED_WITHIN))
                });
                let judge = self
                    .judges
                    .entry((listener.name.clone(), gateway.name.clone()))
                    .or_insert_with(|| Judge::new(now));
                let evidence = Evidence {
                    waiting,
                    answers,
                    returned,
                    others_answer,
                };
                let (healthy, detail, ttl) = match judge.look(now, evidence, &config) {
                    Said::Nothing => continue,
                    Said::Down { detail, for_ } => {
                        self.metrics
                            .passive_ejections(&listener.name, &gateway.name)
                            .inc();
                        tracing::warn!(listener = %listener.name, gateway = %gateway.name, role = ?config.role, "passive health: the gateway answers no handshakes ({detail}); down for {} s", for_.as_secs());
                        (false, detail, for_)
                    }
                    Said::Released => {
                        tracing::info!(listener = %listener.name, gateway = %gateway.name, "passive health: the gateway's time out is over; it takes sessions again and is judged afresh");
                        let detail = "its time out is over: judged afresh".to_string();
                        (true, detail, config.window)
                    }
                };
                if config.role == PassiveRole::Vote {
                    reports.push(Observation {
                        listener: listener.name.clone(),
                        gateway: gateway.name.clone(),
                        address: Some(gateway.address),
                        source: PASSIVE_SOURCE.into(),
                        healthy,
                        gone: false,
                        detail,
                        ttl,
                    });
                }
            }
        }
        for report in reports {
            if let Err(why) = self.observe(report, now) {
                tracing::debug!("passive health report ignored: {why}");
            }
        }
        let listeners = &self.config.listeners;
        self.judges.retain(|(listener, gateway), _| {
            listeners
                .iter()
                .any(|l| &l.name == listener && l.gateways.iter().any(|g| &g.name == gateway))
        });
    }
}
