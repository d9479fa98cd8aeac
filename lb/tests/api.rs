//! The API and the CLI against a real `wglb` process: real gRPC over its Unix socket (and over
//! TCP with a token), the `wglb` client commands with their output and exit codes, and the
//! Prometheus exposition checked by promtool. Gateways are echo stand-ins on loopback; each test
//! has its own 127.32.0.x address.

mod local;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use local::{at, cli, clients_for, temp_path, Client, Gateway, Wglb};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use wglb::api::pb;
use wglb_lab::metrics;

fn two_gateways(ip: Ipv4Addr, extra: &str) -> Result<(String, [Gateway; 2])> {
    let gateways = [
        Gateway::start(at(ip, 52001))?,
        Gateway::start(at(ip, 52002))?,
    ];
    let config = format!(
        "[[listener]]\nname = \"office\"\nlisten = \"{}\"\nhash_key = \"source-ip-port\"\n{extra}\n\
         [[listener.gateway]]\nname = \"a\"\naddress = \"{}\"\n\
         [[listener.gateway]]\nname = \"b\"\naddress = \"{}\"\n",
        at(ip, 51820),
        gateways[0].address,
        gateways[1].address,
    );
    Ok((config, gateways))
}

fn gateway_json<'a>(gateways: &'a serde_json::Value, name: &str) -> Result<&'a serde_json::Value> {
    gateways["gateways"]
        .as_array()
        .context("a gateways array")?
        .iter()
        .find(|g| g["name"] == name)
        .with_context(|| format!("gateway {name} listed"))
}

#[test]
fn drain_through_the_cli_keeps_sessions_and_places_new_clients_elsewhere() -> Result<()> {
    let ip = Ipv4Addr::new(127, 32, 0, 1);
    let (config, [a, b]) = two_gateways(ip, "")?;
    let wglb = Wglb::start_with_file(&config, at(ip, 9638))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let events: Arc<Mutex<Vec<pb::Event>>> = Arc::default();
    {
        let mut api = runtime.block_on(wglb.connect())?;
        let mut stream = runtime
            .block_on(api.events.watch(pb::WatchRequest {}))?
            .into_inner();
        let events = events.clone();
        runtime.spawn(async move {
            while let Some(Ok(event)) = stream.next().await {
                events.lock().unwrap().push(event);
            }
        });
    }

    let listener = at(ip, 51820);
    let to_a = clients_for(&config, Ipv4Addr::new(127, 32, 1, 1), 40_000, "a", 11);
    let old = Client::new(to_a[0], listener)?;
    old.round_trip()?;
    ensure!(a.count() == 1 && b.count() == 0);

    let out = wglb.cli_ok(&["drain", "a"])?;
    ensure!(out.contains("draining"), "drain printed {out}");
    let gateways = wglb.cli_json(&["gateways"])?;
    let listed = gateway_json(&gateways, "a")?;
    ensure!(
        listed["state"] == "draining" && listed["sessions"] == 1,
        "{listed}"
    );

    // The drained gateway keeps its session; newcomers that would have gone to it go to b.
    old.round_trip()?;
    ensure!(
        a.count() == 2,
        "the existing session left the drained gateway"
    );
    for &client in &to_a[1..] {
        Client::new(client, listener)?.round_trip()?;
    }
    ensure!(
        a.count() == 2 && b.count() == 10,
        "a {} b {}",
        a.count(),
        b.count()
    );
    let on_a = wglb.cli_json(&["sessions", "--gateway", "a"])?;
    ensure!(on_a["total"] == 1, "{on_a}");
    ensure!(
        on_a["sessions"][0]["client"] == old.address().to_string(),
        "{on_a}"
    );

    let out = wglb.cli_ok(&["undrain", "a"])?;
    ensure!(out.contains("active"), "undrain printed {out}");
    let more = clients_for(&config, Ipv4Addr::new(127, 32, 1, 2), 40_000, "a", 1);
    Client::new(more[0], listener)?.round_trip()?;
    ensure!(a.count() == 3, "an undrained gateway took no new client");

    wglb.wait("the drain and undrain events", |_| {
        let events = events.lock().unwrap();
        let states: Vec<pb::GatewayState> = events
            .iter()
            .filter(|e| e.kind() == pb::event::Kind::GatewayState && e.gateway == "a")
            .map(|e| e.state())
            .collect();
        states == [pb::GatewayState::Draining, pb::GatewayState::Active]
    })?;
    // An unknown gateway is refused with exit code 1.
    let unknown = wglb.cli(&["drain", "nope"])?;
    ensure!(unknown.status.code() == Some(1), "{unknown:?}");
    ensure!(String::from_utf8_lossy(&unknown.stderr).contains("no listener has a gateway `nope`"));
    Ok(())
}

