//! The sidecar against real wireguard-go gateways in network namespaces, reporting to a real
//! `wglb` that it alone feeds: the balancer's gateways have no health port, so its built-in
//! checker is off and only the sidecar's reports move their health.
//!
//! Needs root, like every namespace test, and the `wglb` binary next to `wglb-healthcheck`
//! (`cargo test --workspace` builds both).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use wglb_lab::{metrics, require_root, wait_for, Daemon, Family, Keypair, Rig, RigSpec};

const METRICS: &str = "127.0.0.1:9640";
const GATEWAYS: usize = 3;
/// A probe round is at most interval + timeout (0.5 + 0.5 s); `fall = 2` rounds take a gateway
/// down, the balancer then waits its eviction delay (2 s): well within this.
const EJECTION: Duration = Duration::from_secs(8);

struct Setup {
    rig: Rig,
    balancer: Daemon,
    sidecar: Daemon,
    probe: Keypair,
}

fn wglb() -> Result<PathBuf> {
    let path = Path::new(env!("CARGO_BIN_EXE_wglb-healthcheck")).with_file_name("wglb");
    ensure!(
        path.is_file(),
        "no wglb binary at {} (cargo build -p wglb)",
        path.display()
    );
    Ok(path)
}

impl Setup {
    /// A rig with one client and three gateways that know the sidecar's probe peer, a balancer,
    /// and a sidecar whose [probes] section is `probes`.
    fn start(probes: &str) -> Result<Setup> {
        require_root()?;
        let rig = Rig::new(RigSpec {
            family: Family::V4,
            gateways: GATEWAYS,
            client_ports: vec![41_000],
            keepalive: None,
        })?;
        let probe = Keypair::generate()?;
        rig.add_gateway_peer(&probe.public)?;
        let dir = rig.temp_dir().to_path_buf();
        let socket = dir.join("api.sock");
        let mut balancer_config = format!(
            "[api]\nsocket = \"{}\"\n[metrics]\nlisten = \"{METRICS}\"\n\
             [[listener]]\nname = \"office\"\nlisten = \"0.0.0.0:51820\"\nhash_key = \"source-ip-port\"\n",
            socket.display()
        );
        let mut sidecar_config = format!(
            "source = \"hc-test\"\n[probes]\ninterval = \"500ms\"\ntimeout = \"500ms\"\nfall = 2\n\
             private_key_file = \"probe.key\"\n{probes}\n\
             [[balancer]]\napi = \"{}\"\n\
             [[location]]\nname = \"office\"\npublic_key = \"{}\"\n",
            socket.display(),
            rig.gateway_public_key()
        );
        for j in 0..GATEWAYS {
            let address = rig.gateway_addr(j);
            balancer_config +=
                &format!("[[listener.gateway]]\nname = \"gw{j}\"\naddress = \"{address}\"\n");
            sidecar_config += &format!(
                "[[location.gateway]]\nname = \"gw{j}\"\naddress = \"{address}\"\nhealth_port = {}\n",
                rig.gateway_health_port()
            );
        }
        std::fs::write(dir.join("wglb.toml"), balancer_config)?;
        probe.write_private(&dir.join("probe.key"))?;
        std::fs::write(dir.join("healthcheck.toml"), sidecar_config)?;
        let balancer = Daemon::spawn(
            rig.balancer_ns(),
            &wglb()?,
            &[
                "--log",
                "wglb=debug",
                "run",
                "--config",
                &path(&dir, "wglb.toml"),
            ],
            &dir.join("wglb.log"),
        )?;
        let sidecar = Daemon::spawn(
            rig.balancer_ns(),
            Path::new(env!("CARGO_BIN_EXE_wglb-healthcheck")),
            &[
                "--log",
                "wglb_healthcheck=debug",
                "--config",
                &path(&dir, "healthcheck.toml"),
            ],
            &dir.join("healthcheck.log"),
        )?;
        let setup = Setup {
            rig,
            balancer,
            sidecar,
            probe,
        };
        // Every gateway has a fresh report from the sidecar.
        setup.wait_metric(
            r#"wglb_health_report_up{gateway="#,
            Duration::from_secs(15),
            |v| v == GATEWAYS as f64,
        )?;
        Ok(setup)
    }

    fn metric(&self, prefix: &str) -> Result<f64> {
        let address: SocketAddr = METRICS.parse()?;
        let text = self
            .rig
            .balancer_ns()
            .run(move || metrics::scrape(address))??;
        Ok(metrics::sum(&text, prefix))
    }

    fn wait_metric(
        &self,
        prefix: &str,
        timeout: Duration,
        done: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        wait_for(prefix, timeout, || {
            let value = self.metric(prefix).ok();
            Ok(value.filter(|v| done(*v)))
        })
        .with_context(|| {
            format!(
                "balancer log:\n{}\nsidecar log:\n{}",
                tail(&self.balancer.log_text()),
                tail(&self.sidecar.log_text())
            )
        })
    }

