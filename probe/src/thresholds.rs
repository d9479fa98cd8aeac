//! Consecutive-result thresholds, so that one lost probe does not take a gateway down.

/// `rise` successes in a row bring a gateway up, `fall` failures take it down. Gateways start up,
/// so a restarted checker keeps sending sessions where they were.
#[derive(Debug)]
pub struct Thresholds {
    rise: u32,
    fall: u32,
    healthy: bool,
    streak: u32,
}

impl Thresholds {
    pub fn new(rise: u32, fall: u32) -> Thresholds {
        Thresholds {
            rise,
            fall,
            healthy: true,
            streak: 0,
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Feeds one result; returns the new verdict when it changed.
    pub fn record(&mut self, success: bool) -> Option<bool> {
        if success == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if success { self.rise } else { self.fall };
        if self.streak >= needed {
            self.healthy = success;
            self.streak = 0;
            Some(success)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_need_consecutive_results() {
        let mut t = Thresholds::new(2, 3);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None, "a success breaks the failure streak");
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
        let mut fast = Thresholds::new(1, 1);
        assert_eq!(fast.record(false), Some(false));
        assert_eq!(fast.record(true), Some(true));
    }
}
