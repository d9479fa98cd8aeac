//! Health input. Every source of gateway health (the built-in checker here, sidecars through the
//! API) sends [`Observation`]s to the control plane, which combines them by quorum
//! ([`crate::quorum`]), so sources can be added without the datapath knowing. The built-in checker
//! implements Defguard's gateway contract: `GET /health` on the gateway's health port answers 200
//! while the gateway works, and 503 while it works without Core.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wglb_probe::http::{probe_http, CORE_DETACHED};
use wglb_probe::thresholds::Thresholds;

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
    /// The gateway's data plane is gone, as its own agent sees first hand: it is down at once.
    pub gone: bool,
    pub detail: String,
    pub ttl: Duration,
}

/// Name of the built-in checker as a health source.
pub const BUILTIN_SOURCE: &str = "builtin-http";

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
            let result = judge(
                probe_http(target, &params.path, params.timeout).await,
                target,
                &params.path,
            );
            if let Err(why) = &result {
                tracing::debug!(%listener, %gateway, "health check failed: {why}");
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
                    Ok(why) | Err(why) => why,
                };
            }
            let observation = Observation {
                listener: listener.clone(),
                gateway: gateway.clone(),
                address: Some(address),
                source: BUILTIN_SOURCE.into(),
                healthy: verdict.healthy(),
                gone: false,
                detail: detail.clone(),
                ttl,
            };
            if observations.send(observation).await.is_err() {
                return;
            }
        }
    })
}

/// One probe's result: healthy or not, and why. Only a gateway that answers is alive, and a
/// `503 Not connected to core` is such an answer: the gateway lost Core, not WireGuard (a Core
/// outage turns every gateway's /health 503 at once), so it stays in placement as degraded, as the
/// sidecar's verdict policy has it. Anything else (no connection, a reset, a timeout, not HTTP,
/// another status) is a dead gateway.
fn judge(probe: Result<u16, String>, target: SocketAddr, path: &str) -> Result<String, String> {
    match probe {
        Ok(200) => Ok(format!("GET {target}{path} answered 200")),
        Ok(CORE_DETACHED) => Ok(format!(
            "degraded: Core detached (GET {target}{path} answered {CORE_DETACHED})"
        )),
        Ok(code) => Err(format!("GET {target}{path}: status {code}")),
        Err(why) => Err(format!("GET {target}{path}: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_checker_says_nothing_until_a_result_backs_its_verdict() {
        let down = closed_port().await;
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
        let down = closed_port().await;
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
            !first.healthy && first.detail.contains("connect") && first.address == Some(gateway),
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

    #[test]
    fn only_a_503_from_a_live_gateway_is_degraded_the_rest_is_dead() {
        let target: SocketAddr = "10.0.0.1:55003".parse().unwrap();
        let judged = |probe| judge(probe, target, "/health");
        assert_eq!(
            judged(Ok(200)),
            Ok("GET 10.0.0.1:55003/health answered 200".into())
        );
        assert_eq!(
            judged(Ok(503)),
            Ok("degraded: Core detached (GET 10.0.0.1:55003/health answered 503)".into())
        );
        for dead in [
            Ok(500),
            Ok(404),
            Err("connect: Connection refused (os error 111)".to_string()),
            Err("receive: Connection reset by peer (os error 104)".to_string()),
            Err("no answer within 1s".to_string()),
            Err("not an HTTP response: \"SSH-2.0\"".to_string()),
        ] {
            let why = judged(dead.clone()).unwrap_err();
            assert!(
                why.starts_with("GET 10.0.0.1:55003/health: "),
                "{dead:?}: {why}"
            );
        }
    }

    #[tokio::test]
    async fn a_gateway_answering_503_is_reported_healthy_and_degraded() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0; 512];
                let _ = stream.read(&mut request).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\n\r\nNot connected to core")
                    .await;
            }
        });
        let (tx, mut rx) = mpsc::channel(4);
        let params = HealthCheckConfig {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(500),
            ..Default::default()
        };
        let gateway: SocketAddr = "127.0.0.1:51820".parse().unwrap();
        let task = spawn_http_checker("l".into(), "g".into(), gateway, port, params, tx);
        let first = tokio::time::timeout(Duration::from_secs(3), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            first.healthy && first.detail.starts_with("degraded: Core detached (GET "),
            "{first:?}"
        );
        task.abort();
        server.abort();
    }

    /// A port nothing listens on: every probe fails to connect.
    async fn closed_port() -> SocketAddr {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    }
}
