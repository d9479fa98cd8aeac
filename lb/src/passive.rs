//! Passive health: a gateway judged by the handshakes it answers. A gateway whose WireGuard is
//! dead (interface purged, process stopped) can still answer `/health` with 200, and no probe
//! can shake hands in Defguard's MFA locations; but the balancer sees every initiation it
//! forwards and every response and cookie reply that comes back.
//!
//! Each datapath's sweep posts, per gateway, the client addresses whose initiations wait for an
//! answer and for how long (`wglb_common::handshake`) on a [`Board`]; the control plane reads it
//! once a second with the gateway's counters and asks a [`Judge`] per gateway. A gateway is
//! reported down (health source [`PASSIVE_SOURCE`]) when
//! - at least `clients` distinct client addresses have waited `window` or longer for it to answer
//!   an initiation,
//! - it sent nothing at all (no response, cookie reply or data, to anyone) for `window`, and
//! - it answered a handshake before, or another gateway of the listener answered one in the
//!   last minute (when nobody answers anyone, the fault is not this gateway's).
//!
//! The second rule is what keeps revoked or MFA-expired devices, whose initiations no gateway
//! answers, from taking down a gateway that serves anyone else. Once reported down, the gateway
//! cannot be judged (it gets no initiations), so the report lasts `eject_for`, doubled for each
//! ejection that follows within ten minutes of the last (at most 8x), and is then withdrawn: the
//! gateway gets new sessions again and is judged afresh.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The health source name of passive reports.
pub const PASSIVE_SOURCE: &str = "passive";

/// Ejections closer together than this escalate.
const STRIKES_RESET: Duration = Duration::from_secs(600);
const MAX_ESCALATION: u32 = 8;
/// A datapath's post older than this no longer counts (its sweep stopped; a sweep of a large
/// XDP table is spaced to cost a tenth of a core, so several seconds apart is normal).
const POST_FRESH_FOR: Duration = Duration::from_secs(60);
/// Waits shorter than this are not posted: a handshake answers in milliseconds.
const POSTED_FROM: Duration = Duration::from_secs(1);

/// What passive health does with its verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassiveRole {
    /// Reports to the health quorum like any source.
    Vote,
    /// Only counts and logs (`wglb_passive_ejections_total` counts what it would have done).
    Watch,
    Off,
}

impl PassiveRole {
    pub fn parse(text: &str) -> Option<PassiveRole> {
        match text {
            "vote" => Some(PassiveRole::Vote),
            "watch" => Some(PassiveRole::Watch),
            "off" => Some(PassiveRole::Off),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PassiveConfig {
    pub role: PassiveRole,
    /// Distinct client addresses left waiting (K).
    pub clients: usize,
    /// How long they waited, and how long the gateway sent nothing (T).
    pub window: Duration,
    /// How long a first report down lasts.
    pub eject_for: Duration,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig {
            role: PassiveRole::Vote,
            clients: 2,
            // Longer than WireGuard's retry interval (5 s plus up to 1/3 s of jitter): one lost
            // initiation, answered on its retry, never counts.
            window: Duration::from_secs(6),
            eject_for: Duration::from_secs(30),
        }
    }
}

/// Which datapath posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// A shard of the userspace datapath.
    Userspace(usize),
    Xdp,
}

/// Per gateway name: each waiting client address and its longest wait.
pub type Waiting = HashMap<String, HashMap<IpAddr, Duration>>;

/// A datapath's sweep found `client`'s session on `gateway` waiting `waited` for an answer.
pub fn note(waiting: &mut Waiting, gateway: &str, client: IpAddr, waited: Duration) {
    if waited < POSTED_FROM {
        return;
    }
    let longest = waiting
        .entry(gateway.to_string())
        .or_default()
        .entry(client)
        .or_default();
    *longest = (*longest).max(waited);
}

/// Where the datapaths post what they saw at their last sweep; shared with the control plane.
#[derive(Clone, Default)]
pub struct Board {
    posts: Arc<Mutex<Posts>>,
}

/// The latest post of each (listener, datapath), and when it came.
type Posts = HashMap<(String, Part), (Instant, Waiting)>;

impl Board {
    pub fn post(&self, listener: &str, part: Part, waiting: Waiting) {
        self.lock()
            .insert((listener.to_string(), part), (Instant::now(), waiting));
    }

