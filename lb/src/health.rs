//! Health input. Every source of gateway health (the built-in checker here, sidecars through the
//! API) sends [`Observation`]s to the control plane, which combines them by quorum
//! ([`crate::quorum`]), so sources can be added without the datapath knowing. The built-in checker
//! implements Defguard's gateway contract: `GET /health` on the gateway's health port answers 200
//! while the gateway works.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::HealthCheckConfig;

/// A source's current verdict on one gateway. Sources repeat it at least once per `ttl`: a
/// verdict not repeated in time stops counting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub listener: String,
    pub gateway: String,
    /// The gateway address the verdict is about, when the source knows it: a verdict on an old
    /// address must not mark a gateway that has since moved.
    pub address: Option<SocketAddr>,
    pub source: String,
    pub healthy: bool,
    pub detail: String,
    pub ttl: Duration,
}

/// Name of the built-in checker as a health source.
pub const BUILTIN_SOURCE: &str = "builtin-http";

/// One `GET path` against `target`; Ok on a 200 status line, Err with what went wrong otherwise.
pub async fn probe_http(target: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(target)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: wglb\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        // The status line is all we need; a gateway's answer is tiny.
        let mut head = Vec::with_capacity(128);
        let mut chunk = [0u8; 128];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("receive: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or_default();
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some(v), Some("200")) if v.starts_with("HTTP/") => Ok(()),
            (Some(v), Some(code)) if v.starts_with("HTTP/") => {
                Err(format!("status {code}: {}", line.trim()))
            }
            _ => Err(format!(
                "not an HTTP response: {:?}",
                line.chars().take(60).collect::<String>()
            )),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Consecutive-result thresholds: `rise` successes bring a gateway up, `fall` failures take it
/// down. Gateways start up, so a restarted balancer keeps sending sessions where they were.
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

/// Probes one gateway forever, reporting its verdict after every probe (so that the control plane
/// can tell a live checker from a stuck one). Dropping the handle does not stop it: the owner
/// aborts it when the gateway leaves the configuration.
pub fn spawn_http_checker(
    listener: String,
    gateway: String,
    address: SocketAddr,
    health_port: u16,
    params: HealthCheckConfig,
    observations: mpsc::Sender<Observation>,
) -> JoinHandle<()> {
    let target = SocketAddr::new(address.ip(), health_port);
    // Room for a slow probe and a late tick before the verdict goes stale.
    let ttl = 3 * (params.interval + params.timeout);
    tokio::spawn(async move {
        let mut verdict = Thresholds::new(params.rise, params.fall);
        // Empty until a result backs the verdict.
        let mut detail = String::new();
        let mut ticks = tokio::time::interval(params.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let result = probe_http(target, &params.path, params.timeout).await;
            if let Err(why) = &result {
                tracing::debug!(%listener, %gateway, %target, "health check failed: {why}");
            }
            verdict.record(result.is_ok());
            // The detail is the latest result that agrees with the verdict: a lone failure
            // below the fall threshold does not explain an up verdict. Until one agrees, the
            // verdict is only the starting assumption: a checker (re)started in front of a dead
            // gateway must not report it up while its first failures build up to `fall`.
            if result.is_ok() != verdict.healthy() {
                if detail.is_empty() {
                    continue;
                }
            } else {
                detail = match result {
                    Ok(()) => format!("GET {}{} answered 200", target, params.path),
                    Err(why) => format!("GET {}{}: {why}", target, params.path),
                };
            }
            let observation = Observation {
                listener: listener.clone(),
                gateway: gateway.clone(),
                address: Some(address),
                source: BUILTIN_SOURCE.into(),
                healthy: verdict.healthy(),
                detail: detail.clone(),
                ttl,
            };
            if observations.send(observation).await.is_err() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

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

    /// Serves one canned response per connection on loopback.
    async fn server(response: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf).await;
                if !response.is_empty() {
                    let _ = stream.write_all(response).await;
                }
                // An empty response means: hold the connection open and say nothing.
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn probe_reads_defguards_answers() {
        let timeout = Duration::from_millis(300);
        let alive = server(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nalive").await;
        assert_eq!(probe_http(alive, "/health", timeout).await, Ok(()));
        let detached =
            server(b"HTTP/1.1 503 Service Unavailable\r\n\r\nNot connected to core").await;
        let err = probe_http(detached, "/health", timeout).await.unwrap_err();
        assert!(err.contains("503"), "{err}");
        let silent = server(b"").await;
        let err = probe_http(silent, "/health", timeout).await.unwrap_err();
        assert!(err.contains("no answer"), "{err}");
        let junk = server(b"SSH-2.0-OpenSSH\r\n").await;
        let err = probe_http(junk, "/health", timeout).await.unwrap_err();
        assert!(err.contains("not an HTTP response"), "{err}");
        // Nothing listens on a port we just released.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = probe_http(closed, "/health", timeout).await.unwrap_err();
        assert!(err.contains("connect"), "{err}");
    }

    #[tokio::test]
    async fn a_new_checker_says_nothing_until_a_result_backs_its_verdict() {
        let down = server(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let (tx, mut rx) = mpsc::channel(4);
        let params = HealthCheckConfig {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(100),
            fall: 3,
            ..Default::default()
        };
        let gateway: SocketAddr = SocketAddr::new(down.ip(), 51820);
        let task = spawn_http_checker("l".into(), "g".into(), gateway, down.port(), params, tx);
        // Starting from "up", its first two failures must not come out as "up".
        let first = tokio::time::timeout(Duration::from_secs(3), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(!first.healthy, "{first:?}");
        task.abort();
    }

    #[tokio::test]
    async fn checker_repeats_its_verdict_after_every_probe() {
        let down = server(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let (tx, mut rx) = mpsc::channel(4);
        let params = HealthCheckConfig {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let gateway: SocketAddr = SocketAddr::new(down.ip(), 51820);
        let task = spawn_http_checker("l".into(), "g".into(), gateway, down.port(), params, tx);
        let first = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            !first.healthy && first.detail.contains("503") && first.address == Some(gateway),
            "{first:?}"
        );
        // Still down: the same verdict again, so it does not go stale.
        let second = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(!second.healthy && second.ttl == first.ttl, "{second:?}");
        task.abort();
    }
}