#[test]
fn drain_wait_returns_once_sessions_idle_out_and_gives_up_at_its_timeout() -> Result<()> {
    let ip = Ipv4Addr::new(127, 32, 0, 2);
    let (config, [a, _b]) = two_gateways(ip, "idle_timeout = \"2s\"")?;
    let wglb = Wglb::start_with_file(&config, at(ip, 9638))?;
    let listener = at(ip, 51820);
    let to_a = clients_for(&config, Ipv4Addr::new(127, 32, 2, 1), 40_000, "a", 2);
    Client::new(to_a[0], listener)?.round_trip()?;
    ensure!(a.count() == 1);

    let started = Instant::now();
    let output = wglb.cli(&["drain", "a", "--wait", "--timeout", "30s"])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "{output:?}");
    ensure!(
        stderr.contains("draining a: 1 session(s) left"),
        "progress: {stderr}"
    );
    ensure!(String::from_utf8_lossy(&output.stdout).contains("a is drained"));
    // It waited for the session to idle out (2 s), not less.
    ensure!(started.elapsed() >= Duration::from_millis(1500));
    ensure!(
        wglb.metric(r#"wglb_session_evictions_total{listener="office",reason="idle"}"#)? == 1.0
    );

    // A session that keeps talking outlasts a short --timeout: exit code 3, still draining.
    wglb.cli_ok(&["undrain", "a"])?;
    let busy = Client::new(to_a[1], listener)?;
    busy.round_trip()?;
    let stop = Arc::new(AtomicBool::new(false));
    let talker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = busy.round_trip();
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let output = wglb.cli(&["drain", "a", "--wait", "--timeout", "3s"])?;
    stop.store(true, Ordering::Relaxed);
    talker.join().unwrap();
    ensure!(output.status.code() == Some(3), "{output:?}");
    ensure!(String::from_utf8_lossy(&output.stderr).contains("still holds 1 session(s)"));
    let gateways = wglb.cli_json(&["gateways"])?;
    ensure!(gateway_json(&gateways, "a")?["state"] == "draining");
    Ok(())
}

