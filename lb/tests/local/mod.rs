//! A real `wglb` process on loopback, gateway stand-ins that echo, and clients that send
//! WireGuard-shaped datagrams: for the tests that need no WireGuard peer. Each test uses its own
//! 127.x address and its own API socket and files, so tests in parallel never share anything.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use wglb::config::Config;
use wglb::control::initial_placement;
use wglb_lab::{wait_for, Launch};
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

/// A balancer on the host: the lab's runner, with its files named after the test's address.
pub struct Wglb {
    wglb: wglb_lab::Wglb,
    pub metrics: SocketAddr,
    pub api_socket: PathBuf,
}

/// A file name unique to this test process and `tag` (tests in parallel use their own address,
/// which makes a good tag).
pub fn temp_path(tag: impl std::fmt::Display, suffix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("wglb-test-{}-{tag}{suffix}", std::process::id()))
}

/// A balancer on the host with its files named after `metrics`'s address (the test's own).
pub fn launch(metrics: SocketAddr) -> Launch {
    let name = temp_path(metrics.ip(), "");
    let name = name.file_name().expect("a file name").to_string_lossy();
    Launch::new(
        Path::new(env!("CARGO_BIN_EXE_wglb")),
        &std::env::temp_dir(),
        metrics,
    )
    .named(&name)
    .log("warn")
}

impl Wglb {
    fn started(wglb: wglb_lab::Wglb) -> Wglb {
        Wglb {
            metrics: wglb.metrics_address(),
            api_socket: wglb.api_socket().to_path_buf(),
            wglb,
        }
    }

    /// `wglb run` with flags, serving metrics on `metrics`.
    pub fn start(args: &[&str], metrics: SocketAddr) -> Result<Wglb> {
        Ok(Wglb::started(launch(metrics).flags(args).flags_only()?))
    }

    /// `wglb run --config` with `config`, plus the metrics address and an API socket unless
    /// `config` names its own. The file stays, for reloads.
    pub fn start_with_file(config: &str, metrics: SocketAddr) -> Result<Wglb> {
        Ok(Wglb::started(launch(metrics).config(config)?))
    }

    /// Sum of every sample whose series starts with `prefix`; an error when there is none, or
    /// when the scrape fails.
    pub fn metric(&self, prefix: &str) -> Result<f64> {
        self.wglb.metric(prefix)
    }

    /// Polls a metric until it exists and `done` holds for it.
    pub fn wait_metric(&self, prefix: &str, done: impl Fn(f64) -> bool) -> Result<f64> {
        self.wglb.wait_metric(prefix, Duration::from_secs(10), done)
    }

    pub fn wait(&self, what: &str, done: impl Fn(&Wglb) -> bool) -> Result<()> {
        wait_for(what, Duration::from_secs(10), || {
            Ok(done(self).then_some(()))
        })
    }

    /// Runs `wglb --api SOCKET ARGS...` to completion.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        self.wglb.run_cli(args)
    }

    /// Like [`Wglb::cli`], for a command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        self.wglb.cli(args)
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
        // Its files are in the shared temporary directory: they go with it.
        let _ = self.wglb.kill();
        for suffix in [".toml", ".sock", ".log"] {
            let _ = std::fs::remove_file(temp_path(self.metrics.ip(), suffix));
        }
    }
}
