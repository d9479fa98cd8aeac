//! CPU time as /proc counts it, for benchmarks that compare contenders in the same run.

use std::path::Path;

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// The whole machine's CPU ticks so far.
#[derive(Clone, Copy, Debug)]
pub struct MachineTicks {
    /// Everything but idle and iowait.
    pub busy: u64,
    /// Of which softirq: where XDP and the kernel's packet path run.
    pub softirq: u64,
}

pub fn machine_ticks() -> MachineTicks {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .expect("cpu line")
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().expect("a number"))
        .collect();
    let total: u64 = fields.iter().sum();
    MachineTicks {
        busy: total - fields[3] - fields[4],
        softirq: fields[6],
    }
}

/// User and system ticks of `pid` and its direct children (e.g. nginx's workers).
pub fn process_ticks(pid: u32) -> u64 {
    let stat = |path: &Path| -> Option<(u32, u64)> {
        let text = std::fs::read_to_string(path).ok()?;
        let fields: Vec<&str> = text[text.rfind(')')? + 2..].split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        Some((
            ppid,
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?,
        ))
    };
    let own = stat(&Path::new("/proc").join(pid.to_string()).join("stat")).map_or(0, |s| s.1);
    let children: u64 = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| stat(&e.ok()?.path().join("stat")))
        .filter(|(ppid, _)| *ppid == pid)
        .map(|(_, ticks)| ticks)
        .sum();
    own + children
}