#[test]
fn sessions_are_paged_in_order_and_evicted_by_client_or_gateway() -> Result<()> {
    let ip = Ipv4Addr::new(127, 32, 0, 3);
    let (config, [a, b]) = two_gateways(ip, "")?;
    let wglb = Wglb::start_with_file(&config, at(ip, 9638))?;
    let listener = at(ip, 51820);
    let clients: Vec<Client> = (0..25)
        .map(|i| Client::new(at(Ipv4Addr::new(127, 32, 3, 1), 40_000 + i), listener))
        .collect::<Result<_>>()?;
    for client in &clients {
        client.round_trip()?;
    }
    ensure!(a.count() + b.count() == 25 && a.count() > 0 && b.count() > 0);

    let runtime = tokio::runtime::Runtime::new()?;
    let mut api = runtime.block_on(wglb.connect())?;
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = runtime
            .block_on(api.control.list_sessions(pb::ListSessionsRequest {
                page_size: 7,
                page_token: token.clone(),
                ..Default::default()
            }))?
            .into_inner();
        pages += 1;
        ensure!(page.total == 25 && page.sessions.len() <= 7);
        seen.extend(page.sessions.into_iter().map(|s| s.client));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut expected: Vec<String> = clients.iter().map(|c| c.address().to_string()).collect();
    expected.sort_by_key(|c| c.parse::<std::net::SocketAddr>().unwrap());
    ensure!(pages == 4 && seen == expected, "pages {pages}: {seen:?}");

    let first_ten = wglb.cli_json(&["sessions", "--limit", "10"])?;
    ensure!(first_ten["total"] == 25 && first_ten["sessions"].as_array().unwrap().len() == 10);
    let table = wglb.cli_ok(&["sessions", "--all"])?;
    ensure!(table.contains("25 of 25 session(s) shown"), "{table}");

    let one = clients[3].address().to_string();
    let out = wglb.cli_ok(&["evict", "--client", &one])?;
    ensure!(out.contains("evicted 1 session(s)"), "{out}");
    ensure!(wglb.cli_json(&["sessions", "--client", &one])?["total"] == 0);
    let gateways = wglb.cli_json(&["gateways"])?;
    let on_a = gateway_json(&gateways, "a")?["sessions"].as_u64().unwrap();
    let evicted = wglb.cli_json(&["evict", "--gateway", "a"])?;
    ensure!(evicted["evicted"] == on_a, "{evicted} vs {on_a} on a");
    let gateways = wglb.cli_json(&["gateways"])?;
    ensure!(gateway_json(&gateways, "a")?["sessions"] == 0);
    ensure!(
        wglb.metric(r#"wglb_session_evictions_total{listener="office",reason="operator"}"#)?
            == (1 + on_a) as f64
    );
    // An evicted client is placed again on its next packet.
    clients[3].round_trip()?;
    ensure!(wglb.cli_json(&["sessions", "--client", &one])?["total"] == 1);

    // The exposition after all of this is valid Prometheus text, by Prometheus' own linter.
    metrics::check_exposition(&metrics::scrape(wglb.metrics)?)?;
    Ok(())
}

#[test]
fn a_tcp_api_refuses_requests_without_its_token() -> Result<()> {
    let ip = Ipv4Addr::new(127, 32, 0, 4);
    let (pool, _gateways) = two_gateways(ip, "")?;
    let token_file = temp_path(ip, ".token");
    std::fs::write(&token_file, "0123456789abcdef0123456789abcdef\n")?;
    let tcp = at(ip, 9639);
    let config = format!(
        "[api]\nsocket = \"{}\"\nsocket_mode = \"0660\"\nsocket_group = \"daemon\"\n\
         tcp = \"{tcp}\"\ntoken_file = \"{}\"\n{pool}",
        temp_path(ip, ".sock").display(),
        token_file.display()
    );
    let wglb = Wglb::start_with_file(&config, at(ip, 9638))?;
    let url = format!("http://{tcp}");
    // Who may use the local socket: its mode and group say.
    let socket = std::fs::metadata(&wglb.api_socket)?;
    let daemon = nix::unistd::Group::from_name("daemon")?.context("a daemon group")?;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    ensure!(socket.permissions().mode() & 0o777 == 0o660);
    ensure!(socket.gid() == daemon.gid.as_raw());

    let anonymous = cli(&url, &["status"])?;
    ensure!(anonymous.status.code() == Some(5), "{anonymous:?}");
    ensure!(String::from_utf8_lossy(&anonymous.stderr).contains("bearer token"));
    let wrong = cli(
        &url,
        &["--token", "0123456789abcdef0123456789abcdeX", "gateways"],
    )?;
    ensure!(wrong.status.code() == Some(5), "{wrong:?}");
    let token_arg = token_file.display().to_string();
    let allowed = cli(&url, &["--token-file", &token_arg, "drain", "a"])?;
    ensure!(allowed.status.success(), "{allowed:?}");
    // The Unix socket needs no token: its file mode is the access control.
    let local = wglb.cli_json(&["gateways"])?;
    ensure!(gateway_json(&local, "a")?["state"] == "draining");

    // Nothing listens here: a clear error and exit code 4.
    let nobody = cli(temp_path(ip, ".nobody.sock"), &["status"])?;
    ensure!(nobody.status.code() == Some(4));
    ensure!(String::from_utf8_lossy(&nobody.stderr).contains("cannot reach the balancer's API"));

    // A TCP API without credentials is refused at start, with the line at fault.
    let open = format!("[api]\ntcp = \"{}\"\n{pool}", at(ip, 9640));
    let path = temp_path(ip, ".open.toml");
    std::fs::write(&path, open)?;
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_wglb"))
        .args(["run", "--config"])
        .arg(&path)
        .output()?;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&token_file);
    ensure!(refused.status.code() == Some(2), "{refused:?}");
    let why = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        why.contains("line 1 ([api])") && why.contains("token_file"),
        "{why}"
    );
    Ok(())
}

