//! A real `wglb` process relaying WireGuard-shaped datagrams between sockets on loopback: the
//! parts that need no WireGuard peer (several listeners, flags, the session table's bounds, the
//! drop policy). Each test uses its own 127.x address, so tests in parallel never share a port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use wglb_lab::{metrics, wait_for};

/// A gateway stand-in: echoes every datagram back and remembers who sent it.
struct Gateway {
    address: SocketAddr,
    senders: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Gateway {
    fn start(address: SocketAddr) -> Result<Gateway> {
        let socket = UdpSocket::bind(address).with_context(|| format!("binding {address}"))?;
        let senders: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let log = senders.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                log.lock().unwrap().push(from);
                let _ = socket.send_to(&buf[..n], from);
            }
        });
        Ok(Gateway { address, senders })
    }

    fn count(&self) -> usize {
        self.senders.lock().unwrap().len()
    }
}

struct Wglb {
    child: Child,
    metrics: SocketAddr,
}

impl Wglb {
    /// `wglb run` with flags, serving metrics on `metrics`.
    fn start(args: &[&str], metrics: SocketAddr) -> Result<Wglb> {
        let mut all = vec!["--metrics-listen".to_string(), metrics.to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        Wglb::spawn(&all, metrics)
    }

    /// `wglb run --config` with `config` plus a [metrics] section for `metrics`.
    fn start_with_file(config: &str, metrics: SocketAddr) -> Result<Wglb> {
        let path = std::env::temp_dir().join(format!(
            "wglb-loopback-{}-{}.toml",
            std::process::id(),
            metrics.ip()
        ));
        std::fs::write(
            &path,
            format!("[metrics]\nlisten = \"{metrics}\"\n{config}"),
        )?;
        let wglb = Wglb::spawn(&["--config".into(), path.display().to_string()], metrics);
        let _ = std::fs::remove_file(&path);
        wglb
    }

    fn spawn(args: &[String], metrics: SocketAddr) -> Result<Wglb> {
        let child = Command::new(env!("CARGO_BIN_EXE_wglb"))
            .args(["--log", "error", "run"])
            .args(args)
            .stdin(Stdio::null())
            .spawn()?;
        let wglb = Wglb { child, metrics };
        wglb.wait("metrics to be served", |w| {
            metrics::scrape(w.metrics).is_ok()
        })?;
        Ok(wglb)
    }

    fn metric(&self, prefix: &str) -> f64 {
        metrics::scrape(self.metrics).map_or(0.0, |text| metrics::sum(&text, prefix))
    }

    fn wait(&self, what: &str, done: impl Fn(&Wglb) -> bool) -> Result<()> {
        wait_for(what, Duration::from_secs(10), || {
            Ok(done(self).then_some(()))
        })
    }
}

impl Drop for Wglb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn initiation() -> Vec<u8> {
    let mut message = vec![0u8; 148];
    message[0] = 1;
    message
}

/// Sends an initiation from a fresh client socket and returns the echo and where it came from.
fn round_trip(client: SocketAddr, listener: SocketAddr) -> Result<(SocketAddr, Vec<u8>)> {
    let socket = UdpSocket::bind(client)?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.send_to(&initiation(), listener)?;
    let mut buf = [0u8; 2048];
    let (n, from) = socket
        .recv_from(&mut buf)
        .context("no echo through the balancer")?;
    Ok((from, buf[..n].to_vec()))
}

#[test]
fn each_listener_keeps_its_own_pool_and_answers_from_its_address() -> Result<()> {
    let ip = Ipv4Addr::new(127, 31, 0, 1);
    let office = [
        Gateway::start(at(ip, 52001))?,
        Gateway::start(at(ip, 52002))?,
    ];
    let lab = Gateway::start(at(ip, 52003))?;
    let config = format!(
        "[[listener]]\nname = \"office\"\nlisten = \"{}\"\nhash_key = \"source-ip-port\"\n\
         [[listener.gateway]]\nname = \"a\"\naddress = \"{}\"\n\
         [[listener.gateway]]\nname = \"b\"\naddress = \"{}\"\n\
         [[listener]]\nname = \"lab\"\nlisten = \"{}\"\n\
         [[listener.gateway]]\nname = \"c\"\naddress = \"{}\"\n",
        at(ip, 51820),
        office[0].address,
        office[1].address,
        at(ip, 51821),
        lab.address,
    );
    let _wglb = Wglb::start_with_file(&config, at(ip, 9638))?;
    for port in 40_000..40_020 {
        let (from, echo) = round_trip(at(Ipv4Addr::new(127, 31, 1, 1), port), at(ip, 51820))?;
        ensure!(from == at(ip, 51820) && echo == initiation());
    }
    let (from, _) = round_trip(at(Ipv4Addr::new(127, 31, 1, 1), 41_000), at(ip, 51821))?;
    ensure!(
        from == at(ip, 51821),
        "the lab listener answered from {from}"
    );
    ensure!(office[0].count() + office[1].count() == 20 && lab.count() == 1);
    ensure!(
        office[0].count() > 0 && office[1].count() > 0,
        "source-ip-port did not spread 20 clients"
    );
    // Full NAT: gateways see the balancer, never the client.
    for gateway in office.iter().chain([&lab]) {
        for from in gateway.senders.lock().unwrap().iter() {
            ensure!(
                from.ip() != Ipv4Addr::new(127, 31, 1, 1),
                "a gateway saw the client's address"
            );
        }
    }
    Ok(())
}

#[test]
fn the_table_stays_bounded_and_idle_sessions_expire() -> Result<()> {
    let ip = Ipv4Addr::new(127, 31, 0, 2);
    let gateway = Gateway::start(at(ip, 52001))?;
    let listen = at(ip, 51820).to_string();
    let spec = format!("g={}", gateway.address);
    let wglb = Wglb::start(
        &[
            "--listen",
            &listen,
            "--gateway",
            &spec,
            "--table-size",
            "2",
            "--idle-timeout",
            "1s",
        ],
        at(ip, 9638),
    )?;
    for port in 40_000..40_003 {
        round_trip(at(Ipv4Addr::new(127, 31, 2, 1), port), at(ip, 51820))?;
    }
    ensure!(wglb.metric("wglb_sessions{") == 2.0);
    ensure!(
        wglb.metric(r#"wglb_session_evictions_total{listener="default",reason="table_full"}"#)
            == 1.0
    );
    wglb.wait("idle sessions to expire", |w| {
        w.metric(r#"wglb_session_evictions_total{listener="default",reason="idle"}"#) == 2.0
    })?;
    ensure!(wglb.metric("wglb_sessions{") == 0.0);
    Ok(())
}

#[test]
fn with_the_drop_policy_nothing_reaches_a_pool_that_is_all_down() -> Result<()> {
    let ip = Ipv4Addr::new(127, 31, 0, 3);
    let gateway = Gateway::start(at(ip, 52001))?;
    let listen = at(ip, 51820).to_string();
    // Nothing listens on the health port: the check fails.
    let spec = format!("g={},health-port=55003", gateway.address);
    let wglb = Wglb::start(
        &[
            "--listen",
            &listen,
            "--gateway",
            &spec,
            "--all-down",
            "drop",
        ],
        at(ip, 9638),
    )?;
    wglb.wait("the gateway to be down", |w| {
        w.metric(r#"wglb_gateway_health{gateway="g",listener="default",state="down"}"#) == 1.0
    })?;
    let socket = UdpSocket::bind(at(Ipv4Addr::new(127, 31, 3, 1), 40_000))?;
    socket.send_to(&initiation(), at(ip, 51820))?;
    wglb.wait("the drop to be counted", |w| {
        w.metric(r#"wglb_dropped_packets_total{direction="to_gateway",listener="default",reason="no_gateway"}"#) == 1.0
    })?;
    ensure!(gateway.count() == 0);
    Ok(())
}
