//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! Every balancer instance that is given the same gateways builds the same table, so instances
//! agree on where a new session goes without talking to each other, and a restarted instance puts
//! clients back where they were. To make that true whatever order an operator lists gateways in,
//! the table is built over gateways sorted by name; the permutation of each comes from two hashes
//! of its name only.

use wglb_common::hash::murmur3_32;

const OFFSET_SEED: u32 = 0x6d61_676c; // "magl"
const SKIP_SEED: u32 = 0x6576_3031; // "ev01"

/// A lookup table of `size` slots, each holding the index of a backend in the slice given to
/// [`Maglev::build`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Maglev {
    slots: Vec<u16>,
}

impl Maglev {
    /// Builds the table for `backends` as (name, weight) pairs. `size` must be prime and larger
    /// than the number of backends (the config guarantees both); weights must be at least 1.
    /// With no backend the table is empty and every lookup misses.
    pub fn build(backends: &[(&str, u32)], size: u32) -> Maglev {
        if backends.is_empty() {
            return Maglev { slots: Vec::new() };
        }
        assert!(backends.len() < u16::MAX as usize, "too many backends");
        let size = size as u64;
        let mut order: Vec<usize> = (0..backends.len()).collect();
        order.sort_by(|&a, &b| backends[a].0.cmp(backends[b].0));
        // (next slot to try, skip) per backend in name order.
        let mut cursor: Vec<(u64, u64)> = order
            .iter()
            .map(|&i| {
                let name = backends[i].0.as_bytes();
                let offset = murmur3_32(name, OFFSET_SEED) as u64 % size;
                let skip = murmur3_32(name, SKIP_SEED) as u64 % (size - 1) + 1;
                (offset, skip)
            })
            .collect();
        let max_weight = backends.iter().map(|b| b.1 as u64).max().unwrap_or(1);
        const EMPTY: u16 = u16::MAX;
        let mut slots = vec![EMPTY; size as usize];
        let mut filled = 0u64;
        let mut round = 0u64;
        loop {
            for (rank, &backend) in order.iter().enumerate() {
                // A backend of weight w claims w/max_weight slots per round on average: it claims
                // one exactly when the running total floor(round * w / max) steps up.
                let weight = backends[backend].1 as u64;
                if (round + 1) * weight / max_weight == round * weight / max_weight {
                    continue;
                }
                let (next, skip) = &mut cursor[rank];
                while slots[*next as usize] != EMPTY {
                    *next = (*next + *skip) % size;
                }
                slots[*next as usize] = backend as u16;
                *next = (*next + *skip) % size;
                filled += 1;
                if filled == size {
                    return Maglev { slots };
                }
            }
            round += 1;
        }
    }

    /// The backend index for a flow hash, or None for an empty table.
    pub fn lookup(&self, hash: u32) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        Some(self.slots[hash as usize % self.slots.len()] as usize)
    }

    /// The raw table, slot by slot, as the XDP datapath will load it.
    pub fn slots(&self) -> &[u16] {
        &self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 65_537;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("gateway-{i}")).collect()
    }

    fn counts(table: &Maglev, n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &slot in table.slots() {
            counts[slot as usize] += 1;
        }
        counts
    }

    #[test]
    fn equal_weights_get_a_fair_share_within_one_percent() {
        for n in [2, 3, 5, 10, 64] {
            let names = names(n);
            let backends: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
            let table = Maglev::build(&backends, M);
            let fair = M as f64 / n as f64;
            for (i, count) in counts(&table, n).into_iter().enumerate() {
                let error = (count as f64 - fair).abs() / fair;
                assert!(
                    error <= 0.01,
                    "n={n} backend {i}: {count} slots vs fair {fair:.0}"
                );
            }
        }
    }

    #[test]
    fn weights_are_honoured_within_one_percent() {
        let backends = [("a", 1), ("b", 2), ("c", 3), ("d", 10)];
        let table = Maglev::build(&backends, M);
        let total: u32 = backends.iter().map(|b| b.1).sum();
        for (i, count) in counts(&table, backends.len()).into_iter().enumerate() {
            let fair = M as f64 * backends[i].1 as f64 / total as f64;
            let error = (count as f64 - fair).abs() / fair;
            assert!(
                error <= 0.01,
                "{}: {count} slots vs fair {fair:.0}",
                backends[i].0
            );
        }
    }

    #[test]
    fn removing_one_gateway_barely_moves_the_others() {
        for n in [3, 5, 10, 20] {
            let names = names(n);
            let all: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
            let before = Maglev::build(&all, M);
            let removed = n / 2;
            let survivors: Vec<(&str, u32)> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != removed)
                .map(|(_, b)| *b)
                .collect();
            let after = Maglev::build(&survivors, M);
            let mut moved = 0;
            let mut orphaned = 0;
            for (old, new) in before.slots().iter().zip(after.slots()) {
                let old_name = all[*old as usize].0;
                let new_name = survivors[*new as usize].0;
                if *old as usize == removed {
                    orphaned += 1;
                } else if old_name != new_name {
                    moved += 1;
                }
            }
            // Measured: 0.01-1.2% of the survivors' slots move for 3 to 20 gateways, in line with
            // the Maglev paper. The session table shields live sessions even from that.
            let collateral = moved as f64 / (M - orphaned) as f64;
            eprintln!(
                "n={n}: {moved} of {} surviving slots moved ({:.2}%)",
                M - orphaned,
                collateral * 100.0
            );
            assert!(
                collateral < 0.02,
                "n={n}: {moved} of {} surviving slots moved",
                M - orphaned
            );
            assert!(orphaned > 0);
        }
    }

    #[test]
    fn same_gateways_same_table_whatever_the_order() {
        let a = Maglev::build(&[("gw1", 1), ("gw2", 2), ("gw3", 1)], M);
        let b = Maglev::build(&[("gw3", 1), ("gw1", 1), ("gw2", 2)], M);
        fn owner<'a>(t: &Maglev, order: &[&'a str], slot: usize) -> &'a str {
            order[t.slots()[slot] as usize]
        }
        for slot in 0..M as usize {
            assert_eq!(
                owner(&a, &["gw1", "gw2", "gw3"], slot),
                owner(&b, &["gw3", "gw1", "gw2"], slot)
            );
        }
        assert_eq!(a, Maglev::build(&[("gw1", 1), ("gw2", 2), ("gw3", 1)], M));
    }

    #[test]
    fn table_is_stable_across_releases() {
        // A fixed fingerprint: if this changes, balancers of different versions disagree on
        // placement and an upgrade re-places sessions. Change it only on purpose.
        let table = Maglev::build(&[("gw1", 1), ("gw2", 1), ("gw3", 1)], M);
        let fingerprint = table
            .slots()
            .iter()
            .fold(0u64, |acc, &s| acc.wrapping_mul(31).wrapping_add(s as u64));
        let head: Vec<u16> = table.slots()[..12].to_vec();
        assert_eq!(
            (head, fingerprint),
            (EXPECTED_HEAD.to_vec(), EXPECTED_FINGERPRINT)
        );
    }
    const EXPECTED_HEAD: [u16; 12] = [1, 1, 1, 1, 1, 1, 2, 2, 1, 1, 1, 1];
    const EXPECTED_FINGERPRINT: u64 = 4_103_497_219_662_215_072;

    #[test]
    fn empty_pool_misses() {
        assert_eq!(Maglev::build(&[], M).lookup(42), None);
        assert_eq!(Maglev::build(&[("only", 5)], 7).lookup(42), Some(0));
    }
}
