//! The userspace datapath's admission budgets: one [`SourceBudget`] per client address, the same
//! arithmetic the XDP program runs (`wglb_common::admission`), kept for a bounded number of
//! addresses.

use std::net::IpAddr;
use std::num::NonZeroUsize;

use lru::LruCache;
use wglb_common::admission::{AdmissionLimits, Refusal, SourceBudget};
use wglb_common::xdp::MAX_SOURCES;

/// Budgets by client address, least recently used first out (as the program's SOURCES map).
pub struct Sources {
    budgets: LruCache<IpAddr, SourceBudget>,
    limits: AdmissionLimits,
}

impl Sources {
    pub fn new(limits: AdmissionLimits) -> Sources {
        Sources {
            budgets: LruCache::new(NonZeroUsize::new(MAX_SOURCES as usize).expect("not zero")),
            limits,
        }
    }

    /// New limits apply from the next new session on; tokens and counts are kept.
    pub fn set_limits(&mut self, limits: AdmissionLimits) {
        self.limits = limits;
    }

    /// Takes a token of `source`'s budget for a new unconfirmed session.
    pub fn admit(&mut self, source: IpAddr, now_ns: u64) -> Result<(), Refusal> {
        let limits = &self.limits;
        self.budgets
            .get_or_insert_mut(source, || SourceBudget::new(now_ns, limits))
            .admit(now_ns, limits)
    }

    /// One of `source`'s unconfirmed sessions left probation.
    pub fn settled(&mut self, source: IpAddr) {
        if let Some(budget) = self.budgets.peek_mut(&source) {
            budget.settled();
        }
    }

    /// Unconfirmed sessions `source` holds, as its budget counts them.
    pub fn unconfirmed(&self, source: IpAddr) -> u32 {
        self.budgets.peek(&source).map_or(0, |b| b.unconfirmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_a_budget_of_its_own() {
        let mut sources = Sources::new(AdmissionLimits {
            rate: 1,
            burst: 2,
            unconfirmed: 2,
            pad: 0,
        });
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert_eq!(sources.admit(a, 0), Ok(()));
        assert_eq!(sources.admit(a, 0), Ok(()));
        assert_eq!(sources.admit(a, 0), Err(Refusal::SourceUnconfirmed));
        assert_eq!(sources.admit(b, 0), Ok(()));
        sources.settled(a);
        assert_eq!(sources.unconfirmed(a), 1);
        assert_eq!(sources.admit(a, 0), Err(Refusal::SourceRate));
        assert_eq!(sources.admit(a, 1_000_000_000), Ok(()));
    }
}
