//! Whether a session's handshakes are answered, and how fast: the raw material of passive health
//! (a gateway that answers nobody's initiations is dead whatever its `/health` says) and of the
//! handshake round-trip histogram. Kept per session by both datapaths with the same arithmetic,
//! in nanoseconds of a monotonic clock (`bpf_ktime_get_ns` in the program).

/// Upper bounds (inclusive) of the round-trip histogram's buckets, in microseconds; one more
/// bucket holds the rest. Powers of two from 64 us, so that the program finds a bucket with
/// shifts alone.
pub const RTT_BOUNDS_US: [u64; RTT_BUCKETS - 1] = [
    64, 128, 256, 512, 1_024, 2_048, 4_096, 8_192, 16_384, 32_768, 65_536, 131_072, 262_144,
    524_288, 1_048_576, 2_097_152, 4_194_304, 8_388_608,
];
pub const RTT_BUCKETS: usize = 19;

/// The bucket of a round trip of `ns` nanoseconds.
#[inline(always)]
pub fn rtt_bucket(ns: u64) -> usize {
    let us = ns / 1_000;
    let mut bucket = 0;
    let mut bound = RTT_BOUNDS_US[0];
    // Bounded: the verifier sees at most RTT_BUCKETS - 1 turns.
    while bucket < RTT_BUCKETS - 1 && us > bound {
        bucket += 1;
        bound <<= 1;
    }
    bucket
}

/// A session's handshake state: when the client last sent an initiation, and since when it has
/// been waiting for an answer (0: it is not). A retried initiation keeps the wait's start, so a
/// client whose initiations go unanswered shows how long, not only the latest retry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeWait {
    pub initiated_ns: u64,
    pub waiting_since_ns: u64,
}

impl HandshakeWait {
    /// The client sent an initiation at `now`.
    #[inline(always)]
    pub fn initiate(&mut self, now: u64) {
        self.initiated_ns = now;
        if self.waiting_since_ns == 0 {
            self.waiting_since_ns = now;
        }
    }

    /// The gateway sent a handshake response or a cookie reply at `now` (a cookie reply is an
    /// answer too: a gateway under load is alive). Returns the round trip from the latest
    /// initiation, if one was waiting.
    #[inline(always)]
    pub fn answer(&mut self, now: u64) -> Option<u64> {
        if self.waiting_since_ns == 0 {
            return None;
        }
        self.waiting_since_ns = 0;
        let initiated = core::mem::take(&mut self.initiated_ns);
        (initiated != 0).then(|| now.saturating_sub(initiated))
    }

    /// The gateway's port refused one of the client's datagrams at `now` (ICMP port
    /// unreachable): nothing listens there, so the client waits for an answer as surely as if an
    /// initiation had gone unanswered. No round trip is timed from it.
    #[inline(always)]
    pub fn refused(&mut self, now: u64) {
        // Whatever initiation was out, this is not its answer.
        self.initiated_ns = 0;
        if self.waiting_since_ns == 0 {
            self.waiting_since_ns = now;
        }
    }

    /// How long the client has waited for an answer at `now`, if it is waiting.
    #[inline(always)]
    pub fn waiting(&self, now: u64) -> Option<u64> {
        (self.waiting_since_ns != 0).then(|| now.saturating_sub(self.waiting_since_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn buckets_follow_their_bounds() {
        assert_eq!(rtt_bucket(0), 0);
        assert_eq!(rtt_bucket(64_000), 0);
        assert_eq!(rtt_bucket(64_001 + 999), 1);
        for (i, bound) in RTT_BOUNDS_US.iter().enumerate() {
            assert_eq!(rtt_bucket(bound * 1_000), i, "at {bound} us");
            assert_eq!(rtt_bucket((bound + 1) * 1_000), i + 1, "past {bound} us");
        }
        assert_eq!(rtt_bucket(u64::MAX), RTT_BUCKETS - 1);
    }

    #[test]
    fn a_retry_keeps_the_wait_and_the_answer_times_the_latest() {
        let mut wait = HandshakeWait::default();
        assert_eq!(wait.waiting(10 * MS), None);
        assert_eq!(wait.answer(10 * MS), None, "nothing was asked");
        wait.initiate(100 * MS);
        wait.initiate(5_100 * MS);
        assert_eq!(wait.waiting(6_100 * MS), Some(6_000 * MS));
        assert_eq!(wait.answer(5_102 * MS), Some(2 * MS));
        assert_eq!(wait.waiting(7_000 * MS), None);
        assert_eq!(wait.answer(7_000 * MS), None, "answered once");
        // A refusal starts a wait that only an answer ends, and times no round trip.
        wait.refused(8_000 * MS);
        wait.refused(9_000 * MS);
        assert_eq!(wait.waiting(10_000 * MS), Some(2_000 * MS));
        assert_eq!(wait.answer(10_000 * MS), None);
    }
}