    /// Distinct client addresses that have waited at least `window` for `gateway` of `listener`,
    /// over every datapath's fresh post.
    pub fn waiting(&self, listener: &str, gateway: &str, window: Duration, now: Instant) -> usize {
        let posts = self.lock();
        let mut clients = HashSet::new();
        for ((posted_for, _), (at, waiting)) in posts.iter() {
            if posted_for != listener || now.saturating_duration_since(*at) > POST_FRESH_FOR {
                continue;
            }
            if let Some(waiting) = waiting.get(gateway) {
                clients.extend(
                    waiting
                        .iter()
                        .filter(|(_, waited)| **waited >= window)
                        .map(|(client, _)| *client),
                );
            }
        }
        clients.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Posts> {
        self.posts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the control plane knows about a gateway at a look.
#[derive(Clone, Copy, Debug)]
pub struct Evidence {
    /// Distinct client addresses waiting at least the window.
    pub waiting: usize,
    /// Handshake responses and cookie replies it sent, ever (a counter).
    pub answers: u64,
    /// Datagrams it sent to clients, ever (a counter).
    pub returned: u64,
    /// Another gateway of the listener answered a handshake within the last minute.
    pub others_answer: bool,
}

/// What passive health says about a gateway after a look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Said {
    Nothing,
    Down {
        detail: String,
        for_: Duration,
    },
    /// Its report down ran out: it may take sessions again.
    Released,
}

/// Passive health's memory of one gateway.
#[derive(Debug)]
pub struct Judge {
    answers: u64,
    returned: u64,
    last_answer: Option<Instant>,
    last_returned: Instant,
    ejected_until: Option<Instant>,
    strikes: u32,
    last_ejection: Option<Instant>,
}

impl Judge {
    pub fn new(now: Instant) -> Judge {
        Judge {
            answers: 0,
            returned: 0,
            last_answer: None,
            // A gateway just seen gets a full window before its silence counts.
            last_returned: now,
            ejected_until: None,
            strikes: 0,
            last_ejection: None,
        }
    }

    pub fn answered_within(&self, now: Instant, within: Duration) -> bool {
        self.last_answer
            .is_some_and(|at| now.saturating_duration_since(at) <= within)
    }

    pub fn look(&mut self, now: Instant, evidence: Evidence, config: &PassiveConfig) -> Said {
        if evidence.answers > self.answers {
            self.last_answer = Some(now);
            self.answers = evidence.answers;
        }
        if evidence.returned != self.returned {
            self.last_returned = now;
            self.returned = evidence.returned;
        }
        if let Some(until) = self.ejected_until {
            if now < until {
                return Said::Nothing;
            }
            self.ejected_until = None;
            // Judged afresh from here: its silence while ejected proves nothing.
            self.last_returned = now;
            return Said::Released;
        }
        let silent_for = now.saturating_duration_since(self.last_returned);
        let answered_before = self.last_answer.is_some();
        if evidence.waiting < config.clients
            || silent_for < config.window
            || !(answered_before || evidence.others_answer)
        {
            return Said::Nothing;
        }
        let recent = self
            .last_ejection
            .is_some_and(|at| now.saturating_duration_since(at) < STRIKES_RESET);
        self.strikes = if recent { self.strikes + 1 } else { 1 };
        let for_ = config.eject_for * (1 << (self.strikes - 1)).min(MAX_ESCALATION);
        self.last_ejection = Some(now);
        self.ejected_until = Some(now + for_);
        Said::Down {
            detail: format!(
                "{} client(s) waited {} s or more for an answer to their handshake initiations, and it sent nothing for {} s",
                evidence.waiting,
                config.window.as_secs(),
                silent_for.as_secs()
            ),
            for_,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn evidence(waiting: usize, answers: u64, returned: u64) -> Evidence {
        Evidence {
            waiting,
            answers,
            returned,
            others_answer: false,
        }
    }

    /// A gateway that answered, then went silent while clients wait: down after the window,
    /// released after `eject_for`, and down for twice as long when it is still dead.
    #[test]
    fn a_gateway_that_answers_nobody_goes_down_and_comes_back_to_be_judged_again() {
        let config = PassiveConfig::default();
        let t0 = Instant::now();
        let mut judge = Judge::new(t0);
        assert_eq!(judge.look(t0, evidence(0, 10, 100), &config), Said::Nothing);
        assert_eq!(
            judge.look(t0 + S, evidence(0, 11, 120), &config),
            Said::Nothing
        );
        // It stops at t0 + 1 s; two clients have waited long enough by t0 + 6 s, but it has
        // been silent for only 5 s then.
        assert_eq!(
            judge.look(t0 + 6 * S, evidence(2, 11, 120), &config),
            Said::Nothing
        );
        let Said::Down { detail, for_ } = judge.look(t0 + 7 * S, evidence(2, 11, 120), &config)
        else {
            panic!("not down");
        };
        assert!(detail.starts_with("2 client(s)"), "{detail}");
        assert_eq!(for_, config.eject_for);
        assert_eq!(
            judge.look(t0 + 20 * S, evidence(0, 11, 120), &config),
            Said::Nothing,
            "still ejected"
        );
        let back = t0 + 7 * S + config.eject_for;
        assert_eq!(
            judge.look(back, evidence(0, 11, 120), &config),
            Said::Released
        );
        // Still dead: new clients wait again, and the next report lasts twice as long.
        assert_eq!(
            judge.look(back + 5 * S, evidence(3, 11, 120), &config),
            Said::Nothing,
            "a full window of silence again first"
        );
        let Said::Down { for_, .. } = judge.look(back + 6 * S, evidence(3, 11, 120), &config)
        else {
            panic!("not down again");
        };
        assert_eq!(for_, 2 * config.eject_for);
    }

    #[test]
    fn revoked_clients_do_not_take_down_a_gateway_that_serves_others() {
        let config = PassiveConfig::default();
        let t0 = Instant::now();
        let mut judge = Judge::new(t0);
        judge.look(t0, evidence(0, 5, 50), &config);
        // Ten revoked devices wait forever; everyone else still gets data back.
        for s in 1..60 {
            let said = judge.look(t0 + s * S, evidence(10, 5, 50 + s as u64), &config);
            assert_eq!(said, Said::Nothing, "at {s} s");
        }
    }

    #[test]
    fn one_client_is_not_enough() {
        let config = PassiveConfig::default();
        let t0 = Instant::now();
        let mut judge = Judge::new(t0);
        judge.look(t0, evidence(0, 5, 50), &config);
        assert_eq!(
            judge.look(t0 + 60 * S, evidence(1, 5, 50), &config),
            Said::Nothing
        );
    }

    /// A gateway never seen answering is judged only when other gateways answer: when no one
    /// answers anyone (every gateway purged, or every client revoked), passive health says
    /// nothing.
    #[test]
    fn a_gateway_never_seen_answering_needs_others_that_answer() {
        let config = PassiveConfig::default();
        let t0 = Instant::now();
        let mut judge = Judge::new(t0);
        assert_eq!(
            judge.look(t0 + 30 * S, evidence(5, 0, 0), &config),
            Said::Nothing
        );
        let others = Evidence {
            others_answer: true,
            ..evidence(5, 0, 0)
        };
        assert!(matches!(
            judge.look(t0 + 31 * S, others, &config),
            Said::Down { .. }
        ));
    }

    #[test]
    fn the_board_counts_each_address_once_and_only_long_waits() {
        let board = Board::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let waits = |pairs: &[(IpAddr, u64)]| -> Waiting {
            HashMap::from([(
                "gw0".to_string(),
                pairs.iter().map(|(ip, s)| (*ip, S * *s as u32)).collect(),
            )])
        };
        board.post("l", Part::Userspace(0), waits(&[(a, 7), (b, 2)]));
        board.post("l", Part::Xdp, waits(&[(a, 9)]));
        board.post("other", Part::Xdp, waits(&[(b, 9)]));
        let now = Instant::now();
        assert_eq!(board.waiting("l", "gw0", 6 * S, now), 1);
        assert_eq!(board.waiting("l", "gw0", S, now), 2);
        assert_eq!(board.waiting("l", "gw1", S, now), 0);
        assert_eq!(
            board.waiting("l", "gw0", S, now + 61 * S),
            0,
            "stale posts do not count"
        );
    }
}
