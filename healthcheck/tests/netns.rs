//! The sidecar against real wireguard-go gateways in network namespaces, reporting to a real
//! `wglb` that it alone feeds: the balancer's gateways have no health port, so its built-in
//! checker is off and only the sidecar's reports move their health.
//!
//! Needs root, like every namespace test, and the `wglb` binary next to `wglb-healthcheck`
//! (`cargo test --workspace` builds both).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};
use wglb_healthcheck::registration::location_key;
use wglb_lab::{
    metrics, require_root, wait_for, Daemon, Family, HealthEndpoint, Keypair, Launch, Rig, RigSpec,
    Wglb,
};

const METRICS: &str = "127.0.0.1:9640";
const SIDECAR_METRICS: &str = "127.0.0.1:9641";
const GATEWAYS: usize = 3;
/// A probe round is at most interval + timeout (0.5 + 0.5 s); `fall = 2` rounds take a gateway
/// down, the balancer then waits its eviction delay (2 s): well within this.
const EJECTION: Duration = Duration::from_secs(8);

struct Setup {
    rig: Rig,
    balancer: Wglb,
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
    /// and a sidecar whose [probes] section is `probes`; both know every gateway from their files.
    fn start(probes: &str) -> Result<Setup> {
        let setup = Setup::start_with(probes, GATEWAYS, "", |_| Ok(()))?;
        // Every gateway has a fresh report from the sidecar.
        setup.wait_metric(
            r#"wglb_health_report_up{gateway="#,
            Duration::from_secs(15),
            |v| v == GATEWAYS as f64,
        )?;
        Ok(setup)
    }

