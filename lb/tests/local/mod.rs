//! A real `wglb` process on loopback, gateway stand-ins that echo, and clients that send
//! WireGuard-shaped datagrams: for the tests that need no WireGuard peer. Each test uses its own
//! 127.x address and its own API socket and files, so tests in parallel never share anything.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use wglb::config::Config;
use wglb::control::initial_placement;
use wglb_lab::{metrics, wait_for};
use wglb_proto::client::{Connection, Target};

pub fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

pub fn initiation() -> Vec<u8> {
    let mut message = vec![0u8; 148];
    message[0] = 1;
    message
}

/// What a gateway answers an initiation with: a handshake response, which confirms the session.
pub fn response() -> Vec<u8> {
    let mut message = vec![0u8; 92];
    message[0] = 2;
    message
}

/// A gateway stand-in: answers an initiation with a response, echoes anything else, and
/// remembers who sent it.
pub struct Gateway {
    pub address: SocketAddr,
    pub senders: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Gateway {
    pub fn start(address: SocketAddr) -> Result<Gateway> {
        let socket = UdpSocket::bind(address).with_context(|| format!("binding {address}"))?;
        let senders: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let log = senders.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                log.lock().unwrap().push(from);
                let answer = if buf[..n] == initiation()[..] {
                    response()
                } else {
                    buf[..n].to_vec()
                };
                let _ = socket.send_to(&answer, from);
            }
        });
        Ok(Gateway { address, senders })
    }

    pub fn count(&self) -> usize {
        self.senders.lock().unwrap().len()
    }
}

/// A client with its own socket, so that it keeps its session across sends.
pub struct Client {
    socket: UdpSocket,
    listener: SocketAddr,
}

impl Client {
    pub fn new(address: SocketAddr, listener: SocketAddr) -> Result<Client> {
        let socket = UdpSocket::bind(address).with_context(|| format!("binding {address}"))?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Client { socket, listener })
    }

    pub fn address(&self) -> SocketAddr {
        self.socket.local_addr().expect("bound")
    }

    /// Sends an initiation; returns the answer and where it came from.
    pub fn exchange(&self) -> Result<(SocketAddr, Vec<u8>)> {
        self.socket.send_to(&initiation(), self.listener)?;
        let mut buf = [0u8; 2048];
        let (n, from) = self
            .socket
            .recv_from(&mut buf)
            .context("no echo through the balancer")?;
        Ok((from, buf[..n].to_vec()))
    }

    /// Sends an initiation and checks that its response comes back, from the listener.
    pub fn round_trip(&self) -> Result<()> {
        let (from, echo) = self.exchange()?;
        anyhow::ensure!(from == self.listener && echo == response());
        Ok(())
    }
}

/// Sends an initiation from a fresh client socket and returns the answer and where it came from.
pub fn round_trip(client: SocketAddr, listener: SocketAddr) -> Result<(SocketAddr, Vec<u8>)> {
    Client::new(client, listener)?.exchange()
}

/// Client addresses on `ip`, from `first_port` on, that land on `gateway` under `config` when
/// every gateway is up.
pub fn clients_for(
    config: &str,
    ip: Ipv4Addr,
    first_port: u16,
    gateway: &str,
    n: usize,
) -> Vec<SocketAddr> {
    let config = Config::parse(config, "test").expect("test config");
    let placement = initial_placement(&config.listeners[0]);
    (first_port..u16::MAX)
        .map(|port| at(ip, port))
        .filter(|&client| placement.place(client).expect("a gateway").name == gateway)
        .take(n)
        .collect()
}

pub struct Wglb {
    child: Child,
    pub metrics: SocketAddr,
    pub api_socket: PathBuf,
    pub config: Option<PathBuf>,
}

/// A file name unique to this test process and `tag` (tests in parallel use their own address,
/// which makes a good tag).
pub fn temp_path(tag: impl std::fmt::Display, suffix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("wglb-test-{}-{tag}{suffix}", std::process::id()))
}

impl Wglb {
    /// `wglb run` with flags, serving metrics on `metrics`.
    pub fn start(args: &[&str], metrics: SocketAddr) -> Result<Wglb> {
        let api_socket = temp_path(metrics.ip(), ".sock");
        let mut all = vec![
            "--metrics-listen".to_string(),
            metrics.to_string(),
            "--api-socket".to_string(),
            api_socket.display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        Wglb::spawn(&all, metrics, api_socket, None)
    }

    /// `wglb run --config` with `config` plus [metrics] and, unless `config` has one, [api]
    /// sections. The file stays, for reloads.
    pub fn start_with_file(config: &str, metrics: SocketAddr) -> Result<Wglb> {
        let path = temp_path(metrics.ip(), ".toml");
        let api_socket = temp_path(metrics.ip(), ".sock");
        let api = if config.contains("[api]") {
            String::new()
        } else {
            format!("[api]\nsocket = \"{}\"\n", api_socket.display())
        };
        std::fs::write(
            &path,
            format!("[metrics]\nlisten = \"{metrics}\"\n{api}{config}"),
        )?;
        Wglb::spawn(
            &["--config".into(), path.display().to_string()],
            metrics,
            api_socket,
            Some(path),
        )
    }

    fn spawn(
        args: &[String],
        metrics: SocketAddr,
        api_socket: PathBuf,
        config: Option<PathBuf>,
    ) -> Result<Wglb> {
        let child = Command::new(env!("CARGO_BIN_EXE_wglb"))
            .args(["--log", "error", "run"])
            .args(args)
            .stdin(Stdio::null())
            .spawn()?;
        let wglb = Wglb {
            child,
            metrics,
            api_socket,
            config,
        };
        wglb.wait("metrics to be served", |w| {
            metrics::scrape(w.metrics).is_ok()
        })?;
        Ok(wglb)
    }

    /// Sum of every sample whose series starts with `prefix`; an error when there is none, or
    /// when the scrape fails.
    pub fn metric(&self, prefix: &str) -> Result<f64> {
        metrics::value(&metrics::scrape(self.metrics)?, prefix)
    }

    /// Polls a metric until it exists and `done` holds for it.
    pub fn wait_metric(&self, prefix: &str, done: impl Fn(f64) -> bool) -> Result<f64> {
        metrics::wait_for_value(
            prefix,
            Duration::from_secs(10),
            || metrics::scrape(self.metrics),
            done,
        )
    }

    pub fn wait(&self, what: &str, done: impl Fn(&Wglb) -> bool) -> Result<()> {
        wait_for(what, Duration::from_secs(10), || {
            Ok(done(self).then_some(()))
        })
    }

    /// Runs `wglb --api SOCKET ARGS...` to completion.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        cli(&self.api_socket, args)
    }

    /// Like [`Wglb::cli`], for a command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let output = self.cli(args)?;
        anyhow::ensure!(
            output.status.success(),
            "wglb {args:?}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Like [`Wglb::cli_ok`] with `--json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        Ok(serde_json::from_str(&self.cli_ok(&all)?)?)
    }

    /// A gRPC connection over the API socket.
    pub async fn connect(&self) -> Result<Connection> {
        let target = Target {
            address: self.api_socket.display().to_string(),
            ..Target::default()
        };
        Ok(target.connect().await?)
    }
}

/// Runs the `wglb` CLI against the API at `api`.
pub fn cli(api: impl AsRef<OsStr>, args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_wglb"))
        .arg("--api")
        .arg(api)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running the wglb CLI")
}

impl Drop for Wglb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(config) = &self.config {
            let _ = std::fs::remove_file(config);
        }
        let _ = std::fs::remove_file(&self.api_socket);
    }
}