/// Reports through the health ingestion stream; returns the report's ack.
async fn report(
    reports: &mpsc::Sender<pb::HealthReport>,
    acks: &mut tonic::Streaming<pb::HealthReportAck>,
    source: &str,
    (gateway, healthy): (&str, bool),
    ttl: Duration,
) -> Result<pb::HealthReportAck> {
    reports
        .send(pb::HealthReport {
            source: source.into(),
            listener: "office".into(),
            gateway: gateway.into(),
            healthy,
            detail: format!("{source} says {}", if healthy { "up" } else { "down" }),
            ttl_ms: ttl.as_millis() as u64,
            ..Default::default()
        })
        .await?;
    acks.next().await.context("an ack")?.map_err(Into::into)
}

/// The series of a metric family in an exposition.
fn series(text: &str, name: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .count()
}

#[test]
fn health_reports_combine_by_quorum_and_silence_keeps_the_last_state() -> Result<()> {
    let ip = Ipv4Addr::new(127, 32, 0, 5);
    let (pool, _gateways) = two_gateways(ip, "")?;
    let config = format!("[health]\nquorum = 2\neviction_delay = \"0s\"\n{pool}");
    let wglb = Wglb::start_with_file(&config, at(ip, 9638))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut api = runtime.block_on(wglb.connect())?;
    let (reports, outgoing) = mpsc::channel(4);
    let mut acks = runtime
        .block_on(api.health.report(ReceiverStream::new(outgoing)))?
        .into_inner();
    let mut send = |source: &str, verdict: (&str, bool), ttl: Duration| {
        runtime.block_on(report(&reports, &mut acks, source, verdict, ttl))
    };
    let health_of = |wglb: &Wglb| -> Result<(String, bool)> {
        let gateways = wglb.cli_json(&["gateways"])?;
        let a = gateway_json(&gateways, "a")?;
        Ok((
            a["health"].as_str().unwrap().to_string(),
            a["fail_static"] == true,
        ))
    };
    // Long enough to outlast the checks of this first part on any machine.
    let long = Duration::from_secs(120);

    let ack = send("sidecar-1", ("a", false), long)?;
    ensure!(ack.accepted, "{ack:?}");
    ensure!(
        health_of(&wglb)? == ("up".into(), false),
        "one of a quorum of two took a down"
    );
    ensure!(send("sidecar-2", ("a", false), long)?.accepted);
    ensure!(
        health_of(&wglb)?.0 == "down",
        "a quorum of two did not take a down"
    );
    let refused = send("sidecar-1", ("zz", false), long)?;
    ensure!(
        !refused.accepted && refused.error.contains("no gateway `zz`"),
        "{refused:?}"
    );
    let status = wglb.cli_json(&["status"])?;
    ensure!(
        status["health_sources"] == serde_json::json!(["sidecar-1", "sidecar-2"]),
        "{status}"
    );
    ensure!(series(&metrics::scrape(wglb.metrics)?, "wglb_health_report_up") == 2);

    // Both reporters say it once more with a short time to live, then fall silent: their
    // reports expire, and the gateway keeps its last state instead of coming back up, and says so.
    for source in ["sidecar-1", "sidecar-2"] {
        ensure!(send(source, ("a", false), Duration::from_secs(1))?.accepted);
    }
    wglb.wait_metric(
        r#"wglb_health_fail_static{gateway="a",listener="office"}"#,
        |v| v == 1.0,
    )?;
    ensure!(health_of(&wglb)? == ("down".into(), true));
    let exposition = metrics::scrape(wglb.metrics)?;
    ensure!(
        series(&exposition, "wglb_health_report_up") == 0,
        "expired reports still exported"
    );

    // One comes back saying up: fewer than two say down, so a is up again.
    ensure!(send("sidecar-2", ("a", true), long)?.accepted);
    ensure!(health_of(&wglb)? == ("up".into(), false));
    ensure!(wglb.metric(r#"wglb_health_reports_total{result="accepted"}"#)? == 5.0);
    ensure!(wglb.metric(r#"wglb_health_reports_total{result="refused"}"#)? == 1.0);
    Ok(())
}

#[test]
fn gateways_added_and_removed_at_runtime_take_and_lose_clients() -> Result<()> {
    let ip = Ipv4Addr::new(127, 32, 0, 6);
    let (config, [a, _b]) = two_gateways(ip, "")?;
    let wglb = Wglb::start_with_file(&config, at(ip, 9638))?;
    let c = Gateway::start(at(ip, 52003))?;
    let address = c.address.to_string();
    let added = wglb.cli_json(&[
        "gateway",
        "add",
        "--listener",
        "office",
        "c",
        &address,
        "--weight",
        "3",
    ])?;
    ensure!(gateway_json(&added, "c")?["added_at_runtime"] == true);
    let listener = at(ip, 51820);
    for port in 40_000..40_020 {
        Client::new(at(Ipv4Addr::new(127, 32, 6, 1), port), listener)?.round_trip()?;
    }
    ensure!(c.count() > 0, "the added gateway took no client");

    // A reload of the unchanged file keeps the runtime gateway.
    wglb.cli_ok(&["reload"])?;
    ensure!(gateway_json(&wglb.cli_json(&["gateways"])?, "c").is_ok());
    let before = a.count();
    wglb.cli_ok(&["gateway", "remove", "--listener", "office", "a"])?;
    let gateways = wglb.cli_json(&["gateways"])?;
    ensure!(gateway_json(&gateways, "a").is_err(), "a is still listed");
    ensure!(wglb.cli_json(&["sessions", "--gateway", "a"])?["total"] == 0);
    for port in 40_000..40_020 {
        Client::new(at(Ipv4Addr::new(127, 32, 6, 2), port), listener)?.round_trip()?;
    }
    ensure!(a.count() == before, "a removed gateway still gets clients");
    // A weight out of range is refused by the CLI (usage, exit 2) and by the API itself.
    let bad = wglb.cli(&["gateway", "set", "b", "--weight", "70000"])?;
    ensure!(bad.status.code() == Some(2), "{bad:?}");
    let runtime = tokio::runtime::Runtime::new()?;
    let mut api = runtime.block_on(wglb.connect())?;
    let refused = runtime
        .block_on(api.control.set_gateway(pb::SetGatewayRequest {
            name: "b".into(),
            weight: 70_000,
            ..Default::default()
        }))
        .unwrap_err();
    ensure!(
        refused.code() == tonic::Code::InvalidArgument,
        "{refused:?}"
    );
    ensure!(refused.message().contains("outside 1..=65535"));
    Ok(())
}

/// A listener's public key set through the CLI (as the sidecar sets the one Core gives): from
/// then on initiations whose mac1 is wrong for it are dropped and counted; a reload of the
/// unchanged file keeps it; `--clear` ends the check; a key that is not one is refused.
#[test]
fn a_listener_key_set_at_runtime_checks_mac1_and_survives_reloads() -> Result<()> {
    let ip = Ipv4Addr::new(127, 32, 0, 8);
    let (config, [a, b]) = two_gateways(ip, "")?;
    let wglb = Wglb::start_with_file(&config, at(ip, 9638))?;
    let listener = at(ip, 51820);
    // The stand-in clients' initiations carry no mac1 (zeros): right for no key.
    Client::new(at(Ipv4Addr::new(127, 32, 8, 1), 40_000), listener)?.round_trip()?;
    let key = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
    let set = wglb.cli_json(&["key", "office", key])?;
    ensure!(set["public_key"] == key, "{set}");
    let status = wglb.cli_json(&["status"])?;
    ensure!(status["listeners"][0]["public_key"] == key, "{status}");
    let forwarded = a.count() + b.count();
    let wrong = Client::new(at(Ipv4Addr::new(127, 32, 8, 2), 40_000), listener)?;
    ensure!(
        wrong.exchange().is_err(),
        "an initiation with a wrong mac1 was answered"
    );
    ensure!(a.count() + b.count() == forwarded, "it reached a gateway");
    let dropped =
        r#"wglb_dropped_packets_total{direction="to_gateway",listener="office",reason="bad_mac1"}"#;
    ensure!(wglb.metric(dropped)? == 1.0);

    wglb.cli_ok(&["reload"])?;
    ensure!(wglb.cli_json(&["status"])?["listeners"][0]["public_key"] == key);
    let cleared = wglb.cli_json(&["key", "office", "--clear"])?;
    ensure!(cleared["public_key"].is_null(), "{cleared}");
    Client::new(at(Ipv4Addr::new(127, 32, 8, 3), 40_000), listener)?.round_trip()?;

    let bad = wglb.cli(&["key", "office", "c2hvcnQ="])?;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    ensure!(
        !bad.status.success() && stderr.contains("not a WireGuard key"),
        "{bad:?}"
    );
    let unknown = wglb.cli(&["key", "lab", key])?;
    ensure!(!unknown.status.success(), "{unknown:?}");
    Ok(())
}

/// A CA, and certificates it signs, for mutual TLS.
struct Pki {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Result<Pki> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate()?)?;
        Ok(Pki { issuer })
    }

    /// Writes a certificate for `ip` (as its subject alternative name) and its key; returns
    /// their paths.
    fn issue(&self, ip: Ipv4Addr, tag: &str) -> Result<(String, String)> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![rcgen::SanType::IpAddress(ip.into())];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let (cert_path, key_path) = (
            temp_path(ip, &format!(".{tag}.crt")),
            temp_path(ip, &format!(".{tag}.key")),
        );
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((
            cert_path.display().to_string(),
            key_path.display().to_string(),
        ))
    }

    fn write_ca(&self, ip: Ipv4Addr, tag: &str) -> Result<String> {
        let path = temp_path(ip, &format!(".{tag}.pem"));
        std::fs::write(&path, self.issuer.pem())?;
        Ok(path.display().to_string())
    }
}

#[test]
fn a_tcp_api_with_mutual_tls_takes_only_certificates_its_ca_signed() -> Result<()> {
    let ip = Ipv4Addr::new(127, 32, 0, 7);
    let (pool, _gateways) = two_gateways(ip, "")?;
    let ours = Pki::new("wglb test CA")?;
    let theirs = Pki::new("someone else's CA")?;
    let ca = ours.write_ca(ip, "ca")?;
    let (server_cert, server_key) = ours.issue(ip, "server")?;
    let (client_cert, client_key) = ours.issue(ip, "client")?;
    let (stranger_cert, stranger_key) = theirs.issue(ip, "stranger")?;
    let tcp = at(ip, 9639);
    let config = format!(
        "[api]\nsocket = \"{}\"\ntcp = \"{tcp}\"\ntls_cert = \"{server_cert}\"\ntls_key = \"{server_key}\"\nclient_ca = \"{ca}\"\n{pool}",
        temp_path(ip, ".sock").display(),
    );
    let _wglb = Wglb::start_with_file(&config, at(ip, 9638))?;
    let url = format!("https://{tcp}");

    let trusted = cli(
        &url,
        &[
            "--ca",
            &ca,
            "--cert",
            &client_cert,
            "--key",
            &client_key,
            "--json",
            "gateways",
        ],
    )?;
    ensure!(trusted.status.success(), "{trusted:?}");
    ensure!(String::from_utf8_lossy(&trusted.stdout).contains("\"name\":\"a\""));
    for refused in [
        cli(&url, &["--ca", &ca, "gateways"])?,
        cli(
            &url,
            &[
                "--ca",
                &ca,
                "--cert",
                &stranger_cert,
                "--key",
                &stranger_key,
                "gateways",
            ],
        )?,
        // Plain text to a TLS port gets nowhere either.
        cli(format!("http://{tcp}"), &["gateways"])?,
    ] {
        ensure!(
            matches!(refused.status.code(), Some(4) | Some(5)),
            "a client without a certificate from our CA got in: {refused:?}"
        );
        eprintln!(
            "refused: {}",
            String::from_utf8_lossy(&refused.stderr).trim()
        );
    }
    Ok(())
}

#[test]
fn shell_completions_know_every_client_command() -> Result<()> {
    for shell in ["bash", "zsh", "fish"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_wglb"))
            .args(["completions", shell])
            .output()?;
        ensure!(output.status.success(), "{shell}: {output:?}");
        let script = String::from_utf8(output.stdout)?;
        for command in [
            "status", "gateways", "sessions", "drain", "undrain", "evict", "key", "reload",
        ] {
            ensure!(
                script.contains(command),
                "{shell} completions lack `{command}`"
            );
        }
    }
    Ok(())
}