    /// The balancer's file names gateways 0..in_files, and so does the sidecar's (under a
    /// [[location]] only if in_files > 0); `extra` goes at the end of the sidecar's file, after
    /// `prepare` has had the rig (to start what the sidecar needs before it starts).
    fn start_with(
        probes: &str,
        in_files: usize,
        extra: &str,
        prepare: impl FnOnce(&Rig) -> Result<()>,
    ) -> Result<Setup> {
        require_root()?;
        let rig = Rig::new(RigSpec {
            balancers: 1,
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
             [metrics]\nlisten = \"{SIDECAR_METRICS}\"\n[[balancer]]\napi = \"{}\"\n",
            socket.display(),
        );
        if in_files > 0 {
            sidecar_config += &format!(
                "[[location]]\nname = \"office\"\npublic_key = \"{}\"\n",
                rig.gateway_public_key()
            );
        }
        for j in 0..in_files {
            let address = rig.gateway_addr(j);
            balancer_config +=
                &format!("[[listener.gateway]]\nname = \"gw{j}\"\naddress = \"{address}\"\n");
            sidecar_config += &format!(
                "[[location.gateway]]\nname = \"gw{j}\"\naddress = \"{address}\"\nhealth_port = {}\n",
                rig.gateway_health_port()
            );
        }
        sidecar_config += extra;
        // Written before `prepare`, which may change it; the runner then starts from the file.
        std::fs::write(dir.join("wglb.toml"), balancer_config)?;
        probe.write_private(&dir.join("probe.key"))?;
        std::fs::write(dir.join("healthcheck.toml"), sidecar_config)?;
        prepare(&rig)?;
        let balancer_config = std::fs::read_to_string(dir.join("wglb.toml"))?;
        let balancer = Launch::new(&wglb()?, &dir, METRICS.parse()?)
            .inside(rig.balancer_ns())
            .config(&balancer_config)?;
        let sidecar = spawn_sidecar(&rig)?;
        Ok(Setup {
            rig,
            balancer,
            sidecar,
            probe,
        })
    }

    /// Stops the sidecar (SIGTERM) and starts it again with the same configuration; its log
    /// goes on in the same file.
    fn restart_sidecar(&mut self) -> Result<()> {
        let stopped = std::mem::replace(&mut self.sidecar, spawn_sidecar(&self.rig)?);
        drop(stopped);
        Ok(())
    }

    /// The balancer's series `prefix`; an error when it has none.
    fn metric(&self, prefix: &str) -> Result<f64> {
        self.balancer.metric(prefix)
    }

    /// [`Setup::metric`] of a counter that nothing may have created yet: absent is zero.
    fn metric_or_zero(&self, prefix: &str) -> Result<f64> {
        self.balancer.metric_or_zero(prefix)
    }

    /// The sidecar's metrics, served in the balancer namespace.
    fn sidecar_metrics(&self) -> Result<String> {
        let address: SocketAddr = SIDECAR_METRICS.parse()?;
        self.rig
            .balancer_ns()
            .run(move || metrics::scrape(address))?
    }

    fn wait_metric(
        &self,
        prefix: &str,
        timeout: Duration,
        done: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        metrics::wait_for_value(prefix, timeout, || self.balancer.metrics(), done).with_context(
            || {
                format!(
                    "balancer log:\n{}\nsidecar log:\n{}",
                    tail(&self.balancer.log_text()),
                    tail(&self.sidecar.log_text())
                )
            },
        )
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

fn spawn_sidecar(rig: &Rig) -> Result<Daemon> {
    let dir = rig.temp_dir();
    Daemon::spawn(
        rig.balancer_ns(),
        Path::new(env!("CARGO_BIN_EXE_wglb-healthcheck")),
        &[
            "--log",
            "wglb_healthcheck=debug",
            "--config",
            &path(dir, "healthcheck.toml"),
        ],
        &dir.join("healthcheck.log"),
    )
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
    // The sidecar's own metrics say the same, and promtool accepts them.
    let text = setup.sidecar_metrics()?;
    let series = |name: &str, labels: &str| metrics::value(&text, &format!("{name}{{{labels}"));
    let gateway = format!(r#"gateway="gw{j}",location="office""#);
    ensure!(
        series(
            "wglb_healthcheck_verdict",
            &format!(r#"{gateway},verdict="down""#)
        )? == 1.0
    );
    ensure!(series("wglb_healthcheck_verdict_changes_total", &gateway)? >= 1.0);
    let failed = format!(r#"{gateway},probe="handshake",result="fail""#);
    ensure!(series("wglb_healthcheck_probes_total", &failed)? >= 2.0);
    ensure!(series("wglb_healthcheck_balancer_connected", "")? == 1.0);
    ensure!(metrics::value(&text, "wglb_healthcheck_probe_duration_seconds_count")? > 0.0);
    metrics::check_exposition(&text)?;
    Ok(())
}

#[test]
fn a_dead_sidecar_leaves_every_session_untouched() -> Result<()> {
    let mut setup = Setup::start("")?;
    let (pinger, j) = setup.connect()?;
    let handshake = setup.rig.client_latest_handshake(0)?;
    let from_seq = pinger.last_seq();
    setup.sidecar.kill()?;
    // Its reports expire (3 x (interval + timeout)) and every gateway keeps its last health.
    setup.wait_metric("wglb_health_fail_static{", EJECTION, |v| {
        v == GATEWAYS as f64
    })?;
    for g in 0..GATEWAYS {
        ensure!(
            setup.metric(&setup.health(g, "up"))? == 1.0,
            "gw{g} is not up"
        );
    }
    // Long enough for a session that moved to have shown it (WireGuard's 5 s retry).
    std::thread::sleep(Duration::from_secs(6));
    let lost = pinger.lost_between(from_seq, pinger.last_seq().saturating_sub(6));
    ensure!(lost.is_empty(), "pings {lost:?} went unanswered");
    ensure!(setup.rig.gateway_serving(0)? == Some(j), "the client moved");
    ensure!(
        setup.rig.client_latest_handshake(0)? == handshake,
        "the client handshook again"
    );
    ensure!(
        setup.metric_or_zero("wglb_session_evictions_total{")? == 0.0,
        "sessions were evicted"
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
    setup
        .rig
        .set_gateway_health(0, HealthEndpoint::CoreDetached);
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

/// Defguard gateways 2.0.2 and later purge their WireGuard interface once Core's stream has been
/// gone for a grace period (30 s in 2.0.4). A Core outage turns every `/health` 503 (degraded,
/// in service); then one gateway purges its interface while its `/health` goes on answering 503:
/// the data-plane probes take it out and its client moves, while the others stay in service.
#[test]
fn a_gateway_that_purges_its_interface_after_core_left_is_taken_out() -> Result<()> {
    let mut setup = Setup::start("")?;
    let (pinger, j) = setup.connect()?;
    for k in 0..GATEWAYS {
        setup
            .rig
            .set_gateway_health(k, HealthEndpoint::CoreDetached);
    }
    wait_for(
        "the sidecar to call every gateway degraded",
        Duration::from_secs(8),
        || {
            let log = setup.sidecar.log_text();
            let all = (0..GATEWAYS).all(|k| {
                log.contains(&format!(
                    "gateway=gw{k} verdict=degraded detail=degraded: Core detached"
                ))
            });
            Ok(all.then_some(()))
        },
    )
    .with_context(|| tail(&setup.sidecar.log_text()))?;
    setup.rig.stop_gateway_wireguard(j)?;
    let purged = SystemTime::now();
    setup.wait_metric(&setup.health(j, "down"), EJECTION, |v| v == 1.0)?;
    pinger.wait_reply_after(purged + Duration::from_secs(1), Duration::from_secs(30))?;
    let now = setup.rig.gateway_serving(0)?;
    ensure!(now.is_some() && now != Some(j), "the client is on {now:?}");
    for k in (0..GATEWAYS).filter(|&k| k != j) {
        ensure!(
            setup.metric(&setup.health(k, "up"))? == 1.0,
            "gw{k} left service with Core gone"
        );
    }
    Ok(())
}

/// A stand-in for Defguard Core's REST API: the two listings the sidecar reads, in Core's JSON
/// shapes, behind a bearer token. The test changes the gateways it lists.
struct CoreStandIn {
    gateways: Arc<Mutex<String>>,
    /// The bodies of `POST /api/v1/device/network`, in order.
    posted: Arc<Mutex<Vec<serde_json::Value>>>,
}

const CORE: &str = "127.0.0.1:8000";
const CORE_TOKEN: &str = "core-api-token";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/defguard-2.0.1");

impl CoreStandIn {
    /// Location 1, "office", in MFA mode `mfa` ("disabled", "internal" or "external"). Network
    /// devices are answered in Defguard 2.0.1's shapes (the fixtures), and a device posted is
    /// listed from then on.
    fn start(rig: &Rig, mfa: &str) -> Result<CoreStandIn> {
        let networks = format!(
            r#"[{{"id":1,"name":"office","address":["10.99.0.1/24"],"port":51820,"pubkey":"{}","endpoint":"vpn.example.com","location_mfa_mode":"{mfa}"}}]"#,
            rig.gateway_public_key()
        );
        let fixture = |file: &str| std::fs::read_to_string(format!("{FIXTURES}/{file}"));
        let (list, free, added) = (
            fixture("device_network_list.json")?,
            fixture("device_network_ip.json")?,
            fixture("device_network_add.json")?,
        );
        let list: serde_json::Value = serde_json::from_str(&list)?;
        let gateways = Arc::new(Mutex::new("[]".to_string()));
        let posted: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let listener = rig.balancer_ns().run(|| TcpListener::bind(CORE))??;
        let (serving, devices) = (gateways.clone(), posted.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let Ok(read) = stream.try_clone() else {
                    continue;
                };
                let mut reader = BufReader::new(read);
                let mut request = String::new();
                let _ = reader.read_line(&mut request);
                let mut authorized = false;
                let mut length = 0;
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                        break;
                    }
                    authorized |= header
                        .trim()
                        .eq_ignore_ascii_case(&format!("authorization: Bearer {CORE_TOKEN}"));
                    if let Some((name, value)) = header.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                }
                let mut body = vec![0u8; length];
                let _ = std::io::Read::read_exact(&mut reader, &mut body);
                let mut words = request.split_whitespace();
                let (method, target) = (words.next(), words.next());
                let (status, body) = match (method, target) {
                    _ if !authorized => ("401 Unauthorized", "{}".to_string()),
                    (Some("GET"), Some("/api/v1/network")) => ("200 OK", networks.clone()),
                    (Some("GET"), Some("/api/v1/gateway")) => {
                        ("200 OK", serving.lock().unwrap().clone())
                    }
                    (Some("GET"), Some(t)) if t.starts_with("/api/v1/device/network?") => {
                        // The fixture's page, listing the devices posted so far.
                        let template = &list["data"][0];
                        let data: Vec<serde_json::Value> = devices
                            .lock()
                            .unwrap()
                            .iter()
                            .enumerate()
                            .map(|(i, posted)| {
                                let mut device = template.clone();
                                device["id"] = (i + 7).into();
                                device["name"] = posted["name"].clone();
                                device["wireguard_pubkey"] = posted["wireguard_pubkey"].clone();
                                device
                            })
                            .collect();
                        let mut page = list.clone();
                        page["pagination"]["total_items"] = data.len().into();
                        page["data"] = data.into();
                        ("200 OK", page.to_string())
                    }
                    (Some("GET"), Some("/api/v1/device/network/ip/1")) => ("200 OK", free.clone()),
                    (Some("POST"), Some("/api/v1/device/network")) => {
                        match serde_json::from_slice::<serde_json::Value>(&body) {
                            Ok(device) => {
                                devices.lock().unwrap().push(device);
                                ("201 Created", added.clone())
                            }
                            Err(_) => ("400 Bad Request", "{}".to_string()),
                        }
                    }
                    _ => ("404 Not Found", "{}".to_string()),
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Ok(CoreStandIn { gateways, posted })
    }

    /// Core's gateway rows: gateways adopted into location 1, by name and address.
    fn serve_gateways(&self, gateways: &[(&str, IpAddr)]) {
        let rows: Vec<String> = gateways
            .iter()
            .enumerate()
            .map(|(i, (name, ip))| {
                format!(
                    r#"{{"id":{},"location_id":1,"location_name":"office","name":"{name}","address":"{ip}","port":50066,"enabled":true,"connected":true,"version":"2.0.0"}}"#,
                    i + 1
                )
            })
            .collect();
        *self.gateways.lock().unwrap() = format!("[{}]", rows.join(","));
    }

    /// The network devices posted so far.
    fn posted(&self) -> Vec<serde_json::Value> {
        self.posted.lock().unwrap().clone()
    }

    /// Waits for the sidecar to register its probe peer, then does what Core does with a new
    /// network device: puts it on every gateway of the location. Returns the posted device.
    fn push_registered_device(&self, rig: &Rig) -> Result<serde_json::Value> {
        let device = wait_for(
            "the sidecar to register its probe peer",
            Duration::from_secs(10),
            || Ok(self.posted().into_iter().next()),
        )?;
        let key = device["wireguard_pubkey"]
            .as_str()
            .context("a key")?
            .to_string();
        rig.add_gateway_peer(&key)?;
        Ok(device)
    }
}

/// A setup whose sidecar follows a stand-in Core: location "office" in MFA mode `mfa`, with gw0
/// and gw1 adopted. The files name gw0 only (the balancer wants a gateway to start).
fn with_core(probes: &str, mfa: &str) -> Result<(Setup, CoreStandIn)> {
    let mut core = None;
    let extra = format!(
        "[core]\nurl = \"http://{CORE}\"\ntoken_file = \"core.token\"\ninterval = \"300ms\"\nhealth_port = 55003\n"
    );
    let setup = Setup::start_with(probes, 1, &extra, |rig| {
        std::fs::write(rig.temp_dir().join("core.token"), CORE_TOKEN)?;
        let stand_in = CoreStandIn::start(rig, mfa)?;
        stand_in.serve_gateways(&[
            ("gw0", rig.gateway_addr(0).ip()),
            ("gw1", rig.gateway_addr(1).ip()),
        ]);
        core = Some(stand_in);
        Ok(())
    })?;
    Ok((setup, core.context("the stand-in")?))
}

#[test]
fn gateways_follow_cores_list_into_the_balancer() -> Result<()> {
    // The balancer's file has gw0 only; Core lists gw0 and has adopted gw1.
    let (mut setup, core) = with_core("", "disabled")?;
    // The sidecar registers the probe peer of location 1 as a network device, as Core 2.0.1
    // takes it, with the key derived for that location and the address Core offered.
    let device = core.push_registered_device(&setup.rig)?;
    let probe = base64::engine::general_purpose::STANDARD.decode(&setup.probe.private)?;
    let probe = StaticSecret::from(<[u8; 32]>::try_from(probe.as_slice())?);
    let key = PublicKey::from(&location_key(&probe, 1));
    let key = base64::engine::general_purpose::STANDARD.encode(key.as_bytes());
    ensure!(device["wireguard_pubkey"] == key.as_str(), "{device}");
    ensure!(device["location_id"] == 1, "{device}");
    ensure!(
        device["assigned_ips"] == serde_json::json!(["10.99.0.3"]),
        "{device}"
    );
    ensure!(device["name"] == "wglb-probe-hc-test", "{device}");
    ensure!(device["description"].is_string(), "{device}");
    let state = |j: usize, state: &str| {
        format!(r#"wglb_gateway_admin_state{{gateway="gw{j}",listener="office",state="{state}"}}"#)
    };
    setup.wait_metric(&state(1, "active"), Duration::from_secs(10), |v| v == 1.0)?;
    // The location's public key, from Core, is the listener's: the balancer checks mac1 for it.
    wait_for(
        "the listener to take Core's key",
        Duration::from_secs(10),
        || {
            let status = setup.balancer.cli(&["--json", "status"])?;
            let status: serde_json::Value = serde_json::from_str(&status)?;
            let key = &status["listeners"][0]["public_key"];
            Ok((key.as_str() == Some(setup.rig.gateway_public_key())).then_some(()))
        },
    )?;
    // ... and the sidecar probes it and reports on it.
    setup.wait_metric(
        r#"wglb_health_report_up{gateway="gw1",listener="office",source="hc-test"}"#,
        Duration::from_secs(10),
        |v| v == 1.0,
    )?;
    // Core drops gw1: the balancer drains it (its sessions may finish) and the sidecar stops
    // probing it. gw0, which the balancer's file names too, is untouched.
    core.serve_gateways(&[("gw0", setup.rig.gateway_addr(0).ip())]);
    setup.wait_metric(&state(1, "draining"), Duration::from_secs(10), |v| v == 1.0)?;
    ensure!(setup.metric(&state(0, "active"))? == 1.0);
    let log = setup.sidecar.log_text();
    ensure!(
        log.contains("no longer probed location=office gateway=gw1"),
        "{}",
        tail(&log)
    );
    // Core lists gw1 again: the sidecar undrains what it drained.
    core.serve_gateways(&[
        ("gw0", setup.rig.gateway_addr(0).ip()),
        ("gw1", setup.rig.gateway_addr(1).ip()),
    ]);
    setup.wait_metric(&state(1, "active"), Duration::from_secs(10), |v| v == 1.0)?;
    // An empty answer (Core restarting) would drop both: held until three answers in a row say
    // so, and only then acted on.
    core.serve_gateways(&[]);
    setup.wait_metric(&state(0, "draining"), Duration::from_secs(10), |v| v == 1.0)?;
    let log = setup.sidecar.log_text();
    let line = |wanted: &dyn Fn(&str) -> bool| log.lines().position(wanted);
    let held = line(&|l| l.contains("held until 3 answers in a row say so (2 so far)"))
        .with_context(|| format!("no second hold: {}", tail(&log)))?;
    let drained = line(&|l| l.contains("gateway drained") && l.contains("gateway=gw0"))
        .with_context(|| format!("gw0 was not drained: {}", tail(&log)))?;
    ensure!(
        held < drained,
        "drained before the answer was confirmed: {}",
        tail(&log)
    );
    // A restarted sidecar finds its device again and adds none.
    core.serve_gateways(&[("gw0", setup.rig.gateway_addr(0).ip())]);
    setup.restart_sidecar()?;
    wait_for(
        "the restarted sidecar to find its device",
        Duration::from_secs(10),
        || {
            let log = setup.sidecar.log_text();
            Ok(log
                .contains("the probe peer is a network device of the location in Core")
                .then_some(()))
        },
    )?;
    ensure!(core.posted().len() == 1, "{:?}", core.posted());
    Ok(())
}

/// An MFA location, as Core says: its gateways carry only peers with a live MFA session, never
/// the standing probe peer, so a handshake probe would fail on every gateway. None runs there:
/// the port probe and `/health` keep the gateways in service, and the log says why.
#[test]
fn an_mfa_locations_gateways_are_judged_without_the_handshake_probe() -> Result<()> {
    let (setup, core) = with_core("handshake = \"required\"", "internal")?;
    for j in 0..GATEWAYS {
        setup.rig.remove_gateway_peer(j, &setup.probe.public)?;
    }
    for j in 0..2 {
        setup.wait_metric(
            &format!(
                r#"wglb_health_report_up{{gateway="gw{j}",listener="office",source="hc-test"}}"#
            ),
            Duration::from_secs(10),
            |v| v == 1.0,
        )?;
    }
    // Rounds go by (each runs every probe that is on) and the gateways stay up.
    let rounds = |j: usize| -> Result<f64> {
        let text = setup.sidecar_metrics()?;
        Ok(metrics::value_or_zero(
            &text,
            &format!(
                r#"wglb_healthcheck_probes_total{{gateway="gw{j}",location="office",probe="port",result="ok"}}"#
            ),
        ))
    };
    let before = rounds(0)?;
    wait_for("three more probe rounds", EJECTION, || {
        Ok((rounds(0)? >= before + 3.0).then_some(()))
    })?;
    let text = setup.sidecar_metrics()?;
    ensure!(
        !text.contains(r#"probe="handshake""#),
        "a handshake probe ran in an MFA location"
    );
    ensure!(setup.metric(&setup.health(0, "up"))? == 1.0);
    ensure!(setup.metric(&setup.health(1, "up"))? == 1.0);
    let log = setup.sidecar.log_text();
    ensure!(
        log.contains("probing an MFA location: no handshake probe"),
        "{}",
        tail(&log)
    );
    ensure!(
        core.posted().is_empty(),
        "a probe peer registered in an MFA location"
    );
    Ok(())
}

const GRPC: &str = "127.0.0.1:50070";

/// A gRPC channel to the sidecar's server inside the balancer namespace: the connection is made
/// there, then handed to tonic.
fn grpc_channel(rig: &Rig, runtime: &tokio::runtime::Runtime) -> Result<tonic::transport::Channel> {
    let stream = rig
        .balancer_ns()
        .run(|| std::net::TcpStream::connect(GRPC))??;
    stream.set_nonblocking(true)?;
    let stream = Mutex::new(Some(stream));
    let _entered = runtime.enter();
    let channel = runtime.block_on(
        tonic::transport::Endpoint::from_static("http://sidecar").connect_with_connector(
            tower::service_fn(move |_| {
                let stream = stream.lock().unwrap().take();
                async move {
                    let stream =
                        stream.ok_or_else(|| std::io::Error::other("one connection only"))?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::TcpStream::from_std(stream)?,
                    ))
                }
            }),
        ),
    )?;
    Ok(channel)
}

#[test]
fn the_topology_and_grpc_health_follow_a_gateway_that_fails() -> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use wglb_proto::v1::topology_client::TopologyClient;
    use wglb_proto::v1::{CoreAttachment, TopologyRequest, Verdict};

    let mut setup = Setup::start_with(
        "",
        GATEWAYS,
        &format!("[grpc]\nlisten = \"{GRPC}\"\n"),
        |_| Ok(()),
    )?;
    setup.wait_metric(
        r#"wglb_health_report_up{gateway="#,
        Duration::from_secs(15),
        |v| v == GATEWAYS as f64,
    )?;
    let runtime = tokio::runtime::Runtime::new()?;
    let channel = grpc_channel(&setup.rig, &runtime)?;
    let mut health = HealthClient::new(channel.clone());
    let mut topology = TopologyClient::new(channel);
    let check = |health: &mut HealthClient<_>| -> Result<i32> {
        let request = HealthCheckRequest {
            service: "wglb.gateway/office/gw1".into(),
        };
        Ok(runtime.block_on(health.check(request))?.into_inner().status)
    };
    ensure!(check(&mut health)? == ServingStatus::Serving as i32);
    let mut watch = runtime
        .block_on(topology.watch(TopologyRequest {}))?
        .into_inner();
    let mut next = |what: &str, done: &dyn Fn(&wglb_proto::v1::TopologySnapshot) -> bool| {
        runtime.block_on(async {
            tokio::time::timeout(EJECTION * 2, async {
                while let Some(snapshot) = watch.message().await? {
                    if done(&snapshot) {
                        return Ok(snapshot);
                    }
                }
                anyhow::bail!("the watch stream ended")
            })
            .await
            .with_context(|| format!("no snapshot where {what}"))?
        })
    };
    let gw1 = |s: &wglb_proto::v1::TopologySnapshot| {
        s.locations
            .iter()
            .flat_map(|l| &l.gateways)
            .find(|g| g.name == "gw1")
            .cloned()
    };
    let live = next("gw1 is up and the balancer is seen", &|s| {
        s.balancers.iter().any(|b| b.reachable)
            && gw1(s).is_some_and(|g| !g.balancers.is_empty() && g.verdict == Verdict::Up as i32)
    })?;
    let gateway = gw1(&live).context("gw1")?;
    ensure!(
        gateway.data_plane_up
            && gateway.core == CoreAttachment::Attached as i32
            && gateway.handshake_ms > 0.0
            && gateway.origin == "file",
        "{gateway:?}"
    );
    ensure!(live.source == "hc-test" && live.locations[0].gateways.len() == GATEWAYS);

    setup.rig.stop_gateway_wireguard(1)?;
    let dead = next("gw1 is down", &|s| {
        gw1(s).is_some_and(|g| g.verdict == Verdict::Down as i32 && !g.data_plane_up)
    })?;
    ensure!(gw1(&dead).context("gw1")?.core == CoreAttachment::Attached as i32);
    ensure!(check(&mut health)? == ServingStatus::NotServing as i32);
    Ok(())
}

#[test]
fn with_quorum_2_a_sidecar_cut_off_from_a_gateway_does_not_eject_it() -> Result<()> {
    let setup = Setup::start_with("", GATEWAYS, "", |rig| {
        let config = rig.temp_dir().join("wglb.toml");
        let text = std::fs::read_to_string(&config)?;
        std::fs::write(&config, format!("[health]\nquorum = 2\n{text}"))?;
        // A second sidecar will live in the client's namespace, with a way to gw1 and gw2
        // through the balancer's namespace and none to gw0.
        let via_balancer = rig.listen_addr(0).ip().to_string();
        for j in 1..GATEWAYS {
            let link = format!("10.202.{j}.0/24");
            wglb_lab::run(rig.client_ns(0).command("ip").args([
                "route",
                "add",
                &link,
                "via",
                &via_balancer,
            ]))?;
            wglb_lab::run(rig.gateway_ns(j).command("ip").args([
                "route",
                "add",
                "10.201.0.0/24",
                "via",
                &format!("10.202.{j}.1"),
            ]))?;
        }
        wglb_lab::run(rig.balancer_ns().command("sysctl").args([
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ]))?;
        Ok(())
    })?;
    let reports = |source: &str, j: usize| {
        format!(r#"wglb_health_report_up{{gateway="gw{j}",listener="office",source="{source}"}}"#)
    };
    for j in 0..GATEWAYS {
        setup.wait_metric(&reports("hc-test", j), Duration::from_secs(15), |v| {
            v == 1.0
        })?;
    }
    let dir = setup.rig.temp_dir();
    // A probe key of its own: with the first sidecar's, both would handshake as one peer on
    // the same 0.5 s beat, and a gateway drops a peer's initiation that follows its last one
    // within 20 ms (WireGuard's flood limit): on about one start in twelve one sidecar would
    // see gw1 down for good.
    let cut_off_key = Keypair::generate()?;
    cut_off_key.write_private(&dir.join("cut-off.key"))?;
    setup
        .rig
        .add_gateway_peers(std::slice::from_ref(&cut_off_key.public))?;
    let text = std::fs::read_to_string(dir.join("healthcheck.toml"))?
        .replace("source = \"hc-test\"", "source = \"hc-cut-off\"")
        .replace(
            "private_key_file = \"probe.key\"",
            "private_key_file = \"cut-off.key\"",
        )
        .replace(SIDECAR_METRICS, "127.0.0.1:9642");
    std::fs::write(dir.join("cut-off.toml"), text)?;
    let _cut_off = Daemon::spawn(
        setup.rig.client_ns(0),
        Path::new(env!("CARGO_BIN_EXE_wglb-healthcheck")),
        &["--config", &path(dir, "cut-off.toml")],
        &dir.join("cut-off.log"),
    )?;
    // It sees gw1 and gw2 up, and gw0 down.
    setup.wait_metric(&reports("hc-cut-off", 1), EJECTION, |v| v == 1.0)?;
    setup.wait_metric(&reports("hc-cut-off", 0), EJECTION, |v| v == 0.0)?;
    // One of the two fresh sources says down, the quorum is two: gw0 stays up, past the
    // balancer's eviction delay.
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        setup.metric(&setup.health(0, "up"))? == 1.0,
        "gw0 was ejected"
    );
    // When both see it dead, it goes.
    let mut setup = setup;
    setup.rig.stop_gateway_wireguard(0)?;
    setup.wait_metric(&setup.health(0, "down"), EJECTION, |v| v == 1.0)?;
    Ok(())
}