    fn health(&self, j: usize, state: &str) -> String {
        format!(r#"wglb_gateway_health{{gateway="gw{j}",listener="office",state="{state}"}}"#)
    }

    /// Starts the client with a pinger and returns the gateway serving it.
    fn connect(&mut self) -> Result<(wglb_lab::Pinger, usize)> {
        let start = SystemTime::now();
        self.rig.start_client(0)?;
        let pinger = self.rig.pinger(0)?;
        pinger.wait_reply_after(start, Duration::from_secs(20))?;
        let j = self
            .rig
            .gateway_serving(0)?
            .context("no gateway serves the client")?;
        Ok((pinger, j))
    }
}

fn path(dir: &Path, file: &str) -> String {
    dir.join(file).display().to_string()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn a_dead_data_plane_is_ejected_though_its_health_endpoint_says_200() -> Result<()> {
    let mut setup = Setup::start("")?;
    let (pinger, j) = setup.connect()?;
    setup.rig.stop_gateway_wireguard(j)?;
    let stopped = SystemTime::now();
    // Its /health still answers 200: only the data-plane probes can tell.
    let health = SocketAddr::new(
        setup.rig.gateway_addr(j).ip(),
        setup.rig.gateway_health_port(),
    );
    let status = setup.rig.balancer_ns().run(move || {
        tokio::runtime::Runtime::new().map(|rt| {
            rt.block_on(wglb_healthcheck::http::probe_http(
                health,
                "/health",
                Duration::from_secs(1),
            ))
        })
    })??;
    ensure!(status == Ok(200), "/health answered {status:?}");
    setup.wait_metric(&setup.health(j, "down"), EJECTION, |v| v == 1.0)?;
    setup.wait_metric(
        r#"wglb_session_evictions_total{listener="office",reason="gateway_gone"}"#,
        EJECTION,
        |v| v == 1.0,
    )?;
    eprintln!("ejected {:?} after WireGuard stopped", stopped.elapsed()?);
    // The client is placed again and answered through a live gateway.
    pinger.wait_reply_after(stopped + Duration::from_secs(1), Duration::from_secs(30))?;
    let now = setup.rig.gateway_serving(0)?;
    ensure!(now.is_some() && now != Some(j), "the client is on {now:?}");
    let log = setup.sidecar.log_text();
    ensure!(
        log.contains(&format!("gateway=gw{j} verdict=down")) && log.contains("port unreachable"),
        "{}",
        tail(&log)
    );
    Ok(())
}

#[test]
fn a_gateway_that_does_not_know_the_probe_peer_fails_the_handshake_probe() -> Result<()> {
    let setup = Setup::start("")?;
    setup.rig.remove_gateway_peer(1, &setup.probe.public)?;
    setup.wait_metric(&setup.health(1, "down"), EJECTION, |v| v == 1.0)?;
    // The others stay up.
    ensure!(setup.metric(&setup.health(0, "up"))? == 1.0);
    ensure!(setup.metric(&setup.health(2, "up"))? == 1.0);
    let log = setup.sidecar.log_text();
    ensure!(
        log.contains("gateway=gw1 verdict=down") && log.contains("probe peer is not configured"),
        "{}",
        tail(&log)
    );
    Ok(())
}

#[test]
fn a_closed_port_is_caught_by_the_icmp_check_alone() -> Result<()> {
    // The port probe as the only data-plane check.
    let mut setup = Setup::start("handshake = \"off\"")?;
    setup.rig.stop_gateway_wireguard(2)?;
    setup.wait_metric(&setup.health(2, "down"), EJECTION, |v| v == 1.0)?;
    let log = setup.sidecar.log_text();
    ensure!(
        log.contains("gateway=gw2 verdict=down") && !log.contains("handshake:"),
        "{}",
        tail(&log)
    );
    Ok(())
}

#[test]
fn core_detached_with_a_working_data_plane_stays_in_service_as_degraded() -> Result<()> {
    let setup = Setup::start("")?;
    setup.rig.set_gateway_health(0, false);
    wait_for(
        "the sidecar to call gw0 degraded",
        Duration::from_secs(8),
        || {
            Ok(setup
                .sidecar
                .log_text()
                .contains("gateway=gw0 verdict=degraded detail=degraded: Core detached")
                .then_some(()))
        },
    )
    .with_context(|| tail(&setup.sidecar.log_text()))?;
    // Past two more rounds and the balancer's eviction delay: still up, still reported up.
    std::thread::sleep(Duration::from_secs(4));
    ensure!(setup.metric(&setup.health(0, "up"))? == 1.0);
    ensure!(
        setup
            .metric(r#"wglb_health_report_up{gateway="gw0",listener="office",source="hc-test"}"#)?
            == 1.0
    );
    Ok(())
}
