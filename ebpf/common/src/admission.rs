//! Admission of new sessions, in the spirit of conntrack's ASSURED flag: a session is
//! *unconfirmed* until its gateway answers on it, and unconfirmed sessions live in a bounded
//! probation part of the table where they can never push out a confirmed one. On top of that
//! bound, each source address has a budget: a rate of new sessions (a token bucket) and a cap on
//! its unconfirmed sessions at once. A flood of shaped datagrams from spoofed ports then costs
//! the flooder its own budget and churns only the probation part; clients whose gateway has
//! answered keep their place.
//!
//! Both datapaths run this same arithmetic: the userspace relay per datagram, the XDP program per
//! packet in the kernel (where several CPUs may update one budget at once: a lost update admits
//! a session or two more, never fewer).

/// Rate and cap of one listener's new sessions per source address, as configured.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// New sessions per second per source address.
    pub rate: u32,
    /// How many new sessions a quiet source may open at once.
    pub burst: u32,
    /// Unconfirmed sessions per source address at once.
    pub unconfirmed: u32,
    pub pad: u32,
}

/// Why a new session was not admitted. The variants are stable metric label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The source opened new sessions faster than its rate.
    SourceRate,
    /// The source has its cap of unconfirmed sessions already.
    SourceUnconfirmed,
}

impl Refusal {
    pub const ALL: [Refusal; 2] = [Refusal::SourceRate, Refusal::SourceUnconfirmed];

    pub const fn as_str(self) -> &'static str {
        match self {
            Refusal::SourceRate => "source_rate",
            Refusal::SourceUnconfirmed => "source_unconfirmed",
        }
    }
}

/// Thousandths of a token: rates are whole sessions per second, elapsed time is in nanoseconds.
const MILLI: u64 = 1000;
/// Refills look at most this far back: a bucket is full long before, and the product with the
/// rate stays far from overflowing.
const MAX_REFILL_NS: u64 = 100_000_000_000;

/// One source address's budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceBudget {
    /// Tokens for new sessions, in thousandths.
    pub tokens_milli: u64,
    /// When tokens were last added (ns on the datapath's monotonic clock).
    pub refilled_ns: u64,
    /// Unconfirmed sessions of this source now.
    pub unconfirmed: u32,
    pub pad: u32,
}

impl SourceBudget {
    /// A source seen for the first time: a full bucket.
    #[inline(always)]
    pub fn new(now_ns: u64, limits: &AdmissionLimits) -> SourceBudget {
        SourceBudget {
            tokens_milli: limits.burst as u64 * MILLI,
            refilled_ns: now_ns,
            unconfirmed: 0,
            pad: 0,
        }
    }

    /// Takes a token for a new unconfirmed session, or says why not (and takes nothing).
    #[inline(always)]
    pub fn admit(&mut self, now_ns: u64, limits: &AdmissionLimits) -> Result<(), Refusal> {
        let elapsed = now_ns.saturating_sub(self.refilled_ns);
        let full = limits.burst as u64 * MILLI;
        let earned = elapsed.min(MAX_REFILL_NS) * limits.rate as u64 / 1_000_000;
        self.tokens_milli = (self.tokens_milli + earned).min(full);
        // The clock moves only once a whole thousandth is earned, so a source that asks more
        // often than that still earns its rate.
        if earned > 0 {
            self.refilled_ns = now_ns;
        }
        if self.unconfirmed >= limits.unconfirmed {
            return Err(Refusal::SourceUnconfirmed);
        }
        if self.tokens_milli < MILLI {
            return Err(Refusal::SourceRate);
        }
        self.tokens_milli -= MILLI;
        self.unconfirmed += 1;
        Ok(())
    }

    /// One of the source's unconfirmed sessions left probation: confirmed, expired or pushed out.
    #[inline(always)]
    pub fn settled(&mut self) {
        self.unconfirmed = self.unconfirmed.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: AdmissionLimits = AdmissionLimits {
        rate: 10,
        burst: 5,
        unconfirmed: 3,
        pad: 0,
    };
    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let limits = AdmissionLimits {
            unconfirmed: u32::MAX,
            ..LIMITS
        };
        let mut budget = SourceBudget::new(0, &limits);
        for _ in 0..5 {
            assert_eq!(budget.admit(0, &limits), Ok(()));
        }
        assert_eq!(budget.admit(0, &limits), Err(Refusal::SourceRate));
        // 10 per second: one more every 100 ms, none before.
        assert_eq!(budget.admit(99_000_000, &limits), Err(Refusal::SourceRate));
        assert_eq!(budget.admit(100_000_000, &limits), Ok(()));
        assert_eq!(budget.admit(100_000_000, &limits), Err(Refusal::SourceRate));
        // A long silence refills to the burst, not beyond.
        let later = 3600 * SECOND;
        for _ in 0..5 {
            assert_eq!(budget.admit(later, &limits), Ok(()));
        }
        assert_eq!(budget.admit(later, &limits), Err(Refusal::SourceRate));
    }

    #[test]
    fn frequent_refusals_do_not_starve_the_refill() {
        let limits = AdmissionLimits {
            unconfirmed: u32::MAX,
            ..LIMITS
        };
        let mut budget = SourceBudget::new(0, &limits);
        let mut admitted = 0;
        // A flood every 10 µs for 10 s after the burst: the rate, give or take one.
        for step in 0..1_000_000u64 {
            if budget.admit(step * 10_000, &limits).is_ok() {
                admitted += 1;
            }
        }
        assert!((104..=106).contains(&admitted), "{admitted}");
    }

    #[test]
    fn unconfirmed_sessions_are_capped_until_they_settle() {
        let mut budget = SourceBudget::new(0, &LIMITS);
        for _ in 0..3 {
            assert_eq!(budget.admit(0, &LIMITS), Ok(()));
        }
        assert_eq!(budget.admit(0, &LIMITS), Err(Refusal::SourceUnconfirmed));
        budget.settled();
        assert_eq!(budget.admit(0, &LIMITS), Ok(()));
        // Refused sessions took no token: two are left of the five.
        for _ in 0..4 {
            budget.settled();
        }
        assert_eq!(budget.unconfirmed, 0);
        assert_eq!(budget.admit(0, &LIMITS), Ok(()));
        assert_eq!(budget.admit(0, &LIMITS), Err(Refusal::SourceRate));
    }
}
