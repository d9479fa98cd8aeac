//! A continuous `ping` through a client's tunnel, recording when each echo came back.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::cmd;
use crate::netns::Netns;

/// `ping -D -O -n -i 0.2 -W 1` in a client namespace. `-D` stamps every reply with the time it
/// arrived, so failover times are measured by ping itself rather than by when the test looked;
/// `-O` reports unanswered sequence numbers, so losses are visible while ping keeps running.
pub struct Pinger {
    child: Child,
    log: Arc<Mutex<PingLog>>,
    reader: Option<JoinHandle<()>>,
    stderr: PathBuf,
}

#[derive(Default)]
struct PingLog {
    replies: Vec<(SystemTime, u32)>,
    highest_seq: u32,
    exited: bool,
}

#[derive(Debug, PartialEq)]
enum Line {
    Reply(SystemTime, u32),
    NoReply(u32),
}

impl Pinger {
    pub(crate) fn spawn(ns: &Netns, target: Ipv4Addr, stderr: &Path) -> Result<Pinger> {
        let stderr_file = File::create(stderr)
            .with_context(|| format!("creating log file {}", stderr.display()))?;
        let mut command = ns.command("ping");
        command
            .args(["-D", "-O", "-n", "-i", "0.2", "-W", "1"])
            .arg(target.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr_file);
        let child = command
            .spawn()
            .with_context(|| format!("failed to start `{}`", cmd::describe(&command)))?;
        let mut pinger = Pinger {
            child,
            log: Arc::default(),
            reader: None,
            stderr: stderr.to_owned(),
        };
        let stdout = pinger.child.stdout.take().context("ping's stdout")?;
        let log = pinger.log.clone();
        pinger.reader = Some(
            thread::Builder::new()
                .name(format!("ping {}", ns.name()))
                .spawn(move || {
                    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                        if let Some(line) = parse_line(&line) {
                            lock(&log).record(line);
                        }
                    }
                    lock(&log).exited = true;
                })
                .context("spawning the ping reader thread")?,
        );
        Ok(pinger)
    }

    /// Every reply so far, in arrival order, with the time ping stamped on it.
    pub fn replies(&self) -> Vec<(SystemTime, u32)> {
        lock(&self.log).replies.clone()
    }

    /// The highest icmp_seq that ping has reported on, answered or not: pings up to here have
    /// been sent, and all but possibly the last one have either been answered or given up on.
    pub fn sent(&self) -> u32 {
        lock(&self.log).highest_seq
    }

    /// The highest icmp_seq that got a reply (0 before the first reply).
    pub fn last_seq(&self) -> u32 {
        lock(&self.log).last_replied()
    }

    pub fn first_reply_after(&self, t: SystemTime) -> Option<SystemTime> {
        lock(&self.log).first_reply_after(t)
    }

    pub fn wait_reply_after(&self, t: SystemTime, timeout: Duration) -> Result<SystemTime> {
        let what = format!("a ping reply through the tunnel after {}", format_time(t));
        cmd::wait_for(what, timeout, || {
            if let Some(at) = self.first_reply_after(t) {
                return Ok(Some(at));
            }
            if lock(&self.log).exited {
                bail!(
                    "ping exited; its stderr: {}",
                    fs::read_to_string(&self.stderr).unwrap_or_default().trim()
                );
            }
            Ok(None)
        })
        .with_context(|| {
            let log = lock(&self.log);
            format!(
                "ping sent up to icmp_seq {} and got {} replies in all",
                log.highest_seq,
                log.replies.len()
            )
        })
    }

    /// Sequence numbers in `from_seq..=to_seq` that have not been answered.
    pub fn lost_between(&self, from_seq: u32, to_seq: u32) -> Vec<u32> {
        lock(&self.log).lost_between(from_seq, to_seq)
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        if let Err(error) = cmd::terminate(&mut self.child, Duration::from_secs(2)) {
            tracing::warn!("could not stop ping {}: {error}", self.child.id());
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl PingLog {
    fn record(&mut self, line: Line) {
        let seq = match line {
            Line::Reply(at, seq) => {
                self.replies.push((at, seq));
                seq
            }
            Line::NoReply(seq) => seq,
        };
        self.highest_seq = self.highest_seq.max(seq);
    }

    fn last_replied(&self) -> u32 {
        self.replies.iter().map(|&(_, seq)| seq).max().unwrap_or(0)
    }

    fn first_reply_after(&self, t: SystemTime) -> Option<SystemTime> {
        self.replies.iter().map(|&(at, _)| at).find(|&at| at > t)
    }

    fn lost_between(&self, from_seq: u32, to_seq: u32) -> Vec<u32> {
        (from_seq..=to_seq)
            .filter(|seq| !self.replies.iter().any(|&(_, replied)| replied == *seq))
            .collect()
    }
}

/// A panicking reader thread must not make every later query panic too.
fn lock(log: &Mutex<PingLog>) -> MutexGuard<'_, PingLog> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Understands `[1700000000.123456] 64 bytes from 10.99.0.1: icmp_seq=3 ttl=64 time=0.5 ms`,
/// and treats any other line carrying an icmp_seq (`no answer yet for icmp_seq=4`, ICMP errors)
/// as a ping that was sent but not answered.
fn parse_line(line: &str) -> Option<Line> {
    let seq = line
        .split_once("icmp_seq=")?
        .1
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    if line.contains(" bytes from ") {
        let stamp = line.strip_prefix('[')?.split_once(']')?.0;
        return Some(Line::Reply(parse_stamp(stamp)?, seq));
    }
    Some(Line::NoReply(seq))
}

/// Parses `secs.micros` exactly; going through f64 would lose sub-microsecond precision.
fn parse_stamp(stamp: &str) -> Option<SystemTime> {
    let (secs, frac) = stamp.split_once('.').unwrap_or((stamp, ""));
    let secs: u64 = secs.parse().ok()?;
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: u32 = format!("{frac:0<9}").parse().ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

pub(crate) fn format_time(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        Ok(since) => format!("{}.{:03}", since.as_secs(), since.subsec_millis()),
        Err(_) => format!("{t:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies_and_misses() {
        assert_eq!(
            parse_line(
                "[1795314250.693008] 64 bytes from 10.99.0.1: icmp_seq=12 ttl=64 time=0.279 ms"
            ),
            Some(Line::Reply(
                UNIX_EPOCH + Duration::new(1_795_314_250, 693_008_000),
                12
            ))
        );
        assert_eq!(
            parse_line("[1795314256.170491] no answer yet for icmp_seq=7"),
            Some(Line::NoReply(7))
        );
        assert_eq!(
            parse_line("From 10.99.0.10 icmp_seq=3 Destination Host Unreachable"),
            Some(Line::NoReply(3))
        );
        assert_eq!(
            parse_line("PING 10.99.0.1 (10.99.0.1) 56(84) bytes of data."),
            None
        );
    }

    #[test]
    fn tracks_losses_and_sequence_numbers() {
        let mut log = PingLog::default();
        let second = |s| UNIX_EPOCH + Duration::from_secs(s);
        log.record(Line::Reply(second(1), 1));
        log.record(Line::NoReply(2));
        log.record(Line::NoReply(3));
        log.record(Line::Reply(second(4), 4));
        log.record(Line::NoReply(5));
        assert_eq!(log.highest_seq, 5);
        assert_eq!(log.last_replied(), 4);
        assert_eq!(log.lost_between(1, 5), vec![2, 3, 5]);
        assert_eq!(log.first_reply_after(second(1)), Some(second(4)));
        assert_eq!(log.first_reply_after(second(4)), None);
    }
}
